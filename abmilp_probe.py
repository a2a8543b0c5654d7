"""Linear probing of a frozen ViT with [cls], average or AbMILP pooling, and the attention
statistics of "Beyond [cls]: exploring the true potential of Masked Image Modeling
representations" (§4, §5, App. A-B).

    torchrun --nproc_per_node=8 abmilp_probe.py --checkpoint CKPT --model vit_b --data /imagenet \
        --pool abmilp
    python abmilp_probe.py  # demo: random-init vit_demo on DemoShapes, every pooling side by side

The encoder is frozen and in eval mode; only the head trains: [pool] -> BatchNorm1d(no affine) ->
Linear (MAE's linear probe; SemanticMIM's code: a frozen fresh LayerNorm; KAMIM's: no norm). AbMILP
(eq. 6) scores each patch token with t: D -> 1 and sums the patch tokens weighted by the softmax of
the scores. `--protocol` selects the probe each paper's numbers came from (mae: Beyond [cls], MAE,
LUT; kamim: KAMIM App. A; semanticmim: SemanticMIM §4). `--attention-stats` writes the four
per-block statistics of §4 instead of training.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.utils import save_image

import data
import probe_cache
import run
import vit


# ---- paper pieces ----

def abmilp_pool(z, scores):
    # eq. 6: s_i = exp(t(z_i)) / sum_j exp(t(z_j)) over the N patch tokens ([cls] excluded);
    # pooled = sum_i s_i z_i
    s = scores.float().softmax(dim=-1)  # (B, N), non-negative, sums to 1 per image
    return (s.unsqueeze(-1) * z.float()).sum(1), s  # (B, D), (B, N)


def attention_entropy(a):
    # eq. 5: Shannon entropy (natural log) of attention rows renormalised over the keys given:
    # (..., N) -> (...)
    a = a / a.sum(-1, keepdim=True)
    return -torch.special.xlogy(a, a).sum(-1)  # 0 log 0 = 0; ln N for a uniform row


def attention_stats(attn, P=1):
    # §4: per image, averaged over heads and queries: [cls] to itself (raw a_00), entropy of [cls]
    # over the patches (eq. 5), a patch's self-attention relative to all patches, entropy of
    # patch-to-patch attention.
    """attn (B, h, P + N, P + N) softmax weights, rows = queries, P prefix tokens first -> (B, 4).
    With several prefix tokens (SemanticMIM's proxies) the [cls] statistics average over them."""
    cls_self = attn[:, :, :P, :P].diagonal(dim1=-2, dim2=-1).mean((1, 2))  # not renormalised
    cls_entropy = attention_entropy(attn[:, :, :P, P:]).mean((1, 2))
    pp = attn[:, :, P:, P:]  # (B, h, N, N) patch queries to patch keys
    patch_self = (pp.diagonal(dim1=-2, dim2=-1) / pp.sum(-1)).mean((1, 2))
    patch_entropy = attention_entropy(pp).mean((1, 2))
    return torch.stack([cls_self, cls_entropy, patch_self, patch_entropy], dim=1)


@torch.no_grad()
def knn_classify(query, bank, bank_labels, num_classes, k=20, T=0.07, chunk=65536):
    # DINO's weighted kNN (eval_knn.py): cosine similarity to every bank feature, the k nearest vote
    # for their class with weight exp(sim / T). query (Q, D), bank (M, D) any dtype, labels (M,) ->
    # class votes (Q, K). The bank is read `chunk` rows at a time, keeping the running top-k:
    # memory Q x (chunk + k), never Q x M (ImageNet's 1.9 GiB fp16 bank: 0.1 GiB chunks).
    q = F.normalize(query.float(), dim=1)
    sims, labels = q.new_empty(len(q), 0), bank_labels.new_empty(len(q), 0)
    for i in range(0, len(bank), chunk):
        s = q @ F.normalize(bank[i:i + chunk].to(q), dim=1).T  # (Q, chunk) cosine similarities
        sims, labels = (torch.cat([sims, s], 1),
                        torch.cat([labels, bank_labels[i:i + chunk].expand(len(q), -1)], 1))
        sims, top = sims.topk(min(k, sims.shape[1]), dim=1)  # the running k nearest (Q, k)
        labels = labels.gather(1, top)
    return q.new_zeros(len(q), num_classes).scatter_add_(1, labels, (sims / T).exp())


STATS = ("cls_self", "cls_entropy", "patch_self_rel", "patch_entropy")


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's util/lars.py: tensors with ndim > 1 get weight decay and the
    trust ratio eta ||w|| / ||g + wd w||; biases (and norms) plain momentum SGD.
    mu <- m mu + g'; w <- w - lr mu."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where((w_norm > 0) & (u_norm > 0),
                                    g["trust_coefficient"] * w_norm / u_norm,
                                    torch.ones_like(w_norm))
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


# ---- the probe ----

class Probe(nn.Module):
    """Frozen encoder -> tokens of block `block` -> pool -> norm -> Linear. head_norm "bn" (MAE),
    "ln" (SemanticMIM's released probe: avg_featmap's fresh ln2, frozen) or "none" (KAMIM); pool
    "cls" (the prefix tokens, combined by proxy_pool), "avg" (the patch tokens' mean) or "abmilp"
    (eq. 6; t one Linear, or App. B.2's 2-layer MLP with tanh / relu)."""
    def __init__(self, encoder, num_classes, pool="abmilp", block=None, final_norm=False,
                 head_norm="bn", proxy_pool="mean", t="linear"):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        (self.pool, self.block,
         self.final_norm, self.proxy_pool) = pool, block, final_norm, proxy_pool
        D, P = encoder.dim, encoder.num_prefix
        # App. B.2, Table 3: linear 71.58 (adopted), MLP + tanh 68.70, MLP + ReLU 71.65
        if pool == "abmilp":
            act = nn.Tanh() if t == "tanh" else nn.ReLU()
            self.t = (nn.Linear(D, 1) if t == "linear" else
                      nn.Sequential(nn.Linear(D, D), act, nn.Linear(D, 1)))
        width = D * P if pool == "cls" and proxy_pool == "concat" else D
        self.norm = (
            nn.BatchNorm1d(width, affine=False, eps=1e-6) if head_norm == "bn" else
            nn.LayerNorm(width, eps=1e-6, elementwise_affine=False) if head_norm == "ln" else
            nn.Identity())
        self.fc = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # MAE re-initialises the head this way
        nn.init.zeros_(self.fc.bias)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # always: the probe never updates the encoder's behaviour (mae#54)
        return self

    @torch.no_grad()
    def features(self, img):
        """(B, C, H, W) -> tokens (B, P + N, D) after `block` (final LayerNorm if final_norm)."""
        return self.encoder(img, upto=self.block, norm=self.final_norm)

    def pooled(self, tokens):
        """(B, P + N, D) -> (B, D') and the patch weights (B, N) (None for cls / avg)."""
        P = self.encoder.num_prefix
        if self.pool == "abmilp":
            return abmilp_pool(tokens[:, P:], self.t(tokens[:, P:]).squeeze(-1))
        if self.pool == "avg":
            return tokens[:, P:].mean(1), None
        # (B, P, D): [cls], or SemanticMIM's proxies (the paper never says how to combine them)
        cls = tokens[:, :P]
        return {"mean": cls.mean(1), "first": cls[:, 0],
                "concat": cls.flatten(1)}[self.proxy_pool], None

    def logits(self, x):
        """Normalised images (B, C, H, W) or cached tokens (B, P + N or P + 1, D) -> (B, K)."""
        tokens = self.features(x) if x.ndim == 4 else x.float()
        return self.fc(self.norm(self.pooled(tokens)[0].float()))

    def forward(self, x, y):
        loss = F.cross_entropy(self.logits(x).float(), y)
        return loss, {"loss": loss.detach()}

    def state_dict(self, *args, prefix="", **kw):
        """The head only: not the frozen encoder (--checkpoint's, or a seeded random init)."""
        sd = super().state_dict(*args, prefix=prefix, **kw)
        for k in [k for k in sd if k.startswith(prefix + "encoder.")]:
            del sd[k]
        return sd

    def load_state_dict(self, state, strict=True, assign=False):
        missing, unexpected = super().load_state_dict(state, strict=False, assign=assign)
        if strict and (unexpected or not all(k.startswith("encoder.") for k in missing)):
            raise ValueError(f"not this probe's head: missing {missing}, unexpected {unexpected}")
        return missing, unexpected


def count_params(model):
    """Trainable parameters. The paper (§5) writes D(K+1) + D + 1 with AbMILP; the head really has
    K(D+1) (+ D + 1 for t): D and K are swapped in the paper's classifier count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- data hook ----

def transforms(img_size, protocol="mae", mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """(train, val): PIL -> uint8 (C, H, W), normalised on device. MAE's probe: RandomResizedCrop
    (0.08, 1) bicubic + flip; val resize 256/224 x, centre crop. KAMIM's (App. A, its fine-tuning
    augmentation, on uint8 as its code): v2.Resize((img, img), antialias=False), TrivialAugmentWide,
    RandomErasing p 0.5 to black (§4.1.1); val the same resize; MixUp / CutMix: mix_batch."""
    u8, size = data.to_uint8(len(mean)), data.image_size(img_size)
    if protocol != "kamim":
        return (T.Compose([data.crop_flip(img_size), u8]),
                data.center_crop(img_size, mean, std, uint8=True))
    resize = v2.Resize(size, antialias=False)  # bilinear, no antialiasing: KAMIM's code
    return (T.Compose([u8, resize, T.TrivialAugmentWide(), T.RandomErasing(p=0.5, value=0)]),
            T.Compose([u8, resize]))


def normalized(x, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """A batch as the encoder takes it: uint8 images (B, C, H, W) normalised on their device; float
    images and cached tokens as they are."""
    return data.normalize_batch(x, mean, std) if x.dtype == torch.uint8 else x


def mix_batch(num_classes):
    """KAMIM App. A (released code: torchvision's, alpha 1): per batch, MixUp or CutMix with equal
    probability. (x (B, C, H, W), y (B,)) -> (mixed x, soft labels (B, K))."""
    return v2.RandomChoice([v2.MixUp(alpha=1.0, num_classes=num_classes),
                            v2.CutMix(alpha=1.0, num_classes=num_classes)])


@torch.no_grad()
def save_scores(model, imgs, path, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """Fig. 8: the images, and below them weighted by the patch scores (AbMILP's s; for cls / avg
    the head-mean [cls] attention of the probed block, Table 4)."""
    model.eval()
    enc, P = model.encoder, model.encoder.num_prefix
    tokens, attns = enc(imgs, upto=model.block, norm=model.final_norm, return_attn=True)
    s = (model.pooled(tokens)[1] if model.pool == "abmilp"
         else attns[-1][:, :, :P, P:].mean((1, 2)))  # (B, N)
    s = (s / s.amax(1, keepdim=True)).view(-1, 1, *enc.grid)
    heat = F.interpolate(s.float(), size=imgs.shape[-2:], mode="nearest")
    img = data.denormalize(imgs, mean, std).cpu()
    save_image(torch.cat([img, img * (0.3 + 0.7 * heat.cpu())]), path, nrow=len(imgs))
    model.train()


# ---- training ----

def train(args, cache=None):
    """One probe -> (top-1, top-5) on val; `cache`: the dict all pools share (--cache-features)."""
    rank, world, device = run.setup(args.seed)
    # fails before any data
    encoder = vit.build_encoder(args.model, args.img_size, args.checkpoint, args.in_chans)
    train_ds = data.dataset(args.data, "train", labelled=True)
    val_ds = data.dataset(args.data, "val", labelled=True, classes=train_ds.classes)
    model = Probe(encoder, len(train_ds.classes), args.pool, args.block, args.final_norm,
                  args.head_norm, args.proxy_pool, args.abmilp_t).to(device)
    micro, accum = run.batch_split(args.batch_size, world, args.micro_batch)
    lr = args.lr * args.batch_size / args.ref_batch
    train_tf, val_tf = transforms(args.img_size, args.protocol, args.mean, args.std)
    mix = mix_batch(len(train_ds.classes)) if args.mix else None
    if args.cache_features:
        cache = {} if cache is None else cache
        train_shard = probe_cache.cached(args, model, train_ds, val_tf, "train", cache, device)
        val_shard = probe_cache.cached(args, model, val_ds, val_tf, "val", cache, device)
        val_dl = probe_cache.shard_batches(*val_shard, micro)
    else:
        dl = data.loader(data.Seeded(train_ds, train_tf, args.seed), micro, train=True,
                         workers=args.workers, seed=args.seed)
        val_dl = data.loader(data.Seeded(val_ds, val_tf), micro, train=False, workers=args.workers)
        data.set_epoch(val_dl, 0)
    fig_imgs = torch.stack([data.Seeded(val_ds, val_tf)[i][0] for i in range(8)])
    fig_imgs = normalized(fig_imgs.to(device), args.mean, args.std)
    if args.compile:
        model.encoder = torch.compile(model.encoder)
    head = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        opt = LARS(head, weight_decay=args.weight_decay, momentum=args.momentum,
                   trust_coefficient=args.trust)
    else:
        groups = (vit.param_groups(model, args.weight_decay)
                  if args.decay_exclusions else
                  head)
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay,
                                fused=device.type == "cuda")
    # drop_last: each rank the smallest share's steps
    per_epoch = len(train_ds) // world // micro // accum
    if per_epoch == 0:
        raise ValueError(f"{len(train_ds)} images give no full step of {accum} x {micro} "
                         "per process")
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    net = run.distribute(model, device)  # the encoder is frozen: DDP syncs the head's gradients
    step = run.resume(args.out, model, opt, args=args, total=total, ds=train_ds)
    if rank == 0:
        print(f"probe {args.pool}: {len(train_ds.classes)} classes, {count_params(model):,} "
              "trainable parameters", flush=True)
        run.banner(args, device, world, micro, accum,
                   f"{lr:.3g} (= {args.lr:g} x {args.batch_size}/{args.ref_batch})",
                   per_epoch, total, step)
    # forward: frozen
    flops = 0 if args.cache_features else vit.vit_forward_flops(encoder, upto=args.block)
    autocast = run.autocast(device)
    sums, n_log, done, result, t0 = {}, 0, 0, None, time.time()
    t_run = t0
    model.train()
    steps = (probe_cache.cache_steps(*train_shard, micro, accum, per_epoch, args.epochs, step,
                                     args.seed)
             if args.cache_features else
             data.train_steps(dl, args.epochs, accum, step, device))  # prefetched
    for epoch, step, micro_batches in steps:
        schedule = run.timm_cosine if args.lr_curve == "timm" else run.cosine
        lr_now = schedule(step, total, warmup, lr, args.min_lr, args.warmup_lr)  # per step
        for g in opt.param_groups:
            g["lr"] = lr_now
        for i, (x, y) in enumerate(micro_batches):
            x, y = (normalized(x.to(device, non_blocking=True), args.mean, args.std),
                    y.to(device, non_blocking=True))
            x, y = mix(x, y) if mix else (x, y)  # soft labels (B, K) after MixUp / CutMix
            with run.no_sync(net, i < accum - 1), autocast:
                loss, terms = net(x, y)
                (loss / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v / accum
        if args.clip_grad:
            nn.utils.clip_grad_norm_(head, args.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, n_log, done = step + 1, n_log + 1, done + 1
        epoch_end, stop = step % per_epoch == 0, step == total or done == args.max_steps
        if step % args.log_every == 0 or epoch_end or stop:
            vals = run.mean_terms(sums, n_log)  # one sync per log line
            # a collective: every rank stops together
            run.check_finite(sum(vals.values()), step, args.out)
            dt = time.time() - t0
            if rank == 0:
                run.report(dict(epoch=epoch, step=step, **vals, lr=lr_now,
                                **run.throughput(n_log * args.batch_size, dt, flops, device),
                                eta=run.eta(total - step, dt / n_log), **run.skipped(train_ds)),
                           args.out)
            sums, n_log, t0 = {}, 0, time.time()
        if epoch_end or stop:  # the whole val set
            result = run.evaluate(model, val_dl, device, args.mean, args.std, len(val_ds))
            if rank == 0:
                run.report(dict(epoch=epoch, step=step, pool=args.pool, top1=result[0],
                                top5=result[1], images=result[2]), args.out)
        if step % args.save_every == 0 or epoch_end or stop:
            # never save a bad state
            run.check_finite(sum(sums.values()), step, args.out, model, opt)
            run.share_skips(train_ds)  # every rank's unreadable files, on every rank (a collective)
            if rank == 0:
                run.save_run(args.out, model, opt, step, args, train_ds, result=result)
        if epoch_end and rank == 0:
            save_scores(model, fig_imgs, os.path.join(args.out, f"scores_epoch{epoch:03d}.png"),
                        args.mean, args.std)
        if done == args.max_steps:
            break
    if result is None:  # nothing left to train (a finished run resumed): evaluate what was saved
        result = run.evaluate(model, val_dl, device, args.mean, args.std, len(val_ds))
    if rank == 0:
        run.summary(args.out, step, total, time.time() - t_run)
    return result[:2]  # (top-1, top-5)


@torch.no_grad()
def knn(args, cache):
    """--pool knn: knn_classify (--knn-k, --knn-t) of every val image against every train image, on
    block --block's [cls] and average features. Each rank pools its share of each split, gathered
    (fp16) on every rank, and scores its rows of val -> {"knn_cls": (top-1, top-5), "knn_avg"}."""
    rank, world, device = run.setup(args.seed)
    torch.manual_seed(args.seed)  # a random init: the same on every rank (rank 0's, as train())
    model = Probe(vit.build_encoder(args.model, args.img_size, args.checkpoint, args.in_chans),
                  1, "avg", args.block, args.final_norm).to(device)
    P, feats = model.encoder.num_prefix, {}
    val_tf = transforms(args.img_size, args.protocol, args.mean, args.std)[1]
    for split in ("train", "val"):  # val numbered by train's class map
        ds = data.dataset(args.data, split, labelled=True, classes=feats.get("classes"))
        feats["classes"] = ds.classes
        # a shard with no image (fewer val images than processes): one empty batch
        if args.cache_features:
            shard = probe_cache.cached(args, model, ds, val_tf, split, cache, device)
            dl = probe_cache.shard_batches(*shard, args.micro_batch) or [shard]
        else:
            dl = data.loader(data.Seeded(ds, val_tf), args.micro_batch, train=False,
                             workers=args.workers)
            data.set_epoch(dl, 0)
        f, y = [], []
        for x, label in dl:
            x = normalized(x.to(device), args.mean, args.std)
            with run.autocast(device):
                # (B, P + N, D), or (B, P + 1, D) condensed
                t = model.features(x) if x.ndim == 4 else x.float()
            pooled = torch.stack([t[:, :P].mean(1), t[:, P:].mean(1)], 1).half()  # (B, 2, D)
            f.append(pooled), y.append(label.to(device))
        feats[split] = (probe_cache.gather(torch.cat(f), len(ds)),  # (n, 2, D), (n,)
                       probe_cache.gather(torch.cat(y), len(ds)))
    (bank, bank_y), (val, val_y) = feats["train"], feats["val"]
    # an unreadable val file: a placeholder labelled -1, not scored
    results, scored = {}, int((val_y >= 0).sum())
    for j, name in enumerate(("knn_cls", "knn_avg")):
        hits = torch.zeros(2, device=device)
        for i in range(rank * 1024, len(val), world * 1024):
            votes = knn_classify(val[i:i + 1024, j], bank[:, j], bank_y, len(ds.classes),
                                 args.knn_k, args.knn_t)
            top = votes.topk(min(5, votes.shape[1]), dim=1).indices
            hits += torch.stack([(top[:, 0] == val_y[i:i + 1024]).sum(),
                                 (top == val_y[i:i + 1024, None]).any(1).sum()])
        if world > 1:
            dist.all_reduce(hits)
        results[name] = tuple((100 * hits / scored).tolist())
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            run.report(dict(pool=name, k=args.knn_k, T=args.knn_t, top1=results[name][0],
                            top5=results[name][1], images=scored, skipped=len(val) - scored),
                       args.out)
    return results


@torch.no_grad()
def attention_statistics(args):
    """§4 over val: the four statistics per block, mean over heads and images -> JSON + table."""
    rank, world, device = run.setup(args.seed)
    enc = (vit.build_encoder(args.model, args.img_size, args.checkpoint, args.in_chans)
           .to(device).eval())
    val_tf = transforms(args.img_size, "mae", args.mean, args.std)[1]
    dl = data.loader(data.Seeded(data.dataset(args.data, "val", labelled=True), val_tf),
                     args.micro_batch, train=False, workers=args.workers)
    data.set_epoch(dl, 0)
    sums, n = torch.zeros(len(enc.blocks), 4, device=device), torch.zeros((), device=device)
    for img, y in dl:
        real = y.to(device) >= 0  # -1: an unreadable file's placeholder
        with run.autocast(device):
            x = enc.prefix(enc.embed(normalized(img.to(device), args.mean, args.std))
                           + enc.pos_embed)
            # one block at a time: all maps at once would not fit at ViT-B
            for i, blk in enumerate(enc.blocks):
                x, attn = blk(x, return_attn=True)  # attn (B, h, P + N, P + N), fp32 softmax
                sums[i] += attention_stats(attn, enc.num_prefix)[real].sum(0)
        n += real.sum()
    if dist.is_initialized():
        dist.all_reduce(sums), dist.all_reduce(n)
    means, N = (sums / n).tolist(), enc.grid[0] * enc.grid[1]
    if rank == 0:
        out = dict(checkpoint=args.checkpoint, images=int(n), patches=N,
                   max_entropy=float(torch.log(torch.tensor(float(N)))),
                   blocks=[dict(block=i + 1, **dict(zip(STATS, m))) for i, m in enumerate(means)])
        os.makedirs(args.out, exist_ok=True)
        json.dump(out, open(os.path.join(args.out, "attention_stats.json"), "w"), indent=1)
        print(f"attention statistics over {int(n)} val images; max entropy ln {N} = "
              f"{out['max_entropy']:.3f}")
        print("block  " + "  ".join(f"{s:>14}" for s in STATS))
        for i, m in enumerate(means):
            print(f"{i + 1:5d}  " + "  ".join(f"{v:14.4f}" for v in m))
    return means


# ---- command line ----

# the probe behind each paper's numbers (digest); every individual flag overrides its preset
PROTOCOLS = {
    # Beyond [cls] §5 = MAE's probe
    "mae": dict(pool="abmilp", block=None, head_norm="bn", optimizer="lars", lr=0.1, ref_batch=256,
                batch_size=16384, epochs=90, warmup_epochs=10, weight_decay=0.0, img_size=224),
    # KAMIM App. A (SimMIM's probe); where it is silent, its code: clip 1.0, decay on every
    # parameter, timm's cosine from 2.5e-6 to a 2.5e-6 floor, transforms' uint8 resize
    "kamim": dict(pool="avg", block=8, head_norm="none", optimizer="adamw", lr=5e-3, ref_batch=2048,
                  batch_size=2048, epochs=100, warmup_epochs=10, weight_decay=0.05, img_size=192,
                  mix=True, clip_grad=1.0, lr_curve="timm", warmup_lr=2.5e-6, min_lr=2.5e-6),
    # SemanticMIM §4.1 / Table 5 (BEiT's protocol); the head's norm, unsaid: its code's LayerNorm
    "semanticmim": dict(pool="cls", block=7, head_norm="ln", optimizer="adamw", lr=4e-3,
                        ref_batch=1024, batch_size=1024, epochs=100, warmup_epochs=0,
                        weight_decay=1e-4, img_size=224),
    # yyk-wew/SemanticMIM *_cls_linear_probing.py: the last block's patch mean, frozen fresh LN
    "semanticmim_code": dict(pool="avg", block=None, head_norm="ln", optimizer="adamw", lr=4e-3,
                             ref_batch=1024, batch_size=1024, epochs=100, warmup_epochs=0,
                             weight_decay=1e-4, img_size=224),
}

# the demo (no --data) overrides only these; lr: MAE's absolute 6.4 (0.1 x 16384/256), since LARS
# at 0.1 barely moves the head in the demo's 180 steps
DEMO = dict(img_size=64, batch_size=256, epochs=30, warmup_epochs=1, pool="all", lr=6.4)


def parse_args(argv=None):
    p = run.parser(__doc__)
    a = p.add_argument
    a("--data", help="ImageNet-style folder with train/ and val/ class folders; absent: the demo "
      "(vit_demo, 64 px, batch 256, 30 epochs, 1 warmup epoch, lr 6.4 at 256, --pool all, "
      "--cache-features)")
    a("--checkpoint", help="encoder checkpoint: ours ('encoder' key) or MAE / DeiT / DINO in the "
      "timm layout; absent: random init")
    a("--model", help="vit_demo / vit_t / vit_s / vit_b / vit_l / vit_h (default: the "
      "checkpoint's, else vit_b; demo vit_demo)")
    a("--protocol", default="mae", choices=PROTOCOLS, help="preset of the flags below: mae (Beyond "
      "[cls] §5, MAE's probe; default), kamim (KAMIM App. A: block 8, avg, no norm, AdamW 5e-3, "
      "TrivialAugment + RandomErasing, MixUp / CutMix; code: clip 1.0, timm's cosine), semanticmim "
      "(§4.1: block 7, AdamW 4e-3, LayerNorm head: code), semanticmim_code (released configs: "
      "mean of the final patch tokens, frozen fresh LayerNorm)")
    a("--pool", choices=["cls", "avg", "abmilp", "knn", "all"], help="cls ([cls] / proxy tokens), "
      "avg (patch mean) or abmilp (eq. 6; mae preset); knn = DINO's weighted kNN on [cls] and avg, "
      "no training; all = each, side by side")
    a("--knn-k", type=int, default=20, help="kNN neighbours (DINO: 20)")
    a("--knn-t", type=float, default=0.07, help="kNN vote temperature: weight exp(cos / T) (DINO)")
    a("--block", type=int, help="read the tokens after block K (1-indexed; default the last; "
      "SimMIM/KAMIM 8, SemanticMIM 7)")
    a("--final-norm", action=argparse.BooleanOptionalAction, default=False, help="apply the "
      "encoder's final LayerNorm (MAE's own probe does; Beyond [cls]'s released code, which "
      "produced Table 1, does not: default off)")
    a("--head-norm", choices=["bn", "ln", "none"], help="before the Linear: bn = "
      "BatchNorm1d(affine=False, eps 1e-6) (mae: MAE's probe); ln = LayerNorm without affine, eps "
      "1e-6 (semanticmim, semanticmim_code: the released probe's frozen fresh ln2 after the pool; "
      "the paper does not say); none (kamim: App. A)")
    a("--proxy-pool", default="mean", choices=["mean", "first", "concat"], help="--pool cls with "
      "several prefix tokens (SemanticMIM's 8 proxies): their mean (default; the paper does not "
      "say), the first, or concatenated")
    a("--abmilp-t", default="linear", choices=["linear", "tanh", "relu"], help="AbMILP's t: one "
      "Linear (the paper's setting, 71.58) or App. B.2's 2-layer MLP of width D with tanh (68.70, "
      "the released code's default) or ReLU (71.65)")
    a("--optimizer", choices=["lars", "adamw"], help="lars (MAE; mae preset) or adamw (kamim, "
      "semanticmim)")
    a("--lr", type=float, help="lr at --ref-batch, scaled linearly to the real batch (mae: base lr "
      "0.1 per 256 -> 6.4 at 16384)")
    a("--ref-batch", type=int, help="the batch of --lr (mae 256, kamim 2048, semanticmim 1024)")
    a("--batch-size", type=int, help="GLOBAL batch (mae 16384, kamim 2048, semanticmim 1024), "
      "reached by accumulation")
    a("--epochs", type=int, help="mae 90 (50 for vit_l / vit_h), kamim 100, semanticmim 100")
    a("--warmup-epochs", type=int, help="linear warmup (mae 10, kamim 10, semanticmim 0)")
    a("--lr-curve", choices=["fresh", "timm"], help="fresh: warmup, then a half-cosine to --min-lr "
      "(MAE, SemanticMIM's configs); timm: timm's CosineLRScheduler, one cosine over all epochs, "
      "the warmup overriding its start (kamim: code)")
    a("--warmup-lr", type=float, help="lr the warmup starts from, absolute (0; kamim 2.5e-6: code)")
    a("--min-lr", type=float, help="the cosine's floor, absolute (0: MAE, SemanticMIM Table 5; "
      "kamim 2.5e-6: code)")
    a("--weight-decay", type=float, help="mae 0, kamim 0.05, semanticmim 1e-4")
    a("--decay-exclusions", action=argparse.BooleanOptionalAction, default=False, help="AdamW: no "
      "weight decay on biases (MAE's rule); default off: decay on every head parameter (KAMIM's "
      "and SemanticMIM's code; LARS decays only ndim > 1 itself)")
    a("--clip-grad", type=float, help="gradient-norm clip, 0 = none (mae: MAE's probe, "
      "semanticmim: the configs); kamim 1.0 (code)")
    a("--momentum", type=float, default=0.9, help="LARS momentum (MAE: 0.9)")
    a("--trust", type=float, default=0.001, help="LARS trust coefficient eta (MAE: 0.001)")
    a("--img-size", type=data.image_size, help="mae 224, kamim 192, semanticmim 224 (val resizes "
      "to img * 256/224, centre crop); HxW (e.g. 224x320) for a non-square input")
    a("--mix", action=argparse.BooleanOptionalAction, help="MixUp or CutMix per batch, alpha 1 "
      "(kamim preset; no cache)")
    probe_cache.add_flags(p)
    a("--attention-stats", action="store_true", help="§4: write the per-block attention "
      "statistics over val, no probe")
    run.shared_flags(p, out=None, micro_batch=1024, workers=min(8, os.cpu_count() or 1),
                     out_help="default runs/abmilp_probe/NAME, NAME the checkpoint's folder "
                     "(runs/kamim/checkpoint.pt -> kamim) or random_init; --pool all: one "
                     "sub-folder per pool", in_chans=None)
    args = p.parse_args(argv)
    run.encoder_flags(args)
    demo = args.data is None
    preset = dict(dict(lr_curve="fresh", warmup_lr=0.0, min_lr=0.0, clip_grad=0.0),
                  **PROTOCOLS[args.protocol], model="vit_demo" if demo else "vit_b",
                  cache_features=demo)
    if demo:  # the demo overrides only DEMO's values (and says so in --help)
        preset.update(DEMO)
    elif args.protocol == "mae" and args.model in ("vit_l", "vit_h"):
        preset.update(epochs=50)
    mix_given = args.mix
    run.defaults(args, preset)
    if args.mix and args.cache_features and mix_given:
        p.error("--mix needs image batches: it cannot run with --cache-features")
    args.mix = bool(args.mix) and not args.cache_features  # cached tokens: the preset gives way
    if args.model not in vit.CONFIGS:
        p.error(f"--model {args.model}: choose one of {', '.join(vit.CONFIGS)}")
    depth = vit.CONFIGS[args.model]["depth"]
    args.block = depth if args.block is None else args.block
    if not 1 <= args.block <= depth:
        p.error(f"--block {args.block} is outside {args.model}'s blocks 1..{depth}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    run.check_flags(p, args)
    if any(s % vit.CONFIGS[args.model]["patch_size"] for s in args.img_size):
        p.error(f"--img-size {args.img_size} is not a multiple of {args.model}'s patch size")
    if args.out is None:  # one folder per encoder: a new checkpoint never resumes another's heads
        name = (os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
                if args.checkpoint and os.path.basename(args.checkpoint) == "checkpoint.pt" else
                os.path.splitext(os.path.basename(args.checkpoint or "random_init"))[0])
        args.out = os.path.join("runs", "abmilp_probe", name)
    if args.lr <= 0 or args.knn_t <= 0 or not 0 <= args.warmup_epochs < args.epochs:
        p.error("--lr and --knn-t must be > 0 and --warmup-epochs in [0, --epochs)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.attention_stats:
        return attention_statistics(args)
    pools = ["cls", "avg", "abmilp", "knn"] if args.pool == "all" else [args.pool]
    cache, results = {"condensed": "abmilp" not in pools}, {}  # all tokens if AbMILP needs them
    for pool in pools:
        out = os.path.join(args.out, pool) if len(pools) > 1 else args.out
        ns = argparse.Namespace(**{**vars(args), "pool": pool, "out": out})
        results.update(knn(ns, cache) if pool == "knn" else {pool: train(ns, cache)})
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"\nlinear probe, {args.model} block {args.block}"
              f"{' + final norm' if args.final_norm else ''}, "
              f"{args.checkpoint or 'random init'}:\n" + "pool      top-1   top-5")
        for pool, (t1, t5) in results.items():
            print(f"{pool:7s}  {t1:6.2f}  {t5:6.2f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
