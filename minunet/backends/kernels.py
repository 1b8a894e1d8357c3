"""The kernel backend's shared machinery: compile, cache, launch and allocate, for every op.

``KernelBackend("cuda")`` compiles a ``.cu`` file once with CuPy (``cupy.RawModule``, i.e. NVRTC)
and launches on the GPU with CuPy arrays; ``KernelBackend("emu")`` compiles the very same text with
minunet's CUDA emulator (``minunet.emulator.EmuModule``) and launches on NumPy arrays. Both module
types are called the same way, ``fn(grid, block, args, shared_mem=0)``, so each op's launcher
(the ``kernels_*`` functions in ``minunet/ops/<op>.py``, bound here as methods such as
``conv3x3_forward``) is written once for both devices.

What this file does, and no op repeats:
- compiles each ``kernels/<file>.cu`` once per device, and again after ``reload()`` when the file
  changed on disk (no file-system call per launch);
- launches, naming the kernel and its file when a launch fails, and refuses a grid whose flat
  thread index would overflow the kernels' 32-bit ``int``;
- converts arguments (C-contiguous float32 arrays of this device) and allocates outputs; on
  ``emu`` a fresh output is filled with NaN (0xFF bytes for integer outputs), so a kernel that
  forgets to write part of its output fails its test instead of passing on leftover memory;
- the weight and bias gradients of the convolutions (their kernels, serial or tree, and the
  split tree reductions' partial sums, added by ``kernels/reduce.cu``), and means.

Choices of kernel, each made per launch from the shapes unless a version is forced:

- The 3x3 convolution's forward and input gradient (kernels/conv3x3.cu): v1 ``"naive"`` (one
  thread per output), v2 ``"tiled"`` (shared-memory tiles, 16 outputs per thread), v3 ``"igemm"``
  (implicit GEMM, register-blocked: 32 outputs per thread, float4 weights, double-buffered
  tiles, a tile shape per layer and a channel split for the deep layers), v4 ``"wmma"`` (the
  same GEMM on TF32 tensor cores), or ``"auto"`` (the default; ops/conv3x3.py,
  ``conv3x3_version``): on ``cuda`` wmma under precision "tf32" (layers with >= 8 source
  channels, on sm_80+), else igemm - chosen from their design, NOT yet measured on a GPU; on
  ``emu`` the emulator's own choice for its speed: wmma under "tf32", else tiled when the plane
  fills one 16 x 32 tile and naive below. Choose with ``KernelBackend(device, conv3x3=...)``, the
  environment variable ``MINUNET_CONV3X3`` (read when the backend is created), or later with
  ``get_backend(device).conv3x3_version = "naive"``.
- The reductions of weight and bias gradients (``weight_gradient_version``): ``"tree"`` (a block
  of threads per output group, adding the threads' partial sums with a shared-memory tree),
  ``"serial"`` (one thread per output, a loop over its terms), ``"gemm"`` (the weight gradient
  as a matrix product over pixels: shared-memory tiles, a register tile per thread, and with
  ``precision="tf32"`` the tensor cores: 64 x 64 tiles of gw), ``"gemm_large"`` (the same product
  in larger tiles, ``gemm_tile``: FP32 128 x 128, 8 x 8 a thread, float4 shared-memory reads;
  TF32 64 x 128, 2 x 4 fragments a warp, rounded to TF32 once when staged; gw narrower than 128
  columns, such as the classifier's 2 x 64 or the first layer's 64 x 9, runs "gemm"; not measured
  on a GPU yet, so "auto" runs it only where a GPU-measured table names it), or ``"auto"`` (the
  default). ``"auto"`` on ``cuda`` is
  always gemm: on an H200 (bench/results/h200-2026-12-04) the serial kernel was the slowest of
  the paper's training step (56% of its kernel time) and the tree one next; the gemm kernels
  themselves are not measured on a GPU yet. ``"auto"`` on ``emu`` chooses for the emulator's
  speed, not a GPU's: serial when there are at least as many outputs as terms per output and
  the loops are short or the threads many (the deep, small layers: 147,456 weights, 16 pixels;
  see ``serial_reduction``), tree otherwise, and gemm when the precision is tf32 (only gemm has
  a TF32 version). ``KernelBackend(device, reduction="tree")``, ``MINUNET_REDUCTION``, or
  ``get_backend(device).reduction = "tree"``. Split sums (pixel slices) are added by reduce.cu's
  sum_partials in a fixed order, in two passes of ~sqrt(S) terms when there are more than
  SLICE_SUM_LOOP slices.
- The up-convolution's forward and input gradient: ``"naive"``, ``"gemm"`` (tiles of the
  per-pixel channel product; tensor cores in tf32) or ``"auto"``: gemm on ``cuda`` (the H200
  measured the naive kernels at 3x and 9.5x PyTorch's time; gemm not measured yet) and in tf32,
  naive on ``emu`` in fp32. ``KernelBackend(device, conv_transpose2x2="gemm")``,
  ``MINUNET_CONV_TRANSPOSE2X2``, or ``get_backend(device).conv_transpose2x2_version``.

One choice of arithmetic, like PyTorch's ``allow_tf32``: ``precision`` is ``"fp32"`` (the default:
strict float32 arithmetic everywhere) or ``"tf32"`` (the convolution GEMMs may run on tensor cores,
which round their inputs to TF32: 10 mantissa bits, errors of ~1e-3 relative; sums stay float32).
``KernelBackend(device, precision="tf32")``, ``MINUNET_PRECISION``, ``minunet.set_precision("tf32")``
(every kernel backend, now and later) or ``get_backend(device).precision = "tf32"``; the command
lines take ``--precision``. Kernels without a TF32 version ignore it. A GPU older than sm_80 (or
an NVRTC that cannot find ``<mma.h>``) has no TF32 weight-gradient kernel: the launcher then
computes in fp32 and warns once (``KernelBackend.has_tf32``).
"""
from __future__ import annotations

import functools
import math
import os
import threading
import warnings
import weakref

import numpy as np

from . import choices
from .sources import cu_defines, cuda_include_dir, kernels_dir, read_kernel

# Options for NVRTC on the GPU. tests/test_nvrtc.py compiles every file with exactly these (plus
# an architecture), so what passes there is what CuPy compiles.
CUDA_OPTIONS = ("-std=c++17",)


def cuda_options() -> tuple[str, ...]:
    """What CuPy's NVRTC compiles with on a GPU: CUDA_OPTIONS, plus the CUDA toolkit's include
    folder when one is installed (``<mma.h>`` for the TF32 tensor-core kernels; without it they
    compile to their FP32 fallbacks, and ``has_tf32`` warns)."""
    include = cuda_include_dir()
    return CUDA_OPTIONS + ((f"-I{include}",) if include is not None else ())
CONV3X3_VERSIONS = ("auto", "naive", "tiled", "igemm", "wmma", "wmma_big")   # v1..v5, see ops/conv3x3.py
REDUCTIONS = ("auto", "tree", "serial", "gemm", "gemm_large")
CONV_TRANSPOSE2X2_VERSIONS = ("auto", "naive", "gemm")
PRECISIONS = ("fp32", "tf32")
# Block size of the one-thread-per-element kernels. Those kernels work with any block size (they
# index with blockDim), so this is the launcher's choice: 8 warps, a common default.
THREADS = 256
INT_MAX = 2**31 - 1             # the kernels index with 32-bit int
MAX_GRID_YZ = 65535             # CUDA's limit on gridDim.y and gridDim.z
# A file's #defines, read once per process as the ops read theirs (parsing costs ~1 ms: not per launch)
_file_defines = functools.lru_cache(maxsize=None)(cu_defines)
REDUCE_THREADS = cu_defines("reduce")["REDUCE_THREADS"]   # the block of reduce.cu's sum_scaled
TARGET_BLOCKS = 2048            # split long reductions until a GPU has about this many blocks
SERIAL_SHORT_LOOP = 64          # "auto" reductions: a serial thread per output when its loop is this short,
SERIAL_MIN_THREADS = 4096       # ... or when there are this many outputs (16 blocks of 256 threads)
SLICE_SUM_LOOP = 32             # more slices than this are added in two passes (sqrt(S) terms a thread each)

# set_precision's choice for every kernel backend (None: each reads MINUNET_PRECISION, else "fp32")
_PRECISION_DEFAULT: str | None = None
# every KernelBackend created, so set_precision reaches the ones that exist already
_BACKENDS: "weakref.WeakSet[KernelBackend]" = weakref.WeakSet()   # (tests make many; none is kept alive)

# (device, path, emulator mode) -> (mtime_ns, size, compiled module), shared by all backend instances
_MODULES: dict[tuple, tuple[int, int, object]] = {}
# the same keys -> ((header path, mtime_ns, size), ...): the local headers the .cu file includes
_HEADERS: dict[tuple, tuple[tuple[str, int, int], ...]] = {}
RELOADS = 0     # calls of KernelBackend.reload so far (a captured step is stale after one)


GEMM_VERSIONS = ("gemm", "gemm_large")   # the reductions that are a tiled matrix product (gemm_tiles.cuh)


def gemm_tile(defines: dict, version: str, rows: int, tf32: bool) -> tuple[int, int, int, str]:
    """The weight-gradient GEMM kernel of ``version`` for a gw of ``rows`` rows: ``(rows per
    block, columns per block, threads, kernel suffix)`` from gemm_tiles.cuh's defines. "gemm":
    v3's 64 x 64 FP32 tiles (``_gemm``), or v4's TF32 ones (``_gemm_tf32``). "gemm_large": FP32
    128 x 128 tiles (``_gemm_128x128``), 64 x 128 where gw has at most 64 rows (a 128-row tile
    would be half padding); TF32 64 x 128 tiles (``_gemm_64x128_tf32``)."""
    if version == "gemm":
        prefix = "WT" if tf32 else "WG"
        return defines[f"{prefix}_BM"], defines[f"{prefix}_BN"], defines[f"{prefix}_THREADS"], \
            "gemm_tf32" if tf32 else "gemm"
    bn = defines["WL_BN"]
    if tf32:
        bm, threads = defines["WLT_BM"], defines["WLT_THREADS"]
    elif rows > defines["WL_BM_SHORT"]:
        bm, threads = defines["WL_BM"], defines["WL_THREADS"]
    else:
        bm, threads = defines["WL_BM_SHORT"], defines["WL_THREADS_SHORT"]
    return bm, bn, threads, f"gemm_{bm}x{bn}" + ("_tf32" if tf32 else "")


def slice_group(slices: int) -> int:
    """The group of the two-pass slice sum (``KernelBackend._sum_slices``): about sqrt(slices),
    so that both passes add about as many terms."""
    return math.isqrt(slices - 1) + 1


class KernelError(RuntimeError):
    """A kernel failed to compile or to launch; the message names the kernel and its file."""


def ceil_div(n: int, per_block: int) -> int:
    return (n + per_block - 1) // per_block


def require(condition: bool, message: str) -> None:
    """A wrong shape reaching a kernel reads out of bounds silently on a GPU: refuse it here."""
    if not condition:
        raise ValueError(message)


def int32s(*values) -> tuple:
    """Kernel scalar arguments: NumPy int32, the exact type of the kernels' `int` parameters."""
    return tuple(np.int32(v) for v in values)


def check_size(shape, what: str) -> None:
    size = math.prod(int(s) for s in shape)
    if size > INT_MAX:
        raise ValueError(f"{what} would have {size} elements; the kernels use 32-bit indices "
                         f"(at most {INT_MAX}): use a smaller batch or tile")


def _choice(value: str | None, variable: str | None, allowed: tuple[str, ...], what: str) -> str:
    """``value``, else the environment variable, else "auto"; refused unless one of ``allowed``."""
    source = "the argument"
    if value is None and variable:
        value, source = os.environ.get(variable, "").strip().lower() or None, variable
    value = value or "auto"
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (from {source}); use one of: {', '.join(allowed)}")
    return value


def _precision_choice(value: str | None, variable: str | None) -> str:
    """``value``, else the environment variable, else "fp32"; refused unless fp32 or tf32."""
    source = "the argument"
    if value is None and variable:
        value, source = os.environ.get(variable, "").strip().lower() or None, variable
    value = value or "fp32"
    if value not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r} (from {source}); use one of: {', '.join(PRECISIONS)}")
    return value


def set_precision(precision: str) -> None:
    """Every kernel backend (``cuda`` and ``emu``, those that exist and those created later)
    computes its convolution GEMMs in ``precision``: "fp32" or "tf32" (module docstring). The
    ``cpu`` device always computes in float32 (or the tensor's own float64)."""
    global _PRECISION_DEFAULT
    _PRECISION_DEFAULT = _precision_choice(precision, None)
    for backend in _BACKENDS:
        backend.precision = _PRECISION_DEFAULT


class KernelBackend:
    """The backend of ``device`` ``"cuda"`` or ``"emu"``: attributes ``xp`` (cupy or numpy) and
    ``device``, the launch machinery below, and one method per backend function of
    docs/backends.md (attached by ``minunet.ops`` from each op's ``kernels_*`` functions)."""

    def __init__(self, device: str, conv3x3: str | None = None, reduction: str | None = None,
                 precision: str | None = None, conv_transpose2x2: str | None = None):
        if device not in ("cuda", "emu"):
            raise ValueError(f"KernelBackend runs on 'cuda' or 'emu', not {device!r}; "
                             "the 'cpu' backend is minunet.backends.get_backend('cpu')")
        self.device = device
        if device == "cuda":
            import cupy

            self.xp = cupy
        else:
            self.xp = np
        self._conv3x3_version = _choice(conv3x3, "MINUNET_CONV3X3", CONV3X3_VERSIONS, "conv3x3 kernel version")
        self._reduction = _choice(reduction, "MINUNET_REDUCTION", REDUCTIONS, "reduction")
        self._precision = _precision_choice(precision or _PRECISION_DEFAULT, "MINUNET_PRECISION")
        self._conv_transpose2x2_version = _choice(conv_transpose2x2, "MINUNET_CONV_TRANSPOSE2X2",
                                                  CONV_TRANSPOSE2X2_VERSIONS, "conv_transpose2x2 kernel version")
        _BACKENDS.add(self)
        # A weight-gradient block reduces at least this many pixels before the reduction is split
        # over more blocks (blockIdx.y slices). Tests lower it to exercise the split on small images.
        self.min_pixels_per_slice = 4096
        self._functions: dict[tuple, object] = {}   # (file, kernel, emu mode) -> kernel function
        self._tf32_files: dict[str, bool] = {}   # kernel file -> whether it was compiled with TF32 wmma
        # (thread id, list) while minunet.step_graph captures a training step: every launch of that
        # thread is also appended to the list as (function, grid, block, args, file, kernel)
        self.recorder: tuple[int, list] | None = None

    @property
    def conv3x3_version(self) -> str:
        """"auto", "naive", "tiled", "igemm" or "wmma". Tensors use the backend that ``get_backend(device)`` created
        once (reading MINUNET_CONV3X3 then), so to switch later set this attribute on it:
        ``minunet.backends.get_backend("emu").conv3x3_version = "naive"``."""
        return self._conv3x3_version

    @conv3x3_version.setter
    def conv3x3_version(self, version: str) -> None:
        self._conv3x3_version = _choice(version, None, CONV3X3_VERSIONS, "conv3x3 kernel version")

    @property
    def reduction(self) -> str:
        """"auto", "tree", "serial", "gemm" or "gemm_large": how weight and bias gradients are
        summed (module docstring)."""
        return self._reduction

    @reduction.setter
    def reduction(self, version: str) -> None:
        self._reduction = _choice(version, None, REDUCTIONS, "reduction")

    @property
    def conv_transpose2x2_version(self) -> str:
        """"auto", "naive" or "gemm": the up-convolution's forward and input-gradient kernels
        (ops/conv_transpose2x2.py, ``gemm_version``). Also ``MINUNET_CONV_TRANSPOSE2X2``."""
        return self._conv_transpose2x2_version

    @conv_transpose2x2_version.setter
    def conv_transpose2x2_version(self, version: str) -> None:
        self._conv_transpose2x2_version = _choice(version, None, CONV_TRANSPOSE2X2_VERSIONS,
                                                  "conv_transpose2x2 kernel version")

    @property
    def precision(self) -> str:
        """"fp32" (strict float32) or "tf32" (tensor-core GEMMs where a kernel has them)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = _precision_choice(value, None)

    def serial_reduction(self, outputs: int, terms: int) -> bool:
        """Whether a sum of ``terms`` values for each of ``outputs`` outputs runs one thread per
        output (serial) rather than one block per output group (tree): forced by ``reduction``,
        else ("auto") serial when there are at least as many outputs as terms (threads go to the
        larger axis) and either each thread's loop is short (at most SERIAL_SHORT_LOOP terms) or
        there are enough outputs to keep a GPU busy while each thread runs its whole loop (at
        least SERIAL_MIN_THREADS). 576 weights of 512 pixels each stay with the tree: 576
        threads with 512-step loops would leave a GPU nearly idle."""
        if self._reduction != "auto":
            return self._reduction == "serial"
        return outputs >= terms and (terms <= SERIAL_SHORT_LOOP or outputs >= SERIAL_MIN_THREADS)

    def weight_gradient_version(self, outputs: int, terms: int) -> str:
        """The weight-gradient kernel for ``outputs`` weights of ``terms`` pixels each: "gemm",
        "tree" or "serial". Forced by ``reduction``; else ("auto") gemm on ``cuda`` (the H200
        measured the serial one-thread-per-weight loop as the slowest kernel of the training step;
        the gemm kernels are not measured on a GPU yet) and with precision tf32 (only gemm has a
        TF32 version); on ``emu`` in fp32, the emulator's fastest: ``serial_reduction``'s choice."""
        if self._reduction != "auto":
            return self._reduction
        if self.device == "cuda" or self._precision == "tf32":
            return "gemm"
        return "serial" if self.serial_reduction(outputs, terms) else "tree"

    def has_tf32(self, file: str) -> bool:
        """Whether ``kernels/<file>.cu`` was compiled with its TF32 tensor-core kernels: on ``emu``
        always; on ``cuda`` when the GPU is sm_80 or later and NVRTC found ``<mma.h>`` (the file's
        ``<file>_grad_weight_has_tf32`` kernel says, asked once per file)."""
        if file not in self._tf32_files:
            flag = self.xp.zeros(1, dtype=self.xp.int32)
            self.launch(file, f"{file}_grad_weight_has_tf32", (1,), (1,), (flag,))
            self._tf32_files[file] = bool(int(flag[0]))
            if not self._tf32_files[file]:
                warnings.warn(f"precision 'tf32': kernels/{file}.cu has no TF32 tensor-core kernel on this "
                              "device (a GPU before sm_80, or NVRTC without <mma.h>); its weight gradient "
                              "is computed in fp32", RuntimeWarning, stacklevel=3)
        return self._tf32_files[file]

    def __repr__(self) -> str:
        return (f"KernelBackend({self.device!r}, conv3x3={self.conv3x3_version!r}, "
                f"reduction={self.reduction!r}, precision={self.precision!r})")

    # ---- compiling and launching ------------------------------------------------------------
    def module(self, file: str):
        """``kernels/<file>.cu`` compiled for this device, once per device (and on emu once per
        emulator mode, ``minunet.emulator.set_emu_mode``). The file is read and its modification
        time noted when the module is built; later calls do not touch the file system (the H200
        profile of 2026-12-04 found a ``stat`` per launch costing 1.2 s in 44,379 launches):
        after editing a ``.cu`` file or a header it includes, call :meth:`reload`. The text
        compiled is the file with its local headers inlined (``sources.read_kernel``), on cuda
        and on emu alike."""
        mode = None
        if self.device == "emu":
            from ..emulator import emu_mode

            mode = emu_mode()
        path = kernels_dir() / f"{file}.cu"
        key = (self.device, str(path), mode)
        cached = _MODULES.get(key)
        if cached is not None:
            return cached[2]
        try:
            stat = path.stat()
            source, files = read_kernel(file)
            headers = tuple((str(h), h.stat().st_mtime_ns, h.stat().st_size) for h in files[1:])
        except FileNotFoundError:
            raise KernelError(f"no kernel file {path}") from None
        try:
            if self.device == "cuda":
                import cupy

                module = cupy.RawModule(code=source, options=cuda_options())
            else:
                from ..emulator import EmuModule

                module = EmuModule(source, name=str(path))
        except Exception as exc:
            raise KernelError(f"compiling kernels/{file}.cu for device {self.device!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        _MODULES[key] = (stat.st_mtime_ns, stat.st_size, module)
        _HEADERS[key] = headers
        return module

    def reload(self) -> list[str]:
        """Forget the compiled modules of this device whose ``.cu`` file or one of its local
        headers changed (modification time or size) or vanished since it was compiled, so the
        next launch compiles the file again. Returns the paths (of the ``.cu`` files) dropped.
        The only file-system calls of the launch path are here and in the first :meth:`module`
        call of a file."""
        dropped = []
        _file_defines.cache_clear()
        choices._CACHE.clear()   # the measured choice table is read again too
        for key, (mtime_ns, size, _) in list(_MODULES.items()):
            if key[0] != self.device:
                continue
            stamps = [(key[1], mtime_ns, size), *_HEADERS.get(key, ())]
            try:
                changed = any((os.stat(p).st_mtime_ns, os.stat(p).st_size) != (m, n) for p, m, n in stamps)
            except FileNotFoundError:
                changed = True
            if changed:
                del _MODULES[key]
                _HEADERS.pop(key, None)
                dropped.append(key[1])
        global RELOADS
        RELOADS += 1     # a captured training step (minunet.step_graph) holds the old functions
        for backend in _BACKENDS:     # the modules are shared, so are their functions' staleness
            backend._functions.clear()
        return dropped

    def function(self, file: str, kernel: str):
        """The callable kernel ``kernel`` of ``kernels/<file>.cu``, looked up once per backend
        (and emulator mode) and kept: a launch is then a dict lookup and the call."""
        mode = None
        if self.device == "emu":
            from ..emulator import emu_mode

            mode = emu_mode()
        key = (file, kernel, mode)
        function = self._functions.get(key)
        if function is None:
            function = self.module(file).get_function(kernel)  # CuPy compiles here, lazily
            self._functions[key] = function
        return function

    def launch(self, file: str, kernel: str, grid, block, args) -> None:
        """Launch ``kernel`` of ``kernels/<file>.cu``; an empty grid (no work) launches nothing."""
        grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
        block = tuple(int(b) for b in (block if isinstance(block, tuple) else (block,)))
        if min(grid) == 0:
            return
        # `blockIdx.x * blockDim.x + threadIdx.x` is computed in 32-bit int by the kernels
        require(grid[0] * block[0] <= INT_MAX,
                f"kernel {kernel}: {grid[0]} blocks of {block[0]} threads overflow the kernels' "
                f"32-bit thread index (at most {INT_MAX}); use a smaller batch or tile")
        try:
            function = self.function(file, kernel)
            recorder = self.recorder
            if recorder is not None and recorder[0] == threading.get_ident():
                recorder[1].append((function, grid, block, tuple(args), file, kernel))
            function(grid, block, args)
        except KernelError:
            raise
        except Exception as exc:
            raise KernelError(f"kernel {kernel} (kernels/{file}.cu) failed on device {self.device!r} "
                              f"with grid={grid}, block={block}: {type(exc).__name__}: {exc}") from exc

    def launch_elementwise(self, file: str, kernel: str, n: int, args) -> None:
        """One thread per element: ceil(n / THREADS) blocks of THREADS threads."""
        self.launch(file, kernel, (ceil_div(n, THREADS),), (THREADS,), args)

    # ---- arguments and outputs --------------------------------------------------------------
    def floats(self, a, what: str, ndim: int | None = None):
        """``a`` as a C-contiguous float32 array of this device (the kernels compute in float32)."""
        xp = self.xp
        if self.device == "emu" and not isinstance(a, np.ndarray) and hasattr(a, "get"):
            raise TypeError(f"{what} is a GPU array but this backend is 'emu'; move it to the host first")
        a = xp.ascontiguousarray(xp.asarray(a, dtype=xp.float32))
        if ndim is not None and a.ndim != ndim:
            raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(a.shape)}")
        check_size(a.shape, what)
        return a

    def bias(self, b, channels: int):
        """The bias argument of a conv kernel: zeros when the layer has none."""
        if b is None:
            return self.xp.zeros(channels, dtype=self.xp.float32)
        b = self.floats(b, "bias", 1)
        require(b.shape == (channels,), f"bias has shape {tuple(b.shape)}; expected ({channels},), "
                                        "one value per output channel")
        return b

    def empty(self, shape, dtype=np.float32):
        """A fresh output for a kernel to write. On emu it starts as NaN (floats) or 0xFF bytes
        (integers), never as leftover memory that could happen to hold the right answer."""
        check_size(shape, "the output")
        if self.device == "emu":
            out = np.empty(shape, dtype=dtype)
            out.view(np.uint8).fill(0xFF)  # all-ones bytes: NaN for floats, 255 / -1 for integers
            return out
        return self.xp.empty(shape, dtype=dtype)

    # ---- the shared sums (kernels/reduce.cu) ------------------------------------------------
    def mean(self, values, count: int):
        """sum(values) / count as a 0-d device array: one partial sum per block, then one block
        adds the partials (two passes, a fixed order: deterministic)."""
        blocks = min(ceil_div(values.size, REDUCE_THREADS), REDUCE_THREADS)
        partial = values
        if blocks > 1:
            partial = self.empty((blocks,))
            self.launch("reduce", "sum_scaled", (blocks,), (REDUCE_THREADS,),
                        (values, partial, np.int32(values.size), np.float32(1.0)))
        out = self.empty((1,))
        self.launch("reduce", "sum_scaled", (1,), (REDUCE_THREADS,),
                    (partial, out, np.int32(partial.size), np.float32(1.0 / count)))
        return out.reshape(())

    def grad_weight(self, file: str, kernel: str, threads: int, blocks: int, pixels: int, shape,
                    channels: int, arrays, ints, gemm: tuple[int, int] | None = None, case=None):
        """The weight and bias gradients of a convolution, ``(gw, gb)``: for each weight of
        ``shape`` and for each of the ``channels`` output channels, a sum over ``pixels`` terms.
        The weight-gradient kernels compute the bias gradient too (the sum of the same gy values:
        one pass over gy, one launch). The version is ``weight_gradient_version``'s:

        Serial: ``<kernel>_serial`` (arguments: arrays, gw, gb, ints), one thread per weight and
        per bias. Tree: ``kernel`` (arguments: arrays, gw, gb, ints, pixels_per_slice), ``blocks``
        blocks of ``threads``. Gemm: ``<kernel>_gemm``, or ``<kernel>_gemm_tf32`` with precision
        tf32 (the same arguments), for gw seen as a ``gemm = (rows, cols)`` matrix (gw's shape,
        flattened to 2-D); its tile sizes come from the file's WG_* / WT_* defines. Gemm_large:
        ``<kernel>_gemm_128x128``, ``_gemm_64x128`` or ``_gemm_64x128_tf32`` (``gemm_tile``; the
        WL_* / WLT_* defines), or gemm's kernels for a gw of fewer than WL_BN = 128 columns. Tree and gemm
        split the pixels into slices when there are too few blocks to fill a GPU (down to
        ``min_pixels_per_slice`` pixels a block, gemm to the file's WG_MIN_SLICE if that is fewer;
        and gemm when a block would sum more than WG_MAX_SLICE pixels); each slice writes its own partial results
        and reduce.cu's sum_partials adds them in a fixed order, so the result is deterministic
        (no atomics). ``case`` names the layer for the table of versions measured on a GPU."""
        xp = self.xp
        if pixels == 0:
            return xp.zeros(shape, dtype=xp.float32), xp.zeros(channels, dtype=xp.float32)
        size = int(np.prod(shape))
        # a version measured fastest for this layer on this GPU (backends/choices.py; ``case`` is
        # the layer's (N, Ci, H, W, Co)), else weight_gradient_version's rule
        version = choices.choose(self, "reduction", file, case) or self.weight_gradient_version(size, pixels)
        if version in GEMM_VERSIONS and gemm is None:
            version = "tree"   # an op without a gemm kernel
        if version == "gemm_large" and gemm[1] < _file_defines(file)["WL_BN"]:
            version = "gemm"   # gw narrower than a 128-column tile: that tile would be at least half padding
        if version == "serial":
            gw, gb = self.empty(shape), self.empty((channels,))
            self.launch_elementwise(file, f"{kernel}_serial", size + channels, (*arrays, gw, gb, *int32s(*ints)))
            return gw, gb
        max_slice, min_slice, target = pixels, self.min_pixels_per_slice, TARGET_BLOCKS
        if version in GEMM_VERSIONS:
            rows, cols = gemm
            require(rows * cols == size, f"{kernel}: a gemm of {rows} x {cols} is not the {shape} weights")
            defines = _file_defines(file)
            tf32 = self._precision == "tf32" and self.has_tf32(file)
            bm, bn, threads, suffix = gemm_tile(defines, version, rows, tf32)
            tiles = (ceil_div(cols, bn), ceil_div(rows, bm))
            blocks = tiles[0] * tiles[1]
            max_slice = defines["WG_MAX_SLICE"]
            # a gemm grid has few, fat blocks (one per 64 x 64 tile of gw: a single one for a
            # first layer's 64 x 9 weights), so it is split down to WG_MIN_SLICE pixels a block;
            # a larger tile counts as the 64 x 64 tiles it holds (128 x 128: 4), so gemm_large
            # gets about as many slices as gemm for the same gw (4x fewer, 4x fatter blocks) and
            # no more partial sums for sum_partials to add
            min_slice = min(min_slice, defines["WG_MIN_SLICE"])
            target = ceil_div(TARGET_BLOCKS * defines["WG_BM"] * defines["WG_BN"], bm * bn)
            kernel = f"{kernel}_{suffix}"
        slices = max(ceil_div(pixels, max_slice),
                     min(ceil_div(target, blocks), ceil_div(pixels, min_slice)))
        per_slice = ceil_div(pixels, slices)
        slices = ceil_div(pixels, per_slice)
        group = slice_group(slices) if slices > SLICE_SUM_LOOP else 1
        slices = ceil_div(slices, group) * group   # a multiple of the two-pass sum's group (the last slices empty)
        require(slices <= MAX_GRID_YZ, f"{kernel}: {pixels} pixels need {slices} slices, more than a grid "
                                       f"has ({MAX_GRID_YZ}); use a smaller batch or tile")
        if slices == 1:
            gw, gb = self.empty(shape), self.empty((channels,))
        else:
            gw, gb = self.empty((slices, size)), self.empty((slices, channels))
        grid = (*tiles, slices) if version in GEMM_VERSIONS else (blocks, slices)
        self.launch(file, kernel, grid, (threads,), (*arrays, gw, gb, *int32s(*ints), np.int32(per_slice)))
        if slices == 1:
            return gw, gb
        return self._sum_slices(gw, shape, group), self._sum_slices(gb, (channels,), group)

    def _sum_slices(self, partial, shape, group: int = 1):
        """sum over the first axis of ``partial`` (slices, M), in a fixed order (reduce.cu's
        sum_partials: one thread per output, a loop over the slices). More than SLICE_SUM_LOOP
        slices (the gemm kernels split a first layer's single tile into ~1,000) would make that
        loop a long chain of dependent adds and memory latencies in few threads, so they are
        added in two passes: slice s = a * group + b, first over a for every (b, m) (group * M
        threads), then over b (``grad_weight`` chooses ``group`` and makes S a multiple of it)."""
        slices, size = partial.shape
        if group > 1:
            partial = self._sum_slices_once(partial.reshape(slices // group, group * size), (group, size))
        return self._sum_slices_once(partial, shape)

    def _sum_slices_once(self, partial, shape):
        slices, size = partial.shape
        total = self.empty(shape)
        self.launch("reduce", "sum_partials", (ceil_div(size, THREADS),), (THREADS,),
                    (partial, total, np.int32(slices), np.int32(size)))
        return total
