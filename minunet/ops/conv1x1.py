"""The 1x1 convolution, U-Net's final classifier layer (paper Section 2: "a 1x1 convolution is
used to map each 64-component feature vector to the desired number of classes"): everything
Python about it.

    y[n,co,p] = b[co] + sum_ci w[co,ci] * x[n,ci,p]     x (N,Ci,H,W), w (Co,Ci,1,1) -> (N,Co,H,W)

This module holds the op and its autograd Function, the NumPy reference, the launcher of
``kernels/conv1x1.cu``, and the registry entry.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from ..autograd import Function
from ..backends.kernels import ceil_div, int32s, require
from ..backends.sources import cu_defines
from ..tensor import Tensor
from .checks import check_conv

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
    gw = k.grad_weight(KERNEL_FILE, "conv1x1_grad_weight", GW_THREADS, co * ceil_div(ci, GW_CI),
                       n * p, w.shape, (x, gy), (n, ci, p, co))
    gb = k.channel_sum(gy) if with_bias else None
    return gx, gw, gb


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "conv1x1_forward": {"reference": reference_forward, "kernels": kernels_forward},
    "conv1x1_backward": {"reference": reference_backward, "kernels": kernels_backward},
}
TEST_CASES = [(1, 1, 1, 1, 1), (2, 10, 5, 7, 3), (3, 17, 4, 9, 2)]   # (N, Ci, H, W, Co)
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
