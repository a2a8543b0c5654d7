"""Images in, batches out: image folders and the built-in demo dataset, the one image reader,
normalisation, the crops more than one script uses, seeding (every sample a pure function of
(seed, epoch, index), so a killed run resumes mid-epoch on the same batches), the rank-sharded
loader and train_steps. The optional speed machinery comes last, under its own banner. A piece only
one method uses lives in that method's script."""
import io
import os
import random
import sys
import warnings

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
import torchvision
from torchvision import transforms as T
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
warnings.filterwarnings("ignore", message="(Possibly )?corrupt EXIF data", category=UserWarning)
warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)


# ---- datasets: each returns (PIL RGB image, label) ----

def read_image(path):
    """The one image reader -> PIL RGB. EXIF orientation applied (phone and camera photos); CMYK,
    grey and a PNG named .JPEG converted; 16-bit and 32-bit grey (I;16, I: 0..65535; F: 0..1) scaled
    to 8 bits, not clipped to white; transparency (RGBA, LA, P with a transparent colour) composited
    over black."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float64) * (255 if im.mode == "F" else 255 / 65535)
            im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or im.mode == "P" and "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)),
                                       im.convert("RGBA"))
        return im.convert("RGB")


def readable(path):
    try:
        return read_image(path) is not None
    except Exception:
        return False


def class_folders(root):
    """{class: folder}: root's sub-folders, hidden ones (.ipynb_checkpoints) not classes. A link is
    followed unless it leads back into the tree or to a folder a link before it took
    (train/loop -> . would be a class of every image again): a warning names it."""
    taken, out = [os.path.realpath(root)], {}
    for e in sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
                    key=lambda e: e.name):
        real = os.path.realpath(e.path)
        if e.is_symlink() and any(os.path.commonpath([real, t]) in (real, t) for t in taken):
            print(f"warning: {e.path} -> {real} leads back into {root} or to a folder already "
                  "read: not followed", file=sys.stderr)
            continue
        taken += [real] if e.is_symlink() else []
        out[e.name] = e.path
    return out


def image_files(top):
    """The image files under `top`, nested ones too (links to sub-folders not followed), in a fixed
    order."""
    return [os.path.join(d, f) for d, _, fs in sorted(os.walk(top)) for f in sorted(fs)
            if f.lower().endswith(IMG_EXTS)]


class ImageFiles(torch.utils.data.Dataset):
    """Images under `root`, labelled by class sub-folder (nested files too; a folder without images
    is no class); without sub-folders, one unlabelled class (label 0). `classes`: train's class map,
    for val. An unreadable file is warned about and flagged once a run (`bad`, shared by the
    workers); the next file stands in, or with substitute=False (evaluation) a black placeholder
    labelled -1 that no count includes."""
    def __init__(self, root, labelled=False, classes=None, substitute=True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root} does not exist")
        self.root, folders = root, class_folders(root)
        if labelled and not folders:
            raise ValueError(f"{root} holds no class folders; ImageNet's val split often comes "
                             "flat: sort it into class folders first (e.g. with the widely used "
                             "valprep.sh)")
        files = {c: image_files(d) for c, d in folders.items()}
        found, empty = [c for c in folders if files[c]], [c for c in folders if not files[c]]
        if empty:
            print(f"warning: {root}: class folders without images are not classes: {empty[:5]}",
                  file=sys.stderr)
        if classes is not None and set(found) - set(classes):
            raise ValueError(f"{root} has images of classes the training split lacks (or holds no "
                             f"images of): {sorted(set(found) - set(classes))[:5]}")
        if classes is not None and set(classes) - set(found):
            print(f"warning: {root} lacks {len(set(classes) - set(found))} of the training "
                  f"classes, e.g. {sorted(set(classes) - set(found))[:3]}", file=sys.stderr)
        self.classes = list(classes if classes is not None else found)
        label = {c: k for k, c in enumerate(self.classes)}
        self.samples = ([(f, label[c]) for c in found for f in files[c]] if folders else
                        [(f, 0) for f in image_files(root)])  # no sub-folders: one unlabelled class
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMG_EXTS)}) found under {root}")
        # before any worker starts
        sample = [p for p, _ in self.samples[::max(1, len(self.samples) // 16)][:16]]
        if not any(readable(p) for p in sample):
            raise ValueError(f"none of the {len(sample)} images sampled under {root} can be read, "
                             f"e.g. {sample[:3]}")
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self.encoded, self.substitute = False, substitute  # encoded: samples are Jpegs

    @property
    def skipped(self):
        return int(self.bad.sum())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in range(i, i + 100):
            j %= len(self.samples)
            path, label = self.samples[j]
            try:
                return (Jpeg.read(path, j) if self.encoded else read_image(path)), label
            except Exception as e:  # truncated or not an image at all
                self.unreadable(j, e)
            # evaluation: never the next file, which would be scored in its place
            if not self.substitute:
                img = Image.new("RGB", (32, 32))
                return (Jpeg.encode(img) if self.encoded else img), -1
        raise RuntimeError(f"100 unreadable images in a row from {path}: is the data folder right?")

    def unreadable(self, j, why):
        """Flag file j as unreadable and warn, once a run (a worker's read or a device decode)."""
        if not self.bad[j]:
            self.bad[j] = True
            print(f"warning: skipping unreadable image {self.samples[j][0]} ({why}); "
                  f"{self.skipped} skipped in this run", file=sys.stderr)


class DemoShapes(torch.utils.data.Dataset):
    """The demo dataset: 128 x 128 images of 6 pattern classes (stripes at 4 angles | / - \\,
    checkers, dots) in two random colours, random period (10-20 px) and phase, over noise; image i
    is a pure function of (split, i). The class is in the structure, not the colour (kNN: random
    init 33 %). Checkers and dots have FAST corners, stripes few. A smoke test, not a benchmark."""
    classes = ["stripes_vertical", "stripes_rising", "stripes_horizontal", "stripes_falling",
               "checkers", "dots"]

    def __init__(self, split="train", size=None, img_size=128, encoded=False):
        self.split, self.img_size, self.encoded = split, img_size, encoded
        self.n = size or (1536 if split == "train" else 384)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label, s = i % len(self.classes), self.img_size
        rng = np.random.default_rng([i, 0 if self.split == "train" else 1])
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        while np.abs(c1 - c2).mean() < 60:  # enough contrast that the pattern is always visible
            c2 = rng.integers(0, 256, 3)
        # wave number, angle
        k, th = 2 * np.pi / rng.uniform(10, 20), np.pi / 4 * label if label < 4 else 0.0
        y, x = np.mgrid[0:s, 0:s].astype(np.float32)
        u = k * (np.cos(th) * x + np.sin(th) * y) + rng.uniform(0, 2 * np.pi)
        v = k * (np.cos(th) * y - np.sin(th) * x) + rng.uniform(0, 2 * np.pi)
        on = (np.sin(u) > 0 if label < 4
              else np.sin(u) * np.sin(v) > 0 if label == 4
              else np.cos(u) + np.cos(v) > 1)
        img = (np.where(on[..., None], c1, c2)
               + cv2.GaussianBlur(rng.normal(0, 24, (s, s, 3)), (0, 0), 1.5))
        img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        return (Jpeg.encode(img) if self.encoded else img), label


def dataset(data, split, labelled=False, classes=None, encoded=False):
    """`--data PATH` -> PATH/split (pretraining: PATH itself if it has none); None -> the demo.
    Labelled (probes): PATH/train and PATH/val must both exist. `classes`: train's class map, for
    val, which scores a placeholder (-1) for an unreadable file, never the next file."""
    if data is None:
        return DemoShapes(split, encoded=encoded)
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    if labelled and not all(os.path.isdir(os.path.join(data, s)) for s in ("train", "val")):
        raise ValueError(f"--data {data} needs train/ and val/ sub-folders of classes: evaluating "
                         "on the training folder itself would report top-1 on training images")
    root = os.path.join(data, split) if os.path.isdir(os.path.join(data, split)) else data
    ds = ImageFiles(root, labelled, classes, substitute=split != "val")
    ds.encoded = encoded
    return ds


# ---- normalisation and the shared crops (PIL in; what each returns is said) ----

def image_size(size):
    """--img-size: 192 or "192" -> (192, 192); "192x256" -> (height 192, width 256); each side must
    divide by the patch (and the mask cell, if any)."""
    if isinstance(size, (tuple, list)):
        return tuple(size)
    h, _, w = str(size).partition("x")
    return int(h), int(w or h)


def channel_stats(in_chans=3, mean=None, std=None):
    """Per-channel (mean, std) for --in-chans: ImageNet's by default, their averages for one channel
    (grayscale)."""
    mean = mean or (IMAGENET_MEAN if in_chans == 3 else (sum(IMAGENET_MEAN) / 3,) * in_chans)
    std = std or (IMAGENET_STD if in_chans == 3 else (sum(IMAGENET_STD) / 3,) * in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"--mean / --std need {in_chans} values each for --in-chans {in_chans} "
                         f"(got {len(mean)} and {len(std)})")
    return tuple(mean), tuple(std)


def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL -> float tensor (C, H, W), C = len(mean) (1: grayscale, PIL's "L"): [0, 1] then mean /
    std."""
    return T.Compose(([T.Grayscale(1)] if len(mean) == 1 else [])
                     + [T.ToTensor(), T.Normalize(mean, std)])


def to_uint8(in_chans=3):
    """PIL -> uint8 tensor (C, H, W), what the pretraining loaders ship (a quarter of the bytes);
    normalize_batch finishes on the GPU."""
    return T.Compose(([T.Grayscale(1)] if in_chans == 1 else []) + [T.PILToTensor()])


def normalize_batch(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (B, C, H, W) -> float (x / 255 - mean) / std, on x's device (Python scalars: no host
    copy)."""
    x = x.float()
    return torch.cat([(x[:, c:c + 1] - 255 * m) / (255 * s)
                      for c, (m, s) in enumerate(zip(mean, std))], dim=1)


def denormalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """For figures: (B, C, H, W) normalised -> (B, 3, H, W) in [0, 1] (one channel shown as
    grey)."""
    m, s = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in (mean, std))
    return (x * s + m).clamp(0, 1).expand(-1, 3, -1, -1)


def crop_flip(img_size=224, scale=(0.08, 1.0)):
    """Random resized crop (bicubic) + flip -> PIL: the linear probe's (MAE, scale (0.08, 1)) and
    SemanticMIM's (scale (0.5, 1), App. E)."""
    return T.Compose([T.RandomResizedCrop(image_size(img_size), scale=scale,
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip()])


def center_crop(img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, uint8=False):
    """Evaluation: resize to img_size * 256 / 224 (bicubic; a non-square size's longer side), centre
    crop img_size -> normalised tensor (uint8: the uint8 tensor, for normalize_batch)."""
    size = image_size(img_size)
    return T.Compose([T.Resize(int(max(size) * 256 / 224),
                               interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), to_uint8(len(mean)) if uint8 else normalize(mean, std)])


# ---- loading ----

class Seeded(torch.utils.data.Dataset):
    """`transform` (PIL -> anything) of `base`'s samples with the RNGs seeded from (seed, epoch, i):
    the same tensor whatever the worker count or resume point. Indexed by i (at self.epoch) or by
    (epoch, i), as loader's sampler does (persistent workers hold their own self.epoch)."""
    def __init__(self, base, transform, seed=0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        s = (self.seed * 1_000_003 + epoch) * 10_000_019 + i
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone (num_workers=0)
            # CPU only: torch.manual_seed would reset the GPU's too
            torch.default_generator.manual_seed(s)
            random.seed(s)
            img, label = self.base[i]
            out = self.transform(img), label
        random.setstate(py_state)
        return out


class Sampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start mid-epoch (`skip` samples of this rank's share dropped, for
    a resume); for a Seeded dataset it yields (epoch, index), so workers persist across epochs."""
    skip = 0

    def __iter__(self):
        ids = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in ids] if isinstance(self.dataset, Seeded) else ids)

    def __len__(self):
        return super().__len__() - self.skip


def worker_init(_):
    # OpenCV threads inside DataLoader workers oversubscribe or deadlock (pytorch#1355)
    cv2.setNumThreads(0)


def loader(ds, batch_size, train=True, workers=8, seed=0):
    """Rank-sharded DataLoader over a Seeded dataset (shuffled, drop_last for training); call
    set_epoch(loader, epoch, skip_batches) before each epoch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sampler = Sampler(ds, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train)
    return torch.utils.data.DataLoader(ds, batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=train,
                                       worker_init_fn=worker_init, persistent_workers=workers > 0,
                                       collate_fn=collate)


def set_epoch(dl, epoch, skip_batches=0):
    dl.sampler.set_epoch(epoch)
    dl.sampler.skip = skip_batches * dl.batch_size
    dl.dataset.epoch = epoch


def train_steps(dl, epochs, accum, start=0, device=None):
    """Yield (epoch, step, [accum micro-batches]) for optimiser steps start .. the last, skipping
    the batches a resumed run already did; with a `device`, the batches arrive there (prefetch)."""
    dl.sampler.skip = 0
    per_epoch = len(dl) // accum
    if per_epoch == 0:
        raise ValueError(f"{len(dl.dataset)} images give no full step of {accum} x {dl.batch_size} "
                         "per process")
    for epoch in range(start // per_epoch, epochs):
        first = max(start, epoch * per_epoch)
        set_epoch(dl, epoch, (first - epoch * per_epoch) * accum)
        it = iter(dl) if device is None else prefetch(dl, device)
        for step in range(first, (epoch + 1) * per_epoch):
            yield epoch, step, [next(it) for _ in range(accum)]


# ==== optional speed machinery ====
# Not needed to read or run the methods: each piece keeps a GPU fed at ImageNet scale
# (benchmarks/README.md has the figures): prefetch overlaps the host-to-device copy with compute;
# --decode device moves JPEG decoding onto the GPU (nvJPEG), the workers only reading files and
# drawing crops; LUT's colour augmentation runs per sample on the device instead of in the workers.

# ---- prefetch: the next batch's copy on a side CUDA stream ----

def prefetch(batches, device):
    """Yield `batches` on `device`, one ahead: on CUDA batch n + 1's copy (and decode, --decode
    device) is queued on a side stream before batch n is handed out, overlapping batch n's compute;
    the compute stream waits on batch n's event alone, and record_stream keeps the allocator from
    reusing its memory early. On the CPU: the same batches in the same order."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    ds, ahead = getattr(batches, "dataset", None), None
    for b in batches:
        b = _copy_on(side, b, device, ds)
        if ahead is not None:
            yield _ready(*ahead)
        ahead = b
    if ahead is not None:
        yield _ready(*ahead)


def _copy_on(side, batch, device, ds=None):
    """(batch on device and decoded, the event its copy and decode complete at; None off CUDA)."""
    if side is None:
        return to_device(batch, device, ds), None
    with torch.cuda.stream(side):
        batch, done = to_device(batch, device, ds), torch.cuda.Event()
        done.record(side)
    return batch, done


def to_device(batch, device, ds=None):
    """Every tensor of a (nested) tuple / list batch to `device` (asynchronous from pinned memory),
    each JpegBatch decoded there (Decoded). prefetch calls it on its side stream: CUDA decode_jpeg
    does not wait for the current stream, so on the compute stream it could be handed blocks the
    step's queued kernels still read; the side stream's pool holds none of those."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, JpegBatch):
        return Decoded(decode_views(batch, device, ds))
    return (type(batch)(to_device(b, device, ds) for b in batch)
            if isinstance(batch, (list, tuple)) else batch)


def _ready(batch, done):
    if done is not None:
        compute = torch.cuda.current_stream()  # setup() made this rank's GPU the current device
        compute.wait_event(done)
        for t in _tensors(batch):
            t.record_stream(compute)
    return batch


def _tensors(batch):
    if torch.is_tensor(batch):
        return [batch]
    return [t for b in batch for t in _tensors(b)] if isinstance(batch, (list, tuple)) else []


# ---- --decode device: the worker reads the file and draws the crop, the GPU decodes ----

class Jpeg:
    """A JPEG's bytes (uint8 (n,) tensor) and size (W, H), undecoded; `views`: the crops to take
    (crop_spec rows); `path`, `index`: its file and sample (for decode_views' skip). A file nvJPEG
    cannot take as it is (a PNG named .JPEG, CMYK, 16-bit, EXIF-rotated, truncated) is decoded by
    read_image and re-encoded at quality 95: rare in ImageNet, lossy for those few."""
    def __init__(self, data, size):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.size, self.views = size, None
        self.path, self.index = None, None

    @staticmethod
    def read(path, index=None):
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            plain = (im.format == "JPEG" and im.mode in ("RGB", "L")
                     and im.getexif().get(0x0112, 1) == 1)
            size = im.size
        j = (Jpeg(raw, size) if plain and raw.rstrip(b"\0")[-2:] == b"\xff\xd9"
             else Jpeg.encode(read_image(path)))
        j.path, j.index = path, index
        return j

    def image(self):
        """Decoded on the CPU by PIL -> RGB (figures)."""
        return read_image(io.BytesIO(self.data.numpy().tobytes()))

    @staticmethod
    def encode(img):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        return Jpeg(buf.getvalue(), img.size)


def rrc_spec(jpeg, img_size, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop + RandomHorizontalFlip's draws on a Jpeg's size, in their order: the
    crop_spec row."""
    (w, h), out = jpeg.size, image_size(img_size)
    top, left, ch, cw = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, h, w),
                                                       scale, ratio)
    return [h, w, top, left, ch, cw, *out, int(torch.rand(1) < 0.5)]


class JpegBatch(list):
    """The Jpegs of a batch, a list on the host (decode_jpeg takes host bytes) until to_device."""


def collate(samples):
    """default_collate, except that Jpeg fields become a JpegBatch."""
    if isinstance(samples[0], Jpeg):
        return JpegBatch(samples)
    if isinstance(samples[0], (tuple, list)):
        return [collate(list(f)) for f in zip(*samples)]
    return torch.utils.data.default_collate(samples)


def crop_spec(img, spec):
    """One view of a decoded uint8 (C, H, W) image by its row [rh, rw, top, left, h, w, out_h,
    out_w, flip]: resized to rh x rw (bicubic, antialiased), the h x w window at (top, left) (its
    outside reflected), resized to out_h x out_w, flipped."""
    rh, rw, t, l, h, w, oh, ow, flip = spec
    bicubic = lambda x, size: v2.functional.resize(x, size, T.InterpolationMode.BICUBIC,
                                                   antialias=True)
    x = img if img.shape[1:] == (rh, rw) else bicubic(img, [rh, rw])
    x = x[:, max(t, 0):t + h, max(l, 0):l + w]
    pad = (max(-l, 0), max(l + w - rw, 0), max(-t, 0), max(t + h - rh, 0))
    x = F.pad(x[None].float(), pad, mode="reflect")[0].to(x.dtype) if any(pad) else x
    x = x if (h, w) == (oh, ow) else bicubic(x, [oh, ow])
    return x.flip(-1) if flip else x


def decode_views(batch, device, ds=None):
    """A JpegBatch -> (views, keep): each view a uint8 (B', 3, H, W) batch on `device`; keep (B',):
    the positions of the images they hold. One batched decode_jpeg (nvJPEG on CUDA), then crop_spec
    per image and view; a batch nvJPEG refuses is decoded image by image on the CPU, and an image
    that still fails (a damaged body behind intact markers) is left out and flagged in `ds`."""
    data, rgb = [j.data for j in batch], torchvision.io.ImageReadMode.RGB
    # torchvision 0.29 deprecates its image io (for TorchCodec); it still works
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            imgs = torchvision.io.decode_jpeg(data, mode=rgb, device=device)
        except RuntimeError:
            imgs = [decode_one(j, device, ds) for j in batch]
    kept = [k for k, img in enumerate(imgs) if img is not None]
    if not kept:
        raise RuntimeError(f"none of a batch's {len(batch)} images decodes, e.g. {batch[0].path}: "
                           "is the data right?")
    views = [torch.stack([crop_spec(imgs[k], batch[k].views[v]) for k in kept])
             for v in range(len(batch[0].views))]
    whole = len(kept) == len(batch)  # the usual batch: an arange, no host-to-device copy to wait on
    return views, (torch.arange(len(batch), device=device) if whole
                   else torch.tensor(kept, device=device))


class Decoded(tuple):
    """(views, keep), decode_views' result, where to_device decoded a JpegBatch."""


def decode_one(jpeg, device, ds=None):
    """A Jpeg decoded on the CPU -> uint8 (3, H, W) on `device`; None if it cannot be (flagged in
    ds, or warned)."""
    try:
        rgb = torchvision.io.ImageReadMode.RGB
        return torchvision.io.decode_jpeg(jpeg.data, mode=rgb).to(device)
    except RuntimeError as e:
        base = getattr(ds, "base", ds)
        if hasattr(base, "unreadable") and jpeg.index is not None:
            base.unreadable(jpeg.index, e)
        else:
            print(f"warning: skipping an undecodable image {jpeg.path or '(in memory)'} ({e})",
                  file=sys.stderr)
        return None


# ---- colour augmentation per sample on the device: the worker decodes and crops ----

def gray(x):
    """ITU-R 601 luma with torchvision's weights: (B, 3, H, W) -> (B, 1, H, W), any value scale."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_hue(x, f):
    """Rotate each image's hue by f (B,) turns in HSV, torchvision's adjust_hue per sample.
    (B, 3, H, W) in [0, 1]."""
    mx, mn = x.amax(1), x.amin(1)  # (B, H, W): V and V - chroma
    r, g, b = x.unbind(1)
    c = (mx - mn).clamp_min(1e-12)  # chroma 0: S = 0 below, so H does not matter
    h = torch.where(mx == r, (g - b) / c,
                    torch.where(mx == g, 2 + (b - r) / c, 4 + (r - g) / c)) / 6
    h = (h + f.view(-1, 1, 1)) % 1
    s = (mx - mn) / mx.clamp_min(1e-12)
    # HSV -> RGB, channels R, G, B
    k = (torch.arange(5, 0, -2, device=x.device).view(1, 3, 1, 1) + 6 * h[:, None]) % 6
    return mx[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x, factors, order):
    """ColorJitter per sample, (B, 3, H, W) in [0, 1]: factors (B, 4) for brightness, contrast,
    saturation, hue (identity 1, 1, 1, 0), order (B, 4) each sample's sequence; torchvision's
    blends. Each of the 4 positions runs every adjustment on the whole batch (the identity where
    not that sample's): no per-sample indexing, no host sync."""
    blend = lambda a, y, t: (t.view(-1, 1, 1, 1) * a + (1 - t.view(-1, 1, 1, 1)) * y).clamp(0, 1)
    identity = (torch.arange(4, device=x.device) < 3).to(factors)  # (1, 1, 1, 0)
    for k in range(4):
        t = torch.where(order[:, k:k + 1] == torch.arange(4, device=x.device), factors, identity)
        x = blend(x, torch.zeros_like(x[:, :1]), t[:, 0])  # brightness: towards black
        # contrast: towards the mean grey
        x = blend(x, gray(x).mean((1, 2, 3), keepdim=True), t[:, 1])
        x = blend(x, gray(x), t[:, 2])  # saturation: towards the grey image
        x = adjust_hue(x, t[:, 3])
    return x


def gaussian_blur(x, sigma, k=9):
    """torchvision's GaussianBlur(k) with one sigma (B,) per sample: separable, reflect padding.
    (B, C, H, W) -> same."""
    B, C, H, W = x.shape
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device)
    g = (-0.5 * (t / sigma[:, None]) ** 2).exp()
    # (B * C, k): one kernel per channel of each sample
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(C, 0)
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(F.conv2d(y, g[:, None, :, None], groups=B * C), g[:, None, None, :], groups=B * C)
    return y.view(B, C, H, W)


def three_augment_params(B, device=None, jitter=(0.4, 0.4, 0.2, 0.1), p=0.8):
    """The draws of LUT's context view per sample: ColorJitter(jitter) applied with probability p
    (factors U(1 - a, 1 + a), hue U(-h, h), identity where not applied) in a random order; then pick
    0 grayscale, 1 solarize, 2 Gaussian blur with sigma ~ U(0.1, 2), one each, uniformly. Returns
    dict(factors (B, 4), order (B, 4), pick (B,), sigma (B,))."""
    r = lambda *shape: torch.rand(*shape, device=device)
    # U(-1, 1); (1, 1, 1, 0)
    u, identity = 2 * r(B, 4) - 1, (torch.arange(4, device=device) < 3).float()
    # (B, 4); Python scalars: no host copy
    f = identity + torch.stack([a * u[:, i] for i, a in enumerate(jitter)], 1)
    f = torch.where(r(B, 1) < p, f, identity)
    return dict(factors=f, order=r(B, 4).argsort(1), pick=torch.randint(0, 3, (B,), device=device),
                sigma=0.1 + 1.9 * r(B))


def three_augment(x, params=None):
    """LUT's context view on top of SRC, per sample on the device (DeiT III's 3-Augment): colour
    jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, then one of grayscale / solarize (128) / Gaussian blur
    9 x 9. uint8 (B, 3, H, W) -> float in [0, 255]. params: three_augment_params' (or drawn)."""
    q = three_augment_params(x.shape[0], x.device) if params is None else params
    x = color_jitter(x.float() / 255, q["factors"], q["order"])
    pick = q["pick"].view(-1, 1, 1, 1)
    x = torch.where(pick == 0, gray(x).expand_as(x), x)
    # solarize: invert at and above 128 of 255
    x = torch.where((pick == 1) & (x >= 128 / 255), 1 - x, x)
    return 255 * torch.where(pick == 2, gaussian_blur(x, q["sigma"]), x)
