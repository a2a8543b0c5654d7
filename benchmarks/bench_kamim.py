"""Benchmark (not a test): SimMIM vs KAMIM, side by side in one run.

1. Data pipeline images/s: the loader transform without keypoints (SimMIM) and with FAST / ORB / SIFT
   point maps (KAMIM; Table 4 claims epoch time ~1x FAST, 1.06x SIFT, 1.07x ORB), one process.
2. Training step on in-memory tensors: SimMIM, KAMIM with the released circles, KAMIM with points;
   ms/step, img/s, TFLOP/s from the analytic FLOPs, and peak memory on GPU. The FLOP formula predicts
   a ratio of 1.00: the weighting adds no matmul (the 9 x 9 ring costs 81 MACs per pixel, counted).

    python benchmarks/bench_kamim.py                                               # CPU, < 1 min
    python benchmarks/bench_kamim.py --model vit_b --img-size 192 --batch-size 256 --device cuda
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import kamim  # noqa: E402
import vit  # noqa: E402


def bench_pipeline(img_size, model_patch, mask_patch, n):
    images = [data.DemoShapes("train")[i][0].resize((img_size + 64,) * 2) for i in range(n)]
    rows = {}
    for det in ("none", "fast", "orb", "sift"):
        tf = kamim.KamimTransform(img_size, model_patch, mask_patch, detector=det)
        tf(images[0])
        t = time.perf_counter()
        for im in images:
            tf(im)
        rows[det] = n / (time.perf_counter() - t)
        print(f"pipeline {det:>5}: {rows[det]:8.1f} img/s per process  ({rows['none'] / rows[det]:.2f}x SimMIM's time)")
    return rows


def bench_step(args, device):
    torch.manual_seed(0)
    B, d = args.batch_size, args.img_size
    img = torch.randn(B, 3, d, d, device=device)
    mask = torch.stack([data.simmim_mask(d, args.mask_patch, vit.CONFIGS[args.model]["patch_size"]) for _ in range(B)]).to(device)
    crop = data.kamim_crop(d)
    crops = [crop(data.DemoShapes("train")[i % 64][0]) for i in range(B)]
    points = torch.stack([torch.from_numpy(data.keypoint_map(np.asarray(c))) for c in crops]).to(device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    base = None
    for name, circles, pts in (("SimMIM", True, None), ("KAMIM circles", True, points), ("KAMIM points", False, points)):
        model = kamim.KAMIM(vit.vit(args.model, img_size=d), args.wps, 0.25, circles).to(device)
        opt = torch.optim.AdamW(vit.param_groups(model, 0.05), lr=1e-4, **({"fused": True} if cuda else {}))
        flops = kamim.train_flops(model) + (0 if pts is None else 3 * 2 * 81 * d * d * circles)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                torch.cuda.synchronize() if cuda else None
                t = time.perf_counter()
            with autocast:
                loss, _ = model(img, mask, pts)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if cuda else None
        ms = (time.perf_counter() - t) / args.steps * 1e3
        base = base or (ms, flops)
        mem = f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else ""
        print(f"step {name:>14}: {ms:8.1f} ms/step  {B / ms * 1e3:8.1f} img/s  {B * flops / ms / 1e9:7.3f} TFLOP/s  "
              f"time {ms / base[0]:.2f}x  FLOPs {flops / base[1]:.4f}x{mem}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_demo")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--mask-patch", type=int, default=None, help="default: 16 at 96 px, else 32")
    p.add_argument("--wps", type=int, default=None, help="default: 4 at 96 px, else 8")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pipeline-images", type=int, default=100)
    args = p.parse_args()
    args.mask_patch = args.mask_patch or (16 if args.img_size == 96 else 32)
    args.wps = args.wps or (4 if args.img_size == 96 else 8)
    device = torch.device(args.device)
    print(f"{args.model} at {args.img_size} px, batch {args.batch_size}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    bench_pipeline(args.img_size, vit.CONFIGS[args.model]["patch_size"], args.mask_patch, args.pipeline_images)
    bench_step(args, device)


if __name__ == "__main__":
    main()
