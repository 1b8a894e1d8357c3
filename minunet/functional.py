"""The differentiable ops of the U-Net, on any device.

Each op is an autograd Function whose forward and backward call the backend of the tensors'
device (``minunet.backends.get_backend``): the NumPy reference on ``cpu``, the CUDA kernels on
``cuda`` and ``emu``. This module's own job is the contract: it checks shapes, dtypes and devices
and raises one clear error naming both shapes, so a mistake never reaches a kernel.
"""
from __future__ import annotations

import numpy as np

from .autograd import Function
from .backends import get_backend
from .tensor import Tensor

__all__ = ["conv3x3", "max_pool2x2", "conv_transpose2x2", "crop_concat", "conv1x1", "relu",
           "dropout", "weighted_cross_entropy"]


# ---- argument checks ---------------------------------------------------------------------------
def _check_tensor(name: str, value, ndim: int | None = None, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a minunet.Tensor, got {type(value).__name__}; "
                        f"wrap it with mu.Tensor(...)")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
    if floating and value.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    return value


def _check_same(op: str, tensors: dict) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device!r}" for k, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}; use .to(device)")
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{k} {t.dtype}" for k, t in present.items())
        raise TypeError(f"{op}: all tensors must have one dtype, got {what}")


def _check_conv(op: str, x, w, b, kernel: tuple[int, int], transposed: bool = False) -> None:
    _check_tensor("x", x, 4)
    _check_tensor("w", w, 4)
    if b is not None:
        _check_tensor("b", b, 1)
    _check_same(op, {"x": x, "w": w, "b": b})
    ci_w = w.shape[0] if transposed else w.shape[1]
    co = w.shape[1] if transposed else w.shape[0]
    layout = "(Ci, Co, 2, 2)" if transposed else f"(Co, Ci, {kernel[0]}, {kernel[1]})"
    if tuple(w.shape[2:]) != kernel:
        raise ValueError(f"{op}: w must have layout {layout}, got shape {w.shape}")
    if ci_w != x.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels (shape {x.shape}) but w expects "
                         f"{ci_w} (shape {w.shape})")
    if b is not None and b.shape != (co,):
        raise ValueError(f"{op}: b must have shape ({co},) for w of shape {w.shape}, got {b.shape}")


# ---- 3x3 valid convolution (paper Fig. 1, blue arrows) -----------------------------------------
class _Conv3x3(Function):
    def forward(self, x, w, b):
        self.x, self.w, self.has_b = x, w, b is not None
        return get_backend(self.device).conv3x3_forward(x, w, b)

    def backward(self, gy):
        gx, gw, gb = get_backend(self.device).conv3x3_backward(self.x, self.w, gy, self.has_b)
        return gx, gw, gb


def conv3x3(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Valid (unpadded) 3x3 convolution: (N,Ci,H,W) -> (N,Co,H-2,W-2); w is (Co,Ci,3,3)."""
    _check_conv("conv3x3", x, w, b, (3, 3))
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"conv3x3: the input must be at least 3x3, got shape {x.shape}")
    return _Conv3x3.apply(x, w, b)


# ---- 2x2 max-pooling (red arrows) --------------------------------------------------------------
class _MaxPool2x2(Function):
    def forward(self, x):
        y, self.argmax = get_backend(self.device).max_pool2x2_forward(x)
        self.x_shape = x.shape
        return y

    def backward(self, gy):
        return (get_backend(self.device).max_pool2x2_backward(gy, self.argmax, self.x_shape),)


def max_pool2x2(x: Tensor) -> Tensor:
    """2x2 max-pooling with stride 2: (N,C,H,W) -> (N,C,H//2,W//2); the gradient goes to the max."""
    _check_tensor("x", x, 4)
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"max_pool2x2: the input must be at least 2x2, got shape {x.shape}")
    return _MaxPool2x2.apply(x)


# ---- 2x2 up-convolution (green arrows) ---------------------------------------------------------
class _ConvTranspose2x2(Function):
    def forward(self, x, w, b):
        self.x, self.w, self.has_b = x, w, b is not None
        return get_backend(self.device).conv_transpose2x2_forward(x, w, b)

    def backward(self, gy):
        return get_backend(self.device).conv_transpose2x2_backward(self.x, self.w, gy, self.has_b)


def conv_transpose2x2(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Stride-2 2x2 transposed convolution: (N,Ci,H,W) -> (N,Co,2H,2W); w is (Ci,Co,2,2)."""
    _check_conv("conv_transpose2x2", x, w, b, (2, 2), transposed=True)
    return _ConvTranspose2x2.apply(x, w, b)


# ---- crop and concatenate (grey arrows) --------------------------------------------------------
class _CropConcat(Function):
    def forward(self, skip, up):
        self.skip_shape, self.up_shape = skip.shape, up.shape
        return get_backend(self.device).crop_concat_forward(skip, up)

    def backward(self, gy):
        return get_backend(self.device).crop_concat_backward(gy, self.skip_shape, self.up_shape)


def crop_concat(skip: Tensor, up: Tensor) -> Tensor:
    """Center-crop ``skip`` to ``up``'s H, W and concatenate [cropped skip, up] on channels."""
    _check_tensor("skip", skip, 4)
    _check_tensor("up", up, 4)
    _check_same("crop_concat", {"skip": skip, "up": up})
    if skip.shape[0] != up.shape[0]:
        raise ValueError(f"crop_concat: batch sizes differ, skip {skip.shape} vs up {up.shape}")
    if skip.shape[2] < up.shape[2] or skip.shape[3] < up.shape[3]:
        raise ValueError(f"crop_concat: skip {skip.shape} is smaller than up {up.shape} in H or W; "
                         f"the skip connection must be at least as large as the upsampled map")
    return _CropConcat.apply(skip, up)


# ---- 1x1 convolution (the classifier) ----------------------------------------------------------
class _Conv1x1(Function):
    def forward(self, x, w, b):
        self.x, self.w, self.has_b = x, w, b is not None
        return get_backend(self.device).conv1x1_forward(x, w, b)

    def backward(self, gy):
        return get_backend(self.device).conv1x1_backward(self.x, self.w, gy, self.has_b)


def conv1x1(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """1x1 convolution, a per-pixel linear map of channels; w is (Co,Ci,1,1)."""
    _check_conv("conv1x1", x, w, b, (1, 1))
    return _Conv1x1.apply(x, w, b)


# ---- ReLU --------------------------------------------------------------------------------------
class _ReLU(Function):
    def forward(self, x):
        self.y = get_backend(self.device).relu_forward(x)
        return self.y

    def backward(self, gy):
        return (get_backend(self.device).relu_backward(self.y, gy),)


def relu(x: Tensor) -> Tensor:
    """max(x, 0), elementwise."""
    _check_tensor("x", x)
    return _ReLU.apply(x)


# ---- dropout -----------------------------------------------------------------------------------
class _Dropout(Function):
    def forward(self, x, p, seed):
        self.p = p
        y, self.mask = get_backend(self.device).dropout_forward(x, p, seed)
        return y

    def backward(self, gy):
        return get_backend(self.device).dropout_backward(gy, self.mask, self.p), None, None


_default_seed = np.random.default_rng()


def dropout(x: Tensor, p: float, training: bool, seed: int | None = None) -> Tensor:
    """Inverted dropout: in training zero each element with probability ``p`` and scale the rest
    by 1/(1-p); at inference the identity. The mask is a hash of (seed, element index), so all
    devices draw the same mask for the same seed (docs/backends.md); ``seed=None`` draws one."""
    _check_tensor("x", x)
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = int(_default_seed.integers(0, 2**32))
    return _Dropout.apply(x, float(p), int(seed) & 0xFFFFFFFF)


# ---- weighted softmax cross-entropy (eq. 1) ----------------------------------------------------
class _WeightedCrossEntropy(Function):
    def forward(self, logits, target, weight):
        loss, self.grad_logits = get_backend(self.device).weighted_cross_entropy_forward(
            logits, target, weight)
        return loss

    def backward(self, g):
        return self.grad_logits * g, None, None


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """The paper's energy (eq. 1): mean over pixels of w(x) * -log softmax(logits)[target(x)].

    logits (N,C,H,W) float; target (N,H,W) integer class indices in [0, C); weight (N,H,W) float
    or None (all ones), a constant: the gradient flows to the logits only. Returns a scalar tensor."""
    _check_tensor("logits", logits, 4)
    _check_tensor("target", target, 3, floating=False)
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if weight is not None:
        _check_tensor("weight", weight, 3)
        if weight.requires_grad:
            raise ValueError("weighted_cross_entropy: the weight map is a constant of the loss "
                             "(eq. 2 is computed from the labels) and gets no gradient; pass it "
                             "with requires_grad=False")
    _check_same("weighted_cross_entropy", {"logits": logits, "weight": weight})
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
    return _WeightedCrossEntropy.apply(logits, target_i32, weight)
