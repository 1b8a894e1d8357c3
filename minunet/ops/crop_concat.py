"""Crop and concatenate, the skip connections of U-Net (paper Fig. 1, grey arrows): everything
Python about it.

The contracting path's feature map ``skip`` (N,Cs,Hs,Ws) is larger than the upsampled map ``up``
(N,Cu,Hu,Wu) because every valid convolution loses a border, so it is center-cropped with offset
((Hs-Hu)//2, (Ws-Wu)//2) and put first: y = [cropped skip, up] on the channel axis, (N,Cs+Cu,Hu,Wu).
This module holds the op and its autograd Function, the NumPy reference, the launcher of
``kernels/crop_concat.cu``, and the registry entry.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from ..autograd import Function
from ..backends.kernels import int32s, require
from ..tensor import Tensor
from .checks import check_same, check_tensor

KERNEL_FILE = "crop_concat"


# ---- the op ------------------------------------------------------------------------------------
class CropConcat(Function):
    def forward(self, skip, up):
        self.skip_shape, self.up_shape = skip.shape, up.shape
        return backends.get_backend(self.device).crop_concat_forward(skip, up)

    def backward(self, gy):
        return backends.get_backend(self.device).crop_concat_backward(gy, self.skip_shape, self.up_shape)


def crop_concat(skip: Tensor, up: Tensor) -> Tensor:
    """Center-crop ``skip`` to ``up``'s H, W and concatenate [cropped skip, up] on channels."""
    check_tensor("skip", skip, 4)
    check_tensor("up", up, 4)
    check_same("crop_concat", {"skip": skip, "up": up})
    if skip.shape[0] != up.shape[0]:
        raise ValueError(f"crop_concat: batch sizes differ, skip {skip.shape} vs up {up.shape}")
    if skip.shape[2] < up.shape[2] or skip.shape[3] < up.shape[3]:
        raise ValueError(f"crop_concat: skip {skip.shape} is smaller than up {up.shape} in H or W; "
                         f"the skip connection must be at least as large as the upsampled map")
    return CropConcat.apply(skip, up)


# ---- the NumPy reference (the oracle) ----------------------------------------------------------
def crop_offsets(skip_shape, up_shape) -> tuple[int, int]:
    """The center-crop offset (dH//2, dW//2) of the skip map relative to the upsampled map."""
    return (skip_shape[2] - up_shape[2]) // 2, (skip_shape[3] - up_shape[3]) // 2


def reference_forward(skip, up):
    """[center crop of skip to up's H, W ; up] concatenated on the channel axis."""
    n, cs = skip.shape[:2]
    hu, wu = up.shape[2:]
    oy, ox = crop_offsets(skip.shape, up.shape)
    y = np.empty((n, cs + up.shape[1], hu, wu), dtype=up.dtype)
    y[:, :cs] = skip[:, :, oy:oy + hu, ox:ox + wu]
    y[:, cs:] = up
    return y


def reference_backward(gy, skip_shape, up_shape):
    cs = skip_shape[1]
    hu, wu = up_shape[2:]
    oy, ox = crop_offsets(skip_shape, up_shape)
    gskip = np.zeros(skip_shape, dtype=gy.dtype)
    gskip[:, :, oy:oy + hu, ox:ox + wu] = gy[:, :cs]
    return gskip, np.ascontiguousarray(gy[:, cs:])


# ---- the CUDA kernels (kernels/crop_concat.cu): one thread per output / gradient element --------
def _offsets(skip_shape, up_shape) -> tuple[int, int]:
    require(len(skip_shape) == 4 and len(up_shape) == 4,
            f"crop_concat needs 4-D shapes, got skip {tuple(skip_shape)} and up {tuple(up_shape)}")
    require(skip_shape[0] == up_shape[0] and skip_shape[2] >= up_shape[2] and skip_shape[3] >= up_shape[3],
            f"crop_concat: skip {tuple(skip_shape)} must have up's batch size and be at least as "
            f"large as up {tuple(up_shape)} in H and W")
    return crop_offsets(skip_shape, up_shape)


def kernels_forward(k, skip, up):
    skip, up = k.floats(skip, "skip", 4), k.floats(up, "up", 4)
    oy, ox = _offsets(skip.shape, up.shape)
    n, cs, hs, ws = skip.shape
    cu, hu, wu = up.shape[1:]
    y = k.empty((n, cs + cu, hu, wu))
    k.launch_elementwise(KERNEL_FILE, "crop_concat_forward", y.size,
                         (skip, up, y, *int32s(n, cs, hs, ws, cu, hu, wu, oy, ox)))
    return y


def kernels_backward(k, gy, skip_shape, up_shape):
    skip_shape, up_shape = tuple(int(s) for s in skip_shape), tuple(int(s) for s in up_shape)
    oy, ox = _offsets(skip_shape, up_shape)
    n, cs, hs, ws = skip_shape
    cu, hu, wu = up_shape[1:]
    gy = k.floats(gy, "gy", 4)
    require(gy.shape == (n, cs + cu, hu, wu),
            f"crop_concat gy has shape {tuple(gy.shape)}; expected {(n, cs + cu, hu, wu)}")
    gskip, gup = k.empty(skip_shape), k.empty(up_shape)
    k.launch_elementwise(KERNEL_FILE, "crop_concat_backward_skip", gskip.size,
                         (gy, gskip, *int32s(n, cs, hs, ws, cu, hu, wu, oy, ox)))
    k.launch_elementwise(KERNEL_FILE, "crop_concat_backward_up", gup.size, (gy, gup, *int32s(n, cs, cu, hu, wu)))
    return gskip, gup


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "crop_concat_forward": {"reference": reference_forward, "kernels": kernels_forward},
    "crop_concat_backward": {"reference": reference_backward, "kernels": kernels_backward},
}
# (skip shape, up shape): no crop; odd margins; a wide crop in W only
TEST_CASES = [((1, 1, 4, 4), (1, 1, 4, 4)), ((2, 3, 11, 12), (2, 4, 6, 7)), ((3, 5, 9, 17), (3, 2, 4, 12))]
TOLERANCE = dict(rtol=0.0, atol=0.0)  # moves values: exact


def example(rng, case, dtype=np.float32) -> dict:
    skip_shape, up_shape = case
    skip, up = rng.standard_normal(skip_shape).astype(dtype), rng.standard_normal(up_shape).astype(dtype)
    gy = rng.standard_normal((up_shape[0], skip_shape[1] + up_shape[1]) + tuple(up_shape[2:])).astype(dtype)
    return {"crop_concat_forward": (skip, up), "crop_concat_backward": (gy, skip_shape, up_shape)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The last skip connection of a U-Net with ``base`` channels on a ``tile`` input."""
    skip, up = tile - 4, 2 * ((tile - 4) // 2 - 40)
    return [((batch, base, skip, skip), (batch, base, up, up))] if up >= 1 else []


def cost(case) -> dict:
    skip_shape, up_shape = case
    n, cs = skip_shape[:2]
    cu, hu, wu = up_shape[1:]
    moved = 4.0 * 2 * n * (cs + cu) * hu * wu           # read once, written once
    return {"crop_concat_forward": (0.0, moved), "crop_concat_backward": (0.0, moved)}


def torch_forward(torch, skip, up):
    """PyTorch's twin of the forward, for the benchmark's comparison."""
    oy, ox = crop_offsets(skip.shape, up.shape)
    return torch.cat([skip[:, :, oy:oy + up.shape[2], ox:ox + up.shape[3]], up], 1)


TORCH_TWINS = {"crop_concat_forward": torch_forward}
