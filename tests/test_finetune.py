"""finetune.py: layer-decay scales, drop-path rule, presets vs each paper's table, mix labels, eval counting, a step."""
import json

import pytest
import torch
import torch.nn as nn
from torchvision import transforms as T

import abmilp_probe
import data
import run
import finetune
import vit


def test_layer_decay_scales_hand_computed():
    m = finetune.Classifier(vit.ViT(img_size=16, patch_size=8, dim=8, depth=2, heads=2), 3)
    scale = {id(p): g["lr_scale"] for g in vit.param_groups(m, 0.05, layer_decay=0.5) for p in g["params"]}
    e = m.encoder
    assert scale[id(e.patch_embed.proj.weight)] == 0.5 ** 3 and scale[id(e.cls_token)] == 0.5 ** 3  # layer 0
    assert scale[id(e.blocks[0].attn.qkv.weight)] == 0.5 ** 2 and scale[id(e.blocks[1].mlp.fc1.weight)] == 0.5
    assert scale[id(m.head.weight)] == 1.0 and scale[id(m.fc_norm.weight)] == 1.0 and not hasattr(e.norm, "weight")


def test_drop_path_linear_rule():
    e = vit.ViT(img_size=16, patch_size=8, dim=8, depth=5, heads=2, drop_path=0.2)
    assert [b.drop_path.p for b in e.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize("protocol,model,key,value", [
    ("lut", "vit_b", "blr", 2.5e-4), ("lut", "vit_s", "blr", 5e-4), ("lut", "vit_l", "blr", 1e-3),  # Table D
    ("lut", "vit_s", "layer_decay", 0.75), ("lut", "vit_b", "layer_decay", 0.65), ("lut", "vit_b", "batch_size", 1024),
    ("lut", "vit_s", "epochs", 300), ("lut", "vit_b", "epochs", 100), ("lut", "vit_b", "warmup_epochs", 5),
    ("lut", "vit_b", "mixup", 0.8), ("lut", "vit_b", "cutmix", 1.0), ("lut", "vit_b", "drop_path", 0.1),
    ("lut", "vit_b", "smoothing", 0.1), ("lut", "vit_b", "weight_decay", 0.05),  # Table D
    ("mae", "vit_b", "blr", 5e-4), ("mae", "vit_l", "layer_decay", 0.75), ("mae", "vit_l", "epochs", 50),  # FINETUNE.md
    ("mae", "vit_b", "reprob", 0.25), ("mae", "vit_h", "drop_path", 0.3),  # FINETUNE.md
    ("kamim", "vit_b", "blr", 5e-3), ("kamim", "vit_b", "epochs", 100), ("kamim", "vit_b", "warmup_epochs", 10),  # §4.1
    ("kamim", "vit_b", "img_size", (192, 192)), ("kamim", "vit_b", "reprob", 0.5),  # §4.1.1
    ("semanticmim", "vit_b", "blr", 8e-3), ("semanticmim", "vit_b", "batch_size", 2048),  # maskfeat_cls_ft.py
    ("semanticmim_beit", "vit_b", "blr", 4e-3), ("semanticmim_beit", "vit_b", "batch_size", 1024),  # beit_cls_ft.py
    ("semanticmim", "vit_b", "epochs", 100), ("semanticmim", "vit_b", "drop_path", 0.1),  # both configs
])
def test_presets_match_papers(protocol, model, key, value, tmp_path):
    args = finetune.parse_args(["--data", str(tmp_path), "--protocol", protocol, "--model", model])
    assert getattr(args, key) == value


def test_flag_overrides_preset(tmp_path):
    assert finetune.parse_args(["--data", str(tmp_path), "--protocol", "lut", "--blr", "1e-4"]).blr == 1e-4


def test_mix_soft_labels_match_images(one_thread):
    torch.manual_seed(0)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()  # image i is constant i
    y = torch.arange(4)
    for _ in range(10):
        xm, ym = finetune.mix_batch(4, 0.8, 1.0)(x, y)
        assert torch.allclose(ym.sum(1), torch.ones(4))
        # each image's mean value equals the label-weighted mean of the source constants (MixUp and CutMix alike)
        assert torch.allclose(xm.mean((1, 2, 3)), ym @ torch.arange(4.0), atol=1e-5)


def test_mixup_weight_is_beta_of_mixups_alpha(one_thread):
    # MixUp's weight lam ~ Beta(0.8, 0.8) (var 1 / (4 (2a + 1)) = 0.096), not CutMix's Beta(1, 1) (var 1/12 = 0.083)
    torch.manual_seed(0)
    x, y, lams = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone(), torch.arange(4), []
    mix = finetune.mix_batch(4, 0.8, 1.0)
    while len(lams) < 3000:
        xm, ym = mix(x, y)
        v = xm[1, 0, 0, 0]  # image 1 (all 1) with image 0 (all 0) rolled in: lam everywhere for MixUp
        if (xm[1] == v).all() and 0 < v < 1:  # CutMix pastes a box of whole 0s (or, box-less, leaves all 1s)
            lams.append(float(ym[1, 1]))
    lams = torch.tensor(lams)
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 1 / (4 * 2.6)) < 0.005


def test_label_smoothing_reaches_the_loss(one_thread):
    # a hand example through build(): logits (2, 0, 0), label 0; smoothing e spreads e / K over the classes
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    nll = -logits.log_softmax(1)[0]  # (3,)
    for flags, e in (([], 0.1), (["--smoothing", "0"], 0.0)):  # MAE / Table D's 0.1 is the demo's too
        model = finetune.build(finetune.parse_args(flags), 3)
        model.logits = lambda img: logits
        loss = model(torch.zeros(1, 3, 64, 64), torch.tensor([0]))[0]
        assert loss.item() == pytest.approx(((1 - e) * nll[0] + e * nll.mean()).item(), abs=1e-6)
    assert ((1 - 0.1) * nll[0] + 0.1 * nll.mean()).item() > nll[0].item() + 0.05  # the two differ


def test_eval_counts_each_image_once(one_thread, tmp_path):
    args = finetune.parse_args(["--out", str(tmp_path), "--max-steps", "1", "--workers", "0", "--micro-batch", "128"])
    top1, top5, n = finetune.train(args)
    assert n == 384  # DemoShapes val, once each


def test_eval_normalises_with_the_runs_mean_and_std(one_thread, tmp_path, monkeypatch):
    # val ships uint8 (issue 17); evaluate must normalise with --mean / --std, not ImageNet's
    seen, logits, dataset = [], finetune.Classifier.logits, data.dataset
    monkeypatch.setattr(finetune.Classifier, "logits", lambda self, x: seen.append(x) or logits(self, x))
    ms = ["--mean", "0.2", "0.5", "0.7", "--std", "0.1", "0.2", "0.3", "--workers", "0", "--micro-batch", "128"]
    for flags in (["--max-steps", "1"], ["--batch-size", "16"]):  # evaluate after the loop; at an epoch's end
        if flags[0] == "--batch-size":  # 16 train images: one step an epoch
            monkeypatch.setattr(data, "dataset", lambda d, split, **kw: dataset(d, split, **kw) if split == "val" else data.DemoShapes(split, 16))
        args = finetune.parse_args(["--out", str(tmp_path / flags[0]), "--epochs", "1", "--warmup-epochs", "0", *ms, *flags])
        finetune.train(args)
        val = data.Seeded(dataset(None, "val", labelled=True), finetune.transforms(args)[1])
        ref = data.normalize_batch(torch.stack([val[i][0] for i in range(384 - len(seen[-1]), 384)]), (0.2, 0.5, 0.7), (0.1, 0.2, 0.3))
        assert torch.allclose(seen[-1], ref, atol=1e-6)  # the last val batch, as the model saw it


def test_distributed_eval_counts_once(tmp_path):
    import json, os, subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "tests/dist_eval.py", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr[-2000:]
    ds = data.Seeded(data.DemoShapes("val", size=7), data.center_crop(64))
    for name, make in [("finetune", lambda e: finetune.Classifier(e, 6)), ("probe", lambda e: abmilp_probe.Probe(e, 6, "avg"))]:
        torch.manual_seed(0)
        single = run.evaluate(make(vit.vit("vit_demo", 64)), torch.utils.data.DataLoader(ds, 2), torch.device("cpu"))
        assert single[2] == 7
        for rank in range(2):
            out = json.load(open(tmp_path / f"rank{rank}.json"))[name]
            assert out["n"] == 7 and out["top1"] == pytest.approx(single[0]), (name, rank)


def test_step_on_kamim_checkpoint_loads_exactly_and_trains(one_thread, tmp_path):
    import kamim
    kamim.main(["--out", str(tmp_path / "pre"), "--max-steps", "1", "--img-size", "64", "--batch-size", "8", "--workers", "0"])
    ck = str(tmp_path / "pre" / "checkpoint.pt")
    args = finetune.parse_args(["--checkpoint", ck, "--out", str(tmp_path / "ft"), "--workers", "0", "--batch-size", "16"])
    model = finetune.build(args, 6)
    sd = vit.read_state_dict(ck)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, sd[k]), k  # loaded as saved, before any step
    assert model.encoder.pos_embed.requires_grad  # MAE fine-tunes the position table
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args.max_steps, args.warmup_epochs = 2, 0
    finetune.train(args)
    after = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["model"]
    assert all(not torch.equal(before[k], after[k]) for k in ("encoder.blocks.0.attn.qkv.weight", "head.weight", "encoder.pos_embed"))


def test_bit_exact_resume(one_thread, tmp_path):
    base = ["--workers", "0", "--batch-size", "16", "--log-every", "1", "--mixup", "0.8", "--cutmix", "1", "--drop-path", "0.1"]  # RNG users on
    finetune.train(finetune.parse_args(base + ["--out", str(tmp_path / "a"), "--max-steps", "2"]))
    for _ in range(2):
        finetune.train(finetune.parse_args(base + ["--out", str(tmp_path / "b"), "--max-steps", "1"]))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_best_top1_is_the_best_epoch_across_a_resume(one_thread, tmp_path, monkeypatch):
    # best_top1: the max of every epoch's val top-1, kept over a resume (the checkpoint's "best")
    tops, dataset = iter([50.0, 30.0, 40.0]), data.dataset
    monkeypatch.setattr(data, "dataset", lambda d, split, **kw: dataset(d, split, **kw) if split == "val" else data.DemoShapes(split, 16))
    monkeypatch.setattr(run, "evaluate", lambda *a, **kw: (next(tops), 90.0, 384))
    base = ["--out", str(tmp_path), "--workers", "0", "--batch-size", "16", "--epochs", "3", "--warmup-epochs", "0"]
    finetune.train(finetune.parse_args(base + ["--max-steps", "2"]))  # 16 images: one step an epoch
    finetune.train(finetune.parse_args(base))  # resumed for the third epoch
    rows = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "best_top1" in r]
    assert [r["top1"] for r in rows] == [50, 30, 40] and [r["best_top1"] for r in rows] == [50, 50, 50]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["best"] == 50


def test_loop_applies_each_groups_lr_scale(one_thread, tmp_path):
    args = finetune.parse_args(["--out", str(tmp_path), "--max-steps", "1", "--workers", "0", "--batch-size", "16",
                                "--layer-decay", "0.5", "--warmup-epochs", "0"])
    finetune.train(args)
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    lr = args.blr * args.batch_size / args.ref_batch  # step 0 without warmup: the peak lr
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.5 ** k for k in range(5, -1, -1)])  # vit_demo: 4 blocks + 2
    assert all(g["lr"] == pytest.approx(lr * g["lr_scale"]) for g in groups)


def test_eval_transform_is_deterministic_centre_crop(tmp_path):
    from PIL import Image
    img = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy())
    for protocol in ("lut", "mae", "semanticmim"):
        args = finetune.parse_args(["--data", str(tmp_path), "--protocol", protocol, "--model", "vit_b"])
        train_tf, val_tf = finetune.transforms(args)
        a, b = val_tf(img), val_tf(img)  # uint8: run.evaluate normalises on the device
        assert torch.equal(a, b) and a.shape == (3, 224, 224) and a.dtype == torch.uint8
        a = data.normalize_batch(a[None], args.mean, args.std)[0]
        assert torch.allclose(a, data.center_crop(224, args.mean, args.std)(img), atol=1e-6)
        ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                         T.Normalize(args.mean, args.std)])(img)  # resize 256 (short side), centre crop 224
        assert torch.allclose(a, ref, atol=1e-6)
        assert not torch.equal(train_tf(img), train_tf(img))  # train, by contrast, is random


def test_avg_pool_excludes_prefix_tokens(one_thread):
    torch.manual_seed(0)
    m = finetune.Classifier(vit.ViT(img_size=16, patch_size=8, dim=8, depth=1, heads=2, prefix_tokens=2), 3).eval()
    nn.init.normal_(m.head.weight)
    x = torch.randn(2, 3, 16, 16)
    ref = m.logits(x)

    def poison(mod, inp, out):  # the prefix outputs set to something huge: avg pooling must not see them
        out = out.clone()
        out[:, :2] = 1e3
        return out
    h = m.encoder.register_forward_hook(poison)
    assert torch.allclose(m.logits(x), ref, atol=1e-6)
    m.pool = "cls"
    assert not torch.allclose(m.logits(x), ref, atol=1e-3)  # the hook does reach the pooled tokens
    h.remove()


@pytest.mark.parametrize("script,flags,prefix", [("lut", [], 1), ("semanticmim", [], 8), ("semanticmim", ["--proxies", "drop"], 1)])
def test_step_on_lut_and_semanticmim_checkpoints(one_thread, tmp_path, script, flags, prefix):
    import importlib
    importlib.import_module(script).main(["--out", str(tmp_path / "pre"), "--max-steps", "1", "--img-size", "64",
                                          "--batch-size", "8", "--workers", "0"])
    ck = str(tmp_path / "pre" / "checkpoint.pt")
    args = finetune.parse_args(["--checkpoint", ck, "--out", str(tmp_path / "ft"), "--workers", "0", "--batch-size", "16"] + flags)
    model = finetune.build(args, 6)
    assert model.encoder.num_prefix == prefix
    sd = vit.read_state_dict(ck)
    assert sd["cls_token"].shape[1] == 8 if script == "semanticmim" else 1
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, sd[k][:, :prefix] if k == "cls_token" else sd[k]), k  # as saved (drop: the first proxy)
    args.max_steps, args.warmup_epochs = 1, 0
    finetune.train(args)
    after = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["model"]
    assert after["encoder.cls_token"].shape[1] == prefix
    assert not torch.equal(model.state_dict()["encoder.blocks.0.attn.qkv.weight"], after["encoder.blocks.0.attn.qkv.weight"])


def test_public_timm_deit_checkpoint_loads_and_trains(one_thread, tmp_path):
    torch.manual_seed(0)
    src = vit.vit("vit_demo", 64, learned_pos=True)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    cls_pos = torch.randn(1, 1, src.dim)
    sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], 1)  # timm: pos_embed (1, 1 + N, D), [cls] row first
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, src.dim), torch.zeros(1000)  # DeiT's ImageNet head
    torch.save({"model": sd, "epoch": 299}, tmp_path / "deit.pth")
    args = finetune.parse_args(["--checkpoint", str(tmp_path / "deit.pth"), "--out", str(tmp_path / "ft"), "--workers", "0",
                                "--batch-size", "16", "--max-steps", "1", "--warmup-epochs", "0"])
    model = finetune.build(args, 6)
    got = model.encoder.state_dict()
    assert torch.equal(got["pos_embed"], src.state_dict()["pos_embed"])
    assert torch.allclose(got["cls_token"], src.cls_token + cls_pos)  # the [cls] position folded into the token
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (6, src.dim)  # a new head, not DeiT's 1000-way one
    top1, top5, n = finetune.train(args)
    assert n == 384 and 0 <= top1 <= top5 <= 100


def test_lut_train_transform_has_randaugment_and_erasing(tmp_path):
    args = finetune.parse_args(["--data", str(tmp_path), "--protocol", "lut", "--model", "vit_b"])
    ops = finetune.transforms(args)[0].transforms
    ra = [t for t in ops if getattr(t, "func", None) is finetune.rand_augment]
    er = [t for t in ops if isinstance(t, T.RandomErasing)]
    assert len(ra) == 1 and ra[0].keywords["fill"] == [124, 116, 104]  # timm's rand-m9-mstd0.5-inc1, img_mean fill
    assert not any(isinstance(t, (T.RandAugment, T.TrivialAugmentWide, T.ColorJitter)) for t in ops)
    assert len(er) == 1 and er[0].p == 0.25 and er[0].scale == (0.02, 1 / 3) and er[0].ratio == (0.3, 3.3)  # MAE reprob
    assert er[0].value == "random"  # timm's mode 'pixel': N(0, 1) noise in normalised space
    assert ops.index(er[0]) == len(ops) - 1  # erasing acts on the normalised tensor, last
