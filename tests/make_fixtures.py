"""Writes tests/fixtures/*.json once (`python tests/make_fixtures.py`), from the RELEASED functions re-typed below
(torch only; the re-typed code is the fixture's source, our code is never called here). test_fixtures.py reads them.

- mae_random_masking.json: facebookresearch/mae, models_mae.py, MaskedAutoencoderViT.random_masking
  (as stored in the search index at commit 02bd876, where the body sits in `randmask`), on seeded noise.
- kamim_per_patch_importance.json: madhava20217/KAMIM, utils (the file holding per_patch_importance and
  ModifiedPixelShuffle), per_patch_importance, on a seeded binary keypoint map.
- timm_vit_tiny.pt: a tiny timm VisionTransformer (needs the `timm` package, made with timm 1.0.31: e.g.
  `pip install --target /tmp/timmpkg --no-deps timm huggingface_hub safetensors pyyaml` and PYTHONPATH=/tmp/timmpkg;
  skipped with a message without it): its state dict, a seeded input and forward_features' output.
"""
import json
import os

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def mae_random_masking(x, mask_ratio):
    """facebookresearch/mae models_mae.py, verbatim but for `self`."""
    N, L, D = x.shape  # batch, length, dim
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


@torch.no_grad()
def per_patch_importance(batch, patch_size, temperature):
    """madhava20217/KAMIM per_patch_importance, verbatim (eq. 2 with the released clip at +-20)."""
    n_batch = batch.size(0)
    features = torch.nn.functional.conv2d(batch,
                                          weight=torch.ones(1, 1, patch_size, patch_size, device=batch.device) / (patch_size ** 2),
                                          bias=torch.zeros(1, device=batch.device),
                                          stride=(patch_size, patch_size)).squeeze(1)
    patch_weights = torch.exp(torch.clip(features / temperature, min=-20, max=20))
    patch_weights = patch_weights / patch_weights.view(n_batch, -1).min(axis=1).values.view(-1, 1, 1)
    return patch_weights


def main():
    os.makedirs(HERE, exist_ok=True)
    cases = []
    for seed, (B, L, ratio) in enumerate([(3, 16, 0.75), (2, 49, 0.75), (2, 36, 0.6)]):
        x = torch.arange(B * L, dtype=torch.float32).view(B, L, 1)  # x_masked[..., 0] = the kept ids
        torch.manual_seed(seed)
        x_masked, mask, ids_restore = mae_random_masking(x, ratio)
        cases.append(dict(seed=seed, B=B, L=L, ratio=ratio, ids_keep=(x_masked[..., 0] - torch.arange(B)[:, None] * L)
                          .long().tolist(), ids_restore=ids_restore.tolist(), mask=mask.long().tolist()))
    json.dump(cases, open(os.path.join(HERE, "mae_random_masking.json"), "w"))
    g = torch.Generator().manual_seed(0)
    cases = []
    for p, T, density in [(8, 0.25, 0.05), (8, 0.1, 0.02), (4, 1.0, 0.2)]:
        F = (torch.rand(2, 1, 16, 16, generator=g) < density).float()  # keypoint map, 1 at a keypoint
        cases.append(dict(patch=p, T=T, F=F.long().tolist(), W=per_patch_importance(F, p, T).tolist()))
    json.dump(cases, open(os.path.join(HERE, "kamim_per_patch_importance.json"), "w"))
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        print("timm not installed: timm_vit_tiny.pt not rewritten")
        return
    cfg = dict(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2)
    torch.manual_seed(0)
    m = VisionTransformer(**cfg, num_classes=0).eval()
    with torch.no_grad():  # timm initialises biases / LN to 0 / 1: move them so every key matters
        for v in m.parameters():
            v.add_(0.1 * torch.randn(v.shape))
    img = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = m.forward_features(img)  # (B, 1 + N, D) after the final LayerNorm
    torch.save(dict(config=cfg, state=m.state_dict(), img=img, out=out), os.path.join(HERE, "timm_vit_tiny.pt"))


if __name__ == "__main__":
    main()
