"""Training step of MAE (--alpha 0), LUT and LUT's released two-view variant, side by side on in-memory
tensors: forward, backward, AdamW, and for LUT the EMA update. vit.py's accounting predicts LUT/MAE ~1.6x
at ViT-B/16 224 px (the EMA encoder's no-grad forward of the full image, ~35 GFLOP on MAE's ~59). The
paper's "0.46 s vs 0.39 s per iteration" (+18 %) does not match its own 119 h vs 223 h: do not chase it.

    python benchmarks/bench_lut.py                                              # CPU, vit_demo at 64 px
    python benchmarks/bench_lut.py --model vit_b --img-size 224 --batch-size 256 --device cuda --compile
"""
import time

import torch

import timing  # first: it puts the repository on the path
import data  # noqa: E402
import lut  # noqa: E402
import vit  # noqa: E402


def main():
    p = timing.parser(__doc__, img_size=64, batch_size=32)
    p.add_argument("--decoder", type=int, nargs=3, default=None, metavar=("DIM", "DEPTH", "HEADS"),
                   help="default: MAE's 512 8 16, or 128 2 4 for vit_demo")
    p.add_argument("--head-hidden", type=int, default=4096, help="projector / predictor hidden width, §5.1: 4096")
    args, device = timing.setup(p)
    dec = args.decoder or ([128, 2, 4] if args.model == "vit_demo" else [512, 8, 16])
    print(f"decoder {dec}, heads {args.head_hidden} wide, mask ratio 0.75")
    views = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device) for _ in range(2)]

    def case(alpha, two_view):
        def build():
            model = lut.LUT(vit.vit(args.model, img_size=args.img_size), *dec, alpha=alpha, head_hidden=args.head_hidden,
                            two_view=two_view).to(device)
            after = (lambda: model.update_teacher(0.996)) if alpha > 0 else None  # EMA once per optimiser step
            step = timing.train_step(model, views[:1] if alpha == 0 else views, device, args.compile, after=after)
            return step, lut.train_flops(model)
        return build

    timing.run([("MAE", case(0.0, False)), ("LUT", case(0.25, False)), ("LUT two-view", case(0.25, True))], args, device)
    # LUT's context view: colour jitter + three-augment run per sample on the device (the step's share of the loader's work)
    raw, ms = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device), []
    for i in range(args.warmup + args.steps):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        data.normalize_batch(data.three_augment(raw))
        sync()
        ms.append((time.perf_counter() - t) * 1e3)
    print(f"context view's three_augment + normalise on the device: {sorted(ms[args.warmup:])[args.steps // 2]:.2f} ms "
          f"per batch of {args.batch_size} (LUT's step above includes neither view's augmentation)")


if __name__ == "__main__":
    main()
