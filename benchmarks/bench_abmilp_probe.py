"""Time one probe training step (frozen encoder forward + head forward/backward + LARS) per pooling, side by
side at the same batch on in-memory tensors; and AbMILP's step on cached tokens (--cache-features).

    python benchmarks/bench_abmilp_probe.py                                     # CPU, vit_demo, < 1 min
    python benchmarks/bench_abmilp_probe.py --model vit_b --img-size 224 --batch-size 1024 --device cuda
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import abmilp_probe as ap  # noqa: E402
import vit  # noqa: E402


def head_flops(pool, N, D, K):
    """FLOPs of the head per image, training (forward + 2x backward): classifier D K, AbMILP t N D + sum N D."""
    macs = D * K + {"cls": 0, "avg": N * D, "abmilp": 2 * N * D}[pool]
    return 3 * 2 * macs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_demo")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    enc = vit.vit(args.model, args.img_size).to(dev)
    N, D, B = enc.grid[0] * enc.grid[1], enc.dim, args.batch_size
    x, y = torch.randn(B, 3, args.img_size, args.img_size, device=dev), torch.randint(0, args.classes, (B,), device=dev)
    enc_flops = vit.vit_forward_flops(enc)  # the frozen encoder runs forward only
    print(f"{args.model} at {args.img_size} px, batch {B}, K {args.classes}, {dev}; encoder forward "
          f"{enc_flops / 1e9:.3f} GFLOP/img")
    print(f"{'pool':16s} {'ms/step':>9s} {'img/s':>9s} {'TFLOP/s':>8s} {'FLOP ratio':>10s} {'peak MiB':>9s}")
    base = None
    for pool, cached in (("cls", False), ("avg", False), ("abmilp", False), ("abmilp", True)):
        probe = ap.Probe(enc, args.classes, pool).to(dev).train()
        opt = ap.LARS([q for q in probe.parameters() if q.requires_grad], lr=0.1)
        inp = probe.features(x) if cached else x
        amp = torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
            with amp:
                loss, _ = probe(inp, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = (time.perf_counter() - t0) / args.steps
        flops = (0 if cached else enc_flops) + head_flops(pool, N, D, args.classes)
        base = base or flops
        mem = f"{torch.cuda.max_memory_allocated(dev) / 2**20:9.0f}" if dev.type == "cuda" else f"{'-':>9s}"
        print(f"{pool + (' (cached)' if cached else ''):16s} {dt * 1e3:9.1f} {B / dt:9.0f} "
              f"{flops * B / dt / 1e12:8.3f} {flops / base:10.4f} {mem}")


if __name__ == "__main__":
    main()
