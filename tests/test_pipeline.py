"""The project end to end: each pretraining script's checkpoint loads into the probe, which trains on it."""
import pytest
import torch

import abmilp_probe
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
    enc = abmilp_probe.build_encoder("vit_demo", 32, ckpt)
    assert enc.num_prefix == prefix and enc.grid == (4, 4)
    saved = torch.load(ckpt, weights_only=True)["encoder"]
    assert torch.equal(enc.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])  # the trained weights
    res = abmilp_probe.main(["--checkpoint", ckpt, "--model", "vit_demo", "--img-size", "32", "--pool", "abmilp",
                             "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
                             "--no-cache-features", "--out", str(tmp_path / "probe")])
    top1, top5 = res["abmilp"]
    assert 0 <= top1 <= top5 <= 100
