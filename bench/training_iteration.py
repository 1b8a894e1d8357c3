"""Where a training iteration's time goes on the cpu device (issue 17): the batch preparation and
the step of the default run (U-Net base 16, depth 4, tile 348, the built-in EM data), and the
Python cost of one kernel launch. Written to compare two checkouts of minunet:

    PYTHONPATH=<old checkout> python bench/training_iteration.py --label before
    PYTHONPATH=.              python bench/training_iteration.py --label after

(runs what the imported minunet has: ``TileSampler(device=...)``, ``KernelBackend.function``
and ``train.Batches`` only where they exist). Results: bench/results/training_iteration.md.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time

import numpy as np


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def launch_cost_us(repeat: int = 20000) -> dict:
    """Microseconds of Python per KernelBackend.launch on emu with the kernel itself replaced by
    a no-op: what the launch path costs beyond running the kernel."""
    from minunet.backends.kernels import KernelBackend

    backend = KernelBackend("emu")
    y = np.zeros(4, np.float32)
    args = (y, y, np.int32(4))
    backend.launch("elementwise", "relu_forward", (1,), (32,), args)   # compile once

    class NoOp:
        def get_function(self, name):
            return lambda grid, block, args: None

    if hasattr(backend, "function"):       # this change: functions cached per backend
        backend._functions = {k: (lambda grid, block, args: None) for k in backend._functions}
    else:                                  # before: the module cache, a stat per launch
        import minunet.backends.kernels as kernels

        for key, (mtime, size, _) in list(kernels._MODULES.items()):
            kernels._MODULES[key] = (mtime, size, NoOp())
    t0 = time.perf_counter()
    for _ in range(repeat):
        backend.launch("elementwise", "relu_forward", (1,), (32,), args)
    launch = (time.perf_counter() - t0) / repeat * 1e6
    from minunet.backends import get_backend

    cpu = get_backend("cpu")
    tiny = np.ones(16, np.float32)
    cpu.relu_forward(tiny)
    t0 = time.perf_counter()
    for _ in range(repeat):
        cpu.relu_forward(tiny)
    return {"emu launch (kernel a no-op)": launch,
            "cpu relu_forward call, 16 elements": (time.perf_counter() - t0) / repeat * 1e6}


def sgd_launches() -> int:
    """Kernel launches of one SGD update of the default U-Net on emu."""
    from minunet.backends import get_backend
    from minunet.nn import UNet
    from minunet.optim import SGD
    from minunet.tensor import Tensor

    model = UNet(base_channels=16, seed=0, device="emu")
    opt = SGD(model.parameters(), lr=1e-3, momentum=0.99)
    for p in model.parameters():
        p.grad = Tensor(np.zeros(p.shape, np.float32), device="emu")
    backend = get_backend("emu")
    count = []
    real = backend.launch
    backend.launch = lambda *a, **k: count.append(a[1])
    try:
        opt.step()
    finally:
        backend.launch = real
    return len(count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    import minunet
    from minunet import functional as F
    from minunet.data.dataset import TileSampler, synthetic_samples
    from minunet.nn import UNet
    from minunet.optim import SGD
    from minunet.tensor import Tensor
    from minunet.train import training_batch

    print(f"# {args.label}: minunet from {minunet.__file__}")
    samples = synthetic_samples("em", 24, 256, seed=0)
    options = {}
    if "device" in inspect.signature(TileSampler).parameters:
        options["device"] = "cpu"
    sampler = TileSampler(samples, 348, 164, np.random.default_rng(0), **options)
    model = UNet(base_channels=16, seed=0, device="cpu").train()
    opt = SGD(model.parameters(), lr=1e-6, momentum=0.99)

    def step(batch):
        x, target, weight = (Tensor(a, device="cpu") for a in batch)
        F.weighted_cross_entropy(model(x), target, weight).backward()
        opt.step()
        opt.zero_grad()

    prep = median_ms(lambda: training_batch(sampler, 1), args.repeat)
    batch = training_batch(sampler, 1)
    step_ms = median_ms(lambda: step(batch), args.repeat)
    serial = median_ms(lambda: step(training_batch(sampler, 1)), args.repeat)
    print(f"batch preparation        {prep:8.2f} ms (median of {args.repeat})")
    print(f"step                     {step_ms:8.2f} ms")
    print(f"iteration, prefetch 0    {serial:8.2f} ms   preparation = {100 * prep / serial:.0f}% of it")
    try:
        from minunet.train import Batches
    except ImportError:
        Batches = None
    if Batches is not None:
        batches = Batches(sampler, 1, ahead=1, device="cpu")
        try:
            batches.next()
            t0 = time.perf_counter()
            waits = []
            for _ in range(args.repeat):
                w0 = time.perf_counter()
                b = batches.next()[0]
                waits.append((time.perf_counter() - w0) * 1e3)
                step(b)
            overlapped = (time.perf_counter() - t0) / args.repeat * 1e3
        finally:
            batches.close()
        print(f"iteration, prefetch 1    {overlapped:8.2f} ms   (loop waited {statistics.median(waits):.2f} ms for data, median)")
    for what, us in launch_cost_us().items():
        print(f"{what:40s} {us:6.1f} us")
    print(f"SGD update of the default U-Net on emu: {sgd_launches()} kernel launch(es)")


if __name__ == "__main__":
    main()
