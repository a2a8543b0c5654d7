"""Shared timing for the benchmarks: warm-up, then timed training steps, and one printed row each."""
import time

import torch

import vit


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


HEADER = f"{'method':<22} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'FLOPs/img':>10}"


def row(name, ms, batch, flops_per_image, device, peak_gib=None):
    """One benchmark line: achieved TFLOP/s from the analytic training FLOPs (vit.py's accounting) and
    MFU against the GPU's dense bf16 peak (vit.PEAK_FLOPS; '-' on CPU)."""
    ips = batch * 1000 / ms
    tflops = ips * flops_per_image / 1e12
    u = vit.mfu(tflops * 1e12, device)
    return (f"{name:<22} {ms:>9.1f} {ips:>9.1f} {tflops:>8.3f} {'-' if u is None else f'{u:.1%}':>6} "
            f"{'-' if peak_gib is None else f'{peak_gib:.1f}':>8} {flops_per_image / 1e9:>9.2f}G")
