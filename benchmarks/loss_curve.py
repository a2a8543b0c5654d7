"""A run's loss curve from its log.jsonl, as CSV and PNG ("is my loss curve normal?").

    python benchmarks/loss_curve.py runs/kamim/log.jsonl runs/kamim/loss        # your run's curve, beside its log

writes PREFIX.csv (step and every logged loss term) and PREFIX.png (one line per term, each scaled
to its own range, so terms of different size share one plot).
"""
import json
import os
import sys

import cv2
import numpy as np

COLOURS = [(200, 80, 30), (30, 120, 220), (40, 160, 60), (160, 40, 160)]  # BGR


def read_log(path):
    """Progress records (those with a step) -> (steps, {term: values}); loss terms are the keys
    beginning with 'loss' or named like the scripts' terms (mim, bc, l1)."""
    recs = [r for r in map(json.loads, open(path)) if "step" in r]
    # a resumed run logs again the steps between its last checkpoint and the kill: the later record wins
    last = {(r["step"], "top1" in r, "probe_val_top1" in r): i for i, r in enumerate(recs)}
    recs = [r for i, r in enumerate(recs) if last[(r["step"], "top1" in r, "probe_val_top1" in r)] == i]
    if not recs:
        raise SystemExit(f"{path} holds no progress records")
    evals = [r for r in recs if "top1" in r]  # finetune.py / abmilp_probe.py: val top-1 records, logged apart
    recs = [r for r in recs if "top1" not in r and "probe_val_top1" not in r] or recs  # the online probe's held-out lines too
    terms = [k for k in recs[0] if k.startswith("loss") or k in ("mim", "bc", "l1")]
    curves = {k: [r[k] for r in recs] for k in terms}
    if evals:  # the latest val top-1 at or before each logged step (nan before the first evaluation)
        curves["top1"] = [next((e["top1"] for e in reversed(evals) if e["step"] <= r["step"]), float("nan")) for r in recs]
    return [r["step"] for r in recs], curves


def plot(steps, curves, path, w=640, h=360, pad=40):
    img = np.full((h, w, 3), 255, np.uint8)
    top = 16 * len(curves) + 12  # the legend sits above the plot box
    cv2.rectangle(img, (pad, top), (w - pad // 2, h - pad), (0, 0, 0), 1)
    x = pad + (np.array(steps) - steps[0]) / max(1, steps[-1] - steps[0]) * (w - 1.5 * pad)
    for i, (name, ys) in enumerate(curves.items()):
        ys = np.array(ys, dtype=float)
        lo, hi = np.nanmin(ys), np.nanmax(ys)
        y = h - pad - (ys - lo) / max(hi - lo, 1e-12) * (h - pad - top)
        col = COLOURS[i % len(COLOURS)]
        cv2.polylines(img, [np.stack([x, y], 1).astype(np.int32)], False, col, 2, cv2.LINE_AA)
        cv2.putText(img, f"{name}: {ys[0]:.3g} -> {ys[-1]:.3g} (range {lo:.3g} .. {hi:.3g})", (pad, 16 * i + 16),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, col, 1, cv2.LINE_AA)
    cv2.putText(img, f"step {steps[0]} .. {steps[-1]} (each curve scaled to its own range)", (pad, h - pad // 3),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(path, img):
        raise SystemExit(f"could not write {path}")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    log, prefix = sys.argv[1:]
    steps, curves = read_log(log)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".csv", "w") as f:
        f.write(",".join(["step", *curves]) + "\n")
        for i, s in enumerate(steps):
            f.write(",".join([str(s)] + [f"{curves[k][i]:.6g}" for k in curves]) + "\n")
    plot(steps, curves, prefix + ".png")
    print(f"wrote {prefix}.csv and {prefix}.png")


if __name__ == "__main__":
    main()
