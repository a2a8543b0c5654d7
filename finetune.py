"""End-to-end fine-tuning of a pretrained (or random) ViT plus a linear head, under each paper's protocol.

    torchrun --nproc_per_node=8 finetune.py --checkpoint runs/lut/checkpoint.pt --model vit_b --data /imagenet --protocol lut
    python finetune.py                                    # CPU demo: vit_demo from scratch on DemoShapes
    python finetune.py --checkpoint runs/kamim/checkpoint.pt      # the demo from `python kamim.py`'s checkpoint

Presets (--protocol) set only what each paper states; every flag overrides its preset:
  lut          LUT Table D (MAE's code for what Table D leaves out: random erasing 0.25, avg pool + fc_norm)
  mae          MAE FINETUNE.md (blr 5e-4, layer decay 0.65 for ViT-B, 100 epochs; 0.75 / 50 for L, H)
  kamim        KAMIM §4.1 + its fine-tuning augmentation (resize 192, TrivialAugment, RandomErasing 0.5)
  semanticmim  SemanticMIM App. E Table 3 (BEiT's recipe, read with the released config beit_cls_ft.py)
"""
import argparse
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

# value: (setting, source). Keys are argparse dests. "blr" is the lr at ref_batch, scaled linearly.
PROTOCOLS = {
    "lut": dict(blr={"vit_s": 5e-4, "vit_b": 2.5e-4, "vit_l": 1e-3}, ref_batch=256, batch_size=1024, weight_decay=0.05,
                betas=(0.9, 0.999), layer_decay={"vit_s": 0.75, "vit_b": 0.65, "vit_l": 0.65}, warmup_epochs=5,
                epochs={"vit_s": 300, "vit_b": 100, "vit_l": 50}, randaug=True, smoothing=0.1, mixup=0.8, cutmix=1.0,
                drop_path=0.1, img_size=224, reprob=0.25, pool="avg"),  # Table D; reprob, pool: MAE's code
    "mae": dict(blr={"vit_b": 5e-4, "vit_l": 1e-3, "vit_h": 1e-3}, ref_batch=256, batch_size=1024, weight_decay=0.05,
                betas=(0.9, 0.999), layer_decay={"vit_b": 0.65, "vit_l": 0.75, "vit_h": 0.75}, warmup_epochs=5,
                epochs={"vit_b": 100, "vit_l": 50, "vit_h": 50}, randaug=True, smoothing=0.1, mixup=0.8, cutmix=1.0,
                drop_path={"vit_b": 0.1, "vit_l": 0.2, "vit_h": 0.3}, img_size=224, reprob=0.25, pool="avg"),  # FINETUNE.md
    # KAMIM §4.1: AdamW with pretraining's wd 0.05 / betas, lr 5e-3, cosine 100 epochs incl. 10 warmup, avg pool + one
    # Linear; its augmentation (§4.1.1): resize 192, TrivialAugment, erasing 0.5, MixUp or CutMix. Batch 2048 and
    # alpha 1 are the released code's (the paper gives none); no layer decay or drop path there either.
    "kamim": dict(blr=5e-3, ref_batch=2048, batch_size=2048, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=1.0,
                  warmup_epochs=10, epochs=100, trivial=True, smoothing=0.0, mixup=1.0, cutmix=1.0, drop_path=0.0,
                  img_size=192, reprob=0.5, pool="avg", fc_norm=False, eval_resize="full"),
    # SemanticMIM App. E Table 3 (garbled in the text: epochs 100, batch 1024, lr 4e-3, drop path 0.1 legible); the rest
    # from its released beit_cls_ft.py: layer decay 0.65, wd 0.05, 20 warmup, RandAugment, erasing 0.25, mixup/cutmix.
    "semanticmim": dict(blr=4e-3, ref_batch=1024, batch_size=1024, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.65,
                        warmup_epochs=20, epochs=100, randaug=True, smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1,
                        img_size=224, reprob=0.25, pool="cls", min_lr=1e-6),
}
PAPER = {"lut": ("LUT Table 1", {"vit_s": 82.0, "vit_b": 84.2, "vit_l": 86.0}), "mae": ("MAE FINETUNE.md", {"vit_b": 83.6, "vit_l": 85.9}),
         "kamim": ("KAMIM Table 1", {"vit_t": 70.41, "vit_s": 77.02, "vit_b": 77.30}),
         "semanticmim": ("SemanticMIM Table 1 (BEiT + Ours, FT CLS)", {"vit_b": 83.0})}

# the demo (no --data) overrides only these: on 1.5k images no regulariser (the loss stayed at ln 6 with them)
DEMO = dict(img_size=64, batch_size=128, ref_batch=128, blr=2e-3, epochs=14, warmup_epochs=1, layer_decay=1.0,
            randaug=False, mixup=0.0, cutmix=0.0, drop_path=0.0, reprob=0.0, workers=1)


# ---- the model ----

class Classifier(nn.Module):
    """Encoder -> pool -> (LayerNorm) -> Linear. pool "avg": mean of the patch tokens before the encoder's final
    norm, then fc_norm (MAE's global_pool); "cls": the prefix tokens after the final norm (mean over several proxies)."""
    def __init__(self, encoder, num_classes, pool="avg", fc_norm=True):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6) if fc_norm and pool == "avg" else nn.Identity()
        if pool == "avg":  # MAE's global pool deletes the final norm (fc_norm takes its place): a parameter that
            encoder.norm = nn.Identity()  # gets no gradient stops DDP at the second step
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head
        nn.init.zeros_(self.head.bias)

    def logits(self, img):
        P = self.encoder.num_prefix
        if self.pool == "avg":
            z = self.fc_norm(self.encoder(img, norm=False)[:, P:].mean(1))  # (B, D)
        else:
            z = self.encoder(img)[:, :P].mean(1)
        return self.head(z)

    def forward(self, img, target):
        """target: labels (B,) or soft labels (B, K) after MixUp / CutMix."""
        loss = F.cross_entropy(self.logits(img).float(), target, label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach()}

    smoothing = 0.0


def build(args, num_classes):
    enc = vit.build_encoder(args.model, args.img_size, args.checkpoint, args.in_chans)  # strict load
    model = vit.vit(args.model, args.img_size, in_chans=args.in_chans, prefix_tokens=enc.num_prefix,
                    drop_path=args.drop_path, learned_pos=True)  # MAE fine-tunes pos_embed
    if args.checkpoint:
        vit.load_encoder(model, enc.state_dict())
    if args.proxies == "drop" and model.num_prefix > 1:  # released config: num_cls_tokens=1 (the first proxy kept)
        model.cls_token = nn.Parameter(model.cls_token.data[:, :1].clone())
    clf = Classifier(model, num_classes, args.pool, args.fc_norm)
    clf.smoothing = args.smoothing
    return clf


# ---- data ----

def transforms(args):
    """Train: RRC (0.08, 1) bicubic + flip + RandAugment (2 ops, magnitude 9: timm's rand-m9-mstd0.5-inc1 also draws
    each magnitude from N(9, 0.5) and uses the 'increasing' op set, torchvision's does neither) + RandomErasing;
    kamim: resize to img x img + TrivialAugmentWide. Eval: resize 256/224 x + centre crop, or (kamim) resize only."""
    mean, std = args.mean, args.std
    if args.trivial:
        aug = [T.Resize(args.img_size, interpolation=T.InterpolationMode.BICUBIC), T.TrivialAugmentWide()]
    else:
        aug = [data.crop_flip(args.img_size)] + ([T.RandAugment(2, 9)] if args.randaug else [])
    erase = [T.RandomErasing(args.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3))] if args.reprob else []
    train = T.Compose(aug + [data.normalize(mean, std)] + erase)
    val = data.center_crop(args.img_size, mean, std, uint8=True) if args.eval_resize == "crop" else \
        T.Compose([T.Resize(args.img_size, interpolation=T.InterpolationMode.BICUBIC), data.to_uint8(len(mean))])
    return train, val  # train: float (RandomErasing erases to the mean); val: uint8, evaluate normalises it on the device


def mix_batch(num_classes, mixup, cutmix):
    """MixUp (alpha mixup) or CutMix (alpha cutmix) per batch with equal probability -> soft labels (B, K)."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
    return v2.RandomChoice(ops) if ops else None


# ---- training ----

def train(args):
    rank, world, device = run.setup(args.seed)
    train_ds = data.dataset(args.data, "train", labelled=True)
    val_ds = data.dataset(args.data, "val", labelled=True, classes=train_ds.classes)  # one class map: train's
    K = len(train_ds.classes)
    model = build(args, K).to(device)
    micro, accum = run.batch_split(args.batch_size, world, args.micro_batch)
    lr = args.blr * args.batch_size / args.ref_batch  # linear scaling rule
    groups = vit.param_groups(model, args.weight_decay, layer_decay=args.layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(args.betas), fused=device.type == "cuda")
    train_tf, val_tf = transforms(args)
    ds = data.Seeded(train_ds, train_tf, args.seed)
    dl = data.loader(ds, micro, train=True, workers=args.workers, seed=args.seed)
    val_dl = data.loader(data.Seeded(val_ds, val_tf), micro, train=False, workers=args.workers)
    data.set_epoch(val_dl, 0)
    mix = mix_batch(K, args.mixup, args.cutmix)
    per_epoch = len(dl) // accum
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    step = run.resume(args.out, model, opt, args=args, total=total, ds=train_ds)  # weights, optimiser, step, RNG
    best = run.load_checkpoint(args.out)["best"] if step else 0.0
    if rank == 0:
        run.banner(args, device, world, micro, accum, f"{lr:.3g} (= {args.blr:g} x {args.batch_size}/"
                   f"{args.ref_batch})", per_epoch, total, step)
    net = run.distribute(model, device, args.compile)
    flops, autocast = 3 * vit.vit_forward_flops(model.encoder), run.autocast(device)
    sums, n_log, done, result, t0 = {}, 0, 0, None, time.time()
    t_run = t0
    model.train()
    for epoch, step, micro_batches in data.train_steps(dl, args.epochs, accum, step, device):  # prefetched
        lr_now = run.cosine(step, total, warmup, lr, final=args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        for i, (x, y) in enumerate(micro_batches):
            torch.manual_seed(hash((args.seed, step, rank, i)))  # mix and drop path: a pure function of the step
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
            run.check_finite(sum(vals.values()), step, args.out)  # any term nan / inf makes the sum so
            dt = time.time() - t0
            if rank == 0:
                run.report(dict(epoch=epoch, step=step, **vals, lr=lr_now,
                                **run.throughput(n_log * args.batch_size, dt, flops, device),
                                eta=run.eta(total - step, dt / n_log), **data.skipped(train_ds)), args.out)
            sums, n_log, t0 = {}, 0, time.time()
        if epoch_end or step == total:  # every epoch: the whole val set
            result = run.evaluate(model, val_dl, device, args.mean, args.std)
            best = max(best, result[0])
            if rank == 0:
                run.report(dict(epoch=epoch, step=step, top1=result[0], top5=result[1], best_top1=best,
                                images=result[2]), args.out)
        if step % args.save_every == 0 or epoch_end or stop:
            run.check_finite(sum(sums.values()), step, args.out, model, opt)  # never save a bad state
            data.share_skips(train_ds)  # every process's unreadable files, on every rank (a collective)
            if rank == 0:
                run.save_run(args.out, model, opt, step, args, train_ds, best=best)
        if done == args.max_steps:
            break
    result = result or run.evaluate(model, val_dl, device, args.mean, args.std)
    if rank == 0:
        name, nums = PAPER.get(args.protocol, (None, {}))
        paper = f"  {name}: {nums[args.model]}" if args.preset and args.model in nums else ""
        print(f"fine-tuned {args.model} ({args.checkpoint or 'from scratch'}): top-1 {result[0]:.2f}  top-5 "
              f"{result[1]:.2f}  best top-1 {max(best, result[0]):.2f}{paper}")
        run.summary(args.out, step, total, time.time() - t_run)
    run.finish(world)
    return result


def parse_args(argv=None):
    p = run.parser(__doc__)
    a = p.add_argument
    a("--data", help="ImageNet folder with train/ and val/ class folders; absent: the demo (DemoShapes, vit_demo at 64 px, "
      "batch 128, 14 epochs of 12 steps, 1 warmup, blr 2e-3 at 128, and off: layer decay, RandAugment, MixUp / CutMix, drop "
      "path, erasing (at ln 6 and chance with them on 1.5k images); the rest is --protocol's)")
    a("--checkpoint", help="encoder checkpoint (ours incl. SemanticMIM's proxies, or MAE / DeiT / DINO timm layout); "
      "absent: from scratch (the DeiT-style baseline)")
    a("--model", choices=list(vit.CONFIGS), help="encoder (default vit_b; demo vit_demo)")
    a("--protocol", default="mae", choices=list(PROTOCOLS), help="preset: lut (Table D), mae (FINETUNE.md; default), "
      "kamim (§4.1), semanticmim (App. E Table 3)")
    a("--blr", type=float, help="lr at --ref-batch, scaled linearly: lut Table D 5e-4 S / 2.5e-4 B / 1e-3 L; mae 5e-4 B, "
      "1e-3 L/H; kamim §4.1 5e-3; semanticmim Table 3 4e-3")
    a("--ref-batch", type=int, help="batch --blr refers to: lut/mae 256 (MAE's rule), kamim 2048 (code), semanticmim 1024")
    a("--batch-size", type=int, help="GLOBAL batch: lut Table D 1024, mae 1024, kamim 2048 (code), semanticmim Table 3 1024")
    a("--epochs", type=int, help="lut Table D 300 S / 100 B / 50 L; mae 100 B / 50 L, H; kamim §4.1 100; semanticmim 100")
    a("--warmup-epochs", type=int, help="lut Table D 5; mae 5; kamim §4.1 10; semanticmim 20 (released config)")
    a("--min-lr", type=float, help="cosine floor: 0 (MAE's code min_lr 1e-6 is ~0); semanticmim 1e-6 (config)")
    a("--weight-decay", type=float, help="AdamW: 0.05 in every preset (Table D, FINETUNE.md, §4.1, config)")
    a("--betas", type=float, nargs=2, help="AdamW betas: (0.9, 0.999) in every preset (Table D, §4.1, Table 3)")
    a("--layer-decay", type=float, help="layer-wise lr decay: lut Table D 0.75 S / 0.65 B, L; mae 0.65 B / 0.75 L, H; "
      "kamim 1 (none said); semanticmim 0.65 (config)")
    a("--drop-path", type=float, help="stochastic depth at the last block, linear from 0 at the first: lut 0.1; mae 0.1 B "
      "/ 0.2 L / 0.3 H; kamim 0; semanticmim 0.1")
    a("--smoothing", type=float, help="label smoothing: 0.1 (Table D, MAE, BEiT); kamim 0 (none said)")
    a("--mixup", type=float, help="MixUp alpha (0 = off): 0.8 (Table D, MAE, BEiT); kamim 1 (code)")
    a("--cutmix", type=float, help="CutMix alpha (0 = off): 1.0 in every preset; each batch one of the two, 50/50")
    a("--randaug", action=argparse.BooleanOptionalAction, help="RandAugment(2, 9) ~ rand-m9-mstd0.5 (Table D 'RandAug (9, 0.5)')")
    a("--trivial", action=argparse.BooleanOptionalAction, help="kamim §4.1.1: resize + TrivialAugmentWide instead of RRC + RandAugment")
    a("--reprob", type=float, help="RandomErasing p: 0.25 (MAE's code, not in Table D), kamim §4.1.1 0.5")
    a("--pool", choices=["avg", "cls"], help="avg: patch mean (lut/mae: MAE's global_pool; kamim §4.1); cls: the prefix "
      "tokens after the final norm (semanticmim: Table 1 'FT CLS', the 8 proxies averaged)")
    a("--fc-norm", action=argparse.BooleanOptionalAction, help="LayerNorm on the pooled vector (MAE; off for kamim's one Linear)")
    a("--proxies", default="keep", choices=["keep", "drop"], help="SemanticMIM's proxies at fine-tuning: keep all as prefix "
      "tokens (§3.3: only the reconstruction modules are discarded) or drop to the first one (released config: num_cls_tokens=1)")
    a("--eval-resize", choices=["crop", "full"], help="val: crop = resize img*256/224 + centre crop (MAE, LUT, BEiT); "
      "full = resize to img x img (kamim §4.1.1)")
    a("--clip-grad", type=float, default=0.0, help="gradient-norm clip; 0 = none (MAE, Table 3)")
    a("--img-size", type=data.image_size, help="224 (Table D, MAE, Table 3); kamim 192")
    run.shared_flags(p, out="runs/finetune", micro_batch=256)
    args = p.parse_args(argv)
    args.preset = args.data is not None
    args.model = args.model or ("vit_b" if args.data else "vit_demo")
    preset = {**dict(min_lr=0.0, randaug=False, trivial=False, fc_norm=True, eval_resize="crop"), **PROTOCOLS[args.protocol]}
    if not args.data:  # the demo overrides only DEMO's values (--help says which)
        preset.update(DEMO)
    preset.setdefault("workers", 8)
    for k, v in preset.items():
        if getattr(args, k) is None:
            v = v.get(args.model, v.get("vit_b") if args.model == "vit_demo" else None) if isinstance(v, dict) else v  # demo: B's
            if v is None:
                p.error(f"--protocol {args.protocol} gives no --{k.replace('_', '-')} for {args.model}: pass it")
            setattr(args, k, v)
    run.check_flags(p, args)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    if args.data and not os.path.isdir(args.data):
        p.error(f"--data {args.data} is not a folder")
    if any(s % vit.CONFIGS[args.model]["patch_size"] for s in args.img_size):
        p.error(f"--img-size {args.img_size} is not a multiple of {args.model}'s patch size")
    if not 0 < args.layer_decay <= 1 or not 0 <= args.drop_path < 1 or args.blr <= 0:
        p.error("need 0 < --layer-decay <= 1, 0 <= --drop-path < 1, --blr > 0")
    if not 0 <= args.warmup_epochs < args.epochs:
        p.error("--warmup-epochs must lie in [0, --epochs)")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
