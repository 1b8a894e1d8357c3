"""How much slower is training on the emulator than on the CPU? A few SGD steps of a small U-Net.

    python -m minunet.emulator.speed                    # base 8, 188 x 188 tile, 3 timed steps
    python -m minunet.emulator.speed --modes fast checked --steps 2

Each step is one forward pass, the weighted cross-entropy, one backward pass and one SGD update
of ``mu.UNet(base_channels=B)`` on one random tile, on ``device="cpu"`` (its Numba kernels, and
again with the NumPy reference functions in their place: "cpu (reference)") and on
``device="emu"`` in each emulator mode asked for, each in its own process. One untimed step first compiles the
kernels (or loads them from the cache) and warms everything up; then the median of the timed
steps is printed as a table, wall-clock and CPU seconds (all threads of the process), with the
ratios to ``cpu``. These are times on *this* CPU: the emulator's
speed, not a GPU's (see ``minunet.emulator.profile`` for a predicted GPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def use_reference_on_cpu() -> None:
    """Make device "cpu" run every op's NumPy reference instead of its fast CPU kernel (in this
    process): the CPU path as it was before the Numba kernels, for comparison."""
    from minunet import ops
    from minunet.backends import CpuBackend

    for name, impls in ops.functions().items():
        setattr(CpuBackend, name, staticmethod(impls["reference"]))


def step_times(device: str, base: int, tile: int, steps: int, seed: int = 0) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of this process) per training step (forward, loss, backward,
    SGD) on ``device`` ("reference": device "cpu" with the NumPy reference functions), after one
    warm-up step. CPU seconds add up every thread of the process, so they are the fairer number
    when other programs share the cores."""
    import minunet as mu
    import minunet.functional as F

    if device == "reference":
        use_reference_on_cpu()
        device = "cpu"

    rng = np.random.default_rng(seed)
    model = mu.UNet(base_channels=base, device=device, seed=seed)
    out = mu.UNet.output_size(tile)
    opt = mu.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)
    x = mu.Tensor(rng.standard_normal((1, 1, tile, tile)).astype(np.float32), device=device)
    target = mu.Tensor(rng.integers(0, 2, (1, out, out)), device=device)
    times = []
    for i in range(steps + 1):
        start, cpu = time.perf_counter(), time.process_time()
        loss = F.weighted_cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss.numpy())
        if i:  # the first step compiles and warms up
            times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


THREAD_VARIABLES = ("MINUNET_EMU_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")


def measure(device: str, mode: str, base: int, tile: int, steps: int, threads: int | None = None) -> tuple[float, float]:
    """Median (wall, CPU) seconds per step, measured in a fresh process, so that every emulator
    mode compiles and caches its own modules (the kernel backend keeps the modules it made)."""
    code = (f"import json; from minunet.emulator.speed import step_times; "
            f"print(json.dumps(step_times({device!r}, {base}, {tile}, {steps})))")
    env = dict(os.environ, MINUNET_EMU_MODE=mode or "checked")
    if threads:  # the same number of threads for the emulator's workers, Numba and BLAS
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"timing {device} {mode or ''} failed:\n{done.stderr[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minunet.emulator.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=8, help="base channels of the U-Net (default 8)")
    parser.add_argument("--tile", type=int, default=188, help="input tile side (default 188, a valid size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per device (default 3)")
    parser.add_argument("--modes", nargs="+", default=["fast"], choices=["fast", "checked"],
                        help="emulator modes to time (default: fast)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every device (emulator workers, Numba, BLAS); default: each library's own")
    args = parser.parse_args(argv)
    if args.steps < 1:
        print("speed: --steps must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("speed: --threads must be >= 1", file=sys.stderr)
        return 2
    rows = [("cpu", *measure("cpu", "", args.base, args.tile, args.steps, args.threads)),
            ("cpu (reference)", *measure("reference", "", args.base, args.tile, args.steps, args.threads))]
    for mode in args.modes:
        rows.append((f"emu ({mode})", *measure("emu", mode, args.base, args.tile, args.steps, args.threads)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"U-Net base {args.base}, tile {args.tile}, median of {args.steps} steps, {cores} cores, "
          f"threads {args.threads or 'default'}, load average {load:.1f} at the end")
    print(f"{'device':<16} {'wall s/step':>12} {'x cpu':>7} {'x ref':>7} {'CPU s/step':>11} {'x cpu':>7}")
    for name, wall, cpu in rows:
        print(f"{name:<16} {wall:>12.3f} {wall / rows[0][1]:>7.1f} {wall / rows[1][1]:>7.1f} "
              f"{cpu:>11.3f} {cpu / rows[0][2]:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
