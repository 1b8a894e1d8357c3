"""The ops of U-Net, one module per op family, each next to its CUDA file in ``kernels/``:

    conv3x3            kernels/conv3x3.cu             3x3 valid convolution (naive, tiled, igemm, wmma; fused ReLU)
    maxpool2x2         kernels/maxpool2x2.cu          2x2 max-pooling
    conv_transpose2x2  kernels/conv_transpose2x2.cu   2x2 up-convolution
    crop_concat        kernels/crop_concat.cu         the skip connections
    conv1x1            kernels/conv1x1.cu             the classifier
    elementwise        kernels/elementwise.cu         ReLU, dropout, SGD with momentum
    cross_entropy      kernels/cross_entropy.cu       the weighted loss of eq. 1
    resample           kernels/resample.cu            the augmentation's gather (Section 3.1)

A module holds everything Python about its op: the differentiable function (argument checks and
autograd Function), the NumPy reference (the oracle), a fast CPU kernel where one exists, and the
launcher of its CUDA kernels. Its ``IMPLEMENTATIONS`` dict maps each backend function of
docs/backends.md to its implementations by kind:

    "reference"  NumPy, dtype-generic: the oracle, checked by finite differences
    "cpu"        (optional) the fast CPU path of device "cpu"; the reference where absent
    "kernels"    f(kernel_backend, ...): launches kernels/<op>.cu on "cuda" or "emu"

and its ``TEST_CASES``/``example``/``tolerance`` and ``bench_cases``/``cost`` drive the
kernel-vs-reference tests and the benchmark rows. This file is the one registry: ``OPS`` lists the
modules, and ``register_backends`` puts each implementation on the backend classes of
``minunet.backends``, so adding an op means one module here, one ``.cu`` file, and its tests.
"""
from __future__ import annotations

from . import (conv1x1, conv3x3, conv_transpose2x2, crop_concat, cross_entropy, elementwise, maxpool2x2,
               resample)

OPS = (conv3x3, maxpool2x2, conv_transpose2x2, crop_concat, conv1x1, elementwise, cross_entropy, resample)
KINDS = ("reference", "cpu", "kernels")


def functions() -> dict[str, dict]:
    """Every backend function name -> its implementations by kind (``"cpu"`` filled in with the
    reference where an op has no fast CPU kernel)."""
    table = {}
    for op in OPS:
        for name, impls in op.IMPLEMENTATIONS.items():
            if name in table:
                raise RuntimeError(f"backend function {name} is defined by two ops")
            table[name] = {"cpu": impls["reference"], **impls}
    return table


def op_of(function: str):
    """The op module that defines a backend function."""
    for op in OPS:
        if function in op.IMPLEMENTATIONS:
            return op
    raise KeyError(f"no op defines the backend function {function!r}")


def tolerance(op, function: str, case) -> dict:
    """The test tolerance |got - want| <= atol + rtol * |want| of one function on one case."""
    return op.tolerance(function, case) if hasattr(op, "tolerance") else op.TOLERANCE


def register_backends() -> None:
    """Attach every implementation to the backend classes: the reference's functions to
    ``ReferenceBackend``, the fast CPU ones to ``CpuBackend``, the launchers to ``KernelBackend``
    (as methods: a launcher's first argument is the kernel backend)."""
    from ..backends import CpuBackend, ReferenceBackend
    from ..backends.kernels import KernelBackend

    for name, impls in functions().items():
        setattr(ReferenceBackend, name, staticmethod(impls["reference"]))
        setattr(CpuBackend, name, staticmethod(impls["cpu"]))
        setattr(KernelBackend, name, impls["kernels"])


register_backends()
