"""End-to-end fine-tuning of a pretrained (or random) ViT + linear head under each paper's protocol.

    torchrun --nproc_per_node=8 finetune.py --checkpoint runs/lut/checkpoint.pt --model vit_b \\
        --data /imagenet --protocol lut
    # CPU demo: vit_demo from scratch on DemoShapes
    python finetune.py
    # the demo from `python kamim.py`'s checkpoint
    python finetune.py --checkpoint runs/kamim/checkpoint.pt

Presets (--protocol) set what each paper states, and where it is silent or contradicts itself the
released code:
  lut               LUT Table D; where silent, MAE's code (noise erasing 0.25, avg pool + fc_norm)
  mae               MAE FINETUNE.md (B: blr 5e-4, layer decay 0.65, 100 epochs; L/H: 1e-3, 0.75, 50)
  kamim             KAMIM §4.1, §4.1.1 (resize 192, TrivialAugment, erasing 0.5); else its code
  semanticmim       SemanticMIM's released maskfeat_cls_ft.py (MaskFeat + Ours: App. E Table 3 is
                    the probe's recipe)
  semanticmim_beit  SemanticMIM's released beit_cls_ft.py (BEiT + Ours)
"""
import argparse
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import v2

import data
import run
import vit

# Keys: argparse dests, each value's source in --help; "blr": the lr at ref_batch, scaled linearly
PROTOCOLS = {
    # Table D; reprob, noise erasing, pool: MAE's code
    "lut": dict(blr={"vit_s": 5e-4, "vit_b": 2.5e-4, "vit_l": 1e-3}, ref_batch=256,
                batch_size=1024, weight_decay=0.05, betas=(0.9, 0.999),
                layer_decay={"vit_s": 0.75, "vit_b": 0.65, "vit_l": 0.65}, warmup_epochs=5,
                epochs={"vit_s": 300, "vit_b": 100, "vit_l": 50}, randaug=True, smoothing=0.1,
                mixup=0.8, cutmix=1.0, drop_path=0.1, img_size=224, reprob=0.25, pool="avg"),
    # FINETUNE.md
    "mae": dict(blr={"vit_b": 5e-4, "vit_l": 1e-3, "vit_h": 1e-3}, ref_batch=256,
                batch_size=1024, weight_decay=0.05, betas=(0.9, 0.999),
                layer_decay={"vit_b": 0.65, "vit_l": 0.75, "vit_h": 0.75}, warmup_epochs=5,
                epochs={"vit_b": 100, "vit_l": 50, "vit_h": 50}, randaug=True, smoothing=0.1,
                mixup=0.8, cutmix=1.0, drop_path={"vit_b": 0.1, "vit_l": 0.2, "vit_h": 0.3},
                img_size=224, reprob=0.25, pool="avg"),
    # KAMIM §4.1: AdamW with pretraining's wd 0.05 / betas, lr 5e-3, cosine 100 epochs incl. 10
    # warmup, avg pool + one Linear; §4.1.1: resize 192, TrivialAugment, erasing 0.5 before
    # normalisation, MixUp or CutMix. Where it is silent, the released code: batch 2048, alpha 1, no
    # layer decay / drop path / smoothing; the mean of Hugging Face's last_hidden_state (after the
    # final norm: §4.1's "no layer normalization" is App. A's extra one); clip 1.0, decay on every
    # parameter, timm's cosine from 2.5e-6 to a 2.5e-6 floor, a uint8 resize without antialiasing.
    "kamim": dict(blr=5e-3, ref_batch=2048, batch_size=2048, weight_decay=0.05,
                  betas=(0.9, 0.999), layer_decay=1.0, warmup_epochs=10, epochs=100, trivial=True,
                  smoothing=0.0, mixup=1.0, cutmix=1.0, drop_path=0.0, img_size=192, reprob=0.5,
                  erase_fill="black", pool="avg", final_norm=True, fc_norm=False,
                  eval_resize="full", antialias=False, clip_grad=1.0, decay_exclusions=False,
                  lr_curve="timm", warmup_lr=2.5e-6, min_lr=2.5e-6),
    # SemanticMIM App. E Table 3 is its linear-probe recipe (Table 5: wd 1e-4, no warmup, min lr 0)
    # under a fine-tuning title: self-contradictory, so the released fine-tune config of the
    # comparable Table 1 row decides. HOG (ours) -> MaskFeat + Ours, maskfeat_cls_ft.py: lr 8e-3 at
    # 8 x 256, layer decay 0.65, wd 0.05, 20 warmup, min lr 1e-6, RandAugment, colour jitter 0.4,
    # erasing 0.25 (noise), smoothing 0.1, MixUp 0.8 / CutMix 1.0, drop path 0.1, head init 2e-5.
    # Pooling: Table 1's FT CLS (the proxies); the configs run FT Patch (avg_featmap: --pool avg).
    "semanticmim": dict(blr=8e-3, ref_batch=2048, batch_size=2048, weight_decay=0.05,
                        betas=(0.9, 0.999), layer_decay=0.65, warmup_epochs=20, epochs=100,
                        randaug=True, color_jitter=0.4, smoothing=0.1, mixup=0.8, cutmix=1.0,
                        drop_path=0.1, img_size=224, reprob=0.25, pool="cls", min_lr=1e-6,
                        head_std=2e-5),
}
# BEiT + Ours, beit_cls_ft.py: lr 4e-3 at 8 x 128, no colour jitter, head init 0.02; else MaskFeat's
PROTOCOLS["semanticmim_beit"] = dict(PROTOCOLS["semanticmim"], blr=4e-3, ref_batch=1024,
                                     batch_size=1024, color_jitter=0.0, head_std=0.02)
# the demo (no --data) overrides only these: no regulariser on 1.5k images (loss at ln 6 with them)
DEMO = dict(img_size=64, batch_size=128, ref_batch=128, blr=2e-3, epochs=14, warmup_epochs=1,
            layer_decay=1.0, randaug=False, mixup=0.0, cutmix=0.0, drop_path=0.0, reprob=0.0,
            workers=1)
PAPER = {"lut": ("LUT Table 1", {"vit_s": 82.0, "vit_b": 84.2, "vit_l": 86.0}),
         "mae": ("MAE FINETUNE.md", {"vit_b": 83.6, "vit_l": 85.9}),
         "kamim": ("KAMIM Table 1", {"vit_t": 70.41, "vit_s": 77.02, "vit_b": 77.30})}
# ViT-B fine-tuning top-1 (FT CLS, FT Patch) by the pretraining target and proxies (> 0: + Ours)
SEMANTICMIM_TABLE1 = {
    ("hog", True): ("MaskFeat + Ours", 83.7, 83.6), ("hog", False): ("MaskFeat", 82.7, 83.0),
    ("dvae", True): ("BEiT + Ours", 83.0, 82.9), ("dvae", False): ("BEiT", 81.9, 82.2)}


def paper_top1(args, pretrain):
    """The paper's number to print beside ours, or None. SemanticMIM: the Table 1 row of the
    checkpoint's stored target and proxies (none stored: the protocol's own row; a pixel target has
    none), the column by --pool."""
    if not args.protocol.startswith("semanticmim"):
        name, nums = PAPER[args.protocol]
        return f"{name}: {nums[args.model]}" if args.model in nums else None
    target = pretrain.get("target", "dvae" if args.protocol == "semanticmim_beit" else "hog")
    row = SEMANTICMIM_TABLE1.get((target, pretrain.get("proxies", 8) > 0))
    if row is None or args.model != "vit_b":
        return None
    cls = args.pool == "cls"
    return (f"SemanticMIM Table 1 ({row[0]}, FT {'CLS' if cls else 'Patch'}): "
            f"{row[1] if cls else row[2]}")


# ---- the model ----

class Classifier(nn.Module):
    """Encoder -> pool -> (LayerNorm) -> Linear. The tokens are read before the encoder's final norm
    (final_norm False: MAE's global_pool, which adds fc_norm) or after it (KAMIM's code: Hugging
    Face's last_hidden_state; MAE's [cls]). pool "avg": the mean of the patch tokens; "cls": the
    prefix tokens (the mean over several proxies)."""
    def __init__(self, encoder, num_classes, pool="avg", fc_norm=True, final_norm=False,
                 head_std=2e-5, smoothing=0.0):
        super().__init__()
        self.encoder, self.pool, self.final_norm = encoder, pool, final_norm
        self.smoothing = smoothing
        self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6) if fc_norm else nn.Identity()
        # MAE's global pool deletes the final norm (fc_norm takes its place): a parameter that gets
        # no gradient stops DDP at the second step
        if not final_norm:
            encoder.norm = nn.Identity()
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_std)  # MAE, MaskFeat: near 0; BEiT: 0.02
        nn.init.zeros_(self.head.bias)  # MaskFeat's 2e-5 per class: the same to a softmax

    def logits(self, img):
        P = self.encoder.num_prefix
        t = self.encoder(img, norm=self.final_norm)  # (B, P + N, D)
        z = t[:, P:].mean(1) if self.pool == "avg" else t[:, :P].mean(1)  # (B, D)
        return self.head(self.fc_norm(z))

    def forward(self, img, target):
        """target: labels (B,) or soft labels (B, K) after MixUp / CutMix."""
        loss = F.cross_entropy(self.logits(img).float(), target, label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach()}


def build(args, num_classes):
    # strict load
    enc = vit.build_encoder(args.model, args.img_size, args.checkpoint, args.in_chans)
    model = vit.vit(args.model, args.img_size, in_chans=args.in_chans, prefix_tokens=enc.num_prefix,
                    drop_path=args.drop_path, learned_pos=True)  # MAE fine-tunes pos_embed
    if args.checkpoint:
        vit.load_encoder(model, enc.state_dict())
    # released config: num_cls_tokens=1 (the first proxy kept)
    if args.proxies == "drop" and model.num_prefix > 1:
        model.cls_token = nn.Parameter(model.cls_token.data[:, :1].clone())
    return Classifier(model, num_classes, args.pool, args.fc_norm, args.final_norm, args.head_std,
                      args.smoothing)


# ---- data ----

def _negate(v):
    return -v if torch.rand(()) < 0.5 else v  # timm's _randomly_negate: either sign with p 0.5


def _enhance(level):
    # timm's _enhance_increasing_level_to_arg: 1 -+ 0.9 level
    return max(0.1, 1.0 + _negate(0.9 * level))


def solarize_add(img, add, threshold=128):
    """timm's SolarizeAdd: pixels below threshold plus add, clipped at 255 (PIL or uint8 tensor)."""
    if isinstance(img, torch.Tensor):
        return torch.where(img < threshold, (img.int() + add).clamp(max=255).to(img.dtype), img)
    return img.point([min(255, i + add) if i < threshold else i for i in range(256)]
                     * len(img.getbands()))


TF = v2.functional
# timm's _RAND_INCREASING_TRANSFORMS (timm/data/auto_augment.py, the 'inc1' set) with timm's
# *_level_to_arg at level = magnitude / 10 (_LEVEL_DENOM): name -> (level -> argument, op(img,
# argument, **geometry)). On PIL images the ops are the very PIL calls timm makes
# (tests/test_presets.py compares them).
RAND_INCREASING = {
    "AutoContrast": (lambda lv: None, lambda x, a, **g: TF.autocontrast(x)),
    "Equalize": (lambda lv: None, lambda x, a, **g: TF.equalize(x)),
    "Invert": (lambda lv: None, lambda x, a, **g: TF.invert(x)),
    # +-30 deg at level 1
    "Rotate": (lambda lv: _negate(30 * lv), lambda x, a, **g: TF.rotate(x, a, **g)),
    "PosterizeIncreasing": (
        lambda lv: 4 - int(4 * lv),  # keep 4 .. 0 bits (0: black; PIL now refuses 0 bits)
        lambda x, a, **g: TF.posterize(x, a) if a else TF.adjust_brightness(x, 0.0)),
    # invert >= 256 .. 0
    "SolarizeIncreasing": (lambda lv: 256 - int(256 * lv), lambda x, a, **g: TF.solarize(x, a)),
    # + 0 .. 110 below 128
    "SolarizeAdd": (lambda lv: int(110 * lv), lambda x, a, **g: solarize_add(x, a)),
    "ColorIncreasing": (_enhance, lambda x, a, **g: TF.adjust_saturation(x, a)),
    "ContrastIncreasing": (_enhance, lambda x, a, **g: TF.adjust_contrast(x, a)),
    "BrightnessIncreasing": (_enhance, lambda x, a, **g: TF.adjust_brightness(x, a)),
    "SharpnessIncreasing": (_enhance, lambda x, a, **g: TF.adjust_sharpness(x, a)),
    # PIL's (1, a, 0, 0, 1, 0): about the corner
    "ShearX": (lambda lv: _negate(0.3 * lv), lambda x, a, **g: TF.affine(
        x, 0.0, [0.0, 0.0], 1.0, [math.degrees(math.atan(a)), 0.0], center=[0, 0], **g)),
    "ShearY": (lambda lv: _negate(0.3 * lv), lambda x, a, **g: TF.affine(
        x, 0.0, [0.0, 0.0], 1.0, [0.0, math.degrees(math.atan(a))], center=[0, 0], **g)),
    # PIL's (1, 0, a W, 0, 1, 0)
    "TranslateXRel": (lambda lv: _negate(0.45 * lv), lambda x, a, **g: TF.affine(
        x, 0.0, [-a * TF.get_size(x)[1], 0.0], 1.0, [0.0, 0.0], **g)),
    "TranslateYRel": (lambda lv: _negate(0.45 * lv), lambda x, a, **g: TF.affine(
        x, 0.0, [0.0, -a * TF.get_size(x)[0]], 1.0, [0.0, 0.0], **g)),
}


def rand_augment(img, n=2, m=9.0, mstd=0.5, p=0.5, fill=(124, 116, 104)):
    """timm's rand-m9-mstd0.5-inc1 ("RandAug (9, 0.5)": MAE, LUT Table D; SemanticMIM's configs'
    timm_increasing): n ops drawn with replacement, each applied with p 0.5 at a magnitude ~ N(m,
    mstd) clipped to [0, 10]; geometric ops bicubic (MAE's interpolation) and filled with the mean
    colour (timm's img_mean). torchvision's RandAugment(2, 9) divides the magnitude into 31 bins and
    always applies both ops: about a third as strong."""
    ops = list(RAND_INCREASING.values())
    for i in torch.randint(len(ops), (n,)).tolist():
        if torch.rand(()) < p:
            level = min(max(float(torch.normal(m, mstd, ())), 0.0), 10.0) / 10
            img = ops[i][1](img, ops[i][0](level), interpolation=T.InterpolationMode.BICUBIC,
                            fill=list(fill))
    return img


def transforms(args):
    """Train: RRC (0.08, 1) bicubic + flip + timm's RandAugment (+ colour jitter: SemanticMIM's
    MaskFeat config) on PIL, or (kamim) resize of the uint8 image to img x img + TrivialAugmentWide;
    then normalised, and RandomErasing filled with noise (timm's mode 'pixel': MAE, LUT,
    SemanticMIM's code), black (KAMIM: before normalisation) or the mean. Val, uint8 (evaluate
    normalises it on the device): resize img * 256/224 + centre crop, or kamim's resize."""
    mean, std = args.mean, args.std
    interpolation = T.InterpolationMode.BICUBIC if args.antialias else T.InterpolationMode.BILINEAR
    # KAMIM's code: v2.Resize((192, 192), antialias=False) on uint8
    resize = v2.Resize(args.img_size, interpolation, antialias=args.antialias)
    if args.trivial:
        aug = [data.to_uint8(len(mean)), resize, T.TrivialAugmentWide(),
               v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    else:
        # brightness, contrast, saturation
        jitter = [T.ColorJitter(*[args.color_jitter] * 3)] if args.color_jitter else []
        # timm's img_mean; RandAugment sees RGB
        fill = [round(255 * m) for m in mean] * (3 // len(mean))
        aug = [data.crop_flip(args.img_size)] + \
            ([functools.partial(rand_augment, fill=fill)] if args.randaug else []) + \
            jitter + [data.normalize(mean, std)]
    value = {"noise": "random", "mean": 0.0,
             "black": [-m / s for m, s in zip(mean, std)]}[args.erase_fill]
    # KAMIM; timm
    erase = [T.RandomErasing(args.reprob, scale=(0.02, 0.33 if args.trivial else 1 / 3),
                             ratio=(0.3, 3.3), value=value)]
    val = (data.center_crop(args.img_size, mean, std, uint8=True) if args.eval_resize == "crop"
           else T.Compose([data.to_uint8(len(mean)), resize]))
    return T.Compose(aug + (erase if args.reprob else [])), val  # train: float, normalised


def mix_batch(num_classes, mixup, cutmix):
    """MixUp (alpha mixup) or CutMix (alpha cutmix), 50/50 per batch -> soft labels (B, K)."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
    return v2.RandomChoice(ops) if ops else None


# ---- training ----

def train(args):
    rank, world, device = run.setup(args.seed)
    micro, accum = run.batch_split(args.batch_size, world, args.micro_batch)
    lr = args.blr * args.batch_size / args.ref_batch  # linear scaling rule
    train_tf, val_tf = transforms(args)
    ds = data.Seeded(data.dataset(args.data, "train", labelled=True), train_tf, args.seed)
    classes = ds.base.classes  # one class map: train's
    val_ds = data.Seeded(data.dataset(args.data, "val", labelled=True, classes=classes), val_tf)
    model = build(args, len(classes)).to(device)
    # layer decay; no weight decay on biases, norms, tokens, positions (MAE's rule)
    groups = vit.param_groups(model, args.weight_decay, layer_decay=args.layer_decay)
    if not args.decay_exclusions:  # KAMIM's code: weight decay on every parameter
        groups = [dict(g, weight_decay=args.weight_decay) for g in groups]
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(args.betas), fused=device.type == "cuda")
    dl = data.loader(ds, micro, train=True, workers=args.workers, seed=args.seed)
    val_dl = data.loader(val_ds, micro, train=False, workers=args.workers)
    data.set_epoch(val_dl, 0)
    mix = mix_batch(len(classes), args.mixup, args.cutmix)
    per_epoch = len(dl) // accum
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    cooldown = args.cooldown_epochs * per_epoch  # at the floor, after the cosine
    # weights, optimiser, step, RNG
    step = run.resume(args.out, model, opt, args=args, total=total, ds=ds)
    best = run.load_checkpoint(args.out)["best"] if step else 0.0
    if rank == 0:
        run.banner(args, device, world, micro, accum,
                   f"{lr:.3g} (= {args.blr:g} x {args.batch_size}/{args.ref_batch})",
                   per_epoch, total, step)
    net = run.distribute(model, device, args.compile)
    flops = 3 * vit.vit_forward_flops(model.encoder)  # forward + backward (logged TFLOP/s, MFU)
    autocast = run.autocast(device)
    sums, n_log, done, result, t0 = {}, 0, 0, None, time.time()
    t_run = t0
    model.train()
    # prefetched
    for epoch, step, micro_batches in data.train_steps(dl, args.epochs, accum, step, device):
        schedule = run.timm_cosine if args.lr_curve == "timm" else run.cosine
        lr_now = schedule(step, total - cooldown, warmup, lr, args.min_lr, args.warmup_lr)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        for i, (x, y) in enumerate(micro_batches):
            # mix and drop path: a pure function of the step
            torch.manual_seed(hash((args.seed, step, rank, i)))
            x, y = mix(x, y) if mix else (x, y)  # soft labels (B, K)
            with run.no_sync(net, i < accum - 1), autocast:
                loss, terms = net(x, y)
                (loss / accum).backward()
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
                run.report(dict(epoch=epoch, step=step, **vals, lr=lr_now,
                                **run.throughput(n_log * args.batch_size, dt, flops, device),
                                eta=run.eta(total - step, dt / n_log), **run.skipped(ds)),
                           args.out)
            sums, n_log, t0 = {}, 0, time.time()
        if epoch_end or step == total:  # every epoch: the whole val set
            result = run.evaluate(model, val_dl, device, args.mean, args.std)
            best = max(best, result[0])
            if rank == 0:
                run.report(dict(epoch=epoch, step=step, top1=result[0], top5=result[1],
                                best_top1=best, images=result[2]),
                           args.out)
        if step % args.save_every == 0 or epoch_end or stop:
            # never save a bad state
            run.check_finite(sum(sums.values()), step, args.out, model, opt)
            run.share_skips(ds)  # every process's unreadable files, on every rank (a collective)
            if rank == 0:
                run.save_run(args.out, model, opt, step, args, ds, best=best)
        if done == args.max_steps:
            break
    result = result or run.evaluate(model, val_dl, device, args.mean, args.std)
    if rank == 0:
        paper = f"  {args.paper}" if args.paper else ""
        print(f"fine-tuned {args.model} ({args.checkpoint or 'from scratch'}): "
              f"top-1 {result[0]:.2f}  top-5 {result[1]:.2f}  "
              f"best top-1 {max(best, result[0]):.2f}{paper}")
        run.summary(args.out, step, total, time.time() - t_run)
    run.finish(world)
    return result


def parse_args(argv=None):
    p = run.parser(__doc__)
    a = p.add_argument
    a("--data", help="ImageNet folder with train/ and val/ class folders; absent: the demo "
      "(DemoShapes, vit_demo at 64 px, batch 128, 14 epochs of 12 steps, 1 warmup, blr 2e-3 at "
      "128, and off: layer decay, RandAugment, MixUp / CutMix, drop path, erasing (at ln 6 and "
      "chance with them on 1.5k images); the rest is --protocol's)")
    a("--checkpoint", help="encoder checkpoint (ours incl. SemanticMIM's proxies, or MAE / DeiT / "
      "DINO timm layout); absent: from scratch (the DeiT-style baseline)")
    a("--model", choices=list(vit.CONFIGS), help="encoder (default: the checkpoint's, else vit_b; "
      "demo vit_demo)")
    a("--protocol", default="mae", choices=list(PROTOCOLS), help="preset: lut (Table D), mae "
      "(FINETUNE.md; default), kamim (§4.1 + released code), semanticmim (released "
      "maskfeat_cls_ft.py: MaskFeat + Ours, the row of our HOG target), semanticmim_beit "
      "(released beit_cls_ft.py: BEiT + Ours). The paper number printed at the end is "
      "SemanticMIM's Table 1 row of the checkpoint's stored target and proxies (pixels: none), "
      "column by --pool")
    a("--blr", type=float, help="lr at --ref-batch, scaled linearly: lut Table D 5e-4 S / 2.5e-4 "
      "B / 1e-3 L (LUT's FINETUNE.md: 4e-3 at 1024 for B); mae 5e-4 B, 1e-3 L/H; kamim §4.1 5e-3; "
      "semanticmim 8e-3 (maskfeat_cls_ft.py), semanticmim_beit 4e-3 (beit_cls_ft.py)")
    a("--ref-batch", type=int, help="batch --blr refers to: lut/mae 256 (MAE's rule), kamim 2048 "
      "(code), semanticmim 2048 (8 GPUs x 256), semanticmim_beit 1024 (8 x 128)")
    a("--batch-size", type=int, help="GLOBAL batch: lut Table D 1024, mae 1024, kamim 2048 "
      "(code), semanticmim 2048 (maskfeat_cls_ft.py: 8 x 256), semanticmim_beit 1024 "
      "(beit_cls_ft.py: 8 x 128; Table 3's 1024 is the probe's)")
    a("--epochs", type=int, help="lut Table D 300 S / 100 B / 50 L; mae 100 B / 50 L, H; kamim "
      "§4.1 100; semanticmim 100 (configs)")
    a("--warmup-epochs", type=int, help="lut Table D 5; mae 5; kamim §4.1 10; semanticmim 20 "
      "(configs; Table 3's 0 is the probe's)")
    a("--cooldown-epochs", type=int, default=0, help="the last epochs of --epochs at the floor, "
      "after the cosine: 0; KAMIM's released loop runs 10 more (--epochs 110 --cooldown-epochs 10)")
    a("--lr-curve", choices=["fresh", "timm"], help="fresh: linear warmup, then a half-cosine to "
      "--min-lr (MAE, mmpretrain); timm: timm's CosineLRScheduler, one cosine over all epochs, "
      "the warmup overriding its start (kamim: code)")
    a("--warmup-lr", type=float, help="lr the warmup starts from (absolute): 0 (MAE; the configs' "
      "1e-4 x lr); kamim 2.5e-6 (code)")
    a("--min-lr", type=float, help="cosine floor (absolute): 0 (MAE's code min_lr 1e-6 is ~0); "
      "kamim 2.5e-6 (code); semanticmim 1e-6 (configs; Table 3's 0 is the probe's)")
    a("--weight-decay", type=float, help="AdamW: 0.05 in every preset (Table D, FINETUNE.md, "
      "§4.1, configs; Table 3's 1e-4 is the probe's)")
    a("--decay-exclusions", action=argparse.BooleanOptionalAction, help="no weight decay on "
      "biases, norms, [cls] / proxies, positions (MAE, the configs); --no-decay-exclusions: on "
      "every parameter (kamim: code)")
    a("--betas", type=float, nargs=2, help="AdamW betas: (0.9, 0.999) in every preset (Table D, "
      "§4.1, configs)")
    a("--layer-decay", type=float, help="layer-wise lr decay: lut Table D 0.75 S / 0.65 B, L "
      "(LUT's FINETUNE.md: 0.75 for B); mae 0.65 B / 0.75 L, H; kamim 1 (none in §4.1 or code); "
      "semanticmim 0.65 (configs)")
    a("--clip-grad", type=float, help="gradient-norm clip, 0 = none: MAE, configs; kamim 1.0 "
      "(code)")
    a("--drop-path", type=float, help="stochastic depth at the last block, linear from 0 at the "
      "first: lut 0.1; mae 0.1 B / 0.2 L / 0.3 H; kamim 0 (code); semanticmim 0.1 (configs)")
    a("--smoothing", type=float, help="label smoothing: 0.1 (Table D, MAE, configs); kamim 0 "
      "(none in §4.1 or code)")
    a("--mixup", type=float, help="MixUp alpha (0 = off): 0.8 (Table D, MAE, configs); kamim 1 "
      "(code)")
    a("--cutmix", type=float, help="CutMix alpha (0 = off): 1.0 in every preset; each batch one "
      "of the two, 50/50")
    a("--randaug", action=argparse.BooleanOptionalAction, help="timm's rand-m9-mstd0.5-inc1 "
      "(rand_augment): Table D 'RandAug (9, 0.5)', MAE, the configs' timm_increasing")
    a("--color-jitter", type=float, help="ColorJitter brightness = contrast = saturation after "
      "RandAugment (0 = off): semanticmim 0.4 (maskfeat_cls_ft.py); 0 elsewhere (timm turns it "
      "off under RandAugment)")
    a("--trivial", action=argparse.BooleanOptionalAction, help="kamim §4.1.1: resize + "
      "TrivialAugmentWide instead of RRC + RandAugment")
    a("--antialias", action=argparse.BooleanOptionalAction, help="kamim's resize (train and val) "
      "bicubic with antialiasing; --no-antialias: bilinear without, on uint8 (kamim: code's "
      "v2.Resize((192, 192), antialias=False))")
    a("--reprob", type=float, help="RandomErasing p: 0.25 (MAE's code, configs; not in Table D), "
      "kamim §4.1.1 0.5")
    a("--erase-fill", choices=["noise", "black", "mean"], help="what RandomErasing paints: noise, "
      "N(0, 1) per pixel after normalisation (timm's mode 'pixel': MAE's and LUT's code; the "
      "configs' mode 'rand'); black (kamim §4.1.1 and code: erasing before normalisation); mean "
      "(0 after normalisation)")
    a("--pool", choices=["avg", "cls"], help="avg: patch mean (lut/mae: MAE's global_pool; kamim "
      "§4.1; the SemanticMIM configs' avg_featmap, Table 1 'FT Patch'); cls: the prefix tokens "
      "(semanticmim: Table 1 'FT CLS', the 8 proxies averaged; no released config runs it)")
    a("--final-norm", action=argparse.BooleanOptionalAction, help="pool the tokens after the "
      "encoder's final LayerNorm: kamim (code: the mean of Hugging Face's last_hidden_state) and "
      "cls (MAE); default off for avg (MAE's global_pool)")
    a("--fc-norm", action=argparse.BooleanOptionalAction, help="a new LayerNorm on the pooled "
      "vector: default on for avg without --final-norm (MAE's fc_norm; the configs' avg_featmap), "
      "off otherwise (kamim's one Linear)")
    a("--head-std", type=float, help="the head's trunc-normal init std: 2e-5 (MAE; "
      "maskfeat_cls_ft.py), semanticmim_beit 0.02 (beit_cls_ft.py)")
    a("--proxies", default="keep", choices=["keep", "drop"], help="SemanticMIM's proxies at "
      "fine-tuning: keep all as prefix tokens (§3.3: only the reconstruction modules are "
      "discarded) or drop to the first one (released config: num_cls_tokens=1)")
    a("--eval-resize", choices=["crop", "full"], help="val: crop = resize img*256/224 + centre "
      "crop (MAE, LUT, configs); full = resize to img x img (kamim §4.1.1)")
    a("--img-size", type=data.image_size, help="224 (Table D, MAE, configs); kamim 192 (§4.1.1)")
    run.shared_flags(p, out="runs/finetune", micro_batch=256, in_chans=None)
    args = p.parse_args(argv)
    run.encoder_flags(args)
    args.model = args.model or ("vit_b" if args.data else "vit_demo")
    base = dict(min_lr=0.0, warmup_lr=0.0, lr_curve="fresh", clip_grad=0.0, decay_exclusions=True,
                randaug=False, color_jitter=0.0, trivial=False, antialias=True, erase_fill="noise",
                head_std=2e-5, eval_resize="crop")
    preset = {**base, **PROTOCOLS[args.protocol]}
    if not args.data:  # the demo overrides only DEMO's values (--help says which)
        preset.update(DEMO)
    preset.setdefault("workers", 8)
    for k, v in preset.items():
        if getattr(args, k) is None:
            # demo: B's
            v = (v.get(args.model, v.get("vit_b") if args.model == "vit_demo" else None)
                 if isinstance(v, dict) else v)
            if v is None:
                p.error(f"--protocol {args.protocol} gives no --{k.replace('_', '-')} for "
                        f"{args.model}: pass it")
            setattr(args, k, v)
    # MAE: [cls] after the norm
    args.final_norm = args.pool == "cls" if args.final_norm is None else args.final_norm
    # global_pool
    args.fc_norm = (args.pool == "avg" and not args.final_norm if args.fc_norm is None
                    else args.fc_norm)
    # printed beside ours
    args.paper = paper_top1(args, vit.checkpoint_args(args.checkpoint)) if args.data else None
    run.check_flags(p, args)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    if args.data and not os.path.isdir(args.data):
        p.error(f"--data {args.data} is not a folder")
    if any(s % vit.CONFIGS[args.model]["patch_size"] for s in args.img_size):
        p.error(f"--img-size {args.img_size} is not a multiple of {args.model}'s patch size")
    if not 0 < args.layer_decay <= 1 or not 0 <= args.drop_path < 1 or args.blr <= 0:
        p.error("need 0 < --layer-decay <= 1, 0 <= --drop-path < 1, --blr > 0")
    if args.cooldown_epochs < 0 or not 0 <= args.warmup_epochs < args.epochs - args.cooldown_epochs:
        p.error("need --cooldown-epochs >= 0 and --warmup-epochs in "
                "[0, --epochs - --cooldown-epochs)")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
