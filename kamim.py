"""SimMIM and KAMIM pretraining (Krishna & Subramanyam, "Keypoint Aware Masked Image Modelling",
§3, §4.1).

SimMIM (eq. 1): the encoder sees every patch, masked patches' embeddings replaced by a learnable
[MASK] token; a 1x1 conv + PixelShuffle head regresses the normalised pixels; l1 on masked pixels.
KAMIM (eqs. 2-3): FAST keypoints on the augmented crop give a map F; its density Omega over wps x
wps blocks gives a weight W >= 1 per block, which multiplies each masked pixel's l1 error.

    python kamim.py                                                              # CPU demo
    torchrun --nproc_per_node=8 kamim.py --model vit_b --data /imagenet          # KAMIM, the paper
    torchrun --nproc_per_node=8 kamim.py --model vit_b --data /imagenet --detector none   # SimMIM

The loader ships the cheap uint8 point map; Omega, W and the released code's circles are computed on
the training device. Where the paper is silent the released code (For TPUs/) decides the default:
circles (--keypoints points: the paper's single pixels), the uint8 crop without antialiasing
(--antialias), a learned position table (--pos sincos), weight decay on every parameter
(--decay-exclusions), timm's cosine (--lr-curve fresh); --clip-logits adds the code's clamp.
"""
import math
import os
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.utils import save_image

import data
import online_probe
import run
import vit

# the global batch the paper's lr 8e-4 belongs to (released code; the paper gives none)
REF_BATCH = 2048
# the paper's run (§4.1; batch and lr's batch: released code) and the CPU demo (no --data): the
# paper's 12x12 token / 6x6 mask-cell / 24x24 weight geometry at half scale; demo lr 3.2e-2 is 2e-3
# at its batch 128 (the paper's 5e-5 there barely moves)
PAPER = dict(model="vit_b", img_size=192, batch_size=2048, epochs=100, warmup_epochs=10, wps=8,
             mask_patch=32, workers=8, lr=8e-4)
DEMO = dict(model="vit_demo", img_size=96, batch_size=128, epochs=6, warmup_epochs=1, wps=4,
            mask_patch=16, workers=1, lr=3.2e-2)
# cv2.drawKeypoints' circle for a FAST keypoint (size 7, integer centre), a 9 x 9 stamp: centre
# 3 x 3 empty
RING = torch.tensor([[int(c) for c in row] for row in "000111000 001111100 011111110 111000111 "
                     "111000111 111000111 011111110 001111100 000111000".split()])


# ---- keypoints, crop and mask (§3.2, §4.1) ----

DETECTORS = {"fast": cv2.FastFeatureDetector_create, "orb": cv2.ORB_create, "sift": cv2.SIFT_create}
# one detector per name and process (making one costs more than FAST on a 192 px crop)
_detectors = {}


def keypoint_map(img, detector="fast"):
    """(H, W, 3) uint8 crop -> (H, W) uint8 map, 1 at each keypoint's (rounded) pixel (the paper's
    F). OpenCV defaults (FAST: threshold 10, non-max suppression). The RGB array is passed as is
    (OpenCV reads it as BGR for the grey conversion) to match the released keypoints exactly."""
    if detector not in _detectors:
        _detectors[detector] = DETECTORS[detector]()
    kps = _detectors[detector].detect(np.ascontiguousarray(img), None)
    F = np.zeros(img.shape[:2], np.uint8)
    if kps:
        x, y = np.rint(cv2.KeyPoint_convert(kps)).astype(np.int64).T  # (x, y) per keypoint
        F[np.minimum(y, F.shape[0] - 1), np.minimum(x, F.shape[1] - 1)] = 1
    return F


def kamim_crop(img_size=192, antialias=False):
    """KAMIM / SimMIM (§4.1): random resized crop, scale (0.67, 1), ratio (3/4, 4/3), then vertical
    and horizontal flips, p 0.5 each. PIL RGB -> the (H, W, 3) uint8 array FAST runs on and the
    model receives. Default = the released loader: torchvision v2 on a uint8 tensor, bilinear,
    antialias=False (T = 0.25 was tuned on it); antialias=True: the PIL crop (always antialiased:
    ~27 % fewer FAST keypoints)."""
    size, rrc = data.image_size(img_size), dict(scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3))
    if antialias:
        tf = T.Compose([T.RandomResizedCrop(size, **rrc), T.RandomVerticalFlip(),
                        T.RandomHorizontalFlip(), T.PILToTensor()])
    else:
        tf = T.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, **rrc, antialias=False),
                        v2.RandomVerticalFlip(), v2.RandomHorizontalFlip()])
    return T.Compose([tf, _hwc])


def _hwc(x):
    """(C, H, W) uint8 tensor -> (H, W, C) uint8 array (a named function: loader workers pickle
    it)."""
    return x.permute(1, 2, 0).contiguous().numpy()


def simmim_mask(img_size=192, mask_patch=32, model_patch=16, ratio=0.6):
    """SimMIM: mask ceil(ratio * cells) of the (img/mask_patch)^2 cells at random (22 of 36 at the
    defaults), expanded to the model's patch grid. Returns (h, w) uint8 on the token grid,
    1 = masked."""
    (H, W), n = data.image_size(img_size), mask_patch // model_patch
    if H % mask_patch or W % mask_patch or mask_patch % model_patch:
        raise ValueError(f"mask patch {mask_patch} must divide the image size {img_size} and be a "
                         f"multiple of the model's patch {model_patch}")
    gh, gw = H // mask_patch, W // mask_patch
    mask = torch.zeros(gh * gw, dtype=torch.uint8)
    mask[torch.randperm(gh * gw)[:math.ceil(ratio * gh * gw)]] = 1
    return mask.view(gh, gw).repeat_interleave(n, 0).repeat_interleave(n, 1)


# ---- the paper's pieces ----

def keypoint_circles(points, ring=RING):
    """Released code: each keypoint drawn as a circle (cv2.drawKeypoints). For FAST this equals the
    point map convolved with RING, thresholded at > 0. points (B, 1, d, d) {0, 1} -> (B, 1, d, d)
    {0, 1} float. cv2.drawKeypoints with default flags draws radius 3 for every keypoint whatever
    its size; ORB / SIFT centres are sub-pixel, so for them this stamp only approximates the drawn
    map. Pass the ring already on the device (KAMIM keeps it as a buffer): a copy from the host each
    step syncs."""
    ring = ring.to(points.device, torch.float32).view(1, 1, 9, 9)
    return (F.conv2d(points.float(), ring, padding=4) > 0).float()


def keypoint_density(F_map, wps):
    """§3.3.2: Omega = F convolved with an all-ones wps x wps kernel scaled by 1/wps^2, stride wps,
    no padding (= a block mean). (B, 1, d, d) -> (B, 1, d/wps, d/wps), the mean keypoint count per
    block."""
    return F.avg_pool2d(F_map.float(), wps, stride=wps)


def kamim_weights(omega, temperature, clip=None):
    # eq. 2: W = exp(Omega/T) / min over the image of exp(Omega/T), so min W = 1 in every image
    z = omega / temperature  # (B, 1, h, w)
    # released code clamps Omega/T to [-clip, clip]; never binds for T >= 1/clip
    if clip is not None:
        z = z.clamp(-clip, clip)
    return torch.exp(z - z.amin(dim=(-2, -1), keepdim=True))  # = eq. 2, without overflow at small T


def kamim_loss(pred, target, mask, W):
    # eq. 3: l1 on masked pixels, each error multiplied by its block's W; pred, target (B, C, H, W),
    # mask (B, 1, H, W) 1 = masked, W (B, 1, H/wps, W/wps). Mean over masked pixel-channels
    # (released code; the paper sums per patch), NOT divided by sum W: KAMIM's loss is larger than
    # SimMIM's by design
    # each W repeated over its wps x wps pixels
    Wpix = F.interpolate(W, size=pred.shape[-2:], mode="nearest")
    err = (pred.float() - target.float()).abs() * Wpix * mask
    return err.sum() / (mask.sum() * pred.shape[1])


def simmim_loss(pred, target, mask):
    # eq. 1: l1 on masked pixels only (mask 1 = masked): eq. 3 with every W = 1
    return kamim_loss(pred, target, mask, torch.ones_like(mask[:, :, :1, :1]))


# ---- the model ----

class KAMIM(nn.Module):
    """SimMIM on vit.ViT (Hugging Face ViTForMaskedImageModeling, as the released code): [MASK]
    replaces the patch embedding before the position is added and [cls] prepended; all tokens
    through the encoder and its final norm; the head drops [cls] and maps each token to its patch's
    pixels. No drop path. detector "none" = plain SimMIM; otherwise KAMIM's weighted loss from the
    keypoint point map."""
    def __init__(self, encoder, wps=8, temperature=0.25, circles=True, clip=None):
        super().__init__()
        self.encoder, self.wps, self.temperature, self.circles, self.clip = (
            encoder, wps, temperature, circles, clip)
        D, p = encoder.dim, encoder.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM
        # SimMIM decoder
        self.head = nn.Sequential(nn.Conv2d(D, p * p * encoder.in_chans, 1), nn.PixelShuffle(p))
        # moves with the model, not in checkpoints
        self.register_buffer("ring", RING.float(), persistent=False)

    def predict(self, img, mask):
        """img (B, C, H, W), mask (B, h, w) on the token grid, 1 = masked -> reconstruction
        (B, C, H, W)."""
        enc = self.encoder
        x = enc.embed(img)  # (B, N, D)
        m = mask.flatten(1).unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        # SimMIM: a learned [MASK], not zeros (SimMIM#10)
        x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        x = enc.norm(enc.run_blocks(enc.prefix(x + enc.pos_embed)))  # (B, 1 + N, D)
        # (B, D, h, w)
        x = x[:, enc.num_prefix:].transpose(1, 2).reshape(x.shape[0], enc.dim, *enc.grid)
        return self.head(x)

    def weights(self, points):
        """points (B, d, d) uint8 {0, 1} -> W (B, 1, d/wps, d/wps) of eq. 2, in fp32 even under
        autocast."""
        with torch.autocast(points.device.type, enabled=False):
            F_map = points[:, None].float()
            F_map = keypoint_circles(F_map, self.ring) if self.circles else F_map
            return kamim_weights(keypoint_density(F_map, self.wps), self.temperature, self.clip)

    def forward(self, img, mask, points=None):
        """img (B, C, H, W) normalised, mask (B, h, w) 1 = masked, points (B, H, W) or None
        (SimMIM). Returns the loss and its terms; "l1" is the unweighted eq. 1, comparable across
        the two methods."""
        pred = self.predict(img, mask)
        p = self.encoder.patch_size
        mpix = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].float()  # (B, 1, H, W)
        # target = the normalised input itself (no per-patch norm)
        l1 = simmim_loss(pred, img, mpix)
        if points is None:
            return l1, {"loss": l1.detach()}
        loss = kamim_loss(pred, img, mpix, self.weights(points))
        return loss, {"loss": loss.detach(), "l1": l1.detach()}


def train_flops(model):
    """Analytic FLOPs of one training image: 3 x (encoder forward over all 1 + N tokens + the 1x1
    head)."""
    enc = model.encoder
    n = enc.grid[0] * enc.grid[1]
    head = 2 * n * enc.dim * enc.patch_size ** 2 * enc.in_chans
    return 3 * (vit.vit_forward_flops(enc) + head)


# ---- data hook ----

class KamimTransform:
    """PIL -> (image (C, H, W) uint8, mask (H/p, W/p) uint8 1 = masked[, point map F (H, W) uint8]);
    the step normalises the image on the device. Keypoints are found on the augmented RGB crop,
    after both flips (§4.1)."""
    def __init__(self, img_size, model_patch, mask_patch=32, mask_ratio=0.6, detector="fast",
                 in_chans=3, antialias=False):
        # released: uint8, no antialias
        self.crop, self.in_chans = kamim_crop(img_size, antialias), in_chans
        self.mask_args = (img_size, mask_patch, model_patch, mask_ratio)  # no lambda: picklable
        self.detector = detector

    def __call__(self, img):
        # (H, W, 3) uint8, flipped: FAST sees exactly the pixels the model receives
        crop = self.crop(img)
        x = torch.from_numpy(crop).permute(2, 0, 1)  # (3, H, W) uint8
        out = (v2.functional.rgb_to_grayscale(x) if self.in_chans == 1 else x,
               simmim_mask(*self.mask_args))
        if self.detector == "none":  # SimMIM: no keypoint work at all
            return out
        return out + (torch.from_numpy(keypoint_map(crop, self.detector)),)


@torch.no_grad()
def save_figure(model, batch, path, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, n=8):
    """Figs. 1-2: rows = input, masked input, W (scaled to its max), reconstruction pasted into the
    masked cells. Images are un-normalised with the training mean / std for display."""
    img, mask, points = batch[0][:n], batch[1][:n], (batch[2][:n] if len(batch) > 2 else None)
    pred = model.predict(img, mask).float()
    p = model.encoder.patch_size
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].float()
    show = lambda x: data.denormalize(x, mean, std)
    rows = [show(img), show(img) * (1 - m)]
    if points is not None:
        W = model.weights(points)
        W = F.interpolate(W, size=img.shape[-2:]) / W.amax(dim=(1, 2, 3), keepdim=True)
        rows.append(W.expand(-1, 3, -1, -1))
    rows.append(show(img * (1 - m) + pred * m))
    save_image(torch.cat(rows), path, nrow=img.shape[0])


# ---- training ----

def train(args):
    rank, world, device = run.setup(args.seed)
    micro, accum = run.batch_split(args.batch_size, world, args.micro_batch or args.batch_size)
    # the released code sets an absolute lr (8e-4 at its batch 2048); we scale linearly (SimMIM,
    # MAE) and scale the warmup start and the floor alike (they belong to 2048)
    lr, min_lr, warmup_lr = (v * args.batch_size / REF_BATCH
                             for v in (args.lr, args.min_lr, args.warmup_lr))
    encoder = vit.vit(args.model, img_size=args.img_size, in_chans=args.in_chans,
                      learned_pos=args.pos == "learned")
    model = KAMIM(encoder, args.wps, args.temperature, args.keypoints == "circles",
                  20.0 if args.clip_logits else None).to(device)
    # none on norms, biases
    groups = (vit.param_groups(model, args.weight_decay)
              if args.decay_exclusions else
              [dict(params=list(model.parameters()), weight_decay=args.weight_decay, lr_scale=1.0)])
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    transform = KamimTransform(args.img_size, encoder.patch_size, args.mask_patch, args.mask_ratio,
                               args.detector, args.in_chans, args.antialias)
    ds = data.Seeded(data.dataset(args.data, "train"), transform, args.seed)
    dl = data.loader(ds, micro, train=True, workers=args.workers, seed=args.seed)
    # (None, None) without labels
    probe, held = online_probe.online_probe(args, encoder, ds.base, device)
    per_epoch = len(dl) // accum
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    step = run.resume(args.out, model, opt, probe, args, total, ds)  # weights, optimiser, step, RNG
    if rank == 0:
        run.banner(args, device, world, micro, accum,
                   f"{lr:.3g} (= {args.lr:g} x {args.batch_size}/{REF_BATCH})",
                   per_epoch, total, step)
    net = run.distribute(model, device, args.compile)
    # every FLOP of the step, the probe's too (logged TFLOP/s, MFU)
    flops = train_flops(model) + (probe.flops(micro) if probe else 0)
    autocast = run.autocast(device)
    sums, n_log, done, last, t0 = {}, 0, 0, None, time.time()
    t_run = t0
    model.train()
    # prefetched
    for epoch, step, micro_batches in data.train_steps(dl, args.epochs, accum, step, device):
        schedule = run.timm_cosine if args.lr_curve == "timm" else run.cosine
        lr_now = schedule(step, total, warmup, lr, min_lr, warmup_lr)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        for i, (batch, y) in enumerate(micro_batches):
            batch[0] = data.normalize_batch(batch[0], args.mean, args.std)  # uint8 from the loader
            with run.no_sync(net, i < accum - 1), autocast:
                loss, terms = net(*batch)
                (loss / accum).backward()
            if probe:  # after backward: its own no-grad forward of the unmasked image, its own step
                probe.step(model.encoder, batch[0], y.to(device))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v / accum
        if args.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, n_log, done, last = step + 1, n_log + 1, done + 1, batch
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
            save_figure(model, last, os.path.join(args.out, f"epoch{epoch:03d}.png"),
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
    a("--data", default=None, help="ImageNet folder (PATH/train/...) or a folder of images; "
      "absent = the built-in demo (DemoShapes) with DEMO's values: vit_demo at 96 px, mask patch "
      "16, wps 4, batch 128, 6 epochs (1 warmup), demo lr 3.2e-2 (2e-3 at batch 128)")
    a("--model", default=None, choices=list(vit.CONFIGS), help="encoder; the paper: vit_t / vit_s "
      "/ vit_b (default vit_b)")
    a("--img-size", type=data.image_size, default=None, help="crop size; §4.1: 192; HxW (e.g. "
      "192x256) for a non-square one")
    a("--batch-size", type=int, default=None, help="GLOBAL batch; released code: 2048 (the paper "
      "gives none)")
    a("--lr", type=float, help="peak lr at batch 2048 (§4.1: 8e-4; demo 3.2e-2, i.e. "
      "2e-3 at its batch 128, so that 72 CPU steps visibly learn), scaled linearly to --batch-size")
    a("--warmup-lr", type=float, default=1e-6, help="lr the warmup starts from at batch 2048 "
      "(released code), scaled like --lr")
    a("--min-lr", type=float, default=1e-5, help="the cosine's floor at batch 2048 (released "
      "code), scaled like --lr")
    a("--lr-curve", default="timm", choices=["timm", "fresh"], help="timm (default, released code: "
      "timm's CosineLRScheduler, one cosine over all epochs, the linear warmup overriding its "
      "start); fresh: a new half-cosine from the peak after warmup")
    a("--epochs", type=int, default=None, help="§4.1: 100 (the released loop then runs 10 more at "
      "the floor)")
    a("--warmup-epochs", type=int, default=None, help="§4.1: 10")
    a("--weight-decay", type=float, default=0.05, help="AdamW, §4.1: 0.05, betas (0.9, 0.999)")
    a("--decay-exclusions", action="store_true", help="no weight decay on norms, biases, tokens, "
      "positions (MAE's habit); default: every parameter decays, as the released code (the paper "
      "is silent)")
    a("--antialias", action="store_true", help="crop the PIL image (antialiased) instead of the "
      "released loader's uint8 tensor crop without antialiasing (the default, on which T = 0.25 "
      "was tuned)")
    a("--pos", default="learned", choices=["learned", "sincos"], help="absolute position "
      "embedding: learned, trunc-normal 0.02 (released code: Hugging Face ViT; Table 1's counts) "
      "or fixed 2-D sin-cos")
    a("--clip-grad", type=float, default=1.0, help="gradient-norm clip (released code: 1.0); "
      "0 = none")
    a("--detector", default="fast", choices=["fast", "orb", "sift", "none"], help="keypoints for F "
      "(§3.2, Table 4: FAST; ORB, SIFT); none = plain SimMIM, no keypoint work in the loader")
    a("--wps", type=int, default=None, help="weight patch size, Table 2: 8 (demo 4)")
    a("--temperature", type=float, default=0.25, help="T of eq. 2, Table 2: 0.25; larger = closer "
      "to SimMIM")
    a("--keypoints", default="circles", choices=["circles", "points"], help="F as the released "
      "code drew it (circles, which produced the paper's numbers and for which T was tuned) or the "
      "single pixels §3.3.1 describes")
    a("--clip-logits", action="store_true", help="released code: clamp Omega/T to [-20, 20] before "
      "exp (eq. 2)")
    a("--mask-patch", type=int, default=None, help="mask cell size, §4.1: 32 (demo 16)")
    a("--mask-ratio", type=float, default=0.6, help="§4.1: 0.6 of the cells, rounded up (22 / 36)")
    online_probe.add_flag(p)
    run.shared_flags(p, out="runs/kamim")
    args = p.parse_args(argv)
    run.defaults(args, PAPER if args.data else DEMO)
    run.check_flags(p, args)
    patch = vit.CONFIGS[args.model]["patch_size"]
    if any(s % args.wps for s in args.img_size):
        p.error(f"--wps {args.wps} does not divide --img-size {args.img_size}")
    if any(s % args.mask_patch for s in args.img_size) or args.mask_patch % patch:
        p.error(f"--mask-patch {args.mask_patch} must divide --img-size {args.img_size} and be a "
                f"multiple of {args.model}'s patch {patch}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0 (got {args.temperature})")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must lie in (0, 1) (got {args.mask_ratio})")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
