"""The kernel backend's shared machinery: compile, cache, launch and allocate, for every op.

``KernelBackend("cuda")`` compiles a ``.cu`` file once with CuPy (``cupy.RawModule``, i.e. NVRTC)
and launches on the GPU with CuPy arrays; ``KernelBackend("emu")`` compiles the very same text with
minunet's CUDA emulator (``minunet.emulator.EmuModule``) and launches on NumPy arrays. Both module
types are called the same way, ``fn(grid, block, args, shared_mem=0)``, so each op's launcher
(the ``kernels_*`` functions in ``minunet/ops/<op>.py``, bound here as methods such as
``conv3x3_forward``) is written once for both devices.

What this file does, and no op repeats:
- compiles each ``kernels/<file>.cu`` once per device, and again when the file changes on disk;
- launches, naming the kernel and its file when a launch fails, and refuses a grid whose flat
  thread index would overflow the kernels' 32-bit ``int``;
- converts arguments (C-contiguous float32 arrays of this device) and allocates outputs; on
  ``emu`` a fresh output is filled with NaN (0xFF bytes for integer outputs), so a kernel that
  forgets to write part of its output fails its test instead of passing on leftover memory;
- the weight and bias gradients of the convolutions (their kernels, serial or tree, and the
  split tree reductions' partial sums, added by ``kernels/reduce.cu``), and means.

Two choices of kernel, each made per launch from the shapes unless a version is forced:

- The 3x3 convolution's forward and input gradient (kernels/conv3x3.cu): v1 ``"naive"`` (one
  thread per output), v2 ``"tiled"`` (shared-memory tiles, 16 outputs per thread), v3 ``"igemm"``
  (implicit GEMM, register-blocked: 32 outputs per thread, float4 weights, double-buffered
  tiles, a tile shape per layer and a channel split for the deep layers), v4 ``"wmma"`` (the
  same GEMM on TF32 tensor cores), or ``"auto"`` (the default; ops/conv3x3.py,
  ``conv3x3_version``): on ``cuda`` wmma under precision "tf32" (layers with >= 8 source
  channels, on sm_80+), else igemm - chosen from their design, NOT yet measured on a GPU; on
  ``emu`` the emulator's own choice for its speed: wmma under "tf32", else tiled when the plane
  fills one 16 x 32 tile and naive below. Choose with ``KernelBackend(device, conv3x3="igemm")``, the
  environment variable ``MINUNET_CONV3X3`` (read when the backend is created), or later with
  ``get_backend(device).conv3x3_version = "naive"``.
- The reductions of weight and bias gradients: ``"tree"`` (a block of threads per output group,
  adding the threads' partial sums with a shared-memory tree), ``"serial"`` (one thread per
  output, a loop over its terms), or ``"auto"`` (the default): serial when there are at least as
  many outputs as terms per output and the loops are short or the threads many (the deep, small
  layers: 147,456 weights, 16 pixels; see ``serial_reduction``), tree otherwise. ``KernelBackend(device, reduction="tree")``, ``MINUNET_REDUCTION``, or
  ``get_backend(device).reduction = "tree"``.

One choice of arithmetic, like PyTorch's ``allow_tf32``: ``precision`` is ``"fp32"`` (the default:
strict float32 arithmetic everywhere) or ``"tf32"`` (the convolution GEMMs may run on tensor cores,
which round their inputs to TF32: 10 mantissa bits, errors of ~1e-3 relative; sums stay float32).
``KernelBackend(device, precision="tf32")``, ``MINUNET_PRECISION``, ``minunet.set_precision("tf32")``
(every kernel backend, now and later) or ``get_backend(device).precision = "tf32"``; the command
lines take ``--precision``. Kernels without a TF32 version ignore it.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .sources import cu_defines, kernels_dir

# Options for NVRTC on the GPU. tests/test_nvrtc.py compiles every file with exactly these (plus
# an architecture), so what passes there is what CuPy compiles.
CUDA_OPTIONS = ("-std=c++17",)
CONV3X3_VERSIONS = ("auto", "naive", "tiled", "igemm", "wmma")   # v1..v4, see the module docstring
REDUCTIONS = ("auto", "tree", "serial")
PRECISIONS = ("fp32", "tf32")
# Block size of the one-thread-per-element kernels. Those kernels work with any block size (they
# index with blockDim), so this is the launcher's choice: 8 warps, a common default.
THREADS = 256
INT_MAX = 2**31 - 1             # the kernels index with 32-bit int
MAX_GRID_YZ = 65535             # CUDA's limit on gridDim.y and gridDim.z
REDUCE_THREADS = cu_defines("reduce")["REDUCE_THREADS"]   # the block of reduce.cu's sum_scaled
TARGET_BLOCKS = 2048            # split long reductions until a GPU has about this many blocks
SERIAL_SHORT_LOOP = 64          # "auto" reductions: a serial thread per output when its loop is this short,
SERIAL_MIN_THREADS = 4096       # ... or when there are this many outputs (16 blocks of 256 threads)

# set_precision's choice for every kernel backend (None: each reads MINUNET_PRECISION, else "fp32")
_PRECISION_DEFAULT: str | None = None
# every KernelBackend created, so set_precision reaches the ones that exist already
_BACKENDS: list["KernelBackend"] = []

# (device, path, emulator mode) -> (mtime_ns, size, compiled module), shared by all backend instances
_MODULES: dict[tuple, tuple[int, int, object]] = {}


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
                 precision: str | None = None):
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
        _BACKENDS.append(self)
        # A weight-gradient block reduces at least this many pixels before the reduction is split
        # over more blocks (blockIdx.y slices). Tests lower it to exercise the split on small images.
        self.min_pixels_per_slice = 4096

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
        """"auto", "tree" or "serial": how weight and bias gradients are summed (module docstring)."""
        return self._reduction

    @reduction.setter
    def reduction(self, version: str) -> None:
        self._reduction = _choice(version, None, REDUCTIONS, "reduction")

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

    def __repr__(self) -> str:
        return (f"KernelBackend({self.device!r}, conv3x3={self.conv3x3_version!r}, "
                f"reduction={self.reduction!r}, precision={self.precision!r})")

    # ---- compiling and launching ------------------------------------------------------------
    def module(self, file: str):
        """``kernels/<file>.cu`` compiled for this device; compiled again if the file changed, and
        on emu once per emulator mode (``minunet.emulator.set_emu_mode``: "checked" or "fast")."""
        path = kernels_dir() / f"{file}.cu"
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise KernelError(f"no kernel file {path}") from None
        mode = None
        if self.device == "emu":
            from ..emulator import emu_mode

            mode = emu_mode()
        key = (self.device, str(path), mode)
        cached = _MODULES.get(key)
        if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            return cached[2]
        source = path.read_text()
        try:
            if self.device == "cuda":
                import cupy

                module = cupy.RawModule(code=source, options=CUDA_OPTIONS)
            else:
                from ..emulator import EmuModule

                module = EmuModule(source, name=str(path))
        except Exception as exc:
            raise KernelError(f"compiling kernels/{file}.cu for device {self.device!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        _MODULES[key] = (stat.st_mtime_ns, stat.st_size, module)
        return module

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
            function = self.module(file).get_function(kernel)  # CuPy compiles here, lazily
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
                    channels: int, arrays, ints):
        """The weight and bias gradients of a convolution, ``(gw, gb)``: for each weight of
        ``shape`` and for each of the ``channels`` output channels, a sum over ``pixels`` terms.
        The weight-gradient kernels compute the bias gradient too (the sum of the same gy values:
        one pass over gy, one launch).

        Serial (see ``serial_reduction``): ``<kernel>_serial`` (arguments: arrays, gw, gb, ints),
        one thread per weight and per bias. Tree: ``kernel`` (arguments: arrays, gw, gb, ints,
        pixels_per_slice), with the pixels split into slices when there are too few blocks to fill
        a GPU; each slice writes its own partial results and reduce.cu's sum_partials adds them in
        a fixed order, so the result is deterministic (no atomics)."""
        xp = self.xp
        if pixels == 0:
            return xp.zeros(shape, dtype=xp.float32), xp.zeros(channels, dtype=xp.float32)
        size = int(np.prod(shape))
        if self.serial_reduction(size, pixels):
            gw, gb = self.empty(shape), self.empty((channels,))
            self.launch_elementwise(file, f"{kernel}_serial", size + channels, (*arrays, gw, gb, *int32s(*ints)))
            return gw, gb
        slices = max(1, min(ceil_div(TARGET_BLOCKS, blocks), ceil_div(pixels, self.min_pixels_per_slice)))
        per_slice = ceil_div(pixels, slices)
        slices = ceil_div(pixels, per_slice)
        if slices == 1:
            gw, gb = self.empty(shape), self.empty((channels,))
        else:
            gw, gb = self.empty((slices, size)), self.empty((slices, channels))
        self.launch(file, kernel, (blocks, slices), (threads,), (*arrays, gw, gb, *int32s(*ints), np.int32(per_slice)))
        if slices == 1:
            return gw, gb
        return self._sum_slices(gw, shape), self._sum_slices(gb, (channels,))

    def _sum_slices(self, partial, shape):
        """sum over the first axis of ``partial`` (slices, M), in slice order (reduce.cu's sum_partials)."""
        slices, size = partial.shape
        total = self.empty(shape)
        self.launch("reduce", "sum_partials", (ceil_div(size, THREADS),), (THREADS,),
                    (partial, total, np.int32(slices), np.int32(size)))
        return total
