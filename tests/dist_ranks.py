"""Run by test_data.py under `torchrun --nproc_per_node=2`: each rank writes the sample ids it saw."""
import json
import sys

import torch.distributed as dist

import data

rank, world, device = data.setup()
ds = data.Seeded(data.DemoShapes("train", size=40), lambda img: 0)
dl = data.loader(ds, batch_size=4, train=True, workers=1)
data.set_epoch(dl, 0)
ids = list(dl.sampler)
json.dump(dict(rank=rank, world=world, ids=ids, batches=len(list(dl))), open(f"{sys.argv[1]}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
