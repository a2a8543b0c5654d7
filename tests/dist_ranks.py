"""Run by test_run.py under `torchrun --nproc_per_node=2`: each rank writes the sample ids it saw, its first
draws after resuming rank 0's RNG state, and whether a nan on rank 1 alone stopped it."""
import json
import sys

import torch
import torch.distributed as dist

import data
import run

rank, world, device = run.setup()
ds = data.Seeded(data.DemoShapes("train", size=40), lambda img: 0)
dl = data.loader(ds, batch_size=4, train=True, workers=1)
data.set_epoch(dl, 0)
ids = [i for _, i in dl.sampler]  # (epoch, index) pairs for a Seeded dataset
saved = [run.rng_state()]  # a checkpoint holds rank 0's state; every rank resumes from it
dist.broadcast_object_list(saved, src=0)
expected = torch.rand(2).tolist()
run.set_rng_state(saved[0], step=5)
draw = torch.rand(2).tolist()
try:
    run.check_finite(float("nan") if rank == 1 else 1.0, 5, sys.argv[1])
    stopped = False
except SystemExit:
    stopped = True
json.dump(dict(rank=rank, world=world, ids=ids, batches=len(list(dl)), expected=expected, draw=draw, stopped=stopped),
          open(f"{sys.argv[1]}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
