"""The weighted softmax cross-entropy, U-Net's energy function (paper Section 3, eq. 1):

    E = mean over pixels x of  w(x) * -log softmax(logits)[target(x)]

fused with its gradient (the forward returns both; the backward only scales the stored gradient).
Everything Python about it: the op and its autograd Function, the NumPy reference, the launcher of
``kernels/cross_entropy.cu`` (plus reduce.cu's mean), and the registry entry.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from ..autograd import Function
from ..backends.kernels import int32s, require
from ..tensor import Tensor
from .checks import check_same, check_tensor

KERNEL_FILE = "cross_entropy"


# ---- the op ------------------------------------------------------------------------------------
class WeightedCrossEntropy(Function):
    def forward(self, logits, target, weight):
        loss, self.grad_logits = backends.get_backend(self.device).weighted_cross_entropy_forward(
            logits, target, weight)
        return loss

    def backward(self, g):
        # grad_logits * g as the device's grad_scale: a kernel on cuda and emu (minunet.step_graph)
        return backends.get_backend(self.device).grad_scale(self.grad_logits, g), None, None


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """The paper's energy (eq. 1): mean over pixels of w(x) * -log softmax(logits)[target(x)].

    logits (N,C,H,W) float; target (N,H,W) integer class indices in [0, C); weight (N,H,W) float
    or None (all ones), a constant: the gradient flows to the logits only. Returns a scalar tensor."""
    check_tensor("logits", logits, 4)
    check_tensor("target", target, 3, floating=False)
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if weight is not None:
        check_tensor("weight", weight, 3)
        if weight.requires_grad:
            raise ValueError("weighted_cross_entropy: the weight map is a constant of the loss "
                             "(eq. 2 is computed from the labels) and gets no gradient; pass it "
                             "with requires_grad=False")
    check_same("weighted_cross_entropy", {"logits": logits, "weight": weight})
    if target.device != logits.device:
        raise ValueError(f"weighted_cross_entropy: target is on {target.device!r} but logits on "
                         f"{logits.device!r}; use .to(device)")
    n, c, h, w = logits.shape
    if target.shape != (n, h, w):
        raise ValueError(f"weighted_cross_entropy: target must have shape (N,H,W) = {(n, h, w)} "
                         f"for logits {logits.shape}, got {target.shape}")
    if weight is not None and weight.shape != (n, h, w):
        raise ValueError(f"weighted_cross_entropy: weight must have shape {(n, h, w)} for logits "
                         f"{logits.shape}, got {weight.shape}")
    low, high = int(target.data.min()), int(target.data.max())
    if low < 0 or high >= c:
        raise ValueError(f"weighted_cross_entropy: target values must be class indices in [0, {c - 1}] "
                         f"for {c} classes, found {low}..{high}")
    target_i32 = target if target.dtype == np.int32 else \
        Tensor._from_array(target.data.astype(np.int32), target.device)
    return WeightedCrossEntropy.apply(logits, target_i32, weight)


# ---- the NumPy reference (the oracle) ----------------------------------------------------------
def reference_forward(logits, target, weight=None):
    """loss = mean_x w(x) * -log softmax(logits)[target(x)], and d loss / d logits.

    Stable: subtracting the per-pixel channel max keeps exp() <= 1, so logits of magnitude 100
    neither overflow nor lose the answer (log-sum-exp)."""
    n, c, h, w = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    sum_e = e.sum(axis=1)                                     # (N, H, W), >= 1
    idx = target.astype(np.intp)[:, None]
    z_target = np.take_along_axis(z, idx, axis=1)[:, 0]
    nll = np.log(sum_e) - z_target                            # -log p_target(x)
    wmap = np.ones((n, h, w), logits.dtype) if weight is None else weight.astype(logits.dtype)
    npix = n * h * w
    loss = np.asarray((wmap * nll).sum() / npix, dtype=logits.dtype)
    grad = e / sum_e[:, None]                                 # softmax
    np.put_along_axis(grad, idx, np.take_along_axis(grad, idx, axis=1) - 1, axis=1)
    grad *= (wmap / npix)[:, None]
    return loss, grad


# ---- the CUDA kernels (kernels/cross_entropy.cu, then reduce.cu's mean) -------------------------
def kernels_forward(k, logits, target, weight=None):
    xp = k.xp
    logits = k.floats(logits, "logits", 4)
    n, c, h, wd = logits.shape
    target = xp.ascontiguousarray(xp.asarray(target, dtype=xp.int32))
    require(target.shape == (n, h, wd), f"target has shape {tuple(target.shape)}; expected {(n, h, wd)}")
    if weight is None:
        weight = xp.ones((n, h, wd), dtype=xp.float32)
    weight = k.floats(weight, "weight")
    require(weight.shape == (n, h, wd), f"weight has shape {tuple(weight.shape)}; expected {(n, h, wd)}")
    pixels = n * h * wd
    require(pixels > 0 and c > 0, f"cross-entropy needs at least one pixel and class, got {tuple(logits.shape)}")
    per_pixel, grad = k.empty((pixels,)), k.empty(logits.shape)
    # one thread per pixel: its loss term and all C gradient entries (fused)
    k.launch_elementwise(KERNEL_FILE, "cross_entropy_forward", pixels,
                         (logits, target, weight, per_pixel, grad, *int32s(n, c, h * wd),
                          np.float32(1.0 / pixels)))
    return k.mean(per_pixel, pixels), grad


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "weighted_cross_entropy_forward": {"reference": reference_forward, "kernels": kernels_forward},
}
# ((N, C, H, W), logit scale, weighted): scale 100 would overflow exp() without the max shift
TEST_CASES = [((1, 2, 1, 1), 1.0, False), ((2, 3, 7, 9), 100.0, True), ((3, 2, 20, 21), 5.0, True),
              ((1, 5, 13, 11), 100.0, False)]


def tolerance(function: str, case) -> dict:
    """Loss and gradient to 1e-4 relative; gradient entries are O(w / (N*H*W)), so the absolute
    tolerance scales with 1 / (N*H*W)."""
    (n, _, h, w), _, _ = case
    return dict(rtol=1e-4, atol=1e-5 / (n * h * w))


def example(rng, case, dtype=np.float32) -> dict:
    shape, scale, weighted = case
    n, c, h, w = shape
    logits = (scale * rng.standard_normal(shape)).astype(dtype)
    target = rng.integers(0, c, (n, h, w)).astype(np.int32)
    weight = rng.uniform(0.1, 10.0, (n, h, w)).astype(dtype) if weighted else None
    return {"weighted_cross_entropy_forward": (logits, target, weight)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The loss of a U-Net on a ``tile`` input: 2 classes, eq. 2 weights."""
    out = tile - 184 if tile > 184 else 0
    return [((batch, 2, out, out), 1.0, True)] if out > 0 else []


def cost(case) -> dict:
    (n, c, h, w), _, _ = case
    pixels = n * h * w
    # per pixel and class: max, exp, sum, softmax and gradient, ~10 FLOPs
    return {"weighted_cross_entropy_forward": (10.0 * pixels * c, 4.0 * pixels * (2 * c + 2))}
