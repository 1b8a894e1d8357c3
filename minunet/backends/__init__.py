"""Backends: the same set of array functions once per device (see docs/backends.md).

A backend is an object with attributes ``device`` and ``xp`` (the array module) and one method per
backend function (``conv3x3_forward``, ...). The functions themselves live with their ops in
``minunet/ops/<op>.py``; ``minunet.ops.register_backends`` attaches them here:

- ``get_backend("cpu")``: a :class:`CpuBackend`, the fast CPU kernels where an op has them and the
  NumPy reference elsewhere;
- ``minunet.backends.reference``: the :class:`ReferenceBackend`, the NumPy oracle every other
  implementation is tested against (dtype-generic: float64 for finite differences);
- ``get_backend("cuda")`` and ``get_backend("emu")``: :class:`~minunet.backends.kernels.KernelBackend`
  objects that launch the kernels of ``kernels/*.cu`` through CuPy or minunet's CUDA emulator.
"""
from __future__ import annotations

import functools

import numpy as np

from ..devices import resolve_device
from .allocator import keep_freed_memory


class HostBackend:
    """A backend on NumPy arrays in host memory (device "cpu")."""
    xp = np
    device = "cpu"
    kind = ""

    def __repr__(self) -> str:
        return f"<minunet {self.kind} backend>"


class ReferenceBackend(HostBackend):
    """The NumPy reference of every op: the oracle, checked by finite differences."""
    kind = "reference"


class CpuBackend(HostBackend):
    """Device "cpu": each op's fast CPU kernel where it has one, else its NumPy reference."""
    kind = "cpu"


reference = ReferenceBackend()


@functools.lru_cache(maxsize=None)
def get_backend(device: str):
    """The backend object for a device name (``"auto"`` resolved first)."""
    device = resolve_device(device)
    if device == "cpu":
        keep_freed_memory()  # reuse freed activation buffers instead of page-faulting fresh ones
        return CpuBackend()
    from .kernels import KernelBackend

    return KernelBackend(device)


def function_names() -> tuple[str, ...]:
    """Every backend function, in the registry's order (minunet/ops)."""
    from .. import ops

    return tuple(ops.functions())


from .. import ops  # noqa: E402,F401  (registers every op's functions on the classes above)
