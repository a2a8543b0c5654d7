"""Training step of the vanilla MIM baseline (one [CLS], mask ratio 0.4) vs SemanticMIM (8 proxies, ratio 0.6),
side by side on in-memory tensors, with App. C's per-block cost next to what the real modules compute.
The target: SemanticMIM's step no slower than the vanilla baseline at the same batch. Last, the HOG target alone at
224 px, the (B, 3, 9, H, W) vote tensor it used to build vs the scatter into the cells (issue 17).

    python benchmarks/bench_semanticmim.py                                      # CPU, vit_demo at 64 px
    python benchmarks/bench_semanticmim.py --model vit_b --img-size 224 --batch-size 256 --device cuda --compile
"""
import torch

import timing  # first: it puts the repository on the path
import semanticmim as S  # noqa: E402
from tests.test_semanticmim import hog_reference  # noqa: E402  (hog() before issue 17: the (B, C, bins, H, W) vote tensor)


def main():
    p = timing.parser(__doc__, img_size=64, batch_size=16)
    p.add_argument("--proxies", type=int, default=8, help="L1, §4.1: 8")
    args, device = timing.setup(p)

    def case(proxies, ratio):
        def build():
            model = S.SemanticMIM(args.model, args.img_size, proxies, ratio).to(device)
            N = model.encoder.grid[0] * model.encoder.grid[1]
            img = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
            mask = torch.stack([S.random_patch_mask(N, model.n_mask) for _ in range(args.batch_size)]).to(device)  # True = masked
            return timing.train_step(model, (img, mask), device, args.compile, clip=0.02), model.train_flops()
        return build

    timing.run([("vanilla MIM (r 0.4)", case(0, 0.4)), (f"SemanticMIM {args.proxies}p (r 0.6)", case(args.proxies, 0.6))],
               args, device)
    enc = S.SemanticMIM(args.model, args.img_size, args.proxies, 0.6).encoder
    N, D, L2 = enc.grid[0] * enc.grid[1], enc.dim, S.mask_count(enc.grid[0] * enc.grid[1], 0.6)
    paper = S.semanticmim_block_cost(1, D, N - L2, args.proxies, L2) / S.vanilla_block_cost(1, N + 1, D)
    real = S.semanticmim_block_macs(N - L2, args.proxies, L2, D) / S.vanilla_block_cost(1, N + 1, D)
    print(f"one block vs a vanilla block of {N + 1} tokens: App. C's formula {100 * (paper - 1):+.2f} %, "
          f"the real modules {100 * (real - 1):+.2f} %")
    hog_target(args.batch_size, device)


def hog_target(B, device, size=224):
    """The HOG target at ViT-B's 224 px (issue 17): votes scattered straight into the cells' bins vs the old
    (B, 3, 9, H, W) vote tensor, average-pooled. Time at this batch; on CUDA also the peak memory above the input."""
    img = torch.randn(B, 3, size, size, device=device)
    mem = torch.cuda.memory_allocated if device.type == "cuda" else lambda d: 0
    for name, f in (("vote tensor (before)", hog_reference), ("into the cells", S.hog)):
        ms, peak = timing.time_step(lambda: f(img), device, warmup=1, iters=3)
        print(f"HOG target, {name}, batch {B} at {size} px: {ms:.1f} ms"
              + ("" if peak is None else f", peak {peak - mem(device) / 2**30:.2f} GiB"))
    s = size // 8
    print(f"fp32 vote buffer at batch 256, {size} px: (256, 3, 9, {size}, {size}) {256 * 27 * size * size * 4 / 2**30:.2f} GiB "
          f"before, (256, 3, {s}, {s}, 9) {256 * 27 * s * s * 4 / 2**20:.1f} MiB now")


if __name__ == "__main__":
    main()
