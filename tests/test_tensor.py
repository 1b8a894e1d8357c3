"""Tensor and autograd behaviour: dtypes, devices, accumulation, no_grad, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F


def test_dtypes_and_host_copy():
    t = mu.Tensor([[1, 2], [3, 4]])
    assert t.dtype == np.int32 and t.shape == (2, 2) and t.device == "cpu"
    f = mu.Tensor(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert f.dtype == np.float32                      # floats become float32 by default
    assert mu.Tensor(f.numpy(), dtype="float64").dtype == np.float64
    host = f.numpy()
    host[0, 0] = 99
    assert f.numpy()[0, 0] == 0                       # numpy() is a copy


def test_float64_only_on_cpu():
    with pytest.raises(TypeError, match="float64 tensors exist only on 'cpu'"):
        mu.Tensor([1.0], device="emu", dtype="float64")


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        mu.Tensor([1.0], device="gpu")
    with pytest.raises(TypeError, match="only floating-point tensors can require grad"):
        mu.Tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="cannot make a Tensor"):
        mu.Tensor(np.array(["a"]))


def test_gradient_accumulates_over_uses_and_calls():
    x = mu.Tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = (x * x + x).sum()                             # dy/dx = 2x + 1, x used three times
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [3, 5, 7])
    (x * 2.0).sum().backward()                        # a second graph adds to .grad
    np.testing.assert_allclose(x.grad.numpy(), [5, 7, 9])


def test_backward_twice_through_one_graph_raises():
    x = mu.Tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()


def test_no_grad_records_nothing():
    x = mu.Tensor([1.0, -2.0], requires_grad=True)
    with mu.no_grad():
        y = F.relu(x)
    assert not y.requires_grad and y.creator is None
    with pytest.raises(ValueError, match="does not require grad"):
        y.sum().backward()


def test_backward_needs_scalar_or_grad():
    x = mu.Tensor([1.0, -2.0], requires_grad=True)
    with pytest.raises(ValueError, match="needs a scalar"):
        F.relu(x).backward()
    F.relu(x).backward(np.array([5.0, 5.0]))
    np.testing.assert_allclose(x.grad.numpy(), [5.0, 0.0])


def test_op_shape_errors_name_both_shapes():
    x = mu.Tensor(np.zeros((1, 3, 8, 8)))
    w = mu.Tensor(np.zeros((4, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"x has 3 channels \(shape \(1, 3, 8, 8\)\) but w expects 2"):
        F.conv3x3(x, w)
    with pytest.raises(ValueError, match="layout"):
        F.conv3x3(x, mu.Tensor(np.zeros((4, 3, 2, 2))))
    with pytest.raises(TypeError, match="must be a minunet.Tensor"):
        F.relu(np.zeros(3))
    with pytest.raises(ValueError, match="smaller than up"):
        F.crop_concat(mu.Tensor(np.zeros((1, 1, 4, 4))), mu.Tensor(np.zeros((1, 1, 6, 6))))
    logits = mu.Tensor(np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"target values must be class indices in \[0, 1\]"):
        F.weighted_cross_entropy(logits, mu.Tensor(np.full((1, 3, 3), 2)))
    with pytest.raises(ValueError, match="target must have shape"):
        F.weighted_cross_entropy(logits, mu.Tensor(np.zeros((1, 3, 4), np.int64)))
    with pytest.raises(TypeError, match="integer class indices"):
        F.weighted_cross_entropy(logits, mu.Tensor(np.zeros((1, 3, 3)), dtype="float32"))
    with pytest.raises(ValueError, match="weight map is a constant"):
        F.weighted_cross_entropy(logits, mu.Tensor(np.zeros((1, 3, 3), np.int64)),
                                 mu.Tensor(np.ones((1, 3, 3)), requires_grad=True))
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\)"):
        F.dropout(logits, 1.0, training=True)


def test_cross_entropy_is_stable_for_large_logits(rng):
    logits = rng.standard_normal((2, 3, 4, 5)) * 100.0
    target = rng.integers(0, 3, (2, 4, 5))
    loss = F.weighted_cross_entropy(mu.Tensor(logits, requires_grad=True), mu.Tensor(target))
    # exact value in float64 via log-sum-exp
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    ref = (lse - np.take_along_axis(logits, target[:, None], 1)[:, 0]).mean()
    assert np.isfinite(loss.item())
    assert abs(loss.item() - ref) <= 1e-4 * abs(ref) + 1e-3


def test_dropout_is_identity_in_eval_and_scaled_in_training(rng):
    x = mu.Tensor(np.ones((1, 4, 50, 50)))
    assert F.dropout(x, 0.5, training=False) is x
    y = F.dropout(x, 0.5, training=True, seed=7).numpy()
    kept = y != 0
    assert set(np.unique(y)) <= {0.0, 2.0}
    assert abs(kept.mean() - 0.5) < 0.03                       # 10,000 draws: ~0.005 std
    y2 = F.dropout(x, 0.5, training=True, seed=7).numpy()
    np.testing.assert_array_equal(y, y2)                        # same seed, same mask
    assert not np.array_equal(y, F.dropout(x, 0.5, training=True, seed=8).numpy())
