"""vit.py: shapes, attention paths, parameter and FLOP counts, checkpoint loading."""
import argparse
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vit


def small(**kw):
    torch.manual_seed(0)
    return vit.vit("vit_demo", img_size=32, **kw).eval()


def test_shapes_blocks_and_attention_maps():
    m = small()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 1 + 16, 128)
    y, attns = m(x, upto=2, norm=False, return_attn=True)
    assert y.shape == (2, 17, 128) and len(attns) == 2 and attns[0].shape == (2, 4, 17, 17)
    assert torch.allclose(attns[1].sum(-1), torch.ones(2, 4, 17), atol=1e-5)  # softmax rows
    # the pieces compose to the same forward
    z = m.norm(m.run_blocks(m.prefix(m.embed(x) + m.pos_embed)))
    assert torch.allclose(z, m(x), atol=1e-6)
    with pytest.raises(ValueError, match="image of size"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="not divisible by the patch"):
        vit.vit("vit_b", img_size=200)
    with pytest.raises(ValueError, match="unknown model"):
        vit.vit("vit_x")


def test_sdpa_equals_explicit_softmax_and_cross_attention():
    torch.manual_seed(0)
    attn = vit.Attention(64, 4)
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    assert torch.allclose(attn(x), attn(x, return_attn=True)[0], atol=1e-5)
    out, a = attn(x, ctx, return_attn=True)
    assert a.shape == (2, 4, 5, 7) and torch.allclose(attn(x, ctx), out, atol=1e-5)
    # cross-attention by hand: q from x with the first D rows of qkv, k and v from the context
    W, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = x @ W[:64].T + b[:64], ctx @ W[64:128].T + b[64:128], ctx @ W[128:].T + b[128:]
    split = lambda t: t.view(2, -1, 4, 16).transpose(1, 2)
    w = (split(q) @ split(k).transpose(-1, -2) / 4).softmax(-1)
    ref = attn.proj((w @ split(v)).transpose(1, 2).reshape(2, 5, 64))
    assert torch.allclose(out, ref, atol=1e-5)


def test_attention_maps_under_bf16_autocast_use_fp32_logits():
    # the maps for figures and §4's statistics: under autocast, q and k are bf16 (from the Linear), but the
    # logits and the softmax must be fp32; bf16 logits (8 bits of mantissa) would shift the weights by ~1e-2
    torch.manual_seed(0)
    attn, x = vit.Attention(64, 4), 4 * torch.randn(2, 10, 64)  # large logits, where rounding shows
    with torch.autocast("cpu", torch.bfloat16):
        _, a = attn(x, return_attn=True)
        q, k, _ = attn.qkv(x).view(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4)
    ref = (q.float() @ k.float().transpose(-2, -1) / 4).softmax(-1)
    assert a.dtype == torch.float32 and torch.allclose(a, ref, atol=1e-6)


@pytest.mark.parametrize("name,paper,hf", [("vit_t", 5.5, 5.515), ("vit_s", 21.6, 21.646), ("vit_b", 85.7, 85.759)])
def test_parameter_counts_kamim_table1(name, paper, hf):
    m = vit.vit(name, img_size=192)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e6 - paper) < 0.1
    # the paper's Hugging Face model also learns a (1 + 144) x D position embedding and a [MASK] token
    assert round((n + 145 * m.dim + m.dim) / 1e6, 3) == hf


def test_block_macs_formula_and_counter():
    assert vit.block_macs(197, 768) == 12 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768  # SemanticMIM App. C
    torch.manual_seed(0)
    blk, x, ctx = vit.Block(64, 4), torch.randn(3, 10, 64), torch.randn(3, 7, 64)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        blk(x)
    assert fc.get_total_flops() == 3 * 2 * vit.block_macs(10, 64)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        blk(x, kv_prefix=ctx)
    assert fc.get_total_flops() == 3 * 2 * vit.block_macs(10, 64, Lkv=7 + 10)


def test_block_kv_prefix_normalises_once_as_the_two_norm_call():
    # SemanticMIM eq. 4: keys / values [prefix, x]. Issue 17: the call was Block(x, context=cat([prefix, x])),
    # which ran norm1 on x's rows twice; now once, on cat([prefix, x]), with the same outputs and gradients
    torch.manual_seed(0)
    blk = vit.Block(64, 4)
    with torch.no_grad():
        [p.normal_() for p in blk.norm1.parameters()]  # not LayerNorm's identity init: its gradients must match too
    x, pre = torch.randn(3, 10, 64, requires_grad=True), torch.randn(3, 7, 64, requires_grad=True)

    def two_norms(x, pre):  # the old Block.forward with context=cat([pre, x])
        x = x + blk.attn(blk.norm1(x), blk.norm1(torch.cat([pre, x], 1)))
        return x + blk.mlp(blk.norm2(x))
    seen = []
    blk.norm1.register_forward_hook(lambda mod, i, o: seen.append(tuple(i[0].shape)))
    out, w = blk(x, kv_prefix=pre), torch.randn(3, 10, 64)
    assert seen == [(3, 17, 64)]  # one norm1 call, over the 7 + 10 rows
    ref = two_norms(x, pre)
    assert torch.allclose(out, ref, atol=1e-5)
    wrt = [x, pre, *blk.parameters()]
    for g, g_ref in zip(torch.autograd.grad((out * w).sum(), wrt), torch.autograd.grad((ref * w).sum(), wrt)):
        assert torch.allclose(g, g_ref, atol=1e-4)
    y, a = blk(x, kv_prefix=pre, return_attn=True)
    assert torch.allclose(y, out, atol=1e-5) and a.shape == (3, 4, 10, 17)
    assert torch.allclose(blk(x, kv_prefix=pre[:, :0]), two_norms(x, pre[:, :0]), atol=1e-5)  # no prefix: x on itself


def test_forward_flops_match_counter_and_issue_figures():
    m = small()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(torch.randn(2, 3, 32, 32))
    assert fc.get_total_flops() == 2 * vit.vit_forward_flops(m)
    # KAMIM ViT-B/16 at 192 px: ~25.7 GFLOP forward (+ the 1x1-conv head), ~77 GFLOP to train
    b = vit.vit("vit_b", img_size=192)
    head = 2 * 144 * 768 * 768
    assert round(3 * (vit.vit_forward_flops(b) + head) / 1e9) == 77


def test_param_groups_no_decay():
    m = small()
    decay, no_decay = vit.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "norm.weight", "blocks.0.attn.qkv.bias"}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_sincos_matches_mae_formula():
    pe = vit.sincos_pos_embed(8, 2, 3)  # D = 8: 2 frequencies per sin / cos and axis
    x, y = 2, 1  # token (row 1, column 2) -> index 5
    om = [1.0, 1 / 100]
    want = [math.sin(x * om[0]), math.sin(x * om[1]), math.cos(x * om[0]), math.cos(x * om[1]),
            math.sin(y * om[0]), math.sin(y * om[1]), math.cos(y * om[0]), math.cos(y * om[1])]
    assert torch.allclose(pe[5], torch.tensor(want), atol=1e-6)


def test_checkpoint_round_trip_and_mae_layout(tmp_path):
    m, m2 = small(), vit.vit("vit_demo", img_size=32)
    torch.save({"encoder": m.state_dict()}, tmp_path / "ours.pt")
    vit.load_encoder(m2, str(tmp_path / "ours.pt"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(m2.eval()(x), m(x))
    # MAE / DeiT layout: 'model', DDP prefix, a [cls] position row, decoder and head weights, a Namespace
    sd = {"module." + k: v.clone() for k, v in m.state_dict().items()}
    cls_pos = torch.randn(1, 1, 128)
    sd["module.pos_embed"] = torch.cat([cls_pos, m.pos_embed], 1)
    sd["module.cls_token"] = m.cls_token.detach() - cls_pos
    sd.update({"module.decoder_embed.weight": torch.zeros(3), "module.head.weight": torch.zeros(2), "module.mask_token": torch.zeros(1)})
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "mae.pth")
    m3 = vit.load_encoder(vit.vit("vit_demo", img_size=32), str(tmp_path / "mae.pth")).eval()
    assert torch.allclose(m3(x), m(x), atol=1e-5)


@pytest.mark.parametrize("wrap", ["_orig_mod.module.", "module._orig_mod.", "_orig_mod.module.encoder."])
def test_load_encoder_strips_wrappers_in_any_order(wrap):
    # DDP then torch.compile saves '_orig_mod.module.'-prefixed keys (issue 26.4)
    m, fresh = small(), vit.vit("vit_demo", img_size=32)  # fresh: another init (seed moved on)
    m2 = vit.load_encoder(fresh, {wrap + k: v for k, v in m.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_checkpoint_errors(tmp_path):
    torch.save(small().state_dict(), tmp_path / "demo.pt")
    with pytest.raises(ValueError, match="shape mismatch.*blocks.0.attn.qkv.weight"):
        vit.load_encoder(vit.ViT(img_size=32, patch_size=8, dim=64, depth=4, heads=4), str(tmp_path / "demo.pt"))
    with pytest.raises(ValueError, match="unexpected.*blocks.3"):
        vit.load_encoder(vit.ViT(img_size=32, patch_size=8, dim=128, depth=3, heads=4), str(tmp_path / "demo.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vit.load_encoder(small(), str(tmp_path / "nope.pt"))


def test_pos_embed_resize_non_square_keeps_rows_and_columns():
    # a 4 x 4 table whose channel 0 is the row and channel 1 the column, to a 3 x 5 grid: rows stay rows
    r, c = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pos = torch.stack([r, c, r * c], -1).reshape(1, 16, 3)  # (1, N, D), row-major as the patch grid
    got = vit.resize_pos_embed(pos, (3, 5)).reshape(3, 5, 3)  # (gh, gw, D)
    assert torch.allclose(got[..., 0], got[:, :1, 0].expand(3, 5)) and torch.allclose(got[..., 1], got[:1, :, 1].expand(3, 5))
    assert (got[1:, 0, 0] > got[:-1, 0, 0]).all() and (got[0, 1:, 1] > got[0, :-1, 1]).all()  # increasing down / across
    from torchvision.transforms.v2 import functional as TF
    ref = TF.resize(pos.reshape(4, 4, 3).permute(2, 0, 1), [3, 5], TF.InterpolationMode.BICUBIC, antialias=False)
    torch.testing.assert_close(got, ref.permute(1, 2, 0))  # torchvision's bicubic image resize, (D, H, W) layout


def test_pos_embed_resize():
    pos = vit.sincos_pos_embed(16, 14, 14)[None]
    assert torch.equal(vit.resize_pos_embed(pos, (14, 14)), pos)  # identity at the same size
    big = vit.resize_pos_embed(pos, (24, 24))  # 224 -> 384
    assert big.shape == (1, 576, 16)
    assert torch.allclose(vit.resize_pos_embed(torch.ones(1, 196, 4), (24, 24)), torch.ones(1, 576, 4), atol=1e-5)
    # a model at 64 px loads a 32 px checkpoint: the grid is resized, the [cls] token untouched
    m = small()
    m64 = vit.load_encoder(vit.vit("vit_demo", img_size=64), m.state_dict())
    assert m64.pos_embed.shape == (1, 64, 128) and torch.equal(m64.cls_token, m.cls_token)


def test_grayscale_and_non_square_train_step():
    torch.manual_seed(0)
    m = vit.ViT(img_size=(32, 48), patch_size=8, in_chans=1, dim=64, depth=2, heads=4)
    assert m.pos_embed.shape == (1, 4 * 6, 64)
    opt = torch.optim.AdamW(vit.param_groups(m, 0.05), lr=1e-3)
    x = torch.randn(2, 1, 32, 48)
    loss = m(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    assert m(x).pow(2).mean() < loss


def test_imports_raise_no_warnings():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = [f[:-3] for f in ("vit.py", "data.py", "kamim.py", "lut.py", "semanticmim.py", "abmilp_probe.py")
            if os.path.exists(os.path.join(root, f))]
    subprocess.run([sys.executable, "-W", "error", "-c", "import " + ", ".join(mods)], check=True, cwd=root)
