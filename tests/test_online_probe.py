"""online_probe.py: the online linear probe never changes pretraining (gradients, weights, losses, RNG), learns,
resumes exactly, and costs nothing (is not built) for unlabelled folders."""
import argparse
import json

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import kamim
import lut
import online_probe
import semanticmim
import vit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_encoder_gradients_identical_and_probe_learns():
    torch.manual_seed(0)
    enc = vit.vit("vit_demo", img_size=32, drop_path=0.5).train()  # drop path: a train-mode forward would draw RNG
    img, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    def grads(probe):
        enc.zero_grad()
        torch.manual_seed(1)
        loss = enc(img).square().mean()  # stands in for the method's loss
        if probe:
            probe.step(enc, img, y)  # between forward and backward: the worst place
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in enc.parameters()], torch.get_rng_state()
    (l0, g0, r0), probe = grads(None), online_probe.OnlineProbe(enc, 4)
    w0 = [p.detach().clone() for p in probe.head.parameters()]
    l1, g1, r1 = grads(probe)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1)) and torch.equal(r0, r1)
    assert enc.training and all(not torch.equal(a, b) for a, b in zip(w0, probe.head.parameters()))
    assert probe.head[0].affine is False and probe.head[1].in_features == enc.dim
    for _ in range(30):  # 16 fixed images, 4 classes: the linear head fits them
        probe.step(enc, img, y)
    probe.top1()
    probe.step(enc, img, y)
    assert probe.top1() == 100.0 and probe.top1() == 0.0  # the count resets at each call


SCRIPTS = [(kamim, ["--batch-size", "8", "--img-size", "32", "--mask-patch", "8", "--wps", "4"]),
           (lut, ["--batch-size", "8", "--img-size", "32", "--head-hidden", "64"]),
           (semanticmim, ["--batch-size", "8", "--img-size", "32", "--drop-path", "0.1"])]


@pytest.mark.parametrize("script,flags", SCRIPTS, ids=["kamim", "lut", "semanticmim"])
def test_pretraining_unchanged_by_the_probe(tmp_path, script, flags):
    common = flags + ["--workers", "0", "--log-every", "1", "--max-steps", "3", "--epochs", "1", "--warmup-epochs", "0"]
    on, off = (script.main(common + ["--out", str(tmp_path / f), f"--{f}"]) for f in ("online-probe", "no-online-probe"))
    assert all(torch.equal(a, b) for a, b in zip(on.state_dict().values(), off.state_dict().values()))
    logs = [[r for r in map(json.loads, open(tmp_path / f / "log.jsonl")) if "step" in r] for f in ("online-probe", "no-online-probe")]
    assert [{k: v for k, v in r.items() if "loss" in k or k in ("mim", "l1")} for r in logs[0]] == \
           [{k: v for k, v in r.items() if "loss" in k or k in ("mim", "l1")} for r in logs[1]]
    assert all("probe_top1" in r for r in logs[0]) and not any("probe_top1" in r for r in logs[1])
    ck = torch.load(tmp_path / "online-probe" / "checkpoint.pt", weights_only=True)
    assert ck["probe"]["head"]["1.weight"].shape == (6, on.encoder.dim) and ck["probe"]["opt"]["state"]
    assert torch.load(tmp_path / "no-online-probe" / "checkpoint.pt", weights_only=True)["probe"] is None


@pytest.mark.parametrize("script,flags", SCRIPTS + [(lut, SCRIPTS[1][1] + ["--alpha", "0"])],
                         ids=["kamim", "lut", "semanticmim", "mae"])
def test_logged_flops_count_the_whole_step(tmp_path, script, flags):
    # issue 26.1: the logged TFLOP/s / img/s is every FLOP one loop step does (method, LUT's
    # teacher, the probe's forward and head), per image, as torch's FLOP counter sees the real step
    flags = flags + ["--workers", "0", "--log-every", "1", "--max-steps", "1", "--epochs", "1",
                     "--warmup-epochs", "0", "--out", str(tmp_path), "--online-probe-share", "1"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        script.main(flags)
    r = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "step" in r][0]
    # the analytic count takes the patchify conv's backward as 2x its forward (no input gradient:
    # 1x): about 1 % over
    assert r["tflops"] * 1e12 / r["img_s"] == pytest.approx(fc.get_total_flops() / 8, rel=0.02)


def test_probe_share_of_the_micro_batch():
    enc = vit.vit("vit_demo", img_size=32)
    probe = online_probe.OnlineProbe(enc, 4, share=1 / 16)
    assert [probe.images(b) for b in (256, 8, 1)] == [16, 2, 1]  # at least 2 for BatchNorm
    assert probe.flops(256) == pytest.approx((vit.vit_forward_flops(enc) + 6 * enc.dim * 4) / 16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        probe.step(enc, torch.randn(32, 3, 32, 32), torch.arange(32) % 4)
    assert fc.get_total_flops() == pytest.approx(32 * probe.flops(32), rel=1e-3)  # 2 of 32 images
    args = argparse.Namespace(data=None, online_probe=None, online_probe_share=None, img_size=32,
                              mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    assert online_probe.online_probe(args, enc, data.DemoShapes(), "cpu")[0].share == 1  # demo
    args.data, args.online_probe_share = "/no/val/here", None  # --data: 1/16
    assert online_probe.online_probe(args, enc, data.DemoShapes(), "cpu")[0].share == 1 / 16


def test_probe_resumes_exactly_and_logs_held_out(tmp_path):
    flags = SCRIPTS[0][1] + ["--workers", "0", "--epochs", "1", "--warmup-epochs", "0"]
    kamim.main(flags + ["--out", str(tmp_path / "a"), "--max-steps", "4"])
    kamim.main(flags + ["--out", str(tmp_path / "b"), "--max-steps", "2"])
    kamim.main(flags + ["--out", str(tmp_path / "b"), "--max-steps", "2"])  # auto-resumes at step 2
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["probe"] for d in "ab")
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert torch.equal(a["opt"]["state"][0]["exp_avg"], b["opt"]["state"][0]["exp_avg"])
    kamim.main(flags + ["--out", str(tmp_path / "c"), "--max-steps", "1", "--batch-size", "1536"])  # a whole epoch
    held = [r for r in map(json.loads, open(tmp_path / "c" / "log.jsonl")) if "probe_val_top1" in r]
    assert len(held) == 1 and 0 <= held[0]["probe_val_top1"] <= 100


def test_unlabelled_folder_builds_no_probe(tmp_path):
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 200, 0, 0)).save(tmp_path / f"{i}.png")
    enc, ds = vit.vit("vit_demo", img_size=32), data.ImageFiles(str(tmp_path))
    args = argparse.Namespace(data=str(tmp_path), online_probe=None, online_probe_share=None, img_size=(32, 32), mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    assert online_probe.online_probe(args, enc, ds, "cpu") == (None, None)  # default off: no head, no forward
    args.online_probe = True
    with pytest.raises(ValueError, match="needs labelled data"):
        online_probe.online_probe(args, enc, ds, "cpu")
    probe, held = online_probe.online_probe(argparse.Namespace(**{**vars(args), "data": None}), enc, data.DemoShapes(), "cpu")
    assert probe.head[1].out_features == 6 and held[0].shape == (256, 3, 32, 32) and held[1].bincount().min() > 25  # every class held out
