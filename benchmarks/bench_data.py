"""Data-pipeline speed: images/s of the loader for N workers, with and without KAMIM's keypoint maps.

    python benchmarks/bench_data.py                         # demo images, 0 and 2 workers
    python benchmarks/bench_data.py --data /imagenet --workers 0 8 16 --images 4096   # JPEG decode included

Each row runs the same loader over the same images: "simmim" = crop + flips + normalise + mask,
"kamim-<det>" = the same plus the keypoint map of the uint8 crop (data.keypoint_map). The ratio
column is images/s relative to simmim at the same worker count (KAMIM Table 4: ~1x for FAST).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


class Pipeline:
    """crop -> [keypoint map] -> normalise, plus a SimMIM mask: what kamim.py's loader does per image."""
    def __init__(self, img_size, detector):
        self.crop, self.norm, self.img_size, self.detector = data.kamim_crop(img_size), data.normalize(), img_size, detector

    def __call__(self, img):
        crop = self.crop(img)
        F = torch.from_numpy(data.keypoint_map(np.asarray(crop), self.detector)) if self.detector else torch.zeros(0)
        return self.norm(crop), F, data.simmim_mask(self.img_size)


def images_per_second(ds, workers, batch, images):
    dl = data.loader(ds, batch, train=True, workers=workers)
    data.set_epoch(dl, 0)
    n, it = 0, iter(dl)
    next(it)  # workers started, first batch decoded
    t = time.perf_counter()
    for _ in range(max(1, images // batch)):
        try:
            next(it)
        except StopIteration:
            break
        n += batch
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-style folder (its train split); default: the demo images")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="images timed per row")
    p.add_argument("--detectors", nargs="+", default=["fast", "orb", "sift"])
    args = p.parse_args()
    base = data.dataset(args.data, "train")
    print(f"{'pipeline':<12} {'workers':>7} {'img/s':>9} {'img/s/worker':>13} {'vs simmim':>9}")
    for w in args.workers:
        ref = None
        for det in [None] + args.detectors:
            ips = images_per_second(data.Seeded(base, Pipeline(args.img_size, det)), w, args.batch_size, args.images)
            ref = ref or ips
            print(f"{'kamim-' + det if det else 'simmim':<12} {w:>7} {ips:>9.1f} {ips / max(w, 1):>13.1f} {ips / ref:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
