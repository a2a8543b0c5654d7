"""The frozen-feature cache of abmilp_probe.py (--cache-features): each rank runs the frozen encoder
once over its own share of a split and keeps the tokens of the probed block in bf16, on the device
or memory-mapped from a file, so the probe's steps, its evaluation and kNN read tokens instead of
running the encoder on every batch (every pooling of a sweep shares one cache). Only
abmilp_probe.py uses it."""
import argparse
import math
import os
import shutil

import torch
import torch.distributed as dist

import data
import run


def cache_bytes(n, rows, D):
    """A bf16 cache of n images x rows tokens x D. ImageNet train at ViT-B: all 197 tokens 361 GiB;
    condensed (2 rows: [cls], patch mean) 3.7 GiB."""
    return n * rows * D * 2


def memory_budget(device):
    """Bytes a cache may take in memory: 4/5 of the GPU's free memory (the rest for the head's
    step), or on the CPU half the host's RAM over its processes. ImageNet's tokens at vit_b on 8
    GPUs: 45 GiB each."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the allocator's idle blocks count as used in mem_get_info
        return torch.cuda.mem_get_info(device)[0] * 4 // 5
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
            // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def mapped(path, shape):
    """An empty bf16 tensor memory-mapped from a new (sparse) file, unlinked at once: the mapping
    keeps it until the process ends, even a killed one, and nothing is left under --out. A disk
    that fills while it is written kills the process with a bus error and no word: first the
    folder's free space is checked against this machine's shards."""
    folder, procs = os.path.dirname(path) or ".", int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    os.makedirs(folder, exist_ok=True)
    need, free = cache_bytes(*shape) * procs, shutil.disk_usage(folder).free
    if need > free:
        raise SystemExit(f"{folder} has {free:,} bytes free; the memory-mapped feature cache needs "
                         f"{need:,} bytes ({need / 2**30:.2f} GiB, {procs} process(es)): free "
                         "space there, give --out on a larger disk, or raise --cache-gib to hold "
                         "it in memory")
    t = torch.from_file(path, shared=True, size=math.prod(shape), dtype=torch.bfloat16).view(shape)
    os.remove(path)
    return t


@torch.no_grad()
def cache_features(model, dl, tokens, labels, device, mean, std, condensed=False):
    """Fill this rank's shard: tokens (n_r, P + N, D) bf16 with the frozen tokens of dl's images, or
    condensed (n_r, P + 1, D): the prefix tokens and the patch tokens' mean, all that cls / avg /
    kNN read; labels (n_r,).
    dl: data.loader(train=False) of uint8 images, whose position k on rank r is image k * world + r;
    the sampler's padding (the last position, k * world + r >= n) is cut: each image once over the
    ranks."""
    P, k = model.encoder.num_prefix, 0
    for x, y in dl:
        b = min(len(y), len(tokens) - k)
        if b <= 0:
            break
        with run.autocast(device):
            x = data.normalize_batch(x[:b].to(device), mean, std)
            t = model.features(x).float()  # (b, P + N, D)
        t = (torch.cat([t[:, :P], t[:, P:].mean(1, keepdim=True)], 1)  # (b, P + 1, D)
             if condensed else t)
        tokens[k:k + b], labels[k:k + b] = t.to(tokens.device, torch.bfloat16), y[:b]
        k += b
    return tokens, labels


def cached(args, model, ds, transform, split, cache, device):
    """cache[split] = (tokens, labels), this rank's shard (images r, r + world, ...) built on first
    use through `transform` (the probe's val transform: uint8 out) by the loader's workers; its size
    is printed first. On the device if it fits in --cache-gib (default memory_budget), else
    memory-mapped. cache["condensed"] (P + 1 rows, not P + N): abmilp_probe.main's, or this
    probe's need."""
    if split in cache:
        return cache[split]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # a random init differs per rank (seed + rank); DDP broadcasts rank 0's, but only after this
    if world > 1:
        for t in model.encoder.state_dict().values():
            dist.broadcast(t, 0)
    enc, n, condensed = model.encoder, len(ds), cache.setdefault("condensed", args.pool != "abmilp")
    if condensed and args.pool == "abmilp":
        raise ValueError("AbMILP reads every patch token: its cache cannot be condensed")
    shape = (len(range(rank, n, world)),
             enc.num_prefix + (1 if condensed else enc.grid[0] * enc.grid[1]), enc.dim)
    fits = cache_bytes(*shape) <= (memory_budget(device) if args.cache_gib is None
                                   else args.cache_gib * 2**30)
    path = os.path.join(args.out, f"cache_{split}.rank{rank}.bin")
    if rank == 0:
        print(f"caching {split}: {n:,} images x {shape[1]} x {shape[2]} bf16 "
              f"{'condensed ' if condensed else ''}tokens = "
              f"{cache_bytes(n, *shape[1:]) / 2**30:.2f} GiB, "
              f"{cache_bytes(*shape) / 2**30:.2f} GiB per process, "
              f"{'on ' + str(device) if fits else 'memory-mapped from ' + path}", flush=True)
    tokens = (torch.empty(shape, dtype=torch.bfloat16, device=device) if fits
              else mapped(path, shape))
    labels = torch.empty(shape[0], dtype=torch.int64, device=tokens.device)
    dl = data.loader(data.Seeded(ds, transform), args.micro_batch, train=False,
                     workers=args.workers)
    data.set_epoch(dl, 0)
    cache[split] = cache_features(model, dl, tokens, labels, device, args.mean, args.std, condensed)
    return cache[split]


def cache_steps(tokens, labels, micro, accum, per_epoch, epochs, start=0, seed=0):
    """data.train_steps over a cache shard, with no loader and no collate: each epoch one randperm
    of this rank's rows, seeded by (seed, epoch, rank), cut into micro-batches that index the cache
    where it lives; resumed at step `start`, the same batches (drawn on the CPU: the same wherever
    the cache lives; ~50 ms an epoch for ImageNet).
    Yields (epoch, step, accum x (tokens (micro, T, D), labels (micro,)), indexed as they are
    used)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for epoch in range(start // per_epoch, epochs):
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_007 + rank)
        perm = torch.randperm(len(tokens), generator=g).to(tokens.device)
        for step in range(max(start, epoch * per_epoch), (epoch + 1) * per_epoch):
            j = (step - epoch * per_epoch) * accum * micro
            yield epoch, step, ((tokens[i], labels[i])
                                for i in perm[j:j + accum * micro].split(micro))


def shard_batches(tokens, labels, micro):
    """A cache shard as evaluate's and knn's batches: micro-batch views in order (evaluate counts
    position k of rank r as image k * world + r, as the shard holds it)."""
    return [(tokens[i:i + micro], labels[i:i + micro]) for i in range(0, len(tokens), micro)]


def gather(x, n):
    """This rank's share (position k = image k * world + r; loader-padded, or a cache shard one
    shorter) -> all n rows in dataset order on every rank: padded to the longest share, all_gather,
    interleaved, the padding cut."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return x[:n]
    x = torch.cat([x, x.new_zeros(-(-n // world) - len(x), *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.stack(parts, 1).flatten(0, 1)[:n]


def add_flags(p):
    """--cache-features and --cache-gib, the probe's flags for the cache."""
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction,
                   help="compute the frozen tokens of --block once (centre crop, no augmentation; "
                   "bf16; each rank its own images) and train on them: fast for sweeps (on in the "
                   "demo). Without an abmilp pool only [cls] and the patch mean are kept (ImageNet "
                   "at vit_b: 3.7 GiB, not 361)")
    p.add_argument("--cache-gib", type=run.number(float, strict=False),
                   help="most GiB of cache per split and process held in memory (the GPU's on "
                   "CUDA); a larger one is memory-mapped from a file under --out (default: 4/5 of "
                   "the free GPU memory, half the host's RAM)")
