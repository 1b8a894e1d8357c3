"""Every fast CPU kernel (the "cpu" implementations of minunet/ops, compiled by Numba) against the
NumPy reference, exactly as tests/test_kernels.py checks the CUDA kernels.

The reference runs in float64 on the same float32 inputs. Tolerances, |got - want| <= atol +
rtol * |want|: the op's own (conv3x3: atol = rtol = 1e-4 for inputs ~N(0, 1) and sums of at most
~1000 products); a sum of K > 1000 products (the weight gradient sums over all N*Ho*Wo pixels)
gets that tolerance times sqrt(K / 1000), the growth of float32 rounding in a sum whose terms
have random signs. Shapes are odd, with N > 1 and C > 1, and large enough to split into several
tasks and weight-gradient slices, with partial last vectors, tasks and channel groups.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from minunet import ops
from minunet.backends import get_backend
from minunet.backends import reference as R
from minunet.ops import conv3x3, numba_config

from .conftest import assert_close

CPU_FUNCTIONS = [(op, name) for op in ops.OPS for name, impls in op.IMPLEMENTATIONS.items()
                 if "cpu" in impls]


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _in_float64(args):
    return tuple(f64(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)


def _as_list(result):
    return list(result) if isinstance(result, tuple) else [result]


def _outputs(result, args):
    """A function's outputs as a list; for an in-place function (None), its array arguments."""
    if result is None:
        return [a for a in args if isinstance(a, np.ndarray)]
    return _as_list(result)


def test_the_cpu_device_uses_the_fast_kernels():
    backend = get_backend("cpu")
    assert CPU_FUNCTIONS, "no op has a fast CPU kernel"
    for op, name in CPU_FUNCTIONS:
        assert getattr(backend, name) is op.IMPLEMENTATIONS[name]["cpu"], name
        assert getattr(R, name) is op.IMPLEMENTATIONS[name]["reference"], name


@pytest.mark.parametrize("op,name,case", [pytest.param(op, name, case, id=f"{name}-{case}")
                                          for op, name in CPU_FUNCTIONS for case in op.TEST_CASES])
def test_cpu_kernel_matches_reference_on_registry_cases(rng, op, name, case):
    args = op.example(rng, case)[name]
    ref_args = _in_float64(args)
    got = _outputs(op.IMPLEMENTATIONS[name]["cpu"](*args), args)
    want = _outputs(getattr(R, name)(*ref_args), ref_args)
    tol = ops.tolerance(op, name, case)
    assert len(got) == len(want)
    for k, (g, r) in enumerate(zip(got, want)):
        if r is None:
            assert g is None, f"{name} {case} output {k} should be None"
        else:
            if r.dtype.kind in "iu":   # argmax: exact, and of the reference's dtype
                assert g.dtype == r.dtype, f"{name} {case} output {k}: dtype {g.dtype}"
                assert_close(g, r, what=f"{name} {case} output {k}", rtol=0.0, atol=0.0)
            else:
                assert g.dtype == np.float32, f"{name} {case} output {k}: dtype {g.dtype}"
                assert_close(g, r, what=f"{name} {case} output {k}", **tol)


def sum_tolerance(terms: int) -> dict:
    """conv3x3.TOLERANCE for a sum of ``terms`` products, widened by sqrt(terms / 1000) beyond
    1000 terms."""
    scale = max(1.0, math.sqrt(terms / 1000))
    return {k: v * scale for k, v in conv3x3.TOLERANCE.items()}


# (N, Ci, H, W, Co): several forward tasks and weight-gradient slices per plane (H*W > 2048 and
# (H-2)*W > 8192), partial last vector/task/slice, Co not a multiple of 3 (channel groups) nor of
# 2 (pairs), widths 3..5 (vector loops longer than a row), a wide flat row, a deep layer.
CONV_CASES = [(2, 3, 131, 77, 5), (1, 16, 97, 101, 16), (3, 2, 9, 3, 4), (2, 4, 6, 4, 7),
              (2, 5, 7, 5, 1), (1, 3, 4, 301, 2), (2, 37, 12, 11, 65), (1, 1, 70, 69, 8)]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_cpu_kernels_match_reference(rng, case, bias):
    n, ci, h, w, co = case
    x = rng.standard_normal((n, ci, h, w)).astype(np.float32)
    wt = rng.standard_normal((co, ci, 3, 3)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32) if bias else None
    gy = rng.standard_normal((n, co, h - 2, w - 2)).astype(np.float32)
    what = f"conv3x3 cpu {case} bias={bias}"
    y = conv3x3.cpu_forward(x, wt, b)
    assert y.dtype == np.float32
    assert_close(y, R.conv3x3_forward(f64(x), f64(wt), f64(b)), what=f"{what} y",
                 **sum_tolerance(9 * ci))
    gx, gw, gb = conv3x3.cpu_backward(x, wt, gy, bias)
    gx_r, gw_r, gb_r = R.conv3x3_backward(f64(x), f64(wt), f64(gy), bias)
    assert_close(gx, gx_r, what=f"{what} gx", **sum_tolerance(9 * co))
    assert_close(gw, gw_r, what=f"{what} gw", **sum_tolerance(n * (h - 2) * (w - 2)))
    if bias:
        assert_close(gb, gb_r, what=f"{what} gb", **sum_tolerance(n * (h - 2) * (w - 2)))
    else:
        assert gb is None


def test_conv3x3_cpu_takes_views_and_sends_other_dtypes_to_the_reference(rng):
    x = rng.standard_normal((2, 9, 3, 20)).astype(np.float32).transpose(0, 3, 2, 1)  # a view
    wt = rng.standard_normal((3, 20, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 3, 1, 7)).astype(np.float32)
    assert_close(conv3x3.cpu_forward(x, wt), R.conv3x3_forward(f64(x), f64(wt)), what="view y",
                 **conv3x3.TOLERANCE)
    for g, r in zip(conv3x3.cpu_backward(x, wt, gy[:, :, :, ::-1]),
                    R.conv3x3_backward(f64(x), f64(wt), f64(gy[:, :, :, ::-1]))):
        assert_close(g, r, what="view gradients", **conv3x3.TOLERANCE)
    x64, w64 = f64(x), f64(wt)   # float64 (gradient checks): the reference, bit for bit
    assert np.array_equal(conv3x3.cpu_forward(x64, w64), R.conv3x3_forward(x64, w64))
    for g, r in zip(conv3x3.cpu_backward(x64, w64, f64(gy)), R.conv3x3_backward(x64, w64, f64(gy))):
        assert g.dtype == np.float64 and np.array_equal(g, r)


@pytest.mark.skipif(numba_config.max_threads() < 2, reason="needs NUMBA_NUM_THREADS >= 2")
def test_cpu_kernels_give_the_same_bits_for_any_thread_count(rng):
    """The work is split into tasks that do not depend on the thread count, and the partial
    sums are added in a fixed order: 1 and 2 threads give identical results."""
    x = rng.standard_normal((2, 6, 90, 95)).astype(np.float32)
    wt = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    gy = rng.standard_normal((2, 5, 88, 93)).astype(np.float32)
    before = numba_config.num_threads()
    try:
        results = []
        for threads in (1, 2):
            numba_config.set_num_threads(threads)
            results.append([conv3x3.cpu_forward(x, wt, b), *conv3x3.cpu_backward(x, wt, gy)])
    finally:
        numba_config.set_num_threads(before)
    for one, two in zip(*results):
        assert np.array_equal(one, two)


@pytest.mark.parametrize("bad", [0, -1, 10**6, 1.5, True, "2"])
def test_set_num_threads_refuses_bad_counts_in_one_line(bad):
    with pytest.raises(ValueError, match="threads must be an integer from 1 to") as info:
        numba_config.set_num_threads(bad)
    assert "\n" not in str(info.value)


# ---- the 1x1 convolution and the up-convolution (a 1x1 convolution to 4*Co channels) -------
# (N, Ci, H, W, Co): several pixel slices (H*W > 4096), an odd Ci (the single-channel tail), Co
# not a multiple of 4 (channel groups) nor of 2 (weight-gradient pairs).
POINTWISE_CASES = [(2, 7, 67, 71, 5), (1, 16, 90, 91, 2), (3, 33, 5, 9, 13)]


@pytest.mark.parametrize("case", POINTWISE_CASES, ids=str)
def test_conv1x1_and_up_conv_cpu_kernels_match_reference(rng, case):
    n, ci, h, w, co = case
    x = rng.standard_normal((n, ci, h, w)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    pixels = n * h * w
    for op, wshape, yshape in ((ops.conv1x1, (co, ci, 1, 1), (n, co, h, w)),
                               (ops.conv_transpose2x2, (ci, co, 2, 2), (n, co, 2 * h, 2 * w))):
        wt = rng.standard_normal(wshape).astype(np.float32)
        gy = rng.standard_normal(yshape).astype(np.float32)
        what = f"{op.__name__} cpu {case}"
        assert_close(op.cpu_forward(x, wt, b), op.reference_forward(f64(x), f64(wt), f64(b)),
                     what=f"{what} y", **sum_tolerance(ci))
        got = op.cpu_backward(x, wt, gy, True)
        want = op.reference_backward(f64(x), f64(wt), f64(gy), True)
        for g, r, name, terms in zip(got, want, ("gx", "gw", "gb"), (4 * co, pixels, 4 * pixels)):
            assert_close(g, r, what=f"{what} {name}", **sum_tolerance(terms))


# ---- max-pooling, ReLU, SGD: exact ----------------------------------------------------------
def test_max_pool_cpu_matches_reference_exactly_with_ties_and_nans(rng):
    """Odd sizes (the floor drops a row and a column), ties (values from {0, 1}) and NaNs in every
    corner pattern: y, argmax and the routed gradient equal the reference's."""
    x = rng.integers(0, 2, (2, 3, 41, 37)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    y, argmax = ops.maxpool2x2.cpu_forward(x)
    y_ref, argmax_ref = R.max_pool2x2_forward(x)
    assert argmax.dtype == np.uint8
    assert np.isnan(y_ref).any() and (argmax_ref == 3).any()
    assert_close(y, y_ref, what="pool y", rtol=0.0, atol=0.0)
    assert np.array_equal(argmax, argmax_ref)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    assert np.array_equal(ops.maxpool2x2.cpu_backward(gy, argmax, x.shape),
                          R.max_pool2x2_backward(gy, argmax_ref, x.shape))


def test_relu_and_sgd_cpu_equal_the_float32_reference_bit_for_bit(rng):
    """ReLU selects, so it is exact (a NaN stays NaN and gets no gradient); the SGD step rounds
    exactly like the reference (no fused multiply-add): same bits for param and velocity."""
    ew = ops.elementwise
    x = rng.standard_normal((3, 5, 77, 70)).astype(np.float32)   # not a multiple of the block
    x.flat[::97] = np.nan
    x.flat[1::89] = 0.0
    y = ew.relu_cpu_forward(x)
    y_ref = R.relu_forward(x)
    assert np.array_equal(y, y_ref, equal_nan=True)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    assert np.array_equal(ew.relu_cpu_backward(y, gy), R.relu_backward(y_ref, gy))
    param, grad, velocity = (rng.standard_normal(150001).astype(np.float32) for _ in range(3))
    p_ref, v_ref = param.copy(), velocity.copy()
    ew.sgd_cpu_step(param, grad, velocity, 0.01, 0.99)
    R.sgd_step(p_ref, grad, v_ref, 0.01, 0.99)
    assert np.array_equal(param, p_ref) and np.array_equal(velocity, v_ref)


# ---- threads --------------------------------------------------------------------------------
def test_kernels_launched_from_many_python_threads_at_once(tmp_path):
    """Dask runs prediction blocks in threads: four Python threads calling the kernels at once
    must get the single-thread results, on the one layer where this is hard: Numba's workqueue
    (Numba's fallback without TBB and OpenMP) aborts the whole process on a concurrent launch,
    so every launch takes numba_config.LAUNCH_LOCK. In a subprocess (forced onto the workqueue),
    so that an abort fails this test instead of the test run."""
    import os
    import subprocess
    import sys
    script = tmp_path / "threads.py"
    script.write_text(
        "import threading, numpy as np\n"
        "from minunet.ops import conv3x3, numba_config\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((1, 8, 40, 41)).astype(np.float32)\n"
        "w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)\n"
        "want = conv3x3.cpu_forward(x, w)\n"
        "bad = []\n"
        "def work():\n"
        "    for _ in range(50):\n"
        "        if not np.array_equal(conv3x3.cpu_forward(x, w), want):\n"
        "            bad.append(1)\n"
        "threads = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('ok' if not bad else 'wrong', numba_config.threading_layer())\n")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["ok", "workqueue"], \
        done.stdout + done.stderr[-2000:]
