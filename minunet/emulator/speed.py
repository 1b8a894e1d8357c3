"""How much slower is training on the emulator than on the CPU? A few SGD steps of a small U-Net.

    python -m minunet.emulator.speed                    # base 8, 188 x 188 tile, 3 timed steps
    python -m minunet.emulator.speed --modes fast checked --steps 2

Each step is one forward pass, the weighted cross-entropy, one backward pass and one SGD update
of ``mu.UNet(base_channels=B)`` on one random tile, on ``device="cpu"`` (the NumPy reference) and
on ``device="emu"`` in each emulator mode asked for. One untimed step first compiles the kernels
(or loads them from the cache) and warms everything up; then the median of the timed steps is
printed as a table, with the ratio to ``cpu``. These are times on *this* CPU: the emulator's
speed, not a GPU's (see ``minunet.emulator.profile`` for a predicted GPU time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def step_times(device: str, base: int, tile: int, steps: int, seed: int = 0) -> list[float]:
    """Seconds per training step (forward, loss, backward, SGD) on ``device``, after one warm-up."""
    import minunet as mu
    import minunet.functional as F

    rng = np.random.default_rng(seed)
    model = mu.UNet(base_channels=base, device=device, seed=seed)
    out = mu.UNet.output_size(tile)
    opt = mu.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)
    x = mu.Tensor(rng.standard_normal((1, 1, tile, tile)).astype(np.float32), device=device)
    target = mu.Tensor(rng.integers(0, 2, (1, out, out)), device=device)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = F.weighted_cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss.numpy())
        if i:  # the first step compiles and warms up
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minunet.emulator.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=8, help="base channels of the U-Net (default 8)")
    parser.add_argument("--tile", type=int, default=188, help="input tile side (default 188, a valid size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per device (default 3)")
    parser.add_argument("--modes", nargs="+", default=["fast"], choices=["fast", "checked"],
                        help="emulator modes to time (default: fast)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        print("speed: --steps must be >= 1", file=sys.stderr)
        return 2
    from . import set_emu_mode

    rows = [("cpu", statistics.median(step_times("cpu", args.base, args.tile, args.steps)))]
    for mode in args.modes:
        set_emu_mode(mode)
        rows.append((f"emu ({mode})", statistics.median(step_times("emu", args.base, args.tile, args.steps))))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"U-Net base {args.base}, tile {args.tile}, median of {args.steps} steps, {cores} cores")
    print(f"{'device':<16} {'s / step':>10} {'x cpu':>8}")
    for name, seconds in rows:
        print(f"{name:<16} {seconds:>10.3f} {seconds / rows[0][1]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
