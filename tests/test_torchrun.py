"""Every script TRAINS under 2-process torchrun (gloo): pretraining with and without the method, the probe with
each pooling and its cache, fine-tuning with each preset. Where a script's randomness allows, 2 processes equal
1 at the same global batch (the logged losses are means over processes); tests/dist_train.py says why not
elsewhere. Slow (one torchrun launch, ~2 minutes on 2 cores): `pytest -m "not slow"` skips it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
from tests import dist_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled ImageNet-style folder of JPEGs: 2 classes, 8 train and 3 val images each."""
    root = tmp_path_factory.mktemp("imgs")
    demo = {s: data.DemoShapes(s, 12) for s in ("train", "val")}
    for split, n in (("train", 8), ("val", 3)):
        for c in range(2):
            os.makedirs(root / split / f"class{c}")
            for k in range(n):
                img = demo[split][4 * k + c][0].resize((40, 40))  # classes 0 and 1 of the demo
                img.save(root / split / f"class{c}" / f"{k}.JPEG", quality=90)
    return str(root)


@pytest.fixture(scope="module")
def two(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29652",
           os.path.join(ROOT, "tests", "dist_train.py"), folder, out, *dist_train.CASES]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def records(out, name):
    return [r for r in map(json.loads, open(os.path.join(out, name, "log.jsonl"))) if "step" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(dist_train.CASES))
def test_trains_under_torchrun(name, two, folder, tmp_path, one_thread):
    logged = records(two, name)
    steps = [r for r in logged if "top1" not in r]
    assert steps and steps[-1]["step"] == 2, logged  # two optimiser steps, a log line at the last
    losses = [v for r in steps for k, v in r.items() if k.startswith(("loss", "mim", "bc", "l1"))]
    assert losses and np.isfinite(losses).all()
    assert os.path.exists(os.path.join(two, name, "checkpoint.pt"))
    if dist_train.CASES[name][2] is None:  # the same global batch in one process: the same losses
        dist_train.train(name, folder, str(tmp_path))
        one = [r for r in records(str(tmp_path), name) if "top1" not in r]
        keys = [k for k in one[-1] if k.startswith(("loss", "mim", "bc", "l1"))]
        assert keys and all(one[-1][k] == pytest.approx(steps[-1][k], rel=1e-4) for k in keys), (one, steps)
