"""abmilp_probe.py: eq. 6, eq. 5 and the §4 statistics, LARS, the head's parameter count, the frozen
encoder, checkpoint loading, end-to-end probes, exact resume and a 2-process torchrun run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import abmilp_probe as ap
import data
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def test_abmilp_pool_eq6():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, N=2, D=2)
    pooled, s = ap.abmilp_pool(z, torch.tensor([[0.0, math.log(3.0)]]))  # s = (1/4, 3/4) by hand
    assert torch.allclose(s, torch.tensor([[0.25, 0.75]])) and torch.allclose(pooled, torch.tensor([[0.25, 0.75]]))
    z = torch.randn(3, 7, 5)
    pooled, s = ap.abmilp_pool(z, torch.randn(3, 7) * 5)
    assert (s >= 0).all() and torch.allclose(s.sum(1), torch.ones(3))
    assert torch.allclose(ap.abmilp_pool(z, torch.full((3, 7), 2.5))[0], z.mean(1), atol=1e-6)  # constant t = avg
    favour = torch.zeros(3, 7)
    favour[:, 4] = 100.0
    assert torch.allclose(ap.abmilp_pool(z, favour)[0], z[:, 4], atol=1e-5)  # one token wins


def test_entropy_and_attention_statistics():
    assert torch.allclose(ap.attention_entropy(torch.full((196,), 0.3)), torch.tensor(math.log(196)))
    assert ap.attention_entropy(torch.tensor([0.0, 0.0, 0.7, 0.0])) == 0  # one-hot (renormalised): 0
    # P = 1 prefix token, N = 2 patches; head 1 by hand, head 2 uniform (1/3 everywhere)
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])
    attn = torch.stack([a1, torch.full((3, 3), 1 / 3)])[None]  # (B=1, h=2, 3, 3)
    st = ap.attention_stats(attn, P=1)[0]
    H = lambda *p: -sum(x * math.log(x) for x in p)
    want = [(0.5 + 1 / 3) / 2,  # [cls] to itself, raw
            math.log(2),  # [cls] over the patches: (0.5, 0.5) in both heads
            ((0.6 / 0.8 + 0.6 / 0.9) / 2 + 0.5) / 2,  # patch self / all patches
            ((H(0.75, 0.25) + H(1 / 3, 2 / 3)) / 2 + math.log(2)) / 2]
    assert torch.allclose(st, torch.tensor(want, dtype=st.dtype), atol=1e-6)
    # two prefix tokens (proxies): their self-attention averaged, patches start after both
    a = torch.softmax(torch.randn(1, 1, 5, 5), -1)
    st2 = ap.attention_stats(a, P=2)[0]
    assert torch.isclose(st2[0], (a[0, 0, 0, 0] + a[0, 0, 1, 1]) / 2)
    assert torch.isclose(st2[2], (a[0, 0, 2:, 2:].diagonal() / a[0, 0, 2:, 2:].sum(-1)).mean())


def test_lars_step_by_hand():
    w, b = torch.nn.Parameter(torch.tensor([[3.0, 4.0]])), torch.nn.Parameter(torch.tensor([1.0]))
    opt = ap.LARS([w, b], lr=0.1, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    for step in range(2):
        w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
        opt.step()
        if step == 0:  # g' = (g + 0.1 w) * 0.001 * ||w|| / ||g + 0.1 w||; the bias: no decay, no trust ratio
            g = torch.tensor([[0.3, 2.4]])
            mu = g * 0.001 * 5 / g.norm()
            assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.1 * mu) and torch.isclose(b, torch.tensor(0.95))
    assert torch.isclose(b, torch.tensor(0.95 - 0.1 * (0.9 * 0.5 + 0.5)))  # momentum carries over


def test_parameter_count_and_t_bias():
    enc = vit.ViT(img_size=32, patch_size=16, dim=768, depth=1, heads=12)
    assert ap.count_params(ap.Probe(enc, 1000, "abmilp")) == 769_769 == 1000 * 769 + 769  # K(D+1) + D + 1
    assert ap.count_params(ap.Probe(enc, 1000, "cls")) == 769_000  # K(D+1): the paper's D(K+1) is a slip
    assert ap.count_params(ap.Probe(enc, 1000, "abmilp", t="relu")) == 769_000 + 768 * 769 + 769
    probe = ap.Probe(vit.vit("vit_demo", img_size=32), 6, "abmilp")
    probe(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))[0].backward()
    assert probe.t.bias.grad.abs().max() < 1e-6 < probe.t.weight.grad.abs().max()  # softmax ignores a shift


def test_proxy_tokens_pool():
    enc = vit.vit("vit_demo", img_size=32, prefix_tokens=8)  # SemanticMIM: 8 proxies, no extra [cls]
    tokens = torch.randn(2, 8 + 16, 128)
    assert torch.equal(ap.Probe(enc, 6, "cls").pooled(tokens)[0], tokens[:, :8].mean(1))
    assert torch.equal(ap.Probe(enc, 6, "cls", proxy_pool="first").pooled(tokens)[0], tokens[:, 0])
    assert ap.Probe(enc, 6, "cls", proxy_pool="concat").fc.in_features == 8 * 128
    assert torch.equal(ap.Probe(enc, 6, "avg").pooled(tokens)[0], tokens[:, 8:].mean(1))  # patches only


def test_encoder_frozen_and_unchanged():
    torch.manual_seed(0)
    probe = ap.Probe(vit.vit("vit_demo", img_size=32), 6, "abmilp").train()
    assert not probe.encoder.training and probe.norm.training
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    opt = ap.LARS([p for p in probe.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        probe(torch.randn(8, 3, 32, 32), torch.randint(0, 6, (8,)))[0].backward()
        opt.step()
    assert all(p.grad is None for p in probe.encoder.parameters())
    after = probe.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("encoder."))
    assert not torch.equal(before["fc.weight"], after["fc.weight"]) and not torch.equal(before["t.weight"], after["t.weight"])


@pytest.mark.parametrize("prefix", [1, 8])
def test_loading_ours_and_mae_layout(tmp_path, prefix):
    torch.manual_seed(0)
    src = vit.vit("vit_demo", img_size=32, prefix_tokens=prefix).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save({"encoder": src.state_dict(), "model": {"decoder.w": torch.zeros(1)}, "step": 3}, tmp_path / "ours.pt")
    enc = vit.build_encoder("vit_demo", 32, str(tmp_path / "ours.pt")).eval()
    assert enc.num_prefix == prefix and torch.equal(enc(x), src(x))
    if prefix == 1:  # timm / MAE layout: 'model', a (1, 1 + N, D) pos_embed, decoder and head weights
        sd = dict(src.state_dict(), pos_embed=torch.cat([torch.zeros(1, 1, 128), src.pos_embed], 1))
        sd.update({"decoder_embed.weight": torch.zeros(4, 4), "head.weight": torch.zeros(10, 128), "mask_token": torch.zeros(1, 1, 128)})
        torch.save({"model": sd}, tmp_path / "mae.pth")
        assert torch.allclose(vit.build_encoder("vit_demo", 32, str(tmp_path / "mae.pth")).eval()(x), src(x), atol=1e-6)


def test_bad_input_fails_before_data(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "dataset", lambda *a, **k: pytest.fail("data was read"))
    torch.save({"encoder": vit.vit("vit_demo", img_size=32).state_dict()}, tmp_path / "demo.pt")
    with pytest.raises(ValueError, match="wrong --model"):
        ap.main(["--checkpoint", str(tmp_path / "demo.pt"), "--model", "vit_t", "--out", str(tmp_path / "o")])
    for argv in (["--checkpoint", str(tmp_path / "nope.pt")], ["--block", "5"], ["--pool", "max"],
                 ["--protocol", "kamim"], ["--batch-size", "0"]):  # kamim reads block 8: vit_demo has 4
        with pytest.raises(SystemExit):
            ap.parse_args(argv)
    args = ap.parse_args(["--data", str(tmp_path), "--protocol", "kamim", "--model", "vit_s"])
    assert (args.block, args.pool, args.head_norm, args.optimizer, args.batch_size, args.img_size, args.mix) == (8, "avg", "none", "adamw", 2048, (192, 192), True)
    args = ap.parse_args(["--data", str(tmp_path), "--model", "vit_l", "--block", "20", "--head-norm", "none"])
    assert (args.block, args.epochs, args.head_norm, args.lr, args.pool, args.final_norm) == (20, 50, "none", 0.1, "abmilp", False)


def small_demo(monkeypatch, n_train=96, n_val=48):
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None: data.DemoShapes(split, n_train if split == "train" else n_val))


def test_protocol_transforms():
    from PIL import Image
    img = Image.new("RGB", (400, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 100))  # the left quarter red
    red = lambda x: ap.normalized(x[None])[0, 0, :, 0].mean() > 0  # the left column is red (normalised R > 0)
    (_, mae_val), (kamim_train, kamim_val) = ap.transforms(192), ap.transforms(192, "kamim")
    assert mae_val(img).shape == kamim_val(img).shape == kamim_train(img).shape == (3, 192, 192)
    assert mae_val(img).dtype == kamim_val(img).dtype == kamim_train(img).dtype == torch.uint8  # erasing on uint8 (code)
    assert red(kamim_val(img)) and not red(mae_val(img))  # KAMIM: resize to 192 x 192, no centre crop


def test_each_pooling_trains_and_reports(tmp_path, monkeypatch):
    small_demo(monkeypatch)
    res = ap.main(["--img-size", "32", "--batch-size", "32", "--epochs", "8", "--log-every", "1", "--out", str(tmp_path)])
    assert set(res) == {"cls", "avg", "abmilp", "knn_cls", "knn_avg"} and all(0 <= t1 <= t5 <= 100 for t1, t5 in res.values())
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "abmilp" / "log.jsonl")) if "loss" in r]
    assert len(losses) == 24 and sum(losses[-3:]) < sum(losses[:3])  # the demo lowers the loss
    assert os.path.exists(tmp_path / "abmilp" / "scores_epoch007.png")
    res = ap.main(["--img-size", "32", "--batch-size", "32", "--max-steps", "2", "--pool", "avg", "--optimizer", "adamw",
                   "--head-norm", "none", "--lr", "5e-3", "--ref-batch", "2048", "--weight-decay", "0.05", "--out", str(tmp_path / "adamw")])
    assert torch.load(tmp_path / "adamw" / "checkpoint.pt", weights_only=True)["step"] == 2  # KAMIM's AdamW probe runs
    stats = ap.main(["--attention-stats", "--img-size", "32", "--out", str(tmp_path)])  # §4 on the val split
    out = json.load(open(tmp_path / "attention_stats.json"))
    assert out["images"] == 48 and len(out["blocks"]) == 4 and out["max_entropy"] == pytest.approx(math.log(16))
    assert all(0 < b["cls_entropy"] <= math.log(16) + 1e-5 and 0 < b["cls_self"] < 1 for b in out["blocks"])
    assert stats[0][1] == pytest.approx(out["blocks"][0]["cls_entropy"])


def test_resume_is_exact(tmp_path, monkeypatch):
    small_demo(monkeypatch, 48, 12)
    common = ["--img-size", "32", "--batch-size", "8", "--micro-batch", "4", "--pool", "abmilp", "--no-cache-features",
              "--workers", "0", "--epochs", "2"]
    ap.main(common + ["--max-steps", "4", "--out", str(tmp_path / "a")])
    ap.main(common + ["--max-steps", "2", "--out", str(tmp_path / "b")])  # stops mid-epoch 0 (6 steps / epoch)
    ap.main(common + ["--max-steps", "2", "--out", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4 and a["result"] == b["result"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # fc, t and BN running statistics
    assert all(torch.equal(a["optimizer"]["state"][i]["mu"], b["optimizer"]["state"][i]["mu"]) for i in a["optimizer"]["state"])


def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29640",
           os.path.join(ROOT, "abmilp_probe.py"), "--img-size", "32", "--batch-size", "16", "--micro-batch", "4",
           "--max-steps", "2", "--pool", "abmilp", "--no-cache-features", "--workers", "0", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["args"]["pool"] == "abmilp" and 0 <= ck["result"][0] <= 100


def test_knn_two_classes_by_hand():
    # DINO's kNN: cosine (not dot: the bank's lengths differ), k nearest, each votes exp(sim / T) for its class
    bank = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, -0.5], [-1.0, -5.0]])
    labels = torch.tensor([0, 1, 1, 0, 0])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for chunk in (1, 2, 100):  # the running top-k over chunks = one top-k over the whole bank
        votes = ap.knn_classify(q, bank.half(), labels, 2, k=3, T=0.5, chunk=chunk)
        c = math.exp(2 ** -0.5 / 0.5)  # the diagonal [1, 1] at cos 1/sqrt(2)
        expect = torch.tensor([[math.exp(2), c + 1.0], [1.0, math.exp(2) + c]])  # q0: sims 1 (c0), .71, 0 (c1)
        torch.testing.assert_close(votes, expect, rtol=1e-3, atol=1e-3)


def test_knn_default_temperature_votes_by_hand():
    # DINO's T = 0.07, as the function and --knn-t default it: q (1, 0) against (1, 0) class 0, (0, 1) and (1, 1) class 1
    bank, labels, q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]])
    expect = torch.tensor([[math.exp(1 / 0.07), math.exp(0.0) + math.exp(2 ** -0.5 / 0.07)]])
    args = ap.parse_args([])
    for votes in (ap.knn_classify(q, bank, labels, 2), ap.knn_classify(q, bank, labels, 2, args.knn_k, args.knn_t)):
        torch.testing.assert_close(votes, expect, rtol=1e-4, atol=0)


def test_knn_k1_is_nearest_neighbour_and_bank_order_is_irrelevant():
    g = torch.Generator().manual_seed(0)
    q, bank, labels = torch.randn(40, 8, generator=g), torch.randn(300, 8, generator=g), torch.randint(0, 5, (300,), generator=g)
    nearest = labels[(torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T).argmax(1)]
    assert torch.equal(ap.knn_classify(q, bank, labels, 5, k=1, chunk=7).argmax(1), nearest)
    perm = torch.randperm(300, generator=g)
    v = ap.knn_classify(q, bank, labels, 5, chunk=64)
    torch.testing.assert_close(ap.knn_classify(q, bank[perm], labels[perm], 5, chunk=64), v)
    torch.testing.assert_close(v.sum(1), (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T).topk(20).values.div(0.07).exp().sum(1))  # k 20, T 0.07


def test_knn_two_processes_equal_one(tmp_path):
    run = lambda pre, out: subprocess.run(pre + [os.path.join(ROOT, "abmilp_probe.py"), "--img-size", "32", "--pool", "knn",
                                                "--no-cache-features", "--micro-batch", "100", "--workers", "0", "--out", str(out)],
                                          check=True, cwd=ROOT, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641"], tmp_path / "two")
    run([sys.executable], tmp_path / "one")
    rows = [[r for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "top1" in r] for d in ("one", "two")]
    assert [r["pool"] for r in rows[0]] == ["knn_cls", "knn_avg"] and rows[0] == rows[1]  # gathered bank = the whole bank


def test_mix_batch_labels_match_images():
    # KAMIM App. A: MixUp or CutMix. Image i is the constant v_i with its own class i, so each mixed image's mean
    # must be its soft label's mixture of the v's: exact for MixUp's blend and for CutMix's pasted box alike
    B = 6
    v = torch.arange(B, dtype=torch.float32) * 10
    x, y = v.view(B, 1, 1, 1).expand(B, 3, 32, 48).clone(), torch.arange(B)
    mix, kinds = ap.mix_batch(B), set()
    for seed in range(12):
        torch.manual_seed(seed)
        xm, ym = mix(x, y)
        assert ym.shape == (B, B) and torch.allclose(ym.sum(1), torch.ones(B))
        assert torch.allclose(xm.mean((1, 2, 3)), ym @ v, atol=1e-3)
        kinds.add("cutmix" if (xm[:, 0] == xm[:, 0, :1, :1]).all((1, 2)).logical_not().any() else "mixup")
    assert kinds == {"mixup", "cutmix"}  # both are drawn
