"""Backends: the same set of array functions once per device (see docs/backends.md).

``get_backend("cpu")`` is the NumPy reference module; ``get_backend("cuda")`` and
``get_backend("emu")`` are :class:`minunet.backends.kernels.KernelBackend` objects that launch the
kernels of ``kernels/*.cu`` through CuPy or through minunet's CUDA emulator.
"""
from __future__ import annotations

import functools

from ..devices import resolve_device

OP_NAMES = (
    "conv3x3_forward", "conv3x3_backward",
    "max_pool2x2_forward", "max_pool2x2_backward",
    "conv_transpose2x2_forward", "conv_transpose2x2_backward",
    "crop_concat_forward", "crop_concat_backward",
    "conv1x1_forward", "conv1x1_backward",
    "relu_forward", "relu_backward",
    "dropout_forward", "dropout_backward",
    "weighted_cross_entropy_forward",
    "sgd_step",
)


@functools.lru_cache(maxsize=None)
def get_backend(device: str):
    """The backend object for a device name (``"auto"`` resolved first)."""
    device = resolve_device(device)
    if device == "cpu":
        from . import reference

        return reference
    from .kernels import KernelBackend

    return KernelBackend(device)
