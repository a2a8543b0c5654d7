"""lut.py: eq. 1-3 on hand-made examples, the EMA teacher, MAE as alpha 0, training, resume, torchrun."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import data
import lut
import vit


def small(alpha=0.25, **kw):
    torch.manual_seed(0)
    return lut.LUT(vit.vit("vit_demo", img_size=32), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                   alpha=alpha, head_hidden=64, **kw)


def test_mae_loss_hand_example():
    pred = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [5.0, -5.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # 1 = removed: patches 1 and 2 count
    # patch 1: ((1-0)^2 + (1-2)^2) / 2 = 1; patch 2: (25 + 25) / 2 = 25; mean over masked patches = 13
    assert lut.mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(13.0)
    pred2 = pred.clone()
    pred2[0, 0] = 100.0  # a visible patch changes nothing
    assert lut.mae_loss(pred2, target, mask, norm_pix=False) == lut.mae_loss(pred, target, mask, norm_pix=False)
    # norm-pix: the target patch [0, 2] becomes (x - 1) / sqrt(2 + 1e-6) (unbiased variance, as MAE)
    t = torch.tensor([[[0.0, 2.0]]])
    n = 2 ** -0.5 / (1 + 5e-7) ** 0.5
    assert lut.mae_loss(torch.tensor([[[-n, n]]]), t, torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-10)


def test_patchify_roundtrip_and_restore_order():
    img = torch.randn(2, 3, 16, 24)
    x = lut.patchify(img, 8)
    assert x.shape == (2, 6, 192) and torch.equal(x[0, 1], img[0, :, :8, 8:16].permute(1, 2, 0).reshape(-1))
    assert torch.equal(lut.unpatchify(x, 8, (2, 3)), img)
    N, ratio = 196, 0.75
    ids_keep, ids_restore, mask = lut.random_masking(3, N, ratio)
    assert ids_keep.shape == (3, 49) and (mask.sum(1) == 147).all()  # floor(rN) masked in every sample
    kept = ids_keep[..., None].float()  # each kept token carries its own patch index
    out = lut.restore_order(kept, torch.full((1, 1, 1), -1.0), ids_restore)[..., 0]
    pos = torch.arange(N).expand(3, -1).float()
    assert torch.equal(out, torch.where(mask.bool(), -1.0, pos))  # kept back in place, mask token elsewhere


def test_broader_context_loss():
    u, v = torch.randn(5, 16), torch.randn(5, 16)
    ub, vb = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    l = lut.broader_context_loss(u, v)
    assert l.item() == pytest.approx((ub - vb).pow(2).sum(1).mean().item(), rel=1e-5)
    assert l.item() == pytest.approx((2 - 2 * torch.cosine_similarity(u, v)).mean().item(), rel=1e-5)
    assert lut.broader_context_loss(u, 3 * u).item() == pytest.approx(0.0, abs=1e-6)  # scale-free, 0 when equal


def test_paper_counts():
    m = lut.LUT(vit.vit("vit_b"), head_hidden=4096)
    tokens = m.forward_encoder(torch.zeros(1, 3, 224, 224), lut.random_masking(1, 196, 0.75)[0])
    assert tokens.shape == (1, 1 + 49, 768)  # [cls] + 49 of 196 patches
    assert [type(l).__name__ for l in m.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.projector[0].weight.shape == (4096, 768) and m.projector[0].bias is None and m.predictor[3].bias is None
    assert len(m.decoder_blocks) == 8 and m.decoder_embed.out_features == 512
    assert not hasattr(m.teacher, "predictor")  # only the student has the predictor
    # the digest's cost figures at ViT-B: LUT 1.6x MAE's training FLOPs, the released two-view variant 2.65x
    mae = lut.train_flops(lut.LUT(vit.vit("vit_b"), alpha=0))
    assert lut.train_flops(m) / mae == pytest.approx(1.60, abs=0.01)
    m.two_view = True
    assert lut.train_flops(m) / mae == pytest.approx(2.65, abs=0.01)


def test_alpha0_is_mae_and_builds_no_teacher():
    mae, l = small(alpha=0), small(alpha=0.25)
    assert not any(hasattr(mae, k) for k in ("teacher", "projector", "predictor"))
    l.load_state_dict(mae.state_dict(), strict=False)
    img, ctx = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    loss_mae, _ = mae(img)
    torch.manual_seed(1)
    loss_lut, terms = l(img, ctx)
    assert torch.equal(loss_mae, terms["mim"]) and loss_lut.item() == pytest.approx((terms["mim"] + 0.25 * terms["bc"]).item())


@pytest.mark.parametrize("two_view", [False, True])
def test_gradients_teacher_input_and_ema(two_view):
    m = small(two_view=two_view).train()
    assert not m.teacher.training and m.projector.training  # teacher stays in eval mode
    seen = []
    m.teacher.encoder.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out.shape)))
    img, ctx = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = m(img, ctx)
    loss.backward()
    assert torch.equal(seen[0][0], ctx) and seen[0][1] == (4, 1 + 16, 128)  # the whole, unmasked context view
    if two_view:
        assert torch.equal(seen[1][0], img)
    assert all(p.grad is None for p in m.teacher.parameters())  # no gradient into the EMA side
    for name, p in m.named_parameters():
        if not name.startswith("teacher."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    old = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    m.update_teacher(0.9)
    student = dict(**{"encoder." + k: v for k, v in m.encoder.state_dict().items()},
                   **{"projector." + k: v for k, v in m.projector.state_dict().items()})
    for k, v in m.teacher.state_dict().items():
        expect = 0.9 * old[k] + 0.1 * student[k] if v.is_floating_point() and "pos_embed" not in k else student[k]
        assert torch.allclose(v, expect, rtol=1e-6, atol=1e-7), k
    assert not torch.equal(old["projector.1.running_mean"], m.teacher.state_dict()["projector.1.running_mean"])


def test_ema_momentum_schedule_and_paper_defaults():
    assert lut.ema_momentum(500, 1000, cosine=False) == 0.996
    assert lut.ema_momentum(0, 1000) == pytest.approx(0.996) and lut.ema_momentum(1000, 1000) == pytest.approx(1.0)
    assert lut.ema_momentum(500, 1000) == pytest.approx(0.998)  # 1 - 0.004 (1 + cos(pi / 2)) / 2
    b, s = lut.parse_args(["--data", "/x"]), lut.parse_args(["--data", "/x", "--model", "vit_s"])
    assert (b.ema_schedule, b.alpha, s.alpha, lut.parse_args(["--model", "vit_s", "--alpha", "0"]).alpha) == ("cosine", 0.25, 1.0, 0)


def test_lr_rules():
    assert lut.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3) == lut.scaled_lr(1.5e-4, 4096, "sqrt")
    assert lut.scaled_lr(1.5e-4, 256, "sqrt") == pytest.approx(4 * lut.scaled_lr(1.5e-4, 256))


def test_layer_decay_groups():
    m = small()
    groups = vit.param_groups(m, 0.05, decay_tokens=True, layer_decay=0.5)  # §5.1: all but biases and 1-D decay (MAE)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(m.encoder.patch_embed.proj.weight)] == 0.5 ** 5  # depth 4: layer 0
    assert scale[id(m.encoder.blocks[3].mlp.fc1.weight)] == 0.5 and scale[id(m.decoder_pred.weight)] == 1.0
    assert len(scale) == sum(p.requires_grad for p in m.parameters())
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}  # §5.1: all but biases and 1-D decay
    assert wd[id(m.encoder.cls_token)] == wd[id(m.mask_token)] == 0.05 and wd[id(m.encoder.norm.weight)] == 0


@pytest.mark.parametrize("argv", [["--mask-ratio", "1"], ["--mask-ratio", "0"], ["--alpha", "-0.1"],
                                  ["--ema-momentum", "1.5"], ["--two-view", "--mask-ratio", "0.4"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        lut.parse_args(argv)


def run(out, *extra):
    return lut.main(["--out", str(out), "--img-size", "32", "--batch-size", "8", "--head-hidden", "64", "--workers", "0",
                     "--epochs", "2", "--warmup-epochs", "0", "--log-every", "3", *extra])


def test_step_augments_the_context_view_only(tmp_path, monkeypatch):
    # Table 4f / the digest: the reconstruction view is SRC alone, the context view SRC + colour jitter + three-augment,
    # now applied on the device: the model must get view 0 as the worker's uint8 (whole numbers once un-normalised)
    seen, forward = [], lut.LUT.forward
    monkeypatch.setattr(lut.LUT, "forward", lambda self, img, context=None: seen.append((img, context)) or forward(self, img, context))
    run(tmp_path, "--max-steps", "2")
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    off = lambda x: ((x * std + mean) * 255 - ((x * std + mean) * 255).round()).abs()  # distance to whole numbers
    assert len(seen) == 2 and all(off(img).max() < 2e-3 for img, _ in seen)
    assert all(off(ctx).amax((1, 2, 3)).gt(0.01).float().mean() > 0.5 for _, ctx in seen)  # jittered: fractions


def test_demo_trains_and_resumes_exactly(tmp_path):
    run(tmp_path / "a", "--max-steps", "6", "--lr", "3e-3", "--layer-decay", "1")
    run(tmp_path / "b", "--max-steps", "3", "--lr", "3e-3", "--layer-decay", "1")
    run(tmp_path / "b", "--max-steps", "3", "--lr", "3e-3", "--layer-decay", "1")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert any(k.startswith("teacher.") for k in a["model"])
    vit.load_encoder(vit.vit("vit_demo", img_size=32), str(tmp_path / "a" / "checkpoint.pt"))  # what the probe loads
    logs = [json.loads(l) for l in open(tmp_path / "a" / "log.jsonl")][1:]
    assert logs[-1]["mim"] < logs[0]["mim"]


def test_figure(tmp_path):
    m = small()
    lut.save_figure(m, torch.randn(3, 3, 32, 32), tmp_path / "f.png")
    assert os.path.getsize(tmp_path / "f.png") > 0


def test_torchrun_two_processes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29620", "lut.py",
           "--out", str(tmp_path), "--img-size", "32", "--batch-size", "8", "--head-hidden", "64", "--workers", "0",
           "--max-steps", "2", "--log-every", "1"]
    subprocess.run(cmd, check=True, cwd=root, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_nonfinite_loss_stops_without_saving(tmp_path, monkeypatch):
    run(tmp_path, "--max-steps", "2")
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    monkeypatch.setattr(lut, "mae_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="non-finite"):
        run(tmp_path, "--max-steps", "2")
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert after["step"] == 2 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_device_decode_gives_the_worker_crops(tmp_path):
    # --decode device: the workers ship bytes and the crops' draws; decode_views (CPU here, nvJPEG on a GPU) must give
    # the worker path's views: exactly where no resize is involved, to resampling error where one is
    rng, d = np.random.default_rng(0), tmp_path / "imgs"
    d.mkdir()
    smooth = lambda h, w: Image.fromarray(cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 2))
    smooth(32, 44).save(d / "a.JPEG", quality=90)  # shorter side = the crop: SRC does not resize
    smooth(44, 32).convert("L").save(d / "b.JPEG")  # grey
    smooth(40, 56).save(d / "c.JPEG", format="PNG")  # a PNG under a .JPEG name: re-encoded in the worker
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: decode_jpeg applies EXIF on the CPU only, so re-encoded upright
    smooth(40, 64).save(d / "d.JPEG", exif=exif)
    (d / "e.JPEG").write_bytes((d / "a.JPEG").read_bytes()[:600])  # truncated: skipped, the next file stands in
    worker, device = data.ImageFiles(str(d)), data.ImageFiles(str(d))
    device.encoded = True
    for crop, exact in (("src", 2), ("rrc", 0)):
        a, b = data.Seeded(worker, lut.Views(32, crop)), data.Seeded(device, lut.Views(32, crop))
        for epoch in range(3):
            views, _ = data.decode_views(data.collate([b[(epoch, i)] for i in range(5)])[0], torch.device("cpu"))
            for v in range(2):
                ref = torch.stack([a[(epoch, i)][0][v] for i in range(5)])
                assert views[v].shape == ref.shape == (5, 3, 32, 32)
                assert torch.equal(views[v][:exact], ref[:exact]), (crop, epoch, v)  # a and b: the same pixels
                assert (views[v].float() - ref.float()).abs().mean() < 2.5, (crop, epoch, v)  # bicubic, q95 re-encode
    assert worker.skipped >= 1 and device.skipped >= 1


@pytest.mark.parametrize("N,ratio", [(196, 0.75), (196, 0.6), (50, 0.33), (7, 0.5)])
def test_random_masking(N, ratio):
    ids_keep, ids_restore, mask = lut.random_masking(4, N, ratio)
    assert (mask.sum(1) == int(ratio * N)).all()  # floor(rN) masked in every sample
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))  # 0 = kept
    x = torch.arange(N).repeat(4, 1)
    kept = torch.gather(x, 1, ids_keep)
    rest = torch.cat([kept, -torch.ones(4, N - kept.shape[1], dtype=x.dtype)], 1)
    unshuffled = torch.gather(rest, 1, ids_restore)  # the restore indices undo the shuffle
    assert torch.equal(unshuffled[mask == 0], x[mask == 0]) and (unshuffled[mask == 1] == -1).all()


def test_src_crop_is_pad_then_crop():
    # the offset crop equals torchvision's RandomCrop(padding 4, reflect) + flip: same draws, same pixels, edges included
    ref = lambda size: T.Compose([T.RandomCrop(size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(), T.PILToTensor()])
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    for img, size in ((rgb, (36, 36)), (rgb, (40, 48)), (rgb.convert("L"), (32, 44))):
        for seed in range(40):  # 40 draws reach every edge of a 4-px margin
            torch.manual_seed(seed)
            a = lut.src_crop(img, size)
            torch.manual_seed(seed)
            assert torch.equal(a, ref(size)(img)), (img.mode, size, seed)
