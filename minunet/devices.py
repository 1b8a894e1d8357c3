"""Device names and the array module behind each.

A minunet tensor lives on one of three devices (see docs/backends.md):

- ``"cpu"``:  NumPy arrays, ops run by the NumPy reference (the oracle);
- ``"cuda"``: CuPy arrays, ops run by the hand-written kernels in ``kernels/*.cu``;
- ``"emu"``:  NumPy arrays standing in for device memory, ops run by the *same* ``.cu`` kernels
  compiled for the CPU by minunet's CUDA emulator (for tests, teaching and debugging).

``"auto"`` picks ``cuda`` when CuPy sees a GPU, else ``cpu``.
"""
from __future__ import annotations

import functools

import numpy as np

DEVICES = ("cpu", "cuda", "emu")


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(available, reason): whether CuPy is importable and sees at least one GPU."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc}); install with pip install -e \".[cuda]\""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy sees no GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "CuPy sees no GPU"
    return True, f"{count} GPU(s)"


def cuda_available() -> bool:
    return cuda_status()[0]


def resolve_device(device: str) -> str:
    """Check a device name and turn ``"auto"`` into a concrete one."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', got {type(device).__name__}")
    name = device.lower()
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: use one of 'cpu', 'cuda', 'emu' or 'auto'")
    if name == "cuda" and not cuda_available():
        raise ValueError(f"device 'cuda' is not usable: {cuda_status()[1]}; use device='cpu' or 'emu'")
    return name


def array_module(device: str):
    """``numpy`` for cpu and emu, ``cupy`` for cuda."""
    if device == "cuda":
        import cupy

        return cupy
    return np


def to_host(array) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    if get is not None:
        return get()
    return np.asarray(array)


def to_device_array(array, device: str):
    """Place ``array`` on ``device``: a CuPy array for cuda, a NumPy array otherwise (C-contiguous)."""
    if device == "cuda":
        import cupy

        return cupy.ascontiguousarray(cupy.asarray(array))
    return np.ascontiguousarray(to_host(array))
