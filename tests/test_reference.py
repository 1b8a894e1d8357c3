"""The NumPy reference against direct definitions (sliding windows + einsum), on random shapes.

The reference chooses between two conv3x3 strategies by size (tap-wise GEMMs on the full-width
grid, or an explicit im2col matrix); both are forced here so each is checked on every shape.
Tolerance (float64): |got - want| <= 1e-10 + 1e-10 * |want|.
"""
from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from minunet.backends import reference as R
from minunet.ops import conv3x3 as conv3x3_op
from minunet.ops.elementwise import dropout_uniform

from .conftest import assert_close

SHAPES = [(1, 1, 5, 5), (2, 3, 7, 6), (3, 9, 11, 8), (2, 10, 6, 13)]
TOL = dict(rtol=1e-10, atol=1e-10)


def direct_conv3x3(x, w, b):
    windows = sliding_window_view(x, (3, 3), axis=(2, 3))          # (N, Ci, Ho, Wo, 3, 3)
    return np.einsum("ncijyx,ocyx->noij", windows, w) + b[None, :, None, None]


@pytest.fixture(params=["taps", "im2col"])
def conv_path(request, monkeypatch):
    """Force one of the reference conv3x3's two code paths (minunet/ops/conv3x3.py)."""
    if request.param == "taps":
        monkeypatch.setattr(conv3x3_op, "_IM2COL_MAX_CHANNELS", 0)
        monkeypatch.setattr(conv3x3_op, "_IM2COL_FORWARD_BYTES", -1)
        monkeypatch.setattr(conv3x3_op, "_IM2COL_BACKWARD_BYTES", -1)
    else:
        monkeypatch.setattr(conv3x3_op, "_IM2COL_FORWARD_BYTES", 1 << 40)
        monkeypatch.setattr(conv3x3_op, "_IM2COL_BACKWARD_BYTES", 1 << 40)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
def test_conv3x3_both_paths_match_the_definition(rng, shape, conv_path):
    n, ci, h, wd = shape
    co = 4
    x, w, b = rng.standard_normal(shape), rng.standard_normal((co, ci, 3, 3)), rng.standard_normal(co)
    assert_close(R.conv3x3_forward(x, w, b), direct_conv3x3(x, w, b), what="forward", **TOL)
    gy = rng.standard_normal((n, co, h - 2, wd - 2))
    gx, gw, gb = R.conv3x3_backward(x, w, gy, True)
    # gw[o,c,y,x] = sum gy[n,o,i,j] * x[n,c,i+y,j+x];  gx = full correlation with flipped w
    windows = sliding_window_view(x, (3, 3), axis=(2, 3))
    assert_close(gw, np.einsum("noij,ncijyx->ocyx", gy, windows), what="gw", **TOL)
    gy_pad = np.pad(gy, ((0, 0), (0, 0), (2, 2), (2, 2)))
    w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    assert_close(gx, direct_conv3x3(gy_pad, w_flip, np.zeros(ci)), what="gx", **TOL)
    assert_close(gb, gy.sum(axis=(0, 2, 3)), what="gb", **TOL)


def test_max_pool_ties_pick_the_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 5))                        # all ties; last column dropped by the floor
    x[0, 0, 2:, 2:4] = [[1, 1], [1, 0]]               # window (1,1): tie between (0,0),(0,1),(1,0)
    x[0, 0, 0:2, 2:4] = [[0, 2], [2, 2]]              # window (0,1): tie between (0,1),(1,0),(1,1)
    y, argmax = R.max_pool2x2_forward(x)
    assert argmax.tolist() == [[[[0, 1], [0, 0]]]]
    assert y.tolist() == [[[[0, 2], [0, 1]]]]
    gx = R.max_pool2x2_backward(np.ones_like(y), argmax, x.shape)
    assert gx.sum() == 4 and gx[0, 0, 0, 3] == 1 and gx[0, 0, 2, 2] == 1 and gx[0, 0, :, 4].sum() == 0


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 4, 6, 6)])
def test_max_pool_matches_the_definition(rng, shape):
    x = rng.standard_normal(shape)
    y, argmax = R.max_pool2x2_forward(x)
    ho, wo = shape[2] // 2, shape[3] // 2
    win = x[:, :, : 2 * ho, : 2 * wo].reshape(shape[0], shape[1], ho, 2, wo, 2)
    assert_close(y, win.max(axis=(3, 5)), what="y", **TOL)
    assert np.array_equal(argmax, win.transpose(0, 1, 2, 4, 3, 5).reshape(*y.shape, 4).argmax(-1))


def test_conv_transpose_matches_the_definition(rng):
    x, w, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 2, 2, 2)), rng.standard_normal(2)
    want = np.zeros((2, 2, 8, 10)) + b[None, :, None, None]
    for a in range(2):
        for c in range(2):
            want[:, :, a::2, c::2] += np.einsum("nihw,io->nohw", x, w[:, :, a, c])
    assert_close(R.conv_transpose2x2_forward(x, w, b), want, what="up-conv", **TOL)


def test_dropout_hash_known_values():
    """The counter-based hash is specified bit for bit (docs/backends.md): pin a few values
    computed by hand with Python integers, so a change to the reference cannot go unnoticed."""
    def lowbias32(i, seed):
        h = (i + seed * 0x9E3779B9) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        h ^= h >> 16
        return (h >> 8) / 16777216.0

    u = dropout_uniform(1000, 12345)
    for i in (0, 1, 2, 511, 999):
        assert u[i] == np.float32(lowbias32(i, 12345))
    assert 0.45 < u.mean() < 0.55


def test_cross_entropy_gradient_sums_to_zero_over_classes(rng):
    logits = rng.standard_normal((2, 4, 3, 5))
    target = rng.integers(0, 4, (2, 3, 5)).astype(np.int32)
    loss, grad = R.weighted_cross_entropy_forward(logits, target, rng.uniform(1, 2, (2, 3, 5)))
    assert_close(grad.sum(axis=1), np.zeros((2, 3, 5)), rtol=0, atol=1e-15, what="sum over classes")
    assert loss.shape == () and loss > 0
