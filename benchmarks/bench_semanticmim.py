"""Training step of the vanilla MIM baseline (one [CLS], mask ratio 0.4) vs SemanticMIM (8 proxies, ratio 0.6),
side by side on in-memory tensors, with App. C's per-block cost next to what the real modules compute.
The target: SemanticMIM's step no slower than the vanilla baseline at the same batch.

    python benchmarks/bench_semanticmim.py                                      # CPU, vit_demo at 64 px
    python benchmarks/bench_semanticmim.py --model vit_b --img-size 224 --batch-size 256 --device cuda --compile
"""
import torch

import timing  # first: it puts the repository on the path
import semanticmim as S  # noqa: E402


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


if __name__ == "__main__":
    main()
