"""What every run needs and no method owns: torchrun setup, the batch split, lr schedules,
checkpoints and auto-resume, the non-finite stop, the JSON-lines log and progress line, MFU, the
distributed evaluation, and the flags every script shares. Only functions: no Trainer, no callbacks,
no hidden backward().

The contract every script keeps: `model(*batch) -> (loss, terms)`, a scalar to backpropagate and a
dict of detached scalars to log; `model.encoder` is a vit.ViT (what probes and fine-tuning load);
the checkpoint names its model class (`method`: no run resumes another script's checkpoint); the
data hook (the Seeded transform) is picklable (loader workers receive it).

The loop. kamim.py's train() is the template a new method copies; every script's train() reads the
same, line for line, in this order, except the lines marked as the method's: setup, batch split, lr,
model, optimiser, data, online probe, steps, resume, banner, distribute; then per optimiser step:
set the lr, the micro-batches (method inputs; forward and backward under no_sync and autocast; the
loss terms summed), clip, step, zero_grad, (EMA), count; the log paragraph; the checkpoint
paragraph; the epoch-end paragraph; the --max-steps stop; the summary.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import platform
import subprocess
import time
import zlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import vit


# ---- processes ----

def setup(seed=0):
    """Read torchrun's environment (plain `python script.py` is one process); init NCCL on GPU, gloo
    on CPU. Seeds each rank differently. Returns (rank, world_size, device)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed + rank)
    return rank, world, device


def batch_split(global_batch, world, max_per_gpu):
    """The GLOBAL batch -> (per-GPU micro-batch, gradient-accumulation steps)."""
    per_rank = global_batch // world
    if per_rank * world != global_batch:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
    accum = math.ceil(per_rank / max_per_gpu)
    while per_rank % accum:
        accum += 1
    return per_rank // accum, accum


def distribute(model, device, compile=False):
    """DDP under torchrun, then torch.compile if asked: wrapped first, the compiled graph is split
    at DDP's buckets so the gradient all-reduce overlaps the backward (torch's DDP notes)."""
    net = model
    if dist.is_initialized() and dist.get_world_size() > 1:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if compile else net


def no_sync(net, accumulating):
    """Skip DDP's gradient all-reduce on a micro-batch that is not the step's last."""
    return net.no_sync() if accumulating and hasattr(net, "no_sync") else contextlib.nullcontext()


def autocast(device):
    """bf16 autocast on a GPU; fp32 on the CPU."""
    return (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())


def finish(world):
    if world > 1:
        dist.destroy_process_group()


# ---- schedules: plain functions of the global step, so a resume needs only the step ----

def cosine(step, total, warmup, peak, final=0.0, start=0.0):
    """Linear warmup from `start` to `peak` over `warmup` steps, then half-cosine to `final` at
    `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def timm_cosine(step, total, warmup, peak, final=0.0, start=0.0):
    """timm's CosineLRScheduler (KAMIM's code): ONE cosine from step 0 to `total`, the warmup
    overriding its start."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


# ---- checkpoints ----

def rng_state():
    """This process's CPU and current-GPU generators (rank 0's is what a checkpoint holds)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return dict(cpu=torch.get_rng_state(), cuda=cuda)


def set_rng_state(state, step=0):
    """Rank 0 resumes its saved stream exactly; the other ranks (not saved) seed from (step, rank),
    so no two ranks share a stream after a resume, whatever GPUs are visible now."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank:
        torch.manual_seed(hash((step, rank)))
        return
    torch.set_rng_state(state["cpu"])
    if torch.is_tensor(state["cuda"]) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# the training set in a checkpoint: its file list and the files found unreadable

def skipped(ds):
    """{"skipped": unreadable files so far in the run} for a log record; {} while none."""
    n = int(getattr(getattr(ds, "base", ds), "skipped", 0))
    return {"skipped": n} if n else {}


def fingerprint(ds):
    """{"train images": count, "train file list": CRC of the paths under the folder}: a resume stops
    when images were added, removed or renamed since the checkpoint (the demo: its size)."""
    base = getattr(ds, "base", ds)
    paths = [os.path.relpath(p, base.root) for p, _ in getattr(base, "samples", [])]
    return {"train images": len(base), "train file list": zlib.crc32("\n".join(paths).encode())}


def skip_state(ds):
    """This process's unreadable files (sample indices), for a checkpoint (share_skips first under
    torchrun); restore_skips on resume."""
    bad = getattr(getattr(ds, "base", ds), "bad", None)
    return [] if bad is None else bad.nonzero().flatten().tolist()


def share_skips(ds):
    """Flag on every rank the files any rank found unreadable (a collective under torchrun)."""
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, skip_state(ds))
        restore_skips(ds, sorted(set().union(*every)))


def restore_skips(ds, state):
    """Flag the files skip_state saved: `skipped` counts the whole run, none is announced again."""
    base = getattr(ds, "base", ds)
    if state and max(state) >= len(getattr(base, "bad", ())):
        raise ValueError(f"the checkpoint's unreadable files reach sample {max(state)}; this "
                         f"dataset holds {len(base)} images: is --data the run's?")
    if state:
        base.bad[state] = True


def save_checkpoint(state, out_dir, name="checkpoint.pt"):
    """Atomic (a temp file, then os.replace): a kill mid-write leaves the last good one intact."""
    path = os.path.join(out_dir, name)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_checkpoint(out_dir, name="checkpoint.pt"):
    """out_dir's checkpoint (weights_only: no pickled code runs), or None; a file that is not one
    (random bytes, a truncated copy) stops with its path and the fix."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"not a checkpoint (or a truncated one): {path} ({e.__class__.__name__}); "
                         "delete it to start afresh, or give another --out") from None


# flags that only extend a run: a resume with other values goes on (and says so)
EXTENDING = ("epochs", "save_every", "log_every", "workers", "max_steps", "compile", "micro_batch",
             "out", "resume_anyway", "cache_gib")


def check_resume(saved, new, path):
    """Auto-resume only the same run: changed flags or inputs (keys with a space: the file list, the
    --checkpoint file) stop with the differences and the two ways out; changed EXTENDING flags are
    printed. saved, new: {name: value}."""
    same = lambda a, b: ((list(a) if isinstance(a, tuple) else a)
                         == (list(b) if isinstance(b, tuple) else b))
    diff = [k for k in sorted(set(saved) | set(new)) if not same(saved.get(k), new.get(k))]
    name = lambda k: k if " " in k else "--" + k.replace("_", "-")
    show = lambda ks: "\n".join(f"  {name(k)}: {saved.get(k, '(absent)')} -> "
                                f"{new.get(k, '(absent)')}" for k in ks)
    if [k for k in diff if k in EXTENDING]:
        print(f"resuming {path} with:\n" + show([k for k in diff if k in EXTENDING]), flush=True)
    changed = [k for k in diff if k not in EXTENDING]
    if changed and not new.get("resume_anyway"):
        raise SystemExit(f"{path} belongs to a run with other settings:\n{show(changed[:12])}\n"
                         "Give a new --out for this run, or --resume-anyway to continue the old "
                         "run with these flags.")


def inputs(ds, args):
    """What a run reads besides its flags, for a resume to find again: the training set's
    fingerprint and the --checkpoint file's size and CRC of its first and last MiB."""
    out = {} if ds is None else fingerprint(ds)
    path = getattr(args, "checkpoint", None)
    if path:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(2**20)
            f.seek(max(0, size - 2**20))
            out["checkpoint file"] = f"{size} bytes, crc {zlib.crc32(head + f.read())}"
    return out


def resume(out_dir, model, opt, probe=None, args=None, total=None, ds=None):
    """Auto-resume from out_dir/checkpoint.pt if any (after check_resume on `args`): weights,
    optimiser, RNG, the online probe if both have one, `ds`'s unreadable files. Returns the step to
    go on from (0: none); a run already at `total` says so."""
    ckpt, path = load_checkpoint(out_dir), os.path.join(out_dir, "checkpoint.pt")
    if ckpt is None:
        return 0
    if ckpt.get("method", type(model).__name__) != type(model).__name__:
        raise SystemExit(f"{path} was written by {ckpt['method']} "
                         f"(--model {ckpt['args'].get('model')}), "
                         f"not {type(model).__name__}: give another --out")
    if args is not None:  # inputs: checkpoints from before they were stored have none
        now = {k: v for k, v in inputs(ds, args).items() if k in ckpt.get("inputs", {})}
        check_resume({**ckpt["args"], **ckpt.get("inputs", {})}, {**vars(args), **now}, path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if probe is not None and ckpt.get("probe"):
        probe.load_state_dict(ckpt["probe"])
    if ds is not None:
        restore_skips(ds, ckpt.get("skips", []))
    set_rng_state(ckpt["rng"], ckpt["step"])
    if total is not None and ckpt["step"] >= total:
        print(f"{path}: already finished at step {ckpt['step']} of {total}; nothing to do",
              flush=True)
    return ckpt["step"]


def save_run(out_dir, model, opt, step, args, ds=None, **extra):
    """A checkpoint (rank 0): the unwrapped model, optimiser, step, RNG, vars(args), the model's
    class (`method`), `ds`'s unreadable files (after share_skips) and inputs, and `extra`
    (pretraining: the encoder alone, what probes load, and the online probe; finetune: top-1)."""
    return save_checkpoint(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                rng=rng_state(), args=vars(args), method=type(model).__name__,
                                skips=skip_state(ds) if ds is not None else [],
                                inputs=inputs(ds, args), **extra), out_dir)


def check_finite(loss, step, out_dir, model=None, opt=None):
    """Stop on a non-finite loss (float or 0-d tensor; syncs) before anything overwrites the last
    good checkpoint; with `model` (and `opt`) also on non-finite weights or optimiser state (a
    finite loss can still step into them). A collective: a nan on any rank stops all."""
    tensors = [] if model is None else [*model.parameters(), *model.buffers()]
    tensors += [] if opt is None else [t for s in opt.state.values() for t in s.values()
                                       if torch.is_tensor(t)]
    weights = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    cuda = dist.is_initialized() and dist.get_backend() == "nccl"
    bad = torch.tensor([float(loss), 0.0 if weights else 1.0], device="cuda" if cuda else "cpu")
    if dist.is_initialized():
        dist.all_reduce(bad)
    if math.isfinite(float(bad[0])) and not bad[1]:
        return
    path = os.path.join(out_dir, "checkpoint.pt")
    last = (f"{path} (step {load_checkpoint(out_dir)['step']}) is the last good state"
            if os.path.exists(path) else "no checkpoint was written")
    what = (f"loss ({float(bad[0])})" if not math.isfinite(float(bad[0]))
            else "weights or optimiser state")
    raise SystemExit(f"non-finite {what} at step {step}: stopping without saving; {last}")


# ---- what a run prints and logs ----

def log_json(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_info(args, device):
    """The first JSON-lines record of a run: args, versions, device, git commit."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = subprocess.run("git rev-parse HEAD 2>/dev/null", shell=True, capture_output=True,
                         text=True, cwd=here).stdout.strip() or None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu")
    return dict(args=vars(args), torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), device=name, git=git,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))


def banner(args, device, world, micro, accum, lr, per_epoch, total, step):
    """The start banner (rank 0): every resolved flag, the batch split, the lr and the step count;
    the log's run_info record, or on a resume {"resume": step} (later steps are logged again)."""
    os.makedirs(args.out, exist_ok=True)
    print("args:", "  ".join(f"{k}={v}" for k, v in vars(args).items()))
    print(f"world {world}  global batch {args.batch_size} = {micro} x {accum} accumulation x "
          f"{world} processes  lr {lr}  {per_epoch} steps/epoch, {total} in all"
          + (f"  resuming at step {step}" if step else ""), flush=True)
    record = run_info(args, device) if step == 0 else dict(resume=step, time=time.strftime("%F %T"))
    log_json(os.path.join(args.out, "log.jsonl"), record)


def mean_terms(sums, n):
    """The loss terms summed over n optimiser steps -> each one's mean over the steps and the
    processes (one sync): what a log line shows and check_finite checks."""
    if not sums:
        return {}
    v = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in sums.values()])
    if dist.is_initialized():
        dist.all_reduce(v)
        v /= dist.get_world_size()
    return {k: x / n for k, x in zip(sums, v.tolist())}


PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12}  # dense bf16


def mfu(flops_per_second, device):
    """Model FLOPs utilisation against the GPU's dense bf16 peak (first name match); None on the CPU
    or another GPU."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else flops_per_second / peak


def throughput(images, seconds, flops, device):
    """img/s over all processes, TFLOP/s (flops: per training image), and MFU per GPU (none without
    flops: a probe on cached features runs no encoder)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    ips = images / seconds
    if not flops:
        return dict(img_s=ips)
    return dict(img_s=ips, tflops=ips * flops / 1e12, mfu=mfu(ips * flops / world, device))


def eta(steps_left, seconds_per_step):
    """Remaining time as text, e.g. '1h02m', from the recent seconds per step."""
    m = int(steps_left * seconds_per_step // 60)
    return (f"{m // 60}h{m % 60:02d}m" if m >= 60
            else f"{m}m{int(steps_left * seconds_per_step) % 60:02d}s")


def report(record, out_dir):
    """One progress line on stdout, the same record appended to out_dir/log.jsonl (rank 0)."""
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in record.items()), flush=True)
    log_json(os.path.join(out_dir, "log.jsonl"), record)


def summary(out_dir, step, total, seconds):
    """The closing lines of a run (rank 0): where it stopped, and the files it wrote."""
    figs = sorted(glob.glob(os.path.join(out_dir, "*.png")))
    print(f"{'finished' if step >= total else 'stopped'} at step {step} of {total} "
          f"after {eta(1, seconds)}; the last loss line above has the final losses; "
          f"checkpoint {os.path.join(out_dir, 'checkpoint.pt')}, "
          f"log {os.path.join(out_dir, 'log.jsonl')}"
          + (f", figures {out_dir}/*.png ({len(figs)})" if figs else ""), flush=True)


# ---- evaluation: top-1 / top-5 over the whole val set, each image once ----

@torch.no_grad()
def evaluate(model, dl, device, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, n=None):
    """Top-1 / top-5 (%) and the image count over the whole val set via model.logits (the probe's
    and finetune.py's), each image counted once: the DistributedSampler pads every rank to the same
    length with repeats; position k of rank r's share is image k * world + r, so the padding is
    k * world + r >= n.
    dl: an image loader (uint8 images, normalised here with mean / std), or with n (the val set's
    size) a list of batches of this rank's cache shard (tokens, used as they are). A label -1 (the
    val split's placeholder for an unreadable file) is no image: counted nowhere."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n, k = len(dl.dataset) if n is None else n, 0
    c = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for x, y in dl:
        x, y = x.to(device), y.to(device)
        x = data.normalize_batch(x, mean, std) if x.dtype == torch.uint8 else x
        real = ((torch.arange(k, k + len(y), device=device) * world + rank) < n) & (y >= 0)
        k += len(y)
        with autocast(device):
            out = model.logits(x)
        top = out.topk(min(5, out.shape[1]), dim=1).indices  # (B, 5)
        c += torch.stack([((top[:, 0] == y) & real).sum(),
                          ((top == y[:, None]).any(1) & real).sum(), real.sum()])
    if dist.is_initialized():
        dist.all_reduce(c)
    model.train()
    return (100 * c[0] / c[2]).item(), (100 * c[1] / c[2]).item(), int(c[2])


# ---- the flags every script shares ----

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with the docstring's layout kept and "(default: X)" only where X is a value; a None
    default is resolved later and its help says so."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(doc, **kw):
    """A script's ArgumentParser: its docstring as the description, no abbreviated flags (`--epoch`
    is an error, not --epochs)."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter,
                                   allow_abbrev=False, **kw)


def number(kind, low=0, strict=True, high=None):
    """An argparse type: a `kind` (int / float) above `low` (at least, if not strict) and at most
    `high`."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__}") from None
        if not (v > low if strict else v >= low) or high is not None and v > high or v != v:
            raise argparse.ArgumentTypeError(f"{s} must be {'>' if strict else '>='} {low}"
                                             + (f" and <= {high}" if high is not None else ""))
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def shared_flags(p, out, micro_batch=None, log_every=20, workers=None, out_help="", in_chans=3):
    """The flags every script has, each with its own constraint."""
    a = p.add_argument
    a("--in-chans", type=int, default=in_chans, choices=[1, 3], help="image channels: 3 (RGB) or 1 "
      "(images read as grayscale)" + ("" if in_chans else "; default: the checkpoint's, else 3"))
    a("--mean", type=float, nargs="+", help="per-channel normalisation mean (default ImageNet's; "
      "one channel: its average)")
    a("--std", type=number(float), nargs="+", help="per-channel normalisation std (default "
      "ImageNet's; one channel: its average)")
    a("--micro-batch", type=number(int), default=micro_batch, help="most images per GPU per "
      "forward; gradient accumulation reaches --batch-size"
      + ("" if micro_batch else " (default: the whole per-GPU batch)"))
    a("--out", default=out, help="output folder: log.jsonl, checkpoint.pt (auto-resumed), figures"
      + (f"; {out_help}" if out_help else ""))
    a("--workers", type=number(int, strict=False), default=workers,
      help="data-loader processes per GPU"
      + ("" if workers is not None else " (default 8; demo 1)"))
    a("--seed", type=int, default=0, help="every crop, mask and batch order follows from "
      "(seed, epoch, index)")
    a("--log-every", type=number(int), default=log_every, help="optimiser steps per log line")
    a("--save-every", type=number(int), default=1000, help="optimiser steps per checkpoint (also "
      "at each epoch end)")
    a("--max-steps", type=number(int), help="stop after this many optimiser steps in this "
      "invocation")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume-anyway", action="store_true", help="resume --out's checkpoint even though flags "
      "that change the run differ")


def encoder_flags(args):
    """The probe's and fine-tuning's --model, --in-chans, --mean and --std, where unset: the ones
    our checkpoint stores (printed)."""
    saved = vit.checkpoint_args(args.checkpoint) if args.checkpoint else {}
    same_chans = args.in_chans in (None, saved.get("in_chans"))  # else its mean / std do not fit
    taken = {k: saved[k] for k in ("model", "in_chans", "mean", "std")
             if getattr(args, k) is None and saved.get(k) is not None
             and (same_chans or k in ("model", "in_chans"))}
    if taken.get("model") not in vit.CONFIGS:  # MAE's Namespace: mae_vit_base_patch16
        taken.pop("model", None)
    vars(args).update(taken)
    args.in_chans = args.in_chans or 3
    if taken and int(os.environ.get("RANK", 0)) == 0:
        print(f"from {args.checkpoint}:", "  ".join(f"{k}={v}" for k, v in taken.items()))


def defaults(args, table):
    """Fill each flag left unset (None) from `table`: the script's PAPER or DEMO values."""
    for k, v in table.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


POSITIVE = ("batch_size", "epochs", "wps", "mask_patch", "ref_batch", "knn_k", "decoder_dim",
            "decoder_depth", "decoder_heads", "head_hidden", "hog_bins", "hog_cell", "lr")
NON_NEGATIVE = ("warmup_epochs", "weight_decay", "min_lr", "warmup_lr", "clip_grad", "drop_path",
                "hog_window")


def check_flags(p, args):
    """After the defaults are filled: the numeric method flags (0 or a negative value never reaches
    a division or an optimiser), the image size and the channel statistics."""
    for k, v in vars(args).items():
        if isinstance(v, float) and not abs(v) <= 1e4:  # nan, inf too: no overflow at step 1
            p.error(f"--{k.replace('_', '-')} {v} is out of range (|value| <= 1e4)")
        bad = (k in POSITIVE and v <= 0 or k in NON_NEGATIVE and v < 0
               if isinstance(v, (int, float)) and not isinstance(v, bool) else False)
        if bad:
            p.error(f"--{k.replace('_', '-')} must be {'positive' if k in POSITIVE else '>= 0'} "
                    f"(got {v})")
    for k in ("data", "checkpoint"):  # data/ and data name the same folder: not a changed flag
        if getattr(args, k, None):
            setattr(args, k, os.path.normpath(getattr(args, k)))
    args.img_size = data.image_size(args.img_size)
    try:
        args.mean, args.std = data.channel_stats(args.in_chans, args.mean, args.std)
    except ValueError as e:
        p.error(str(e))
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
