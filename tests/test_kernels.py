"""Every CUDA kernel (kernels/*.cu through KernelBackend) against the NumPy reference.

Devices: "emu" (the kernels compiled for the CPU by minunet's emulator, which also checks every
access for out-of-bounds and races) and "cuda" (skipped, with the reason, where CuPy sees no GPU).
Both conv3x3 versions ("naive", "tiled") are tested, and both reductions of weight and bias
gradients ("tree", "serial"), each forced; the "auto" choices between them are tested apart.
Shapes are odd, not multiples of the tiles (32x16 pixels, 8 channels) or blocks, with N > 1 and
C > 1; the tree reductions are also run split into many pixel slices (``min_pixels_per_slice``
lowered).

The reference runs in float64 on the same (float32) inputs. Tolerances, |got - want| <= atol +
rtol * |want|: sums of products (convolutions, their gradients, loss) atol = rtol = 1e-4 (inputs
~N(0, 1), at most ~1000 terms per sum, float32 rounding ~6e-8 per term); ops that only move or
select values (pooling, crop, ReLU, dropout) must match exactly (atol = rtol = 0), as must the
argmax and the dropout mask.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minunet import ops
from minunet.backends import function_names
from minunet.backends import reference as R
from minunet.backends.kernels import KernelBackend, KernelError
from minunet.devices import cuda_status, to_host

from .conftest import assert_close

SUM_TOL = dict(rtol=1e-4, atol=1e-4)
EXACT = dict(rtol=0.0, atol=0.0)
DEVICES = ["emu", "cuda"]


def make_backend(device: str, conv3x3: str = "tiled", split: bool = False, reduction: str = "tree") -> KernelBackend:
    if device == "cuda":
        available, reason = cuda_status()
        if not available:
            pytest.skip(f"CuPy with a GPU is not available: {reason}")
    backend = KernelBackend(device, conv3x3=conv3x3, reduction=reduction)
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


# ---- every backend function of every op, on the registry's cases (minunet/ops) ------------------
def _variants(op, function):
    """(conv3x3 version, split tree reduction, reduction) triples worth running for a function."""
    variants = [("tiled", False, "tree")]
    if op is ops.conv3x3:
        variants.append(("naive", False, "tree"))
        variants.append(("igemm", False, "tree"))   # FP32 implicit GEMM (wmma, TF32: tests/test_kernels_conv3x3.py)
    if function.endswith("_backward") and hasattr(op, "GW_THREADS"):
        variants.append(("tiled", True, "tree"))     # many pixel slices, the last one only partly full
        variants.append(("tiled", False, "serial"))  # one thread per weight and per bias
    return variants


REGISTRY_CASES = [pytest.param(op, function, case, version, split, reduction,
                               id=f"{function}-{case}-{version}-{reduction}{'-split' if split else ''}")
                  for op in ops.OPS for case in op.TEST_CASES for function in op.IMPLEMENTATIONS
                  for version, split, reduction in _variants(op, function)]


def _on_device(backend, args):
    """Copies of the array arguments on the backend's device (a kernel may update them in place)."""
    return tuple(backend.xp.array(a) if isinstance(a, np.ndarray) else a for a in args)


def _in_float64(args):
    return tuple((f64(a) if a.dtype.kind == "f" else a.copy()) if isinstance(a, np.ndarray) else a
                 for a in args)


def _outputs(result, args):
    """A function's outputs as a list; for an in-place function (None), its array arguments."""
    if result is None:
        return [a for a in args if hasattr(a, "shape")]
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,function,case,version,split,reduction", REGISTRY_CASES)
def test_kernel_matches_reference(rng, device, op, function, case, version, split, reduction):
    """The kernels' result for one function on one case of its op's TEST_CASES, against the
    reference in float64 on the same float32 inputs, within the op's stated tolerance (exact for
    ops that move or select values; argmax and dropout masks always exact)."""
    backend = make_backend(device, version, split, reduction)
    args = op.example(rng, case)[function]
    dev_args = _on_device(backend, args)
    got = _outputs(getattr(backend, function)(*dev_args), dev_args)
    ref_args = _in_float64(args)
    want = _outputs(getattr(R, function)(*ref_args), ref_args)
    assert len(got) == len(want), f"{function}: {len(got)} outputs, the reference has {len(want)}"
    tol = ops.tolerance(op, function, case)
    for k, (g, r) in enumerate(zip(got, want)):
        what = f"{function} {case} output {k} on {device} [{version}, {reduction}{', split' if split else ''}]"
        if r is None:
            assert g is None, f"{what} should be None"
            continue
        g = to_host(g)
        if r.dtype.kind in "iu":   # argmax, masks: exact, and of the reference's dtype
            assert g.dtype == r.dtype, f"{what}: dtype {g.dtype}, the reference's is {r.dtype}"
            assert_close(g, r, what=what, **EXACT)
        else:
            assert_close(g, r, what=what, **tol)


def test_every_function_has_one_signature_on_every_backend():
    """The contract: for each backend function the reference, the fast CPU path and the kernel
    launcher (without its backend argument) take the same parameters."""
    import inspect

    table = ops.functions()
    assert set(table) == set(function_names())
    for name, impls in table.items():
        want = inspect.signature(impls["reference"])
        for kind in ("cpu", "kernels"):
            got = inspect.signature(impls[kind])
            params = list(got.parameters.values())[1 if kind == "kernels" else 0:]
            assert got.replace(parameters=params) == want, \
                f"{name}: the {kind} implementation takes {got}, the reference {want}"
        for backend in (R, KernelBackend):
            assert callable(getattr(backend, name)), f"{name} is missing on {backend}"


# ---- conv3x3: more shapes, no bias ----------------------------------------------------------------
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
def test_conv3x3_without_bias_and_split_weight_reduction(rng, device, version):
    run_conv3x3(make_backend(device, version, split=True), rng, 2, 5, 12, 9, 6, bias=False)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 2), ci=st.integers(1, 10), co=st.integers(1, 10), h=st.integers(3, 21),
       w=st.integers(3, 36), version=st.sampled_from(["naive", "tiled", "auto"]), split=st.booleans(),
       reduction=st.sampled_from(["tree", "serial", "auto"]), seed=st.integers(0, 2**32 - 1))
def test_conv3x3_random_shapes(device, n, ci, co, h, w, version, split, reduction, seed):
    run_conv3x3(make_backend(device, version, split, reduction), np.random.default_rng(seed), n, ci, h, w, co)


# ---- max-pooling ------------------------------------------------------------------------------
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


# ---- dropout: several p and seeds ---------------------------------------------------------
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
        backend.empty((2**16, 2**16))  # 2^32 elements: refused before anything is allocated
    with pytest.raises(TypeError, match="in place"):
        backend.sgd_step(x.astype(np.float64), x, x.copy(), 0.1, 0.9)


@pytest.mark.parametrize("keyword,attribute,variable,versions", [
    ("conv3x3", "conv3x3_version", "MINUNET_CONV3X3", ("auto", "naive", "tiled")),
    ("reduction", "reduction", "MINUNET_REDUCTION", ("auto", "tree", "serial")),
])
def test_kernel_choices_from_argument_environment_or_attribute(monkeypatch, keyword, attribute, variable, versions):
    """Each choice: "auto" by default, else the environment variable (read when the backend is
    created), the constructor's argument over it, the attribute later; a bad value is a one-line
    ValueError that names where it came from and the allowed values."""
    monkeypatch.delenv(variable, raising=False)
    assert getattr(KernelBackend("emu"), attribute) == "auto"
    monkeypatch.setenv(variable, versions[1])
    assert getattr(KernelBackend("emu"), attribute) == versions[1]
    assert getattr(KernelBackend("emu", **{keyword: versions[2]}), attribute) == versions[2]
    monkeypatch.setenv(variable, "fast")
    with pytest.raises(ValueError, match=variable):
        KernelBackend("emu")
    backend = KernelBackend("emu", **{keyword: versions[2]})
    setattr(backend, attribute, versions[1])          # switching later, e.g. on get_backend("emu")
    assert getattr(backend, attribute) == versions[1]
    with pytest.raises(ValueError, match="use one of: " + ", ".join(versions)):
        setattr(backend, attribute, "fast")
    with pytest.raises(ValueError, match="'cuda' or 'emu'"):
        KernelBackend("cpu")


def _launched(backend, monkeypatch) -> list[str]:
    """The kernel names ``backend`` launches from now on (recorded, then launched as usual)."""
    names, launch = [], backend.launch

    def record(file, kernel, grid, block, args):
        names.append(kernel)
        launch(file, kernel, grid, block, args)

    monkeypatch.setattr(backend, "launch", record)
    return names


@pytest.mark.parametrize("shape,forward,grad_input,grad_weight", [
    # 38 x 38 outputs fill a 16 x 32 tile; 54 weights < 1444 pixels
    ((1, 2, 40, 40, 3), "tiled", "tiled", "tree"),
    # exactly one tile (16 x 32 = 512 outputs); 576 weights >= 512 pixels, but 512-step loops in
    # only 576 threads: tree
    ((1, 8, 18, 34, 8), "tiled", "tiled", "tree"),
    # one output row short of a tile (480 outputs); the input gradient's 17 x 34 plane fills one
    ((1, 8, 17, 34, 8), "naive", "tiled", "tree"),
    # U-Net's deepest layers: 4,608 weights of 32 = 2 x 4 x 4 pixels each: short loops
    ((2, 16, 6, 6, 32), "naive", "naive", "serial"),
    # 36,864 weights of 400 pixels: many threads, so serial
    ((1, 64, 22, 22, 64), "naive", "naive", "serial"),
    # 4,608 weights, 4,624 pixels: fewer outputs than terms, tree
    ((1, 16, 70, 70, 32), "tiled", "tiled", "tree"),
])
def test_auto_picks_kernels_by_shape(rng, monkeypatch, shape, forward, grad_input, grad_weight):
    """"auto" runs the tiled convolution only when the output plane fills a tile (the forward
    pass: Ho x Wo; the input gradient: H x W), and the serial weight (and bias) gradient when
    there are at least as many weights as pixels and either the loops are short (<= 64 terms) or
    the threads many (>= 4096); the result matches the reference either way. The expected
    kernels are written out per case; the bias gradient never needs a launch of its own."""
    n, ci, h, w, co = shape
    backend = KernelBackend("emu", conv3x3="auto", reduction="auto")
    names = _launched(backend, monkeypatch)
    run_conv3x3(backend, rng, n, ci, h, w, co)
    assert names[0] == f"conv3x3_forward_{forward}"
    assert f"conv3x3_grad_input_{grad_input}" in names
    assert ("conv3x3_grad_weight_serial" in names) == (grad_weight == "serial")
    assert ("conv3x3_grad_weight" in names) == (grad_weight == "tree")
    assert len(names) == 3 + (names.count("sum_partials"))   # forward, grad input, grad weight + bias


def test_a_failed_launch_names_the_kernel():
    backend = make_backend("emu")
    with pytest.raises(KernelError, match="kernel relu_forward .*elementwise.cu"):
        backend.launch("elementwise", "relu_forward", (1,), (32,), (np.zeros(4, np.float32),))


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


# ---- the shared launch machinery (minunet/backends/kernels.py) ---------------------------------
def test_fresh_outputs_on_emu_are_poisoned_so_an_unwritten_element_fails():
    """A kernel that forgets part of its output must not pass on leftover memory: on emu a fresh
    output is NaN (floats) or 0xFF (integers). Launch relu on only the first block of 256 of a
    300-element output: the last 44 stay NaN."""
    backend = make_backend("emu")
    assert np.isnan(backend.empty((3, 5))).all() and (backend.empty((4,), np.uint8) == 255).all()
    x = np.ones(300, np.float32)
    y = backend.empty(x.shape)
    backend.launch("elementwise", "relu_forward", (1,), (256,), (x, y, np.int32(300)))
    assert (y[:256] == 1).all() and np.isnan(y[256:]).all()


def test_launches_whose_thread_index_would_overflow_int32_are_refused():
    backend = make_backend("emu")
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="overflow the kernels' 32-bit thread index"):
        backend.launch("elementwise", "relu_forward", (2**23,), (256,), (x, x, np.int32(4)))


def test_sgd_step_refuses_aliased_arrays():
    """sgd_momentum's pointers are __restrict__: aliased arguments would be undefined behaviour."""
    backend = make_backend("emu")
    param, grad = np.ones(8, np.float32), np.ones(8, np.float32)
    with pytest.raises(ValueError, match="param and velocity share memory"):
        backend.sgd_step(param, grad, param, 0.1, 0.9)
    with pytest.raises(ValueError, match="param and grad share memory"):
        backend.sgd_step(param, param, np.zeros(8, np.float32), 0.1, 0.9)


def test_an_edited_kernel_file_is_compiled_again_after_reload(tmp_path, monkeypatch):
    """The module cache follows the file when asked: an edited .cu file takes effect after
    ``backend.reload()`` without a restart; without it, launches use the module already built
    (no file-system call per launch)."""
    import minunet.backends.kernels as kernels_module
    import minunet.backends.sources as sources_module

    source = ('extern "C" __global__ void fill(float* y, int n) {\n'
              '    const int t = blockIdx.x * blockDim.x + threadIdx.x;\n'
              '    if (t < n) y[t] = VALUE;\n}\n')
    path = tmp_path / "probe.cu"
    monkeypatch.setattr(kernels_module, "kernels_dir", lambda: tmp_path)
    monkeypatch.setattr(sources_module, "kernels_dir", lambda: tmp_path)
    backend = KernelBackend("emu")

    def edit_and_launch(value: str, stamp: int) -> float:
        path.write_text(source.replace("VALUE", value))
        os.utime(path, ns=(0, stamp * 10**9))  # a distinct modification time, even if fast
        y = np.zeros(4, np.float32)
        backend.launch("probe", "fill", (1,), (32,), (y, np.int32(4)))
        return float(y[0])

    assert edit_and_launch("1.0f", 1) == 1.0
    assert edit_and_launch("2.0f", 2) == 1.0          # not looked at again before reload()
    assert backend.reload() == [str(path)]
    assert edit_and_launch("2.0f", 2) == 2.0
    assert backend.reload() == []                     # unchanged: kept
    path.unlink()
    assert backend.reload() == [str(path)]
    with pytest.raises(KernelError, match="no kernel file"):
        backend.launch("probe", "fill", (1,), (32,), (np.zeros(4, np.float32), np.int32(4)))


def test_launch_constants_are_read_from_the_cu_files_defines(tmp_path, monkeypatch):
    import minunet.backends.sources as sources_module

    (tmp_path / "consts.cu").write_text("#define A 4\n#define B (A * 8)  // comment\n#define C B / 3\n"
                                       "#define F(x) (x + 1)\n#define S \"text\"\n")
    monkeypatch.setattr(sources_module, "kernels_dir", lambda: tmp_path)
    assert sources_module.cu_defines("consts") == {"A": 4, "B": 32, "C": 10}
    assert (ops.conv3x3.TILE_W, ops.conv3x3.TILE_H) == (32, 16)  # from kernels/conv3x3.cu


def test_the_kernel_backend_follows_the_emulator_mode():
    """set_emu_mode("fast") takes effect on the cached backend: its modules are built per mode,
    and the fast build gives the checked build's answers (here the tiled conv and its gradients)."""
    from minunet import emulator

    backend = make_backend("emu")
    previous = emulator.emu_mode()
    try:
        emulator.set_emu_mode("fast")
        assert backend.module("conv3x3").mode == "fast"
        run_conv3x3(backend, np.random.default_rng(5), 2, 9, 19, 35, 10)
    finally:
        emulator.set_emu_mode(previous)
    assert backend.module("conv3x3").mode == previous


# ---- kernels whose threads share memory, under several thread orders ----------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shared_memory_kernels_under_other_shuffle_seeds(seed):
    """The emulator runs a block's threads between barriers in a shuffled order; a race that one
    order hides shows under another (and the race checker reports it). The kernels that cooperate
    through shared memory (tiled conv, the weight-gradient and sum reductions, the loss mean) are
    run under three more seeds against the reference."""
    from minunet import emulator

    previous = emulator.shuffle_seed()
    emulator.set_shuffle_seed(seed)
    try:
        rng = np.random.default_rng(seed)
        backend = make_backend("emu", "tiled", split=True)
        run_conv3x3(backend, rng, 2, 9, 19, 35, 10)
        case = ((2, 3, 20, 21), 5.0, True)
        args = ops.cross_entropy.example(rng, case)["weighted_cross_entropy_forward"]
        loss, grad = backend.weighted_cross_entropy_forward(*args)
        loss_ref, grad_ref = R.weighted_cross_entropy_forward(*_in_float64(args))
        assert_close(to_host(loss), loss_ref, what=f"loss, seed {seed}", rtol=1e-5, atol=1e-6)
        assert_close(to_host(grad), grad_ref, what=f"loss gradient, seed {seed}",
                     **ops.tolerance(ops.cross_entropy, "weighted_cross_entropy_forward", case))
    finally:
        emulator.set_shuffle_seed(previous)
