"""The kernel backend: the functions of docs/backends.md, each one or a few launches of the
hand-written CUDA kernels in ``kernels/*.cu``.

``KernelBackend("cuda")`` compiles each ``.cu`` file once with CuPy (``cupy.RawModule``, i.e.
NVRTC) and launches on the GPU with CuPy arrays; ``KernelBackend("emu")`` compiles the very same
text with minunet's CUDA emulator (``minunet.emulator.EmuModule``) and launches on NumPy arrays.
Both module types are called the same way, ``fn(grid, block, args, shared_mem=0)``, so every
function below is written once for both devices.

What this Python side does, and the kernels do not:
- computes launch configurations (grid and block sizes) from the array shapes;
- allocates the outputs (``xp.empty``/``xp.zeros``: glue, no math);
- checks shapes and sizes, because a kernel given a wrong shape reads out of bounds silently on
  a GPU. Kernels index with 32-bit ``int``: arrays of 2**31 or more elements are refused.

The 3x3 convolution has two versions (see kernels/conv3x3.cu): ``"naive"`` (one thread per
output) and ``"tiled"`` (shared-memory tiles and register blocking, the default). Choose with
``KernelBackend(device, conv3x3="naive")`` or the environment variable ``MINUNET_CONV3X3`` (read
when the backend is created), or later with ``get_backend(device).conv3x3_version = "naive"``.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .sources import kernels_dir, kernel_source

# Options for NVRTC on the GPU. tests/test_nvrtc.py compiles every file with exactly these (plus
# an architecture), so what passes there is what CuPy compiles.
CUDA_OPTIONS = ("-std=c++17",)
CONV3X3_VERSIONS = ("naive", "tiled")
THREADS = 256                   # block size of the one-thread-per-element kernels
MAX_ELEMENTS = 2**31 - 1        # int32 indexing in the kernels
MAX_GRID_YZ = 65535             # CUDA's limit on gridDim.y and gridDim.z

# Tile and block sizes the launch configurations must agree with (the #defines in the .cu files).
CONV3X3_TILE_W, CONV3X3_TILE_H, CONV3X3_BLOCK, CONV3X3_CHANNELS = 32, 16, (32, 8, 1), 8
GRAD_WEIGHT_THREADS = 128       # GW_THREADS, CT_THREADS, C1_THREADS
CONV3X3_GW_CI, CONV_T_GW_CO, CONV1X1_GW_CI = 4, 8, 8
REDUCE_THREADS = 256            # REDUCE_THREADS, SUM_THREADS
TARGET_BLOCKS = 2048            # split long reductions until a GPU has about this many blocks

_MODULES: dict[tuple[str, str], object] = {}  # (device, file) -> compiled module, shared by instances


class KernelError(RuntimeError):
    """A kernel failed to compile or to launch; the message names the kernel and its file."""


def _blocks(n: int, per_block: int) -> int:
    return (n + per_block - 1) // per_block


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class KernelBackend:
    """The backend of ``device`` ``"cuda"`` or ``"emu"``: attribute ``xp`` (cupy or numpy),
    ``device``, and one method per function of docs/backends.md."""

    def __init__(self, device: str, conv3x3: str | None = None):
        if device not in ("cuda", "emu"):
            raise ValueError(f"KernelBackend runs on 'cuda' or 'emu', not {device!r}; "
                             "the 'cpu' backend is minunet.backends.reference")
        self.device = device
        if device == "cuda":
            import cupy

            self.xp = cupy
        else:
            self.xp = np
        version = conv3x3 or os.environ.get("MINUNET_CONV3X3", "").strip().lower() or "tiled"
        if version not in CONV3X3_VERSIONS:
            raise ValueError(f"unknown conv3x3 kernel version {version!r} (from "
                             f"{'the argument' if conv3x3 else 'MINUNET_CONV3X3'}); use 'naive' or 'tiled'")
        self._conv3x3_version = version
        # A weight-gradient block reduces at least this many pixels before the reduction is split
        # over more blocks (blockIdx.y slices). Tests lower it to exercise the split on small images.
        self.min_pixels_per_slice = 4096

    @property
    def conv3x3_version(self) -> str:
        """"naive" or "tiled". Tensors use the backend that ``get_backend(device)`` created once
        (reading MINUNET_CONV3X3 then), so to switch later set this attribute on it:
        ``minunet.backends.get_backend("emu").conv3x3_version = "naive"``."""
        return self._conv3x3_version

    @conv3x3_version.setter
    def conv3x3_version(self, version: str) -> None:
        if version not in CONV3X3_VERSIONS:
            raise ValueError(f"unknown conv3x3 kernel version {version!r}; use 'naive' or 'tiled'")
        self._conv3x3_version = version

    def __repr__(self) -> str:
        return f"KernelBackend({self.device!r}, conv3x3={self.conv3x3_version!r})"

    # ---- compiling and launching ------------------------------------------------------------
    def _module(self, file: str):
        key = (self.device, file)
        if key not in _MODULES:
            source = kernel_source(file)
            try:
                if self.device == "cuda":
                    import cupy

                    module = cupy.RawModule(code=source, options=CUDA_OPTIONS)
                else:
                    from ..emulator import EmuModule

                    module = EmuModule(source, name=str(kernels_dir() / f"{file}.cu"))
            except Exception as exc:
                raise KernelError(f"compiling kernels/{file}.cu for device {self.device!r} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
            _MODULES[key] = module
        return _MODULES[key]

    def _launch(self, file: str, kernel: str, grid, block, args) -> None:
        """Launch ``kernel`` of ``kernels/<file>.cu``; an empty grid (no work) launches nothing."""
        grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
        block = tuple(int(b) for b in (block if isinstance(block, tuple) else (block,)))
        if min(grid) == 0:
            return
        try:
            function = self._module(file).get_function(kernel)  # CuPy compiles here, lazily
            function(grid, block, args)
        except KernelError:
            raise
        except Exception as exc:
            raise KernelError(f"kernel {kernel} (kernels/{file}.cu) failed on device {self.device!r} "
                              f"with grid={grid}, block={block}: {type(exc).__name__}: {exc}") from exc

    def _elementwise(self, file: str, kernel: str, n: int, args) -> None:
        """One thread per element: ceil(n / 256) blocks of 256 threads."""
        self._launch(file, kernel, (_blocks(n, THREADS),), (THREADS,), args)

    # ---- argument glue ----------------------------------------------------------------------
    def _float(self, a, what: str, ndim: int | None = None):
        """``a`` as a C-contiguous float32 array of this device (the kernels compute in float32)."""
        xp = self.xp
        if self.device == "emu" and not isinstance(a, np.ndarray) and hasattr(a, "get"):
            raise TypeError(f"{what} is a GPU array but this backend is 'emu'; move it to the host first")
        a = xp.ascontiguousarray(xp.asarray(a, dtype=xp.float32))
        if ndim is not None and a.ndim != ndim:
            raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(a.shape)}")
        _check_size(a, what)
        return a

    def _bias(self, b, channels: int):
        if b is None:
            return self.xp.zeros(channels, dtype=self.xp.float32)  # "no bias" = a bias of zeros
        b = self._float(b, "bias", 1)
        _require(b.shape == (channels,), f"bias has shape {tuple(b.shape)}; expected ({channels},), "
                                         "one value per output channel")
        return b

    def _empty(self, shape, dtype=np.float32):
        _check_size_of(shape, "the output")
        return self.xp.empty(shape, dtype=dtype)

    def _channel_sum(self, g):
        """gb[c] = sum over n and pixels of g[n, c, ...]: the bias gradient (reduce.cu)."""
        n, c = g.shape[:2]
        pixels = int(np.prod(g.shape[2:]))
        out = self.xp.zeros(c, dtype=self.xp.float32)
        if n * pixels > 0:
            self._launch("reduce", "channel_sum", (c,), (REDUCE_THREADS,),
                         (g, out, np.int32(n), np.int32(c), np.int32(pixels)))
        return out

    def _grad_weight(self, file: str, kernel: str, blocks: int, pixels: int, shape, arrays, ints):
        """Run a grad-weight kernel (arguments: arrays, out, ints, pixels_per_slice) with the
        pixel reduction split into slices when there are too few blocks to fill a GPU; each slice
        writes its own partial result and reduce.cu's sum_partials adds them in a fixed order, so
        the result is deterministic (no atomics)."""
        xp = self.xp
        if pixels == 0:
            return xp.zeros(shape, dtype=xp.float32)
        size = int(np.prod(shape))
        slices = max(1, min(_blocks(TARGET_BLOCKS, blocks), _blocks(pixels, self.min_pixels_per_slice)))
        per_slice = _blocks(pixels, slices)
        slices = _blocks(pixels, per_slice)
        out = self._empty(shape) if slices == 1 else self._empty((slices, size))
        self._launch(file, kernel, (blocks, slices), (GRAD_WEIGHT_THREADS,),
                     (*arrays, out, *(np.int32(v) for v in ints), np.int32(per_slice)))
        if slices == 1:
            return out
        total = self._empty(shape)
        self._launch("reduce", "sum_partials", (_blocks(size, THREADS),), (THREADS,),
                     (out, total, np.int32(slices), np.int32(size)))
        return total

    # ---- 3x3 valid convolution (kernels/conv3x3.cu) ----------------------------------------
    def _conv3x3_args(self, x, w):
        x, w = self._float(x, "x", 4), self._float(w, "conv3x3 weight", 4)
        n, ci, h, wd = x.shape
        co = w.shape[0]
        _require(w.shape == (co, ci, 3, 3), f"conv3x3 weight has shape {tuple(w.shape)}; expected "
                                            f"(Co, {ci}, 3, 3) for an input with {ci} channels")
        _require(h >= 3 and wd >= 3, f"conv3x3 needs an input of at least 3x3 pixels, got {h}x{wd}")
        return x, w, (n, ci, h, wd, co)

    def _tiled_grid(self, n: int, channels: int, h: int, w: int) -> tuple[int, int, int]:
        """conv3x3_*_tiled: (output tiles per image, groups of 8 channels, images)."""
        tiles = _blocks(h, CONV3X3_TILE_H) * _blocks(w, CONV3X3_TILE_W)
        groups = _blocks(channels, CONV3X3_CHANNELS)
        _require(groups <= MAX_GRID_YZ and n <= MAX_GRID_YZ,
                 f"conv3x3: {n} images or {channels} channels exceed the tiled kernel's grid; "
                 "use smaller batches or MINUNET_CONV3X3=naive")
        return tiles, groups, n

    def conv3x3_forward(self, x, w, b=None):
        x, w, (n, ci, h, wd, co) = self._conv3x3_args(x, w)
        b = self._bias(b, co)
        y = self._empty((n, co, h - 2, wd - 2))
        args = (x, w, b, y, *_int32(n, ci, h, wd, co))
        if self.conv3x3_version == "naive":
            self._elementwise("conv3x3", "conv3x3_forward_naive", y.size, args)
        else:
            grid = self._tiled_grid(n, co, h - 2, wd - 2)
            self._launch("conv3x3", "conv3x3_forward_tiled", grid, CONV3X3_BLOCK, args)
        return y

    def conv3x3_backward(self, x, w, gy, with_bias=True):
        x, w, (n, ci, h, wd, co) = self._conv3x3_args(x, w)
        gy = self._float(gy, "gy", 4)
        _require(gy.shape == (n, co, h - 2, wd - 2),
                 f"conv3x3 gy has shape {tuple(gy.shape)}; expected the output's {(n, co, h - 2, wd - 2)}")
        gx = self._empty(x.shape)
        dims = _int32(n, ci, h, wd, co)
        if self.conv3x3_version == "naive":
            self._elementwise("conv3x3", "conv3x3_grad_input_naive", gx.size, (gy, w, gx, *dims))
        else:
            self._launch("conv3x3", "conv3x3_grad_input_tiled", self._tiled_grid(n, ci, h, wd),
                         CONV3X3_BLOCK, (gy, w, gx, *dims))
        gw = self._grad_weight("conv3x3", "conv3x3_grad_weight", co * _blocks(ci, CONV3X3_GW_CI),
                               n * (h - 2) * (wd - 2), w.shape, (x, gy), (n, ci, h, wd, co))
        gb = self._channel_sum(gy) if with_bias else None
        return gx, gw, gb

    # ---- 2x2 max-pooling (kernels/maxpool2x2.cu) ------------------------------------------------
    def max_pool2x2_forward(self, x):
        x = self._float(x, "x", 4)
        n, c, h, wd = x.shape
        y = self._empty((n, c, h // 2, wd // 2))
        argmax = self._empty(y.shape, np.uint8)
        self._elementwise("maxpool2x2", "maxpool2x2_forward", y.size, (x, y, argmax, *_int32(n, c, h, wd)))
        return y, argmax

    def max_pool2x2_backward(self, gy, argmax, x_shape):
        x_shape = tuple(int(s) for s in x_shape)
        _require(len(x_shape) == 4, f"x_shape must be (N, C, H, W), got {x_shape}")
        n, c, h, wd = x_shape
        out_shape = (n, c, h // 2, wd // 2)
        gy = self._float(gy, "gy", 4)
        argmax = self.xp.ascontiguousarray(self.xp.asarray(argmax, dtype=self.xp.uint8))
        _require(gy.shape == out_shape and argmax.shape == out_shape,
                 f"max_pool2x2 gy {tuple(gy.shape)} and argmax {tuple(argmax.shape)} must both have "
                 f"the pooled shape {out_shape} of x_shape {x_shape}")
        gx = self._empty(x_shape)
        self._elementwise("maxpool2x2", "maxpool2x2_backward", gx.size, (gy, argmax, gx, *_int32(n, c, h, wd)))
        return gx

    # ---- 2x2 stride-2 transposed convolution (kernels/conv_transpose2x2.cu) ------------------
    def _conv_t_args(self, x, w):
        x, w = self._float(x, "x", 4), self._float(w, "conv_transpose2x2 weight", 4)
        n, ci, h, wd = x.shape
        co = w.shape[1]
        _require(w.shape == (ci, co, 2, 2), f"conv_transpose2x2 weight has shape {tuple(w.shape)}; "
                                            f"expected ({ci}, Co, 2, 2) for an input with {ci} channels")
        return x, w, (n, ci, h, wd, co)

    def conv_transpose2x2_forward(self, x, w, b=None):
        x, w, (n, ci, h, wd, co) = self._conv_t_args(x, w)
        b = self._bias(b, co)
        y = self._empty((n, co, 2 * h, 2 * wd))
        # one thread per input position (n, co, i, j), each writing its 2x2 output block
        self._elementwise("conv_transpose2x2", "conv_transpose2x2_forward", n * co * h * wd,
                          (x, w, b, y, *_int32(n, ci, h, wd, co)))
        return y

    def conv_transpose2x2_backward(self, x, w, gy, with_bias=True):
        x, w, (n, ci, h, wd, co) = self._conv_t_args(x, w)
        gy = self._float(gy, "gy", 4)
        _require(gy.shape == (n, co, 2 * h, 2 * wd), f"conv_transpose2x2 gy has shape "
                 f"{tuple(gy.shape)}; expected the output's {(n, co, 2 * h, 2 * wd)}")
        dims = (n, ci, h, wd, co)
        gx = self._empty(x.shape)
        self._elementwise("conv_transpose2x2", "conv_transpose2x2_grad_input", gx.size, (gy, w, gx, *_int32(*dims)))
        gw = self._grad_weight("conv_transpose2x2", "conv_transpose2x2_grad_weight",
                               ci * _blocks(co, CONV_T_GW_CO), n * h * wd, w.shape, (x, gy), dims)
        gb = self._channel_sum(gy) if with_bias else None
        return gx, gw, gb

    # ---- crop-and-concatenate (kernels/crop_concat.cu) --------------------------------------------
    @staticmethod
    def _crop_offsets(skip_shape, up_shape) -> tuple[int, int]:
        _require(len(skip_shape) == 4 and len(up_shape) == 4,
                 f"crop_concat needs 4-D shapes, got skip {tuple(skip_shape)} and up {tuple(up_shape)}")
        _require(skip_shape[0] == up_shape[0] and skip_shape[2] >= up_shape[2] and skip_shape[3] >= up_shape[3],
                 f"crop_concat: skip {tuple(skip_shape)} must have up's batch size and be at least as "
                 f"large as up {tuple(up_shape)} in H and W")
        return (skip_shape[2] - up_shape[2]) // 2, (skip_shape[3] - up_shape[3]) // 2

    def crop_concat_forward(self, skip, up):
        skip, up = self._float(skip, "skip", 4), self._float(up, "up", 4)
        oy, ox = self._crop_offsets(skip.shape, up.shape)
        n, cs, hs, ws = skip.shape
        cu, hu, wu = up.shape[1:]
        y = self._empty((n, cs + cu, hu, wu))
        self._elementwise("crop_concat", "crop_concat_forward", y.size,
                          (skip, up, y, *_int32(n, cs, hs, ws, cu, hu, wu, oy, ox)))
        return y

    def crop_concat_backward(self, gy, skip_shape, up_shape):
        skip_shape, up_shape = tuple(int(s) for s in skip_shape), tuple(int(s) for s in up_shape)
        oy, ox = self._crop_offsets(skip_shape, up_shape)
        n, cs, hs, ws = skip_shape
        cu, hu, wu = up_shape[1:]
        gy = self._float(gy, "gy", 4)
        _require(gy.shape == (n, cs + cu, hu, wu),
                 f"crop_concat gy has shape {tuple(gy.shape)}; expected {(n, cs + cu, hu, wu)}")
        gskip, gup = self._empty(skip_shape), self._empty(up_shape)
        self._elementwise("crop_concat", "crop_concat_backward_skip", gskip.size,
                          (gy, gskip, *_int32(n, cs, hs, ws, cu, hu, wu, oy, ox)))
        self._elementwise("crop_concat", "crop_concat_backward_up", gup.size, (gy, gup, *_int32(n, cs, cu, hu, wu)))
        return gskip, gup

    # ---- 1x1 convolution (kernels/conv1x1.cu) ------------------------------------------------------
    def _conv1x1_args(self, x, w):
        x, w = self._float(x, "x", 4), self._float(w, "conv1x1 weight", 4)
        n, ci, h, wd = x.shape
        co = w.shape[0]
        _require(w.shape == (co, ci, 1, 1), f"conv1x1 weight has shape {tuple(w.shape)}; expected "
                                            f"(Co, {ci}, 1, 1) for an input with {ci} channels")
        return x, w, (n, ci, h * wd, co)

    def conv1x1_forward(self, x, w, b=None):
        x, w, (n, ci, p, co) = self._conv1x1_args(x, w)
        b = self._bias(b, co)
        y = self._empty((n, co) + x.shape[2:])
        self._elementwise("conv1x1", "conv1x1_forward", y.size, (x, w, b, y, *_int32(n, ci, p, co)))
        return y

    def conv1x1_backward(self, x, w, gy, with_bias=True):
        x, w, (n, ci, p, co) = self._conv1x1_args(x, w)
        gy = self._float(gy, "gy", 4)
        _require(gy.shape == (n, co) + x.shape[2:],
                 f"conv1x1 gy has shape {tuple(gy.shape)}; expected {(n, co) + x.shape[2:]}")
        gx = self._empty(x.shape)
        self._elementwise("conv1x1", "conv1x1_grad_input", gx.size, (gy, w, gx, *_int32(n, ci, p, co)))
        gw = self._grad_weight("conv1x1", "conv1x1_grad_weight", co * _blocks(ci, CONV1X1_GW_CI),
                               n * p, w.shape, (x, gy), (n, ci, p, co))
        gb = self._channel_sum(gy) if with_bias else None
        return gx, gw, gb

    # ---- ReLU, dropout, SGD (kernels/elementwise.cu) ----------------------------------------------
    def relu_forward(self, x):
        x = self._float(x, "x")
        y = self._empty(x.shape)
        self._elementwise("elementwise", "relu_forward", x.size, (x, y, np.int32(x.size)))
        return y

    def relu_backward(self, y, gy):
        y, gy = self._float(y, "y"), self._float(gy, "gy")
        _require(y.shape == gy.shape, f"relu_backward: y {tuple(y.shape)} and gy {tuple(gy.shape)} differ in shape")
        gx = self._empty(y.shape)
        self._elementwise("elementwise", "relu_backward", y.size, (y, gy, gx, np.int32(y.size)))
        return gx

    @staticmethod
    def _dropout_scale(p) -> np.float32:
        _require(0.0 <= float(p) < 1.0, f"dropout probability p={p} must be in [0, 1)")
        return np.float32(1.0 / (1.0 - float(p)))

    def dropout_forward(self, x, p, seed):
        scale = self._dropout_scale(p)
        x = self._float(x, "x")
        y, mask = self._empty(x.shape), self._empty(x.shape, np.uint8)
        seed32 = np.uint32(int(seed) & 0xFFFFFFFF)  # the hash works modulo 2^32, as the reference
        self._elementwise("elementwise", "dropout_forward", x.size,
                          (x, y, mask, np.int32(x.size), np.float32(p), scale, seed32))
        return y, mask

    def dropout_backward(self, gy, mask, p):
        scale = self._dropout_scale(p)
        gy = self._float(gy, "gy")
        mask = self.xp.ascontiguousarray(self.xp.asarray(mask, dtype=self.xp.uint8))
        _require(mask.shape == gy.shape, f"dropout mask {tuple(mask.shape)} and gy {tuple(gy.shape)} differ in shape")
        gx = self._empty(gy.shape)
        self._elementwise("elementwise", "dropout_backward", gy.size, (gy, mask, gx, np.int32(gy.size), scale))
        return gx

    def sgd_step(self, param, grad, velocity, lr, momentum):
        for name, a in (("param", param), ("velocity", velocity)):
            if not isinstance(a, self.xp.ndarray) or a.dtype != self.xp.float32 or not a.flags.c_contiguous:
                raise TypeError(f"sgd_step updates {name} in place: it must be a C-contiguous float32 "
                                f"{self.xp.__name__} array on device {self.device!r}")
        grad = self._float(grad, "grad")
        _require(param.shape == grad.shape == velocity.shape,
                 f"sgd_step: param {tuple(param.shape)}, grad {tuple(grad.shape)} and velocity "
                 f"{tuple(velocity.shape)} must have one shape")
        self._elementwise("elementwise", "sgd_momentum", param.size,
                          (param, grad, velocity, np.int32(param.size), np.float32(lr), np.float32(momentum)))

    # ---- weighted softmax cross-entropy (kernels/cross_entropy.cu) --------------------------------
    def weighted_cross_entropy_forward(self, logits, target, weight=None):
        xp = self.xp
        logits = self._float(logits, "logits", 4)
        n, c, h, wd = logits.shape
        target = xp.ascontiguousarray(xp.asarray(target, dtype=xp.int32))
        _require(target.shape == (n, h, wd), f"target has shape {tuple(target.shape)}; expected {(n, h, wd)}")
        if weight is None:
            weight = xp.ones((n, h, wd), dtype=xp.float32)
        weight = self._float(weight, "weight")
        _require(weight.shape == (n, h, wd), f"weight has shape {tuple(weight.shape)}; expected {(n, h, wd)}")
        pixels = n * h * wd
        _require(pixels > 0 and c > 0, f"cross-entropy needs at least one pixel and class, got {tuple(logits.shape)}")
        per_pixel, grad = self._empty((pixels,)), self._empty(logits.shape)
        self._elementwise("cross_entropy", "cross_entropy_forward", pixels,
                          (logits, target, weight, per_pixel, grad, *_int32(n, c, h * wd),
                           np.float32(1.0 / pixels)))
        # the mean: one partial sum per block, then one block adds the partials (deterministic)
        blocks = min(_blocks(pixels, REDUCE_THREADS), REDUCE_THREADS)
        loss = self._empty((1,))
        if blocks == 1:
            partial = per_pixel
        else:
            partial = self._empty((blocks,))
            self._launch("cross_entropy", "sum_scaled", (blocks,), (REDUCE_THREADS,),
                         (per_pixel, partial, np.int32(pixels), np.float32(1.0)))
        self._launch("cross_entropy", "sum_scaled", (1,), (REDUCE_THREADS,),
                     (partial, loss, np.int32(partial.size), np.float32(1.0 / pixels)))
        return loss.reshape(()), grad


def _int32(*values) -> tuple:
    """Kernel scalar arguments: NumPy int32, the exact type of the kernels' `int` parameters."""
    return tuple(np.int32(v) for v in values)


def _check_size_of(shape, what: str) -> None:
    size = math.prod(int(s) for s in shape)
    if size > MAX_ELEMENTS:
        raise ValueError(f"{what} would have {size} elements; the kernels use 32-bit indices "
                         f"(at most {MAX_ELEMENTS}): use a smaller batch or tile")


def _check_size(a, what: str) -> None:
    _check_size_of(a.shape, what)
