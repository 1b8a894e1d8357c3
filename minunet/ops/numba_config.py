"""Shared configuration of the fast CPU kernels (the "cpu" implementations in ``minunet/ops``),
which are compiled by Numba.

- ``jit(...)``: the one decorator they all use. ``cache=True`` writes the machine code next to
  the module (``minunet/ops/__pycache__/*.nbi, *.nbc``; Numba falls back to a per-user cache
  directory when that folder is not writable, and ``NUMBA_CACHE_DIR`` overrides both), so only
  the first run of a fresh install compiles. ``boundscheck=False`` is explicit, not left to the
  ``NUMBA_BOUNDSCHECK`` environment variable: the kernels round their vector loops up to whole
  registers and prove, in their docstrings, that every read stays inside its array.
- Threads: Numba starts ``NUMBA_NUM_THREADS`` worker threads (default: one per core) when it is
  first imported; ``set_num_threads(n)`` (``python -m minunet.train --threads n``) lets the
  kernels use fewer. The kernels split their work into fixed tasks that do not depend on the
  thread count, so the results are bit-identical for any number of threads.
- Only float32 arrays take the fast path (one compiled signature per kernel keeps the first
  compile short); every other dtype (float64 for gradient checks) goes to the NumPy reference.
"""
from __future__ import annotations

import numba
import numpy as np

LANES = 16  # float32 lanes of a 512-bit vector register: kernels round loop counts up to this


def jit(parallel: bool = True, fastmath=False):
    """``numba.njit`` with the options shared by every fast CPU kernel (see the module docstring).
    ``fastmath``: ``{"contract"}`` lets LLVM fuse a*b+c into one FMA instruction (one rounding
    instead of two); ``{"contract", "reassoc"}`` also lets it split a long sum into one partial
    sum per vector lane (needed to vectorise a reduction; it changes the summation order)."""
    return numba.njit(parallel=parallel, fastmath=fastmath, boundscheck=False, cache=True)


def all_float32(*arrays) -> bool:
    """True when every array is a float32 NumPy array: the only case the Numba kernels handle."""
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)


def max_threads() -> int:
    """The number of worker threads Numba started (``NUMBA_NUM_THREADS``, default the cores)."""
    return int(numba.config.NUMBA_NUM_THREADS)


def num_threads() -> int:
    """The number of threads the kernels use now."""
    return int(numba.get_num_threads())


def set_num_threads(n: int) -> None:
    """Let the fast CPU kernels use ``n`` threads (1 <= n <= ``max_threads()``)."""
    limit = max_threads()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise ValueError(f"threads must be an integer from 1 to {limit} (NUMBA_NUM_THREADS), got {n!r}; "
                         f"set NUMBA_NUM_THREADS before starting Python to allow more")
    numba.set_num_threads(int(n))
