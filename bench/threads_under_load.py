"""Launch cost of the fast CPU kernels (Numba) on cores shared with other busy processes.

    python bench/threads_under_load.py [--layers tbb omp workqueue] [--busy 0 1 2] [--repeat 30]

For each threading layer (a subprocess each, NUMBA_THREADING_LAYER), each number of busy-loop
processes started beside it, 1 or 2 kernel threads and small work run serially or not
(numba_config.SERIAL_SMALL_WORK), it times the SGD step on one bias (16 floats, one launch) and
the optimizer step over every parameter of the default U-Net (base 16, depth 4: 46 launches)
and a whole training step (--step-tile), as the mean and the maximum of --repeat runs (a fifth
of them for the training step). Prints a Markdown table (bench/results/threads_under_load.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the child imports this checkout's minunet
CHILD = r"""
import json, sys, time
import numpy as np
import minunet.functional as F
from minunet.nn import UNet
from minunet.optim import SGD
from minunet.tensor import Tensor
from minunet.ops import numba_config, elementwise

repeat, step_tile = int(sys.argv[1]), int(sys.argv[2])
model = UNet(in_channels=1, num_classes=2, base_channels=16, depth=4, seed=0, device="cpu")
params = model.parameters()
rng = np.random.default_rng(0)
grads = [Tensor(rng.standard_normal(p.shape).astype(np.float32), device="cpu") for p in params]
opt = SGD(params, lr=1e-9, momentum=0.99)
bias = [np.zeros(16, np.float32) for _ in range(3)]
if step_tile:
    out = model.output_size(step_tile)
    x = Tensor(rng.standard_normal((1, 1, step_tile, step_tile)).astype(np.float32))
    target = Tensor(rng.integers(0, 2, (1, out, out)).astype(np.int32))
    weight = Tensor(np.ones((1, out, out), np.float32))

def sgd():
    for p, g in zip(params, grads):     # the training step below clears the gradients
        p.grad = g
    opt.step()

def training_step():
    loss = F.weighted_cross_entropy(model(x), target, weight)
    loss.backward()
    opt.step()
    opt.zero_grad()

def times_ms(fn, n):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    return float(np.mean(times)), float(np.max(times))

rows = []
for threads in (1, 2):
    numba_config.set_num_threads(min(threads, numba_config.max_threads()))
    for serial in (False, True):
        numba_config.SERIAL_SMALL_WORK = serial
        row = dict(threads=threads, serial=serial,
                   bias=times_ms(lambda: elementwise.sgd_cpu_step(*bias, 0.01, 0.99), repeat),
                   sgd=times_ms(sgd, repeat))
        if step_tile:
            row["step"] = times_ms(training_step, max(3, repeat // 5))
        rows.append(row)
print(json.dumps(dict(layer=numba_config.threading_layer(), launches=len(params), rows=rows)))
"""


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+", default=["tbb", "omp", "workqueue"])
    p.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--step-tile", type=int, default=252, help="also time a training step "
                   "(forward, backward, SGD) of the base-16 U-Net on this tile; 0: skip")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}\n")
    print("Each cell: mean (max) over the repeats, the mean being what a run pays.\n")
    step = f" training step, tile {args.step_tile} (ms) |" if args.step_tile else ""
    print("| layer | busy processes | threads | small work serial | SGD on one bias (us) "
          "| SGD step, whole model (ms) |" + step)
    print("|---|---:|---:|---|---:|---:|" + ("---:|" if args.step_tile else ""))
    for layer in args.layers:
        for busy in args.busy:
            loops = busy_loops(busy)
            try:
                time.sleep(0.5)
                env = dict(os.environ, NUMBA_THREADING_LAYER=layer,
                           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
                out = subprocess.run([sys.executable, "-c", CHILD, str(args.repeat),
                                      str(args.step_tile)], env=env,
                                     capture_output=True, text=True, check=True).stdout
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            result = json.loads(out.strip().splitlines()[-1])
            for r in result["rows"]:
                cells = [f"{1e3 * r['bias'][0]:.1f} ({1e3 * r['bias'][1]:.0f})",
                         f"{r['sgd'][0]:.2f} ({r['sgd'][1]:.1f})"]
                if "step" in r:
                    cells.append(f"{r['step'][0]:.0f} ({r['step'][1]:.0f})")
                print(f"| {result['layer']} | {busy} | {r['threads']} | "
                      f"{'yes' if r['serial'] else 'no'} | " + " | ".join(cells) + " |",
                      flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {result['launches']} parameter "
          "arrays (one launch each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
