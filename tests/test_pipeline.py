"""The project end to end: each pretraining script's checkpoint loads into the probe, which trains on it."""
import pytest
import torch

import abmilp_probe
import data
import kamim
import lut
import semanticmim
import vit


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("script,flags,prefix", [
    (kamim, [], 1),                                   # 96 px demo: the probe at 32 px resizes its positions
    (kamim, ["--detector", "none"], 1),               # SimMIM
    (lut, [], 1),
    (lut, ["--alpha", "0"], 1),                       # MAE
    (semanticmim, [], 8),                             # the 8 proxies stay as prefix tokens
    (semanticmim, ["--proxies", "0"], 1),             # vanilla MIM
])
def test_pretrained_checkpoint_probes(tmp_path, script, flags, prefix):
    script.main(flags + ["--batch-size", "8", "--max-steps", "1", "--workers", "0", "--out", str(tmp_path / "pre")])
    ckpt = str(tmp_path / "pre" / "checkpoint.pt")
    enc = vit.build_encoder("vit_demo", 32, ckpt)
    assert enc.num_prefix == prefix and enc.grid == (4, 4)
    saved = torch.load(ckpt, weights_only=True)["encoder"]
    assert torch.equal(enc.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])  # the trained weights
    res = abmilp_probe.main(["--checkpoint", ckpt, "--model", "vit_demo", "--img-size", "32", "--pool", "abmilp",
                             "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
                             "--no-cache-features", "--out", str(tmp_path / "probe")])
    top1, top5 = res["abmilp"]
    assert 0 <= top1 <= top5 <= 100


@pytest.mark.parametrize("script", [kamim, lut, semanticmim])
def test_grayscale_non_square_pretrains_and_probes(tmp_path, monkeypatch, script):
    # USER-NEEDS (mae#179, vit-pytorch#187): --in-chans 1 and a non-square input, end to end. 8 images: one step
    # is an epoch, so each script's figure is drawn too; the probe runs KAMIM's protocol (MixUp / CutMix on)
    monkeypatch.setattr(data, "dataset", lambda d, split, labelled=False, classes=None, encoded=False: data.DemoShapes(split, 8 if split == "train" else 12, encoded=encoded))
    size = ["--in-chans", "1", "--img-size", "32x48", "--workers", "0"]
    script.main(size + ["--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--out", str(tmp_path / "pre")])
    assert any(p.suffix == ".png" for p in (tmp_path / "pre").iterdir())
    ckpt = str(tmp_path / "pre" / "checkpoint.pt")
    enc = vit.build_encoder("vit_demo", (32, 48), ckpt, in_chans=1)
    assert enc.grid == (4, 6) and enc.patch_embed.proj.weight.shape[1] == 1
    with pytest.raises(ValueError, match="--in-chans"):
        vit.build_encoder("vit_demo", (32, 48), ckpt)  # 3 channels against a 1-channel checkpoint
    res = abmilp_probe.main(size + ["--checkpoint", ckpt, "--model", "vit_demo", "--protocol", "kamim", "--block", "4",
                                    "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--no-cache-features", "--out", str(tmp_path / "probe")])
    assert 0 <= res["avg"][0] <= res["avg"][1] <= 100
