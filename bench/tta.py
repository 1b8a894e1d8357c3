"""Test-time augmentation (``predict --tta``) against one pass, on the built-in synthetic data.

    python bench/tta.py [--iterations 200] [--images 6] [--synthetic em] [--out /tmp/minunet-tta] [--reuse]

Trains a short default run (``python -m minunet.train`` with --iterations, no time budget), then
predicts fresh synthetic images (seeds the run never saw) once and with the 8 flips and rotations
averaged, and prints a Markdown table: IoU, pixel error, Rand error and warping error of the mask
thresholded at 0.5 (as ``predict`` delivers it; not the best over thresholds), and the seconds
per image. Results: bench/results/tta.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # this checkout's minunet, not another installed one


def main(argv=None) -> int:
    from minunet import train
    from minunet.checkpoint import load_checkpoint, model_from_checkpoint
    from minunet.data import dataset
    from minunet.inference import foreground_probability, predict_probabilities
    from minunet.metrics import iou, pixel_error, rand_error, warping_error

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--synthetic", choices=("em", "cells"), default="em")
    p.add_argument("--out", default="/tmp/minunet-tta")
    p.add_argument("--reuse", action="store_true", help="predict with the run already in --out")
    args = p.parse_args(argv)
    run_dir = Path(args.out)
    t0 = time.perf_counter()
    if not (args.reuse and (run_dir / "checkpoint.npz").is_file()):
        status = train.main(["--synthetic", args.synthetic, "--iterations", str(args.iterations),
                             "--max-minutes", "0", "--device", "cpu", "--quiet", "--out",
                             str(run_dir), "--overwrite"])
        if status:
            return status
    train_s = time.perf_counter() - t0
    model = model_from_checkpoint(load_checkpoint(run_dir / "checkpoint.npz"), "cpu").eval()
    samples = dataset.synthetic_samples(args.synthetic, args.images, 256, seed=20_000)
    rows = {}
    for tta in (False, True):
        scores, seconds = [], 0.0
        for sample in samples:
            t = time.perf_counter()
            prob = foreground_probability(predict_probabilities(model, sample.image, None, "cpu",
                                                                tta=tta))
            seconds += time.perf_counter() - t
            mask, truth = prob >= 0.5, sample.target > 0
            scores.append([iou(mask, truth), pixel_error(mask, truth), rand_error(mask, truth),
                           warping_error(mask, truth)])
        rows["8 flips/rotations (--tta)" if tta else "one pass"] = \
            (np.mean(scores, axis=0), seconds / len(samples))
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; synthetic "
          f"{args.synthetic}, default U-Net (base 16, depth 4) trained {args.iterations} steps "
          f"in {train_s:.0f} s; {args.images} fresh 256x256 images, masks at threshold 0.5\n")
    print("| prediction | IoU | pixel error | Rand error | warping error | s per image |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (mean, seconds) in rows.items():
        print(f"| {name} | {mean[0]:.4f} | {mean[1]:.4f} | {mean[2]:.4f} | {mean[3]:.5f} | "
              f"{seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
