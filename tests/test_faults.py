"""Messy data and short machines over a long run (issue 25): each fault is skipped and counted, or stops early with a
message that names it; never a silently wrong number.

| fault | what it gets |
| --- | --- |
| --decode device: a JPEG whose body is damaged (markers intact) | dropped from its batch with its label and mask, counted, warned with its path |
| the memory-mapped probe cache on a disk too small | stop before building: the folder and the bytes needed |
| a link at class level back into the tree (train/loop -> .) | not followed: a warning names it (no class of every image again) |
| an empty train class folder | not a class (warning); val images of it: error naming the class |
| unreadable val images | never replaced by the next file: left out of every count; the log says how many were scored |
| fewer val images than processes, kNN on the cache | a table, the empty rank holding nothing |
| the skip count | files, not events: each bad file once over workers and epochs; saved and restored with a run |
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import abmilp_probe as ap
import data
import lut
import online_probe
import probe_cache
import run
import semanticmim
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def jpeg(path, seed=0, size=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def damaged(path):
    """A JPEG with every marker in place but a second SOI inside its scan: PIL and libjpeg (nvJPEG too) refuse it."""
    jpeg(path, seed=99)
    raw = bytearray(open(path, "rb").read())
    mid = (raw.find(b"\xff\xda") + len(raw)) // 2
    raw[mid:mid + 2] = b"\xff\xd8"
    open(path, "wb").write(bytes(raw))


def classes(root, split, names, n=2, bad=0):
    for c in names:
        for i in range(n):
            jpeg(os.path.join(root, split, c, f"{i}.JPEG"), seed=i + 7 * len(c))
        for i in range(bad):
            open(os.path.join(root, split, c, f"{i}x.JPEG"), "wb").write(b"not an image")


def views(j):
    """A Jpeg's one crop-and-flip draw (lut / semanticmim put theirs the same way); PIL images just pass."""
    if isinstance(j, data.Jpeg):
        j.views = [data.rrc_spec(j, 16, (0.5, 1.0))]
    return j


def test_device_decode_drops_a_damaged_jpeg_and_counts_it_once(tmp_path, capsys):
    for i in range(4):
        jpeg(tmp_path / "a" / f"{i}.JPEG", seed=i)
    damaged(tmp_path / "a" / "2x.JPEG")  # sorted: 0 1 2 2x 3
    with pytest.raises(OSError):
        data.read_image(str(tmp_path / "a" / "2x.JPEG"))
    base = data.ImageFiles(str(tmp_path))
    base.encoded = True
    ds = data.Seeded(base, views)
    for epoch in range(2):
        batch, y = data.collate([ds[(epoch, i)] for i in range(5)])
        assert data.Jpeg.read(str(tmp_path / "a" / "2x.JPEG")).size == (32, 32)  # the worker cannot tell
        out, keep = data.decode_views(batch, CPU, ds)
        assert keep.tolist() == [0, 1, 2, 4] and out[0].shape == (4, 3, 16, 16) and y[keep].tolist() == [0] * 4
    err = capsys.readouterr().err
    assert err.count("2x.JPEG") == 1 and run.skipped(ds) == {"skipped": 1}  # once a run, however often it comes
    base.encoded = False
    assert np.array_equal(ds[(0, 3)][0], ds[(0, 4)][0])  # the worker path: the next file stands in, the same file counted
    assert run.skipped(ds) == {"skipped": 1} and "2x.JPEG" not in capsys.readouterr().err


@pytest.mark.parametrize("script", [semanticmim, lut])
def test_device_decode_training_goes_on_past_a_damaged_jpeg(tmp_path, monkeypatch, script):
    for c in "ab":
        for i in range(4):
            jpeg(tmp_path / "d" / c / f"{i}.JPEG", seed=i + 10 * (c == "b"))
    damaged(tmp_path / "d" / "a" / "1x.JPEG")  # 9 images, batch 8: the shuffle decides if a step meets it; 3 do

    def folder(d, split, labelled=False, classes=None, encoded=False):
        ds = data.ImageFiles(str(tmp_path / "d"))
        ds.encoded = encoded
        return ds
    monkeypatch.setattr(data, "dataset", folder)
    out = tmp_path / "out"
    script.main(["--img-size", "32", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--epochs", "3",
                 "--warmup-epochs", "0", "--decode", "device", "--online-probe", "--out", str(out)])
    steps = [r for r in map(json.loads, open(out / "log.jsonl")) if "img_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[-1].get("skipped") == 1


def test_memory_mapped_cache_checks_the_disk_first(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, ds = ap.Probe(vit.vit("vit_demo", 32), 6, "avg"), data.DemoShapes("val", 10)
    args = ap.parse_args(["--img-size", "32", "--workers", "0", "--cache-gib", "0", "--out", str(tmp_path / "o")])
    val_tf = ap.transforms(32)[1]
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 17 * 128 * 2 - 1))
    with pytest.raises(SystemExit, match=f"{tmp_path / 'o'}.* 43,520 bytes"):  # 10 images x 17 tokens x 128 bf16
        probe_cache.cached(args, model, ds, val_tf, "val", {"condensed": False}, CPU)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 17 * 128 * 2))
    assert probe_cache.cached(args, model, ds, val_tf, "val", {"condensed": False}, CPU)[0].shape == (10, 17, 128)


def test_a_link_back_into_the_tree_is_not_a_class(tmp_path, capsys):
    classes(tmp_path, "train", ["a", "b"])
    classes(tmp_path, "elsewhere", ["c"])
    os.symlink(".", tmp_path / "train" / "loop")  # every image again, as a class
    os.symlink("..", tmp_path / "train" / "up")
    os.symlink("a", tmp_path / "train" / "same")
    os.symlink(tmp_path / "elsewhere" / "c", tmp_path / "train" / "c")  # a farm of links to class folders: fine
    os.symlink(tmp_path / "elsewhere" / "c", tmp_path / "train" / "c2")  # the same folder again: not
    ds = data.ImageFiles(str(tmp_path / "train"), labelled=True)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 6 and len({os.path.realpath(p) for p, _ in ds.samples}) == 6
    err = capsys.readouterr().err
    assert all(f"{os.sep}{name} " in err for name in ("loop", "up", "same", "c2")) and "not followed" in err


def test_an_empty_train_class_is_not_a_class(tmp_path, capsys):
    classes(tmp_path, "train", ["a", "c"])
    os.makedirs(tmp_path / "train" / "b")
    classes(tmp_path, "val", ["a", "c"])
    os.makedirs(tmp_path / "val" / "b")  # empty in both: harmless
    train = data.dataset(str(tmp_path), "train", labelled=True)
    assert train.classes == ["a", "c"] and "'b'" in capsys.readouterr().err
    assert data.dataset(str(tmp_path), "val", labelled=True, classes=train.classes).classes == ["a", "c"]
    classes(tmp_path, "val", ["b"])  # val images of a class no head unit learns: stop, naming it
    with pytest.raises(ValueError, match=r"\['b'\]"):
        data.dataset(str(tmp_path), "val", labelled=True, classes=train.classes)


def test_unreadable_val_images_are_never_replaced(tmp_path, capsys):
    classes(tmp_path, "train", ["a", "b"], n=4)
    classes(tmp_path, "val", ["a", "b"], n=6, bad=1)  # 14 files, 12 images
    train = data.dataset(str(tmp_path), "train", labelled=True)
    val = data.dataset(str(tmp_path), "val", labelled=True, classes=train.classes)
    assert len(val) == 14 and [val[i][1] for i in range(14)].count(-1) == 2  # placeholders, labelled -1
    torch.manual_seed(0)
    probe = ap.Probe(vit.vit("vit_demo", 32), 2, "avg")
    dl = data.loader(data.Seeded(val, ap.transforms(32)[1]), 4, train=False, workers=0)
    data.set_epoch(dl, 0)
    assert run.evaluate(probe, dl, CPU)[2] == 12
    args = ap.parse_args(["--img-size", "32", "--workers", "0", "--out", str(tmp_path / "c")])
    shard = probe_cache.cached(args, probe, val, ap.transforms(32)[1], "val", {"condensed": True}, CPU)
    assert run.evaluate(probe, probe_cache.shard_batches(*shard, 4), CPU, n=14)[2] == 12
    common = ["--data", str(tmp_path), "--model", "vit_demo", "--img-size", "32", "--workers", "0", "--batch-size", "8",
              "--epochs", "1", "--warmup-epochs", "0"]
    for pool, cache in (("knn", "--no-cache-features"), ("knn", "--cache-features"), ("avg", "--cache-features")):
        out = tmp_path / f"{pool}{cache}"
        ap.main(common + ["--pool", pool, cache, "--out", str(out)])
        rows = [r for r in map(json.loads, open(out / "log.jsonl")) if "top1" in r]
        assert rows and all(r["images"] == 12 and r["top1"] * 12 / 100 == pytest.approx(round(r["top1"] * 12 / 100))
                            for r in rows), rows
    ap.main(common + ["--attention-stats", "--out", str(tmp_path / "stats")])
    assert json.load(open(tmp_path / "stats" / "attention_stats.json"))["images"] == 12
    args = argparse.Namespace(data=str(tmp_path), online_probe=None, img_size=32, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    held = online_probe.online_probe(args, probe.encoder, train, CPU)[1]  # pretraining's held-out val batch
    assert len(held[1]) == 12 and held[1].min() == 0
    assert run.skipped(val) == {"skipped": 2}


def test_two_processes_knn_with_fewer_val_images_and_their_skips_shared(tmp_path):
    classes(tmp_path, "imgs", ["a"], n=3)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29651",
                        os.path.join(ROOT, "tests", "dist_faults.py"), str(tmp_path), str(tmp_path / "imgs")], cwd=ROOT,
                       capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "knn_cls" in r.stdout and "knn_avg" in r.stdout  # the table
    rows = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "top1" in r]
    assert [r["pool"] for r in rows] == ["knn_cls", "knn_avg"] and all(r["images"] == 1 for r in rows)
    for rank in range(2):  # rank r flagged file r: each holds both after share_skips
        assert json.load(open(tmp_path / f"skips{rank}.json")) == dict(state=[0, 1], skipped={"skipped": 2})


def test_skips_count_files_and_survive_a_resume(tmp_path, capsys):
    classes(tmp_path, "train", ["a"], n=6, bad=2)
    ds = data.Seeded(data.dataset(str(tmp_path), "train"), data.to_uint8())
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    for epoch in range(2):
        ds.epoch = epoch
        assert sum(len(x) for x, _ in dl) == 8
    assert run.skipped(ds) == {"skipped": 2}  # 2 files, not 4 events
    state = run.skip_state(ds)
    assert state == [i for i, (p, _) in enumerate(ds.base.samples) if p.endswith("x.JPEG")]
    buf = io.BytesIO()
    torch.save(dict(skips=state), buf)
    buf.seek(0)
    resumed = data.Seeded(data.dataset(str(tmp_path), "train"), data.to_uint8())
    run.restore_skips(resumed, torch.load(buf, weights_only=True)["skips"])
    assert run.skipped(resumed) == {"skipped": 2}
    capsys.readouterr()
    [resumed[i] for i in range(8)]
    assert run.skipped(resumed) == {"skipped": 2} and "x.JPEG" not in capsys.readouterr().err  # said before the resume
    assert run.skip_state(data.DemoShapes("train", 8)) == [] and run.skipped(data.DemoShapes("train", 8)) == {}
    with pytest.raises(ValueError, match="8 images"):
        run.restore_skips(resumed, [8])
