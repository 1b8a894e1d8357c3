"""Finite-difference gradient checking.

``gradcheck(fn, inputs)`` compares the gradients autograd computes for ``fn`` with central
differences, along a random projection: with a fixed random ``r`` of the output's shape it
differentiates the scalar ``sum(fn(x) * r)``, which checks every entry of the Jacobian-vector
product at once (a bug in any output element shows up). Run it in float64 on the ``cpu``
device: in float32 the finite-difference error alone is ~1e-3.
"""
from __future__ import annotations

import numpy as np

from .tensor import Tensor


def numerical_grad(scalar_fn, array: np.ndarray, eps: float) -> np.ndarray:
    """d scalar_fn / d array by central differences, one element at a time (array modified in
    place and restored). O(size) evaluations: keep test shapes small."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        plus = scalar_fn()
        flat[i] = orig - eps
        minus = scalar_fn()
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(fn, inputs, *, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7,
              seed: int = 0, raise_on_fail: bool = True) -> dict:
    """Check autograd against finite differences for ``fn(*tensors) -> Tensor``.

    ``inputs``: a list of float64 NumPy arrays (differentiated) or other objects (passed as is,
    e.g. integer targets wrapped in a Tensor). Returns {input index: max abs error}; raises
    AssertionError naming the input and the worst element when ``|analytic - numeric| >
    atol + rtol * |numeric|`` anywhere.
    """
    rng = np.random.default_rng(seed)
    arrays = {i: a for i, a in enumerate(inputs) if isinstance(a, np.ndarray) and a.dtype.kind == "f"}
    for i, a in arrays.items():
        if a.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} must be float64 for meaningful finite differences")

    def build(requires_grad: bool):
        return [Tensor(a, dtype=np.float64, requires_grad=requires_grad) if i in arrays else a
                for i, a in enumerate(inputs)]

    tensors = build(True)
    out = fn(*tensors)
    projection = rng.standard_normal(out.shape)
    (out * Tensor(projection, dtype=np.float64)).sum().backward()
    analytic = {i: tensors[i].grad.numpy() if tensors[i].grad is not None else np.zeros_like(a)
                for i, a in arrays.items()}

    def scalar():
        return float((fn(*build(False)).numpy() * projection).sum())

    errors = {}
    for i, a in arrays.items():
        numeric = numerical_grad(scalar, a, eps)
        diff = np.abs(analytic[i] - numeric)
        bound = atol + rtol * np.abs(numeric)
        errors[i] = float(diff.max()) if diff.size else 0.0
        if raise_on_fail and np.any(diff > bound):
            worst = np.unravel_index(np.argmax(diff - bound), a.shape)
            raise AssertionError(
                f"gradcheck failed for input {i} (shape {a.shape}) at {tuple(int(k) for k in worst)}: "
                f"analytic {analytic[i][worst]:.8g} vs numeric {numeric[worst]:.8g} "
                f"(tolerance {atol} + {rtol} * |numeric|); {int((diff > bound).sum())} elements off")
    return errors
