"""Issue 13: every default against the paper / released-code table, and the wiring the defaults rely on."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import abmilp_probe
import data
import run
import kamim
import lut
import semanticmim
import vit

KAMIM_PAPER = dict(  # kamim.py --data X: the paper's run
    model="vit_b", img_size=(192, 192),  # §4.1
    batch_size=2048,  # released code (the paper gives none)
    lr=8e-4, warmup_lr=1e-6, min_lr=1e-5,  # §4.1 lr; warmup start / floor: released code, at batch 2048
    epochs=100, warmup_epochs=10, weight_decay=0.05, clip_grad=1.0,  # §4.1; clip: released code
    detector="fast", wps=8, temperature=0.25,  # §3.2, Table 2
    keypoints="circles", mask_patch=32, mask_ratio=0.6,  # released cv2.drawKeypoints; §4.1
    decay_exclusions=False, antialias=False, pos="learned", lr_curve="timm",  # released code (issue 13, items 2-5)
    clip_logits=False)
LUT_PAPER = dict(
    model="vit_b", img_size=(224, 224), batch_size=4096, lr=1.5e-4, lr_scaling="linear",  # §5.1 (MAE's protocol)
    epochs=1600, warmup_epochs=40, weight_decay=0.05, clip_grad=0.0,  # §5.1; no clipping (MAE, released code)
    betas=[0.9, 0.95], layer_decay=1.0,  # MAE pretraining / released code (§5.1 contradicts itself: digest 2026-12)
    mask_ratio=0.75, norm_pix_loss=True,  # §5.1, released models
    decoder_dim=512, decoder_depth=8, decoder_heads=16,  # MAE decoder, §5.1
    alpha=0.25, ema_momentum=0.996, ema_schedule="cosine", head_hidden=4096,  # Table B (ViT-B), §5.1
    two_view=False, crop="src")  # the paper's single extra view; Table 4f
SEMANTICMIM_PAPER = dict(
    model="vit_b", img_size=(224, 224), batch_size=2048, lr=1.6e-3, min_lr=1e-6, epochs=300, warmup_epochs=30,  # §4.1, Table 2
    weight_decay=0.05, clip_grad=0.02, drop_path=0.0, crop_min=0.5,  # Table 2 (MaskFeat column)
    proxies=8, mask_ratio=0.6, target="hog", loss="mse",  # §4.1, Fig. 5; MaskFeat's loss
    hog_bins=9, hog_cell=8, hog_window=0)  # MaskFeat / SlowFast default
PROBES = dict(  # abmilp_probe.PROTOCOLS
    mae=dict(pool="abmilp", block=None, head_norm="bn", optimizer="lars", lr=0.1, ref_batch=256, batch_size=16384,
             epochs=90, warmup_epochs=10, weight_decay=0.0, img_size=224),  # Beyond [cls] §5 (MAE's probe)
    kamim=dict(pool="avg", block=8, head_norm="none", optimizer="adamw", lr=5e-3, ref_batch=2048, batch_size=2048,
               epochs=100, warmup_epochs=10, weight_decay=0.05, img_size=192, mix=True,  # KAMIM App. A
               clip_grad=1.0, lr_curve="timm", warmup_lr=2.5e-6, min_lr=2.5e-6),  # its code (issue 27 item 6)
    semanticmim=dict(pool="cls", block=7, head_norm="ln", optimizer="adamw", lr=4e-3, ref_batch=1024, batch_size=1024,
                     epochs=100, warmup_epochs=0, weight_decay=1e-4, img_size=224),  # SemanticMIM §4.1 (BEiT's); ln: code
    semanticmim_code=dict(pool="avg", block=None, head_norm="ln", optimizer="adamw", lr=4e-3, ref_batch=1024,
                          batch_size=1024, epochs=100, warmup_epochs=0, weight_decay=1e-4, img_size=224))  # released


@pytest.mark.parametrize("mod,table", [(kamim, KAMIM_PAPER), (lut, LUT_PAPER), (semanticmim, SEMANTICMIM_PAPER)])
def test_paper_defaults(mod, table):
    args = vars(mod.parse_args(["--data", "/nonexistent"]))
    assert {k: args[k] for k in table} == table


@pytest.mark.parametrize("mod,keys", [(kamim, ["detector", "temperature", "keypoints", "mask_ratio", "antialias",
                                               "pos", "decay_exclusions", "lr_curve", "weight_decay", "clip_grad"]),
                                      (lut, ["mask_ratio", "norm_pix_loss", "betas", "layer_decay", "ema_momentum",
                                             "ema_schedule", "lr_scaling", "weight_decay", "clip_grad"]),
                                      (semanticmim, ["proxies", "mask_ratio", "target", "loss", "hog_bins", "hog_window",
                                                     "weight_decay", "clip_grad", "crop_min"])])
def test_demo_keeps_the_paper_values(mod, keys):
    args = vars(mod.parse_args([]))
    ref = {kamim: KAMIM_PAPER, lut: LUT_PAPER, semanticmim: SEMANTICMIM_PAPER}[mod]
    assert {k: args[k] for k in keys} == {k: ref[k] for k in keys}


def test_probe_presets():
    assert abmilp_probe.PROTOCOLS == PROBES


def test_kamim_table1_trainable_params():
    # Table 1 (192 px, encoder only): 5.515 / 21.646 / 85.759 M, with the learned position table trainable
    for name, ref in (("vit_t", 5.515), ("vit_s", 21.646), ("vit_b", 85.759)):
        enc = vit.vit(name, img_size=192, learned_pos=True)
        n = sum(p.numel() for p in enc.parameters() if p.requires_grad) / 1e6
        assert abs(n - ref) < 0.1, (name, n)
        assert enc.pos_embed.requires_grad
    enc = vit.vit("vit_t", img_size=192)  # fixed sin-cos: 145 x 192 fewer trainable (MAE / LUT)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) < 5.515e6 - 145 * 192 + 10


def test_learned_table_loads_deit_checkpoint_and_stays_trainable():
    src = vit.vit("vit_demo", learned_pos=True)
    with torch.no_grad():
        src.pos_embed.normal_()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    dst = vit.vit("vit_demo", learned_pos=True)
    vit.load_encoder(dst, sd)
    assert isinstance(dst.pos_embed, torch.nn.Parameter) and dst.pos_embed.requires_grad
    assert torch.equal(dst.pos_embed.detach(), sd["pos_embed"])
    assert any(p is dst.pos_embed for p in dst.parameters())  # an optimiser built after loading trains it


def test_kamim_crop_is_the_released_one():
    tf = kamim.kamim_crop(192).transforms[0].transforms  # PILToTensor, RRC, vflip, hflip (torchvision v2, uint8)
    rrc = tf[1]
    assert type(rrc).__module__.startswith("torchvision.transforms.v2") and rrc.antialias is False
    assert rrc.scale == (0.67, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3)) and list(rrc.size) == [192, 192]
    assert [type(t).__name__ for t in tf[2:]] == ["RandomVerticalFlip", "RandomHorizontalFlip"]
    assert tf[2].p == tf[3].p == 0.5
    # no antialiasing: a 1-px checkerboard, shrunk, keeps aliased contrast (antialiasing greys it almost flat)
    board = Image.fromarray(((np.indices((384, 384)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    for seed in range(3):
        torch.manual_seed(seed)
        crop = kamim.kamim_crop(192)(board)
        torch.manual_seed(seed)
        smooth = kamim.kamim_crop(192, antialias=True)(board)
        assert crop.dtype == smooth.dtype == np.uint8 and crop.shape == smooth.shape == (192, 192, 3)
        edge = lambda x: np.abs(np.diff(x.astype(float), axis=1)).mean()
        assert edge(crop) > 1 and edge(crop) > 30 * edge(smooth)


def test_keypoints_are_fast_on_the_exact_crop_the_model_gets():
    tf = kamim.KamimTransform(96, 8, 16)
    for i in (4, 5, 11, 16):  # checkers and dots: the stripes have few corners
        torch.manual_seed(i)
        img, _, points = tf(data.DemoShapes("train")[i][0])
        ref = kamim.keypoint_map(img.permute(1, 2, 0).contiguous().numpy())  # FAST on the very pixels shipped
        assert ref.sum() > 5 and np.array_equal(points.numpy(), ref)


def test_timm_cosine_and_kamim_schedule_never_rise_after_warmup():
    total, warmup, peak, lo, start = 100, 10, 1.0, 0.01, 0.001
    assert run.timm_cosine(0, total, warmup, peak, lo, start) == start
    assert run.timm_cosine(5, total, warmup, peak, lo, start) == pytest.approx(start + (peak - start) / 2)
    # one cosine over ALL steps: at step 10 it is already below the peak, at step 50 exactly half-way
    assert run.timm_cosine(10, total, warmup, peak, lo, start) == pytest.approx(lo + (peak - lo) * (1 + math.cos(math.pi / 10)) / 2)
    assert run.timm_cosine(50, total, warmup, peak, lo, start) == pytest.approx((peak + lo) / 2)
    assert run.timm_cosine(100, total, warmup, peak, lo, start) == pytest.approx(lo)
    # issue 15 item 5: kamim scales --min-lr and --warmup-lr with the batch like --lr; at batch 16 the floor must
    # stay below the peak
    a = kamim.parse_args(["--batch-size", "16"])
    s = a.batch_size / kamim.REF_BATCH
    curve = [run.timm_cosine(t, 200, 20, a.lr * s, a.min_lr * s, a.warmup_lr * s) for t in range(201)]
    assert all(x >= y for x, y in zip(curve[20:], curve[21:])) and curve[-1] < curve[20]


def test_semanticmim_tokens_rejects_a_wrong_mask_count():
    m = semanticmim.SemanticMIM("vit_demo", 32, 8, 0.6).eval()  # 16 patches, n_mask masked
    img, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :m.n_mask] = True
    m.tokens(img, mask)  # the right count passes
    mask[1, m.n_mask] = True  # one extra masked patch in image 1
    with pytest.raises(RuntimeError, match="exactly 10 masked"):  # an async assert: no host sync
        m.tokens(img, mask)
    with pytest.raises(ValueError, match="must be"):
        m.tokens(img, mask[:, :15])


def test_lut_warns_about_batchnorm_under_accumulation(tmp_path, capsys):
    lut.train(lut.parse_args(["--batch-size", "8", "--micro-batch", "4", "--max-steps", "1", "--out", str(tmp_path),
                              "--workers", "0"]))
    assert "BatchNorm" in capsys.readouterr().out


def test_kamim_train_wiring(tmp_path):
    # one demo step: learned positions train, every parameter decays, and the logged lr is the batch-scaled warmup
    # start (issue 15 item 5: --warmup-lr / --min-lr scale with the batch like --lr)
    import json
    a = kamim.parse_args(["--batch-size", "16", "--max-steps", "1", "--log-every", "1", "--out", str(tmp_path),
                          "--workers", "0", "--epochs", "2", "--warmup-epochs", "1"])
    model = kamim.train(a)
    assert isinstance(model.encoder.pos_embed, torch.nn.Parameter) and model.encoder.pos_embed.requires_grad
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    lr = [r["lr"] for r in log if "lr" in r][-1]
    assert lr == pytest.approx(a.warmup_lr * 16 / kamim.REF_BATCH)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    groups = next(v for k, v in ck.items() if "opt" in k)["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.05}  # released code: no exclusions by default


def test_lut_every_group_lr_is_schedule_times_layer_scale(tmp_path):
    lut.train(lut.parse_args(["--batch-size", "8", "--micro-batch", "8", "--max-steps", "2", "--out", str(tmp_path),
                              "--workers", "0", "--layer-decay", "0.5"]))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    groups = next(v for k, v in ck.items() if "opt" in k)["param_groups"]
    scales = {g["lr_scale"] for g in groups}
    assert len(scales) > 3 and min(scales) < 0.5 ** 3  # the decay reaches the groups
    base = {g["lr"] / g["lr_scale"] for g in groups}
    assert max(base) == pytest.approx(min(base)) and max(base) > 0  # one schedule value x each group's scale


def test_eq2_min_is_per_image():
    omega = torch.stack([torch.full((1, 3, 3), 0.5), torch.zeros(1, 3, 3)])  # image 0's min is 0.5, image 1's 0
    omega[0, 0, 0, 0] = 0.75
    W = kamim.kamim_weights(omega, 0.25)
    assert torch.allclose(W.amin(dim=(1, 2, 3)), torch.ones(2))  # every image's own min is 1
    assert W[0, 0, 0, 0] == pytest.approx(math.exp(1.0))  # (0.75 - 0.5) / 0.25


def test_lut_pooled_vectors_exclude_cls():
    m = lut.LUT(vit.vit("vit_demo", img_size=32), decoder_dim=32, decoder_depth=1, decoder_heads=2, head_hidden=64).eval()
    tokens = torch.randn(2, 1 + 4, 128)
    changed = tokens.clone()
    changed[:, 0] += 100  # only [cls] differs
    assert torch.allclose(m.online(tokens), m.online(changed))
    def bump_cls(mod, inp, out):
        out[:, 0] += 100  # in place; returns None so the output itself is kept
    seen = m.teacher.encoder.register_forward_hook(bump_cls)
    view = torch.randn(2, 3, 32, 32)
    a = m.target(view)
    seen.remove()
    assert torch.allclose(a, m.target(view), atol=1e-5)


def test_lut_views_crop_one_resize_and_leave_colour_to_the_device():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    for seed in range(3):
        torch.manual_seed(seed)
        recon, ctx = lut.Views(32, "src", two=True)(img)
        torch.manual_seed(seed)
        r = lut.src_resize(img, 32)  # resized once; two SRC crops of it, in this order; no colour change in the worker
        assert torch.equal(recon, lut.src_crop(r, 32)) and torch.equal(ctx, lut.src_crop(r, 32))
    recon, ctx = lut.Views(32, "src", two=True, in_chans=1)(img)
    assert recon.shape == (1, 32, 32) and ctx.shape == (3, 32, 32)  # the context turns grey after its colour jitter
    assert len(lut.Views(32, "rrc", two=False)(img)) == 1


def test_lut_step_augments_the_context_view_only(tmp_path, monkeypatch):
    aug, fwd, outs, seen = data.three_augment, lut.LUT.forward, [], []
    monkeypatch.setattr(data, "three_augment", lambda x, params=None: outs.append((x, aug(x, params))) or outs[-1][1])
    monkeypatch.setattr(lut.LUT, "forward", lambda self, img, ctx=None: seen.append((img, ctx)) or fwd(self, img, ctx))
    lut.main(["--out", str(tmp_path), "--img-size", "32", "--batch-size", "4", "--head-hidden", "64", "--workers", "0",
              "--max-steps", "1", "--no-online-probe"])
    (raw, augmented), (img, ctx) = outs[0], seen[0]
    assert len(outs) == 1 and raw.dtype == torch.uint8 and torch.equal(ctx, data.normalize_batch(augmented))
    pixels = (img * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # the reconstruction view: raw uint8 pixels, no jitter or blur


def test_semanticmim_mask_tokens_carry_their_patch_positions(monkeypatch):
    m = semanticmim.SemanticMIM("vit_demo", 32, 8, 0.6).eval()
    mask = torch.stack([semanticmim.random_patch_mask(16, m.n_mask) for _ in range(2)])
    first, layer = [], semanticmim.semanticmim_layer
    monkeypatch.setattr(semanticmim, "semanticmim_layer", lambda blk, cross, h, mt, P: first.append(mt) or layer(blk, cross, h, mt, P))
    _, _, ids_mask = m.tokens(torch.randn(2, 3, 32, 32), mask)
    assert torch.equal(mask.gather(1, ids_mask), torch.ones_like(ids_mask, dtype=torch.bool))  # they are masked patches
    ref = m.mask_token + m.encoder.pos_embed[0, ids_mask]  # (B, L2, D): [MASK] + its own patch's position
    assert torch.allclose(first[0], ref)


def test_kamim_demo_lr_only_without_data():
    # issue 16 item 3: the demo's own lr (2e-3 at its batch 128, so the CPU demo visibly learns); the paper's
    # 8e-4 at batch 2048 whenever --data is given, and an explicit --lr wins in both
    demo, paper = kamim.parse_args([]), kamim.parse_args(["--data", "/nonexistent"])
    assert demo.lr * demo.batch_size / kamim.REF_BATCH == pytest.approx(2e-3) and paper.lr == 8e-4
    assert kamim.parse_args(["--lr", "1e-3"]).lr == 1e-3


def test_lut_semanticmim_demo_lr_only_without_data():
    # issue 16 item 3: demo lr 1e-3 at the demo's batch 64 for both; the paper's lr whenever --data is given
    d, p = lut.parse_args([]), lut.parse_args(["--data", "/nonexistent"])
    assert lut.scaled_lr(d.lr, d.batch_size) == pytest.approx(1e-3) and p.lr == 1.5e-4
    d, p = semanticmim.parse_args([]), semanticmim.parse_args(["--data", "/nonexistent"])
    assert d.lr * d.batch_size / semanticmim.REF_BATCH == pytest.approx(1e-3) and p.lr == 1.6e-3
    assert semanticmim.parse_args(["--lr", "1e-4"]).lr == 1e-4 and lut.parse_args(["--lr", "1e-4"]).lr == 1e-4


def test_probe_and_semanticmim_crops():
    # MAE's linear probe (main_linprobe.py): RandomResizedCrop(224, interpolation=3) at torchvision's scale (0.08, 1),
    # + flip; SemanticMIM's pretraining crop: scale (0.5, 1) (App. E, --crop-min)
    from torchvision import transforms as T
    rrc = lambda tf: next(t for t in tf.transforms if isinstance(t, T.RandomResizedCrop))
    probe = rrc(abmilp_probe.transforms(224, "mae")[0].transforms[0])
    assert probe.scale == (0.08, 1.0) and probe.ratio == pytest.approx((3 / 4, 4 / 3)) and tuple(probe.size) == (224, 224)
    assert probe.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in abmilp_probe.transforms(224, "mae")[0].transforms[0].transforms)
    assert semanticmim.parse_args(["--data", "/x"]).crop_min == 0.5
