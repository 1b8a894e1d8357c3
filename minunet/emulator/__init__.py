"""minunet's CUDA emulator: run the kernels of ``kernels/*.cu`` on the CPU (``device="emu"``),
and find the bugs a GPU lets pass silently.

Usage (the same shape as ``cupy.RawModule`` / ``cupy.RawKernel``)::

    from minunet.emulator import EmuModule
    mod = EmuModule(code, name="relu.cu", options=("-DBLOCK=256",))
    fn = mod.get_function("relu_forward")
    fn(grid, block, (x, y, np.int32(n)), shared_mem=0)   # x, y: NumPy arrays, updated in place

Arrays stand in for device buffers (C-contiguous, any dtype matching the kernel's pointer type);
scalars must be NumPy scalars of the parameter's exact type (``np.int32(n)``, not ``n``), as a
GPU would garble a wrongly sized one.

How it works
------------
1. ``source.py``: the ``.cu`` text is kept as is, between ``#include "cuda_emu.h"`` and the runtime,
   with a ``#line`` directive so errors and ``__LINE__`` use the ``.cu`` line numbers. Python finds
   the ``__global__`` functions and generates an exported entry point for each; it rewrites
   ``extern __shared__ T s[];`` into a pointer to the launch's dynamic buffer, and every
   ``__shared__`` variable inside a function (arrays and scalars) into a holder whose storage the
   runtime hands out from its per-block arena (this works in template functions too).
2. ``cuda_emu.h``: CUDA's qualifiers become nothing or ``static``; ``threadIdx``, ``blockIdx``,
   ``blockDim``, ``gridDim`` are read-only views of variables the runtime sets per thread; math
   intrinsics map to libm; atomics are real atomic read-modify-writes; warp collectives park the
   calling thread until its warp-mates arrive. ``include/`` holds the emulator's ``<mma.h>``
   (wmma: TF32 and FP16 tensor-core fragments), ``<cuda_fp16.h>`` and ``<cuda_pipeline.h>``
   (asynchronous global-to-shared copies, whose destination reads as NaN until the thread waits).
3. ``compiler.py``: ``g++ -std=c++17`` into a shared library, in one of two modes (``modes.py``):
   *checked* (``-O2 -g`` with ``-fsanitize=thread`` instrumentation, which makes GCC call our
   check before every load and store; linked without the sanitizer's runtime) or *fast*
   (``-O3``, no checks). Libraries are cached by a hash of source, headers, compiler and flags in
   ``$MINUNET_CACHE_DIR/emu`` (default ``~/.cache/minunet/emu``), written atomically.
4. ``launcher.py`` + ``emu_runtime.h`` (with ``emu_check.h``, ``emu_shared.h``, ``emu_sched.h``):
   arguments are checked against the kernel's C++ parameter types and packed like the driver API
   (``void* args[]``). Checked mode copies every array into its own slice of address space and
   runs the blocks one after another; fast mode spreads the blocks over the CPU cores and works
   on the NumPy memory itself. Threads of a block run in a plain loop while a kernel has never
   reached a ``__syncthreads()`` or warp collective; the first time one does, the launch restarts
   from fresh copies with one fiber (64 KiB stack) per CUDA thread, and the scheduler runs every
   fiber up to its next barrier or collective before releasing any: real barrier semantics.

What it catches in checked mode (each fails the launch with an ``EmulatorError`` naming the
kernel, the CUDA thread and block, the argument or array and element, and the source line)
------------------------------------------------------------------------------------------
- Out-of-bounds loads and stores on array arguments, exactly, and against the argument the
  pointer came from: each buffer lives alone in a 64 GiB slice of address space, so ``a[5000]``
  of an 8-element ``a`` is reported as ``a``, never read from the buffer next to it. Also on the
  ``extern __shared__`` buffer (beyond ``shared_mem`` bytes) and on static ``__shared__`` arrays,
  where *every index is checked against its own dimension*: ``t[r][8]`` of a ``float t[8][8]``
  is an error although it lands inside row ``r+1``. Stores through a pointer that only ``const``
  parameters name.
- Races, as compute-sanitizer's racecheck defines them: between two barriers (``__syncthreads``,
  and ``__syncwarp`` for the lanes it names) a write by one thread and a read or write of the
  same byte by another, in shared memory (per byte: the last writer and two readers of the
  interval) and in global memory (per byte of a written buffer of up to 16 MiB: the last writer
  and reader; also between blocks, which never synchronise within a launch). The report names both threads and
  both source lines. Atomics are not hazards. Two writes of the *same value* are not reported
  (the result does not depend on their order); the check compares the bytes after the second
  store. After a ``__threadfence()`` global read-after-write and write-after-read between blocks
  are no longer reported for that launch (deliberate hand-offs, as in "last block" reductions).
  The shadow state costs memory and time; ``MINUNET_EMU_RACECHECK=off`` (or ``racecheck=False``,
  ``set_racecheck(False)``) switches it off for long checked runs.
- Misaligned accesses: every load and store must be aligned to its size, and copying a 2- or
  4-component vector type (``float2``, ``float4``, ``int4``, ...) from or to memory must be aligned
  to the vector's size, as a GPU's 8- and 16-byte accesses must (GCC would split the copy).
- More than 48 KiB of shared memory per block: the static ``__shared__`` variables a launch
  reaches, plus ``shared_mem``, are added up and refused over 49152 bytes, as ptxas and the driver
  do (arrays a launch never reaches are not counted).
- Faults: a garbage or null pointer (the process survives), integer division by zero, a fiber
  stack overflow.
- Barrier misuse: threads of a block waiting at different ``__syncthreads()`` lines, or some
  threads returning while others wait at one (undefined behaviour on a GPU; often "works").
- Warp-collective misuse: a lane calling with its own bit missing from the mask, lanes named in
  a mask waiting at different calls or with different masks, an invalid width; reading from a
  lane that does not take part gives 0xFF bytes (NaN as float).
- Order bugs: the order of blocks, and of the threads of a block between two barriers, is
  shuffled, so a result that depends on an order a GPU does not promise changes with the seed.
  DEFAULT: shuffling ON with seed 0, mixed with each kernel's launch count (so the n-th launch of a
  kernel is reproducible). Choose another seed with ``EmuModule(..., shuffle_seed=7)``,
  ``MINUNET_EMU_SEED=7`` or ``set_shuffle_seed(7)`` (modules created with ``shuffle_seed=None``
  follow it at their next launch); ``-1`` / ``MINUNET_EMU_SEED=off`` runs blocks and threads in
  index order.
- Unwritten shared memory: all ``__shared__`` memory is filled with 0xFF bytes (NaN as float,
  -1 as int) at the start of each block, so reading a slot no thread wrote gives NaN rather than a
  plausible stale value.
- Launch mistakes: block over 1024 threads or over ``__launch_bounds__`` (macros resolved),
  zero or oversized dimensions, dynamic shared memory over 48 KiB, wrong argument count, Python
  scalars or wrongly typed NumPy scalars, arrays of the wrong dtype, non-contiguous or read-only
  arrays for non-const pointers; assert() and __trap() in kernels.

Fast mode checks none of this (only faults and device asserts are still reported, without
naming the buffer): use it for long runs of kernels the checked mode has passed.

What it cannot tell
-------------------
- Speed: nothing here measures how fast a kernel is on a GPU. What can be counted is counted
  (see ``profile``), and a time can only be *predicted* from those counts by a model.
- Races the run did not exercise: the checker sees the accesses of this launch, in this thread
  order; a hazard on a path no thread took is not reported. It remembers two readers per byte of
  shared memory and one of global memory, so a third reader's hazard can go unreported. Plain
  accesses that race with atomics are not reported.
- Numerics: ``__expf`` and friends are the exact libm functions, and GCC does not fuse
  multiply-adds as nvcc does, so results differ from a GPU's in the last bits (compare with
  tolerances).
- Global ``__device__`` variables keep their values across launches and are not bounds-checked;
  ``__shared__`` variables at file scope are one unchecked copy (fast mode then runs the blocks on
  one OS thread). Out-of-bounds accesses are checked on device memory only; pointers the kernel
  computes into its own stack or globals are not.
- A static ``__shared__`` array in checked mode is a checking view, not a C array:
  ``sizeof(tile)``, ``auto* p = tile[r]`` and template argument deduction from it do not work
  (``float* p = tile[r]``, ``&tile[r][c]``, ``tile + k`` and passing it to a function do).

Debugging a kernel
------------------
``MINUNET_EMU_DEBUG=1`` compiles with ``-O0 -g``; pass the path of the ``.cu`` file as ``name``
(or use gdb's ``directory kernels``) and step through a kernel like any C function::

    MINUNET_EMU_DEBUG=1 MINUNET_EMU_SEED=off gdb --args python -m pytest tests/test_x.py -k relu
    (gdb) set breakpoint pending on
    (gdb) break relu_forward          # stops once per CUDA thread
    (gdb) run
    (gdb) print threadIdx             # which thread this is; `next`, `print i`, ...

``printf`` works inside kernels. The generated C++ of each module is kept next to its library in
the cache folder.
"""
from .errors import CompilerNotFoundError, EmulatorError, KernelNotFoundError, LaunchError
from .launcher import EmuFunction, EmuModule
from .modes import (emu_mode, racecheck, set_emu_mode, set_racecheck, set_shuffle_seed, set_workers,
                    shuffle_seed, workers)
from .gpu_model import GPUS, kernel_resources, occupancy
from .profiler import KernelProfile, ProfileReport, format_profile, profile

__all__ = ["EmuModule", "EmuFunction", "EmulatorError", "CompilerNotFoundError", "LaunchError",
           "KernelNotFoundError", "emu_mode", "set_emu_mode", "shuffle_seed", "set_shuffle_seed",
           "racecheck", "set_racecheck", "workers", "set_workers", "profile", "format_profile",
           "ProfileReport", "KernelProfile", "occupancy", "kernel_resources", "GPUS"]
