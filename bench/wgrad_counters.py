"""The emulator's counters for every weight-gradient version (issue 16), one table per version,
and for the up-convolution's forward and input-gradient versions (naive with tree/serial, gemm
with gemm).

    PYTHONPATH=. python bench/wgrad_counters.py [--base-channels 8] [--tile 188] [--gpu sm_90]

Runs the backward pass of each convolution's benchmark shapes (the ops' ``bench_cases``) on
``emu`` with the weight-gradient version forced ("tree", "serial", "gemm", and "gemm" in tf32)
inside ``minunet.emulator.profile``, and prints the rows of the weight-gradient kernels: global
sectors per request (coalescing), shared-memory wavefronts per request (bank conflicts),
occupancy, and a time PREDICTED by the emulator's roofline model for --gpu. Counts are exact for
the sampled blocks; times are predictions, never measurements, and the H200 files
(bench/results/h200-2026-12-04) show that model misses small grids by a wide margin.
"""
from __future__ import annotations

import argparse

import numpy as np

from minunet import emulator
from minunet.backends.kernels import KernelBackend
from minunet.ops import conv1x1, conv3x3, conv_transpose2x2

OPS = (conv3x3, conv1x1, conv_transpose2x2)
# (weight-gradient reduction, precision, up-convolution forward/input-gradient version)
VERSIONS = (("tree", "fp32", "naive"), ("serial", "fp32", "naive"), ("gemm", "fp32", "gemm"), ("gemm", "tf32", "gemm"))
ROWS = ("grad_weight", "sum_partials", "conv_transpose2x2_forward", "conv_transpose2x2_grad_input")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--tile", type=int, default=188)
    parser.add_argument("--gpu", default="sm_90", choices=("sm_80", "sm_90"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for reduction, precision, up in VERSIONS:
        backend = KernelBackend("emu", reduction=reduction, precision=precision, conv_transpose2x2=up)
        with emulator.profile(gpu=args.gpu, sample_blocks=8) as report:
            for op in OPS:
                functions = [f for f in op.IMPLEMENTATIONS if f.endswith("_backward") or op is conv_transpose2x2]
                for case in op.bench_cases(args.base_channels, args.tile, 1):
                    for function in functions:
                        getattr(backend, function)(*op.example(rng, case)[function])
        text = emulator.format_profile(report)
        print(f"## reduction={reduction} precision={precision} conv_transpose2x2={up} (base {args.base_channels}, tile {args.tile}; "
              f"times PREDICTED for {args.gpu})")
        print("\n".join(line for i, line in enumerate(text.splitlines())
                        if i < 3 or any(row in line for row in ROWS)))
        print()


if __name__ == "__main__":
    main()
