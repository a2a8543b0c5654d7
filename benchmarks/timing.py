"""What every training-step benchmark shares: its flags, one training step as the scripts take it, the
timing, and one printed row per case with the FLOP ratio vit.py's accounting predicts next to the
measured time ratio, both against the first case (the pair's baseline).

Training FLOPs are analytic (vit.py: 3 x the forward for what gets a gradient, 1 x for no-grad passes),
so TFLOP/s and MFU count model FLOPs, not what the kernels really execute. MFU is against run.PEAK_FLOPS
(H100 SXM dense bf16: 989 TFLOP/s); on the CPU only TFLOP/s is printed.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vit  # noqa: E402
from run import mfu  # noqa: E402


def parser(doc, model="vit_demo", img_size=64, batch_size=16, steps=3, warmup=1):
    """The flags every step benchmark takes; the defaults are a small CPU run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, choices=list(vit.CONFIGS), help="encoder (default %(default)s)")
    p.add_argument("--img-size", type=int, default=img_size, help="input size (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per case, in up to 3 interleaved rounds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first; with --compile the first one "
                   "compiles (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model, as the scripts' --compile does")
    p.add_argument("--cases", type=int, default=None, help="time only the first N cases (default "
                   "all; 2 with --compile: one pair, fewer compiles)")
    return p


def setup(p):
    """Parse the flags of parser p; the device, the seed, and a first line that says what runs; on CUDA also
    TF32 as run.setup sets it. Returns (args, device)."""
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    what = torch.cuda.get_device_name(device) + ", bf16 autocast" if device.type == "cuda" else \
        f"{torch.get_num_threads()} threads, fp32"
    cfg = vit.CONFIGS[args.model]
    n = (args.img_size // cfg["patch_size"]) ** 2 + 1
    print(f"{args.model} at {args.img_size} px, batch {args.batch_size}, {device} ({what}), torch {torch.__version__}"
          f"{', compiled' if args.compile else ''}; {args.warmup} warm-up + {args.steps} timed steps per case; "
          f"SDPA runs {sdpa_op(device, cfg['heads'], cfg['dim'] // cfg['heads'], n)}")
    return args, device


class _Ops(TorchDispatchMode):
    """Records the aten ops that run under it (after composite ops like SDPA have dispatched)."""
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def sdpa_op(device, heads, head_dim, n):
    """The kernel scaled_dot_product_attention dispatches to for one block's shapes (the issue: check which runs)."""
    q = torch.randn(2, heads, n, head_dim, device=device, requires_grad=True)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with _Ops() as ops, amp:
        F.scaled_dot_product_attention(q, q, q)
    return " + ".join(sorted(o for o in ops.names if "attention" in o)) or "the math fallback"


def train_step(model, inputs, device, compile=False, opt=None, clip=None, after=None):
    """One training step as the scripts take it -> a no-argument function that runs it: forward under bf16
    autocast on CUDA (fp32 on the CPU), backward, gradient clip if `clip`, the optimiser (fused AdamW with
    vit.param_groups on CUDA unless `opt` is given), zero_grad, then `after()` (LUT's EMA update).
    model(*inputs) returns (loss, terms), as every method's forward does."""
    cuda = device.type == "cuda"
    opt = opt or torch.optim.AdamW(vit.param_groups(model, 0.05), lr=1e-4, fused=cuda)
    net = torch.compile(model) if compile else model
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    model.train()

    def step():
        with amp:
            loss, _ = net(*inputs)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after()
    return step


def time_step(step, device, warmup=3, iters=10):
    """Run step() warmup times, then time iters calls. Returns (ms per step, peak GPU memory in GiB or None)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    ms = (time.perf_counter() - t) * 1000 / iters
    return ms, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


HEADER = (f"{'case':<22} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'FLOPs/img':>10} "
          f"{'FLOPs x':>8} {'time x':>7}")


def row(name, ms, batch, flops_per_image, device, peak_gib=None, base=None):
    """One benchmark line: achieved TFLOP/s from the analytic training FLOPs (vit.py's accounting), MFU
    against the GPU's dense bf16 peak (run.PEAK_FLOPS; '-' on CPU), and against base = (ms, FLOPs/img) of
    the baseline case the FLOP ratio vit.py predicts and the time ratio measured."""
    ips = batch * 1000 / ms
    tflops = ips * flops_per_image / 1e12
    u = mfu(tflops * 1e12, device)
    b_ms, b_flops = base or (ms, flops_per_image)
    return (f"{name:<22} {ms:>9.1f} {ips:>9.1f} {tflops:>8.3f} {'-' if u is None else f'{u:.1%}':>6} "
            f"{'-' if peak_gib is None else f'{peak_gib:.1f}':>8} {flops_per_image / 1e9:>9.3f}G "
            f"{flops_per_image / b_flops:>8.3f} {ms / b_ms:>7.3f}")


def run(cases, args, device, rounds=3):
    """cases: [(name, build)], the first the baseline; build() -> (step function, training FLOPs per image).
    Builds and warms up every case, then times them in up to `rounds` interleaved rounds of --steps / rounds
    steps each, so a load change on a shared machine hits all cases alike; reports each case's median round.
    Peak memory is the case's own: its weights, optimiser state and activations, not the other cases' state.
    Prints HEADER and one row per case; returns {name: ms per step}."""
    cuda = device.type == "cuda"
    mem = torch.cuda.memory_allocated if cuda else (lambda: 0)
    cases, built = cases[:getattr(args, "cases", None)], []
    for name, build in cases:
        before = mem()
        step, flops = build()
        for _ in range(args.warmup):  # with --compile the first step compiles
            step()
        if cuda:
            torch.cuda.synchronize(device)
        built.append((name, step, flops, mem() - before, []))  # mem() - before: this case's resident state
    rounds = min(rounds, args.steps)
    for _ in range(rounds):
        for name, step, flops, own, times in built:
            others = mem() - own
            ms, peak = time_step(step, device, 0, -(-args.steps // rounds))
            times.append((ms, None if peak is None else peak - others / 2**30))
    print(HEADER)
    base, out = None, {}
    for name, step, flops, own, times in built:
        ms = sorted(t[0] for t in times)[len(times) // 2]
        peak = max(t[1] for t in times) if cuda else None
        base = base or (ms, flops)
        print(row(name, ms, args.batch_size, flops, device, peak, base), flush=True)
        out[name] = ms
    return out
