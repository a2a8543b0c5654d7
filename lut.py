"""LUT: Learning with Unmasked Tokens Drives Stronger Vision Learners (Kim et al., ECCV 2024), on
top of MAE (He et al., CVPR 2022), its baseline. `--alpha 0` is plain MAE.

MAE (eq. 1): mask 75 % of the patches, encode the visible ones only, decode with mask tokens,
regress the masked pixels. LUT (eq. 2-3) adds the broader-context loss L_BC: the mean of the online
encoder's visible tokens, through a projector and a predictor, must match (cosine) the projected
mean of all tokens of a momentum (EMA) copy on a second, unmasked, differently augmented view.

    torchrun --nproc_per_node=8 lut.py --model vit_b --data /imagenet   # the paper's ViT-B/16 run
    python lut.py                                                        # CPU demo, a few minutes
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torchvision.utils import save_image

import data
import online_probe
import run
import vit

REF_BATCH = 256  # MAE's convention, which §5.1 follows: lr = base lr x batch / 256
# the paper's run (§5.1) and the CPU demo (no --data): a small batch for 768 steps, whose features
# beat a random encoder on kNN (batch 64's 144 steps did not)
PAPER = dict(model="vit_b", img_size=224, batch_size=4096, epochs=1600, warmup_epochs=40,
             decoder_dim=512, decoder_depth=8, decoder_heads=16, workers=8, lr=1.5e-4)
DEMO = dict(model="vit_demo", img_size=64, batch_size=16, epochs=8, warmup_epochs=1,
            decoder_dim=128, decoder_depth=2, decoder_heads=4, workers=1, lr=1.6e-2)


# ---- paper pieces ----

def patchify(img, p):
    """(B, C, H, W) -> (B, N, p * p * C) patch pixels, row-major over the grid (MAE's order)."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, grid, C=3):
    """(B, N, p * p * C) -> (B, C, H, W), the inverse of patchify."""
    B, (gh, gw) = x.shape[0], grid
    x = x.reshape(B, gh, gw, p, p, C)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, gh * p, gw * p)


def mae_loss(pred, target, mask, norm_pix=True):
    # eq. 1: squared error on the masked patches only (mask: 1 = removed, 0 = kept), (B, N, P) in;
    # mean over each patch's P values, then over masked patches (the released code's scale: no sum)
    # MAE's norm_pix_loss: each target patch to zero mean, unit (unbiased) variance (mae#12)
    if norm_pix:
        target = ((target - target.mean(-1, keepdim=True))
                  / (target.var(-1, keepdim=True) + 1e-6) ** 0.5)
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def random_masking(B, N, ratio, device=None):
    """MAE: per sample, mask floor(ratio * N) patches by argsort of uniform noise. Returns ids_keep
    (B, N_keep), ids_restore (B, N) and mask (B, N) in patch order with 1 = removed, 0 = kept."""
    n_keep = N - int(ratio * N)
    ids_shuffle = torch.rand(B, N, device=device).argsort(dim=1)  # ascending: the first n_keep kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = (ids_restore >= n_keep).to(torch.float32)
    return ids_shuffle[:, :n_keep], ids_restore, mask


def restore_order(kept, mask_token, ids_restore):
    """MAE's decoder input: kept tokens (B, N_keep, D) plus N - N_keep copies of the shared mask
    token, put back in the original patch order by ids_restore (B, N). Returns (B, N, D)."""
    B, N = ids_restore.shape
    x = torch.cat([kept, mask_token.expand(B, N - kept.shape[1], -1)], dim=1)  # (B, N, D) shuffled
    return torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))


def broader_context_loss(u, v):
    # eq. 3: ||u_bar - v_bar||^2 of l2-normalised (B, D) vectors (2 - 2 cos), batch mean (Table 4d)
    u, v = F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)
    return (u - v).pow(2).sum(-1).mean()


def mlp_head(dim, hidden=4096):
    """§5.1 (released code): Linear -> BN -> ReLU -> Linear, nothing after; Linears bias-free."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim, bias=False))


def ema_update(teacher, student, m):
    """Momentum encoder (§3): teacher <- m * teacher + (1 - m) * student, parameters and BatchNorm
    running statistics alike; other buffers (fixed positions, BN's step counter) are copied."""
    # lerp: t + (1 - m)(s - t); one multi-tensor kernel, not ~2 launches per tensor on GPU
    with torch.no_grad():
        torch._foreach_lerp_(list(teacher.parameters()),
                             [s.detach() for s in student.parameters()], 1 - m)
        for (name, t), s in zip(teacher.named_buffers(), student.buffers()):
            t.mul_(m).add_(s, alpha=1 - m) if "running_" in name else t.copy_(s)


def ema_momentum(step, total, base=0.996, cosine=True):
    """§5.1's momentum tau = 0.996, scheduled per optimiser step as the released code does (BYOL):
    1 - (1 - tau)(1 + cos(pi t / T)) / 2, from tau to 1 over the run; cosine=False keeps tau."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * step / total)) / 2 if cosine else base


# ---- the model ----

class LUT(nn.Module):
    """MAE (encoder on visible patches + 8-block decoder) with, for alpha > 0, LUT's projector,
    predictor and EMA teacher. forward(img, context) -> (loss, {"mim", "bc"}); the ViT: encoder."""
    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                 norm_pix=True, alpha=0.25, head_hidden=4096, two_view=False):
        super().__init__()
        self.encoder, self.mask_ratio, self.norm_pix, self.alpha, self.two_view = (
            encoder, mask_ratio, norm_pix, alpha, two_view)
        D, p, C = encoder.dim, encoder.patch_size, encoder.in_chans
        # MAE decoder (models_mae.py's names): own width, shared mask token, fixed sin-cos position
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed",
                             vit.sincos_pos_embed(decoder_dim, *encoder.grid)[None])
        self.decoder_blocks = nn.ModuleList(vit.Block(decoder_dim, decoder_heads)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * C)
        # §3, §5.1: online projector + predictor; the teacher copies encoder + projector only
        if alpha > 0:
            self.projector, self.predictor = mlp_head(D, head_hidden), mlp_head(D, head_hidden)
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(vit.init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        if alpha > 0:  # initialised equal to the student, never trained by gradient
            self.teacher = copy.deepcopy(nn.ModuleDict(dict(encoder=self.encoder,
                                                            projector=self.projector)))
            self.teacher.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.alpha > 0:
            self.teacher.eval()  # for the whole run: its BN uses running statistics
        return self

    def update_teacher(self, m):
        """After each optimiser step (dino#102: once per step, not per micro-batch)."""
        ema_update(self.teacher,
                   nn.ModuleDict(dict(encoder=self.encoder, projector=self.projector)), m)

    def forward_encoder(self, img, ids_keep):
        """MAE: embed all patches, add position, keep ids_keep (B, N_keep), prepend [cls], blocks,
        final LN. The encoder never sees a mask token. Returns (B, P + N_keep, D)."""
        enc = self.encoder
        x = enc.embed(img) + enc.pos_embed  # (B, N, D)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, N_keep, D)
        return enc.norm(enc.run_blocks(enc.prefix(x)))

    def forward_decoder(self, tokens, ids_restore):
        """(B, P + N_keep, D) encoder tokens -> (B, N, p * p * C) predicted pixels, every patch."""
        P = self.encoder.num_prefix
        x = self.decoder_embed(tokens)  # (B, P + N_keep, Dd)
        patches = restore_order(x[:, P:], self.mask_token, ids_restore)
        x = torch.cat([x[:, :P], patches + self.decoder_pos_embed], 1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:]

    def reconstruct(self, img):
        """MAE's forward: (pred (B, N, P), mask (B, N) with 1 = removed, tokens, ids_shuffle)."""
        N = self.encoder.grid[0] * self.encoder.grid[1]
        ids_keep, ids_restore, mask = random_masking(img.shape[0], N, self.mask_ratio, img.device)
        tokens = self.forward_encoder(img, ids_keep)
        return self.forward_decoder(tokens, ids_restore), mask, tokens, ids_restore.argsort(dim=1)

    def online(self, tokens):
        """eq. 3, online side: mean of the visible PATCH tokens after the final LN ([cls] excluded,
        Table 4b), projector, predictor. (B, P + N_keep, D) -> (B, D)."""
        return self.predictor(self.projector(tokens[:, self.encoder.num_prefix:].mean(1)))

    @torch.no_grad()
    def target(self, view):
        """eq. 3, target side: the EMA encoder on the WHOLE view (no mask, Table 4e), mean of its N
        patch tokens, EMA projector; no predictor, no gradient. (B, C, H, W) -> (B, D)."""
        return self.teacher.projector(
            self.teacher.encoder(view)[:, self.encoder.num_prefix:].mean(1))

    def forward(self, img, context=None):
        """img: the reconstruction view; context: the other view, the teacher's input (LUT only)."""
        pred, mask, tokens, ids_shuffle = self.reconstruct(img)
        loss = mae_loss(pred, patchify(img, self.encoder.patch_size), mask, self.norm_pix)  # eq. 1
        if self.alpha == 0:
            return loss, dict(mim=loss.detach())
        bc = broader_context_loss(self.online(tokens), self.target(context))  # eq. 2-3
        if self.two_view:
            # released code: the context view is masked too, keeping the NEXT N_keep of view 1's
            # random order (disjoint keep sets); cross-view L_BC, averaged; separate BN passes
            n_keep = tokens.shape[1] - self.encoder.num_prefix
            tokens2 = self.forward_encoder(context, ids_shuffle[:, n_keep:2 * n_keep])
            bc = (bc + broader_context_loss(self.online(tokens2), self.target(img))) / 2
        return loss + self.alpha * bc, dict(mim=loss.detach(), bc=bc.detach())


def compile_blocks(model):
    """--compile beside SyncBatchNorm: each transformer block compiled in place, the heads eager
    (SyncBN's all-gathers break a whole-model graph; the blocks share Block.forward's graphs)."""
    teacher = model.teacher.encoder.blocks if model.alpha > 0 else []
    for blk in [*model.encoder.blocks, *model.decoder_blocks, *teacher]:
        blk.compile()


def train_flops(model):
    """Analytic training FLOPs per image: 3x the student's forward (forward + backward) + 1x the
    no-grad teacher's forward. Heads: 2 linears of D x hidden each."""
    enc = model.encoder
    N, P, Dd = enc.grid[0] * enc.grid[1], enc.num_prefix, model.decoder_embed.out_features
    keep = N - int(model.mask_ratio * N)
    student = vit.vit_forward_flops(enc, n_tokens=P + keep)
    decoder = 2 * ((P + keep) * enc.dim * Dd + N * Dd * model.decoder_pred.out_features
                   + len(model.decoder_blocks) * vit.block_macs(P + N, Dd))
    if model.alpha == 0:
        return 3 * (student + decoder)
    head = 2 * 2 * enc.dim * model.projector[0].out_features
    views = 2 if model.two_view else 1
    return (3 * (views * (student + 2 * head) + decoder)
            + views * (vit.vit_forward_flops(enc) + head))


# ---- data hook: LUT's SRC (Table 4f, from DeiT III), MAE's random resized crop (--alpha 0) ----

def mae_crop(img_size=224):
    """MAE pretraining: random resized crop scale (0.2, 1), bicubic, horizontal flip. PIL -> PIL."""
    return T.Compose([T.RandomResizedCrop(data.image_size(img_size), scale=(0.2, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip()])


def src_resize(img, img_size=224):
    """SRC, part 1, once for all views: shorter side to max(img_size), bicubic. PIL -> PIL."""
    return T.functional.resize(img, max(data.image_size(img_size)),
                               interpolation=T.InterpolationMode.BICUBIC)


def src_crop(img, img_size=224, padding=4):
    """SRC, part 2: random crop, `padding` px reflect padding, then horizontal flip; PIL -> uint8
    (C, H, W). RandomCrop(padding, reflect) + RandomHorizontalFlip's draws and pixels, padding only
    the window's out-of-image strip (the crop, wider than `padding`, holds the rows it reflects)."""
    (th, tw), (w, h) = data.image_size(img_size), img.size
    # RandomCrop.get_params on the padded size
    i = int(torch.randint(0, h + 2 * padding - th + 1, (1,))) - padding
    j = int(torch.randint(0, w + 2 * padding - tw + 1, (1,))) - padding
    a = np.asarray(img.crop((max(j, 0), max(i, 0), min(j + tw, w), min(i + th, h))))
    pad = ((max(-i, 0), max(i + th - h, 0)), (max(-j, 0), max(j + tw - w, 0)))
    a = np.pad(a, pad + ((0, 0),) * (a.ndim - 2), mode="reflect")  # numpy's reflect = torchvision's
    if torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
        a = a[:, ::-1]
    a = torch.from_numpy(np.ascontiguousarray(a))
    return a[None] if a.ndim == 2 else a.permute(2, 0, 1)


def src_spec(jpeg, img_size, padding=4):
    """src_resize + src_crop's draws on a Jpeg's size: a crop_spec row (window <= padding out)."""
    (w, h), (th, tw) = jpeg.size, data.image_size(img_size)
    s = max(th, tw)  # src_resize, torchvision's Resize(int): shorter side to s
    rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    i = int(torch.randint(0, rh + 2 * padding - th + 1, (1,))) - padding
    j = int(torch.randint(0, rw + 2 * padding - tw + 1, (1,))) - padding
    return [rh, rw, i, j, th, tw, th, tw, int(torch.rand(1) < 0.5)]


class Views:
    """PIL -> (reconstruction view,) or, for LUT, (reconstruction view, context view): independent
    uint8 crops, SRC for LUT, MAE's RRC (0.2, 1) by default for --alpha 0 (Table 4f: SRC costs MAE
    0.3 ft). The step jitters + three-augments the context view (RGB) and normalises both."""
    def __init__(self, img_size, crop="src", two=True, in_chans=3):
        self.size, self.src, self.two, self.gray = (
            data.image_size(img_size), crop == "src", two, in_chans == 1)
        self.rrc = mae_crop(img_size)  # MAE: RRC (0.2, 1)

    def crop(self, img):
        return src_crop(img, self.size) if self.src else T.functional.pil_to_tensor(self.rrc(img))

    def __call__(self, img):
        if isinstance(img, data.Jpeg):  # --decode device: data.decode_views crops these draws
            img.views = [src_spec(img, self.size) if self.src
                         else data.rrc_spec(img, self.size, (0.2, 1.0))
                         for _ in range(1 + self.two)]
            return img
        img = src_resize(img, self.size) if self.src else img  # SRC's resize: once for both views
        recon = self.crop(img.convert("L") if self.gray else img)
        return (recon,) if not self.two else (recon, self.crop(img))


@torch.no_grad()
def save_figure(model, img, path, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, seed=0):
    """Rows: input, masked input, prediction, the visible patches with the prediction in the masked
    ones. Norm-pix predictions are un-normalised with the input patch's mean / std, for display."""
    p, grid = model.encoder.patch_size, model.encoder.grid
    with torch.random.fork_rng(devices=[img.device] if img.is_cuda else []):
        torch.manual_seed(seed)  # fixed masks; training RNG untouched
        pred, mask, _, _ = model.reconstruct(img)
    pred, target = pred.float(), patchify(img, p)
    if model.norm_pix:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask[..., None].expand_as(target)  # 1 = removed
    show = lambda x: data.denormalize(unpatchify(x, p, grid, img.shape[1]), mean, std).cpu()
    rows = [show(target), show(target * (1 - m)), show(pred), show(target * (1 - m) + pred * m)]
    save_image(torch.cat(rows), path, nrow=img.shape[0])


# ---- training ----

def scaled_lr(base, batch, rule="linear"):
    """§5.1, as MAE: base x batch / 256 (2.4e-3 at 4096); released code: base x sqrt(batch) / 4."""
    return base * batch / REF_BATCH if rule == "linear" else base * batch ** 0.5 / 4


def train(args):
    rank, world, device = run.setup(args.seed)
    micro, accum = run.batch_split(args.batch_size, world, args.micro_batch)
    lr = scaled_lr(args.lr, args.batch_size, args.lr_scaling)
    encoder = vit.vit(args.model, img_size=args.img_size, in_chans=args.in_chans)
    model = LUT(encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads, args.mask_ratio,
                args.norm_pix_loss, args.alpha, args.head_hidden, args.two_view).to(device)
    groups = vit.param_groups(model, args.weight_decay, decay_tokens=True,
                              layer_decay=args.layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(args.betas), fused=device.type == "cuda")
    transform = Views(args.img_size, args.crop, args.alpha > 0, args.in_chans)
    encoded = args.decode == "device"
    ds = data.Seeded(data.dataset(args.data, "train", encoded=encoded), transform, args.seed)
    dl = data.loader(ds, micro, train=True, workers=args.workers, seed=args.seed)
    # (None, None) without labels
    probe, held = online_probe.online_probe(args, encoder, ds.base, device)
    per_epoch = len(dl) // accum
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    step = run.resume(args.out, model, opt, probe, args, total, ds)  # teacher and heads included
    if rank == 0:
        rule = (f"{args.batch_size}/{REF_BATCH}" if args.lr_scaling == "linear"
                else f"sqrt({args.batch_size})/4")
        run.banner(args, device, world, micro, accum,
                   f"{lr:.3g} (= {args.lr:g} x {rule}; the paper: 2.4e-3 at 4096)",
                   per_epoch, total, step)
    if accum > 1 and args.alpha > 0 and rank == 0:
        print(f"warning: {accum} accumulation steps: the heads' BatchNorm normalises micro-batches "
              f"of {micro}, not one batch of --batch-size (raise --micro-batch or use more GPUs)")
    sync = world > 1 and device.type == "cuda" and args.alpha > 0  # §5.1's SyncBN (gloo has none)
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.compile:
            compile_blocks(model)
    net = run.distribute(model, device, args.compile and not sync)
    # every FLOP of the step, the probe's too (logged TFLOP/s, MFU)
    flops = train_flops(model) + (probe.flops(micro) if probe else 0)
    autocast = run.autocast(device)
    sums, n_log, done, last, t0 = {}, 0, 0, None, time.time()
    t_run = t0
    model.train()
    # prefetched
    for epoch, step, micro_batches in data.train_steps(dl, args.epochs, accum, step, device):
        lr_now = run.cosine(step, total, warmup, lr)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        for i, (views, y) in enumerate(micro_batches):  # uint8
            if isinstance(views, data.Decoded):  # decoded in prefetch; undecodable dropped, counted
                views, keep = views
                y = y[keep]
                views[0] = data.gray(views[0]) if args.in_chans == 1 else views[0]
            # masks and the context view's jitter + three-augment: a pure function of the step
            torch.manual_seed(hash((args.seed, step, rank, i)))
            if len(views) == 2:
                views[1] = data.three_augment(views[1])
                views[1] = data.gray(views[1]) if args.in_chans == 1 else views[1]
            views = [data.normalize_batch(t, args.mean, args.std) for t in views]
            with run.no_sync(net, i < accum - 1), autocast:
                loss, terms = net(*views)
                (loss / accum).backward()
            if probe:  # the student on the whole reconstruction view (the teacher sees the context)
                probe.step(model.encoder, views[0], y.to(device))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v / accum
        if args.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        momentum = ema_momentum(step, total, args.ema_momentum, args.ema_schedule == "cosine")
        if args.alpha > 0:  # EMA after the optimiser step, once per step
            model.update_teacher(momentum)
        step, n_log, done, last = step + 1, n_log + 1, done + 1, views[0]
        epoch_end, stop = step % per_epoch == 0, step == total or done == args.max_steps
        if step % args.log_every == 0 or epoch_end or stop:
            vals = run.mean_terms(sums, n_log)  # one sync per log line
            # any term nan / inf makes the sum so
            run.check_finite(sum(vals.values()), step, args.out)
            dt = time.time() - t0
            if rank == 0:
                loss = vals["mim"] + args.alpha * vals.get("bc", 0.0)  # eq. 2
                run.report(dict(epoch=epoch, step=step, loss=loss, **vals,
                                **online_probe.train_top1(probe), lr=lr_now,
                                **({"ema": momentum} if args.alpha > 0 else {}),
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
            save_figure(model, last[:8], os.path.join(args.out, f"epoch{epoch:03d}.png"),
                        args.mean, args.std)
        if done == args.max_steps:
            break
    if rank == 0:
        run.summary(args.out, step, total, time.time() - t_run)
    run.finish(world)
    return model


def parse_args(argv=None):
    p = run.parser(__doc__)
    a = p.add_argument
    a("--data", help="ImageNet folder (PATH/train/...) or a folder of images; absent: the built-in "
      "demo (DemoShapes), vit_demo at 64 px (patch 8), batch 16, 8 epochs (1 warmup)")
    a("--model", choices=list(vit.CONFIGS), help="§5.1: vit_s / vit_b / vit_l (default vit_b)")
    a("--img-size", type=data.image_size, help="§5.1: 224; HxW (e.g. 224x320) if non-square")
    a("--batch-size", type=int, help="GLOBAL batch, §5.1: 4096")
    a("--lr", type=float, help="base lr per 256 images, §5.1: 1.5e-4 (2.4e-3 at batch 4096); demo "
      "1.6e-2 (1e-3 at its batch 16, so the CPU demo visibly learns)")
    a("--lr-scaling", default="linear", choices=["linear", "sqrt"], help="linear: base x batch/256 "
      "(MAE; §5.1); sqrt: base x sqrt(batch) / 4, the released code's (equal at 4096, 4x at 256)")
    a("--epochs", type=int, help="§5.1: 1600 (ablations, Table 4: 400)")
    a("--warmup-epochs", type=int, help="§5.1: 40, linear from 0, then half-cosine to 0 per step")
    a("--weight-decay", type=float, default=0.05, help="§5.1: 0.05, none on biases and 1-D params")
    a("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas: released code and "
      "MAE pretraining 0.9 0.95 (default; §5.1 cites MAE's protocol, then lists MAE's fine-tuning "
      "0.9 0.999, LUT Table D: self-contradiction)")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay: 1.0 = none, as MAE and "
      "the released code pretrain; §5.1 literally: 0.65, MAE's fine-tuning value (Table D)")
    a("--clip-grad", type=float, default=0.0, help="grad-norm clip; 0 = none (MAE, released code)")
    a("--mask-ratio", type=float, default=0.75, help="r in §2.1, |M| = floor(rN); §5.1: 0.75")
    a("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True, help="eq. 1 target: "
      "each patch normalised (MAE's norm_pix_loss; the released models used it)")
    a("--decoder-dim", type=int, help="MAE decoder width: 512 (demo 128)")
    a("--decoder-depth", type=int, help="§5.1: 8 blocks (demo 2)")
    a("--decoder-heads", type=int, help="MAE: 16 (demo 4)")
    a("--alpha", type=float, help="eq. 3 weight of L_BC; §5.1, Table B: 0.25 for ViT-B (default), "
      "1.0 for ViT-S (default with --model vit_s); 0 = plain MAE (no teacher, no heads)")
    a("--ema-momentum", type=float, default=0.996, help="the teacher's momentum tau, §5.1: 0.996")
    a("--ema-schedule", default="cosine", choices=["const", "cosine"], help="cosine: from tau to 1 "
      "over the run, per optimiser step (released code; §5.1 gives only tau); const: tau always")
    a("--head-hidden", type=int, default=4096, help="hidden width of both heads, §5.1: 4096")
    a("--two-view", action="store_true", help="released code: the context view is masked too (the "
      "next 25%% of view 1's random order, disjoint), both views through the student, cross-view "
      "L_BC averaged: 2.65x MAE's training FLOPs at ViT-B against 1.6x for the paper's LUT")
    a("--crop", choices=["src", "rrc"], help="Table 4f: src (simple resized crop) for LUT; default "
      "for --alpha 0 is MAE's rrc (0.2, 1)")
    a("--decode", default="worker", choices=["worker", "device"], help="JPEG decode: in the loader "
      "workers (PIL), or batched on the training device (torchvision.io.decode_jpeg: nvJPEG on a "
      "GPU), the workers only reading files and drawing crops")
    online_probe.add_flag(p)
    run.shared_flags(p, out="runs/lut", micro_batch=128)
    args = p.parse_args(argv)
    run.defaults(args, PAPER if args.data else DEMO)
    run.check_flags(p, args)
    # §5.1
    args.alpha = (1.0 if args.model == "vit_s" else 0.25) if args.alpha is None else args.alpha
    args.crop = args.crop or ("src" if args.alpha > 0 else "rrc")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must lie in (0, 1) (got {args.mask_ratio})")
    if args.two_view and args.mask_ratio < 0.5:
        p.error(f"--two-view needs --mask-ratio >= 0.5 for two disjoint keep sets "
                f"(got {args.mask_ratio})")
    if args.alpha < 0:
        p.error(f"--alpha must be >= 0 (got {args.alpha})")
    if not 0 <= args.ema_momentum <= 1:
        p.error(f"--ema-momentum must lie in [0, 1] (got {args.ema_momentum})")
    if not 0 < args.layer_decay <= 1:
        p.error(f"--layer-decay must lie in (0, 1] (got {args.layer_decay})")
    if any(s % vit.CONFIGS[args.model]["patch_size"] for s in args.img_size):
        p.error(f"--img-size {args.img_size} is not divisible by {args.model}'s patch size")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
