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
   ``extern __shared__ T s[];`` into a reference to the launch's dynamic buffer, and each
   ``__shared__ T a[N];`` array into a reference to storage the runtime hands out from its
   shared-memory arena, between registered redzones (this works in template functions too).
2. ``cuda_emu.h``: CUDA's qualifiers become nothing or ``static``; ``threadIdx``, ``blockIdx``,
   ``blockDim``, ``gridDim`` are read-only references to variables the runtime sets per thread;
   a ``__shared__`` array lives in the runtime's arena and a ``__shared__`` scalar is a
   ``static`` variable in the linker section ``emu_shared`` (one copy, and blocks run one at a
   time: one copy per block; both are refilled with NaN bytes before every block); math intrinsics map to libm; atomics are plain
   read-modify-writes (one thread runs at a time).
3. ``compiler.py``: ``g++ -std=c++17 -O2 -shared -fPIC`` with ``-fsanitize=kernel-address`` in
   "call" mode, which makes GCC call our bounds check before every load and store. Libraries are
   cached by a hash of source, headers, compiler and flags in ``$MINUNET_CACHE_DIR/emu`` (default
   ``~/.cache/minunet/emu``), written atomically.
4. ``launcher.py`` + ``emu_runtime.h``: arguments are checked against the kernel's C++ parameter
   types and packed like the driver API (``void* args[]``). The runtime copies the arrays into a
   guarded arena, runs the blocks one after another, and copies writable buffers back only if the
   launch succeeded. Threads of a block run in a plain loop while a kernel has never reached a
   ``__syncthreads()``; the first time one does, the launch restarts from fresh copies with one
   fiber (64 KiB stack, 15-instruction context switch on x86-64, ucontext elsewhere) per CUDA
   thread, and the scheduler runs every fiber up to its next barrier before releasing any: real
   barrier semantics.

What it catches (each fails the launch with an ``EmulatorError`` naming the kernel, the CUDA
thread and block, the argument and element)
------------------------------------------------------------------------------------------
- Out-of-bounds loads and stores on array arguments, exactly: ``x[n]``, ``x[-1]``, reads and
  writes, whatever the array size (the check knows each buffer's first and last byte; guard pages
  after every buffer catch the rest). Also on the ``extern __shared__`` buffer (beyond
  ``shared_mem`` bytes) and on static ``__shared__`` arrays (within 64 bytes before or after the
  array, on the flattened array: ``tile[0][17]`` of a ``[16][17]`` tile that lands inside row 1 is
  not caught). Stores through a pointer that only ``const`` parameters name.
- Faults: a garbage or null pointer (the process survives), integer division by zero, a fiber
  stack overflow.
- Barrier misuse: threads of a block waiting at different ``__syncthreads()`` lines, or some
  threads returning while others wait at one (undefined behaviour on a GPU; often "works").
- Order bugs: the order of blocks, and of the threads of a block between two barriers, is
  shuffled, so a missing ``__syncthreads()`` or a race between threads changes the result.
  DEFAULT: shuffling ON with seed 0, mixed with each kernel's launch count (so the n-th launch of a
  kernel is reproducible). Choose another seed with ``EmuModule(..., shuffle_seed=7)`` or
  ``MINUNET_EMU_SEED=7``; ``-1`` / ``MINUNET_EMU_SEED=off`` runs blocks and threads in index order.
- Unwritten shared memory: all ``__shared__`` memory is filled with 0xFF bytes (NaN as float,
  -1 as int) at the start of each block, so reading a slot no thread wrote gives NaN rather than a
  plausible stale value.
- Launch mistakes: block over 1024 threads or over ``__launch_bounds__`` (macros resolved),
  zero or oversized dimensions, dynamic shared memory over 48 KiB, wrong argument count, Python
  scalars or wrongly typed NumPy scalars, arrays of the wrong dtype, non-contiguous or read-only
  arrays for non-const pointers; assert() and __trap() in kernels.

What it cannot tell
-------------------
- Speed: nothing here says how fast a kernel is on a GPU (memory coalescing, bank conflicts,
  occupancy, divergence cost). Use nvcc's resource report and a real GPU.
- Races between blocks: blocks run one after another, so a block never sees another one half done
  (only the block order is shuffled). Races within a block are found only when the shuffled order
  exposes them, never proven absent.
- Warp-level behaviour: ``__shfl_*_sync``, ``__ballot_sync`` and ``__syncwarp`` are compile errors
  (no lock-step warps here), and code relying on implicit warp synchrony is treated as racy.
- Numerics: ``__expf`` and friends are the exact libm functions, and GCC does not fuse
  multiply-adds as nvcc does, so results differ from a GPU's in the last bits (compare with
  tolerances). Static ``__shared__`` sizes are not checked per kernel against the 48 KiB limit.
- Global ``__device__`` variables keep their values across launches and are not bounds-checked.
- An out-of-range *constant* index into a static ``__shared__`` array (``tile[70]`` in a
  ``float tile[64]``) is undefined behaviour that GCC may fold away before the bounds check sees
  it; indices computed at run time (``tile[threadIdx.x + 6]``) are always checked.
- A ``__shared__`` *scalar* declared inside a template function is not refilled with NaN between
  blocks (GCC ignores the linker-section attribute there; arrays do not depend on it).
  Out-of-bounds accesses are checked on arrays only; pointers the kernel computes into its own
  stack or globals are not.

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

__all__ = ["EmuModule", "EmuFunction", "EmulatorError", "CompilerNotFoundError", "LaunchError",
           "KernelNotFoundError"]
