"""Golden fixtures (tests/fixtures/, written once by tests/make_fixtures.py from the released functions):
lut.random_masking = MAE's random_masking on the same seeded noise; KAMIM's eq. 2 = the released
per_patch_importance; vit.ViT = a timm VisionTransformer. Needs only torch."""
import json
import os

import torch

import lut
import kamim
import vit

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def load(name):
    return json.load(open(os.path.join(HERE, name)))


def test_random_masking_matches_released_mae():
    """Same noise -> the same order (ids_restore) in every case; the same keep set and mask where ratio * L is
    whole (196 x 0.75, 16 x 0.75). Where it is not, MAE keeps int(L * (1 - ratio)) and lut.random_masking masks
    int(ratio * L), so it keeps one patch more, the next in MAE's order (49 x 0.75: 13 vs 12)."""
    for c in load("mae_random_masking.json"):
        torch.manual_seed(c["seed"])
        ids_keep, ids_restore, mask = lut.random_masking(c["B"], c["L"], c["ratio"])
        assert ids_restore.tolist() == c["ids_restore"], c["seed"]
        n = len(c["ids_keep"][0])
        assert ids_keep[:, :n].tolist() == c["ids_keep"]
        whole = float(c["ratio"] * c["L"]).is_integer()
        assert ids_keep.shape[1] == n + (not whole)
        if whole:
            assert mask.long().tolist() == c["mask"]


def test_kamim_weights_match_released_per_patch_importance():
    for c in load("kamim_per_patch_importance.json"):
        F = torch.tensor(c["F"], dtype=torch.uint8)  # (B, 1, 16, 16)
        W = kamim.kamim_weights(kamim.keypoint_density(F, c["patch"]), c["T"], 20.0)  # (B, 1, h, w)
        assert torch.allclose(W[:, 0], torch.tensor(c["W"]), rtol=1e-6, atol=0), (c["patch"], c["T"])
        assert not torch.allclose(W, torch.ones_like(W))  # the fixture has keypoints: W varies


def test_vit_matches_a_timm_vision_transformer():
    """A tiny timm VisionTransformer (learned positions with a [cls] position, biases and LN moved off their init)
    loaded by vit.load_encoder into a learned-position ViT gives timm's forward_features to float precision."""
    f = torch.load(os.path.join(HERE, "timm_vit_tiny.pt"), weights_only=True)
    c = f["config"]
    m = vit.ViT(img_size=c["img_size"], patch_size=c["patch_size"], dim=c["embed_dim"], depth=c["depth"],
                heads=c["num_heads"], learned_pos=True).eval()
    vit.load_encoder(m, dict(f["state"]))
    with torch.no_grad():
        out = m(f["img"])
    assert out.shape == f["out"].shape
    assert torch.allclose(out, f["out"], atol=1e-5, rtol=1e-5), (out - f["out"]).abs().max()
