"""Training-step time of MAE (--alpha 0), LUT and LUT's released two-view variant, side by side at the same
batch on in-memory tensors. The paper (§3): LUT takes ~18 % more per iteration (0.46 s vs 0.39 s).

    OMP_NUM_THREADS=1 python benchmarks/bench_lut.py                 # CPU, vit_demo at 64 px, < 1 min
    python benchmarks/bench_lut.py --model vit_b --img-size 224 --batch-size 128 --device cuda
"""
import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lut  # noqa: E402
import vit  # noqa: E402


def step_fn(model, batch, device):
    """One training step (forward, backward, AdamW, EMA) -> a function that runs it and returns its seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()

    def step():
        t0 = time.perf_counter()
        with autocast:
            loss, _ = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.alpha > 0:
            model.update_teacher(0.996)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_demo")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decoder", type=int, nargs=3, default=None, metavar=("DIM", "DEPTH", "HEADS"),
                   help="default: MAE's 512 8 16, or 128 2 4 for vit_demo")
    p.add_argument("--head-hidden", type=int, default=4096, help="§5.1: 4096")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    device = torch.device(args.device)
    dec = args.decoder or ([128, 2, 4] if args.model == "vit_demo" else [512, 8, 16])
    torch.manual_seed(0)
    batch = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device) for _ in range(2)]
    print(f"{args.model} at {args.img_size} px, batch {args.batch_size}, decoder {dec}, heads {args.head_hidden}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    runs = []
    for name, alpha, two in [("MAE", 0.0, False), ("LUT", 0.25, False), ("LUT two-view", 0.25, True)]:
        model = lut.LUT(vit.vit(args.model, img_size=args.img_size), *dec, alpha=alpha, head_hidden=args.head_hidden, two_view=two).to(device)
        step = step_fn(model, batch[:1] if alpha == 0 else batch, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        mem = f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        runs.append((name, step, lut.train_flops(model), mem, []))
    for _ in range(args.steps):  # interleaved rounds, so a load change on a shared machine hits all three alike
        for run in runs:
            run[4].append(run[1]())
    base = None
    for name, _, flops, mem, times in runs:
        s = sorted(times)[len(times) // 2]  # median
        base = base or (s, flops)
        ips = args.batch_size / s
        mfu = vit.mfu(ips * flops, device)
        print(f"{name:13s} {1e3 * s:8.1f} ms/step  {ips:8.1f} img/s  {ips * flops / 1e12:7.3f} TFLOP/s"
              f"{'' if mfu is None else f'  MFU {mfu:.1%}'}  time x{s / base[0]:.2f}  FLOPs x{flops / base[1]:.2f} (formula){mem}")

if __name__ == "__main__":
    main()
