"""semanticmim.py: HOG, information flow of eqs. 2-4, the loss, App. C's FLOP claims, training, resume, torchrun."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import semanticmim as S
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


def small(proxies=2, ratio=0.5, **kw):
    torch.manual_seed(0)
    return S.SemanticMIM("vit_demo", 32, proxies, ratio, **kw).eval()  # 4 x 4 patches of 8 px


def batch(model, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    N = model.encoder.grid[0] * model.encoder.grid[1]
    return torch.randn(B, 3, 32, 32, generator=g), torch.stack([S.random_patch_mask(N, model.n_mask) for _ in range(B)])


def test_hog_edges_bins_and_layout():
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0  # a vertical edge between columns 7 and 8: every 8 x 8 cell holds a piece of it
    h = S.hog(step)  # (1, 3, 9, 2, 2)
    assert h.shape == (1, 3, 9, 2, 2)
    assert torch.allclose(h[:, :, 4], torch.ones(1, 3, 2, 2)) and h[:, :, [0, 1, 2, 3, 5, 6, 7, 8]].abs().max() == 0
    h = S.hog(step.transpose(-1, -2))  # a horizontal edge: bin 0
    assert torch.allclose(h[:, :, 0], torch.ones(1, 3, 2, 2)) and h[:, :, 1:].abs().max() == 0
    ramp = torch.arange(16.0)[None] + torch.arange(16.0)[:, None]  # gx = gy inside: 45 degrees, bin 2
    assert S.hog(ramp.expand(1, 3, 16, 16))[0, :, :, 0, 0].argmax(1).tolist() == [2, 2, 2]
    assert S.hog(torch.zeros(1, 3, 16, 16)).abs().max() == 0  # no gradient, no votes (no division by 0)
    # MaskFeat at ViT-B/16: 2 x 2 cells x 9 bins x 3 channels = 108 values per patch, unit norm per cell
    t = S.patch_targets(S.hog(torch.randn(2, 3, 224, 224)).flatten(1, 2), 2)
    assert t.shape == (2, 196, 108)
    assert torch.allclose(t[0, 5].view(3, 9, 4).norm(dim=1), torch.ones(3, 4), atol=1e-5)
    assert S.hog(torch.randn(1, 3, 32, 32), window=16).shape == (1, 3, 9, 4, 4)
    m = small()
    assert m.head.out_features == 27 and small(target="pixels").head.out_features == 192


def hog_reference(img, bins=9, cell=8, window=0):
    """hog() before issue 17: every vote in a (B, C, bins, H, W) tensor, summed per cell by average pooling."""
    B, C, H, W = img.shape
    d = torch.arange(-1.0, 2.0, device=img.device, dtype=img.dtype)
    sobel = (2 - d.abs())[:, None] * -d
    x = F.pad(img, (1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(x, sobel.expand(C, 1, 3, 3), groups=C)
    gy = F.conv2d(x, sobel.t().expand(C, 1, 3, 3), groups=C)
    mag = torch.sqrt(gx ** 2 + gy ** 2)
    if window:
        g = torch.signal.windows.gaussian(window, std=window / 2, device=img.device)
        mag = mag * (g[:, None] * g[None]).repeat(H // window, W // window)
    b = (torch.atan2(gx, gy) / math.pi * bins).floor().long() % bins
    votes = mag.new_zeros(B, C, bins, H, W).scatter_add_(2, b[:, :, None], mag[:, :, None])
    cells = F.avg_pool2d(votes.flatten(1, 2), cell) * cell ** 2
    return F.normalize(cells.view(B, C, bins, H // cell, W // cell), dim=2)


def test_hog_scatters_into_cells_as_the_vote_tensor_did():
    g = torch.Generator().manual_seed(0)
    # (H, W), bins, cell, window; 36 x 44 has a ragged edge, which both drop
    for (H, W), bins, cell, window in [((16, 16), 9, 8, 0), ((32, 48), 9, 8, 0), ((32, 48), 9, 8, 16), ((48, 32), 6, 4, 8),
                                       ((36, 44), 12, 8, 4), ((224, 224), 9, 8, 0)]:
        img = torch.randn(2, 3, H, W, generator=g)
        new, ref = S.hog(img, bins, cell, window), hog_reference(img, bins, cell, window)
        assert new.shape == ref.shape == (2, 3, bins, H // cell, W // cell) and new.is_contiguous()
        assert torch.allclose(new, ref, rtol=0, atol=1e-6), (H, W, bins, cell, window, (new - ref).abs().max())


def test_information_flow_eqs_3_4():
    m, P = small(), 2
    g = torch.Generator().manual_seed(0)
    h0, m0 = torch.randn(2, P + 8, 128, generator=g), torch.randn(2, 8, 128, generator=g)

    def run(h, mk, n_ctx):
        for blk, cross in zip(m.encoder.blocks, m.cross):
            h, mk = S.semanticmim_layer(blk, cross, h, mk, n_ctx)
        return h, mk

    with torch.no_grad():
        h, mk = run(h0, m0, P)
        assert torch.equal(run(h0, m0 + torch.randn(m0.shape, generator=g), P)[0], h)  # [MASK] inputs never reach [IMG] or [PROXY]
        img2 = h0.clone()
        img2[:, P:] += torch.randn(img2[:, P:].shape, generator=g)  # not a constant: LayerNorm removes it
        assert not torch.allclose(run(img2, m0, P)[1], mk, atol=1e-3)  # through the proxies they do
        assert torch.equal(run(img2, m0, 0)[1], run(h0, m0, 0)[1])  # without proxies in the context, never
        # the whole model: changing the [MASK] token changes the [MASK] outputs only
        img, mask = batch(m)
        ha, ma, _ = m.tokens(img, mask)
        m.mask_token += torch.randn(m.mask_token.shape, generator=g)
        hb, mb, _ = m.tokens(img, mask)
        assert torch.equal(ha, hb) and not torch.allclose(ma, mb, atol=1e-3)


def test_vanilla_is_eq_2_joint_attention():
    m = small(proxies=0, ratio=0.4)
    assert m.encoder.num_prefix == 1 and len(m.cross) == 0 and m.n_mask == 6
    img, mask = batch(m)
    with torch.no_grad():
        assert torch.allclose(m.tokens(img, torch.zeros_like(mask))[0], m.encoder(img, norm=False), atol=1e-5)
        ha = m.tokens(img, mask)[0]
        m.mask_token += torch.randn(m.mask_token.shape)
        hb = m.tokens(img, mask)[0]
    visible = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~mask], 1)
    assert not torch.allclose(ha[visible], hb[visible], atol=1e-3)  # [IMG] and [CLS] see the [MASK] tokens


def test_loss_only_on_masked_patches():
    pred = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]], requires_grad=True)
    target, mask = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), torch.tensor([[1.0, 0.0]])
    assert S.mim_loss(pred, target, mask).item() == pytest.approx((1 + 4) / 2)
    assert S.mim_loss(pred, target, mask, l1=True).item() == pytest.approx((1 + 2) / 2)
    S.mim_loss(pred, target, mask).backward()
    assert pred.grad[0, 1].abs().max() == 0 and pred.grad[0, 0].abs().min() > 0
    assert S.mask_count(196, 0.6) == 118 and S.mask_count(196, 0.4) == 78  # App. C: L2 = 118, L0 = 78
    a, b = S.random_patch_mask(196, 118), S.random_patch_mask(196, 118)
    assert a.sum() == b.sum() == 118 and not torch.equal(a, b)


def test_app_c_flop_claims():
    D, van = 768, lambda L: S.vanilla_block_cost(1, L, D)
    paper = lambda L0, L1, L2: S.semanticmim_block_cost(1, D, L0, L1, L2)
    assert round(100 * (paper(78, 8, 118) / van(197) - 1), 2) == -2.80  # "2.8 % fewer in training" (vs 197)
    assert round(100 * (paper(78, 8, 118) / van(196) - 1), 2) == -2.29
    assert round(100 * (van(204) / van(197) - 1), 2) == 3.70  # "3.7 % more at inference": 8 proxies vs 1 [CLS]
    assert round(100 * (paper(196, 8, 0) / van(197) - 1), 2) == 4.03
    assert paper(78, 11, 118) < 0.99 * van(197)  # "equal at L1 = 11" does not hold (-1.13 %) ...
    assert paper(78, 13, 118) < van(197) < paper(78, 14, 118)  # ... it is L1 = 13
    assert S.semanticmim_block_cost(64, D, 78, 8, 118) == 64 * paper(78, 8, 118)
    assert round(12 * sum(p.numel() for p in vit.Block(D, 12).parameters()) / 1e6) == 85  # §3.3: ~85 M extra
    real = S.semanticmim_block_macs(78, 8, 118, D)  # the formula omits the output projection and one K/V
    assert real - paper(78, 8, 118) == (118 + 8) * D * D and round(100 * (real / van(197) - 1), 1) == 2.3


def test_flops_match_counter():
    for proxies in (2, 0):
        m = small(proxies)
        img, mask = batch(m)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
            m.tokens(img, mask)
        N, L2, D = 16, m.n_mask, 128
        patchify = 2 * 2 * N * 3 * 64 * D
        blocks = S.semanticmim_block_macs(N - L2, proxies, L2, D) if proxies else vit.block_macs(N + 1, D)
        assert fc.get_total_flops() == patchify + 2 * 2 * 4 * blocks
        head = 2 * (L2 if proxies else N) * D * 27
        assert m.train_flops() == 3 * (fc.get_total_flops() / 2 + head)


def test_training_step_export_and_figure(tmp_path):
    for proxies in (2, 0):
        m = small(proxies).train()
        opt = torch.optim.AdamW(vit.param_groups(m, 0.05), lr=1e-3)
        loss, terms = m(*batch(m))
        loss.backward()
        assert torch.isfinite(loss) and set(terms) == {"loss_hog"}
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), "a parameter gets no gradient"
        opt.step()
    m = small(8)
    p = m.encoder.cls_token[0]
    assert p.shape == (8, 128) and torch.cdist(p, p).add(torch.eye(8)).min() > 0  # proxies drawn independently
    enc = vit.load_encoder(vit.vit("vit_demo", 32, prefix_tokens=8), m.encoder.state_dict())  # a plain ViT
    assert torch.equal(enc.cls_token, m.encoder.cls_token) and not any(k.startswith("cross") for k in enc.state_dict())
    img = batch(m)[0]
    a = S.proxy_attention(m.encoder, img)
    assert a.shape == (2, 8, 4, 4) and (a.sum((-1, -2)) < 1).all()  # the rest goes to the prefix tokens
    S.save_figure(m, str(tmp_path / "f.png"), img)
    assert (tmp_path / "f.png").stat().st_size > 0


def losses(out):
    return [r["loss_hog"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss_hog" in r]


def test_demo_lowers_loss_and_resume_is_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    S.main(TINY + ["--out", a, "--max-steps", "6", "--lr", "0.2", "--warmup-epochs", "0"])
    l = losses(a)
    assert len(l) == 6 and sum(l[-2:]) < sum(l[:2])
    S.main(TINY + ["--out", b, "--max-steps", "3", "--lr", "0.2", "--warmup-epochs", "0"])
    S.main(TINY + ["--out", b, "--max-steps", "3", "--lr", "0.2", "--warmup-epochs", "0"])  # resumes at step 3
    ca, cb = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 6 and losses(b) == l
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(ca["encoder"][k], ca["model"]["encoder." + k]) for k in ca["encoder"])


def test_device_decode_gives_the_worker_crops_and_masks(tmp_path):
    # --decode device (issue 17): the worker draws crop_flip's crop + flip and the mask from the same RNG in the same
    # order, ships the bytes; decode_views must give the worker path's crop (to resampling error) and the same mask
    import types
    import data
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(40, 56), (64, 48), (33, 70)]):  # smooth colours: bicubic differences stay small
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 7, generator=g), (h, w), mode="bilinear")[0]
        Image.fromarray((x * 255).byte().permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.JPEG", quality=95)
    hook = S.data_hook(types.SimpleNamespace(img_size=32, crop_min=0.5, in_chans=3), small())
    worker, device = data.ImageFiles(str(tmp_path)), data.ImageFiles(str(tmp_path))
    device.encoded = True
    a, b = data.Seeded(worker, hook), data.Seeded(device, hook)
    for epoch in range(3):
        (jpegs, masks), _ = data.collate([b[(epoch, i)] for i in range(3)])
        ref = [a[(epoch, i)][0] for i in range(3)]
        img = data.decode_views(jpegs, torch.device("cpu"))[0][0]
        assert img.shape == (3, 3, 32, 32) and img.dtype == torch.uint8
        assert torch.equal(masks, torch.stack([m for _, m in ref]))  # the same draws, in the same order
        assert (img.float() - torch.stack([c for c, _ in ref]).float()).abs().mean() < 3, epoch
    seen, norm = {}, data.normalize_batch  # the training step's images, as they reach the model: as the worker's
    for how in ("worker", "device"):
        data.normalize_batch = lambda x, *a, how=how: seen.setdefault(how, []).append(x.float()) or norm(x, *a)
        try:
            S.main(TINY + ["--out", str(tmp_path / how), "--max-steps", "2", "--decode", how])  # the demo (bytes: q95)
        finally:
            data.normalize_batch = norm
    assert len(seen["worker"]) == len(seen["device"]) == 2
    for x, y in zip(seen["worker"], seen["device"]):
        assert x.shape == y.shape == (8, 3, 32, 32) and (x - y).abs().mean() < 6  # sharp demo edges: bicubic, q95; flipped: ~30


def test_accumulation_equals_big_batch_and_nan_stops(tmp_path, monkeypatch):
    """4 micro-batches of 2 give the GRADIENT of one batch of 8 (taken before clipping, at each of 2 steps): not
    weights after Adam, whose first step is ~lr * sign(g) and flips on near-zero gradients."""
    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def recording_clip(params, *a, **k):  # train() clips the model's gradients once per optimiser step
        params = list(params)
        grads.append([torch.zeros_like(q) if q.grad is None else q.grad.clone() for q in params])
        return clip(params, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    S.main(TINY + ["--out", str(tmp_path / "a"), "--max-steps", "2"])
    S.main(TINY + ["--out", str(tmp_path / "b"), "--max-steps", "2", "--micro-batch", "2"])  # 4 micro-batches of 2 = 1 of 8
    assert len(grads) == 4
    for big, acc in ((grads[0], grads[2]), (grads[1], grads[3])):
        norm = torch.cat([g.flatten() for g in big]).norm()
        assert sum(bool(g.abs().max() > 0) for g in big) > 0.9 * len(big)  # nearly every tensor has a gradient
        for a, b in zip(big, acc):
            assert torch.allclose(a, b, atol=1e-5 * norm.item(), rtol=1e-4)
    monkeypatch.setattr(S, "mim_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="non-finite"):
        S.main(TINY + ["--out", str(tmp_path / "c"), "--max-steps", "2"])
    assert not (tmp_path / "c" / "checkpoint.pt").exists()


def test_parse_errors_and_defaults():
    args = S.parse_args(["--data", "/x"])
    assert (args.model, args.img_size, args.batch_size, args.epochs, args.mask_ratio, args.lr) == ("vit_b", (224, 224), 2048, 300, 0.6, 1.6e-3)
    assert S.parse_args(["--proxies", "0"]).mask_ratio == 0.4
    for bad in (["--hog-cell", "3"], ["--mask-ratio", "1.0"], ["--proxies", "-1"], ["--warmup-epochs", "9"]):
        with pytest.raises(SystemExit):
            S.parse_args(bad)


def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29630",
           os.path.join(ROOT, "semanticmim.py"), *TINY, "--max-steps", "2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
