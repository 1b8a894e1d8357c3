"""The valid 3x3 convolution (paper Section 2 and Fig. 1, blue arrows): everything Python about it.

    y[n,co,i,j] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[n,ci,i+ky,j+kx]    (no padding)
    x (N,Ci,H,W), w (Co,Ci,3,3), b (Co,) -> y (N,Co,H-2,W-2)

This module holds, in order: the differentiable op ``conv3x3`` (argument checks and its autograd
Function), the NumPy reference forward and backward (the oracle), the fast CPU kernels (Numba:
device ``cpu``), the launcher of the CUDA kernels in ``kernels/conv3x3.cu`` (v1 naive, v2 tiled,
v3 igemm, v4 wmma, v5 wmma_big, chosen per shape and precision in ``conv3x3_version``; the weight and bias
gradients serial or tree; on ``cuda`` and ``emu``), and the registry entry (implementations,
test and benchmark cases, napkin math).

``conv3x3(x, w, b, relu=True)`` is the fused "conv, then ReLU" of every 3x3 layer of the paper:
the GEMM kernels add the bias and apply the ReLU in their store, and in the backward pass apply
the ReLU's mask (gy * (y > 0), y the saved output) while loading gy. When x needs no gradient (the
network's input) the backward launches no input-gradient kernel.

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

from dataclasses import dataclass

import numpy as np
import numba
from numba import prange
from numpy.lib.stride_tricks import as_strided

from .. import backends
from ..autograd import Function
from ..backends import choices
from ..backends.kernels import MAX_GRID_YZ, ceil_div, int32s, require
from ..backends.sources import cu_defines
from ..tensor import Tensor
from .checks import check_conv
from .elementwise import relu_cpu_backward
from .numba_config import LANES, all_float32, jit

KERNEL_FILE = "conv3x3"


# ---- the op ------------------------------------------------------------------------------------
class Conv3x3(Function):
    def forward(self, x, w, b, relu=False):
        self.x, self.w, self.has_b = x, w, b is not None
        y = backends.get_backend(self.device).conv3x3_forward(x, w, b, relu=relu)
        self.y = y if relu else None     # the ReLU's output: its zeros are the backward's mask
        return y

    def backward(self, gy):
        # The network's input needs no gradient (paper Fig. 1: the first layer's x is the image):
        # then the input-gradient kernel is not launched at all.
        return backends.get_backend(self.device).conv3x3_backward(
            self.x, self.w, gy, self.has_b, y=self.y, need_gx=self.needs_input_grad[0])


def conv3x3(x: Tensor, w: Tensor, b: Tensor | None = None, relu: bool = False) -> Tensor:
    """Valid (unpadded) 3x3 convolution: (N,Ci,H,W) -> (N,Co,H-2,W-2); w is (Co,Ci,3,3).

    ``relu=True`` returns relu(conv3x3(x, w, b)) as one op (every 3x3 conv of the paper is followed
    by a ReLU): the kernels apply the ReLU when they store the output and its mask when the
    backward pass loads the gradient, instead of two extra passes over the activations."""
    check_conv("conv3x3", x, w, b, (3, 3))
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"conv3x3: the input must be at least 3x3, got shape {x.shape}")
    return Conv3x3.apply(x, w, b, relu=bool(relu))


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


def reference_forward(x, w, b=None, relu=False):
    """y[n,co,i,j] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[n,ci,i+ky,j+kx]  (no padding);
    with ``relu``, max(y, 0).

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
    if relu:
        np.maximum(y, 0, out=y)
    return y


def reference_backward(x, w, gy, with_bias=True, y=None, need_gx=True):
    """Gradients (gx, gw, gb) of the valid 3x3 convolution; with ``y`` (the output of the fused
    conv + ReLU) those of relu(conv): gy masked by y > 0 first. ``need_gx=False``: gx is None.
    """
    if y is not None:
        gy = gy * (y > 0)
    gx, gw, gb = _reference_backward(x, w, gy, with_bias)
    return (gx if need_gx else None), gw, gb


def _reference_backward(x, w, gy, with_bias=True):
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


# ---- fast CPU kernel (Numba) -------------------------------------------------------------------
# The "cpu" implementation: direct convolution compiled by Numba, the CPU twin of the tiled kernels
# in kernels/conv3x3.cu (conv3x3_forward_tiled, conv3x3_grad_input_tiled, conv3x3_grad_weight).
# Like the reference it works on the full-width grid (see the module docstring), so the innermost
# loop runs along a contiguous stretch of one image plane and LLVM turns it into AVX-512/AVX2
# vector instructions.
PIXELS_PER_TASK = 2048   # full-width output pixels per task of the forward/grad-input kernel
GW_PIXELS = 8192         # pixels per slice of the weight-gradient reduction
PAD_BELOW_PIXELS = 4096  # planes smaller than this are copied with zeros after them for gw


@numba.njit(inline="always")
def _weight_taps(w, c, ci, flip):
    """The 9 taps (ky, kx) in row-major order of the weight from input channel ci to output
    channel c; with ``flip`` the input gradient's: channel axes swapped, both spatial axes
    flipped, w[ci, c, 2-ky, 2-kx]. (Inlined into the kernel, where each tap is a choice between
    two loads; taking views w[ci, c] of the weight there instead made the whole kernel slower,
    bench/results/cpu_numba.md.)"""
    if flip:
        return (w[ci, c, 2, 2], w[ci, c, 2, 1], w[ci, c, 2, 0], w[ci, c, 1, 2], w[ci, c, 1, 1],
                w[ci, c, 1, 0], w[ci, c, 0, 2], w[ci, c, 0, 1], w[ci, c, 0, 0])
    return (w[c, ci, 0, 0], w[c, ci, 0, 1], w[c, ci, 0, 2], w[c, ci, 1, 0], w[c, ci, 1, 1],
            w[c, ci, 1, 2], w[c, ci, 2, 0], w[c, ci, 2, 1], w[c, ci, 2, 2])


@jit(fastmath={"contract"})
def _conv3x3_flat(x, w, b, y, rows, flip):
    """y[n,co,i,j] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * xf[n,ci,(i+ky)*W + j+kx], for i < y's
    height and j < y's width <= W, where xf is x's plane (H, W) read as one flat row of H*W values.

    With y's width W-2 this is the valid convolution; with width W, x = gy padded by
    ``_conv3x3_pad_grad`` and ``flip`` (the weight read as w[ci,co,2-ky,2-kx]: channel axes
    swapped, both spatial axes flipped) it is the input gradient, exactly as GRAD_INPUT = true in
    conv3x3_forward_tiled: the zeros that pad the rows of gy on the left and right are the same two
    columns seen from either side of the wrap-around.

    Mapping (compare the CUDA block of 8 channels x 16x32 pixels): one task = 3 output channels x
    ``rows`` output rows (about ``PIXELS_PER_TASK`` pixels) of one image; tasks are split over the
    cores by ``prange``, the 3 channels fastest so the tasks of one core share the same input rows
    in its L2 cache. Inside a task the 27 weights of the current input channel sit in registers
    (register blocking over output channels, like the CUDA thread's 16 accumulators) and the
    innermost loop runs over the task's pixels p: 16 consecutive p are one vector, so each
    iteration is 9 shifted loads of x, 27 fused multiply-adds into the 3 accumulators (3 loads and
    3 stores of a row held in L1), 16 pixels wide.

    Napkin math per vector: 27 FMA instructions (864 FLOP) for 15 memory operations; a Zen 4/5
    core issues 2 FMAs (and 2-3 loads) per cycle, so the loop is FMA-bound in principle (the
    measured rates are in bench/results/cpu_numba.md).

    The loop count is rounded up to whole vectors where the extra reads (<= 15 values past the
    task's last pixel) stay inside x; they only feed accumulator columns that are never copied
    to y. Elsewhere (the last task of the last plane) the loop stops at the plane's end."""
    n_, ci_, h, wd = x.shape
    co_, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    chunks = (ho + rows - 1) // rows
    groups = (co_ + 2) // 3
    plane = h * wd
    xf = x.reshape(n_, ci_, plane)
    for task in prange(n_ * chunks * groups):
        g = task % groups
        c = (task // groups) % chunks
        n = task // (groups * chunks)
        r0 = c * rows
        r1 = min(r0 + rows, ho)
        p0 = r0 * wd                       # first pixel of the task on the flat grid
        m = (r1 - r0) * wd                 # its pixels, wrap-around columns included
        mv = (m + LANES - 1) // LANES * LANES
        c0 = 3 * g             # 3 output channels, the last one repeated when 3 does not divide Co
        c1 = min(c0 + 1, co_ - 1)
        c2 = min(c0 + 2, co_ - 1)
        acc = np.empty((3, mv), np.float32)
        a0, a1, a2 = acc[0], acc[1], acc[2]
        a0[:] = b[c0]
        a1[:] = b[c1]
        a2[:] = b[c2]
        for ci in range(ci_):
            if (n * ci_ + ci) * plane + p0 + mv + 2 * wd + 2 <= x.size:
                mm = mv                    # whole vectors: the reads stay inside x
            else:
                mm = min(m, plane - 2 * wd - 2 - p0)   # exact: the reads stay inside the plane
            # the 27 weights of this input channel, held in registers during the pixel loop
            u0, u1, u2, u3, u4, u5, u6, u7, u8 = _weight_taps(w, c0, ci, flip)
            v0, v1, v2, v3, v4, v5, v6, v7, v8 = _weight_taps(w, c1, ci, flip)
            t0, t1, t2, t3, t4, t5, t6, t7, t8 = _weight_taps(w, c2, ci, flip)
            x0 = xf[n, ci, p0:]            # the three input rows of the kernel's rows ky = 0, 1, 2
            x1 = xf[n, ci, p0 + wd:]
            x2 = xf[n, ci, p0 + 2 * wd:]
            for p in range(mm):            # the vector loop: 16 pixels per iteration
                s0 = a0[p]
                s1 = a1[p]
                s2 = a2[p]
                e = x0[p]
                s0 += u0 * e; s1 += v0 * e; s2 += t0 * e   # noqa: E702
                e = x0[p + 1]
                s0 += u1 * e; s1 += v1 * e; s2 += t1 * e   # noqa: E702
                e = x0[p + 2]
                s0 += u2 * e; s1 += v2 * e; s2 += t2 * e   # noqa: E702
                e = x1[p]
                s0 += u3 * e; s1 += v3 * e; s2 += t3 * e   # noqa: E702
                e = x1[p + 1]
                s0 += u4 * e; s1 += v4 * e; s2 += t4 * e   # noqa: E702
                e = x1[p + 2]
                s0 += u5 * e; s1 += v5 * e; s2 += t5 * e   # noqa: E702
                e = x2[p]
                s0 += u6 * e; s1 += v6 * e; s2 += t6 * e   # noqa: E702
                e = x2[p + 1]
                s0 += u7 * e; s1 += v7 * e; s2 += t7 * e   # noqa: E702
                e = x2[p + 2]
                s0 += u8 * e; s1 += v8 * e; s2 += t8 * e   # noqa: E702
                a0[p] = s0
                a1[p] = s1
                a2[p] = s2
        for r in range(r1 - r0):           # drop the wrap-around columns
            y[n, c0, r0 + r, :] = a0[r * wd: r * wd + wo]
            y[n, c1, r0 + r, :] = a1[r * wd: r * wd + wo]
            y[n, c2, r0 + r, :] = a2[r * wd: r * wd + wo]


@jit(fastmath={"reassoc"})
def _conv3x3_pad_grad(gy, gp, gb):
    """gp[n,co] = gy[n,co] (Ho, W-2) placed at rows 2..Ho+1, columns 2..W-1 of a zero plane
    (Ho+5, W); gb[n,co] = the plane's sum (float64). One task per plane.

    gp serves both gradients: read from row 0 it is gy padded by 2 on every side for the input
    gradient (the left padding of row i is the right padding of row i-1 on the flat grid); read
    from flat offset 2W+2 it is gy on the full-width grid, zeros in the wrap-around columns, for
    the weight gradient. 3 zero rows at the bottom keep the vector loops' extra reads in the plane.
    (The CUDA kernels need no copy: their loads test the bounds, which costs GPU threads
    nothing.)"""
    n_, co_, ho, wo = gy.shape
    hp = gp.shape[2]
    for t in prange(n_ * co_):
        n = t // co_
        co = t % co_
        s = 0.0
        for i in range(hp):
            row = gp[n, co, i]
            if i < 2 or i >= ho + 2:
                row[:] = 0
            else:
                row[0] = 0
                row[1] = 0
                src = gy[n, co, i - 2]
                for j in range(wo):
                    row[j + 2] = src[j]
                    s += src[j]
        gb[n, co] = s


@jit(fastmath={"contract", "reassoc"})
def _conv3x3_grad_weight_flat(xf, gp, part, chunk):
    """part[n*slices+s, co, ci, ky*3+kx] = sum over the pixels p of slice s of
    g[n,co,p] * xf[n,ci,p + ky*W + kx], with g = gy on the full-width grid (gp from flat offset
    2W+2, zero in the wrap-around columns, so those pixels add nothing). xf holds x's planes
    flattened, (N, Ci, L) with L >= H*W (zeros after H*W when the caller padded them); H and W
    come from gp (H+3, W). gw = part summed over its first axis by the caller, in a fixed order:
    the result does not depend on the threads.

    Mapping (compare conv3x3_grad_weight: a block per (co, 4 input channels, pixel slice), a tree
    reduction in shared memory): one task = 2 output channels x one slice of ``chunk`` pixels
    (a multiple of 16) of one image; for each input channel the 18 sums (2 channels x 9 taps)
    are scalars that LLVM keeps as 18 vector registers of 16 partial sums each ("reassoc" lets
    it), reduced across the lanes after the loop. Per vector: 2 loads of g, 9 shifted loads of
    x, 18 FMAs; no stores.

    The loop is rounded up to whole vectors where the extra pixels stay inside both planes (g
    is zero there, gp has 3 zero rows at the bottom); else (the last slice of an unpadded plane)
    it stops exactly, after a scalar tail of at most 15 pixels: reading on into the next plane
    would multiply zeros of g by values that may be Inf or NaN. Small planes are therefore padded
    by the caller (the tail would be a large part of their work)."""
    n_, ci_, plane = xf.shape
    co_, wd = gp.shape[1], gp.shape[3]
    length = (gp.shape[2] - 5) * wd        # the full-width output grid: Ho = H - 2 rows
    slices = (length + chunk - 1) // chunk
    pairs = (co_ + 1) // 2
    gplane = gp.shape[2] * gp.shape[3]
    gf = gp.reshape(n_, co_, gplane)
    off = 2 * wd + 2
    for task in prange(n_ * slices * pairs):
        q = task % pairs
        s = (task // pairs) % slices
        n = task // (pairs * slices)
        p0 = s * chunk
        m = min(chunk, length - p0)
        mv = (m + LANES - 1) // LANES * LANES
        if p0 + mv + 2 * wd + 2 <= plane and off + p0 + mv <= gplane:
            mm = mv
        else:
            mm = min(m, plane - 2 * wd - 2 - p0)
        c0 = 2 * q
        c1 = min(c0 + 1, co_ - 1)
        g0 = gf[n, c0, off + p0:]
        g1 = gf[n, c1, off + p0:]
        k = n * slices + s
        for ci in range(ci_):
            x0 = xf[n, ci, p0:]
            x1 = xf[n, ci, p0 + wd:]
            x2 = xf[n, ci, p0 + 2 * wd:]
            s00 = s01 = s02 = s03 = s04 = s05 = s06 = s07 = s08 = np.float32(0.0)
            s10 = s11 = s12 = s13 = s14 = s15 = s16 = s17 = s18 = np.float32(0.0)
            for p in range(mm):
                d0 = g0[p]
                d1 = g1[p]
                e = x0[p]
                s00 += d0 * e; s10 += d1 * e   # noqa: E702
                e = x0[p + 1]
                s01 += d0 * e; s11 += d1 * e   # noqa: E702
                e = x0[p + 2]
                s02 += d0 * e; s12 += d1 * e   # noqa: E702
                e = x1[p]
                s03 += d0 * e; s13 += d1 * e   # noqa: E702
                e = x1[p + 1]
                s04 += d0 * e; s14 += d1 * e   # noqa: E702
                e = x1[p + 2]
                s05 += d0 * e; s15 += d1 * e   # noqa: E702
                e = x2[p]
                s06 += d0 * e; s16 += d1 * e   # noqa: E702
                e = x2[p + 1]
                s07 += d0 * e; s17 += d1 * e   # noqa: E702
                e = x2[p + 2]
                s08 += d0 * e; s18 += d1 * e   # noqa: E702
            pa = part[k, c0, ci]
            pa[0] = s00; pa[1] = s01; pa[2] = s02; pa[3] = s03; pa[4] = s04   # noqa: E702
            pa[5] = s05; pa[6] = s06; pa[7] = s07; pa[8] = s08                # noqa: E702
            pb = part[k, c1, ci]
            pb[0] = s10; pb[1] = s11; pb[2] = s12; pb[3] = s13; pb[4] = s14   # noqa: E702
            pb[5] = s15; pb[6] = s16; pb[7] = s17; pb[8] = s18                # noqa: E702


def _rows_per_task(height: int, width: int) -> int:
    """Output rows per task: about PIXELS_PER_TASK pixels, and the same number of rows in every
    task (``prange`` hands each thread one contiguous share of the tasks: with full chunks and
    one short last chunk, e.g. 35 + 21 rows on 2 threads, one core would do 5/8 of the work)."""
    chunks = -(-height * width // PIXELS_PER_TASK)
    return -(-height // chunks)


def cpu_forward(x, w, b=None, relu=False):
    """The fast CPU forward (float32; other dtypes go to the reference): ``_conv3x3_flat``, then
    with ``relu`` the ReLU in place."""
    if not all_float32(x, w, *(() if b is None else (b,))):
        return reference_forward(x, w, b, relu)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    y = np.empty((n, co, h - 2, wd - 2), np.float32)
    bias = np.zeros(co, np.float32) if b is None else np.ascontiguousarray(b)
    _conv3x3_flat(np.ascontiguousarray(x), np.ascontiguousarray(w), bias, y,
                  _rows_per_task(h - 2, wd), False)
    if relu:
        np.maximum(y, 0, out=y)
    return y


def cpu_backward(x, w, gy, with_bias=True, y=None, need_gx=True):
    """The fast CPU gradients (float32; other dtypes go to the reference): with ``y`` (fused ReLU)
    gy masked first (the ReLU's Numba kernel), gy padded once (``_conv3x3_pad_grad``, which also
    sums gb), gx = ``_conv3x3_flat`` on it reading the weights flipped and transposed (skipped
    when ``need_gx`` is False), gw = ``_conv3x3_grad_weight_flat`` (on x's planes padded by zeros
    when they are small, see there)."""
    if not all_float32(x, w, gy, *(() if y is None else (y,))):
        return reference_backward(x, w, gy, with_bias, y, need_gx)
    if y is not None:
        gy = relu_cpu_backward(np.ascontiguousarray(y), np.ascontiguousarray(gy))
    x, w, gy = np.ascontiguousarray(x), np.ascontiguousarray(w), np.ascontiguousarray(gy)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    gp = np.empty((n, co, h + 3, wd), np.float32)
    gb = np.empty((n, co), np.float64)
    _conv3x3_pad_grad(gy, gp, gb)
    gx = None
    if need_gx:
        gx = np.empty((n, ci, h, wd), np.float32)
        _conv3x3_flat(gp, w, np.zeros(ci, np.float32), gx, _rows_per_task(h, wd), True)
    length = (h - 2) * wd
    slices = -(-length // GW_PIXELS)
    chunk = -(-length // (slices * LANES)) * LANES        # equal slices, whole vectors
    part = np.empty((n * -(-length // chunk), co, ci, 9), np.float32)
    xf = x.reshape(n, ci, h * wd)
    if h * wd < PAD_BELOW_PIXELS:            # whole vectors to the end of every plane
        xf = np.concatenate([xf, np.zeros((n, ci, 2 * LANES), np.float32)], axis=2)
    _conv3x3_grad_weight_flat(xf, gp, part, chunk)
    gw = (part[0] if len(part) == 1 else part.sum(axis=0)).reshape(co, ci, 3, 3)
    return gx, gw, (gb.sum(axis=0).astype(np.float32) if with_bias else None)


# ---- the CUDA kernels (kernels/conv3x3.cu), on cuda and emu -------------------------------------
# Launch sizes come from the .cu file's #defines, so the grid always matches the kernel.
_CU = cu_defines(KERNEL_FILE)
TILE_W, TILE_H = _CU["TILE_W"], _CU["TILE_H"]           # output pixels per block of the tiled kernels
TILED_BLOCK = (_CU["TILE_W"], _CU["BLOCK_ROWS"], 1)     # 32 x 8 threads, each 2 rows x 8 channels
CO_PER_BLOCK = _CU["CO_PER_BLOCK"]                      # output channels per block
GW_THREADS, GW_CI = _CU["GW_THREADS"], _CU["GW_CI"]     # grad-weight block: threads, input channels


@dataclass(frozen=True)
class GemmShape:
    """One block shape of the implicit-GEMM kernels (v3 igemm, v4 wmma, v5 wmma_big): the kernel's name, its
    threads, output channels (BM), output rows x columns (TH x TW) and source channels per chunk."""
    kernel: str
    threads: int
    bm: int
    th: int
    tw: int
    ci: int


IGEMM_WIDE = GemmShape("conv3x3_igemm_wide", _CU["IGW_THREADS"], _CU["IGW_BM"], _CU["IGW_TH"], _CU["IGW_TW"],
                       _CU["IGW_CI"])
IGEMM_NARROW = GemmShape("conv3x3_igemm_narrow", _CU["IGN_THREADS"], _CU["IGN_BM"], _CU["IGN_TH"], _CU["IGN_TW"],
                         _CU["IGN_CI"])
IGEMM_DEEP = GemmShape("conv3x3_igemm_deep", _CU["IGD_THREADS"], _CU["IGD_BM"], _CU["IGD_TH"], _CU["IGD_TW"],
                       _CU["IGD_CI"])
WMMA = GemmShape("conv3x3_wmma", _CU["WM_THREADS"], _CU["WM_BM"], _CU["WM_TH"], _CU["WM_TW"], _CU["WM_CI"])
WMMA_NARROW = GemmShape("conv3x3_wmma_narrow", _CU["WM_THREADS"], _CU["WM_BM_NARROW"], _CU["WM_TH"], _CU["WM_TW"],
                        _CU["WM_CI"])
WMMA_BIG = GemmShape("conv3x3_wmma_big", _CU["WM_THREADS"], _CU["WB_BM"], _CU["WM_TH"], _CU["WM_TW"], _CU["WM_CI"])
GEMM_VERSIONS = ("igemm", "wmma", "wmma_big")
# A GEMM launch with fewer blocks than this splits its source channels (deterministically, see
# conv3x3_sum_splits): 2 blocks per SM of the 132-SM H200 the project measures on. A split keeps
# at least MIN_SPLIT_CHANNELS source channels (below that the partial sums cost more than they gain).
TARGET_BLOCKS = 2 * 132
MIN_SPLIT_CHANNELS = 16
# igemm takes the first of (wide, deep, narrow) whose padded work (tiles x tile pixels x channel
# blocks x block channels) is within this factor of the least padded: the wide tile reuses each
# loaded value most (napkin math in the .cu), so it may waste a little on the plane's edge.
PADDING_SLACK = 1.25


@dataclass(frozen=True)
class GemmPlan:
    """How one implicit-GEMM launch covers its output: ``shape``, ``grid`` (tiles, channel blocks,
    splits * N) and the split of the source channels (``splits`` parts of ``per_split``)."""
    shape: GemmShape
    grid: tuple[int, int, int]
    splits: int
    per_split: int


def gemm_plan(version: str, n: int, c_src: int, c_dst: int, h_dst: int, w_dst: int) -> GemmPlan:
    """The block shape and grid of an implicit-GEMM launch (v3 "igemm", v4 "wmma", v5 "wmma_big").

    igemm: the tile that wastes least on padding (output pixels past the plane's edge, channels
    past C_dst), preferring wide (32 channels x 8 x 32 pixels), then deep (64 x 8 x 8), then narrow
    (16 x 8 x 32) within PADDING_SLACK: wide for large planes with many channels, deep for U-Net's
    deep layers (small planes, many channels), narrow for large planes with few channels.
    Then, if the grid has fewer than TARGET_BLOCKS blocks, the source channels are split into
    parts of at least MIN_SPLIT_CHANNELS (a multiple of the chunk) so that the GPU is filled:
    e.g. 256 -> 256 channels on a 16 x 16 output: 16 blocks, 16 parts of 16 channels, 256 blocks."""
    def blocks_of(shape):
        return ceil_div(h_dst, shape.th) * ceil_div(w_dst, shape.tw), ceil_div(c_dst, shape.bm)

    def padded_work(shape):
        tiles, groups = blocks_of(shape)
        return tiles * shape.th * shape.tw * groups * shape.bm

    if version == "wmma":   # the 16-channel tile where 32 would be half padding
        shape = WMMA_NARROW if c_dst <= WMMA_NARROW.bm else WMMA
    elif version == "wmma_big":   # one tile, 64 channels (the tuner decides where it pays)
        shape = WMMA_BIG
    else:
        candidates = (IGEMM_WIDE, IGEMM_DEEP, IGEMM_NARROW)
        least = min(padded_work(c) for c in candidates)
        shape = next(c for c in candidates if padded_work(c) <= PADDING_SLACK * least)
    tiles, groups = blocks_of(shape)
    blocks = tiles * groups * n
    splits = 1
    if blocks < TARGET_BLOCKS:
        splits = max(1, min(ceil_div(TARGET_BLOCKS, blocks), c_src // MIN_SPLIT_CHANNELS))
    per_split = ceil_div(ceil_div(c_src, splits), shape.ci) * shape.ci
    splits = ceil_div(c_src, per_split)          # no empty part
    require(groups <= MAX_GRID_YZ and splits * n <= MAX_GRID_YZ,
            f"conv3x3: {n} images x {splits} channel splits or {c_dst} channels exceed the grid; "
            "use smaller batches")
    return GemmPlan(shape, (tiles, groups, splits * n), splits, per_split)


def tensor_cores(k) -> bool:
    """Whether conv3x3_wmma (and conv3x3_wmma_big) runs on tensor cores on this device (sm_80+ and <mma.h> found by the
    compiler; else it computes the same tiles with FP32 FMAs). Asked once per backend."""
    if getattr(k, "_conv3x3_tensor_cores", None) is None:
        flag = k.xp.zeros(1, dtype=k.xp.int32)
        k.launch(KERNEL_FILE, "conv3x3_wmma_enabled", (1,), (1,), (flag,))
        k._conv3x3_tensor_cores = bool(int(flag[0]))
    return k._conv3x3_tensor_cores


def conv3x3_version(k, case, grad_input: bool = False) -> str:
    """The kernel version of one launch of the layer ``case`` = (N, Ci, H, W, Co), its forward
    pass or (``grad_input``) its input gradient: ``k.conv3x3_version`` when forced, else ("auto"):

    - on ``cuda``: the version measured fastest for this layer on a GPU when the table of
      ``minunet.backends.choices`` holds it; else "wmma" when the precision is "tf32", the
      launch has at least WM_CI (8) source channels (the first layer, 1 channel, would fill 1/8
      of each tensor-core step) and the device has tensor cores; else "igemm", on every plane
      size. Neither is measured on a GPU
      yet: the choice follows their napkin math (kernels/conv3x3.cu). v1 naive is not kept for
      the small planes: in the H200 files of 2026-12-04 (bench/results/h200-2026-12-04/ncu16.csv)
      its advantage there came from v2 launching grids far smaller than one wave of blocks, which
      igemm's deep tile and channel split (``gemm_plan``: at least TARGET_BLOCKS blocks) remove.
      v5 "wmma_big" is never the rule's choice: only a table that measured it faster picks it.
    - on ``emu``: the emulator's own choice, for its speed (it is not a GPU): "wmma" under
      "tf32" as on cuda, else the v1/v2 rule (tiled when the plane fills one 16 x 32 tile, naive
      below), which runs fastest there.
    """
    version = k.conv3x3_version
    if version != "auto":
        return version
    measured = choices.choose(k, "conv3x3", KERNEL_FILE, case)
    if measured is not None:
        return measured
    n, ci, h, wd, co = case
    c_src, h_out, w_out = (co, h, wd) if grad_input else (ci, h - 2, wd - 2)
    if k.precision == "tf32" and c_src >= WMMA.ci and (k.device == "emu" or tensor_cores(k)):
        return "wmma"
    if k.device == "cuda":
        return "igemm"
    return "tiled" if h_out * w_out >= TILE_H * TILE_W else "naive"


def gemm_weights(k, w, grad_input: bool):
    """The weights as the implicit GEMM's A matrix, wt[t][s][d] (9, S_pad, D_pad), zero-padded
    (kernels/conv3x3.cu, conv3x3_gemm_weights): forward s = ci, d = co; input gradient s = co,
    d = ci with the taps flipped."""
    co, ci = w.shape[:2]
    s, d = (co, ci) if grad_input else (ci, co)
    s_pad = ceil_div(s, _CU["GEMM_S_ALIGN"]) * _CU["GEMM_S_ALIGN"]
    d_pad = ceil_div(d, _CU["GEMM_D_ALIGN"]) * _CU["GEMM_D_ALIGN"]
    wt = k.empty((9, s_pad, d_pad))
    k.launch_elementwise(KERNEL_FILE, "conv3x3_gemm_weights", wt.size,
                         (w, wt, *int32s(co, ci, s_pad, d_pad, int(grad_input))))
    return wt


def gemm_conv(k, version: str, src, w, bias, out_shape, grad_input: bool, relu: bool = False, mask=None):
    """One implicit-GEMM launch (v3 igemm, v4 wmma or v5 wmma_big), forward (src = x) or input gradient
    (src = gy, grad_input): returns (dst, masked) where masked = src * (mask > 0) when a ReLU
    ``mask`` is given (the kernel writes it while loading, for the weight gradient), else None."""
    n, c_src, h_src, w_src = src.shape
    c_dst, h_dst, w_dst = out_shape
    plan = gemm_plan(version, n, c_src, c_dst, h_dst, w_dst)
    wt = gemm_weights(k, w, grad_input)
    out = k.empty((n, c_dst, h_dst, w_dst))
    dst = out if plan.splits == 1 else k.empty((plan.splits, n, c_dst, h_dst, w_dst))
    masked = k.empty(src.shape) if mask is not None else None
    unused = k.xp.zeros(1, dtype=k.xp.float32)   # the kernel's pointer for an absent mask
    args = (src, unused if mask is None else mask, wt, bias, dst, unused if masked is None else masked,
            *int32s(n, c_src, h_src, w_src, c_dst, h_dst, w_dst, 2 if grad_input else 0,
                    wt.shape[1], wt.shape[2], plan.per_split, int(relu), int(mask is not None)))
    k.launch(KERNEL_FILE, plan.shape.kernel, plan.grid, (plan.shape.threads,), args)
    if plan.splits > 1:
        sizes = int32s(plan.splits, out.size, c_dst, h_dst * w_dst, int(relu))
        k.launch_elementwise(KERNEL_FILE, "conv3x3_sum_splits", out.size, (dst, bias, out, *sizes))
    return out, masked


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


def use_tiled(k, h_out: int, w_out: int) -> bool:
    """Whether a v1/v2 launch runs the tiled kernel: forced by ``k.conv3x3_version``, else when
    the output plane fills at least one tile. Below that (U-Net's deep 4x4 to 18x18 planes)
    most threads of a 16 x 32 tile would have no pixel, and the naive kernel's one thread per
    output element spreads the same work over more threads."""
    version = k.conv3x3_version
    return version == "tiled" or (version in ("auto", "tiled") and h_out * w_out >= TILE_H * TILE_W)


def kernels_forward(k, x, w, b=None, relu=False):
    x, w, (n, ci, h, wd, co) = _kernel_args(k, x, w)
    b = k.bias(b, co)
    version = conv3x3_version(k, (n, ci, h, wd, co))
    if version in GEMM_VERSIONS:   # bias and ReLU in the kernel's store
        return gemm_conv(k, version, x, w, b, (co, h - 2, wd - 2), False, relu)[0]
    y = k.empty((n, co, h - 2, wd - 2))
    args = (x, w, b, y, *int32s(n, ci, h, wd, co))
    if version == "tiled":
        k.launch(KERNEL_FILE, "conv3x3_forward_tiled", tiled_grid(n, co, h - 2, wd - 2), TILED_BLOCK, args)
    else:
        k.launch_elementwise(KERNEL_FILE, "conv3x3_forward_naive", y.size, args)
    return k.relu_forward(y) if relu else y   # v1/v2 stay as they were: the ReLU as its own pass


def kernels_backward(k, x, w, gy, with_bias=True, y=None, need_gx=True):
    """(gx, gw, gb); ``y``: the output of a fused conv + ReLU (its zeros mask gy); ``need_gx``
    False (the network's input): gx is None and no input-gradient kernel runs."""
    x, w, (n, ci, h, wd, co) = _kernel_args(k, x, w)
    gy = k.floats(gy, "gy", 4)
    require(gy.shape == (n, co, h - 2, wd - 2),
            f"conv3x3 gy has shape {tuple(gy.shape)}; expected the output's {(n, co, h - 2, wd - 2)}")
    dims = int32s(n, ci, h, wd, co)
    version = conv3x3_version(k, (n, ci, h, wd, co), grad_input=True) if need_gx else None
    if y is not None:
        y = k.floats(y, "y", 4)
        require(y.shape == gy.shape, f"conv3x3 y has shape {tuple(y.shape)}; expected gy's {tuple(gy.shape)}")
        if version not in GEMM_VERSIONS:   # no GEMM input gradient to fuse the mask into
            gy, y = k.relu_backward(y, gy), None
    gx = None
    if version in GEMM_VERSIONS:
        # gy * (y > 0) on load; the kernel also writes that masked gy for the weight gradient
        gx, masked = gemm_conv(k, version, gy, w, k.bias(None, ci), (ci, h, wd), True, mask=y)
        gy = gy if masked is None else masked
    elif version == "tiled":
        gx = k.empty(x.shape)
        k.launch(KERNEL_FILE, "conv3x3_grad_input_tiled", tiled_grid(n, ci, h, wd), TILED_BLOCK,
                 (gy, w, gx, *dims))
    elif version == "naive":
        gx = k.empty(x.shape)
        k.launch_elementwise(KERNEL_FILE, "conv3x3_grad_input_naive", gx.size, (gy, w, gx, *dims))
    gw, gb = k.grad_weight(KERNEL_FILE, "conv3x3_grad_weight", GW_THREADS, co * ceil_div(ci, GW_CI),
                           n * (h - 2) * (wd - 2), w.shape, co, (x, gy), (n, ci, h, wd, co),
                           gemm=(co, ci * 9), case=(n, ci, h, wd, co))   # gw as a (Co x Ci*9) matrix
    return gx, gw, gb if with_bias else None


# ---- registry entry: implementations, test and benchmark cases ----------------------------------
IMPLEMENTATIONS = {
    "conv3x3_forward": {"reference": reference_forward, "cpu": cpu_forward,
                        "kernels": kernels_forward},
    "conv3x3_backward": {"reference": reference_backward, "cpu": cpu_backward,
                         "kernels": kernels_backward},
}

# (N, Ci, H, W, Co): the smallest input; odd sizes; Ci > 8 and Co > 8 (two channel chunks/groups,
# the second partly empty); an output 16 rows tall and 33 wide (exactly one tile row, two tile
# columns); an output taller than one tile; 3 x 3 tiles and 3 channel chunks/groups per image;
# rows of 131 outputs, wider than the weight-gradient block's 128 threads (its pixel stepping
# then moves by whole rows less often than by columns).
TEST_CASES = [(1, 1, 3, 3, 1), (2, 3, 9, 11, 5), (1, 9, 18, 35, 10), (3, 2, 20, 7, 3),
              (2, 17, 37, 70, 17), (2, 3, 5, 133, 2)]
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
