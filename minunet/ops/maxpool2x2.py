"""2x2 max-pooling with stride 2 (paper Fig. 1, red arrows): everything Python about it.

    y[n,c,i,j] = max of x[n,c,2i:2i+2,2j:2j+2];  (N,C,H,W) -> (N,C,H//2,W//2), floor like PyTorch

The forward also returns ``argmax`` (uint8, dy*2+dx of the winning pixel in its window: first in
row-major order on ties, a NaN beats every number, the first NaN among NaNs), and the backward
routes each output gradient to that one pixel (docs/backends.md). This module holds the op and
its autograd Function, the NumPy reference, the fast CPU kernels (Numba), the launcher of
``kernels/maxpool2x2.cu``, and the registry entry.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .. import backends
from ..autograd import Function
from ..backends.kernels import int32s, require
from ..tensor import Tensor
from .checks import check_tensor
from .numba_config import all_float32, jit

KERNEL_FILE = "maxpool2x2"


# ---- the op ------------------------------------------------------------------------------------
class MaxPool2x2(Function):
    def forward(self, x):
        y, self.argmax = backends.get_backend(self.device).max_pool2x2_forward(x)
        self.x_shape = x.shape
        return y

    def backward(self, gy):
        return (backends.get_backend(self.device).max_pool2x2_backward(gy, self.argmax, self.x_shape),)


def max_pool2x2(x: Tensor) -> Tensor:
    """2x2 max-pooling with stride 2: (N,C,H,W) -> (N,C,H//2,W//2); the gradient goes to the max."""
    check_tensor("x", x, 4)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"max_pool2x2: the input must be at least 2x2, got shape {x.shape}")
    return MaxPool2x2.apply(x)


# ---- the NumPy reference (the oracle) ----------------------------------------------------------
def _corners(x: np.ndarray) -> list[np.ndarray]:
    """The four strided views x[..., dy::2, dx::2] in the order (0,0), (0,1), (1,0), (1,1),
    each cut to (H//2, W//2): pixel k of every 2x2 window, for all windows at once."""
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    return [x[:, :, dy: 2 * ho: 2, dx: 2 * wo: 2] for dy in (0, 1) for dx in (0, 1)]


def reference_forward(x):
    """(y, argmax): y the window maxima, argmax = dy*2+dx of the first max, as uint8.

    A small tournament over the four window corners c0..c3 (all windows at once): the winner of
    (c0, c1), the winner of (c2, c3), then the final. Every comparison is a strict ``>``, so on
    ties the earlier corner in row-major order wins (the convention the kernel follows too).
    A NaN beats any number (as in PyTorch: a NaN in the input shows up in the output instead of
    vanishing) and the first NaN wins among NaNs: ``np.maximum`` already puts the NaN in y, and
    the rare windows whose maximum is NaN get their argmax fixed afterwards, which keeps the
    common case as fast as without NaN handling."""
    c0, c1, c2, c3 = _corners(x)
    top, top_idx = np.maximum(c0, c1), (c1 > c0).astype(np.uint8)
    bottom, bottom_idx = np.maximum(c2, c3), (c3 > c2).astype(np.uint8) + np.uint8(2)
    bottom_wins = bottom > top
    y = np.maximum(top, bottom)
    argmax = np.where(bottom_wins, bottom_idx, top_idx)
    nan = np.isnan(y)
    if nan.any():
        argmax[nan] = np.select([np.isnan(c[nan]) for c in (c0, c1, c2)], [0, 1, 2], 3)
    return y, argmax


def reference_backward(gy, argmax, x_shape):
    """Route each output gradient to the input pixel that was the max; zero elsewhere (also in
    an odd last row/column, which the floor dropped)."""
    gx = np.zeros(x_shape, dtype=gy.dtype)
    for k, corner in enumerate(_corners(gx)):
        np.multiply(gy, argmax == k, out=corner)
    return gx


# ---- fast CPU kernel (Numba) -------------------------------------------------------------------
# The "cpu" implementation, the CPU twin of kernels/maxpool2x2.cu (one CUDA thread per output
# pixel there; one task per (n, c) plane here, its output rows in order, vectorised along a row).


@jit()
def _max_pool2x2(x, y, argmax):
    """y[n,c,i,j] = max of the window x[n,c,2i:2i+2,2j:2j+2], argmax = dy*2+dx of the winner:
    the corners scanned in row-major order with a strict ``>`` (ties: the first), a NaN beating
    every number and the first NaN winning (``v != v`` is true only for NaN). Branch-free
    selects, so LLVM vectorises the row loop (the stride-2 loads become shuffles)."""
    n_, c_ = x.shape[0], x.shape[1]
    ho, wo = y.shape[2], y.shape[3]
    for t in prange(n_ * c_):
        n = t // c_
        c = t % c_
        for i in range(ho):
            top = x[n, c, 2 * i]
            bottom = x[n, c, 2 * i + 1]
            yr = y[n, c, i]
            ar = argmax[n, c, i]
            for j in range(wo):
                best = top[2 * j]
                k = 0
                v = top[2 * j + 1]
                take = v > best or (v != v and best == best)
                best = v if take else best
                k = 1 if take else k
                v = bottom[2 * j]
                take = v > best or (v != v and best == best)
                best = v if take else best
                k = 2 if take else k
                v = bottom[2 * j + 1]
                take = v > best or (v != v and best == best)
                best = v if take else best
                k = 3 if take else k
                yr[j] = best
                ar[j] = k


@jit()
def _max_pool2x2_backward(gy, argmax, gx):
    """gx[n,c,2i+dy,2j+dx] = gy[n,c,i,j] where dy*2+dx = argmax[n,c,i,j], else 0 (also in an odd
    last row/column). One task per plane; every gx element is written once, in order."""
    n_, c_, h, w = gx.shape
    ho, wo = gy.shape[2], gy.shape[3]
    for t in prange(n_ * c_):
        n = t // c_
        c = t % c_
        for i in range(ho):
            g = gy[n, c, i]
            a = argmax[n, c, i]
            top = gx[n, c, 2 * i]
            bottom = gx[n, c, 2 * i + 1]
            for j in range(wo):
                k = a[j]
                v = g[j]
                top[2 * j] = v if k == 0 else 0
                top[2 * j + 1] = v if k == 1 else 0
                bottom[2 * j] = v if k == 2 else 0
                bottom[2 * j + 1] = v if k == 3 else 0
            if w % 2 == 1:
                top[w - 1] = 0
                bottom[w - 1] = 0
        if h % 2 == 1:
            gx[n, c, h - 1, :] = 0


def cpu_forward(x):
    """The fast CPU forward (float32; other dtypes go to the reference): ``_max_pool2x2``."""
    if not all_float32(x):
        return reference_forward(x)
    n, c, h, w = x.shape
    y = np.empty((n, c, h // 2, w // 2), np.float32)
    argmax = np.empty(y.shape, np.uint8)
    _max_pool2x2(np.ascontiguousarray(x), y, argmax)
    return y, argmax


def cpu_backward(gy, argmax, x_shape):
    """The fast CPU backward (float32; other dtypes go to the reference):
    ``_max_pool2x2_backward``."""
    if not (all_float32(gy) and isinstance(argmax, np.ndarray) and argmax.dtype == np.uint8):
        return reference_backward(gy, argmax, x_shape)
    gx = np.empty(tuple(x_shape), np.float32)
    _max_pool2x2_backward(np.ascontiguousarray(gy), np.ascontiguousarray(argmax), gx)
    return gx


# ---- the CUDA kernels (kernels/maxpool2x2.cu): one thread per output / input element -------------
def kernels_forward(k, x):
    x = k.floats(x, "x", 4)
    n, c, h, wd = x.shape
    y = k.empty((n, c, h // 2, wd // 2))
    argmax = k.empty(y.shape, np.uint8)
    k.launch_elementwise(KERNEL_FILE, "maxpool2x2_forward", y.size, (x, y, argmax, *int32s(n, c, h, wd)))
    return y, argmax


def kernels_backward(k, gy, argmax, x_shape):
    x_shape = tuple(int(s) for s in x_shape)
    require(len(x_shape) == 4, f"x_shape must be (N, C, H, W), got {x_shape}")
    n, c, h, wd = x_shape
    out_shape = (n, c, h // 2, wd // 2)
    gy = k.floats(gy, "gy", 4)
    argmax = k.xp.ascontiguousarray(k.xp.asarray(argmax, dtype=k.xp.uint8))
    require(gy.shape == out_shape and argmax.shape == out_shape,
            f"max_pool2x2 gy {tuple(gy.shape)} and argmax {tuple(argmax.shape)} must both have "
            f"the pooled shape {out_shape} of x_shape {x_shape}")
    gx = k.empty(x_shape)
    k.launch_elementwise(KERNEL_FILE, "maxpool2x2_backward", gx.size, (gy, argmax, gx, *int32s(n, c, h, wd)))
    return gx


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "max_pool2x2_forward": {"reference": reference_forward, "cpu": cpu_forward, "kernels": kernels_forward},
    "max_pool2x2_backward": {"reference": reference_backward, "cpu": cpu_backward, "kernels": kernels_backward},
}
TEST_CASES = [(1, 1, 2, 2), (2, 3, 9, 11), (3, 2, 8, 7), (1, 4, 1, 5)]   # (N, C, H, W), odd sizes
TOLERANCE = dict(rtol=0.0, atol=0.0)  # selects values: exact, argmax included


def example(rng, case, dtype=np.float32) -> dict:
    """Small integers, so most windows have ties; the backward gets the reference's argmax."""
    x = rng.integers(0, 3, case).astype(dtype)
    _, argmax = reference_forward(x)
    gy = rng.standard_normal(argmax.shape).astype(dtype)
    return {"max_pool2x2_forward": (x,), "max_pool2x2_backward": (gy, argmax, case)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The first pooling of a U-Net with ``base`` channels on a ``tile`` input."""
    return [(batch, base, tile - 4, tile - 4)]


def cost(case) -> dict:
    n, c, h, wd = case
    x, y = n * c * h * wd, n * c * (h // 2) * (wd // 2)
    return {"max_pool2x2_forward": (3.0 * y, 4.0 * x + 5.0 * y),     # 3 comparisons per window
            "max_pool2x2_backward": (0.0, 4.0 * x + 5.0 * y)}


def torch_forward(torch, x):
    """PyTorch's twin of the forward, for the benchmark's comparison."""
    return torch.nn.functional.max_pool2d(x, 2)


TORCH_TWINS = {"max_pool2x2_forward": torch_forward}   # function -> PyTorch twin (the backward is timed through it)
