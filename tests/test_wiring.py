"""Wiring properties no equation test sees: LUT's EMA once per optimiser step under accumulation, the two-view
keep sets, SemanticMIM's routing (image tokens reach [MASK] only through the proxies; masked pixels never enter)."""
import re

import pytest
import torch

import lut
import vit


def test_lut_ema_once_per_optimiser_step_under_accumulation(tmp_path, monkeypatch, capsys, one_thread):
    """accumulation 2 (batch 4 = 2 micro-batches of 2): the optimiser steps twice, the teacher moves exactly once
    after each step (dino#102), with the BYOL momentum of that step (§5.1: 0.996 at step 0)."""
    events = []
    step, ema = torch.optim.AdamW.step, lut.LUT.update_teacher
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        "lr_scale" in self.param_groups[0] and events.append("step")) or step(self, *a, **k))  # the model's (not a probe's)
    monkeypatch.setattr(lut.LUT, "update_teacher", lambda self, m: events.append(m) or ema(self, m))
    forwards = []
    fwd = lut.LUT.forward
    monkeypatch.setattr(lut.LUT, "forward", lambda self, *a: forwards.append(1) or fwd(self, *a))
    lut.main(["--out", str(tmp_path), "--img-size", "32", "--batch-size", "4", "--micro-batch", "2", "--head-hidden",
              "64", "--workers", "0", "--epochs", "2", "--warmup-epochs", "0", "--max-steps", "2", "--log-every", "1"])
    total = int(re.search(r"(\d+) in all", capsys.readouterr().out).group(1))
    assert len(forwards) == 4  # 2 steps x 2 micro-batches
    assert events[0::2] == ["step", "step"] and len(events) == 4, events
    assert events[1] == pytest.approx(0.996, abs=1e-12)
    assert events[1::2] == pytest.approx([lut.ema_momentum(s, total) for s in range(2)], abs=1e-12)
    assert events[3] > events[1]  # the schedule moved: step 1 is not step 0 again


def test_lut_two_view_keep_sets_disjoint_quarters(monkeypatch, one_thread):
    """--two-view: view 1 keeps the first N/4 of random_masking's order, view 2 (the context image) the NEXT N/4:
    disjoint, each 25 % of the patches, view 1's matching lut.random_masking's ids_keep."""
    torch.manual_seed(0)
    m = lut.LUT(vit.vit("vit_demo", img_size=32), decoder_dim=32, decoder_depth=1, decoder_heads=2, head_hidden=64,
                two_view=True)
    masks, calls = [], []
    rm, enc = lut.random_masking, lut.LUT.forward_encoder
    monkeypatch.setattr(lut, "random_masking", lambda *a, **k: masks.append(rm(*a, **k)) or masks[-1])
    monkeypatch.setattr(lut.LUT, "forward_encoder", lambda self, img, ids: calls.append((img, ids)) or enc(self, img, ids))
    img, ctx = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    m(img, ctx)
    N = m.encoder.grid[0] * m.encoder.grid[1]
    (keep, restore, mask), = masks
    assert len(calls) == 2 and calls[0][0] is img and calls[1][0] is ctx
    k1, k2 = calls[0][1], calls[1][1]
    assert k1.shape == k2.shape == (3, N // 4)
    assert torch.equal(k1, keep) and torch.equal(k2, restore.argsort(1)[:, N // 4:N // 2])
    for a, b, mk in zip(k1.tolist(), k2.tolist(), mask):
        assert len(set(a)) == len(set(b)) == N // 4 and not set(a) & set(b)
        assert set(a) == set(torch.nonzero(mk == 0).flatten().tolist())  # view 1 keeps exactly the unmasked patches


def test_lut_two_view_bc_is_the_mean_of_both_cross_view_losses(monkeypatch, one_thread):
    """--two-view (released code): L_BC = (L(view 1 vs teacher(context)) + L(view 2 vs teacher(img))) / 2, not the sum."""
    torch.manual_seed(0)
    m = lut.LUT(vit.vit("vit_demo", img_size=32), decoder_dim=32, decoder_depth=1, decoder_heads=2, head_hidden=64,
                two_view=True)
    seen, bc = [], lut.broader_context_loss
    monkeypatch.setattr(lut, "broader_context_loss", lambda u, v: seen.append(bc(u, v)) or seen[-1])
    loss, terms = m(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert len(seen) == 2 and not torch.allclose(seen[0], seen[1])
    assert torch.allclose(terms["bc"], (seen[0] + seen[1]) / 2)
    assert torch.allclose(loss, terms["mim"] + m.alpha * terms["bc"])


def semanticmim_setup():
    import semanticmim as S
    torch.manual_seed(0)
    model = S.SemanticMIM("vit_demo", 32, proxies=2, mask_ratio=0.5).eval()  # 4 x 4 patches of 8 px, 8 masked
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.stack([S.random_patch_mask(16, model.n_mask) for _ in range(2)])  # (B, N) True = masked
    pix = mask.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 8, 4, 8).reshape(2, 3, 32, 32)  # per pixel: in a masked patch
    return S, model, img, mask, pix, torch.randn(img.shape, generator=g)


def predictions(model, img, mask):
    h, m, ids = model.tokens(img, mask)
    return h, model.head(model.encoder.norm(m)), ids  # the [MASK] predictions that the loss scores


def test_semanticmim_masked_pixels_never_enter_the_encoder(one_thread):
    """Perturbing the masked patches' pixels leaves [PROXY, IMG] and every [MASK] prediction unchanged; perturbing
    the visible ones changes the predictions (so the first check is not vacuous)."""
    S, model, img, mask, pix, noise = semanticmim_setup()
    with torch.no_grad():
        h, pred, ids = predictions(model, img, mask)
        h2, pred2, ids2 = predictions(model, img + noise * pix, mask)
        assert torch.equal(ids, ids2) and torch.allclose(h, h2, atol=1e-6, rtol=0)
        assert torch.allclose(pred, pred2, atol=1e-6, rtol=0)
        assert not torch.allclose(pred, predictions(model, img + noise * ~pix, mask)[1], atol=1e-3)


def test_semanticmim_image_tokens_reach_mask_only_through_proxies(monkeypatch, one_thread):
    """eq. 3-4 on the whole model: with the proxies' outputs held fixed at every layer (constants), the [MASK]
    predictions no longer depend on the visible pixels: no [IMG] token is in the cross-attention's keys / values."""
    S, model, img, mask, pix, noise = semanticmim_setup()
    P, layer, fixed = model.proxies, S.semanticmim_layer, {}

    def held(block, cross, h, m, n_proxy):
        def blk(x):
            y = block(x)
            c = fixed.setdefault(id(block), torch.randn(1, P, y.shape[-1]).expand(y.shape[0], -1, -1))
            return torch.cat([c, y[:, P:]], 1)  # the proxies' outputs replaced by constants, [IMG] kept
        return layer(blk, cross, h, m, n_proxy)

    with torch.no_grad():
        moved = not torch.allclose(predictions(model, img, mask)[1], predictions(model, img + noise * ~pix, mask)[1], atol=1e-3)
        assert moved  # normally, visible pixels do reach [MASK] (through the proxies)
        monkeypatch.setattr(S, "semanticmim_layer", held)
        _, pred, _ = predictions(model, img, mask)
        _, pred2, _ = predictions(model, img + noise * ~pix, mask)
        assert len(fixed) == len(model.encoder.blocks)  # every layer went through the hook
        assert torch.allclose(pred, pred2, atol=1e-6, rtol=0)
