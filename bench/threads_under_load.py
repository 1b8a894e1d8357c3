"""Launch cost of the fast CPU kernels (Numba) on cores shared with other busy processes.

    python bench/threads_under_load.py [--layers tbb omp workqueue] [--busy 0 1 2] [--repeat 30]

For each threading layer (a subprocess each, NUMBA_THREADING_LAYER), each number of busy-loop
processes started beside it, 1 or 2 kernel threads and small work run serially or not
(numba_config.SERIAL_SMALL_WORK), it times the SGD step on one bias (16 floats, one launch) and
the optimizer step over every parameter of the default U-Net (base 16, depth 4: 46 launches),
as the median of --repeat runs. Prints a Markdown table (bench/results/threads_under_load.md).
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
from minunet.nn import UNet
from minunet.optim import SGD
from minunet.tensor import Tensor
from minunet.ops import numba_config, elementwise

repeat = int(sys.argv[1])
model = UNet(in_channels=1, num_classes=2, base_channels=16, depth=4, seed=0, device="cpu")
params = model.parameters()
rng = np.random.default_rng(0)
for p in params:
    p.grad = Tensor(rng.standard_normal(p.shape).astype(np.float32), device="cpu")
opt = SGD(params, lr=1e-6, momentum=0.99)
bias = [np.zeros(16, np.float32) for _ in range(3)]

def median_ms(fn):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))

rows = []
for threads in (1, 2):
    numba_config.set_num_threads(min(threads, numba_config.max_threads()))
    for serial in (False, True):
        numba_config.SERIAL_SMALL_WORK = serial
        one = median_ms(lambda: elementwise.sgd_cpu_step(*bias, 0.01, 0.99))
        step = median_ms(opt.step)
        rows.append(dict(threads=threads, serial=serial, bias_us=one * 1e3, step_ms=step))
print(json.dumps(dict(layer=numba_config.threading_layer(), launches=len(params), rows=rows)))
"""


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+", default=["tbb", "omp", "workqueue"])
    p.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}\n")
    print("| layer | busy processes | threads | small work serial | SGD on one bias (us) "
          "| SGD step, whole model (ms) |")
    print("|---|---:|---:|---|---:|---:|")
    for layer in args.layers:
        for busy in args.busy:
            loops = busy_loops(busy)
            try:
                time.sleep(0.5)
                env = dict(os.environ, NUMBA_THREADING_LAYER=layer,
                           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
                out = subprocess.run([sys.executable, "-c", CHILD, str(args.repeat)], env=env,
                                     capture_output=True, text=True, check=True).stdout
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            result = json.loads(out.strip().splitlines()[-1])
            for r in result["rows"]:
                print(f"| {result['layer']} | {busy} | {r['threads']} | "
                      f"{'yes' if r['serial'] else 'no'} | {r['bias_us']:.1f} | "
                      f"{r['step_ms']:.2f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {result['launches']} parameter "
          "arrays (one launch each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
