"""``minunet.Tensor``: an array on a device, plus what autograd needs (grad, creator).

Floating-point data is stored as float32 (what the CUDA kernels compute in); integer data (class
targets) as int32. On ``"cpu"`` a Tensor may be created with ``dtype="float64"``: the NumPy
reference is dtype-generic, and that is how finite-difference gradient checks run.
"""
from __future__ import annotations

import numpy as np

from . import autograd
from .devices import array_module, resolve_device, to_device_array, to_host

_FLOAT_DTYPES = {"float32": np.float32, "float64": np.float64}


def _canonical_dtype(array: np.ndarray, dtype, device: str):
    if dtype is not None:
        key = np.dtype(dtype).name
        if key not in _FLOAT_DTYPES and not np.issubdtype(np.dtype(dtype), np.integer):
            raise TypeError(f"unsupported dtype {key}: use float32, float64 (cpu only) or an integer type")
        if key == "float64" and device != "cpu":
            raise TypeError(f"float64 tensors exist only on 'cpu' (the kernels compute in float32); "
                            f"got device {device!r}: drop dtype= or use device='cpu'")
        return np.dtype(dtype)
    kind = array.dtype.kind
    if kind == "f":
        return np.dtype(np.float32)
    if kind in "iu":
        return np.dtype(np.int32) if kind == "i" or array.dtype.itemsize >= 4 else array.dtype
    if kind == "b":
        return np.dtype(np.float32)
    raise TypeError(f"cannot make a Tensor from data of dtype {array.dtype}: give numbers "
                    f"(floats become float32, integers int32)")


class Tensor:
    """An n-dimensional array on ``device`` with optional gradient tracking.

    >>> t = Tensor([[1.0, -2.0]], requires_grad=True)
    >>> t.shape, t.device
    ((1, 2), 'cpu')
    """

    __array_priority__ = 1000  # so that ndarray * Tensor calls Tensor.__rmul__

    def __init__(self, data, device: str = "cpu", requires_grad: bool = False, dtype=None):
        device = resolve_device(device)
        if isinstance(data, Tensor):
            data = data.data
        host_or_device = data if hasattr(data, "__cuda_array_interface__") else np.asarray(data)
        target = _canonical_dtype(host_or_device, dtype, device)
        array = to_device_array(host_or_device, device)
        if array.dtype != target:
            array = array.astype(target)
        if requires_grad and array.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, got dtype {array.dtype}")
        self.data = array
        self.device = device
        self.requires_grad = bool(requires_grad)
        self.grad: Tensor | None = None
        self.creator: autograd.Function | None = None

    @classmethod
    def _from_array(cls, array, device: str, requires_grad: bool = False) -> "Tensor":
        """Wrap an array that is already on ``device`` (no copy, no dtype change)."""
        t = cls.__new__(cls)
        t.data = array
        t.device = device
        t.requires_grad = requires_grad
        t.grad = None
        t.creator = None
        return t

    # ---- what it is ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def xp(self):
        """The array module of this tensor's device (numpy or cupy)."""
        return array_module(self.device)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device!r}{grad})"

    def __len__(self) -> int:
        return self.shape[0]

    # ---- moving and copying -------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A host (NumPy) copy of the data."""
        return np.array(to_host(self.data), copy=True)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return to_host(self.data).reshape(()).item()

    def to(self, device: str) -> "Tensor":
        """This tensor on another device (a new leaf tensor; the same object if already there)."""
        device = resolve_device(device)
        if device == self.device:
            return self
        return Tensor._from_array(to_device_array(self.data, device), device, self.requires_grad)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor._from_array(self.data, self.device)

    def backward(self, grad=None) -> None:
        """Compute d self / d leaf for every leaf with ``requires_grad`` (into ``leaf.grad``)."""
        autograd.backward(self, grad)

    # ---- a few differentiable elementwise ops, for teaching and for building losses ----------
    def __add__(self, other):
        return _Add.apply(self, _as_tensor(other, self))

    __radd__ = __add__

    def __mul__(self, other):
        return _Mul.apply(self, _as_tensor(other, self))

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-_as_tensor(other, self))

    def __rsub__(self, other):
        return _as_tensor(other, self) + (-self)

    def sum(self) -> "Tensor":
        return _Sum.apply(self)

    def mean(self) -> "Tensor":
        return self.sum() * (1.0 / self.size)


def _as_tensor(value, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return Tensor._from_array(like.xp.asarray(value, dtype=like.dtype), like.device)


def _unbroadcast(grad, shape):
    """Sum a broadcast gradient back down to ``shape`` (the reverse of NumPy broadcasting)."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


class _Add(autograd.Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(g, self.shapes[1])


class _Mul(autograd.Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return _unbroadcast(g * self.b, self.a.shape), _unbroadcast(g * self.a, self.b.shape)


class _Sum(autograd.Function):
    def forward(self, a):
        self.shape = a.shape
        return a.sum()

    def backward(self, g):
        xp = array_module(self.device)
        return (xp.broadcast_to(g, self.shape).copy(),)
