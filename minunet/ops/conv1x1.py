"""The 1x1 convolution, U-Net's final classifier layer (paper Section 2: "a 1x1 convolution is
used to map each 64-component feature vector to the desired number of classes"): everything
Python about it.

    y[n,co,p] = b[co] + sum_ci w[co,ci] * x[n,ci,p]     x (N,Ci,H,W), w (Co,Ci,1,1) -> (N,Co,H,W)

This module holds the op and its autograd Function, the NumPy reference, the fast CPU kernels
(Numba), the launcher of ``kernels/conv1x1.cu``, and the registry entry.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .. import backends
from ..autograd import Function
from ..backends.kernels import ceil_div, int32s, require
from ..backends.sources import cu_defines
from ..tensor import Tensor
from .checks import check_conv
from .numba_config import all_float32, jit

KERNEL_FILE = "conv1x1"


# ---- the op ------------------------------------------------------------------------------------
class Conv1x1(Function):
    def forward(self, x, w, b):
        self.x, self.w, self.has_b = x, w, b is not None
        return backends.get_backend(self.device).conv1x1_forward(x, w, b)

    def backward(self, gy):
        return backends.get_backend(self.device).conv1x1_backward(self.x, self.w, gy, self.has_b)


def conv1x1(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """1x1 convolution, a per-pixel linear map of channels; w is (Co,Ci,1,1)."""
    check_conv("conv1x1", x, w, b, (1, 1))
    return Conv1x1.apply(x, w, b)


# ---- the NumPy reference (the oracle) ----------------------------------------------------------
def reference_forward(x, w, b=None):
    n, ci, h, wd = x.shape
    co = w.shape[0]
    y = np.matmul(w.reshape(co, ci), x.reshape(n, ci, h * wd)).reshape(n, co, h, wd)
    if b is not None:
        y += b.reshape(1, co, 1, 1)
    return y


def reference_backward(x, w, gy, with_bias=True):
    n, ci, h, wd = x.shape
    co = w.shape[0]
    g = gy.reshape(n, co, h * wd)
    gx = np.matmul(w.reshape(co, ci).T, g).reshape(x.shape)
    gw = np.einsum("nop,nip->oi", g, x.reshape(n, ci, h * wd), optimize=True).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, gw, gb


# ---- fast CPU kernel (Numba) -------------------------------------------------------------------
# The "cpu" implementation, and the CPU twin of kernels/conv1x1.cu. A 1x1 convolution is a
# per-image matrix product, so these two kernels are small GEMMs written as loops; the
# up-convolution (conv_transpose2x2.py) reuses them: it is a 1x1 convolution to 4*Co channels
# followed by a 2x2 pixel shuffle.
PW_PIXELS = 4096     # pixels per task (and per slice of the weight-gradient sums)


@jit(fastmath={"contract"})
def _pointwise(x, w, b, y, chunk):
    """y[n,co,p] = b[co] + sum_ci w[co,ci] * x[n,ci,p] for x (N,Ci,P), w (Co,Ci), y (N,Co,P).

    Mapping (compare conv1x1_forward: one CUDA thread per output pixel, a loop over ci): one task
    = 4 output channels x ``chunk`` pixels of one image, split over the cores by ``prange``;
    the innermost loop runs over the pixels, 16 per vector, and adds 2 input channels at a time
    into the 4 accumulator rows: per vector 2 loads of x, 4 loads and 4 stores of accumulators,
    8 FMAs (the 8 weights stay in registers). An odd last input channel is added on its own."""
    n_, ci_, pix = x.shape
    co_ = w.shape[0]
    slices = (pix + chunk - 1) // chunk
    groups = (co_ + 3) // 4
    for task in prange(n_ * slices * groups):
        g = task % groups
        s = (task // groups) % slices
        n = task // (groups * slices)
        p0 = s * chunk
        m = min(chunk, pix - p0)
        c0 = 4 * g                        # 4 output channels; repeated at the end of Co
        c1 = min(c0 + 1, co_ - 1)
        c2 = min(c0 + 2, co_ - 1)
        c3 = min(c0 + 3, co_ - 1)
        acc = np.empty((4, m), np.float32)
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        a0[:] = b[c0]
        a1[:] = b[c1]
        a2[:] = b[c2]
        a3[:] = b[c3]
        for ci in range(0, ci_ - 1, 2):
            u0, u1, u2, u3 = w[c0, ci], w[c1, ci], w[c2, ci], w[c3, ci]
            v0, v1, v2, v3 = w[c0, ci + 1], w[c1, ci + 1], w[c2, ci + 1], w[c3, ci + 1]
            xa = x[n, ci, p0:p0 + m]
            xb = x[n, ci + 1, p0:p0 + m]
            for p in range(m):
                e = xa[p]
                f = xb[p]
                s0 = a0[p] + u0 * e
                s1 = a1[p] + u1 * e
                s2 = a2[p] + u2 * e
                s3 = a3[p] + u3 * e
                a0[p] = s0 + v0 * f
                a1[p] = s1 + v1 * f
                a2[p] = s2 + v2 * f
                a3[p] = s3 + v3 * f
        if ci_ % 2 == 1:
            ci = ci_ - 1
            u0, u1, u2, u3 = w[c0, ci], w[c1, ci], w[c2, ci], w[c3, ci]
            xa = x[n, ci, p0:p0 + m]
            for p in range(m):
                e = xa[p]
                a0[p] += u0 * e
                a1[p] += u1 * e
                a2[p] += u2 * e
                a3[p] += u3 * e
        y[n, c0, p0:p0 + m] = a0
        y[n, c1, p0:p0 + m] = a1
        y[n, c2, p0:p0 + m] = a2
        y[n, c3, p0:p0 + m] = a3


@jit(fastmath={"contract", "reassoc"})
def _pointwise_grad_weight(a, g, part, chunk):
    """part[n*slices+s, k, c] = sum over the pixels p of slice s of g[n,k,p] * a[n,c,p], for
    a (N,C,P), g (N,K,P): the weight gradient of a 1x1 convolution (k output, c input channel);
    the caller sums part over its first axis in a fixed order.

    Mapping (compare conv1x1_grad_weight: a block per weight, a tree reduction over pixels): one
    task = 2 rows k x 4 columns c x one slice of pixels; the 8 sums are scalars that LLVM keeps
    as 8 vector registers of 16 partial sums ("reassoc"), reduced across the lanes after the
    loop. Per vector: 2 loads of g, 4 loads of a, 8 FMAs."""
    n_, c_, pix = a.shape
    k_ = g.shape[1]
    slices = (pix + chunk - 1) // chunk
    rows = (k_ + 1) // 2
    cols = (c_ + 3) // 4
    for task in prange(n_ * slices * rows * cols):
        q = task % cols
        r = (task // cols) % rows
        s = (task // (cols * rows)) % slices
        n = task // (cols * rows * slices)
        p0 = s * chunk
        m = min(chunk, pix - p0)
        k0 = 2 * r
        k1 = min(k0 + 1, k_ - 1)
        i0 = 4 * q
        i1 = min(i0 + 1, c_ - 1)
        i2 = min(i0 + 2, c_ - 1)
        i3 = min(i0 + 3, c_ - 1)
        g0 = g[n, k0, p0:p0 + m]
        g1 = g[n, k1, p0:p0 + m]
        x0 = a[n, i0, p0:p0 + m]
        x1 = a[n, i1, p0:p0 + m]
        x2 = a[n, i2, p0:p0 + m]
        x3 = a[n, i3, p0:p0 + m]
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
        for p in range(m):
            d0 = g0[p]
            d1 = g1[p]
            e = x0[p]
            s00 += d0 * e; s10 += d1 * e   # noqa: E702
            e = x1[p]
            s01 += d0 * e; s11 += d1 * e   # noqa: E702
            e = x2[p]
            s02 += d0 * e; s12 += d1 * e   # noqa: E702
            e = x3[p]
            s03 += d0 * e; s13 += d1 * e   # noqa: E702
        k = n * slices + s
        part[k, k0, i0], part[k, k0, i1], part[k, k0, i2], part[k, k0, i3] = s00, s01, s02, s03
        part[k, k1, i0], part[k, k1, i1], part[k, k1, i2], part[k, k1, i3] = s10, s11, s12, s13


def pointwise(x, w, b, chunk=PW_PIXELS):
    """y (N,Co,P) = w (Co,Ci) @ x (N,Ci,P) + b, float32, by ``_pointwise``."""
    n, _, pix = x.shape
    co = w.shape[0]
    y = np.empty((n, co, pix), np.float32)
    bias = np.zeros(co, np.float32) if b is None else np.ascontiguousarray(b)
    _pointwise(np.ascontiguousarray(x), np.ascontiguousarray(w), bias, y, chunk)
    return y


def pointwise_grad_weight(a, g, chunk=PW_PIXELS):
    """(K, C) = sum over images and pixels of g (N,K,P) times a (N,C,P), by
    ``_pointwise_grad_weight``."""
    n, _, pix = a.shape
    slices = -(-pix // chunk)
    part = np.empty((n * slices, g.shape[1], a.shape[1]), np.float32)
    _pointwise_grad_weight(np.ascontiguousarray(a), np.ascontiguousarray(g), part, chunk)
    return part.sum(axis=0)


def cpu_forward(x, w, b=None):
    """The fast CPU forward (float32; other dtypes go to the reference): ``_pointwise``."""
    if not all_float32(x, w, *(() if b is None else (b,))):
        return reference_forward(x, w, b)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    return pointwise(x.reshape(n, ci, h * wd), w.reshape(co, ci), b).reshape(n, co, h, wd)


def cpu_backward(x, w, gy, with_bias=True):
    """The fast CPU gradients (float32; other dtypes go to the reference): gx = w^T gy by
    ``_pointwise``, gw by ``_pointwise_grad_weight``, gb by NumPy."""
    if not all_float32(x, w, gy):
        return reference_backward(x, w, gy, with_bias)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    g = gy.reshape(n, co, h * wd)
    gx = pointwise(g, np.ascontiguousarray(w.reshape(co, ci).T), None).reshape(n, ci, h, wd)
    gw = pointwise_grad_weight(x.reshape(n, ci, h * wd), g).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, gw, gb


# ---- the CUDA kernels (kernels/conv1x1.cu) -----------------------------------------------------
_CU = cu_defines(KERNEL_FILE)
GW_THREADS, GW_CI = _CU["C1_THREADS"], _CU["C1_CI"]   # grad-weight block: threads, input channels


def _kernel_args(k, x, w):
    x, w = k.floats(x, "x", 4), k.floats(w, "conv1x1 weight", 4)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    require(w.shape == (co, ci, 1, 1), f"conv1x1 weight has shape {tuple(w.shape)}; expected "
                                       f"(Co, {ci}, 1, 1) for an input with {ci} channels")
    return x, w, (n, ci, h * wd, co)


def kernels_forward(k, x, w, b=None):
    x, w, (n, ci, p, co) = _kernel_args(k, x, w)
    b = k.bias(b, co)
    y = k.empty((n, co) + x.shape[2:])
    k.launch_elementwise(KERNEL_FILE, "conv1x1_forward", y.size, (x, w, b, y, *int32s(n, ci, p, co)))
    return y


def kernels_backward(k, x, w, gy, with_bias=True):
    x, w, (n, ci, p, co) = _kernel_args(k, x, w)
    gy = k.floats(gy, "gy", 4)
    require(gy.shape == (n, co) + x.shape[2:],
            f"conv1x1 gy has shape {tuple(gy.shape)}; expected {(n, co) + x.shape[2:]}")
    gx = k.empty(x.shape)
    k.launch_elementwise(KERNEL_FILE, "conv1x1_grad_input", gx.size, (gy, w, gx, *int32s(n, ci, p, co)))
    gw, gb = k.grad_weight(KERNEL_FILE, "conv1x1_grad_weight", GW_THREADS, co * ceil_div(ci, GW_CI),
                           n * p, w.shape, co, (x, gy), (n, ci, p, co), gemm=(co, ci),
                           case=(n, ci, *x.shape[2:], co))
    return gx, gw, gb if with_bias else None


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "conv1x1_forward": {"reference": reference_forward, "cpu": cpu_forward, "kernels": kernels_forward},
    "conv1x1_backward": {"reference": reference_backward, "cpu": cpu_backward, "kernels": kernels_backward},
}
# (N, Ci, H, W, Co); the last has 150 pixels per image, more than the grad-weight block's 128 threads
TEST_CASES = [(1, 1, 1, 1, 1), (2, 10, 5, 7, 3), (3, 17, 4, 9, 2), (2, 3, 3, 50, 2)]
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def example(rng, case, dtype=np.float32) -> dict:
    n, ci, h, wd, co = case
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((n, ci, h, wd), (co, ci, 1, 1), (co,)))
    gy = rng.standard_normal((n, co, h, wd)).astype(dtype)
    return {"conv1x1_forward": (x, w, b), "conv1x1_backward": (x, w, gy, True)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The classifier of a U-Net with ``base`` channels on a ``tile`` input: base -> 2 classes."""
    out = tile - 184 if tile > 184 else 0
    return [(batch, base, out, out, 2)] if out > 0 else []


def cost(case) -> dict:
    n, ci, h, wd, co = case
    x, y = n * ci * h * wd, n * co * h * wd
    flops = 2.0 * y * ci
    return {"conv1x1_forward": (flops, 4.0 * (x + y + co * ci)),
            "conv1x1_backward": (2 * flops, 4.0 * (2 * x + y + 2 * co * ci))}


def torch_forward(torch, x, w, b):
    """PyTorch's twin of the forward, for the benchmark's comparison."""
    return torch.nn.functional.conv2d(x, w, b)


TORCH_TWINS = {"conv1x1_forward": torch_forward}   # function -> PyTorch twin (the backward is timed through it)
