"""The online linear probe of the pretraining scripts (solo-learn, lightly): a
BatchNorm1d(affine=False) + Linear head trained beside pretraining on detached features, so a run
shows what its encoder has learned as it goes. kamim.py, lut.py and semanticmim.py each call it in a
few lines (--online-probe); it never touches their loss."""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import run
import vit


class OnlineProbe:
    """BatchNorm1d(affine=False) + Linear on the DETACHED mean of the encoder's final patch tokens
    of the UNMASKED image (its own no-grad forward, encoder in eval mode: no drop path, no RNG
    drawn), its own AdamW. Pretraining is unchanged: no gradient reaches the encoder and the head is
    built under a forked RNG. It sees the first `share` of each micro-batch (at least 2 images, for
    BatchNorm): its forward costs share x one encoder forward per image. Under torchrun each rank
    trains its own copy on its batches (rank 0's is logged and saved)."""
    def __init__(self, encoder, num_classes, lr=1e-3, share=1.0):
        self.share, self.forward_flops = share, vit.vit_forward_flops(encoder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.head = nn.Sequential(nn.BatchNorm1d(encoder.dim, affine=False),
                                      nn.Linear(encoder.dim, num_classes))
        self.head.to(encoder.cls_token.device)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=lr)
        self.hits = torch.zeros(2, device=encoder.cls_token.device)

    def logits(self, encoder, img, train=True):
        """img (B, C, H, W) normalised, unmasked -> (B, K); the encoder's mode is restored after."""
        mode, dev = encoder.training, img.device.type
        with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            z = encoder.eval()(img)[:, encoder.num_prefix:].mean(1).float()  # (B, D), detached
        encoder.train(mode)
        return self.head.train(train)(z)

    def images(self, micro):
        """How many images of a micro-batch of `micro` the probe takes."""
        return min(micro, max(2, math.ceil(self.share * micro)))

    def flops(self, micro):
        """Its FLOPs per training image: the no-grad encoder forward and the head's forward and
        backward, on images(micro) of every micro images."""
        fc = self.head[1]
        return self.images(micro) / micro * (self.forward_flops
                                              + 3 * 2 * fc.in_features * fc.out_features)

    def step(self, encoder, img, y):
        n = self.images(len(img))
        img, y = img[:n], y[:n]
        logits = self.logits(encoder, img)
        F.cross_entropy(logits, y).backward()
        self.opt.step(), self.opt.zero_grad(set_to_none=True)
        self.hits += torch.stack([(logits.argmax(1) == y).sum(), torch.ones_like(y).sum()]).detach()

    def top1(self):
        """Train top-1 (%) since the last call: one sync, at log lines."""
        t1 = 100 * self.hits[0].item() / max(1, self.hits[1].item())
        self.hits = torch.zeros_like(self.hits)
        return t1

    def state_dict(self):
        return dict(head=self.head.state_dict(), opt=self.opt.state_dict())

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"]), self.opt.load_state_dict(state["opt"])


def add_flag(p):
    """--online-probe and its share, the pretraining scripts' flags."""
    p.add_argument("--online-probe", action=argparse.BooleanOptionalAction,
                   help="BN + linear probe on the detached encoder (logs probe_top1; never changes "
                   "pretraining); default on when the data has class folders and in the demo")
    p.add_argument("--online-probe-share", type=run.number(float, high=1), default=None,
                   help="share of each micro-batch the probe sees (default 1/16 with --data: its "
                   "forward then adds 2 %% of KAMIM's and SemanticMIM's step FLOPs at ViT-B, 4 %% "
                   "of MAE's, 2 %% of LUT's; 1 in the demo). Counted in the logged TFLOP/s and MFU")


def online_probe(args, encoder, ds, device):
    """--online-probe: an OnlineProbe and a held-out batch (256 fixed random images of the val
    split: the demo's, or PATH/val) when the data has labels (default: on for class folders and the
    demo), else (None, None)."""
    classes = getattr(ds, "classes", [])
    if not (len(classes) > 1 if args.online_probe is None else args.online_probe):
        return None, None
    if len(classes) < 2:
        raise ValueError(f"--online-probe needs labelled data (class folders); {args.data} has "
                         f"{len(classes)} class")
    has_val = args.data is None or os.path.isdir(os.path.join(args.data, "val"))
    val = data.dataset(args.data, "val") if has_val else None
    held = None
    if val is not None:
        # any class order
        idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:256].tolist()
        tf = data.center_crop(args.img_size, args.mean, args.std)
        # -1: an unreadable file's placeholder
        held = [(x, y) for x, y in (val[i] for i in idx) if y >= 0]
        held = (torch.stack([tf(x) for x, _ in held]).to(device),
                torch.tensor([y for _, y in held], device=device))
    share = getattr(args, "online_probe_share", None)
    if share is None:
        share = 1.0 if args.data is None else 1 / 16
    args.online_probe_share = share
    return OnlineProbe(encoder, len(classes), share=share), held


@torch.no_grad()
def held_out_top1(probe, encoder, held):
    """The probe's top-1 (%) on the held-out batch (BatchNorm in eval mode), or None without one."""
    if held is None:
        return None
    pred = probe.logits(encoder, held[0], train=False).argmax(1)
    return 100 * (pred == held[1]).float().mean().item()


def train_top1(probe):
    """{"probe_top1": train top-1 since the last log line} for a log record; {} without a probe."""
    return {"probe_top1": probe.top1()} if probe else {}


def report_held_out(probe, encoder, held, epoch, step, out_dir):
    """At an epoch's end (rank 0): the probe's held-out top-1 as its own log record, if there is a
    held-out batch."""
    if probe and held:
        top1 = held_out_top1(probe, encoder, held)
        run.report(dict(epoch=epoch, step=step, probe_val_top1=top1), out_dir)
