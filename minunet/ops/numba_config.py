"""Shared configuration of the fast CPU kernels (the "cpu" implementations in ``minunet/ops``),
which are compiled by Numba.

- ``jit(...)``: the one decorator they all use. ``cache=True`` writes the machine code next to
  the module (``minunet/ops/__pycache__/*.nbi, *.nbc``; Numba falls back to a per-user cache
  directory when that folder is not writable, and ``NUMBA_CACHE_DIR`` overrides both), so only
  the first run of a fresh install compiles. ``boundscheck=False`` is explicit, not left to the
  ``NUMBA_BOUNDSCHECK`` environment variable: the kernels round their vector loops up to whole
  registers and prove, in their docstrings, that every read stays inside its array.
- Threads: Numba starts ``NUMBA_NUM_THREADS`` worker threads (default: one per core) when a
  kernel first runs; ``set_num_threads(n)`` (``python -m minunet.train --threads n``) lets the
  kernels use fewer. The kernels split their work into fixed tasks that do not depend on the
  thread count, so the results are bit-identical for any number of threads.
- Threading layer: Numba's choice (``NUMBA_THREADING_LAYER``): TBB when the ``tbb`` package is
  installed (a dependency of minunet), else GNU OpenMP, else its own ``workqueue``. On an idle
  machine TBB and OpenMP train equally fast and the workqueue is slower (its launches are
  slow). On cores shared with other busy processes OpenMP's workers spin at the end of every
  loop while the thread they wait for is preempted, and a training step takes many times
  longer; TBB balances the work and its workers sleep. Passive OpenMP waiting would fix that
  but slows the idle case (and the runtime is shared with PyTorch's when both load libgomp), so
  it is not set here. The measurements are in bench/results/cpu_numba.md. The workqueue is not
  thread-safe (two Python threads launching kernels at once abort the process, and Dask runs
  prediction blocks in threads), so every launch takes ``LAUNCH_LOCK``.
- Small work runs serially. Waking the worker threads costs little on idle cores, but on cores
  shared with other busy processes a launch waits until the operating system schedules every
  worker: a kernel of a few microseconds (the SGD step on a bias) then costs milliseconds, and
  a training step launches about a hundred such kernels. ``jit(serial_up_to=n)`` gives a kernel
  a second, serial compilation (``parallel=False``: ``prange`` is a plain ``range``, the same
  tasks in the same order, so the result is bit-identical) that runs on the calling thread when
  the largest array argument holds at most ``n`` elements, for example the elementwise kernels'
  one-task launches. ``SERIAL_SMALL_WORK = False`` turns this off (tests use it to exercise the
  threaded path on small arrays). Measured in bench/results/threads_under_load.md.
- Only float32 arrays take the fast path (one compiled signature per kernel keeps the first
  compile short); every other dtype (float64 for gradient checks) goes to the NumPy reference.
"""
from __future__ import annotations

import functools
import threading
import types

import numba
import numpy as np

LANES = 16  # float32 lanes of a 512-bit vector register: kernels round loop counts up to this
LAUNCH_LOCK = threading.Lock()   # one kernel launch at a time (see the module docstring)
SERIAL_SMALL_WORK = True         # run launches within a kernel's serial_up_to on one thread
KERNELS: list = []               # (dispatcher, its serial twin or None) per kernel jit() made


def _renamed(fn, suffix: str):
    """A copy of the Python function `fn` under another qualified name. Numba's on-disk cache
    names its files after the function and does not key them on ``parallel``: the serial
    compilation of a kernel needs its own name, or it would load the parallel machine code."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                              fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__module__ = fn.__qualname__ + suffix, fn.__module__
    return copy


def _largest_array(args) -> int:
    return max((a.size for a in args if isinstance(a, np.ndarray)), default=0)


def jit(parallel: bool = True, fastmath=False, serial_up_to: int = 0):
    """``numba.njit`` with the options shared by every fast CPU kernel (see the module docstring);
    a parallel kernel is returned wrapped so that each launch holds ``LAUNCH_LOCK`` (the compiled
    dispatcher stays reachable as ``.compiled``). ``fastmath``: ``{"contract"}`` lets LLVM fuse
    a*b+c into one FMA instruction (one rounding instead of two); ``{"contract", "reassoc"}``
    also lets it split a long sum into one partial sum per vector lane (needed to vectorise a
    reduction; it changes the summation order). ``serial_up_to``: launches whose largest array
    argument has at most this many elements run a serial compilation on the calling thread
    (``.serial``, compiled on first use; see "Small work runs serially" above)."""
    def decorate(fn):
        options = dict(fastmath=fastmath, boundscheck=False, cache=True)
        compiled = numba.njit(parallel=parallel, **options)(fn)
        if not parallel:
            KERNELS.append((compiled, None))
            return compiled
        serial = numba.njit(parallel=False, **options)(_renamed(fn, "_serial")) \
            if serial_up_to > 0 else None
        KERNELS.append((compiled, serial))

        @functools.wraps(fn)
        def launch(*args):
            if serial is not None and SERIAL_SMALL_WORK and _largest_array(args) <= serial_up_to:
                return serial(*args)      # no worker threads: no lock needed
            with LAUNCH_LOCK:
                return compiled(*args)

        launch.compiled, launch.serial = compiled, serial
        return launch

    return decorate


def _cached(dispatcher) -> bool:
    import os

    try:
        return os.path.isfile(dispatcher._cache._cache_file._index_path)  # Numba's FunctionCache
    except AttributeError:
        return True


def uncached_kernels() -> list[str]:
    """The names of the fast CPU kernels of which no compilation (the parallel one or its serial
    twin) is in Numba's on-disk cache yet (no index file where it would be): they compile on
    first use. A twin that work of another size needs, or an index written for another CPU or
    Numba version, also compiles when used, so this is a lower bound."""
    return [parallel.py_func.__qualname__ for parallel, serial in KERNELS
            if not any(_cached(d) for d in (parallel, serial) if d is not None)]


def all_float32(*arrays) -> bool:
    """True when every array is a float32 NumPy array: the only case the Numba kernels handle."""
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)


def max_threads() -> int:
    """The number of worker threads Numba started (``NUMBA_NUM_THREADS``, default the cores)."""
    return int(numba.config.NUMBA_NUM_THREADS)


def threading_layer() -> str:
    """The threading layer the kernels run on ("tbb", "omp" or "workqueue"); starts it."""
    numba.get_num_threads()   # starts the layer
    return numba.threading_layer()


def num_threads() -> int:
    """The number of threads the kernels use now."""
    return int(numba.get_num_threads())


def set_num_threads(n: int) -> None:
    """Let the fast CPU kernels use ``n`` threads (1 <= n <= ``max_threads()``)."""
    limit = max_threads()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise ValueError(f"threads must be an integer from 1 to {limit} (NUMBA_NUM_THREADS), "
                         f"got {n!r}; "
                         f"set NUMBA_NUM_THREADS before starting Python to allow more")
    numba.set_num_threads(int(n))
