"""Training-step time of SemanticMIM (8 proxies, mask ratio 0.6) next to the vanilla MIM baseline (one [CLS],
ratio 0.4) at the same batch, on in-memory tensors, with the FLOP ratio App. C's formula predicts.

    python benchmarks/bench_semanticmim.py                                     # CPU, vit_demo at 64 px, < 1 min
    python benchmarks/bench_semanticmim.py --model vit_b --img-size 224 --batch-size 128 --device cuda
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import semanticmim as S  # noqa: E402


def step(model, opt, img, mask, device):
    """One timed training step: forward (bf16 autocast on GPU), backward, clip, AdamW."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = model(img, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.02)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_demo")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--proxies", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"{args.model} at {args.img_size} px, batch {args.batch_size}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    runs = []
    for name, proxies, ratio in (("semanticmim", args.proxies, 0.6), ("vanilla MIM", 0, 0.4)):
        model = S.SemanticMIM(args.model, args.img_size, proxies, ratio).to(device)
        N = model.encoder.grid[0] * model.encoder.grid[1]
        img = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        mask = torch.stack([S.random_patch_mask(N, model.n_mask) for _ in range(args.batch_size)]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        runs.append((name, model, opt, img, mask, []))
    for i in range(args.warmup + args.steps):  # the two alternate step by step: fair on a shared, noisy machine
        for name, model, opt, img, mask, times in runs:
            if device.type == "cuda" and i == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
            t = step(model, opt, img, mask, device)
            if i >= args.warmup:
                times.append(t)
    rows = []
    for name, model, opt, img, mask, times in runs:
        dt = sorted(times)[len(times) // 2]  # median
        flops = model.train_flops() * args.batch_size
        rows.append((name, dt, flops))
        print(f"{name:12s} L0 {N - model.n_mask:4d}  L1 {model.proxies or 1:2d}  L2 {model.n_mask:4d}  "
              f"{1e3 * dt:8.1f} ms/step  {args.batch_size / dt:8.1f} img/s  {flops / dt / 1e12:7.3f} TFLOP/s  "
              f"{flops / 1e9:8.2f} GFLOP/step")
    if device.type == "cuda":
        print(f"peak memory of the two together: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    (_, t_s, f_s), (_, t_v, f_v) = rows
    D, L2 = model.encoder.dim, S.mask_count(N, 0.6)
    paper = S.semanticmim_block_cost(1, D, N - L2, args.proxies, L2) / S.vanilla_block_cost(1, N + 1, D)
    real = S.semanticmim_block_macs(N - L2, args.proxies, L2, D) / S.vanilla_block_cost(1, N + 1, D)
    print(f"per block, vs a vanilla block of {N + 1} tokens: App. C's formula {100 * (paper - 1):+.2f} %, "
          f"the real modules {100 * (real - 1):+.2f} %")
    print(f"whole training step: analytic FLOPs {100 * (f_s / f_v - 1):+.2f} %, measured time {100 * (t_s / t_v - 1):+.2f} %")


if __name__ == "__main__":
    main()
