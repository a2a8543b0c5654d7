"""Run by test_finetune.py under `torchrun --nproc_per_node=2`: finetune.evaluate over 7 val images (the sampler
pads to 8) must count 7, and top-1 must equal a single process's."""
import json
import sys

import torch

import data
import finetune
import vit

rank, world, device = data.setup()
torch.manual_seed(0)
model = finetune.Classifier(vit.vit("vit_demo", 64), 6)
ds = data.Seeded(data.DemoShapes("val", size=7), data.center_crop(64))
dl = data.loader(ds, 2, train=False, workers=0)
data.set_epoch(dl, 0)
top1, top5, n = finetune.evaluate(model, dl, device)
json.dump(dict(top1=top1, n=n), open(f"{sys.argv[1]}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
