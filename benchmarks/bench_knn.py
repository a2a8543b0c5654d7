"""Peak memory of abmilp_probe.knn_classify (DINO's weighted kNN, k 20, T 0.07) over an fp16 bank, in chunks.
ImageNet's bank is 1.28 M x 768 fp16 = 1.83 GiB; the chunked search adds only Q x (chunk + k) similarities and one
fp32 chunk of the bank, never Q x M.

    python benchmarks/bench_knn.py                                   # CPU: a 128 k x 768 bank, a few seconds
    python benchmarks/bench_knn.py --bank 1281167 --device cuda      # ImageNet's bank on one GPU
"""
import argparse
import resource
import time

import torch

import timing  # noqa: F401  (puts the repository on the path)
import abmilp_probe as ap  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--bank", type=int, default=131072, help="bank rows M (ImageNet train: 1281167)")
p.add_argument("--dim", type=int, default=768)
p.add_argument("--queries", type=int, default=1024, help="val rows per call Q (abmilp_probe.knn uses 1024)")
p.add_argument("--chunk", type=int, default=65536)
p.add_argument("--device", default="cpu")
args = p.parse_args()
dev = torch.device(args.device)
bank = torch.randn(args.bank, args.dim, device=dev).half()
labels, q = torch.randint(0, 1000, (args.bank,), device=dev), torch.randn(args.queries, args.dim, device=dev)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
if dev.type == "cuda":
    torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
base, t0 = (torch.cuda.memory_allocated() if dev.type == "cuda" else rss() * 2**30), time.time()
ap.knn_classify(q, bank, labels, 1000, chunk=args.chunk)
if dev.type == "cuda":
    torch.cuda.synchronize()  # the clock stops when the kernels finish, not when they launch
peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else rss() * 2**30
bank_gib = bank.numel() * 2 / 2**30
print(f"kNN {args.queries} queries x bank {args.bank} x {args.dim} fp16 ({bank_gib:.3f} GiB), chunk {args.chunk}: "
      f"{time.time() - t0:.2f} s; peak above bank and inputs {(peak - base) / 2**30:.3f} GiB "
      f"({'allocator peak' if dev.type == 'cuda' else 'process max RSS growth'}); unchunked Q x M fp32 would be "
      f"{args.queries * args.bank * 4 / 2**30:.3f} GiB")
