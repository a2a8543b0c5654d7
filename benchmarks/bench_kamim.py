"""Training step of SimMIM vs KAMIM (released circles, and the paper's single points), side by side on
in-memory tensors. vit.py's accounting predicts a FLOP ratio of ~1.00: the weighting adds no matmul (the
released circles' 9 x 9 ring costs 81 MACs per pixel, counted). The loader's cost with and without
keypoints is bench_data.py's.

    python benchmarks/bench_kamim.py                                            # CPU, vit_demo at 96 px
    python benchmarks/bench_kamim.py --model vit_b --img-size 192 --batch-size 256 --device cuda --compile
"""
import numpy as np
import torch

import timing  # first: it puts the repository on the path
import data  # noqa: E402
import kamim  # noqa: E402
import vit  # noqa: E402


def main():
    p = timing.parser(__doc__, img_size=96, batch_size=16)
    p.add_argument("--mask-patch", type=int, default=None, help="mask cell; default 16 at 96 px (demo), else 32 (§4.1)")
    p.add_argument("--wps", type=int, default=None, help="weight patch; default 4 at 96 px (demo), else 8 (Table 2)")
    args, device = timing.setup(p)
    args.mask_patch = args.mask_patch or (16 if args.img_size == 96 else 32)
    args.wps = args.wps or (4 if args.img_size == 96 else 8)
    B, d, patch = args.batch_size, args.img_size, vit.CONFIGS[args.model]["patch_size"]
    img = torch.randn(B, 3, d, d, device=device)
    mask = torch.stack([kamim.simmim_mask(d, args.mask_patch, patch) for _ in range(B)]).to(device)  # (B, h, w) 1 = masked
    crop, demo = kamim.kamim_crop(d), data.DemoShapes("train")
    points = torch.stack([torch.from_numpy(kamim.keypoint_map(np.asarray(crop(demo[i % 64][0])))) for i in range(B)]).to(device)

    def case(circles, pts):
        def build():
            model = kamim.KAMIM(vit.vit(args.model, img_size=d), args.wps, 0.25, circles).to(device)
            ring = 0 if pts is None or not circles else 3 * 2 * 81 * d * d  # the ring conv, as 3 x its forward
            inputs = (img, mask) if pts is None else (img, mask, pts)
            return timing.train_step(model, inputs, device, args.compile, clip=1.0), kamim.train_flops(model) + ring
        return build

    timing.run([("SimMIM", case(True, None)), ("KAMIM circles", case(True, points)),
                ("KAMIM points", case(False, points))], args, device)


if __name__ == "__main__":
    main()
