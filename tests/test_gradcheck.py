"""Every reference op's backward against central finite differences, in float64.

Tolerance: |analytic - numeric| <= 1e-7 + 1e-5 * |numeric| (central differences with eps=1e-6 in
float64 are accurate to ~1e-9 for these smooth-per-piece ops). Max-pooling and ReLU are not
differentiable at ties/zero; random Gaussian inputs avoid those points with probability 1 at
this eps, and the pooling inputs are spread further apart to be safe.
"""
from __future__ import annotations

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F
from minunet.gradcheck import gradcheck

SHAPES = [(1, 1, 5, 5), (2, 3, 7, 6), (3, 2, 6, 9)]


def f64(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("co", [1, 4])
def test_conv3x3(rng, shape, co):
    n, ci, h, w = shape
    gradcheck(F.conv3x3, [f64(rng, n, ci, h, w), f64(rng, co, ci, 3, 3), f64(rng, co)])
    gradcheck(lambda x, w: F.conv3x3(x, w), [f64(rng, n, ci, h, w), f64(rng, co, ci, 3, 3)])


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (2, 3, 5, 7), (2, 2, 6, 3)])
def test_max_pool2x2(rng, shape):
    # distinct values far apart (a permutation) so no finite-difference step crosses a tie
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) * 0.1
    gradcheck(F.max_pool2x2, [x])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("co", [1, 3])
def test_conv_transpose2x2(rng, shape, co):
    n, ci, h, w = shape
    gradcheck(F.conv_transpose2x2, [f64(rng, n, ci, h, w), f64(rng, ci, co, 2, 2), f64(rng, co)])


@pytest.mark.parametrize("skip_hw,up_hw", [((9, 9), (5, 5)), ((8, 11), (4, 6)), ((6, 6), (6, 6)),
                                           ((7, 10), (4, 3))])
def test_crop_concat(rng, skip_hw, up_hw):
    gradcheck(F.crop_concat, [f64(rng, 2, 3, *skip_hw), f64(rng, 2, 2, *up_hw)])


@pytest.mark.parametrize("shape", SHAPES)
def test_conv1x1(rng, shape):
    n, ci, h, w = shape
    gradcheck(F.conv1x1, [f64(rng, n, ci, h, w), f64(rng, 3, ci, 1, 1), f64(rng, 3)])


def test_relu(rng):
    x = f64(rng, 2, 3, 5, 7)
    x[np.abs(x) < 1e-3] = 0.5   # keep clear of the kink
    gradcheck(F.relu, [x])


def test_dropout(rng):
    gradcheck(lambda x: F.dropout(x, 0.3, training=True, seed=1234), [f64(rng, 2, 3, 5, 7)])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (2, 3, 5, 3)])
def test_weighted_cross_entropy(rng, weighted, shape):
    n, c, h, w = shape
    target = mu.Tensor(rng.integers(0, c, (n, h, w)))
    inputs = [f64(rng, n, c, h, w, scale=3.0), target]
    if weighted:  # the weight map is data, not differentiated: pass it as a constant Tensor
        inputs.append(mu.Tensor(rng.uniform(0.5, 10.0, (n, h, w)), dtype=np.float64))
    gradcheck(F.weighted_cross_entropy, inputs)


def test_elementwise_tensor_ops(rng):
    gradcheck(lambda a, b: (a * b + a - 2.0 * b).mean() * a, [f64(rng, 3, 4), f64(rng, 3, 4)])
    gradcheck(lambda a, b: a * b + a, [f64(rng, 3, 4), f64(rng, 1, 4)])   # broadcasting


def test_gradcheck_catches_a_wrong_backward(rng):
    """The checker itself must fail on a wrong gradient (here: ReLU's backward off by 2x)."""
    from minunet.autograd import Function

    class BadRelu(Function):
        def forward(self, x):
            self.x = x
            return np.maximum(x, 0)

        def backward(self, g):
            return (2 * g * (self.x > 0),)

    with pytest.raises(AssertionError, match="gradcheck failed"):
        gradcheck(BadRelu.apply, [f64(rng, 2, 3)])


@pytest.mark.parametrize("depth", [1, 2])
def test_whole_unet_gradients(rng, depth):
    """The whole network composes: every parameter's gradient of a small float64 U-Net's loss
    against central differences at 4 random entries per parameter (tolerance 1e-6 + 1e-5*|num|)."""
    model = mu.UNet(in_channels=2, num_classes=3, base_channels=2, depth=depth, dropout=0.0, seed=3)
    for p in model.parameters():
        p.data = p.data.astype(np.float64) + rng.standard_normal(p.shape) * 0.1
    size = mu.UNet.valid_input_size(5, depth)
    out = mu.UNet.output_size(size, depth)
    x = mu.Tensor(rng.standard_normal((2, 2, size, size + 2 ** depth)), dtype=np.float64)
    target = mu.Tensor(rng.integers(0, 3, (2, out, out + 2 ** depth)))
    weight = mu.Tensor(rng.uniform(0.5, 2.0, (2, out, out + 2 ** depth)), dtype=np.float64)

    def loss() -> float:
        return F.weighted_cross_entropy(model(x), target, weight).item()

    F.weighted_cross_entropy(model(x), target, weight).backward()
    eps = 1e-6
    for name, p in model.named_parameters():
        flat, grad = p.data.reshape(-1), p.grad.numpy().reshape(-1)
        for i in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            orig = flat[i]
            flat[i] = orig + eps
            plus = loss()
            flat[i] = orig - eps
            minus = loss()
            flat[i] = orig
            numeric = (plus - minus) / (2 * eps)
            assert abs(grad[i] - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, i, grad[i], numeric)
