"""SemanticMIM ("SemanticMIM: marrying masked image modeling with semantics compression", §3.3,
App. C, App. E).

The vanilla MIM encoder (eq. 2) runs [IMG] and [MASK] tokens in one sequence, so a [MASK] token can
copy its neighbours. SemanticMIM cuts that path: in every layer the [IMG] tokens and L1
position-free [PROXY] tokens run a normal block (eq. 3, "compression"), then the [MASK] tokens
cross-attend to the proxies and to each other (eq. 4, "reconstruction"). Everything the [MASK]
tokens learn about the image passes the proxies. The cross-attention blocks exist only during
pretraining; the exported encoder is a plain vit.ViT whose prefix tokens are the proxies.

    # 8 proxies, ratio 0.6
    torchrun --nproc_per_node=8 semanticmim.py --model vit_b --data /imagenet
    # vanilla MIM, ratio 0.4
    torchrun --nproc_per_node=8 semanticmim.py --model vit_b --data /imagenet --proxies 0
    # CPU demo, a few minutes
    python semanticmim.py

Target: MaskFeat's HOG (the paper's MaskFeat column, the default). BEiT's column needs the DALL-E
dVAE tokenizer (8192 codes), whose weights cannot ship here: it is not implemented.

Released code (yyk-wew/SemanticMIM, mmpretrain, commit 842509a), checked against eq. 4: each block
has its own separate layer in which q = [MASK] and k / v = [this block's updated PROXY, MASK], then
an MLP; that is reconstruction_layer below. Its configs differ from the paper, whose explicit values
stay the defaults: MaskFeat-bottleneck --mask-ratio 0.8, BEiT-bottleneck --proxies 1, and the linear
probe on the average of the final tokens with AdamW lr 4e-3 for 100 epochs (abmilp_probe.py
--protocol semanticmim_code).
"""
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.utils import save_image

import data
import online_probe
import run
import vit

REF_BATCH = 2048  # App. E, Table 2: the batch the paper's learning rate belongs to
# the paper's run (§4.1, App. E Table 2, MaskFeat column) and the CPU demo (no --data): demo lr
# 3.2e-2 is 1e-3 at its batch 64
PAPER = dict(model="vit_b", img_size=224, batch_size=2048, epochs=300, warmup_epochs=30, workers=8,
             lr=1.6e-3)
DEMO = dict(model="vit_demo", img_size=64, batch_size=64, epochs=5, warmup_epochs=1, workers=1,
            lr=3.2e-2)


# ---- targets (MaskFeat's HOG, §4.1) ----

def hog(img, bins=9, cell=8, window=0):
    """MaskFeat's HOG of a mean/std-normalised image: (B, C, H, W) -> (B, C, bins, H/cell, W/cell).
    Per channel: 3 x 3 Sobel (reflect pad 1); unsigned orientation in `bins` bins of 180/bins
    degrees, measured from the image's y axis as MaskFeat's code does (atan2(gx, gy)): a vertical
    edge lands in bin 4, a horizontal one in bin 0; votes weighted by gradient magnitude, summed
    over cell x cell pixels; each cell's histogram L2-normalised. `window` > 0 weights the
    magnitudes by a Gaussian of that size tiled over the image (0 = none: SlowFast's MaskFeat
    default; the paper does not say)."""
    B, C, H, W = img.shape
    # made on the device: no host copy (a sync)
    d = torch.arange(-1.0, 2.0, device=img.device, dtype=img.dtype)
    sobel = (2 - d.abs())[:, None] * -d  # [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    x = F.pad(img, (1, 1, 1, 1), mode="reflect")
    # (..., H, W) -> (..., H/c, W/c, c * c), each cell's pixels last; a ragged edge (H or W not a
    # multiple of c) is dropped
    px = lambda t: t.unfold(-2, cell, cell).unfold(-2, cell, cell).flatten(-2)
    gx = px(F.conv2d(x, sobel.expand(C, 1, 3, 3), groups=C))  # (B, C, H/c, W/c, c * c)
    gy = px(F.conv2d(x, sobel.t().expand(C, 1, 3, 3), groups=C))
    mag = torch.sqrt(gx ** 2 + gy ** 2)
    if window:
        g = torch.signal.windows.gaussian(window, std=window / 2, device=img.device)
        mag = mag * px((g[:, None] * g[None]).repeat(H // window, W // window))
    # [-pi, pi] -> 2 x bins, folded to bins
    b = (torch.atan2(gx, gy) / math.pi * bins).floor().long() % bins
    # each vote goes straight into its cell's bin: no (B, C, bins, H, W) tensor (1.4 GB at B 256,
    # 224 px)
    cells = mag.new_zeros(B, C, H // cell, W // cell, bins).scatter_add_(-1, b, mag)
    return F.normalize(cells, dim=-1).movedim(-1, 2).contiguous()  # (B, C, bins, H/c, W/c)


def patch_targets(feat, patch_cells):
    """(B, K, gh * k, gw * k) per-cell features -> (B, N, K * k * k) per patch (k = patch_cells
    cells per patch side), in MaskFeat's order [channel, bin, row, column]; N row-major over the
    patch grid."""
    B, K, h, w = feat.shape
    k = patch_cells
    return (feat.view(B, K, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)
            .reshape(B, (h // k) * (w // k), K * k * k))


# ---- the paper's pieces ----

def vanilla_layer(block, h):
    # eq. 2: [IMG] and [MASK] (and the baseline's one [CLS]) in one sequence, joint self-attention +
    # MLP
    return block(h)


def semanticmim_layer(block, cross, h, m, n_proxy):
    # eq. 3: self-attention + MLP over [PROXY, IMG] only; h (B, L1 + L0, D), proxies first
    h = block(h)
    # eq. 4: [MASK] queries m (B, L2, D); keys / values [h_PROXY^(i+1) (this layer's output),
    # h_MASK^i]
    m = cross(m, kv_prefix=h[:, :n_proxy])
    return h, m


def mim_loss(pred, target, mask, l1=False):
    # eq. 1: mean over the masked patches (mask 1 = masked, 0 = visible) of the per-element error;
    # MSE is MaskFeat's loss (§3.1 says HOG uses l1: MaskFeat's paper and code use l2)
    err = (pred - target).abs() if l1 else (pred - target) ** 2  # (B, N, K)
    return (err.mean(-1) * mask).sum() / mask.sum()


def mask_count(n_patches, ratio):
    """Masked patches per image: round(ratio * N); 118 of 196 at 0.6 (App. C's L2), 78 of 196 at
    0.4."""
    return round(ratio * n_patches)


def random_patch_mask(n_patches, n_mask):
    """Random per-patch mask (§4.3: not block-wise): (N,) bool with exactly n_mask True
    (True = masked)."""
    mask = torch.zeros(n_patches, dtype=torch.bool)
    mask[torch.randperm(n_patches)[:n_mask]] = True
    return mask


# ---- App. C: cost per block (multiply-adds; B images) ----

def vanilla_block_cost(B, L, D):
    # App. C: a standard block over L tokens: attention 4BLD^2 + 2BL^2D, MLP 8BLD^2
    return B * (12 * L * D * D + 2 * L * L * D)


def semanticmim_block_cost(B, D, L0, L1, L2):
    # App. C, the paper's formula for L0 [IMG], L1 [PROXY], L2 [MASK]. It reproduces "-2.8 % in
    # training" against a vanilla block of 197 tokens (196 + [CLS]; -2.29 % vs 196); "+3.7 % at
    # inference" is a plain block at 204 vs 197 tokens (this formula at L2 = 0 gives +4.03 %).
    # "Equal cost at L1 = 11" does not reproduce: break-even is L1 = 13.0 (vs 197; 12.1 vs 196). The
    # formula also leaves out L2 D^2 (the cross-attention's output projection) and L1 D^2 (the
    # proxies' second K/V projection): the real modules cost semanticmim_block_macs, +2.3 % vs
    # vanilla at 197 tokens.
    return B * (12 * (L0 + L1) * D * D + 2 * (L0 + L1) ** 2 * D + 11 * L2 * D * D + L1 * D * D
                + 2 * L1 * L2 * D + 2 * L2 ** 2 * D)


def semanticmim_block_macs(L0, L1, L2, D):
    """What the real block computes per image (checked with FlopCounterMode): eq. 3 + eq. 4."""
    return vit.block_macs(L0 + L1, D) + vit.block_macs(L2, D, Lkv=L1 + L2)


# ---- the model ----

class SemanticMIM(nn.Module):
    """Encoder (vit.ViT, prefix = proxies, or one [CLS] when proxies = 0) + per-layer
    cross-attention blocks (training only) + a shared [MASK] token + a linear head to the target.
    proxies = 0 is the vanilla MIM of eq. 2. forward(img (B, C, H, W), mask (B, N) bool,
    True = masked) -> (loss, terms)."""
    def __init__(self, model="vit_b", img_size=224, proxies=8, mask_ratio=0.6, target="hog",
                 hog_bins=9, hog_cell=8, hog_window=0, l1=False, drop_path=0.0, in_chans=3):
        super().__init__()
        # the proxies are "multiple [CLS] tokens" (§4.1): each drawn independently, trunc-normal
        # 0.02, no position
        self.encoder = vit.vit(model, img_size, prefix_tokens=max(proxies, 1), drop_path=drop_path,
                               in_chans=in_chans)
        enc = self.encoder
        D, N, p = enc.dim, enc.grid[0] * enc.grid[1], enc.patch_size
        self.proxies, self.n_mask, self.target, self.l1 = (
            proxies, mask_count(N, mask_ratio), target, l1)
        self.hog_args = dict(bins=hog_bins, cell=hog_cell, window=hog_window)
        heads = enc.blocks[0].attn.heads
        # eq. 4's cross-attention + MLP, one per layer (~85 M parameters at ViT-B), dropped after
        # pretraining
        self.cross = (nn.ModuleList(vit.Block(D, heads) for _ in enc.blocks) if proxies
                      else nn.ModuleList())
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        K = enc.in_chans * (hog_bins * (p // hog_cell) ** 2 if target == "hog" else p * p)
        # MaskFeat: a linear head on the encoder's final LayerNorm; the [MASK] stream shares that
        # norm, as it does in the vanilla baseline (the paper does not say: our decision)
        self.head = nn.Linear(D, K)
        self.cross.apply(vit.init_weights)
        self.head.apply(vit.init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def targets(self, img):
        """(B, C, H, W) normalised image -> (B, N, K) per-patch targets, in fp32 and without
        gradient."""
        p = self.encoder.patch_size
        with torch.no_grad(), torch.autocast(img.device.type, enabled=False):
            if self.target == "hog":
                return patch_targets(hog(img.float(), **self.hog_args).flatten(1, 2),
                                     p // self.hog_args["cell"])
            # the patch's normalised pixels, [channel, row, column]
            return patch_targets(img.float(), p)

    def tokens(self, img, mask):
        """Run the encoder; mask (B, N) bool, True = masked, exactly n_mask per row. Returns (h, m,
        ids_mask): h (B, P + L0, D) [PROXY, IMG] outputs, m (B, L2, D) [MASK] outputs,
        ids_mask (B, L2) their patch indices; for proxies = 0, h (B, 1 + N, D) the joint sequence
        and m = ids_mask = None."""
        enc = self.encoder
        x = enc.embed(img)  # (B, N, D)
        if not self.proxies:  # eq. 2: a masked patch's embedding is replaced by the [MASK] token
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x) + enc.pos_embed
            h = enc.prefix(x)
            for blk in enc.blocks:
                h = vanilla_layer(blk, h)
            return h, None, None
        B, N, D = x.shape
        if mask.shape != (B, N):
            raise ValueError(f"mask must be (B, N) = ({B}, {N}); got {tuple(mask.shape)}")
        # the count without a host sync or a graph break (a GPU raises it at the next sync)
        torch._assert_async((mask.sum(1) == self.n_mask).all(), f"mask must have exactly "
                            f"{self.n_mask} masked patches per row (--mask-ratio)")
        # visible first, then masked, each in patch order
        ids = mask.int().argsort(dim=1, stable=True)
        ids_keep, ids_mask = ids[:, :N - self.n_mask], ids[:, N - self.n_mask:]
        pos = enc.pos_embed.expand(B, -1, -1)
        # [PROXY, IMG]
        h = enc.prefix(torch.gather(x + pos, 1, ids_keep[..., None].expand(-1, -1, D)))
        # [MASK] + position
        m = self.mask_token + torch.gather(pos, 1, ids_mask[..., None].expand(-1, -1, D))
        for blk, cross in zip(enc.blocks, self.cross):
            h, m = semanticmim_layer(blk, cross, h, m, self.proxies)
        return h, m, ids_mask

    def forward(self, img, mask):
        h, m, ids_mask = self.tokens(img, mask)
        target = self.targets(img)  # (B, N, K)
        if m is None:
            # (B, N, K); only masked rows enter the loss
            pred = self.head(self.encoder.norm(h[:, 1:]))
        else:
            # put the [MASK] predictions back on the patch grid; visible rows stay 0 and are not
            # counted
            pm = self.head(self.encoder.norm(m)).float()  # (B, L2, K)
            pred = pm.new_zeros(target.shape).scatter(1, ids_mask[..., None].expand_as(pm), pm)
        loss = mim_loss(pred.float(), target, mask.float(), self.l1)
        return loss, {f"loss_{self.target}": loss.detach()}

    def train_flops(self):
        """Training FLOPs per image: 3 x the forward (forward + 2 x backward), analytic."""
        enc, L2 = self.encoder, self.n_mask
        N, D, K = enc.grid[0] * enc.grid[1], enc.dim, self.head.out_features
        if not self.proxies:
            return 3 * (vit.vit_forward_flops(enc) + 2 * N * D * K)
        fwd = (vit.vit_forward_flops(enc, n_tokens=N - L2 + self.proxies)
               + 2 * len(enc.blocks) * vit.block_macs(L2, D, Lkv=self.proxies + L2))
        return 3 * (fwd + 2 * L2 * D * K)


def proxy_attention(encoder, img, upto=None):
    """Figs. 8-9: each prefix token's attention over the patches in block `upto` (default the last),
    averaged over heads, of the plain encoder on the whole image (as at inference):
    (B, P, gh, gw)."""
    _, attns = encoder(img, upto=upto, norm=False, return_attn=True)
    P = encoder.num_prefix
    return attns[-1][:, :, :P, P:].mean(1).reshape(img.shape[0], P, *encoder.grid)


# ---- data hook ----

def masked_view(img, crop, n_patches, n_mask, size=224, scale=(0.5, 1.0)):
    # --decode device: crop_flip's draws, in its order; data.decode_views crops
    if isinstance(img, data.Jpeg):
        img.views = [data.rrc_spec(img, size, scale)]
        return img, random_patch_mask(n_patches, n_mask)
    return crop(img), random_patch_mask(n_patches, n_mask)


def data_hook(args, model):
    """App. E, Table 2 (MaskFeat): random resized crop scale (0.5, 1), flip 0.5, no colour jitter;
    plus the per-image random mask, drawn here so each sample is a pure function of
    (seed, epoch, index)."""
    enc, scale = model.encoder, (args.crop_min, 1.0)
    crop = T.Compose([data.crop_flip(args.img_size, scale), data.to_uint8(args.in_chans)])  # uint8
    return functools.partial(masked_view, crop=crop, n_patches=enc.grid[0] * enc.grid[1],
                             n_mask=model.n_mask, size=args.img_size, scale=scale)


def save_figure(model, path, img, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """One row per image: the image, then each proxy's (or the [CLS]'s) attention map, each min-max
    scaled."""
    was = model.training
    model.eval()
    with torch.no_grad():
        a = proxy_attention(model.encoder, img).float()  # (B, P, gh, gw)
    model.train(was)
    lo, hi = a.flatten(2).amin(-1)[..., None, None], a.flatten(2).amax(-1)[..., None, None]
    # min-max per map: early in training the maps are near uniform
    a = (a - lo) / (hi - lo).clamp_min(1e-12)
    a = F.interpolate(a, size=img.shape[-2:], mode="nearest")[:, :, None].expand(-1, -1, 3, -1, -1)
    rows = torch.cat([data.denormalize(img, mean, std)[:, None], a], dim=1)  # (B, 1 + P, 3, H, W)
    save_image(rows.flatten(0, 1), path, nrow=rows.shape[1], padding=2)


def figure_images(args, base, device, n=4):
    """The first n readable train images, centre-cropped and normalised, for the proxy-attention
    figure (with --decode device base holds undecoded Jpegs: decoded on the CPU here)."""
    tf, imgs = data.center_crop(args.img_size, args.mean, args.std), []
    for i in range(len(base)):
        x = base[i][0]
        try:
            imgs.append(tf(x.image() if isinstance(x, data.Jpeg) else x))
        except OSError:  # a damaged JPEG the device decode skips too
            continue
        if len(imgs) == n:
            break
    return torch.stack(imgs).to(device)


# ---- training ----

def train(args):
    rank, world, device = run.setup(args.seed)
    micro, accum = run.batch_split(args.batch_size, world, args.micro_batch)
    lr = args.lr * args.batch_size / REF_BATCH
    model = SemanticMIM(args.model, args.img_size, args.proxies, args.mask_ratio, args.target,
                        args.hog_bins, args.hog_cell, args.hog_window, args.loss == "l1",
                        args.drop_path, args.in_chans).to(device)
    groups = vit.param_groups(model, args.weight_decay)  # none on norms, biases, tokens
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    base = data.dataset(args.data, "train", encoded=args.decode == "device")
    ds = data.Seeded(base, data_hook(args, model), args.seed)
    dl = data.loader(ds, micro, train=True, workers=args.workers, seed=args.seed)
    # (None, None): no labels
    probe, held = online_probe.online_probe(args, model.encoder, ds.base, device)
    per_epoch = len(dl) // accum
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    step = run.resume(args.out, model, opt, probe, args, total, ds)  # weights, optimiser, step, RNG
    if rank == 0:
        run.banner(args, device, world, micro, accum,
                   f"{lr:.3g} (= {args.lr:g} x {args.batch_size}/{REF_BATCH}); {model.n_mask} of "
                   f"{model.encoder.grid[0] * model.encoder.grid[1]} patches masked",
                   per_epoch, total, step)
    net = run.distribute(model, device, args.compile)
    # every FLOP of the step, the probe's too (logged TFLOP/s, MFU)
    flops = model.train_flops() + (probe.flops(micro) if probe else 0)
    autocast = run.autocast(device)
    fig_img = figure_images(args, base, device)
    sums, n_log, done, t0 = {}, 0, 0, time.time()
    t_run = t0
    model.train()
    # prefetched
    for epoch, step, micro_batches in data.train_steps(dl, args.epochs, accum, step, device):
        lr_now = run.cosine(step, total, warmup, lr, args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        for i, ((img, mask), y) in enumerate(micro_batches):
            # --decode device: decoded in the prefetch (an undecodable image: left out, counted)
            if isinstance(img, data.Decoded):
                (img, *_), keep = img
                mask, y = mask[keep], y[keep]
                img = data.gray(img) if args.in_chans == 1 else img
            img = data.normalize_batch(img, args.mean, args.std)  # uint8 from the loader
            with run.no_sync(net, i < accum - 1), autocast:
                loss, terms = net(img, mask)
                (loss / accum).backward()
            if probe:  # after backward: its own no-grad forward of the unmasked image, its own step
                probe.step(model.encoder, img, y.to(device))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v / accum
        if args.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, n_log, done = step + 1, n_log + 1, done + 1
        epoch_end, stop = step % per_epoch == 0, step == total or done == args.max_steps
        if step % args.log_every == 0 or epoch_end or stop:
            vals = run.mean_terms(sums, n_log)  # one sync per log line
            # any term nan / inf makes the sum so
            run.check_finite(sum(vals.values()), step, args.out)
            dt = time.time() - t0
            if rank == 0:
                run.report(dict(epoch=epoch, step=step, **vals,
                                **online_probe.train_top1(probe), lr=lr_now,
                                **run.throughput(n_log * args.batch_size, dt, flops, device),
                                eta=run.eta(total - step, dt / n_log), **run.skipped(ds)),
                           args.out)
            sums, n_log, t0 = {}, 0, time.time()
        if step % args.save_every == 0 or epoch_end or stop:
            # never save a bad state
            run.check_finite(sum(sums.values()), step, args.out, model, opt)
            run.share_skips(ds)  # every process's unreadable files, on every rank (a collective)
            if rank == 0:
                run.save_run(args.out, model, opt, step, args, ds,
                             encoder=model.encoder.state_dict(),
                             probe=probe and probe.state_dict())
        if epoch_end and rank == 0:
            online_probe.report_held_out(probe, model.encoder, held, epoch, step, args.out)
            save_figure(model, os.path.join(args.out, f"proxy_attention_epoch{epoch:03d}.png"),
                        fig_img, args.mean, args.std)
        if done == args.max_steps:
            break
    if rank == 0:
        run.summary(args.out, step, total, time.time() - t_run)
    run.finish(world)
    return model


def parse_args(argv=None):
    p = run.parser(__doc__, epilog="Without --data: the demo (DemoShapes) with DEMO's values: "
                   "vit_demo, 64 px, batch 64, 5 epochs (1 warmup), lr 3.2e-2; every other default "
                   "is the paper's (App. E, Table 2, MaskFeat column).")
    a = p.add_argument
    a("--data", default=None, help="ImageNet folder (PATH/train/...) or a folder of images; "
      "absent: the built-in demo")
    a("--model", choices=list(vit.CONFIGS), help="ViT size; the paper: vit_b (§4.1). "
      "Default vit_b, vit_demo for the demo")
    a("--img-size", type=data.image_size, default=None, help="input size; the paper: 224 (§4.1). "
      "Default 224, 64 for the demo; HxW (e.g. 224x320) for a non-square input")
    a("--batch-size", type=int, default=None, help="GLOBAL batch over all GPUs and accumulation; "
      "Table 2: 2048 (64 for the demo)")
    a("--lr", type=float, default=None, help="peak lr at batch 2048 (Table 2, MaskFeat; BEiT: "
      "1.5e-3; demo 3.2e-2, 1e-3 at its batch 64), scaled linearly to --batch-size")
    a("--min-lr", type=float, default=1e-6, help="final cosine lr (Table 2: 1e-6 MaskFeat, 1e-5 "
      "BEiT)")
    a("--epochs", type=int, default=None, help="§4.1: 300 (Table 2's row is garbled); 5 for the "
      "demo")
    a("--warmup-epochs", type=int, default=None, help="linear warmup (Table 2: 30 MaskFeat, 10 "
      "BEiT); 1 for the demo")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (Table 2: 0.05); none "
      "on norms, biases, tokens")
    a("--clip-grad", type=float, default=0.02, help="gradient-norm clip (Table 2: 0.02 MaskFeat, "
      "3.0 BEiT)")
    a("--drop-path", type=float, default=0.0, help="stochastic depth (Table 2's value is garbled; "
      "MaskFeat pretrains with 0)")
    a("--crop-min", type=float, default=0.5, help="random resized crop scale (crop-min, 1) (Table "
      "2: 0.5 MaskFeat, 0.08 BEiT)")
    a("--proxies", type=int, default=8, help="L1, the [PROXY] tokens (§4.1: 8, Fig. 5; released "
      "BEiT-bottleneck config: 1); 0 = the vanilla MIM of eq. 2 with one [CLS]")
    a("--mask-ratio", type=float, default=None, help="masked share of patches (§4.1: 0.6 with "
      "proxies, 0.4 for the vanilla baseline; released MaskFeat-bottleneck config: 0.8)")
    a("--target", default="hog", choices=["hog", "pixels"], help="hog: MaskFeat's (the paper's "
      "MaskFeat column); pixels: normalised pixels (ours)")
    a("--loss", default="mse", choices=["mse", "l1"], help="MaskFeat uses mse; §3.1 claims l1 for "
      "HOG (it is wrong about MaskFeat)")
    a("--hog-bins", type=int, default=9, help="HOG orientation bins over 180 degrees (MaskFeat: 9)")
    a("--hog-cell", type=int, default=8, help="HOG cell size in pixels (MaskFeat: 8, i.e. 2 x 2 "
      "cells per 16 px patch)")
    a("--hog-window", type=int, default=0, help="Gaussian window over the HOG magnitudes; 0 = none "
      "(SlowFast's MaskFeat default, the released code; the paper: none said)")
    a("--decode", default="worker", choices=["worker", "device"], help="JPEG decode: in the loader "
      "workers (PIL), or batched on the training device (data.decode_views: nvJPEG on a GPU), the "
      "workers reading files, drawing crops")
    online_probe.add_flag(p)
    run.shared_flags(p, out="runs/semanticmim", micro_batch=128, log_every=50)
    args = p.parse_args(argv)
    run.defaults(args, DEMO if args.data is None else PAPER)
    run.check_flags(p, args)
    if args.mask_ratio is None:
        args.mask_ratio = 0.6 if args.proxies else 0.4
    cfg = vit.CONFIGS[args.model]
    if any(s % cfg["patch_size"] for s in args.img_size):
        p.error(f"--img-size {args.img_size} is not divisible by {args.model}'s patch size "
                f"{cfg['patch_size']}")
    n = (args.img_size[0] // cfg["patch_size"]) * (args.img_size[1] // cfg["patch_size"])
    if not 0 < mask_count(n, args.mask_ratio) < n:
        p.error(f"--mask-ratio {args.mask_ratio} masks none or all of the {n} patches")
    if args.proxies < 0:
        p.error("--proxies must be >= 0")
    if args.target == "hog" and cfg["patch_size"] % args.hog_cell:
        p.error(f"--hog-cell {args.hog_cell} must divide the patch size {cfg['patch_size']}")
    if args.hog_window and any(s % args.hog_window for s in args.img_size):
        p.error(f"--hog-window {args.hog_window} must divide --img-size {args.img_size}")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
