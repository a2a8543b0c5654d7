"""The one Vision Transformer every script in this project uses.

Pre-norm ViT in the timm / MAE parameter layout (so public MAE, DeiT and DINO checkpoints load),
with its pieces exposed so a method composes them its own way:

    x = vit.embed(img)                      # (B, N, D) patch embeddings, no position yet
    x = x + vit.pos_embed                   # 2-D sin-cos (MAE) or learned position, patches only
    x = vit.prefix(x)                       # (B, P + N, D) with the P [cls]-like prefix tokens
    x = vit.run_blocks(x)                   # all blocks (or up to one), optionally attention maps
    x = vit.norm(x)

Also here: FLOP accounting (`block_macs`, `vit_forward_flops`), the optimiser's parameter
groups (no-decay, layer-wise lr decay) and the checkpoint loaders (`load_encoder`, `build_encoder`).
"""
import argparse
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (width D, depth, heads, patch); "vit_demo" is the small model for CPU runs on the demo
# data
CONFIGS = {
    "vit_demo": dict(dim=128, depth=4, heads=4, patch_size=8),
    "vit_t": dict(dim=192, depth=12, heads=3, patch_size=16),
    "vit_s": dict(dim=384, depth=12, heads=6, patch_size=16),
    "vit_b": dict(dim=768, depth=12, heads=12, patch_size=16),
    "vit_l": dict(dim=1024, depth=24, heads=16, patch_size=16),
    "vit_h": dict(dim=1280, depth=32, heads=16, patch_size=14),
}


def sincos_pos_embed(dim, gh, gw):
    """Fixed 2-D sin-cos position embedding (MAE): (gh * gw, dim), half the channels per axis."""
    assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                            torch.arange(gw, dtype=torch.float64), indexing="ij")
    def axis(pos):  # (gh*gw,) -> (gh*gw, dim/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([axis(xs), axis(ys)], dim=1).float()  # MAE order: width axis first


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p."""
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head attention: self-attention, or with `context` (B, M, D) cross-attention
    (SemanticMIM eq. 4): queries from x through qkv's q rows, keys and values from the context
    through its k, v rows (one Linear: timm)."""
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, return_attn=False):
        (B, N, D), h = x.shape, self.heads
        if context is None:
            # each (B, h, N, D/h)
            q, k, v = self.qkv(x).view(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:D], None if b is None else b[:D])
            q = q.view(B, N, h, D // h).transpose(1, 2)
            kv = F.linear(context, w[D:], None if b is None else b[D:])
            k, v = kv.view(B, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)
        # explicit softmax: the fused kernel returns no weights (pytorch#119811); fp32 logits
        # (bf16 logits would shift the maps by a few %)
        if return_attn:
            with torch.autocast(x.device.type, enabled=False):
                # (B, h, N, M)
                attn = (q.float() @ k.float().transpose(-2, -1) * (D // h) ** -0.5).softmax(dim=-1)
            out = attn.to(v.dtype) @ v
        else:
            attn, out = None, F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        return (out, attn) if return_attn else out


class Mlp(nn.Sequential):
    def __init__(self, dim, hidden):  # timm's names: fc1, act, fc2
        super().__init__(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                     fc2=nn.Linear(hidden, dim)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, kv_prefix=None, return_attn=False):
        """kv_prefix (B, M, D): cross-attention, queries x, keys/values [kv_prefix, x] (SemanticMIM
        eq. 4); None: self-attention."""
        # (B, M + N, D): x's rows normalised once
        y = self.norm1(x if kv_prefix is None else torch.cat([kv_prefix, x], 1))
        q, ctx = (y, None) if kv_prefix is None else (y[:, kv_prefix.shape[1]:], y)
        a, attn = self.attn(q, ctx, return_attn=True) if return_attn else (self.attn(q, ctx), None)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attn else x


class ViT(nn.Module):
    """Encoder only (no classifier head). `prefix_tokens` [cls]-like learnable tokens without
    position (1 for a standard ViT; SemanticMIM's proxies are "multiple [CLS] tokens", §4.1).
    Parameter names: patch_embed.proj (patchify conv), cls_token (P, D), pos_embed (patches only: a
    fixed buffer, or learned), blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm
    (final LayerNorm)."""
    def __init__(self, img_size=224, patch_size=16, in_chans=3, dim=768, depth=12, heads=12,
                 mlp_ratio=4.0, drop_path=0.0, prefix_tokens=1, learned_pos=False):
        super().__init__()
        gh, gw = (img_size, img_size) if isinstance(img_size, int) else img_size
        if gh % patch_size or gw % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size "
                             f"{patch_size}")
        self.patch_size, self.dim, self.in_chans = patch_size, dim, in_chans
        self.grid = (gh // patch_size, gw // patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, prefix_tokens, dim))
        pos = sincos_pos_embed(dim, *self.grid)[None]  # (1, N, D): fixed 2-D sin-cos (MAE)
        # a learned table, trunc-normal 0.02 (Hugging Face ViT: KAMIM's released model; DeiT, DINO)
        if learned_pos:
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros_like(pos), std=0.02))
        else:
            self.register_buffer("pos_embed", pos)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop_path * i / max(depth - 1, 1))
                                    for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: as a Linear, not a conv
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # each prefix token drawn independently

    num_prefix = property(lambda self: self.cls_token.shape[1])  # P

    def embed(self, img):
        """(B, C, H, W) -> (B, N, D) patch embeddings, row-major over the H x W grid; no
        position."""
        if img.shape[-2:] != (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size):
            raise ValueError(f"image of size {tuple(img.shape[-2:])} given to a ViT built for "
                             f"{self.grid[0] * self.patch_size}x{self.grid[1] * self.patch_size}")
        return self.patch_embed.proj(img).flatten(2).transpose(1, 2)

    def prefix(self, x):
        """(B, N, D) -> (B, P + N, D): prepend the prefix tokens ([cls] or proxies)."""
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def run_blocks(self, x, upto=None, return_attn=False):
        """Run blocks 1..upto (1-indexed, default all). Returns x, or (x, [attn (B, h, L, L) per
        block])."""
        attns = []
        for blk in self.blocks[:upto]:
            x, a = blk(x, return_attn=True) if return_attn else (blk(x), None)
            attns.append(a)
        return (x, attns) if return_attn else x

    def forward(self, img, upto=None, norm=True, return_attn=False):
        """The plain encoder: (B, C, H, W) -> (B, P + N, D) tokens after block `upto` (default the
        last), with the final LayerNorm if `norm`. With return_attn, also every block's softmax
        weights."""
        x = self.prefix(self.embed(img) + self.pos_embed)
        out = self.run_blocks(x, upto, return_attn)
        x, attns = out if return_attn else (out, None)
        x = self.norm(x) if norm else x
        return (x, attns) if return_attn else x


def init_weights(m):
    if isinstance(m, nn.Linear):  # MAE / timm: xavier-uniform linears, zero bias
        nn.init.xavier_uniform_(m.weight)
        m.bias is None or nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) and m.weight is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit(name, img_size=224, **kw):
    """Build a config by name: vit("vit_b", img_size=192)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}")
    return ViT(img_size=img_size, **{**CONFIGS[name], **kw})


def param_groups(model, weight_decay, decay_tokens=False, layer_decay=1.0):
    """AdamW groups with an "lr_scale" each. No weight decay on biases and norms (ndim < 2), nor,
    unless decay_tokens (MAE's rule), on tokens and learned positions. Layer-wise lr decay (BEiT;
    MAE fine-tuning): lr_scale = layer_decay^(depth + 1 - layer), where layer 0 is the model's ViT's
    patch embedding, tokens and positions, layer i + 1 its block i (0-indexed), layer depth + 1 the
    rest (final norm, heads, decoder)."""
    enc = next((m for m in model.modules() if isinstance(m, ViT)), None)
    depth = len(enc.blocks) if enc is not None else 0
    layer = {p: int(n.split(".")[1]) + 1 if n.startswith("blocks.")
             else 0 if n.startswith(("patch_embed", "cls_token", "pos_embed"))
             else depth + 1
             for n, p in (enc.named_parameters() if enc is not None else [])}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = (p.ndim < 2
                    or not decay_tokens and (name.endswith("token") or "pos_embed" in name))
            scale = layer_decay ** (depth + 1 - layer.get(p, depth + 1))
            groups.setdefault((skip, scale), []).append(p)
    return [dict(params=ps, weight_decay=0.0 if skip else weight_decay, lr_scale=scale)
            for (skip, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]


# ---- FLOP accounting. Unit: multiply-adds (MACs), as SemanticMIM App. C counts; FLOPs = 2 x MACs.
# ----

def attention_macs(Lq, Lkv, D):
    """One attention layer, per image: q (Lq D^2) + k, v (2 Lkv D^2) + QK^T and AV (2 Lq Lkv D) +
    proj (Lq D^2)."""
    return 2 * Lq * D * D + 2 * Lkv * D * D + 2 * Lq * Lkv * D


def block_macs(L, D, mlp_ratio=4, Lkv=None):
    """One pre-norm block over L tokens, per image: 12 L D^2 + 2 L^2 D for self-attention with an
    MLP ratio of 4 (SemanticMIM App. C). Lkv: key/value tokens for cross-attention. Norms, softmax,
    GELU and residual adds are not counted (they are < 1 % at ViT-B)."""
    return attention_macs(L, L if Lkv is None else Lkv, D) + 2 * mlp_ratio * L * D * D


def vit_forward_flops(model, n_tokens=None, n_patches=None, upto=None):
    """FLOPs (2 x MACs) of one image's forward through `model`: the patchify conv over n_patches
    (default all) and the blocks over n_tokens (default prefix + all patches; MAE passes its kept
    count). The final norm is free. Training is about 3x this (forward + 2x backward)."""
    n_patches = model.grid[0] * model.grid[1] if n_patches is None else n_patches
    n_tokens = model.num_prefix + n_patches if n_tokens is None else n_tokens
    patchify = n_patches * model.in_chans * model.patch_size ** 2 * model.dim
    ratio = model.blocks[0].mlp.fc1.out_features / model.dim
    depth = len(model.blocks[:upto])
    return 2 * (patchify + depth * block_macs(n_tokens, model.dim, ratio))


# ---- checkpoint loading ----

def read_state_dict(path):
    """torch.load with weights_only=True; MAE's and DINO's checkpoints also pickle an
    argparse.Namespace."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # a text file, random bytes, a truncated copy: not torch's raw unpickling advice
    except Exception as e:
        raise ValueError(f"not a checkpoint: {path} ({e.__class__.__name__})") from None
    # ours, MAE / DeiT, generic, DINO
    key = next((k for k in ("encoder", "model", "state_dict", "teacher")
                if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), None)
    return ckpt if key is None else ckpt[key]


def checkpoint_args(path):
    """The flags a checkpoint stores (ours: a dict, e.g. model, in_chans, mean, std, proxies; MAE's:
    a Namespace); {} without any. Memory-mapped: nothing but the args is read."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # no file, an old-format or foreign file: load_encoder says what is wrong
        return {}
    a = ck.get("args") if isinstance(ck, dict) else None
    return vars(a) if isinstance(a, argparse.Namespace) else a if isinstance(a, dict) else {}


def resize_pos_embed(pos, grid):
    """(1, n, D) patch position embedding on a square grid -> (1, gh * gw, D), bicubic (the usual
    way to fine-tune or probe at another resolution). Identity when the grid is the same."""
    n, D = pos.shape[1:]
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if (s, s) == tuple(grid):
        return pos
    pos = pos.reshape(1, s, s, D).permute(0, 3, 1, 2)
    pos = F.interpolate(pos.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(1, -1, D)


# not encoder weights
DROPPED = ("decoder", "head", "fc_norm", "mask_token", "projector", "predictor")
# wrapper prefixes: DDP, torch.compile, DINO / other repos' model attributes
PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")


def load_encoder(model, path_or_state):
    """Load an encoder checkpoint into `model` strictly: ours, or public MAE / DeiT / DINO in the
    timm layout. Strips PREFIXES in any order, drops decoder / head weights, folds a checkpoint's
    [cls] position into cls_token, resizes the position embedding to the model's grid, and raises
    with the missing, unexpected and mis-shaped keys if anything else differs."""
    sd = read_state_dict(path_or_state) if isinstance(path_or_state, str) else path_or_state
    out = {}
    for k, v in sd.items():
        # wrappers nest in any order: DDP then compile gives '_orig_mod.module.'
        while k.startswith(PREFIXES):
            k = k.split(".", 1)[1]
        if not k.startswith(DROPPED):
            out[k] = v
    pos = out.get("pos_embed")
    if pos is not None:
        n = model.pos_embed.shape[1]
        # prefix positions
        extra = 0 if pos.shape[1] == n else pos.shape[1] - math.isqrt(pos.shape[1]) ** 2
        # DeiT learns a [cls] position
        if extra and "cls_token" in out and out["cls_token"].shape[1] == extra:
            out["cls_token"] = out["cls_token"] + pos[:, :extra]
        out["pos_embed"] = (pos if pos.shape[1] == n
                            else resize_pos_embed(pos[:, extra:], model.grid))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    shapes = [f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in out and out[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError("checkpoint does not fit this ViT (wrong --model or --in-chans?)\n"
                         f"  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
                         f"  unexpected: {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}\n"
                         f"  shape mismatch: {shapes[:10]}")
    model.load_state_dict(out, strict=True)
    return model


def build_encoder(name, img_size, checkpoint=None, in_chans=3):
    """vit(name) loaded strictly from `checkpoint` (random init without one): what the probe and
    fine-tuning start from. The number of prefix tokens comes from the checkpoint's cls_token (1, P,
    D): SemanticMIM's has 8 proxies."""
    sd = read_state_dict(checkpoint) if checkpoint else {}
    P = next((v.shape[1] for k, v in sd.items() if k.endswith("cls_token")), 1)
    enc = vit(name, img_size, prefix_tokens=P, in_chans=in_chans)
    return load_encoder(enc, sd) if sd else enc
