"""Every CUDA kernel (kernels/*.cu through KernelBackend) against the NumPy reference.

Devices: "emu" (the kernels compiled for the CPU by minunet's emulator, which also checks every
access for out-of-bounds and races) and "cuda" (skipped, with the reason, where CuPy sees no GPU).
Both conv3x3 versions ("naive", "tiled") are tested. Shapes are odd, not multiples of the tiles
(32x16 pixels, 8 channels) or blocks, with N > 1 and C > 1; the weight-gradient reductions are
also run split into many pixel slices (``min_pixels_per_slice`` lowered).

The reference runs in float64 on the same (float32) inputs. Tolerances, |got - want| <= atol +
rtol * |want|: sums of products (convolutions, their gradients, loss) atol = rtol = 1e-4 (inputs
~N(0, 1), at most ~1000 terms per sum, float32 rounding ~6e-8 per term); ops that only move or
select values (pooling, crop, ReLU, dropout) must match exactly (atol = rtol = 0), as must the
argmax and the dropout mask.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minunet.backends import reference as R
from minunet.backends.kernels import KernelBackend, KernelError
from minunet.devices import cuda_status, to_host

from .conftest import assert_close

SUM_TOL = dict(rtol=1e-4, atol=1e-4)
EXACT = dict(rtol=0.0, atol=0.0)
DEVICES = ["emu", "cuda"]


def make_backend(device: str, conv3x3: str = "tiled", split: bool = False) -> KernelBackend:
    if device == "cuda":
        available, reason = cuda_status()
        if not available:
            pytest.skip(f"CuPy with a GPU is not available: {reason}")
    backend = KernelBackend(device, conv3x3=conv3x3)
    if split:
        backend.min_pixels_per_slice = 7  # many slices, and a last one that is only partly full
    return backend


def dev(backend, a):
    return backend.xp.asarray(a)


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def check_grads(got, want, names, what, tol=SUM_TOL):
    for g, r, name in zip(got, want, names):
        if r is None:
            assert g is None, f"{what}: {name} should be None"
        else:
            assert_close(to_host(g), r, what=f"{what} {name}", **tol)


# ---- conv3x3 ----------------------------------------------------------------------------------
# (N, Ci, H, W, Co): the smallest input; odd sizes; Ci > 8 and Co > 8 (two channel chunks/groups,
# the second partly empty); an output 16 rows tall and 33 wide (exactly one tile row, two tile
# columns); an output taller than one tile; 3 x 3 tiles and 3 channel chunks/groups per image.
CONV3X3_SHAPES = [(1, 1, 3, 3, 1), (2, 3, 9, 11, 5), (1, 9, 18, 35, 10), (3, 2, 20, 7, 3),
                  (2, 17, 37, 70, 17)]


def run_conv3x3(backend, rng, n, ci, h, w, co, bias=True):
    x, wt = f32(rng, n, ci, h, w), f32(rng, co, ci, 3, 3)
    b = f32(rng, co) if bias else None
    what = f"conv3x3[{backend.conv3x3_version}] {(n, ci, h, w, co)} on {backend.device}"
    y = backend.conv3x3_forward(dev(backend, x), dev(backend, wt), None if b is None else dev(backend, b))
    assert_close(to_host(y), R.conv3x3_forward(f64(x), f64(wt), None if b is None else f64(b)),
                 what=f"{what} forward", **SUM_TOL)
    gy = f32(rng, n, co, h - 2, w - 2)
    got = backend.conv3x3_backward(dev(backend, x), dev(backend, wt), dev(backend, gy), bias)
    want = R.conv3x3_backward(f64(x), f64(wt), f64(gy), bias)
    check_grads(got, want, ("gx", "gw", "gb"), what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", ["naive", "tiled"])
@pytest.mark.parametrize("shape", CONV3X3_SHAPES)
def test_conv3x3_matches_reference(rng, device, version, shape):
    run_conv3x3(make_backend(device, version), rng, *shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", ["naive", "tiled"])
def test_conv3x3_without_bias_and_split_weight_reduction(rng, device, version):
    run_conv3x3(make_backend(device, version, split=True), rng, 2, 5, 12, 9, 6, bias=False)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 2), ci=st.integers(1, 10), co=st.integers(1, 10), h=st.integers(3, 21),
       w=st.integers(3, 36), version=st.sampled_from(["naive", "tiled"]), split=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_conv3x3_random_shapes(device, n, ci, co, h, w, version, split, seed):
    run_conv3x3(make_backend(device, version, split), np.random.default_rng(seed), n, ci, h, w, co)


# ---- max-pooling ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 9, 11), (3, 2, 8, 7), (1, 4, 1, 5)])
def test_max_pool_matches_reference_with_ties(rng, device, shape):
    backend = make_backend(device)
    x = rng.integers(0, 3, shape).astype(np.float32)  # small integers: many ties in every window
    y, argmax = backend.max_pool2x2_forward(dev(backend, x))
    y_ref, argmax_ref = R.max_pool2x2_forward(x)
    assert to_host(argmax).dtype == np.uint8
    assert_close(to_host(y), y_ref, what=f"pool forward {shape}", **EXACT)
    assert_close(to_host(argmax), argmax_ref, what=f"pool argmax {shape}", **EXACT)
    gy = f32(rng, *y_ref.shape)
    gx = backend.max_pool2x2_backward(dev(backend, gy), argmax, x.shape)
    assert_close(to_host(gx), R.max_pool2x2_backward(gy, argmax_ref, x.shape),
                 what=f"pool backward {shape}", **EXACT)


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool_nan_wins_like_pytorch(rng, device):
    """A NaN in a window is the window's maximum and its argmax (the first NaN among several), on
    every device: the kernel's `>` alone is false for NaN, which would drop a NaN that is not in
    the window's first corner. Every pattern of NaNs over the 4 corners, beside numbers that tie."""
    backend = make_backend(device)
    patterns = np.array([[(p >> k) & 1 for k in range(4)] for p in range(16)], bool)  # 16 windows
    x = rng.integers(0, 2, (2, 3, 16, 4)).astype(np.float32)
    x = x.reshape(2, 3, 16, 2, 2).copy()
    x[..., 0, 0][..., patterns[:, 0]] = np.nan
    x[..., 0, 1][..., patterns[:, 1]] = np.nan
    x[..., 1, 0][..., patterns[:, 2]] = np.nan
    x[..., 1, 1][..., patterns[:, 3]] = np.nan
    x = x.reshape(2, 3, 32, 2)  # window k: rows 2k..2k+1, columns 0..1
    y, argmax = backend.max_pool2x2_forward(dev(backend, x))
    y_ref, argmax_ref = R.max_pool2x2_forward(x)
    first_nan = np.where(patterns.any(1), patterns.argmax(1), -1)
    assert np.array_equal(np.isnan(y_ref[0, 0, :, 0]), first_nan >= 0)
    assert np.array_equal(argmax_ref[0, 0, :, 0][first_nan >= 0], first_nan[first_nan >= 0])
    assert_close(to_host(y), y_ref, what="pool forward with NaNs", **EXACT)
    assert_close(to_host(argmax), argmax_ref, what="pool argmax with NaNs", **EXACT)


# ---- transposed convolution -------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,split", [((1, 1, 1, 1, 1), False), ((2, 6, 5, 7, 9), False),
                                         ((3, 10, 4, 3, 17), True), ((2, 3, 6, 5, 2), True)])
def test_conv_transpose2x2_matches_reference(rng, device, shape, split):
    backend = make_backend(device, split=split)
    n, ci, h, w, co = shape
    x, wt, b = f32(rng, n, ci, h, w), f32(rng, ci, co, 2, 2), f32(rng, co)
    for bias in (b, None):
        y = backend.conv_transpose2x2_forward(dev(backend, x), dev(backend, wt),
                                              None if bias is None else dev(backend, bias))
        assert_close(to_host(y), R.conv_transpose2x2_forward(f64(x), f64(wt), None if bias is None else f64(bias)),
                     what=f"conv_transpose2x2 forward {shape}", **SUM_TOL)
    gy = f32(rng, n, co, 2 * h, 2 * w)
    for with_bias in (True, False):
        got = backend.conv_transpose2x2_backward(dev(backend, x), dev(backend, wt), dev(backend, gy), with_bias)
        want = R.conv_transpose2x2_backward(f64(x), f64(wt), f64(gy), with_bias)
        check_grads(got, want, ("gx", "gw", "gb"), f"conv_transpose2x2 {shape}")


# ---- crop and concatenate ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip_shape,up_shape", [((1, 1, 4, 4), (1, 1, 4, 4)),      # no crop
                                                 ((2, 3, 11, 12), (2, 4, 6, 7)),    # odd margins
                                                 ((3, 5, 9, 17), (3, 2, 4, 12))])
def test_crop_concat_matches_reference(rng, device, skip_shape, up_shape):
    backend = make_backend(device)
    skip, up = f32(rng, *skip_shape), f32(rng, *up_shape)
    y = backend.crop_concat_forward(dev(backend, skip), dev(backend, up))
    assert_close(to_host(y), R.crop_concat_forward(skip, up), what="crop_concat forward", **EXACT)
    gy = f32(rng, *y.shape)
    got = backend.crop_concat_backward(dev(backend, gy), skip_shape, up_shape)
    check_grads(got, R.crop_concat_backward(gy, skip_shape, up_shape), ("gskip", "gup"),
                "crop_concat backward", EXACT)


# ---- 1x1 convolution --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,split", [((1, 1, 1, 1, 1), False), ((2, 10, 5, 7, 3), False),
                                         ((3, 17, 4, 9, 2), True)])
def test_conv1x1_matches_reference(rng, device, shape, split):
    backend = make_backend(device, split=split)
    n, ci, h, w, co = shape
    x, wt, b = f32(rng, n, ci, h, w), f32(rng, co, ci, 1, 1), f32(rng, co)
    y = backend.conv1x1_forward(dev(backend, x), dev(backend, wt), dev(backend, b))
    assert_close(to_host(y), R.conv1x1_forward(f64(x), f64(wt), f64(b)), what=f"conv1x1 forward {shape}", **SUM_TOL)
    y = backend.conv1x1_forward(dev(backend, x), dev(backend, wt), None)
    assert_close(to_host(y), R.conv1x1_forward(f64(x), f64(wt), None), what=f"conv1x1 no bias {shape}", **SUM_TOL)
    gy = f32(rng, n, co, h, w)
    for with_bias in (True, False):
        got = backend.conv1x1_backward(dev(backend, x), dev(backend, wt), dev(backend, gy), with_bias)
        check_grads(got, R.conv1x1_backward(f64(x), f64(wt), f64(gy), with_bias), ("gx", "gw", "gb"),
                    f"conv1x1 {shape}")


# ---- ReLU and dropout -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 3, 9, 11)])
def test_relu_matches_reference(rng, device, shape):
    backend = make_backend(device)
    x, gy = f32(rng, *shape), f32(rng, *shape)
    x.flat[0] = 0.0  # the kink: y = 0 there, so no gradient passes
    x.flat[-1] = np.nan  # a NaN stays NaN (CUDA's fmaxf(NaN, 0) would give 0) and passes no gradient
    y = backend.relu_forward(dev(backend, x))
    assert_close(to_host(y), R.relu_forward(x), what="relu forward", **EXACT)
    y_ref = R.relu_forward(x)
    gx = backend.relu_backward(dev(backend, y_ref), dev(backend, gy))
    assert_close(to_host(gx), R.relu_backward(y_ref, gy), what="relu backward", **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p,seed", [(0.0, 0), (0.5, 1), (0.5, 2**32 + 7), (0.9, 123456789), (0.3, -5)])
def test_dropout_mask_is_bit_identical_to_reference(rng, device, p, seed):
    backend = make_backend(device)
    x, gy = f32(rng, 2, 3, 17, 19), f32(rng, 2, 3, 17, 19)
    y, mask = backend.dropout_forward(dev(backend, x), p, seed)
    y_ref, mask_ref = R.dropout_forward(x, p, seed)
    mask = to_host(mask)
    assert mask.dtype == np.uint8 and mask.shape == x.shape
    mismatch = np.argwhere(mask != mask_ref)
    assert mismatch.size == 0, f"dropout masks differ at {len(mismatch)} places, first {mismatch[:5].tolist()}"
    assert abs(mask.mean() - (1 - p)) < 0.05, f"kept fraction {mask.mean():.3f} far from 1 - p = {1 - p}"
    assert_close(to_host(y), y_ref, what=f"dropout forward p={p}", **EXACT)
    gx = backend.dropout_backward(dev(backend, gy), dev(backend, mask), p)
    assert_close(to_host(gx), R.dropout_backward(gy, mask_ref, p), what=f"dropout backward p={p}", **EXACT)


# ---- weighted cross-entropy -------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,scale,weighted", [((1, 2, 1, 1), 1.0, False), ((2, 3, 7, 9), 100.0, True),
                                                  ((3, 2, 20, 21), 5.0, True), ((1, 5, 13, 11), 100.0, False)])
def test_weighted_cross_entropy_matches_reference(rng, device, shape, scale, weighted):
    backend = make_backend(device)
    n, c, h, w = shape
    logits = f32(rng, *shape, scale=scale)  # scale 100: exp() would overflow without the max shift
    target = rng.integers(0, c, (n, h, w)).astype(np.int32)
    weight = rng.uniform(0.1, 10.0, (n, h, w)).astype(np.float32) if weighted else None
    loss, grad = backend.weighted_cross_entropy_forward(dev(backend, logits), dev(backend, target),
                                                        None if weight is None else dev(backend, weight))
    loss_ref, grad_ref = R.weighted_cross_entropy_forward(f64(logits), target, None if weight is None else f64(weight))
    loss = to_host(loss)
    assert loss.shape == () and loss.dtype == np.float32, f"loss must be a 0-d float32 array, got {loss!r}"
    assert np.isfinite(loss)
    assert_close(loss, loss_ref, what=f"cross-entropy loss {shape}", rtol=1e-5, atol=1e-5)
    # gradient entries are O(w / (N*H*W)): scale the absolute tolerance with them
    assert_close(to_host(grad), grad_ref, what=f"cross-entropy grad {shape}", rtol=1e-4,
                 atol=1e-5 / (n * h * w))


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_with_an_invalid_label_gives_nan_not_garbage(rng, device):
    backend = make_backend(device)
    logits, target = f32(rng, 1, 3, 4, 5), np.zeros((1, 4, 5), np.int32)
    target[0, 1, 2] = 3  # class 3 of 3 classes: out of range
    loss, grad = backend.weighted_cross_entropy_forward(dev(backend, logits), dev(backend, target), None)
    assert np.isnan(to_host(loss)) and np.isnan(to_host(grad)[0, :, 1, 2]).all()
    assert np.isfinite(to_host(grad)[0, :, 0, :]).all()


# ---- SGD --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (64, 3, 3, 3), (1000,)])
def test_sgd_step_in_place_matches_reference(rng, device, shape):
    backend = make_backend(device)
    param, velocity = f32(rng, *shape), np.zeros(shape, np.float32)
    param_ref, velocity_ref = param.copy(), velocity.copy()
    param_dev, velocity_dev = dev(backend, param), dev(backend, velocity)
    for step in range(3):
        grad = f32(rng, *shape)
        assert backend.sgd_step(param_dev, dev(backend, grad), velocity_dev, 0.01, 0.99) is None
        R.sgd_step(param_ref, grad, velocity_ref, 0.01, 0.99)
        # a GPU fuses momentum * v + g into one rounding (FMA): 1e-6 relative allows for it
        assert_close(to_host(velocity_dev), velocity_ref, what=f"velocity step {step}", rtol=1e-6, atol=1e-6)
        assert_close(to_host(param_dev), param_ref, what=f"param step {step}", rtol=1e-6, atol=1e-6)


# ---- errors -----------------------------------------------------------------------------------
def test_bad_shapes_raise_one_line_value_errors(rng):
    backend = make_backend("emu")
    x = f32(rng, 1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"conv3x3 weight has shape \(4, 3, 3, 3\)"):
        backend.conv3x3_forward(x, f32(rng, 4, 3, 3, 3), None)
    with pytest.raises(ValueError, match="at least 3x3"):
        backend.conv3x3_forward(f32(rng, 1, 2, 2, 5), f32(rng, 4, 2, 3, 3), None)
    with pytest.raises(ValueError, match="bias has shape"):
        backend.conv1x1_forward(x, f32(rng, 3, 2, 1, 1), f32(rng, 4))
    with pytest.raises(ValueError, match="at least as large"):
        backend.crop_concat_forward(f32(rng, 1, 1, 3, 3), x)
    with pytest.raises(ValueError, match=r"p=1.0 must be in \[0, 1\)"):
        backend.dropout_forward(x, 1.0, 0)
    with pytest.raises(ValueError, match="32-bit indices"):
        backend._empty((2**16, 2**16))  # 2^32 elements: refused before anything is allocated
    with pytest.raises(TypeError, match="in place"):
        backend.sgd_step(x.astype(np.float64), x, x.copy(), 0.1, 0.9)


def test_conv3x3_version_from_argument_or_environment(monkeypatch):
    monkeypatch.setenv("MINUNET_CONV3X3", "naive")
    assert KernelBackend("emu").conv3x3_version == "naive"
    assert KernelBackend("emu", conv3x3="tiled").conv3x3_version == "tiled"
    monkeypatch.setenv("MINUNET_CONV3X3", "fast")
    with pytest.raises(ValueError, match="MINUNET_CONV3X3"):
        KernelBackend("emu")
    with pytest.raises(ValueError, match="'cuda' or 'emu'"):
        KernelBackend("cpu")
    backend = KernelBackend("emu", conv3x3="tiled")
    backend.conv3x3_version = "naive"          # switching later, e.g. on get_backend("emu")
    assert backend.conv3x3_version == "naive"
    with pytest.raises(ValueError, match="use 'naive' or 'tiled'"):
        backend.conv3x3_version = "fast"


def test_a_failed_launch_names_the_kernel():
    backend = make_backend("emu")
    with pytest.raises(KernelError, match="kernel relu_forward .*elementwise.cu"):
        backend._launch("elementwise", "relu_forward", (1,), (32,), (np.zeros(4, np.float32),))


def test_every_backend_function_has_the_reference_signature():
    import inspect

    from minunet.backends import OP_NAMES

    for name in OP_NAMES:
        want = inspect.signature(getattr(R, name))
        got = inspect.signature(getattr(KernelBackend, name))
        params = list(got.parameters.values())[1:]  # without self
        assert got.replace(parameters=params) == want, f"{name}{got} differs from the reference {name}{want}"


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 12), c2=st.integers(1, 12), h=st.integers(1, 19),
       w=st.integers(1, 19), seed=st.integers(0, 2**32 - 1))
def test_pool_transpose_conv1x1_crop_random_shapes(device, n, c, c2, h, w, seed):
    backend = make_backend(device, split=bool(seed % 2))
    rng = np.random.default_rng(seed)
    x, gy_t = f32(rng, n, c, h, w), f32(rng, n, c2, 2 * h, 2 * w)
    y, argmax = backend.max_pool2x2_forward(dev(backend, x))
    y_ref, argmax_ref = R.max_pool2x2_forward(x)
    assert_close(to_host(y), y_ref, what="pool", **EXACT)
    assert_close(to_host(argmax), argmax_ref, what="argmax", **EXACT)
    gy = f32(rng, *y_ref.shape)
    assert_close(to_host(backend.max_pool2x2_backward(dev(backend, gy), argmax, x.shape)),
                 R.max_pool2x2_backward(gy, argmax_ref, x.shape), what="pool backward", **EXACT)
    wt, w1 = f32(rng, c, c2, 2, 2), f32(rng, c2, c, 1, 1)
    check_grads(backend.conv_transpose2x2_backward(dev(backend, x), dev(backend, wt), dev(backend, gy_t), True),
                R.conv_transpose2x2_backward(f64(x), f64(wt), f64(gy_t), True), ("gx", "gw", "gb"), "conv_t")
    gy1 = f32(rng, n, c2, h, w)
    check_grads(backend.conv1x1_backward(dev(backend, x), dev(backend, w1), dev(backend, gy1), True),
                R.conv1x1_backward(f64(x), f64(w1), f64(gy1), True), ("gx", "gw", "gb"), "conv1x1")
    up = f32(rng, n, c2, (h + 1) // 2, (w + 2) // 3)
    assert_close(to_host(backend.crop_concat_forward(dev(backend, x), dev(backend, up))),
                 R.crop_concat_forward(x, up), what="crop_concat", **EXACT)


# ---- the whole network -------------------------------------------------------------------------
def run_training_steps(device: str, steps: int = 2):
    """Two SGD steps of a small U-Net (dropout on, weighted loss, 3 classes, N=2) on ``device``,
    from the same seed: the logits and loss of the first step, then every parameter's gradient
    and value after the last step, all as float64 host arrays."""
    import minunet as mu
    import minunet.functional as F

    rng = np.random.default_rng(7)
    tile = mu.UNet.valid_input_size(61, 2)                      # 64 in, 24 out (depth 2)
    out = mu.UNet.output_size(tile, 2)
    x = rng.standard_normal((2, 1, tile, tile)).astype(np.float32)
    target = rng.integers(0, 3, (2, out, out))
    weight = rng.uniform(0.5, 3.0, (2, out, out)).astype(np.float32)
    model = mu.UNet(in_channels=1, num_classes=3, base_channels=4, depth=2, dropout=0.5, seed=11,
                    device=device)
    opt = mu.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(steps):
        logits = model(mu.Tensor(x, device=device))
        loss = F.weighted_cross_entropy(logits, mu.Tensor(target, device=device),
                                        mu.Tensor(weight, device=device))
        if first is None:
            first = (f64(logits.numpy()), float(loss.numpy()))
        opt.zero_grad()
        loss.backward()
        grads = {n: f64(p.grad.numpy()) for n, p in model.named_parameters()}
        opt.step()
    params = {n: f64(p.numpy()) for n, p in model.named_parameters()}
    return first, grads, params


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_whole_unet_training_steps_match_cpu(device):
    """Issue 3: a whole small U-Net, forward + backward + SGD, on the kernels agrees with the
    NumPy reference. Both run in float32 in different summation orders, and the differences pass
    through ~10 layers and two steps; measured on emu they stay below 1e-6 of each array's largest
    value, so the tolerance is 1e-4 of that value (atol) plus 1e-4 elementwise (rtol)."""
    if device == "cuda":
        make_backend("cuda")  # skips with the reason where there is no GPU
    (logits_ref, loss_ref), grads_ref, params_ref = run_training_steps("cpu")
    (logits, loss), grads, params = run_training_steps(device)

    def close(got, want, what):
        assert_close(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), what=what)

    close(logits, logits_ref, f"logits on {device}")
    assert abs(loss - loss_ref) <= 1e-4 * abs(loss_ref), f"loss {loss} on {device} vs {loss_ref} on cpu"
    assert list(grads) == list(grads_ref)
    for name in grads_ref:
        close(grads[name], grads_ref[name], f"step-2 gradient of {name} on {device}")
        close(params[name], params_ref[name], f"{name} after two SGD steps on {device}")
