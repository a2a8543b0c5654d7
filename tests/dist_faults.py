"""Run by test_faults.py under `torchrun --nproc_per_node=2`: run.share_skips gives every process all the unreadable
files (rank r found file r of the folder DIR2): DIR/skipsR.json; then kNN on the feature cache with 1 val image (rank 1's
val shard is empty) must print its table and log 1 image scored in DIR/log.jsonl."""
import json
import sys

import abmilp_probe as ap
import data
import run

rank, world, device = run.setup()
ds = data.ImageFiles(sys.argv[2])
run.restore_skips(ds, [rank])
run.share_skips(ds)
json.dump(dict(state=run.skip_state(ds), skipped=run.skipped(ds)), open(f"{sys.argv[1]}/skips{rank}.json", "w"))
data.dataset = lambda d, split, labelled=False, classes=None: data.DemoShapes(split, 7 if split == "train" else 1)
ap.main(["--img-size", "32", "--pool", "knn", "--cache-features", "--micro-batch", "2", "--workers", "0", "--out", sys.argv[1]])
