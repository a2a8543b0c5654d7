"""Never a silently wrong number (issue 15): each bad input below gets a correct result or a clear, early error.

| input | what it gets |
| --- | --- |
| val lacks a train class / train has a hidden folder (.ipynb_checkpoints) | one class map from train; hidden folders are not classes; a warning names the missing class |
| val has a class train lacks | error naming the class |
| a probe / fine-tune `--data` without train/ and val/ | error: it would measure on training images |
| 16-bit (I;16), 32-bit (I, F) grey, P with transparency, LA, RGBA | scaled to 8 bits / composited over black, not white or garbage |
| a JPEG with an EXIF rotation tag | rotated upright (ImageOps.exif_transpose) |
| a folder of unreadable files only | one error naming the folder before any worker starts |
| unreadable files among good ones | skipped, counted over the whole run (all workers), `skipped` in the log |
| rerun into an --out whose run had other flags (batch, seed, detector, model ...) | stop with the differences and the two ways out (new --out, --resume-anyway) |
| rerun with more --epochs / other --log-every, --save-every, --workers | allowed, printed |
| rerun of a finished run | "already finished at step N", exit 0, checkpoint untouched |
| another script's checkpoint in --out | error naming the script and model that wrote it |
| random bytes / a truncated checkpoint.pt / a text file as --checkpoint | "not a checkpoint: PATH" |
| 0 or negative --batch-size, --micro-batch, --epochs, --log-every, --save-every, --max-steps, --wps, --lr ... | parser error naming the flag, in every script |
| `python abmilp_probe.py` after probing a checkpoint | its own --out (runs/abmilp_probe/random_init), never the other's heads |
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import abmilp_probe
import data
import vit
import run
import finetune
import kamim
import lut
import semanticmim

pytestmark = pytest.mark.usefixtures("one_thread")


def folder(root, split, classes, n=2):
    for c in classes:
        os.makedirs(root / split / c, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.JPEG")


def test_one_class_map_from_train(tmp_path, capsys):
    folder(tmp_path, "train", ["a", "b", "c", ".ipynb_checkpoints"])
    folder(tmp_path, "val", ["a", "c"])
    train = data.dataset(str(tmp_path), "train", labelled=True)
    val = data.dataset(str(tmp_path), "val", labelled=True, classes=train.classes)
    assert train.classes == ["a", "b", "c"] and val.classes == train.classes  # hidden folder: no class
    assert {os.path.basename(os.path.dirname(p)): l for p, l in val.samples} == {"a": 0, "c": 2}  # c is 2, as in train
    assert "lacks 1 of the training classes" in capsys.readouterr().err
    folder(tmp_path, "val", ["d"])
    with pytest.raises(ValueError, match="'d'"):
        data.dataset(str(tmp_path), "val", labelled=True, classes=train.classes)


def test_labelled_data_needs_both_splits(tmp_path):
    folder(tmp_path, "train", ["a", "b"])
    for d in (tmp_path, tmp_path / "train"):  # PATH without val/, and PATH/train itself
        with pytest.raises(ValueError, match="train/ and val/"):
            data.dataset(str(d), "val", labelled=True)
    assert len(data.dataset(str(tmp_path / "train"), "train")) == 4  # pretraining on any folder is fine


@pytest.mark.parametrize("mode,array,want", [
    ("I;16", np.array([[0, 257 * 128, 65535]], np.uint16), [0, 128, 255]),  # 16-bit PNG: scaled, not white
    ("I", np.array([[0, 257 * 64, 65535]], np.int32), [0, 64, 255]),
    ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
])
def test_high_bit_depth_grey_is_scaled_to_8_bits(tmp_path, mode, array, want):
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith(mode[0])
    img = np.asarray(data.read_image(str(path)))
    assert img.shape == (1, 3, 3) and img[0, :, 0].tolist() == want and (img[..., 0] == img[..., 2]).all()


def test_transparency_is_composited_over_black(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    rgba.putpixel((1, 0), (200, 100, 50, 0))  # fully transparent: black, not the hidden colour
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (1, 1), (200, 128))
    la.save(tmp_path / "la.png")
    p = Image.new("P", (2, 1), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(data.read_image(str(tmp_path / "rgba.png"))).tolist() == [[[200, 100, 50], [0, 0, 0]]]
    assert np.asarray(data.read_image(str(tmp_path / "la.png")))[0, 0].tolist() == [100] * 3  # 200 x 128/255
    assert np.asarray(data.read_image(str(tmp_path / "p.png")))[0].tolist() == [[0, 0, 0], [0, 0, 0]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif)
    up = data.read_image(str(tmp_path / "phone.jpg"))
    assert up.size == (20, 40)
    assert np.asarray(up)[5, 10, 2] > 200 and np.asarray(up)[35, 10, 0] > 200  # the blue left edge is now on top


def test_unreadable_folder_fails_early_and_skips_are_counted_over_the_run(tmp_path):
    os.makedirs(tmp_path / "bad")
    for i in range(20):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of the 16 images sampled under .*bad"):
        data.dataset(str(tmp_path / "bad"), "train")
    folder(tmp_path, "mixed", ["a"], n=6)
    for i in (1, 3, 5):  # each between good ones: one skip each, the next file stands in
        (tmp_path / "mixed" / "a" / f"{i}x.JPEG").write_bytes(b"truncated")
    ds = data.Seeded(data.ImageFiles(str(tmp_path / "mixed")), data.to_uint8())
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    assert sum(len(x) for x, _ in dl) == 9
    assert run.skipped(ds) == {"skipped": 3}  # all workers together, seen in the main process


def small_kamim(tmp_path, monkeypatch, *flags):
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None, encoded=False: data.DemoShapes(split, 8, encoded=encoded))
    return kamim.main(["--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--img-size", "32",
                       "--no-online-probe", "--out", str(tmp_path), *flags])


def test_resume_refuses_changed_flags_and_a_finished_run_touches_nothing(tmp_path, monkeypatch, capsys):
    small_kamim(tmp_path, monkeypatch)
    ckpt = tmp_path / "checkpoint.pt"
    stamp = os.stat(ckpt).st_mtime_ns
    small_kamim(tmp_path, monkeypatch)  # the same command again: finished, nothing written
    assert "already finished at step 1 of 1" in capsys.readouterr().out and os.stat(ckpt).st_mtime_ns == stamp
    for changed in (["--seed", "1"], ["--detector", "orb"], ["--temperature", "0.5"]):
        with pytest.raises(SystemExit, match=f"--{changed[0][2:]}: .* -> .*\n.*new --out.*--resume-anyway"):
            small_kamim(tmp_path, monkeypatch, *changed)
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None, encoded=False: data.DemoShapes(split, 16, encoded=encoded))
    with pytest.raises(SystemExit, match="batch_size|batch-size"):
        kamim.main(["--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--img-size", "32",
                    "--no-online-probe", "--out", str(tmp_path)])
    assert os.stat(ckpt).st_mtime_ns == stamp
    small_kamim(tmp_path, monkeypatch, "--epochs", "2", "--log-every", "5")  # extending: allowed and said
    out = capsys.readouterr().out
    assert "--epochs: 1 -> 2" in out and torch.load(ckpt, weights_only=True)["step"] == 2
    small_kamim(tmp_path, monkeypatch, "--epochs", "3", "--seed", "1", "--resume-anyway")  # the named way out
    assert torch.load(ckpt, weights_only=True)["step"] == 3


def test_checkpoint_errors_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(os.urandom(64))
    with pytest.raises(SystemExit, match="not a checkpoint.*checkpoint.pt"):
        small_kamim(tmp_path, monkeypatch)
    other = tmp_path / "lut"
    lut.main(["--batch-size", "8", "--max-steps", "1", "--workers", "0", "--no-online-probe", "--out", str(other)])
    with pytest.raises(SystemExit, match="written by LUT .*vit_demo"):
        small_kamim(other, monkeypatch)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a checkpoint: .*notes.txt"):
        vit.build_encoder("vit_demo", 32, str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("script", [kamim, lut, semanticmim, abmilp_probe, finetune])
@pytest.mark.parametrize("flag", [["--batch-size", "0"], ["--batch-size", "-8"], ["--micro-batch", "0"], ["--epochs", "0"],
                                  ["--log-every", "0"], ["--save-every", "0"], ["--max-steps", "0"], ["--lr", "0"]])
def test_numeric_flags_fail_in_parsing(script, flag, capsys):
    if script is finetune and flag[0] == "--lr":
        flag = ["--blr", "0"]
    with pytest.raises(SystemExit):
        script.parse_args(flag)
    assert flag[0] in capsys.readouterr().err


def test_wps_zero_and_help_without_contradictions(capsys):
    with pytest.raises(SystemExit):
        kamim.parse_args(["--wps", "0"])
    assert "--wps must be positive" in capsys.readouterr().err
    for script in (lut, semanticmim):
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        assert "(default: None)" not in capsys.readouterr().out


def test_probe_out_follows_the_checkpoint(tmp_path):
    ck = tmp_path / "kamim" / "checkpoint.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"")
    assert abmilp_probe.parse_args(["--checkpoint", str(ck)]).out == os.path.join("runs", "abmilp_probe", "kamim")
    assert abmilp_probe.parse_args([]).out == os.path.join("runs", "abmilp_probe", "random_init")


def test_eta_text():
    assert run.eta(90, 1.0) == "1m30s" and run.eta(7200, 1.0) == "2h00m" and run.eta(0, 5.0) == "0m00s"


@pytest.mark.parametrize("run", [
    lambda out: abmilp_probe.main(["--pool", "knn", "--img-size", "32", "--out", out]),
    lambda out: abmilp_probe.main(["--pool", "avg", "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0",
                                   "--batch-size", "8", "--out", out]),
    lambda out: finetune.main(["--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
                               "--workers", "0", "--out", out]),
])
def test_val_is_numbered_by_trains_class_map(tmp_path, monkeypatch, run):
    calls = []

    def demo(d, split, labelled=False, classes=None):
        calls.append((split, classes))
        return data.DemoShapes(split, 8)
    monkeypatch.setattr(data, "dataset", demo)
    run(str(tmp_path))
    assert ("val", data.DemoShapes.classes) in calls and ("val", None) not in calls
