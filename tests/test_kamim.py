"""kamim.py: eqs. 1-3 on hand-computed examples, the released code's circles, the model on the real
shared ViT, the loop (loss falls, exact resume, accumulation, torchrun), and bad flags."""
import json
import math
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import data
import kamim
import vit


def test_eq2_weights_by_hand():
    omega = torch.tensor([[0.0, 0.25], [0.5, 1.0]])[None, None]  # (1, 1, 2, 2) keypoint densities
    W = kamim.kamim_weights(omega, 0.25)
    assert torch.allclose(W, torch.tensor([[1.0, math.e], [math.e ** 2, math.e ** 4]])[None, None])
    shifted = kamim.kamim_weights(omega + 0.3, 0.25)  # min W = 1 whatever the image's lowest density
    assert torch.allclose(shifted, W) and W.amin() == 1
    assert torch.allclose(kamim.kamim_weights(omega, 1e4), torch.ones_like(W), atol=1e-3)  # large T: SimMIM
    assert (kamim.kamim_weights(omega, 0.25, clip=20.0) == W).all()  # the released clamp does not bind at T 0.25
    assert torch.allclose(kamim.kamim_weights(omega, 0.01, clip=20.0).amax(), torch.tensor(math.e ** 20))  # binds at 0.01
    flat = torch.rand(1, 1, 24, 24)
    order = flat.flatten().argsort()
    assert (kamim.kamim_weights(flat, 0.25).flatten()[order].diff() >= 0).all()  # W grows with density
    assert kamim.kamim_weights(torch.ones(2, 1, 4, 4), 0.25).eq(1).all()  # any uniform density -> W = 1


def test_density_is_block_mean_and_circles_are_drawn_keypoints():
    F_map = (torch.rand(2, 1, 24, 24) < 0.2).float()
    ref = F_map.numpy().reshape(2, 1, 3, 8, 3, 8).mean(axis=(3, 5))
    assert np.allclose(kamim.keypoint_density(F_map, 8).numpy(), ref)
    # the released code draws circles with cv2.drawKeypoints: the ring stamp reproduces it for FAST
    crop = np.asarray(kamim.kamim_crop(96)(data.DemoShapes("train")[4][0]))  # checkers: many corners
    kps = cv2.FastFeatureDetector_create().detect(crop, None)
    drawn = cv2.drawKeypoints(np.zeros_like(crop), kps, None, color=(255, 255, 255)).max(-1) > 0
    points = torch.from_numpy(kamim.keypoint_map(crop))[None, None]
    assert len(kps) > 10 and np.array_equal(kamim.keypoint_circles(points)[0, 0].numpy() > 0, drawn)
    assert kamim.keypoint_circles(points).mean() > 3 * points.float().mean()  # circles: much denser F


def test_eq3_and_eq1_by_hand():
    pred, target = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)  # every error 1
    mask = torch.ones(1, 1, 4, 4)
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # 2 x 2 blocks of 2 x 2 pixels
    assert torch.isclose(kamim.kamim_loss(pred, target, mask, W), torch.tensor(2.5))  # mean W: not divided by sum W
    mask[..., :2, :] = 0  # only the bottom blocks (W 3, 4) masked
    assert torch.isclose(kamim.kamim_loss(pred, target, mask, W), torch.tensor(3.5))
    assert torch.isclose(kamim.simmim_loss(pred, target, mask), torch.tensor(1.0))
    p, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    m = (torch.rand(2, 1, 8, 8) < 0.5).float()
    assert torch.allclose(kamim.kamim_loss(p, t, m, torch.ones(2, 1, 2, 2)), kamim.simmim_loss(p, t, m))


def test_loss_ignores_unmasked_pixels():
    p, t, W = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 3, 8, 8), torch.rand(2, 1, 2, 2) + 1
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 4:] = 1
    loss = kamim.kamim_loss(p, t, m, W)
    loss.backward()
    assert (p.grad[:, :, :4] == 0).all() and (p.grad[:, :, 4:] != 0).all()  # gradient only at masked outputs
    p2 = p.detach().clone()
    p2[:, :, :4] = 100.0
    assert torch.equal(kamim.kamim_loss(p2, t, m, W), loss.detach())


def test_keypoints_on_a_square_weigh_its_corners():
    img = np.zeros((96, 96, 3), np.uint8)  # shaded square (as in test_data): unique FAST corners
    ys, xs = np.mgrid[34:58, 26:50]
    d = np.minimum(abs(ys - 34), abs(ys - 57)) + np.minimum(abs(xs - 26), abs(xs - 49))
    img[34:58, 26:50] = (255 - 3 * d)[..., None]
    model = kamim.KAMIM(vit.vit("vit_demo", img_size=96), wps=4, circles=False)
    W = model.weights(torch.from_numpy(kamim.keypoint_map(img, "fast"))[None])[0, 0]  # (24, 24)
    assert sorted(zip(*np.nonzero(W.numpy() > 1))) == [(8, 6), (8, 12), (14, 6), (14, 12)]  # the 4 corner blocks
    assert torch.isclose(W.max(), torch.tensor(math.exp(1 / 16 / 0.25)))  # one keypoint in a 4 x 4 block
    for det in ("orb", "sift"):
        W = model.weights(torch.from_numpy(kamim.keypoint_map(img, det))[None])[0, 0]
        hot = np.argwhere(W.numpy() > 1)
        assert len(hot) and (hot >= 6).all() and (hot <= 16).all()  # around the square, nothing elsewhere


def test_table1_parameter_counts():
    for name, ref in (("vit_t", 5.515), ("vit_s", 21.646), ("vit_b", 85.759)):
        with torch.device("meta"):
            model = kamim.KAMIM(vit.vit(name, img_size=192))
        enc = sum(p.numel() for p in model.encoder.parameters()) + model.mask_token.numel()
        enc += model.encoder.pos_embed.numel()  # Hugging Face learns its 145 x D positions; ours are fixed sin-cos
        assert abs(enc / 1e6 - ref) < 1e-3, (name, enc)


def test_model_on_the_shared_vit_trains(tmp_path):
    torch.manual_seed(0)
    model = kamim.KAMIM(vit.vit("vit_demo", img_size=96), wps=4)
    tf = pickle.loads(pickle.dumps(kamim.KamimTransform(96, 8, mask_patch=16)))  # spawn workers (macOS / Windows) pickle it
    samples = [tf(data.DemoShapes("train")[i][0]) for i in range(4)]
    batch = [torch.stack(x) for x in zip(*samples)]
    img, mask, points = batch
    assert img.shape == (4, 3, 96, 96) and mask.shape == (4, 12, 12) and points.shape == (4, 96, 96)
    assert img.dtype == torch.uint8  # the loader ships uint8; the step normalises on the device
    batch[0] = data.normalize_batch(img)
    assert (mask.sum((1, 2)) == 22 * 4).all() and points.dtype == torch.uint8  # 22 of 36 cells, 4 tokens each
    loss, terms = model(*batch)
    assert terms["loss"] > terms["l1"]  # W >= 1 and not normalised: KAMIM's loss exceeds SimMIM's
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    halves = [model(*[t[s] for t in batch])[0] for s in (slice(0, 2), slice(2, 4))]  # accumulation = one batch
    g_full = torch.autograd.grad(model(*batch)[0], model.mask_token)[0]
    g_acc = sum(torch.autograd.grad(h / 2, model.mask_token)[0] for h in halves)
    assert torch.allclose(g_full, g_acc, atol=1e-6)
    kamim.save_figure(model, batch, str(tmp_path / "fig.png"))
    assert Image.open(tmp_path / "fig.png").size[1] > 4 * 96  # 4 rows: input, masked, W, reconstruction


def test_simmim_transform_does_no_keypoint_work(monkeypatch):
    monkeypatch.setattr(kamim, "keypoint_map", lambda *a: 1 / 0)
    out = kamim.KamimTransform(96, 8, 16, detector="none")(data.DemoShapes("train")[0][0])
    assert len(out) == 2
    loss, terms = kamim.KAMIM(vit.vit("vit_demo", img_size=96), wps=4)(data.normalize_batch(out[0][None]), out[1][None])
    assert set(terms) == {"loss"}


def run(tmp_path, name, *extra):
    out = tmp_path / name
    kamim.main(["--out", str(out), "--batch-size", "4", "--workers", "0", "--log-every", "1", *extra])
    return out, [json.loads(l) for l in open(out / "log.jsonl")][1:]


def test_demo_loss_falls(tmp_path):
    # a few demo steps, then the loss on one fixed held-out batch (fixed masks) against the initial model's
    out, log = run(tmp_path, "fall", "--lr", "0.5", "--warmup-epochs", "0", "--max-steps", "10", "--batch-size", "16")
    ds = data.Seeded(data.DemoShapes("val", size=16), kamim.KamimTransform(96, 8, 16), seed=1)
    (img, mask, points), _ = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    def l1(state=None):
        torch.manual_seed(0)  # the run's seed: the same initial weights
        model = kamim.KAMIM(vit.vit("vit_demo", img_size=96), wps=4)
        if state is not None:
            model.load_state_dict(state)
        with torch.no_grad():
            return model(data.normalize_batch(img), mask, points)[1]["l1"].item()
    before, after = l1(), l1(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    assert after < 0.9 * before, (before, after)
    assert all(math.isfinite(r["loss"]) and r["loss"] >= r["l1"] for r in log)  # eq. 3 >= eq. 1 since W >= 1


def test_resume_is_exact(tmp_path):
    full, _ = run(tmp_path, "full", "--max-steps", "4")
    part, _ = run(tmp_path, "part", "--max-steps", "2")
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 2
    run(tmp_path, "part", "--max-steps", "2")  # auto-resumes from part/checkpoint.pt
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, part))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    vit.load_encoder(vit.vit("vit_demo", img_size=96), str(full / "checkpoint.pt"))  # what the probe loads


def test_torchrun_two_processes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29610", "kamim.py",
           "--out", str(tmp_path), "--batch-size", "8", "--workers", "0", "--max-steps", "2", "--log-every", "1"]
    subprocess.run(cmd, check=True, cwd=root, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("flags,message", [(["--wps", "7"], "does not divide"), (["--mask-patch", "20"], "must divide"),
                                           (["--temperature", "0"], "must be > 0"), (["--detector", "harris"], "invalid choice")])
def test_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        kamim.parse_args(flags)
    assert message in capsys.readouterr().err


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    monkeypatch.setattr(kamim, "kamim_loss", lambda pred, *a: pred.sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite"):
        run(tmp_path, "nan", "--max-steps", "2")
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


def test_torchrun_two_processes_equal_one(tmp_path):
    """2 processes x 4 images = 1 process x 8 (gloo, 2 steps): the ranks load disjoint images whose union is the
    single process's batch, the mean of the ranks' losses is its loss (equal mask counts per image) to 1e-5, and
    the weights after 2 steps agree to 5e-5 (each step moves them by up to lr = 0.1 x 8 / 2048 = 4e-4; measured
    difference 4e-6; gradients left un-averaged move rank 0 apart by ~lr)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script, env = os.path.join(root, "tests", "dist_kamim.py"), {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--model", "vit_demo", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--max-steps", "2",
            "--log-every", "1", "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.1"]  # steps of ~4e-4
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, script, str(one), *args], check=True, cwd=root, timeout=120, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29640", script,
                    str(two), *args], check=True, cwd=root, timeout=180, env=env)
    r1 = json.load(open(one / "rank0.json"))
    ra, rb = (json.load(open(two / f"rank{r}.json")) for r in (0, 1))
    assert len(r1["ids"]) == 24 and len(ra["ids"]) == len(rb["ids"]) == 12  # 2 steps + the batch prefetched for a third
    for s in range(2):  # per step: disjoint halves of the one-process batch
        a, b, o = (set(r["ids"][s * n:(s + 1) * n]) for r, n in ((ra, 4), (rb, 4), (r1, 8)))
        assert len(a) == len(b) == 4 and not a & b and a | b == o
    assert [(x + y) / 2 for x, y in zip(ra["losses"], rb["losses"])] == pytest.approx(r1["losses"], rel=1e-5)
    w1, w2 = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (one, two))
    assert w1["step"] == w2["step"] == 2
    for k in w1["model"]:
        assert torch.allclose(w1["model"][k].float(), w2["model"][k].float(), atol=5e-5, rtol=0), k


@pytest.mark.parametrize("img,cell,patch,ratio", [(192, 32, 16, 0.6), (224, 32, 16, 0.5), (96, 16, 8, 0.6), (192, 32, 32, 0.3)])
def test_simmim_mask_count(img, cell, patch, ratio):
    m = kamim.simmim_mask(img, cell, patch, ratio)
    g, k = img // cell, cell // patch
    assert m.shape == (img // patch, img // patch)
    assert m.sum() == math.ceil(ratio * g * g) * k * k  # count rounded up: 22 of 36 cells at the defaults
    cells = m[::k, ::k]
    assert torch.equal(cells.repeat_interleave(k, 0).repeat_interleave(k, 1), m)  # whole cells only
    with pytest.raises(ValueError, match="must divide"):
        kamim.simmim_mask(200, 32, 16)


def test_simmim_mask_non_square():
    m = kamim.simmim_mask((64, 96), 32, 16, 0.6)  # 2 x 3 cells, ceil(0.6 * 6) = 4 masked, each 2 x 2 tokens
    assert m.shape == (4, 6) and m.sum() == 4 * 4
    with pytest.raises(ValueError, match="must divide"):
        kamim.simmim_mask((64, 80), 32, 16)


def test_simmim_mask_differs_per_call():
    torch.manual_seed(0)
    assert not torch.equal(kamim.simmim_mask(), kamim.simmim_mask())


def test_fast_finds_the_corners_of_a_square():
    # a bright square, brightest at its corners: FAST's non-max suppression drops tied scores, so the
    # square is shaded to give each corner pixel the unique best score
    img = np.zeros((128, 128, 3), np.uint8)
    ys, xs = np.mgrid[50:74, 40:64]
    d = np.minimum(abs(ys - 50), abs(ys - 73)) + np.minimum(abs(xs - 40), abs(xs - 63))
    img[50:74, 40:64] = (255 - 3 * d)[..., None]
    F = kamim.keypoint_map(img, "fast")
    assert F.dtype == np.uint8 and set(np.unique(F)) == {0, 1}
    ys, xs = np.nonzero(F)
    assert sorted(zip(ys.tolist(), xs.tolist())) == [(50, 40), (50, 63), (73, 40), (73, 63)]
    for det in ("orb", "sift"):  # scale-space detectors: keypoints near the square's outline
        ys, xs = np.nonzero(kamim.keypoint_map(img, det))
        assert len(ys) > 0 and (ys >= 40).all() and (ys <= 83).all() and (xs >= 30).all() and (xs <= 73).all()
    assert kamim.keypoint_map(np.full((32, 32, 3), 128, np.uint8)).sum() == 0  # flat image: none
