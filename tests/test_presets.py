"""Issue 27: the fine-tune and probe presets against their sources, timm's RandAugment op by op, erasing fills,
KAMIM's pooling and released-code settings, SemanticMIM's Table 1 row by the checkpoint's target."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T
from torchvision.transforms import v2

import abmilp_probe as ap
import data
import run
import finetune
import vit

FT = {  # finetune.parse_args(["--data", X, "--protocol", P]) for vit_b
    "lut": dict(blr=2.5e-4, layer_decay=0.65, randaug=True, color_jitter=0.0, reprob=0.25, erase_fill="noise",  # Table D
                pool="avg", final_norm=False, fc_norm=True, decay_exclusions=True, lr_curve="fresh", clip_grad=0.0),  # MAE code
    "kamim": dict(blr=5e-3, ref_batch=2048, epochs=100, warmup_epochs=10, trivial=True, reprob=0.5, pool="avg",  # §4.1
                  final_norm=True, fc_norm=False, clip_grad=1.0, decay_exclusions=False, lr_curve="timm",  # its code
                  warmup_lr=2.5e-6, min_lr=2.5e-6, antialias=False, erase_fill="black", eval_resize="full"),
    "semanticmim": dict(blr=8e-3, ref_batch=2048, batch_size=2048, layer_decay=0.65, weight_decay=0.05, warmup_epochs=20,
                        min_lr=1e-6, epochs=100, color_jitter=0.4, reprob=0.25, erase_fill="noise", head_std=2e-5,
                        drop_path=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0, clip_grad=0.0,  # maskfeat_cls_ft.py
                        pool="cls", final_norm=True, fc_norm=False),  # Table 1's FT CLS: the proxies
    "semanticmim_beit": dict(blr=4e-3, ref_batch=1024, batch_size=1024, color_jitter=0.0, head_std=0.02,  # beit_cls_ft.py
                             layer_decay=0.65, warmup_epochs=20, min_lr=1e-6, pool="cls"),
}


@pytest.mark.parametrize("protocol", list(FT))
def test_finetune_presets(protocol, tmp_path):
    args = vars(finetune.parse_args(["--data", str(tmp_path), "--protocol", protocol]))
    assert {k: args[k] for k in FT[protocol]} == FT[protocol]


def test_semanticmim_released_pooling_is_one_flag_away(tmp_path):
    # the configs' avg_featmap (FT Patch): the patch mean without the final norm, then a fresh LayerNorm
    args = finetune.parse_args(["--data", str(tmp_path), "--protocol", "semanticmim", "--pool", "avg"])
    assert (args.pool, args.final_norm, args.fc_norm) == ("avg", False, True)


def ckpt(tmp_path, **pretrain):
    torch.save({"encoder": vit.vit("vit_demo", 64).state_dict(), "args": pretrain}, tmp_path / "ck.pt")
    return str(tmp_path / "ck.pt")


@pytest.mark.parametrize("pretrain,flags,paper", [
    (dict(target="hog", proxies=8), [], "MaskFeat + Ours, FT CLS): 83.7"),  # Table 1
    (dict(target="hog", proxies=8), ["--pool", "avg"], "MaskFeat + Ours, FT Patch): 83.6"),
    (dict(target="hog", proxies=0), [], "(MaskFeat, FT CLS): 82.7"),  # the vanilla baseline
    (dict(target="pixels", proxies=8), [], None),  # ours: no row in the paper
    (dict(), ["--protocol", "semanticmim_beit"], "BEiT + Ours, FT CLS): 83.0")])
def test_semanticmim_paper_row_follows_the_checkpoint(tmp_path, pretrain, flags, paper):
    args = finetune.parse_args(["--data", str(tmp_path), "--protocol", "semanticmim", "--checkpoint",
                                ckpt(tmp_path, **pretrain)] + flags)
    assert args.paper == paper or args.paper.endswith(paper)


def test_kamim_pools_the_final_normed_patch_tokens(one_thread):
    torch.manual_seed(0)
    args = finetune.parse_args(["--protocol", "kamim"])
    model = finetune.build(args, 6).eval()
    torch.nn.init.normal_(model.encoder.norm.weight)  # a final norm that visibly acts
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 64, 64)
    tokens = model.encoder(x, norm=False)  # (B, 1 + N, D)
    ref = model.head(model.encoder.norm(tokens)[:, 1:].mean(1))  # last_hidden_state's patch mean, one Linear
    assert isinstance(model.fc_norm, torch.nn.Identity)
    assert not torch.allclose(model.head(tokens[:, 1:].mean(1)), ref, atol=1e-3)  # the norm's place matters
    torch.testing.assert_close(model.logits(x), ref)
    other = finetune.build(finetune.parse_args(["--protocol", "kamim", "--no-final-norm"]), 6)  # the old reading
    assert not other.final_norm and isinstance(other.fc_norm, torch.nn.Identity)


# timm/data/auto_augment.py (rand_augment_transform with 'inc1'): _RAND_INCREASING_TRANSFORMS in its order, and each
# op's *_level_to_arg at magnitude 0, 9 and 10 (level = magnitude / _LEVEL_DENOM 10), with the sign fixed positive
TIMM_LEVELS = {
    "AutoContrast": (None, None, None), "Equalize": (None, None, None), "Invert": (None, None, None),
    "Rotate": (0.0, 27.0, 30.0), "PosterizeIncreasing": (4, 1, 0), "SolarizeIncreasing": (256, 26, 0),
    "SolarizeAdd": (0, 99, 110), "ColorIncreasing": (1.0, 1.81, 1.9), "ContrastIncreasing": (1.0, 1.81, 1.9),
    "BrightnessIncreasing": (1.0, 1.81, 1.9), "SharpnessIncreasing": (1.0, 1.81, 1.9), "ShearX": (0.0, 0.27, 0.3),
    "ShearY": (0.0, 0.27, 0.3), "TranslateXRel": (0.0, 0.405, 0.45), "TranslateYRel": (0.0, 0.405, 0.45)}
FILL, BICUBIC = (124, 116, 104), Image.BICUBIC  # MAE: img_mean of ImageNet's mean, interpolation 'bicubic'
TIMM_OPS = {  # the PIL call timm makes for each op with argument a
    "AutoContrast": lambda im, a: ImageOps.autocontrast(im), "Equalize": lambda im, a: ImageOps.equalize(im),
    "Invert": lambda im, a: ImageOps.invert(im), "Rotate": lambda im, a: im.rotate(a, resample=BICUBIC, fillcolor=FILL),
    "PosterizeIncreasing": lambda im, a: ImageOps.posterize(im, a) if a else Image.new("RGB", im.size),  # old PIL: 0 bits
    "SolarizeIncreasing": lambda im, a: ImageOps.solarize(im, a),
    "SolarizeAdd": lambda im, a: im.point([min(255, i + a) if i < 128 else i for i in range(256)] * 3),
    "ColorIncreasing": lambda im, a: ImageEnhance.Color(im).enhance(a),
    "ContrastIncreasing": lambda im, a: ImageEnhance.Contrast(im).enhance(a),
    "BrightnessIncreasing": lambda im, a: ImageEnhance.Brightness(im).enhance(a),
    "SharpnessIncreasing": lambda im, a: ImageEnhance.Sharpness(im).enhance(a),
    "ShearX": lambda im, a: im.transform(im.size, Image.AFFINE, (1, a, 0, 0, 1, 0), resample=BICUBIC, fillcolor=FILL),
    "ShearY": lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, a, 1, 0), resample=BICUBIC, fillcolor=FILL),
    "TranslateXRel": lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, a * im.size[0], 0, 1, 0), resample=BICUBIC,
                                                fillcolor=FILL),
    "TranslateYRel": lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, a * im.size[1]), resample=BICUBIC,
                                                fillcolor=FILL)}


def test_rand_augment_table_is_timms(monkeypatch):
    monkeypatch.setattr(finetune, "_negate", lambda v: v)
    assert list(finetune.RAND_INCREASING) == list(TIMM_LEVELS)  # the op set, in timm's order
    for name, levels in TIMM_LEVELS.items():
        got = [finetune.RAND_INCREASING[name][0](m / 10) for m in (0, 9, 10)]
        assert got == (pytest.approx(levels) if levels[0] is not None else list(levels)), name


@pytest.mark.parametrize("sign", [1, -1])
def test_rand_augment_ops_are_timms_pil_calls(monkeypatch, sign):
    monkeypatch.setattr(finetune, "_negate", lambda v: sign * v)  # timm's _randomly_negate, either way
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    for name, (level, op) in finetune.RAND_INCREASING.items():
        for m in (3, 9, 10):
            a = level(m / 10)
            ours = np.asarray(op(img, a, interpolation=T.InterpolationMode.BICUBIC, fill=list(FILL)), dtype=int)
            diff = np.abs(ours - np.asarray(TIMM_OPS[name](img, a), dtype=int))
            assert diff.max() <= 1 and diff.mean() < 0.01, (name, m, a)  # ShearY: a pixel off by 1 (rounding)


def test_rand_augment_policy(monkeypatch):
    # 2 ops drawn with replacement, each applied with p 0.5 at a level ~ N(9, 0.5) / 10 clipped to [0, 1]; geometric
    # ops bicubic with the fill given
    calls = []
    table = {k: (lambda lv: lv, lambda x, a, **g: calls.append((x, a, g)) or x) for k in finetune.RAND_INCREASING}
    monkeypatch.setattr(finetune, "RAND_INCREASING", table)
    torch.manual_seed(0)
    n = 4000
    for i in range(n):
        finetune.rand_augment(i, fill=(1, 2, 3))
    per_image = np.bincount([x for x, _, _ in calls], minlength=n)
    assert per_image.max() == 2 and abs(per_image.mean() - 1.0) < 0.05  # Binomial(2, 0.5)
    levels = np.array([a for _, a, _ in calls])
    assert abs(levels.mean() - 0.9) < 0.005 and abs(levels.std() - 0.05) < 0.005 and levels.max() <= 1.0
    assert calls[0][2] == dict(interpolation=T.InterpolationMode.BICUBIC, fill=[1, 2, 3])
    calls.clear()
    for i in range(400):
        finetune.rand_augment(i, m=10.0)
    assert max(a for _, a, _ in calls) == 1.0 and min(a for _, a, _ in calls) < 1.0  # clipped at magnitude 10


@pytest.mark.parametrize("fill", ["noise", "black", "mean"])
def test_erasing_fills(tmp_path, fill):
    args = finetune.parse_args(["--data", str(tmp_path), "--protocol", "lut", "--no-randaug", "--reprob", "1",
                                "--erase-fill", fill])
    img = Image.new("RGB", (256, 256), (200, 100, 50))
    torch.manual_seed(0)
    x = data.denormalize(finetune.transforms(args)[0](img)[None], args.mean, args.std)[0] * 255  # (3, H, W) pixels
    erased = (x - torch.tensor([200.0, 100, 50]).view(3, 1, 1)).abs().amax(0) > 1
    assert 0.02 < erased.float().mean() < 0.34
    got = x[:, erased]
    if fill == "noise":  # timm's mode 'pixel': N(0, 1) per pixel and channel in normalised space
        assert 0.9 < (got / 255 / torch.tensor(args.std).view(3, 1)).std(1).min() < 1.1
    else:  # black: KAMIM's erasing before normalisation; mean: 0 after it
        ref = torch.zeros(3, 1) if fill == "black" else 255 * torch.tensor(args.mean).view(3, 1)
        torch.testing.assert_close(got, ref.expand_as(got), atol=1e-3, rtol=0)


def test_kamim_resize_and_erasing_are_the_released_ones(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ref = v2.Resize((192, 192), antialias=False)(v2.functional.pil_to_tensor(img))  # KAMIM's code, on uint8
    args = finetune.parse_args(["--data", str(tmp_path), "--protocol", "kamim"])
    train, val = finetune.transforms(args)
    assert torch.equal(val(img), ref) and torch.equal(ap.transforms(192, "kamim")[1](img), ref)
    erase = train.transforms[-1]
    assert erase.p == 0.5 and erase.scale == (0.02, 0.33) and erase.ratio == (0.3, 3.3)  # §4.1.1
    assert torch.allclose(data.denormalize(torch.tensor(erase.value).view(1, 3, 1, 1), args.mean, args.std), torch.zeros(1))
    probe_erase = ap.transforms(192, "kamim")[0].transforms[-1]
    assert probe_erase.p == 0.5 and probe_erase.value == 0  # on the uint8 image: black


def test_kamim_finetune_step_clips_decays_all_and_starts_the_timm_curve(one_thread, tmp_path, monkeypatch):
    clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: clips.append(m) or clip(p, m, *a, **k))
    args = finetune.parse_args(["--protocol", "kamim", "--out", str(tmp_path), "--workers", "0", "--batch-size", "16",
                                "--max-steps", "1", "--log-every", "1"])
    finetune.train(args)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert clips == [1.0] and {g["weight_decay"] for g in ck["optimizer"]["param_groups"]} == {0.05}
    lr = [r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r]
    assert lr[0] == pytest.approx(2.5e-6)  # timm's warmup starts at warmup_lr
    assert run.timm_cosine(7, 10, 2, 1.0, 0.1, 0.0) < run.cosine(7, 10, 2, 1.0, 0.1, 0.0)  # the curves differ


def test_kamim_probe_step_clips_decays_all_and_starts_the_timm_curve(tmp_path, monkeypatch):
    clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: clips.append(m) or clip(p, m, *a, **k))
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None: data.DemoShapes(split, 32))
    ap.main(["--protocol", "kamim", "--pool", "avg", "--block", "4", "--img-size", "32", "--batch-size", "16", "--no-cache-features",
             "--max-steps", "1", "--log-every", "1", "--workers", "0", "--out", str(tmp_path)])
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert clips == [1.0] and [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [0.05]  # bias too
    assert [r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r][0] == pytest.approx(2.5e-6)


def test_semanticmim_probe_head_is_a_frozen_fresh_layernorm():
    probe = ap.Probe(vit.vit("vit_demo", 32), 6, "avg", head_norm="ln")
    z = torch.randn(4, 128) * 5 + 3
    torch.testing.assert_close(probe.norm(z), torch.nn.functional.layer_norm(z, (128,), eps=1e-6))
    assert not list(probe.norm.parameters()) and not list(probe.norm.buffers())  # nothing to train or track
