"""The exceptions of minunet's CUDA emulator: all are ``EmulatorError`` (a ``RuntimeError``)."""
from __future__ import annotations


class EmulatorError(RuntimeError):
    """A kernel could not be compiled or launched, or did something a GPU would not forgive
    (an out-of-bounds access, a divergent ``__syncthreads()``, a failed device ``assert``)."""


class CompilerNotFoundError(EmulatorError):
    """No C++ compiler to build the emulated kernels with (install g++ or set ``CXX``)."""


class LaunchError(EmulatorError, ValueError):
    """A launch asked for something invalid: bad grid/block, wrong argument count or types.

    Also a ``ValueError``, like NumPy's own argument errors."""


class KernelNotFoundError(EmulatorError, LookupError):
    """``get_function`` was asked for a kernel the module does not define."""
