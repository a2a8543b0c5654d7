"""Run by test_abmilp_cache.py under `torchrun --nproc_per_node=2`: each rank caches its own share of 7 val images
(4 and 3: the sampler's padded 8th cut), evaluates it (each image counted once), gathers it as knn's bank, then
runs every pool on one shared cache of 7 train images (shards of 4 and 3: the same 2 steps). Writes DIR/rankR.pt."""
import sys

import torch

import abmilp_probe as ap
import data
import probe_cache
import run
import vit

out = sys.argv[1]
rank, world, device = run.setup(0)  # seeds 0 + rank: rank 1's random encoder differs until cached() broadcasts rank 0's
enc = vit.vit("vit_demo", 32)
torch.manual_seed(1)
model = ap.Probe(enc, 6, "avg").to(device)  # the same head on both ranks
args = ap.parse_args(["--img-size", "32", "--workers", "0", "--micro-batch", "2", "--out", out])
val_tf = ap.transforms(32)[1]
tokens, labels = probe_cache.cached(args, model, data.DemoShapes("val", 7), val_tf, "val", {"condensed": False}, device)
result = run.evaluate(model, probe_cache.shard_batches(tokens, labels, 2), device, n=7)
bank = probe_cache.gather(tokens, 7), probe_cache.gather(labels, 7)
data.dataset = lambda d, split, labelled=False, classes=None: data.DemoShapes(split, 7)
ap.main(["--img-size", "32", "--pool", "all", "--cache-features", "--batch-size", "4", "--micro-batch", "2",
         "--max-steps", "2", "--workers", "0", "--out", f"{out}/probe"])  # destroys the process group
torch.save(dict(tokens=tokens, labels=labels, result=result, bank=bank), f"{out}/rank{rank}.pt")
