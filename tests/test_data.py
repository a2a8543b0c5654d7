"""data.py: the demo data, datasets and their failure modes, shared crops, seeding, the loader, prefetch."""
import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

import data
import lut
import kamim


def test_demo_dataset_deterministic_labelled_and_has_keypoints():
    a, b = data.DemoShapes("train"), data.DemoShapes("train")
    assert np.array_equal(np.array(a[7][0]), np.array(b[7][0])) and a[7][1] == b[7][1]
    assert not np.array_equal(np.array(a[7][0]), np.array(data.DemoShapes("val")[7][0]))
    assert {a[i][1] for i in range(12)} == set(range(6))
    assert np.mean([kamim.keypoint_map(np.array(a[i][0])).sum() for i in range(6)]) > 5


def test_demo_stripes_run_at_their_class_angle():
    """Classes 0-3: the dominant gradient direction (structure tensor over all channels) is label x 45 degrees."""
    ds = data.DemoShapes("train")
    for i in range(16):
        img, label = ds[i]
        if label > 3:
            continue
        gy, gx = np.gradient(np.asarray(img, np.float64), axis=(0, 1))
        angle = 0.5 * np.degrees(np.arctan2(2 * (gx * gy).sum(), (gx ** 2).sum() - (gy ** 2).sum()))
        assert abs((angle - 45 * label + 90) % 180 - 90) < 10, (i, label, angle)


def test_demo_colour_says_nothing_about_the_class():
    """Every class has the same average colour (200 images each: the centroids agree to 20 of 255 per channel;
    measured 8.7), so a nearest-class-mean on each image's mean colour stays near chance (1/6): only the
    pattern tells the classes apart, and a probe or kNN above chance has read structure, not colour."""
    mean = lambda split, n: (np.stack([np.asarray(data.DemoShapes(split)[i][0], np.float64).mean((0, 1)) for i in range(n)]),
                             np.arange(n) % 6)
    (xt, yt), (xv, yv) = mean("train", 1200), mean("val", 300)
    centroids = np.stack([xt[yt == c].mean(0) for c in range(6)])
    assert np.abs(centroids[:, None] - centroids[None]).max() < 20
    pred = ((xv[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() < 0.3


def write_messy_folder(root):
    """ImageNet's quirks: CMYK, grayscale, a PNG named .JPEG; plus a truncated file and a stray text."""
    for c in ("a", "b"):
        os.makedirs(root / "train" / c / "sub", exist_ok=True)
    Image.new("CMYK", (40, 30), (10, 20, 30, 0)).save(root / "train" / "a" / "cmyk.JPEG")
    Image.new("L", (30, 40), 100).save(root / "train" / "a" / "gray.JPEG")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "train" / "b" / "png.JPEG", format="PNG")
    Image.new("RGB", (32, 32), (4, 5, 6)).save(root / "train" / "b" / "sub" / "nested.jpg")
    good = (root / "train" / "a" / "gray.JPEG").read_bytes()
    (root / "train" / "b" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "fake.jpg").write_text("not a jpeg either")


def test_image_folder_survives_messy_data(tmp_path):
    write_messy_folder(tmp_path)
    ds = data.ImageFiles(str(tmp_path / "train"), labelled=True)
    assert ds.classes == ["a", "b"] and len(ds) == 6  # the .txt is not listed
    items = [ds[i] for i in range(len(ds))]
    assert all(img.mode == "RGB" for img, _ in items) and sorted({l for _, l in items}) == [0, 1]
    assert ds.skipped == 2  # the truncated file and the fake jpg, each replaced by the next image


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.dataset(str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.dataset(str(tmp_path / "empty"), "train")
    (tmp_path / "flat" / "val").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "val" / "x.JPEG")
    with pytest.raises(ValueError, match="flat"):
        data.dataset(str(tmp_path / "flat"), "val", labelled=True)
    assert len(data.dataset(str(tmp_path / "flat"), "val")) == 1  # unlabelled use is fine


def test_seeded_samples_are_independent_of_workers_and_resume():
    ds = data.Seeded(data.DemoShapes("train", size=24), T.Compose([data.crop_flip(32), data.to_uint8()]))
    dl = data.loader(ds, batch_size=4, workers=0)
    data.set_epoch(dl, 3)
    full = [x for x, _ in dl]
    dl2 = data.loader(ds, batch_size=4, workers=2)
    data.set_epoch(dl2, 3, skip_batches=2)
    resumed = [x for x, _ in dl2]
    assert len(resumed) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(full[2:], resumed))
    data.set_epoch(dl, 4)
    assert not torch.equal(next(iter(dl))[0], full[0])  # another epoch, other crops
    a, b = ds[(3, 5)][0], ds[(4, 5)][0]
    assert torch.equal(a, ds[(3, 5)][0]) and not torch.equal(a, b)  # the same image's crop follows the epoch too
    g = torch.get_rng_state()
    ds[0]
    assert torch.equal(g, torch.get_rng_state())  # the caller's RNG is untouched


def test_transforms_shapes():
    img = Image.new("RGB", (300, 200), (120, 60, 30))
    assert kamim.kamim_crop(192)(img).shape == kamim.kamim_crop(192, antialias=True)(img).shape == (192, 192, 3)
    assert lut.mae_crop(224)(img).size == (224, 224)
    assert lut.src_crop(lut.src_resize(img, 224), 224).shape == (3, 224, 224)
    assert data.center_crop(224)(img).shape == (3, 224, 224)
    x = data.normalize()(Image.new("RGB", (4, 4), (255, 0, 0)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([(1 - .485) / .229, -.456 / .224, -.406 / .225]), atol=1e-5)


def test_image_size_and_channels():
    assert data.image_size(192) == data.image_size("192") == (192, 192) and data.image_size("192x256") == (192, 256)
    img = Image.new("RGB", (300, 200), (120, 60, 30))
    assert kamim.kamim_crop("64x96")(img).shape == (64, 96, 3)  # (H, W, 3) uint8
    assert lut.src_resize(img, (64, 96)).size == (144, 96) and lut.src_crop(lut.src_resize(img, (64, 96)), (64, 96)).shape == (3, 64, 96)
    assert data.center_crop((64, 96))(img).shape == (3, 64, 96) and lut.mae_crop((64, 96))(img).size == (96, 64)
    mean, std = data.channel_stats(1)
    assert len(mean) == len(std) == 1 and mean[0] == pytest.approx(sum(data.IMAGENET_MEAN) / 3)
    assert data.channel_stats(3) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    with pytest.raises(ValueError, match="need 1 values"):
        data.channel_stats(1, [0.5, 0.5, 0.5])
    grey = data.normalize(mean, std)(img)  # one channel: PIL's L = 0.299 R + 0.587 G + 0.114 B, rounded
    L = (19595 * 120 + 38470 * 60 + 7471 * 30 + 0x8000) >> 16
    assert grey.shape == (1, 200, 300) and torch.allclose(grey[0, 0, 0], torch.tensor((L / 255 - mean[0]) / std[0]))
    x = data.normalize()(img)[None]
    shown = data.denormalize(x)  # the inverse of normalize, for figures; one channel shown as grey
    assert torch.allclose(shown[0, :, 0, 0], torch.tensor([120, 60, 30]) / 255, atol=1e-6)
    assert data.denormalize(grey[None], mean, std).shape == (1, 3, 200, 300)
    for c, (m, s) in ((3, data.channel_stats(3)), (1, (mean, std))):  # the loaders' uint8, normalised on the device
        u = data.to_uint8(c)(img)
        assert u.dtype == torch.uint8 and u.shape == (c, 200, 300)
        assert torch.allclose(data.normalize_batch(u[None], m, s)[0], data.normalize(m, s)(img), atol=1e-5)


def test_train_steps_resume_mid_epoch():
    ds = data.Seeded(data.DemoShapes("train", size=20), lambda img: 0)
    dl = data.loader(ds, batch_size=2, workers=0)
    idx = lambda run: [(e, s, [b[1].tolist() for b in mb]) for e, s, mb in run]
    full = idx(data.train_steps(dl, epochs=2, accum=2))
    assert [s for _, s, _ in full] == list(range(10)) and [e for e, _, _ in full] == [0] * 5 + [1] * 5
    assert idx(data.train_steps(dl, epochs=2, accum=2, start=3)) == full[3:]
    assert idx(data.train_steps(dl, epochs=2, accum=2, start=7)) == full[7:]


def _three_augment_reference(x, q):
    """torchvision's functional ops one sample at a time, in each sample's order, with its draws."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(len(x)):
        y = x[i].float() / 255
        for j in q["order"][i].tolist():
            y = ops[j](y, q["factors"][i, j].item())
        k = q["pick"][i].item()
        s = q["sigma"][i].item()
        y = TF.rgb_to_grayscale(y, 3) if k == 0 else TF.solarize(y, 128 / 255) if k == 1 else TF.gaussian_blur(y, [9, 9], [s, s])
        out.append(255 * y)
    return torch.stack(out)


def test_three_augment_per_sample_equals_torchvision():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 20, 24), dtype=torch.uint8)
    q = data.three_augment_params(len(x))
    d = (data.three_augment(x, q) - _three_augment_reference(x, q)).abs()
    assert (d > 1e-2).float().mean() < 1e-4 and d.max() < 1.01  # a value exactly at solarize's threshold may flip (by 1 / 255)
    f = torch.rand(8) - 0.5  # hue alone, the whole range
    y = torch.rand(8, 3, 9, 9)
    assert torch.allclose(data.adjust_hue(y, f), torch.stack([TF.adjust_hue(y[i], f[i].item()) for i in range(8)]), atol=1e-5)


def test_three_augment_draws():
    # DeiT III / LUT: ColorJitter(0.4, 0.4, 0.2, 0.1) on 80 %, in a random order; then one of grey / solarize / blur each a third
    q = data.three_augment_params(20000)
    f, on = q["factors"], (q["factors"] != torch.tensor([1.0, 1, 1, 0])).any(1)
    assert abs(on.float().mean() - 0.8) < 0.015 and abs(q["pick"].bincount(minlength=3).float() / 20000 - 1 / 3).max() < 0.015
    lo, hi = f[on].amin(0), f[on].amax(0)
    assert torch.allclose(lo, torch.tensor([0.6, 0.6, 0.8, -0.1]), atol=1e-3) and torch.allclose(hi, torch.tensor([1.4, 1.4, 1.2, 0.1]), atol=1e-3)
    assert torch.equal(q["order"].sort(1).values, torch.arange(4).expand(20000, 4))  # a permutation per sample
    assert (q["order"][:, 0].bincount(minlength=4).float() / 20000 - 0.25).abs().max() < 0.015
    assert q["sigma"].min() >= 0.1 and q["sigma"].max() <= 2.0 and abs(q["sigma"].mean() - 1.05) < 0.02
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(1)
    a = data.three_augment(x)
    torch.manual_seed(1)
    assert torch.equal(a, data.three_augment(x)) and not torch.equal(a, data.three_augment(x))  # seeded by the step's seed


def test_prefetch_same_batches_same_order():
    batches = [(torch.randn(2, 3), [torch.arange(2), torch.ones(1)]) for _ in range(5)]
    for n in (0, 1, 5):
        out = list(data.prefetch(batches[:n], torch.device("cpu")))
        assert len(out) == n and all(torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) for a, b in zip(out, batches))
    ds = data.Seeded(data.DemoShapes("train", size=24), T.Compose([data.crop_flip(32), data.to_uint8()]))
    dl = data.loader(ds, batch_size=4, workers=0)
    plain = [b for _, _, bs in data.train_steps(dl, 2, 1) for b in bs]
    fetched = [b for _, _, bs in data.train_steps(dl, 2, 1, device=torch.device("cpu")) for b in bs]
    assert len(plain) == len(fetched) == 12 and all(torch.equal(a[0], b[0]) for a, b in zip(plain, fetched))


def test_prefetch_decodes_jpegs_on_its_side_stream(monkeypatch):
    # issue 26.2: CUDA decode_jpeg does not wait for the current stream; on the compute stream it
    # could overwrite blocks the queued step still reads. prefetch decodes inside its side stream
    # (CUDA's stream API faked: this machine has no GPU)
    log, jpegs = [], data.JpegBatch(["a", "b"])

    @contextlib.contextmanager
    def stream(s):
        log.append(f"enter {s}"), (yield), log.append(f"exit {s}")
    event = type("Event", (), {"record": lambda self, s: log.append(f"record {s}")})
    compute = type("Compute", (), {"wait_event": lambda self, e: log.append("wait")})()
    for name, fake in [("Stream", lambda device: "side"), ("stream", stream), ("Event", event),
                       ("current_stream", lambda: compute)]:
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(data, "decode_views", lambda b, device, ds: (log.append(f"decode {b}"),
                                                                     (["views"], "keep"))[1])
    out = list(data.prefetch([(jpegs, "y")], torch.device("cuda")))
    assert out == [(data.Decoded((["views"], "keep")), "y")] and isinstance(out[0][0], data.Decoded)
    assert log == ["enter side", "decode ['a', 'b']", "record side", "exit side", "wait"]


def test_persistent_workers_draw_each_epoch_and_resume():
    # the workers persist across epochs: each epoch must still get its own crops, equal to the in-process loader's
    ds = data.Seeded(data.DemoShapes("train", size=24), T.Compose([data.crop_flip(32), data.to_uint8()]))
    ref = [x for _, _, bs in data.train_steps(data.loader(ds, 4, workers=0), 3, 1) for x, _ in bs]
    dl = data.loader(ds, 4, workers=2)
    assert dl.persistent_workers
    got = [x for _, _, bs in data.train_steps(dl, 3, 1) for x, _ in bs]
    assert len(got) == 18 and all(torch.equal(a, b) for a, b in zip(ref, got))
    resumed = [x for _, _, bs in data.train_steps(dl, 3, 1, start=8) for x, _ in bs]  # mid-epoch 1, same workers
    assert len(resumed) == 10 and all(torch.equal(a, b) for a, b in zip(ref[8:], resumed))
