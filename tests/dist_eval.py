"""Run by test_finetune.py under `torchrun --nproc_per_node=2`: the one evaluate (abmilp_probe's, finetune's too)
over 7 val images (the sampler pads to 8) must count 7, and top-1 must equal a single process's, for both models."""
import json
import sys

import torch

import abmilp_probe
import data
import run
import finetune
import vit

rank, world, device = run.setup()
assert run.evaluate is run.evaluate  # one val loop in one place
ds = data.Seeded(data.DemoShapes("val", size=7), data.center_crop(64))
dl = data.loader(ds, 2, train=False, workers=0)
data.set_epoch(dl, 0)
out = {}
for name, make in [("finetune", lambda e: finetune.Classifier(e, 6)), ("probe", lambda e: abmilp_probe.Probe(e, 6, "avg"))]:
    torch.manual_seed(0)
    top1, top5, n = run.evaluate(make(vit.vit("vit_demo", 64)), dl, device)
    out[name] = dict(top1=top1, n=n)
json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
