"""The elementwise ops: ReLU, inverted dropout, and the SGD-with-momentum update. Everything
Python about them: the ops and their autograd Functions, the NumPy references, the fast CPU
kernels (Numba), the launchers of ``kernels/elementwise.cu`` (one thread per element), and the
registry entry.

- ReLU (paper Section 2: every 3x3 convolution is "followed by a rectified linear unit").
- Dropout (Section 3.1: "drop-out layers at the end of the contracting path"), inverted: kept
  values are scaled by 1/(1-p) in training so inference is the identity. The mask is a
  counter-based hash of (seed, flat index), so every device draws the same mask for one seed
  (docs/backends.md).
- SGD with momentum (Section 3: momentum 0.99), used by ``minunet.optim.SGD``; and its guarded
  twin ``sgd_step_if_finite``, which leaves everything untouched unless the loss (a device
  array) is finite.
- ``grad_add`` and ``grad_scale``: autograd's two array operations of a training step (summing
  the gradients of a tensor used twice, scaling the loss gradient), kernels on cuda and emu so
  that a step is nothing but launches of ``kernels/`` (``minunet.step_graph`` replays them).

A dropout seed may also live in device memory (:class:`DeviceSeed`): a captured step replays its
launches with their captured arguments, so the seed it draws must be read by the kernel from a
buffer the host rewrites before each replay (``dropout_forward_seed_buffer``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from .. import backends
from ..autograd import Function
from ..backends.kernels import require
from ..tensor import Tensor
from .checks import check_tensor
from .numba_config import all_float32, jit

KERNEL_FILE = "elementwise"


# ---- the ops -----------------------------------------------------------------------------------
class ReLU(Function):
    def forward(self, x):
        self.y = backends.get_backend(self.device).relu_forward(x)
        return self.y

    def backward(self, gy):
        return (backends.get_backend(self.device).relu_backward(self.y, gy),)


def relu(x: Tensor) -> Tensor:
    """max(x, 0), elementwise (a NaN stays NaN)."""
    check_tensor("x", x)
    return ReLU.apply(x)


class DeviceSeed(NamedTuple):
    """A dropout seed held in device memory: ``seeds[index]`` of a uint32 array on the tensor's
    device. The kernel reads it when it runs, so a captured launch replayed later draws the
    seed the host wrote there before the replay (minunet.step_graph); the mask is the one an
    integer seed of that value gives. On ``cpu`` the value is read on the host."""
    seeds: object
    index: int


class Dropout(Function):
    def forward(self, x, p, seed):
        self.p = p
        backend = backends.get_backend(self.device)
        if not isinstance(seed, DeviceSeed):
            y, self.mask = backend.dropout_forward(x, p, seed)
        elif self.device == "cpu":
            y, self.mask = backend.dropout_forward(x, p, int(seed.seeds[seed.index]))
        else:
            y, self.mask = dropout_kernels_forward_seed_buffer(backend, x, p, seed.seeds, seed.index)
        return y

    def backward(self, gy):
        return backends.get_backend(self.device).dropout_backward(gy, self.mask, self.p), None, None


_default_seed = np.random.default_rng()


def dropout(x: Tensor, p: float, training: bool, seed: int | DeviceSeed | None = None) -> Tensor:
    """Inverted dropout: in training zero each element with probability ``p`` and scale the rest
    by 1/(1-p); at inference the identity. The mask is a hash of (seed, element index), so all
    devices draw the same mask for the same seed (docs/backends.md); ``seed=None`` draws one; a
    :class:`DeviceSeed` is read from device memory when the kernel runs."""
    check_tensor("x", x)
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = int(_default_seed.integers(0, 2**32))
    if isinstance(seed, DeviceSeed):
        seeds = seed.seeds
        if not (hasattr(seeds, "dtype") and seeds.dtype == np.uint32 and seeds.ndim == 1
                and 0 <= seed.index < seeds.shape[0] and type(seeds) is type(x.data)):
            raise ValueError(f"dropout: a DeviceSeed needs a 1-D uint32 array on the tensor's device "
                             f"({x.device!r}) and an index inside it, got {type(seeds).__name__} "
                             f"index {seed.index}")
        return Dropout.apply(x, float(p), DeviceSeed(seeds, int(seed.index)))
    return Dropout.apply(x, float(p), int(seed) & 0xFFFFFFFF)


# ---- the NumPy references (the oracle) ---------------------------------------------------------
def relu_reference_forward(x):
    return np.maximum(x, 0)


def relu_reference_backward(y, gy):
    """gy where the output was positive, else 0. (A multiply by the boolean mask is ~6x faster
    here than np.where, which takes a slow path for mixed scalar/array arguments.)"""
    gx = np.empty_like(gy)
    np.multiply(gy, y > 0, out=gx)
    return gx


def dropout_uniform(size: int, seed: int) -> np.ndarray:
    """u in [0, 1) for flat indices 0..size-1: the counter-based lowbias32 hash of docs/backends.md,
    bit-identical to the CUDA kernel (all arithmetic is uint32, wrapping modulo 2^32)."""
    h = np.arange(size, dtype=np.uint32)
    h += np.uint32((int(seed) * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def dropout_reference_forward(x, p, seed):
    """Inverted dropout: keep where u >= p, scale kept values by 1/(1-p) so E[y] = x."""
    mask = (dropout_uniform(x.size, seed) >= np.float32(p)).reshape(x.shape).astype(np.uint8)
    scale = x.dtype.type(1.0 / (1.0 - p))
    return x * mask * scale, mask


def dropout_reference_backward(gy, mask, p):
    return gy * mask * gy.dtype.type(1.0 / (1.0 - p))


def sgd_reference_step(param, grad, velocity, lr, momentum):
    """velocity = momentum * velocity + grad; param -= lr * velocity (PyTorch's formulation), in place."""
    velocity *= velocity.dtype.type(momentum)
    velocity += grad
    param -= param.dtype.type(lr) * velocity


def sgd_reference_step_if_finite(param, grad, velocity, lr, momentum, loss):
    """sgd_reference_step when the one-element ``loss`` is finite; otherwise nothing changes."""
    if np.isfinite(np.asarray(loss).reshape(-1)[0]):
        sgd_reference_step(param, grad, velocity, lr, momentum)


def grad_add_reference(a, b):
    """a + b: the sum of two gradients of one tensor (autograd)."""
    return a + b


def grad_scale_reference(a, s):
    """a * s, ``s`` a one-element array (the gradient arriving at the loss, a device scalar)."""
    return a * np.asarray(s).reshape(())


# ---- fast CPU kernels (Numba) ------------------------------------------------------------------
# The "cpu" implementations of ReLU and the SGD step, twins of relu_forward/relu_backward and
# sgd_step in kernels/elementwise.cu (one CUDA thread per element there; here the flat array is
# cut into equal blocks, one per task, each a vectorised loop). They are memory-bound: one pass
# over the data instead of NumPy's two or three (a temporary mask, then the product). Dropout
# stays with its reference (it acts on the few small planes at the bottom of the U-Net).
# Each task loops over its own slice from index 0: a loop ``range(lo, hi)`` over the whole array
# would make Numba test every index for negative (wrap-around) values and LLVM give up on
# vectorising it (bench/results/cpu_numba.md). An array of at most one block is one task: it runs
# serially on the calling thread (``serial_up_to``, see numba_config). The SGD step runs serially
# up to SGD_SERIAL_UP_TO elements: every parameter of the default U-Net (base 16) is below it, and
# the whole update takes under a millisecond on one core, less than one launch that waits for a
# preempted worker thread (bench/results/threads_under_load.md).
BLOCK = 1 << 16          # elements per task
SGD_SERIAL_UP_TO = 1 << 20


@jit(serial_up_to=BLOCK)
def _relu(x, y):
    """y = max(x, 0), a NaN stays NaN (``not x < 0`` is true for NaN)."""
    size = x.size
    for t in prange((size + BLOCK - 1) // BLOCK):
        lo = t * BLOCK
        m = min(size - lo, BLOCK)
        xs, ys = x[lo:lo + m], y[lo:lo + m]
        for i in range(m):
            v = xs[i]
            ys[i] = v if not v < 0 else np.float32(0.0)


@jit(serial_up_to=BLOCK)
def _relu_backward(y, gy, gx):
    """gx = gy where y > 0, else 0."""
    size = y.size
    for t in prange((size + BLOCK - 1) // BLOCK):
        lo = t * BLOCK
        m = min(size - lo, BLOCK)
        ys, gys, gxs = y[lo:lo + m], gy[lo:lo + m], gx[lo:lo + m]
        for i in range(m):
            gxs[i] = gys[i] if ys[i] > 0 else np.float32(0.0)


@jit(serial_up_to=SGD_SERIAL_UP_TO)
def _sgd_step(param, grad, velocity, lr, momentum):
    """velocity = momentum * velocity + grad; param -= lr * velocity, in place, with the same
    roundings as the reference (no fastmath: no fused multiply-add), so the result is identical."""
    size = param.size
    for t in prange((size + BLOCK - 1) // BLOCK):
        lo = t * BLOCK
        m = min(size - lo, BLOCK)
        ps, gs, vs = param[lo:lo + m], grad[lo:lo + m], velocity[lo:lo + m]
        for i in range(m):
            v = vs[i] * momentum
            v = v + gs[i]
            vs[i] = v
            ps[i] = ps[i] - lr * v


def relu_cpu_forward(x):
    """The fast CPU ReLU (float32; other dtypes go to the reference)."""
    if not all_float32(x):
        return relu_reference_forward(x)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _relu(x.reshape(-1), y.reshape(-1))
    return y


def relu_cpu_backward(y, gy):
    """The fast CPU ReLU gradient (float32; other dtypes go to the reference)."""
    if not all_float32(y, gy):
        return relu_reference_backward(y, gy)
    y, gy = np.ascontiguousarray(y), np.ascontiguousarray(gy)
    gx = np.empty_like(gy)
    _relu_backward(y.reshape(-1), gy.reshape(-1), gx.reshape(-1))
    return gx


def sgd_cpu_step(param, grad, velocity, lr, momentum):
    """The fast CPU SGD step, in place (float32 C-contiguous arrays; otherwise the reference)."""
    if not (all_float32(param, grad, velocity) and param.flags.c_contiguous
            and velocity.flags.c_contiguous and param.shape == grad.shape == velocity.shape):
        return sgd_reference_step(param, grad, velocity, lr, momentum)
    _sgd_step(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1), velocity.reshape(-1),
              np.float32(lr), np.float32(momentum))


# ---- the CUDA kernels (kernels/elementwise.cu): one thread per element ---------------------------
def relu_kernels_forward(k, x):
    x = k.floats(x, "x")
    y = k.empty(x.shape)
    k.launch_elementwise(KERNEL_FILE, "relu_forward", x.size, (x, y, np.int32(x.size)))
    return y


def relu_kernels_backward(k, y, gy):
    y, gy = k.floats(y, "y"), k.floats(gy, "gy")
    require(y.shape == gy.shape, f"relu_backward: y {tuple(y.shape)} and gy {tuple(gy.shape)} differ in shape")
    gx = k.empty(y.shape)
    k.launch_elementwise(KERNEL_FILE, "relu_backward", y.size, (y, gy, gx, np.int32(y.size)))
    return gx


def _dropout_scale(p) -> np.float32:
    require(0.0 <= float(p) < 1.0, f"dropout probability p={p} must be in [0, 1)")
    return np.float32(1.0 / (1.0 - float(p)))


def dropout_kernels_forward(k, x, p, seed):
    scale = _dropout_scale(p)
    x = k.floats(x, "x")
    y, mask = k.empty(x.shape), k.empty(x.shape, np.uint8)
    seed32 = np.uint32(int(seed) & 0xFFFFFFFF)  # the hash works modulo 2^32, as the reference
    k.launch_elementwise(KERNEL_FILE, "dropout_forward", x.size,
                         (x, y, mask, np.int32(x.size), np.float32(p), scale, seed32))
    return y, mask


def dropout_kernels_forward_seed_buffer(k, x, p, seeds, index: int):
    """dropout_kernels_forward with the seed read by the kernel from ``seeds[index]`` (a uint32
    device array the host may rewrite between replays of a captured step)."""
    scale = _dropout_scale(p)
    x = k.floats(x, "x")
    require(isinstance(seeds, k.xp.ndarray) and seeds.dtype == np.uint32 and seeds.ndim == 1
            and seeds.flags.c_contiguous and 0 <= int(index) < seeds.shape[0],
            f"dropout seeds must be a 1-D uint32 {k.xp.__name__} array holding index {index}")
    y, mask = k.empty(x.shape), k.empty(x.shape, np.uint8)
    k.launch_elementwise(KERNEL_FILE, "dropout_forward_seed_buffer", x.size,
                         (x, y, mask, np.int32(x.size), np.float32(p), scale, seeds, np.int32(index)))
    return y, mask


def dropout_kernels_backward(k, gy, mask, p):
    scale = _dropout_scale(p)
    gy = k.floats(gy, "gy")
    mask = k.xp.ascontiguousarray(k.xp.asarray(mask, dtype=k.xp.uint8))
    require(mask.shape == gy.shape, f"dropout mask {tuple(mask.shape)} and gy {tuple(gy.shape)} differ in shape")
    gx = k.empty(gy.shape)
    k.launch_elementwise(KERNEL_FILE, "dropout_backward", gy.size, (gy, mask, gx, np.int32(gy.size), scale))
    return gx


def _sgd_arrays(k, function: str, param, grad, velocity):
    """The checks of an in-place SGD launch (``function`` names it in the messages): param and
    velocity C-contiguous float32 arrays of this device, one shape, and no two arrays sharing
    memory (the kernels' pointers are __restrict__). Returns grad as the kernels want it."""
    xp = k.xp
    for name, a in (("param", param), ("velocity", velocity)):
        if not isinstance(a, xp.ndarray) or a.dtype != xp.float32 or not a.flags.c_contiguous:
            raise TypeError(f"{function} updates {name} in place: it must be a C-contiguous float32 "
                            f"{xp.__name__} array on device {k.device!r}")
    grad = k.floats(grad, "grad")
    require(param.shape == grad.shape == velocity.shape,
            f"{function}: param {tuple(param.shape)}, grad {tuple(grad.shape)} and velocity "
            f"{tuple(velocity.shape)} must have one shape")
    # The kernel's pointers are __restrict__: the compiler may assume the three never overlap
    for a, b, names in ((param, grad, "param and grad"), (param, velocity, "param and velocity"),
                        (grad, velocity, "grad and velocity")):
        require(not xp.may_share_memory(a, b), f"{function}: {names} share memory; the kernel "
                                               "needs three separate arrays (pass a copy)")
    return grad


def sgd_kernels_step(k, param, grad, velocity, lr, momentum):
    grad = _sgd_arrays(k, "sgd_step", param, grad, velocity)
    k.launch_elementwise(KERNEL_FILE, "sgd_momentum", param.size,
                         (param, grad, velocity, np.int32(param.size), np.float32(lr), np.float32(momentum)))


def _device_scalar(k, s, what: str):
    s = k.floats(s, what).reshape(-1)
    require(s.size == 1, f"{what} must hold one value, got shape {tuple(s.shape)}")
    return s


def sgd_kernels_step_if_finite(k, param, grad, velocity, lr, momentum, loss):
    """sgd_kernels_step, skipped on the device (no host read) unless loss[0] is finite."""
    loss = _device_scalar(k, loss, "loss")
    grad = _sgd_arrays(k, "sgd_step_if_finite", param, grad, velocity)
    k.launch_elementwise(KERNEL_FILE, "sgd_momentum_if_finite", param.size,
                         (param, grad, velocity, np.int32(param.size), np.float32(lr),
                          np.float32(momentum), loss))


def grad_add_kernels(k, a, b):
    a, b = k.floats(a, "a"), k.floats(b, "b")
    require(a.shape == b.shape, f"grad_add: a {tuple(a.shape)} and b {tuple(b.shape)} differ in shape")
    c = k.empty(a.shape)
    k.launch_elementwise(KERNEL_FILE, "grad_add", a.size, (a, b, c, np.int32(a.size)))
    return c


def grad_scale_kernels(k, a, s):
    a, s = k.floats(a, "a"), _device_scalar(k, s, "s")
    c = k.empty(a.shape)
    k.launch_elementwise(KERNEL_FILE, "grad_scale", a.size, (a, s, c, np.int32(a.size)))
    return c


# ---- registry entry ------------------------------------------------------------------------------
IMPLEMENTATIONS = {
    "relu_forward": {"reference": relu_reference_forward, "cpu": relu_cpu_forward, "kernels": relu_kernels_forward},
    "relu_backward": {"reference": relu_reference_backward, "cpu": relu_cpu_backward, "kernels": relu_kernels_backward},
    "dropout_forward": {"reference": dropout_reference_forward, "kernels": dropout_kernels_forward},
    "dropout_backward": {"reference": dropout_reference_backward, "kernels": dropout_kernels_backward},
    "sgd_step": {"reference": sgd_reference_step, "cpu": sgd_cpu_step, "kernels": sgd_kernels_step},
    "sgd_step_if_finite": {"reference": sgd_reference_step_if_finite, "kernels": sgd_kernels_step_if_finite},
    "grad_add": {"reference": grad_add_reference, "kernels": grad_add_kernels},
    "grad_scale": {"reference": grad_scale_reference, "kernels": grad_scale_kernels},
}
TEST_CASES = [(1,), (3, 5, 7), (2, 3, 9, 11), (1000,)]   # any shape: the ops are elementwise
TOLERANCE = dict(rtol=0.0, atol=0.0)   # relu and dropout select and scale: exact; sgd: see below
# A GPU fuses momentum * v + g into one rounding (FMA), the reference rounds twice.
SGD_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def example(rng, case, dtype=np.float32) -> dict:
    """ReLU sees a 0 (the kink) and a NaN (stays NaN, passes no gradient); dropout p = 0.5."""
    x, gy = rng.standard_normal(case).astype(dtype), rng.standard_normal(case).astype(dtype)
    x.flat[0] = 0.0
    if x.size > 1:
        x.flat[-1] = np.nan
    y = relu_reference_forward(x)
    seed = int(rng.integers(0, 2**32))
    _, mask = dropout_reference_forward(x, 0.5, seed)
    param, velocity = rng.standard_normal(case).astype(dtype), rng.standard_normal(case).astype(dtype)
    loss = np.array([rng.uniform(0.1, 2.0)], dtype)
    return {"relu_forward": (x,), "relu_backward": (y, gy), "dropout_forward": (x, 0.5, seed),
            "dropout_backward": (gy, mask, 0.5), "sgd_step": (param, gy, velocity, 0.01, 0.99),
            "sgd_step_if_finite": (param, gy, velocity, 0.01, 0.99, loss),
            "grad_add": (x, gy), "grad_scale": (gy, np.array(rng.uniform(0.5, 2.0), dtype))}


def tolerance(function: str, case) -> dict:
    """ReLU and dropout select and scale: exact. grad_add and grad_scale round once in float32
    where the test's reference computes in float64; the SGD steps may fuse a multiply-add."""
    return TOLERANCE if function in ("relu_forward", "relu_backward", "dropout_forward",
                                     "dropout_backward") else SGD_TOLERANCE


def bench_cases(base: int, tile: int, batch: int) -> list:
    """The activation of the first conv of a U-Net with ``base`` channels on a ``tile`` input."""
    return [(batch, base, tile - 2, tile - 2)]


def cost(case) -> dict:
    size = float(np.prod(case))
    return {"relu_forward": (size, 8.0 * size), "relu_backward": (size, 12.0 * size),
            "dropout_forward": (12.0 * size, 9.0 * size), "dropout_backward": (2.0 * size, 9.0 * size),
            "sgd_step": (3.0 * size, 20.0 * size), "sgd_step_if_finite": (3.0 * size, 20.0 * size),
            "grad_add": (size, 12.0 * size), "grad_scale": (size, 8.0 * size)}


def torch_relu(torch, x):
    """PyTorch's twin of the forward, for the benchmark's comparison."""
    return torch.relu(x)


TORCH_TWINS = {"relu_forward": torch_relu}   # function -> PyTorch twin (the backward is timed through it)
