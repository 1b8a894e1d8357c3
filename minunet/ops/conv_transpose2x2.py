"""The 2x2 "up-convolution" (paper Section 2, Fig. 1 green arrows): a stride-2 transposed
convolution that doubles the feature map and halves the channels. Everything Python about it.

    y[n,co,2i+a,2j+b] = bias[co] + sum_ci x[n,ci,i,j] * w[ci,co,a,b]
    x (N,Ci,H,W), w (Ci,Co,2,2) as PyTorch, b (Co,) -> y (N,Co,2H,2W)

This module holds the op and its autograd Function, the NumPy reference, the fast CPU kernels
(Numba), the launcher of ``kernels/conv_transpose2x2.cu``, and the registry entry.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .. import backends
from ..autograd import Function
from ..backends import choices
from ..backends.kernels import ceil_div, int32s, require
from ..backends.sources import cu_defines
from ..tensor import Tensor
from .checks import check_conv
from .conv1x1 import pointwise, pointwise_grad_weight
from .numba_config import all_float32, jit

KERNEL_FILE = "conv_transpose2x2"


# ---- the op ------------------------------------------------------------------------------------
class ConvTranspose2x2(Function):
    def forward(self, x, w, b):
        self.x, self.w, self.has_b = x, w, b is not None
        return backends.get_backend(self.device).conv_transpose2x2_forward(x, w, b)

    def backward(self, gy):
        return backends.get_backend(self.device).conv_transpose2x2_backward(self.x, self.w, gy, self.has_b)


def conv_transpose2x2(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Stride-2 2x2 transposed convolution: (N,Ci,H,W) -> (N,Co,2H,2W); w is (Ci,Co,2,2)."""
    check_conv("conv_transpose2x2", x, w, b, (2, 2), transposed=True)
    return ConvTranspose2x2.apply(x, w, b)


# ---- the NumPy reference (the oracle) ----------------------------------------------------------
def reference_forward(x, w, b=None):
    """y[n,co,2i+a,2j+b] = bias[co] + sum_ci x[n,ci,i,j] * w[ci,co,a,b]: every input pixel paints
    its own 2x2 output block, so the op is one GEMM (Co*4, Ci) @ (Ci, N*H*W) and a reshuffle."""
    n, ci, h, wd = x.shape
    co = w.shape[1]
    x2 = x.transpose(1, 0, 2, 3).reshape(ci, n * h * wd)
    y = (w.reshape(ci, co * 4).T @ x2).reshape(co, 2, 2, n, h, wd)
    y = y.transpose(3, 0, 4, 1, 5, 2).reshape(n, co, 2 * h, 2 * wd)  # (n, co, i, a, j, b)
    if b is not None:
        y += b.reshape(1, co, 1, 1)
    return y


def reference_backward(x, w, gy, with_bias=True):
    n, ci, h, wd = x.shape
    co = w.shape[1]
    g = gy.reshape(n, co, h, 2, wd, 2).transpose(1, 3, 5, 0, 2, 4).reshape(co * 4, n * h * wd)
    x2 = x.transpose(1, 0, 2, 3).reshape(ci, n * h * wd)
    w2 = w.reshape(ci, co * 4)
    gx = (w2 @ g).reshape(ci, n, h, wd).transpose(1, 0, 2, 3)
    gw = (x2 @ g.T).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return np.ascontiguousarray(gx), gw, gb


# ---- fast CPU kernel (Numba) -------------------------------------------------------------------
# The "cpu" implementation, the CPU twin of kernels/conv_transpose2x2.cu. The up-convolution is a
# 1x1 convolution to 4*Co channels, one per (co, a, b), followed by a 2x2 pixel shuffle that puts
# channel (co, a, b) of pixel (i, j) at output pixel (2i+a, 2j+b); the matrix products are the
# 1x1 convolution's kernels (conv1x1.py: _pointwise, _pointwise_grad_weight), the shuffles are here.


@jit()
def _pixel_shuffle2x2(y4, y):
    """y[n,co,2i+a,2j+b] = y4[n,co*4+a*2+b,i*W+j]; one task per output plane (n, co), its rows
    written in order, two source rows interleaved per output row (vectorised shuffles)."""
    n_, co_, h2, w2 = y.shape
    wd = w2 // 2
    for t in prange(n_ * co_):
        n = t // co_
        co = t % co_
        for i in range(h2 // 2):
            for a in range(2):
                row = y[n, co, 2 * i + a]
                s0 = y4[n, co * 4 + a * 2, i * wd:(i + 1) * wd]
                s1 = y4[n, co * 4 + a * 2 + 1, i * wd:(i + 1) * wd]
                for j in range(wd):
                    row[2 * j] = s0[j]
                    row[2 * j + 1] = s1[j]


@jit(fastmath={"reassoc"})
def _pixel_unshuffle2x2(gy, g4, gb):
    """The inverse of ``_pixel_shuffle2x2``: g4[n,co*4+a*2+b,i*W+j] = gy[n,co,2i+a,2j+b], and
    gb[n,co] = the plane's sum (float64, for the bias gradient). One task per plane (n, co)."""
    n_, co_, h2, w2 = gy.shape
    wd = w2 // 2
    for t in prange(n_ * co_):
        n = t // co_
        co = t % co_
        s = 0.0
        for i in range(h2 // 2):
            for a in range(2):
                row = gy[n, co, 2 * i + a]
                d0 = g4[n, co * 4 + a * 2, i * wd:(i + 1) * wd]
                d1 = g4[n, co * 4 + a * 2 + 1, i * wd:(i + 1) * wd]
                for j in range(wd):
                    d0[j] = row[2 * j]
                    d1[j] = row[2 * j + 1]
                    s += row[2 * j] + row[2 * j + 1]
        gb[n, co] = s


def cpu_forward(x, w, b=None):
    """The fast CPU forward (float32; other dtypes go to the reference): the 1x1 convolution to
    (co, a, b) channels, then ``_pixel_shuffle2x2``."""
    if not all_float32(x, w, *(() if b is None else (b,))):
        return reference_forward(x, w, b)
    n, ci, h, wd = x.shape
    co = w.shape[1]
    w4 = np.ascontiguousarray(w.reshape(ci, co * 4).T)               # (co*4 + a*2 + b, ci)
    b4 = None if b is None else np.repeat(b, 4)
    y4 = pointwise(x.reshape(n, ci, h * wd), w4, b4)
    y = np.empty((n, co, 2 * h, 2 * wd), np.float32)
    _pixel_shuffle2x2(y4, y)
    return y


def cpu_backward(x, w, gy, with_bias=True):
    """The fast CPU gradients (float32; other dtypes go to the reference): gy unshuffled to
    (co, a, b) channels (``_pixel_unshuffle2x2``, which also sums gb), then gx = w (Ci, Co*4) @
    g4 and gw = x g4^T by the 1x1 convolution's kernels."""
    if not all_float32(x, w, gy):
        return reference_backward(x, w, gy, with_bias)
    n, ci, h, wd = x.shape
    co = w.shape[1]
    g4 = np.empty((n, co * 4, h * wd), np.float32)
    gb = np.empty((n, co), np.float64)
    _pixel_unshuffle2x2(np.ascontiguousarray(gy), g4, gb)
    gx = pointwise(g4, w.reshape(ci, co * 4), None).reshape(n, ci, h, wd)
    gw = pointwise_grad_weight(g4, x.reshape(n, ci, h * wd)).reshape(w.shape)
    return gx, gw, (gb.sum(axis=0).astype(np.float32) if with_bias else None)


# ---- the CUDA kernels (kernels/conv_transpose2x2.cu) ---------------------------------------------
_CU = cu_defines(KERNEL_FILE)
GW_THREADS, GW_CO = _CU["CT_THREADS"], _CU["CT_CO"]   # grad-weight block: threads, output channels


def _kernel_args(k, x, w):
    x, w = k.floats(x, "x", 4), k.floats(w, "conv_transpose2x2 weight", 4)
    n, ci, h, wd = x.shape
    co = w.shape[1]
    require(w.shape == (ci, co, 2, 2), f"conv_transpose2x2 weight has shape {tuple(w.shape)}; "
                                       f"expected ({ci}, Co, 2, 2) for an input with {ci} channels")
    return x, w, (n, ci, h, wd, co)


def gemm_version(k, case=None) -> str | None:
    """The forward and input-gradient kernels: None (the naive ones), "gemm" (FP32 register
    tiles) or "gemm_tf32" (tensor cores). Forced by ``k.conv_transpose2x2_version``; "auto" is
    gemm on cuda (the H200 measured the naive forward at 3x and the backward at 9.5x PyTorch's
    time, bench/results/h200-2026-12-04/bench_ops.txt; the gemm kernels are not measured on a GPU
    yet) and with precision tf32 (only gemm has a TF32 version), naive on emu (the emulator's
    speed, not a GPU's); on cuda a version measured fastest for the layer ``case`` (N, Ci, H, W,
    Co) in the GPU's table (backends/choices.py) comes first. TF32 where the file was compiled
    with it (``k.has_tf32``), else FP32."""
    version = choices.choose(k, "conv_transpose2x2", KERNEL_FILE, case) or k.conv_transpose2x2_version
    if version == "naive" or (version == "auto" and k.device != "cuda" and k.precision != "tf32"):
        return None
    return "gemm_tf32" if k.precision == "tf32" and k.has_tf32(KERNEL_FILE) else "gemm"


def gemm_grid(version: str, rows: int, pixels: int) -> tuple[int, int]:
    """(pixel tiles, row tiles) of the forward/input-gradient GEMM kernels."""
    prefix = "CGT" if version == "gemm_tf32" else "CG"
    return ceil_div(pixels, _CU[f"{prefix}_BP"]), ceil_div(rows, _CU[f"{prefix}_BM"])


def kernels_forward(k, x, w, b=None):
    x, w, (n, ci, h, wd, co) = _kernel_args(k, x, w)
    b = k.bias(b, co)
    y = k.empty((n, co, 2 * h, 2 * wd))
    args = (x, w, b, y, *int32s(n, ci, h, wd, co))
    version = gemm_version(k, (n, ci, h, wd, co))
    if version:   # a 64-row x 64-pixel tile of the (Co*4 x Ci) @ (Ci x N*H*W) product per block
        k.launch(KERNEL_FILE, f"conv_transpose2x2_forward_{version}", gemm_grid(version, co * 4, n * h * wd),
                 (_CU["CGT_THREADS" if version == "gemm_tf32" else "CG_THREADS"],), args)
    else:         # one thread per input position (n, co, i, j), each writing its 2x2 output block
        k.launch_elementwise(KERNEL_FILE, "conv_transpose2x2_forward", n * co * h * wd, args)
    return y


def kernels_backward(k, x, w, gy, with_bias=True):
    x, w, (n, ci, h, wd, co) = _kernel_args(k, x, w)
    gy = k.floats(gy, "gy", 4)
    require(gy.shape == (n, co, 2 * h, 2 * wd), f"conv_transpose2x2 gy has shape "
            f"{tuple(gy.shape)}; expected the output's {(n, co, 2 * h, 2 * wd)}")
    dims = (n, ci, h, wd, co)
    gx = k.empty(x.shape)
    version = gemm_version(k, (n, ci, h, wd, co))
    if version:   # the (Ci x Co*4) @ (Co*4 x N*H*W) product
        k.launch(KERNEL_FILE, f"conv_transpose2x2_grad_input_{version}", gemm_grid(version, ci, n * h * wd),
                 (_CU["CGT_THREADS" if version == "gemm_tf32" else "CG_THREADS"],), (gy, w, gx, *int32s(*dims)))
    else:
        k.launch_elementwise(KERNEL_FILE, "conv_transpose2x2_grad_input", gx.size, (gy, w, gx, *int32s(*dims)))
    gw, gb = k.grad_weight(KERNEL_FILE, "conv_transpose2x2_grad_weight", GW_THREADS,
                           ci * ceil_div(co, GW_CO), n * h * wd, w.shape, co, (x, gy), dims,
                           gemm=(ci, co * 4), case=dims)   # gw as a (Ci x Co*4) matrix: the gemm kernels' view
    return gx, gw, gb if with_bias else None


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "conv_transpose2x2_forward": {"reference": reference_forward, "cpu": cpu_forward, "kernels": kernels_forward},
    "conv_transpose2x2_backward": {"reference": reference_backward, "cpu": cpu_backward, "kernels": kernels_backward},
}
# (N, Ci, H, W, Co): a single pixel; odd sizes; Co not a multiple of the grad-weight block's 8;
# 135 input pixels per image, more than the grad-weight block's 128 threads
TEST_CASES = [(1, 1, 1, 1, 1), (2, 6, 5, 7, 9), (3, 10, 4, 3, 17), (2, 3, 6, 5, 2), (2, 2, 3, 45, 3)]
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def example(rng, case, dtype=np.float32) -> dict:
    n, ci, h, wd, co = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((n, ci, h, wd), (ci, co, 2, 2), (co,)))
    gy = rng.standard_normal((n, co, 2 * h, 2 * wd)).astype(dtype)
    return {"conv_transpose2x2_forward": (x, w, b), "conv_transpose2x2_backward": (x, w, gy, True)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The last up-conv of a U-Net with ``base`` channels on a ``tile`` input (2*base -> base)."""
    side = (tile - 4) // 2 - 40
    return [(batch, 2 * base, side, side, base)] if side >= 1 else []


def cost(case) -> dict:
    n, ci, h, wd, co = case
    x, w, y = n * ci * h * wd, ci * co * 4, n * co * 4 * h * wd
    flops = 2.0 * x * co * 4
    return {"conv_transpose2x2_forward": (flops, 4.0 * (x + w + y)),
            "conv_transpose2x2_backward": (2 * flops, 4.0 * (2 * x + 2 * w + y))}


def torch_forward(torch, x, w, b):
    """PyTorch's twin of the forward, for the benchmark's comparison."""
    return torch.nn.functional.conv_transpose2d(x, w, b, stride=2)


TORCH_TWINS = {"conv_transpose2x2_forward": torch_forward}   # function -> PyTorch twin (the backward is timed through it)
