"""probe_cache.py, abmilp_probe.py's feature cache (--cache-features), and the probe's uint8 image path: cached
logits are the live ones with the tokens in bf16, the condensed cache pools as the full one, memory-mapped = in
memory, batches served by cache_steps (each row once an epoch, exact resume), each image cached once over 2 ranks,
uint8 = the float path."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import v2

import abmilp_probe as ap
import probe_cache
import run
import data
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
VAL = ap.transforms(32)[1]  # the probe's val transform at 32 px: what it caches through
pytestmark = pytest.mark.usefixtures("one_thread")


def probe_args(out, *flags):
    return ap.parse_args(["--img-size", "32", "--workers", "0", "--micro-batch", "16", "--out", str(out), *flags])


def test_cached_logits_are_the_live_ones_in_bf16(tmp_path, capsys):
    torch.manual_seed(0)
    enc, ds = vit.vit("vit_demo", 32), data.DemoShapes("val", 10)
    x = ap.normalized(torch.stack([ap.transforms(32)[1](ds[i][0]) for i in range(10)]))  # the live val images
    probes = {pool: ap.Probe(enc, 6, pool, block=3).eval() for pool in ("cls", "avg", "abmilp")}
    args = probe_args(tmp_path, "--block", "3")
    full, labels = probe_cache.cached(args, probes["abmilp"], ds, VAL, "val", {"condensed": False}, CPU)
    assert full.dtype == torch.bfloat16 and full.shape == (10, 1 + 16, 128)
    assert labels.tolist() == [ds[i][1] for i in range(10)]
    live = probes["abmilp"].features(x)  # (10, 17, 128) fp32
    for pool, probe in probes.items():
        assert torch.equal(probe.logits(full), probe.logits(live.bfloat16())), pool  # the same rows, in order
        torch.testing.assert_close(probe.logits(full), probe.logits(x), rtol=0.01, atol=1e-3)  # bf16 vs fp32 (~5e-4 of ~0.1)
    cond = probe_cache.cached(args, probes["cls"], ds, VAL, "val", {"condensed": True}, CPU)[0]
    assert cond.shape == (10, 2, 128)  # [cls], patch mean
    assert torch.equal(probes["cls"].pooled(cond.float())[0], probes["cls"].pooled(full.float())[0])
    torch.testing.assert_close(probes["avg"].pooled(cond.float())[0], live[:, 1:].mean(1), rtol=2**-8, atol=1e-6)
    args = probe_args(tmp_path, "--block", "3", "--cache-gib", "0")
    mm, mm_labels = probe_cache.cached(args, probes["abmilp"], ds, VAL, "val", {"condensed": False}, CPU)
    assert "10 images x 17 x 128 bf16 tokens" in capsys.readouterr().out
    assert mm.is_shared() and not full.is_shared() and not list(tmp_path.glob("cache_*"))  # mapped, file unlinked
    assert torch.equal(mm, full) and torch.equal(mm_labels, labels)


def test_cache_steps_each_row_once_an_epoch_and_resume():
    tokens, labels = torch.arange(20.0).view(20, 1, 1).bfloat16(), torch.arange(20)
    for x, y in next(probe_cache.cache_steps(tokens, labels, 3, 2, 3, 3))[2]:
        assert x.shape == (3, 1, 1) and torch.equal(x.flatten().long(), y)  # tokens and labels indexed alike

    def run(start=0, seed=0):  # micro 3, accum 2, 3 steps an epoch, 3 epochs: 18 of 20 rows an epoch
        steps = probe_cache.cache_steps(tokens, labels, 3, 2, 3, 3, start, seed)
        return [(e, s, [y.tolist() for _, y in mb]) for e, s, mb in steps]
    full = run()
    assert [(e, s) for e, s, _ in full] == [(s // 3, s) for s in range(9)]
    epochs = [sum((sum(mb, []) for e, _, mb in full if e == k), []) for k in range(3)]
    assert all(len(ids) == len(set(ids)) == 18 for ids in epochs) and epochs[0] != epochs[1] != epochs[2]
    assert run(4) == full[4:] and run(seed=1) != full  # resumed mid-epoch 1: the same batches


def test_cached_resume_and_memory_map_are_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None: data.DemoShapes(split, 48 if split == "train" else 12))
    common = ["--img-size", "32", "--batch-size", "8", "--micro-batch", "4", "--pool", "abmilp", "--cache-features",
              "--workers", "0", "--epochs", "2"]
    ap.main(common + ["--max-steps", "8", "--out", str(tmp_path / "a")])
    ap.main(common + ["--max-steps", "5", "--out", str(tmp_path / "b")])  # stops mid-epoch 0 (6 steps / epoch)
    ap.main(common + ["--max-steps", "3", "--cache-gib", "0", "--out", str(tmp_path / "b")])  # resumed memory-mapped
    ap.main(common + ["--max-steps", "8", "--cache-gib", "0", "--out", str(tmp_path / "c")])  # memory-mapped
    a, b, c = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "abc")
    for o in (b, c):
        assert a["step"] == o["step"] == 8 and a["result"] == o["result"]
        assert all(torch.equal(a["model"][k], o["model"][k]) for k in a["model"])  # fc, t and BN running statistics
        assert all(torch.equal(a["optimizer"]["state"][i]["mu"], o["optimizer"]["state"][i]["mu"]) for i in a["optimizer"]["state"])


def test_uint8_images_match_the_float_path():
    # the worker ships uint8 and the step normalises; the old transforms normalised in the worker (same crops)
    ds = data.DemoShapes("val", 6)
    torch.manual_seed(0)
    probe = ap.Probe(vit.vit("vit_demo", 32), 6, "avg").eval()
    kamim = T.Compose([data.to_uint8(), v2.Resize((32, 32), antialias=False), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])  # KAMIM's code: the uint8 image resized
    for protocol, old in (("mae", data.center_crop(32)), ("kamim", kamim)):
        new = data.Seeded(ds, ap.transforms(32, protocol)[1])
        x = ap.normalized(torch.stack([new[i][0] for i in range(6)]))
        torch.testing.assert_close(x, torch.stack([old(ds[i][0]) for i in range(6)]), rtol=0, atol=1e-5)
        loaders = [torch.utils.data.DataLoader(data.Seeded(ds, tf), 4) for tf in (ap.transforms(32, protocol)[1], old)]
        assert run.evaluate(probe, loaders[0], CPU) == run.evaluate(probe, loaders[1], CPU)  # finetune's float loader too
        torch.testing.assert_close(probe.logits(x), probe.logits(torch.stack([old(ds[i][0]) for i in range(6)])))
    old, new = (data.Seeded(ds, tf, seed=3) for tf in (T.Compose([data.crop_flip(32), data.normalize()]), ap.transforms(32)[0]))
    for i in range(6):  # the train view: the same random crop and flip from the same seed
        assert new[i][0].dtype == torch.uint8
        torch.testing.assert_close(ap.normalized(new[i][0][None])[0], old[i][0], rtol=0, atol=1e-5)


def test_two_ranks_cache_each_image_once(tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29642",
                        os.path.join(ROOT, "tests", "dist_cache.py"), str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    torch.manual_seed(0)  # rank 0's encoder, both ranks' head
    enc = vit.vit("vit_demo", 32)
    torch.manual_seed(1)
    model = ap.Probe(enc, 6, "avg")
    args = probe_args(tmp_path / "one", "--micro-batch", "2")
    tokens, labels = probe_cache.cached(args, model, data.DemoShapes("val", 7), VAL, "val", {"condensed": False}, CPU)
    one = run.evaluate(model, probe_cache.shard_batches(tokens, labels, 2), CPU, n=7)
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in range(2)]
    assert [len(o["labels"]) for o in ranks] == [4, 3]  # 7 images, each once: the sampler's padding cut
    for k, o in enumerate(ranks):
        torch.testing.assert_close(o["tokens"], tokens[k::2])  # image j on rank j % 2
        assert torch.equal(o["labels"], labels[k::2])
        assert o["result"][2] == 7 and o["result"][0] == pytest.approx(one[0])  # counts all-reduced, each image once
        torch.testing.assert_close(o["bank"][0], tokens)  # knn's gathered bank: all 7, in order
        assert torch.equal(o["bank"][1], labels)
    for pool in ("cls", "avg", "abmilp"):  # unequal shards, the same steps on both ranks
        assert torch.load(tmp_path / "probe" / pool / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None: data.DemoShapes(split, 7))
    ap.main(["--img-size", "32", "--pool", "knn", "--cache-features", "--micro-batch", "2", "--out", str(tmp_path / "knn")])
    rows = [[r for r in map(json.loads, open(d / "log.jsonl")) if "top1" in r] for d in (tmp_path / "knn", tmp_path / "probe" / "knn")]
    assert len(rows[0]) == 2 and rows[0] == rows[1]  # knn on the gathered shards = on the whole cache


def test_images_are_normalised_with_the_runs_mean_and_std(tmp_path, monkeypatch):
    # the workers ship uint8 (issue 17): every image batch the encoder sees (train, evaluate, knn, the cache's build)
    # must be (u / 255 - mean) / std with --mean / --std, u whole numbers in [0, 255]; ImageNet's would leave fractions
    mean, std = torch.tensor([0.2, 0.5, 0.7])[:, None, None], torch.tensor([0.1, 0.2, 0.3])[:, None, None]
    seen, features = [], ap.Probe.features
    monkeypatch.setattr(ap.Probe, "features", lambda self, x: seen.append(x) or features(self, x))
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None: data.DemoShapes(split, 16))
    common = ["--img-size", "32", "--workers", "0", "--batch-size", "8", "--micro-batch", "8", "--max-steps", "1",
              "--mean", "0.2", "0.5", "0.7", "--std", "0.1", "0.2", "0.3"]
    ap.main(common + ["--pool", "all", "--no-cache-features", "--out", str(tmp_path / "a")])  # the demo caches by default
    n = len(seen)
    ap.main(common + ["--pool", "knn", "--cache-features", "--out", str(tmp_path / "b")])
    assert n == 3 * (1 + 2) + 4 and len(seen) == n + 4  # 3 probes x (a step, 2 val batches), knn 4; the cache 4
    for x in seen:
        u = (x * std + mean) * 255
        assert (u - u.round()).abs().max() < 2e-3 and u.min() > -2e-3 and u.max() < 255 + 2e-3
