"""The valid 3x3 convolution (paper Section 2 and Fig. 1, blue arrows): everything Python about it.

    y[n,co,i,j] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[n,ci,i+ky,j+kx]    (no padding)
    x (N,Ci,H,W), w (Co,Ci,3,3), b (Co,) -> y (N,Co,H-2,W-2)

This module holds, in order: the differentiable op ``conv3x3`` (argument checks and its autograd
Function), the NumPy reference forward and backward (the oracle), the launcher of the CUDA
kernels in ``kernels/conv3x3.cu`` (naive and tiled versions, on ``cuda`` and ``emu``), and the
registry entry (implementations, test and benchmark cases, napkin math).

The reference's trick ("full-width im2col")
--------------------------------------------
A valid 3x3 convolution reads, for output pixel (i, j), the input pixels (i+ky, j+kx). Flatten each
input channel to a row of length H*W: pixel (i+ky, j+kx) sits at flat index (i*W + j) + (ky*W + kx).
So if we compute outputs on the *full-width* grid p = i*W + j for j in [0, W) (instead of [0, W-2)),
the input needed by the tap (ky, kx) is one contiguous slice ``flat[ky*W+kx : ky*W+kx + Ho*W]``:
the convolution is nine GEMMs ``w[:, :, ky, kx] (Co, Ci) @ slice (Ci, Ho*W)`` summed, and BLAS
reads each slice in place (no im2col copy: copying dominated the time on a 2-core CPU). The two
extra columns per row (j = W-2, W-1) wrap around into the next row; they are computed and thrown
away (a 2/W overhead).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import backends
from ..autograd import Function
from ..backends.kernels import MAX_GRID_YZ, ceil_div, int32s, require
from ..backends.sources import cu_defines
from ..tensor import Tensor
from .checks import check_conv

KERNEL_FILE = "conv3x3"


# ---- the op ------------------------------------------------------------------------------------
class Conv3x3(Function):
    def forward(self, x, w, b):
        self.x, self.w, self.has_b = x, w, b is not None
        return backends.get_backend(self.device).conv3x3_forward(x, w, b)

    def backward(self, gy):
        return backends.get_backend(self.device).conv3x3_backward(self.x, self.w, gy, self.has_b)


def conv3x3(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Valid (unpadded) 3x3 convolution: (N,Ci,H,W) -> (N,Co,H-2,W-2); w is (Co,Ci,3,3)."""
    check_conv("conv3x3", x, w, b, (3, 3))
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"conv3x3: the input must be at least 3x3, got shape {x.shape}")
    return Conv3x3.apply(x, w, b)


# ---- the NumPy reference (the oracle; dtype-generic, float64 for gradient checks) --------------
def _flat_padded(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H*W + 2): each channel flattened, plus 2 zeros so the last tap's
    slice of the full-width grid (which reaches index Ho*W - 1 + 2*W + 2 = H*W + 1) stays in bounds."""
    n, c, h, w = x.shape
    flat = np.zeros((n, c, h * w + 2), dtype=x.dtype)
    flat[:, :, : h * w] = x.reshape(n, c, h * w)
    return flat


def _taps(w: np.ndarray) -> np.ndarray:
    """(Co, Ci, 3, 3) -> (3, 3, Co, Ci) contiguous: one (Co, Ci) matrix per tap, ready for BLAS."""
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _im2col3x3(x: np.ndarray) -> np.ndarray:
    """(N, Ci, H, W) -> cols (Ci*9, N*Ho*W), rows ordered (ci, ky, kx) like w.reshape(Co, Ci*9)."""
    n, ci, h, w = x.shape
    length = (h - 2) * w  # the full-width output grid of one image
    flat = _flat_padded(x)
    s_n, s_c, s_p = flat.strides
    # view[n, c, ky, kx, p] = flat[n, c, ky*W + kx + p]  -- no copy yet
    view = as_strided(flat, shape=(n, ci, 3, 3, length), strides=(s_n, s_c, w * s_p, s_p, s_p),
                      writeable=False)
    # the one copy: bring (ci, ky, kx) to the rows and (n, p) to the columns
    return view.transpose(1, 2, 3, 0, 4).reshape(ci * 9, n * length)


# When to build the im2col matrix (9*Ci, N*L) and do one GEMM with K = 9*Ci instead of tap-wise
# GEMMs: with few input channels (each tap's GEMM has K = Ci, too little work) or when the
# matrix is small (deep layers: small images, many channels; the copy is cheap and one big GEMM
# beats nine small ones). The byte limits were measured on a 2-core x86 VM (bench/results/).
_IM2COL_MAX_CHANNELS = 8
_IM2COL_FORWARD_BYTES = 8 << 20
_IM2COL_BACKWARD_BYTES = 3 << 20


def _cols_bytes(x: np.ndarray) -> int:
    n, ci, h, w = x.shape
    return 9 * ci * n * (h - 2) * w * x.itemsize


def reference_forward(x, w, b=None):
    """y[n,co,i,j] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[n,ci,i+ky,j+kx]  (no padding).

    Nine GEMMs, one per tap (ky, kx): ``w[:, :, ky, kx] (Co, Ci) @ flat[:, off:off+L]`` where the
    right operand is a strided *view* of the flattened input (BLAS takes it without a copy),
    accumulated on the full-width grid. For few input channels: im2col + one GEMM."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    ho, wo = h - 2, wd - 2
    length = ho * wd
    if ci < _IM2COL_MAX_CHANNELS or _cols_bytes(x) <= _IM2COL_FORWARD_BYTES:
        y_full = (w.reshape(co, ci * 9) @ _im2col3x3(x)).reshape(co, n, ho, wd).transpose(1, 0, 2, 3)
    else:
        flat, taps = _flat_padded(x), _taps(w)
        y_full = np.zeros((n, co, length), dtype=x.dtype)
        tmp = np.empty_like(y_full)
        for ky in range(3):          # 9 taps, each a whole-image GEMM: no per-pixel loop
            for kx in range(3):
                off = ky * wd + kx
                np.matmul(taps[ky, kx], flat[:, :, off:off + length], out=tmp)
                y_full += tmp
        y_full = y_full.reshape(n, co, ho, wd)
    y = np.ascontiguousarray(y_full[:, :, :, :wo])
    if b is not None:
        y += b.reshape(1, co, 1, 1)
    return y


def reference_backward(x, w, gy, with_bias=True):
    """Gradients of the valid 3x3 convolution, on the full-width grid, one kernel row at a time.

    With g = gy on the full-width grid (zeros in the 2 wrap columns, so they contribute nothing),
    the three taps (ky, 0..2) of one kernel row differ only by a shift of 1 pixel. So:

    - gw[:, :, ky, kx] = sum_p g[co, p] * flat[ci, p + ky*W + kx]. Stacking g shifted right by
      kx = 0, 1, 2 into G3 (3*Co, L+2) turns the three taps of row ky into ONE GEMM,
      ``G3 @ flat[:, ky*W : ky*W+L+2]^T`` with M = 3*Co - a better shape for BLAS than nine
      thin GEMMs (measured 1.1-2.6x faster for gw here).
    - gx is the transpose of the forward: ``w[:, :, ky, :]^T (3*Ci, Co) @ g`` gives the three
      taps' contributions, each added back into the flattened input at its offset ("col2im").
    """
    if _cols_bytes(x) <= _IM2COL_BACKWARD_BYTES:
        return _conv3x3_backward_im2col(x, w, gy, with_bias)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    ho, wo = h - 2, wd - 2
    length = ho * wd
    flat = _flat_padded(x)
    g3 = np.zeros((n, 3, co, ho, wd + 1), dtype=gy.dtype)     # g shifted by kx, see above
    for kx in range(3):
        g3.reshape(n, 3, co, -1)[:, kx, :, kx:kx + length].reshape(n, co, ho, wd)[..., :wo] = gy
    g3 = g3.reshape(n, 3 * co, -1)[:, :, : length + 2]
    g = g3[:, :co, :length]                                   # the unshifted copy
    rows_t = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(3, 3 * ci, co)  # (ky, kx*Ci, Co)
    gw = np.zeros((3, co, ci, 3), dtype=x.dtype)              # (ky, co, ci, kx) while summing
    gflat = np.zeros((n, ci, h * wd + 2), dtype=x.dtype)
    for ky in range(3):
        window = flat[:, :, ky * wd: ky * wd + length + 2]     # (N, Ci, L+2), a view
        part = np.matmul(g3, window.transpose(0, 2, 1)).sum(axis=0)   # (3*Co, Ci)
        gw[ky] = part.reshape(3, co, ci).transpose(1, 2, 0)
        contrib = np.matmul(rows_t[ky], g)                    # (N, 3*Ci, L)
        for kx in range(3):
            off = ky * wd + kx
            gflat[:, :, off:off + length] += contrib[:, kx * ci:(kx + 1) * ci]
    gx = gflat[:, :, : h * wd].reshape(n, ci, h, wd)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, np.ascontiguousarray(gw.transpose(1, 2, 0, 3)), gb


def _conv3x3_backward_im2col(x, w, gy, with_bias):
    """The same gradients with an explicit im2col matrix: gw = g @ cols^T and
    gcols = W^T @ g, then each tap's rows of gcols added back at its offset (col2im)."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    ho, wo = h - 2, wd - 2
    length = ho * wd
    g = np.zeros((co, n, ho, wd), dtype=gy.dtype)
    g[:, :, :, :wo] = gy.transpose(1, 0, 2, 3)
    g = g.reshape(co, n * length)
    gw = (g @ _im2col3x3(x).T).reshape(w.shape)
    gcols = (w.reshape(co, ci * 9).T @ g).reshape(ci, 3, 3, n, length)
    gflat = np.zeros((n, ci, h * wd + 2), dtype=x.dtype)
    for ky in range(3):
        for kx in range(3):
            off = ky * wd + kx
            gflat[:, :, off:off + length] += gcols[:, ky, kx].transpose(1, 0, 2)
    gx = gflat[:, :, : h * wd].reshape(n, ci, h, wd)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, gw, gb


# ---- the CUDA kernels (kernels/conv3x3.cu), on cuda and emu -------------------------------------
# Launch sizes come from the .cu file's #defines, so the grid always matches the kernel.
_CU = cu_defines(KERNEL_FILE)
TILE_W, TILE_H = _CU["TILE_W"], _CU["TILE_H"]           # output pixels per block of the tiled kernels
TILED_BLOCK = (_CU["TILE_W"], _CU["BLOCK_ROWS"], 1)     # 32 x 8 threads, each 2 rows x 8 channels
CO_PER_BLOCK = _CU["CO_PER_BLOCK"]                      # output channels per block
GW_THREADS, GW_CI = _CU["GW_THREADS"], _CU["GW_CI"]     # grad-weight block: threads, input channels


def _kernel_args(k, x, w):
    x, w = k.floats(x, "x", 4), k.floats(w, "conv3x3 weight", 4)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    require(w.shape == (co, ci, 3, 3), f"conv3x3 weight has shape {tuple(w.shape)}; expected "
                                       f"(Co, {ci}, 3, 3) for an input with {ci} channels")
    require(h >= 3 and wd >= 3, f"conv3x3 needs an input of at least 3x3 pixels, got {h}x{wd}")
    return x, w, (n, ci, h, wd, co)


def tiled_grid(n: int, channels: int, h: int, w: int) -> tuple[int, int, int]:
    """The grid of conv3x3_*_tiled for an (h, w) output with ``channels`` channels:
    (output tiles per image, groups of CO_PER_BLOCK channels, images)."""
    tiles = ceil_div(h, TILE_H) * ceil_div(w, TILE_W)
    groups = ceil_div(channels, CO_PER_BLOCK)
    require(groups <= MAX_GRID_YZ and n <= MAX_GRID_YZ,
            f"conv3x3: {n} images or {channels} channels exceed the tiled kernel's grid; "
            "use smaller batches or MINUNET_CONV3X3=naive")
    return tiles, groups, n


def kernels_forward(k, x, w, b=None):
    x, w, (n, ci, h, wd, co) = _kernel_args(k, x, w)
    b = k.bias(b, co)
    y = k.empty((n, co, h - 2, wd - 2))
    args = (x, w, b, y, *int32s(n, ci, h, wd, co))
    if k.conv3x3_version == "naive":
        k.launch_elementwise(KERNEL_FILE, "conv3x3_forward_naive", y.size, args)
    else:
        k.launch(KERNEL_FILE, "conv3x3_forward_tiled", tiled_grid(n, co, h - 2, wd - 2), TILED_BLOCK, args)
    return y


def kernels_backward(k, x, w, gy, with_bias=True):
    x, w, (n, ci, h, wd, co) = _kernel_args(k, x, w)
    gy = k.floats(gy, "gy", 4)
    require(gy.shape == (n, co, h - 2, wd - 2),
            f"conv3x3 gy has shape {tuple(gy.shape)}; expected the output's {(n, co, h - 2, wd - 2)}")
    gx = k.empty(x.shape)
    dims = int32s(n, ci, h, wd, co)
    if k.conv3x3_version == "naive":
        k.launch_elementwise(KERNEL_FILE, "conv3x3_grad_input_naive", gx.size, (gy, w, gx, *dims))
    else:
        k.launch(KERNEL_FILE, "conv3x3_grad_input_tiled", tiled_grid(n, ci, h, wd), TILED_BLOCK,
                 (gy, w, gx, *dims))
    gw = k.grad_weight(KERNEL_FILE, "conv3x3_grad_weight", GW_THREADS, co * ceil_div(ci, GW_CI),
                       n * (h - 2) * (wd - 2), w.shape, (x, gy), (n, ci, h, wd, co))
    gb = k.channel_sum(gy) if with_bias else None
    return gx, gw, gb


# ---- registry entry: implementations, test and benchmark cases ----------------------------------
IMPLEMENTATIONS = {
    "conv3x3_forward": {"reference": reference_forward, "kernels": kernels_forward},
    "conv3x3_backward": {"reference": reference_backward, "kernels": kernels_backward},
}

# (N, Ci, H, W, Co): the smallest input; odd sizes; Ci > 8 and Co > 8 (two channel chunks/groups,
# the second partly empty); an output 16 rows tall and 33 wide (exactly one tile row, two tile
# columns); an output taller than one tile; 3 x 3 tiles and 3 channel chunks/groups per image.
TEST_CASES = [(1, 1, 3, 3, 1), (2, 3, 9, 11, 5), (1, 9, 18, 35, 10), (3, 2, 20, 7, 3),
              (2, 17, 37, 70, 17)]
TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # sums of <= ~1000 float32 products of N(0, 1) values


def example(rng, case, dtype=np.float32) -> dict:
    """Random arguments of each backend function for one case (N, Ci, H, W, Co)."""
    n, ci, h, wd, co = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((n, ci, h, wd), (co, ci, 3, 3), (co,)))
    gy = rng.standard_normal((n, co, h - 2, wd - 2)).astype(dtype)
    return {"conv3x3_forward": (x, w, b), "conv3x3_backward": (x, w, gy, True)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The first conv of a U-Net with ``base`` channels on a ``tile`` input, the second one (the
    widest full-resolution layer) and a deep one (4*base channels after two poolings)."""
    deep = (tile - 4) // 4 - 4
    return [(batch, 1, tile, tile, base), (batch, base, tile - 2, tile - 2, base),
            (batch, 4 * base, deep, deep, 4 * base)]


def cost(case) -> dict:
    """(FLOPs, bytes) per backend function: 2 FLOPs per multiply-add; bytes the minimum traffic,
    every input read once and every output written once, in float32."""
    n, ci, h, wd, co = case
    x, w, y = n * ci * h * wd, co * ci * 9, n * co * (h - 2) * (wd - 2)
    flops = 2.0 * y * ci * 9
    return {"conv3x3_forward": (flops, 4.0 * (x + w + y)),
            "conv3x3_backward": (2 * flops, 4.0 * (2 * x + 2 * w + y))}


def torch_forward(torch, x, w, b):
    """PyTorch's twin of the forward, for the benchmark's comparison."""
    return torch.nn.functional.conv2d(x, w, b)


TORCH_TWINS = {"conv3x3_forward": torch_forward}   # function -> PyTorch twin (the backward is timed through it)
