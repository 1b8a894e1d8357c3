"""Benchmark of the validation metrics: the compiled kernels against the Python oracle.

    python -m minunet.bench_metrics                      # 10 slices of 512 x 512, 1 reference slice
    python -m minunet.bench_metrics --compile --train    # + Numba's first compile, + a tiny training run

For two kinds of probability maps over synthetic EM truths
(:func:`minunet.data.synthetic.em_images`) it times :func:`minunet.metrics.evaluate_all` (pixel,
Rand and warping error, each the best over the ISBI thresholds 0.0 .. 0.9, and IoU) with the
compiled kernels (one thread), and :func:`minunet.metrics.evaluate_all_reference` (the Python
heap and NumPy Rand error the kernels replaced) on the first ``--reference-slices`` slices, and
checks that the numbers are the same.

- "trained-like": the truth blurred (sigma 2 px) plus noise (sd 0.15): few mismatched pixels.
- "untrained": 0.5 plus smooth noise, as after a few training steps: at most thresholds nearly
  every truth pixel is mismatched, the warping's worst case.

``--compile`` runs two fresh Python processes with an empty ``NUMBA_CACHE_DIR``: the first
compiles the kernels, the second loads them from that cache (as every run after the first
does). ``--train`` times ``python -m minunet.train --tile 188 --iterations 2`` with one
512 x 512 validation image, end to end. Times are wall clock (and the process's CPU time); the
load average is printed because on shared cores it decides the wall time. A benchmark prints;
it never asserts a time. Results: bench/results/metrics.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from .cli import HelpFormatter, run

COMPILE_PROBE = """
import time
start = time.perf_counter()
import numpy as np
from minunet.metrics import evaluate_all, warping_error
imported = time.perf_counter()
prob = np.linspace(0, 1, 64).reshape(8, 8)
evaluate_all(prob, prob > 0.4)
warping_error(prob, prob > 0.4)
print(f"{imported - start:.2f} {time.perf_counter() - imported:.2f}")
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.bench_metrics",
                                formatter_class=HelpFormatter, description="Time the validation "
                                "metrics: compiled kernels vs the Python oracle.")
    p.add_argument("--size", type=int, default=512, help="slice side in pixels")
    p.add_argument("--slices", type=int, default=10, help="slices timed with the compiled kernels")
    p.add_argument("--reference-slices", type=int, default=1, help="of those, slices also timed "
                   "with the Python oracle (seconds each at 512 x 512)")
    p.add_argument("--compile", action="store_true", help="also time Numba's first compile and "
                   "the cached load, in fresh processes")
    p.add_argument("--train", action="store_true", help="also time 2 training iterations "
                   "(--tile 188) plus validation of one 512 x 512 image, end to end")
    return p


def maps(kind: str, truths: np.ndarray, seed: int = 0) -> np.ndarray:
    """Probability maps (float32, as predict writes them) of one kind for the truths."""
    rng = np.random.default_rng(seed)
    out = []
    for truth in truths:
        if kind == "trained-like":
            p = ndimage.gaussian_filter(truth.astype(np.float64), 2) + rng.normal(0, 0.15, truth.shape)
        else:
            p = 0.5 + ndimage.gaussian_filter(rng.normal(0, 0.3, truth.shape), 1.5)
        out.append(np.clip(p, 0, 1).astype(np.float32))
    return np.stack(out)


def timed(fn, *args):
    """(result, wall s, CPU s of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_slices(size: int, slices: int, reference_slices: int) -> list[dict]:
    from . import metrics
    from .data.synthetic import em_images

    truths = em_images(slices, size=size, seed=0)[1] > 0
    metrics.evaluate_all(np.linspace(0, 1, 64).reshape(8, 8), np.eye(8, dtype=bool))  # compiled
    rows = []
    for kind in ("trained-like", "untrained"):
        probs = maps(kind, truths)
        reference = [timed(metrics.evaluate_all_reference, p, t)
                     for p, t in zip(probs[:reference_slices], truths)]
        results = [timed(metrics.evaluate_all, p, t) for p, t in zip(probs, truths)]
        rows.append({
            "kind": kind, "slices": slices,
            "wall": sum(r[1] for r in results), "cpu": sum(r[2] for r in results),
            "reference_per_slice": np.mean([r[1] for r in reference]) if reference else None,
            "same": all(ref[0] == res[0] for ref, res in zip(reference, results)),
        })
    return rows


def bench_compile() -> tuple[list[float], list[float]]:
    """(import s, first call s) of a fresh process with an empty Numba cache, then of one that
    loads that cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = [subprocess.run([sys.executable, "-c", COMPILE_PROBE], env=env, check=True,
                               capture_output=True, text=True).stdout.split() for _ in range(2)]
    return [float(v) for v in runs[0]], [float(v) for v in runs[1]]


def bench_train() -> float:
    """Wall seconds of ``python -m minunet.train`` for 2 iterations on tile 188 and one
    validation image of 512 x 512 (tiny synthetic EM data written to a temporary folder)."""
    from .data.io import write_image
    from .data.synthetic import em_images

    images, labels = em_images(2, size=512, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        for k, part in enumerate(("train", "val")):
            write_image(Path(tmp, part, "images", "a.png"), (images[k] * 255).astype(np.uint8))
            write_image(Path(tmp, part, "labels", "a.png"), labels[k].astype(np.uint8) * 255)
        argv = [sys.executable, "-m", "minunet.train", "--data", f"{tmp}/train", "--val-data",
                f"{tmp}/val", "--tile", "188", "--iterations", "2", "--device", "cpu",
                "--max-minutes", "0", "--quiet", "--out", f"{tmp}/run"]
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, text=True)
        return time.perf_counter() - start


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.size < 35 or args.slices < 1 or not 0 <= args.reference_slices <= args.slices:
        raise ValueError("need --size >= 35 (the synthetic EM images), --slices >= 1 and "
                         "0 <= --reference-slices <= --slices")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (1 min) at the "
          "start; the metric kernels run on one thread", flush=True)
    if args.compile:
        (cold_import, cold_call), (warm_import, warm_call) = bench_compile()
        print(f"first call in a fresh process: {cold_call:.1f} s with an empty Numba cache "
              f"(compiling), {warm_call:.1f} s loading the cache (import {warm_import:.1f} s)")
    rows = bench_slices(args.size, args.slices, args.reference_slices)
    header = (f"{'map':<13} {'slices':>6} {'compiled s':>10} {'per slice':>9} "
              f"{'CPU s':>6} {'reference s/slice':>17} {'speed-up':>8} {'same numbers':>12}")
    print(f"evaluate_all on {args.size} x {args.size} slices (10 thresholds each)")
    print(header)
    print("-" * len(header))
    for r in rows:
        per = r["wall"] / r["slices"]
        ref = r["reference_per_slice"]
        print(f"{r['kind']:<13} {r['slices']:>6} {r['wall']:>10.2f} {per:>9.3f} "
              f"{r['cpu']:>6.2f} "
              + (f"{ref:>17.2f} {ref / per:>7.0f}x" if ref else f"{'-':>17} {'-':>8}")
              + f" {('yes' if r['same'] else 'NO') if ref else '-':>12}")
    if args.train:
        print(f"train --tile 188 --iterations 2 + validation of one 512 x 512 image: "
              f"{bench_train():.1f} s wall (fresh process, Numba cache warm)")
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
