"""The 3x3 convolution's implicit-GEMM kernels (v3 "igemm", v4 "wmma", v5 "wmma_big" in
kernels/conv3x3.cu), the
fused conv + ReLU op, and the skipped input gradient of the network's input.

Every test runs on "emu" in the emulator's checked mode (out-of-bounds accesses, races, unwritten
shared memory and outputs are errors), against the NumPy reference in float64 on the same float32
inputs. Shapes are small (checked mode is slow) but cover: N > 1, odd planes that are not
multiples of any tile (wide 8 x 32, deep 8 x 8, wmma 8 x 16), channel counts that are not
multiples of the channel tiles (16, 32, 64) or chunks (4, 8), one input channel (U-Net's first layer),
deep small planes with many channels (which split their source channels), bias or none, ReLU
fused or not.

Tolerances, |got - want| <= bound:
- FP32 kernels (naive, tiled, igemm): atol = rtol = 1e-4 (sums of at most ~700 products of
  N(0, 1) values in float32, rounding ~6e-8 per term), as tests/test_kernels.py.
- TF32 (wmma, wmma_big): each operand is rounded to 10 mantissa bits (relative error <= 2^-11), so each
  product is off by at most ~2^-10 of |a * b|, and a sum of products by at most 2^-10 * sum |a * b|:
  the bound is 2^-10 times the same convolution of the absolute values (computed by the reference),
  plus the FP32 tolerance above. This is a guaranteed bound, not a fitted one.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F
from minunet import backends, nn
from minunet.backends.kernels import CONV3X3_VERSIONS, KernelBackend
from minunet.backends.sources import kernel_source, kernels_dir
from minunet.devices import cuda_status, to_host
from minunet.emulator import EmuModule
from minunet.ops import conv3x3 as C

from .conftest import assert_close, compile_with_cuda_headers

SUM_TOL = dict(rtol=1e-4, atol=1e-4)
TF32_REL = 2.0 ** -10
GEMM = ("igemm", "wmma", "wmma_big")
TF32_GEMM = ("wmma", "wmma_big")   # tensor-core versions: TF32 operands whatever the precision

# (N, Ci, H, W, Co). Output planes: 7x9 (smaller than every tile), 10x38 (one input channel, two
# narrow tiles across, none full), 5x6 with 20 -> 33 channels (deep tile, 2 channel splits),
# 4x4 with 37 -> 70 channels (U-Net's deepest plane; 70 > 64: two channel blocks, the second
# nearly empty; the input gradient splits 70 channels), 18x33 (more than one tile each way),
# 16x16 with 48 -> 40 channels (a deep plane of the default network: 2 x 2 deep tiles, 3 splits),
# 9x31 with 6 -> 30 channels (the wide tile). test_cases_reach_every_shape checks the coverage.
CASES = [(2, 3, 9, 11, 5), (1, 1, 12, 40, 7), (2, 20, 7, 8, 33), (1, 37, 6, 6, 70), (2, 9, 20, 35, 10),
         (1, 48, 18, 18, 40), (2, 6, 11, 33, 30)]


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def backend(version: str, precision: str = "fp32") -> KernelBackend:
    return KernelBackend("emu", conv3x3=version, precision=precision)


def tolerance_bound(tf32, want, want_abs):
    """|got - want| allowed elementwise: FP32 sums, plus the TF32 rounding bound for wmma."""
    bound = SUM_TOL["atol"] + SUM_TOL["rtol"] * np.abs(want)
    if tf32:
        bound = bound + TF32_REL * want_abs
    return bound


def assert_within(got, want, bound, what):
    err = np.abs(f64(got) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{what}: |got - want| = {err[worst]:.3g} > {bound[worst]:.3g} at {worst} "
                                  f"(got {f64(got)[worst]:.6g}, want {want[worst]:.6g})")


def run_case(k, rng, case, bias=True, relu=False):
    """Forward and backward of one case on backend ``k`` against the float64 reference. With relu
    the reference masks gy by the kernel's own output y (the mask of relu(conv) at the computed
    y: a TF32 y within rounding of 0 may sit on the other side of it than the exact one)."""
    n, ci, h, wd, co = case
    x, w, gy = f32(rng, n, ci, h, wd), f32(rng, co, ci, 3, 3), f32(rng, n, co, h - 2, wd - 2)
    b = f32(rng, co) if bias else None
    version = k.conv3x3_version
    tf32 = version in TF32_GEMM or (version == "auto" and k.precision == "tf32")   # (see test_auto_choice)
    what = f"conv3x3[{version}, relu={relu}, bias={bias}] {case}"

    y = to_host(k.conv3x3_forward(x, w, b, relu=relu))
    want = C.reference_forward(f64(x), f64(w), None if b is None else f64(b), relu)
    want_abs = C.reference_forward(np.abs(f64(x)), np.abs(f64(w)), None if b is None else np.abs(f64(b)))
    assert_within(y, want, tolerance_bound(tf32, want, want_abs), f"{what} forward")

    mask = y if relu else None
    gx, gw, gb = (None if a is None else to_host(a) for a in k.conv3x3_backward(x, w, gy, bias, y=mask))
    g = f64(gy) * (f64(mask) > 0) if relu else f64(gy)
    rx, rw, rb = C.reference_backward(f64(x), f64(w), g, bias)
    ax, aw, ab = C.reference_backward(np.abs(f64(x)), np.abs(f64(w)), np.abs(g), True)
    assert_within(gx, rx, tolerance_bound(tf32, rx, ax), f"{what} gx")
    # the weight and bias gradients' kernels follow the precision (TF32 GEMMs under "tf32")
    tf32_gw = k.precision == "tf32"
    assert_within(gw, rw, tolerance_bound(tf32_gw, rw, aw), f"{what} gw")
    if bias:
        assert_within(gb, rb, tolerance_bound(tf32_gw, rb, ab), f"{what} gb")
    else:
        assert gb is None


@pytest.mark.parametrize("case", CASES[:4] + CASES[-1:], ids=str)
@pytest.mark.parametrize("version", GEMM)
def test_gemm_versions_on_cuda(version, case):
    """The same checks on a real GPU (skipped without one; run by `pytest -k cuda`)."""
    available, reason = cuda_status()
    if not available:
        pytest.skip(f"CuPy with a GPU is not available: {reason}")
    k = KernelBackend("cuda", conv3x3=version)
    run_case(k, np.random.default_rng(sum(case)), case, bias=True, relu=True)


def test_versions_are_listed_for_the_benchmark():
    assert CONV3X3_VERSIONS == ("auto", "naive", "tiled", "igemm", "wmma", "wmma_big")


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("version", GEMM)
def test_gemm_versions_match_reference(version, case, relu):
    """v3, v4 and v5, forced, on every case, with the bias and the ReLU fused or not."""
    run_case(backend(version), np.random.default_rng(sum(case) + relu), case, bias=True, relu=relu)


@pytest.mark.parametrize("case", C.TEST_CASES, ids=str)
@pytest.mark.parametrize("version", GEMM)
def test_gemm_versions_on_the_registry_cases(version, case):
    """The op's own TEST_CASES (the smallest input 3x3, a 3 x 131 output, ...), fused ReLU."""
    run_case(backend(version), np.random.default_rng(len(case) + sum(case)), case, bias=True, relu=True)


@pytest.mark.parametrize("version", ["naive", "tiled", *GEMM])
def test_every_version_without_bias_and_with_fused_relu(version):
    """The fused op on every version (v1/v2 apply the ReLU and its mask as separate passes)."""
    run_case(backend(version), np.random.default_rng(3), (2, 6, 11, 13, 9), bias=False, relu=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_shapes_every_gemm_version(seed):
    """Random odd shapes (seeded): every GEMM version on the same draw, fp32 and tf32 precision."""
    rng = np.random.default_rng(100 + seed)
    case = (int(rng.integers(1, 3)), int(rng.integers(1, 41)), int(rng.integers(3, 23)),
            int(rng.integers(3, 40)), int(rng.integers(1, 41)))
    for version in GEMM:
        k = backend(version, precision=("fp32", "tf32")[seed % 2])
        run_case(k, np.random.default_rng(seed), case, bias=bool(seed % 2), relu=seed != 1)


def test_channel_split_is_deterministic_and_matches_one_part(monkeypatch):
    """A deep layer's source channels split into parts (gemm_plan) gives the unsplit result up to
    float32 rounding, and the same bits on every run (a fixed order, no atomics)."""
    rng = np.random.default_rng(5)
    x, w, b = f32(rng, 1, 48, 6, 6), f32(rng, 40, 48, 3, 3), f32(rng, 40)
    k = backend("igemm")
    plan = C.gemm_plan("igemm", 1, 48, 40, 4, 4)
    assert plan.shape is C.IGEMM_DEEP and plan.splits == 3 and plan.per_split == 16
    split = k.conv3x3_forward(x, w, b, relu=True)
    assert np.array_equal(split, k.conv3x3_forward(x, w, b, relu=True))
    monkeypatch.setattr(C, "TARGET_BLOCKS", 1)
    assert C.gemm_plan("igemm", 1, 48, 40, 4, 4).splits == 1
    assert_close(k.conv3x3_forward(x, w, b, relu=True), split, what="unsplit vs split", **SUM_TOL)


@pytest.mark.parametrize("version", GEMM)
def test_same_bits_under_every_thread_and_block_order(version):
    """The emulator runs threads and blocks in a shuffled order (checked mode); three shuffle
    seeds give the same bits, on a case with a channel split and the ReLU mask (no result may
    depend on the schedule: the split parts are added in a fixed order, no atomics)."""
    rng = np.random.default_rng(12)
    x, w, b = f32(rng, 2, 40, 7, 9), f32(rng, 24, 40, 3, 3), f32(rng, 24)
    gy = f32(rng, 2, 24, 5, 7)
    k = backend(version)
    results = []
    try:
        for seed in (1, 2, 3):
            k.module("conv3x3").shuffle_seed = seed
            y = k.conv3x3_forward(x, w, b, relu=True)
            results.append((y, *k.conv3x3_backward(x, w, gy, True, y=y)))
    finally:
        k.module("conv3x3").shuffle_seed = None    # back to the process-wide default
    for other in results[1:]:
        assert all(np.array_equal(a, c) for a, c in zip(results[0], other))


def test_cases_reach_every_shape():
    """CASES run every igemm and wmma tile shape and the channel split (forward and input gradient),
    and wmma_big (one tile shape) with and without a split."""
    plans = [C.gemm_plan("igemm", n, ci, co, h - 2, w - 2) for n, ci, h, w, co in CASES]
    plans += [C.gemm_plan("igemm", n, co, ci, h, w) for n, ci, h, w, co in CASES]
    assert {p.shape for p in plans} == {C.IGEMM_WIDE, C.IGEMM_NARROW, C.IGEMM_DEEP}
    wmma = [C.gemm_plan("wmma", n, ci, co, h - 2, w - 2) for n, ci, h, w, co in CASES]
    wmma += [C.gemm_plan("wmma", n, co, ci, h, w) for n, ci, h, w, co in CASES]
    assert {p.shape for p in wmma} == {C.WMMA, C.WMMA_NARROW}
    big = [C.gemm_plan("wmma_big", n, ci, co, h - 2, w - 2) for n, ci, h, w, co in CASES]
    big += [C.gemm_plan("wmma_big", n, co, ci, h, w) for n, ci, h, w, co in CASES]
    assert {p.shape for p in big} == {C.WMMA_BIG} and {p.splits > 1 for p in big} == {True, False}
    assert any(p.splits > 1 for p in plans) and any(p.splits > 1 for p in wmma)


@pytest.mark.parametrize("args,shape,splits", [
    # 568 x 568 output, 64 -> 64 channels: the wide tile, thousands of blocks
    ((1, 64, 64, 568, 568), C.IGEMM_WIDE, 1),
    # a 20 x 20 plane: narrower than a wide tile -> deep tile (3 x 3 tiles, 2 channel blocks),
    # 18 blocks, split into 128 / 16 = 8 parts
    ((1, 128, 128, 20, 20), C.IGEMM_DEEP, 8),
    # the first layer: 1 source channel, never split
    ((1, 1, 64, 4, 4), C.IGEMM_DEEP, 1),
    # a base-16 network's full-resolution layer: 16 channels -> narrow (wide would pad 16 more)
    ((1, 16, 16, 344, 344), C.IGEMM_NARROW, 1),
    # 256 channels on 136 x 136: wide pads 136 columns to 160 (1.18x, within the slack)
    ((1, 256, 256, 136, 136), C.IGEMM_WIDE, 1),
    # 1024 channels on 28 x 28: wide (as padded as deep), 128 blocks < 264: split in 3
    ((1, 1024, 1024, 28, 28), C.IGEMM_WIDE, 3),
])
def test_gemm_plan_picks_tile_and_split_from_the_shape(args, shape, splits):
    n, c_src, c_dst, h, w = args
    plan = C.gemm_plan("igemm", n, c_src, c_dst, h, w)
    assert plan.shape is shape and plan.splits == splits
    assert plan.per_split % shape.ci == 0 and (plan.splits - 1) * plan.per_split < c_src   # no empty part
    assert plan.grid[2] == plan.splits * n


@pytest.mark.parametrize("args,grid,splits", [
    # the paper's widest layer: 64 -> 64 channels on a 568 x 568 output, one 64-channel block
    # per 8 x 16 tile (v4: two 32-channel blocks)
    ((1, 64, 64, 568, 568), (71 * 36, 1, 1), 1),
    # its input gradient: a 570 x 570 plane
    ((1, 64, 64, 570, 570), (72 * 36, 1, 1), 1),
    # the bottom: 1024 channels on 28 x 28, 8 tiles x 16 channel blocks = 128 < 264: split in 3
    ((1, 1024, 1024, 28, 28), (8, 16, 3), 3),
    # fewer than 64 channels: the one tile, mostly padding (the tuner measures whether it pays)
    ((2, 8, 20, 9, 11), (2, 1, 2), 1),
])
def test_gemm_plan_of_wmma_big(args, grid, splits):
    n, c_src, c_dst, h, w = args
    plan = C.gemm_plan("wmma_big", n, c_src, c_dst, h, w)
    assert plan.shape is C.WMMA_BIG and (plan.shape.bm, plan.shape.th, plan.shape.tw) == (64, 8, 16)
    assert plan.grid == grid and plan.splits == splits
    assert plan.per_split % plan.shape.ci == 0 and (plan.splits - 1) * plan.per_split < c_src


@pytest.mark.parametrize("device", ["emu", "cuda"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4], (2, 16, 13, 21, 64)], ids=str)
def test_wmma_big_is_bit_identical_to_wmma(case, device):
    """v5 rounds each operand to TF32 once, as it is stored to shared memory; v4 rounds it after
    every fragment load. Rounding is elementwise, and both add the same products in the same
    order (per output: the chunks, the 9 taps, 8 channels a mma_sync), so where both plans split
    the source channels alike, the output, the input gradient and the masked gy (hence the
    weight and bias gradients) are the same bits. The cases mix 1 and several splits, ReLU on.
    On cuda (skipped without a GPU) it checks the same on the tensor cores."""
    if device == "cuda":
        available, reason = cuda_status()
        if not available:
            pytest.skip(f"CuPy with a GPU is not available: {reason}")
    n, ci, h, wd, co = case
    for args in ((n, ci, co, h - 2, wd - 2), (n, co, ci, h, wd)):   # forward, input gradient
        assert C.gemm_plan("wmma", *args).splits == C.gemm_plan("wmma_big", *args).splits
    rng = np.random.default_rng(sum(case))
    x, w, b, gy = f32(rng, n, ci, h, wd), f32(rng, co, ci, 3, 3), f32(rng, co), f32(rng, n, co, h - 2, wd - 2)
    results = []
    for version in TF32_GEMM:
        k = KernelBackend(device, conv3x3=version)
        y = k.conv3x3_forward(x, w, b, relu=True)
        results.append([to_host(y), *(to_host(a) for a in k.conv3x3_backward(x, w, gy, True, y=y))])
    for name, v4, v5 in zip(("y", "gx", "gw", "gb"), *results):
        assert np.array_equal(v4, v5), f"{case}: {name} differs between wmma and wmma_big"


def test_auto_choice_per_device_and_precision(monkeypatch):
    """"auto": cuda -> a version measured on a GPU for the layer if the choices table has one,
    else igemm (fp32) or wmma (tf32, >= 8 source channels, tensor cores); emu -> the emulator's
    choice (tiled / naive by plane size, wmma under tf32)."""
    def fake(device, precision, tensor_cores=True):
        return SimpleNamespace(device=device, precision=precision, conv3x3_version="auto",
                               _conv3x3_tensor_cores=tensor_cores)

    big, deep, first = (1, 64, 102, 102, 64), (1, 64, 6, 6, 64), (1, 1, 102, 102, 64)
    monkeypatch.setenv("MINUNET_CHOICES", "off")          # the rules alone (no measured table)
    assert C.conv3x3_version(fake("cuda", "fp32"), big) == "igemm"
    assert C.conv3x3_version(fake("cuda", "tf32"), big) == "wmma"
    assert C.conv3x3_version(fake("cuda", "tf32"), first) == "igemm"            # 1 source channel
    assert C.conv3x3_version(fake("cuda", "tf32"), first, grad_input=True) == "wmma"   # 64 of gy
    assert C.conv3x3_version(fake("cuda", "tf32", tensor_cores=False), big) == "igemm"
    assert C.conv3x3_version(fake("emu", "fp32"), big) == "tiled"
    assert C.conv3x3_version(fake("emu", "fp32"), deep) == "naive"
    assert C.conv3x3_version(fake("emu", "tf32"), deep) == "wmma"
    for device in ("cuda", "emu"):   # v5 is never the rule's choice (only a measured table's)
        for precision in ("fp32", "tf32"):
            for case in (big, deep, first):
                assert "wmma_big" not in {C.conv3x3_version(fake(device, precision), case, grad_input=g)
                                          for g in (False, True)}
    forced = fake("cuda", "tf32")
    forced.conv3x3_version = "naive"
    assert C.conv3x3_version(forced, big) == "naive"
    # a version measured faster on a GPU for this layer wins over the rule on cuda (not on emu)
    monkeypatch.setattr(C.choices, "choose", lambda k, knob, op, case: "tiled" if k.device == "cuda" else None)
    assert C.conv3x3_version(fake("cuda", "tf32"), big) == "tiled"
    assert C.conv3x3_version(fake("emu", "tf32"), big) == "wmma"


def test_wmma_under_tf32_precision_via_auto():
    k = KernelBackend("emu", precision="tf32")
    names = _launched(k)
    run_case(k, np.random.default_rng(9), (2, 10, 9, 21, 20), relu=True)
    assert names.count("conv3x3_wmma") == 1 and names.count("conv3x3_wmma_narrow") == 1   # 20 and 10 channels
    assert not any("tiled" in n or "naive" in n for n in names)


# ---- the FP32 fallback of conv3x3_wmma (sm_75, or no <mma.h>) -----------------------------------
def test_wmma_kernel_without_tensor_cores_computes_the_same_in_fp32(monkeypatch):
    """Compiled with CONV3X3_NO_WMMA (what sm_75 gets), conv3x3_wmma and conv3x3_wmma_big compute
    their tiles with FP32 FMAs (and wmma_big does not round its operands): the FP32 tolerance holds,
    and conv3x3_wmma_enabled reports 0 (1 in the normal build)."""
    source = kernel_source("conv3x3")   # gemm_tiles.cuh inlined, as the backend compiles it
    fallback = EmuModule("#define CONV3X3_NO_WMMA 1\n" + source, name="conv3x3_no_wmma.cu")
    k = backend("wmma")
    flag = np.zeros(1, np.int32)
    k.module("conv3x3").get_function("conv3x3_wmma_enabled")((1,), (1,), (flag,))
    assert flag[0] == 1
    fallback.get_function("conv3x3_wmma_enabled")((1,), (1,), (flag,))
    assert flag[0] == 0
    original = k.module
    monkeypatch.setattr(k, "module", lambda file: fallback if file == "conv3x3" else original(file))
    rng = np.random.default_rng(4)
    # conv3x3_wmma_narrow, conv3x3_wmma, conv3x3_wmma_big (one and two 64-channel blocks)
    for version, co in (("wmma", 13), ("wmma", 20), ("wmma_big", 20), ("wmma_big", 70)):
        k.conv3x3_version = version
        x, w, b = f32(rng, 2, 11, 10, 19), f32(rng, co, 11, 3, 3), f32(rng, co)
        y = k.conv3x3_forward(x, w, b, relu=True)
        assert_close(y, C.reference_forward(f64(x), f64(w), f64(b), True),
                     what=f"{version} FP32 fallback, {co} channels", **SUM_TOL)
        if version == "wmma_big":   # its input gradient too, with the ReLU mask fused
            gy = f32(rng, 2, co, 8, 17)
            gx = k.conv3x3_backward(x, w, gy, True, y=y)[0]
            want = C.reference_backward(f64(x), f64(w), f64(gy) * (f64(y) > 0))[0]
            assert_close(gx, want, what=f"{version} FP32 fallback gx, {co} channels", **SUM_TOL)


# ---- item 4: the network's input gets no gradient -----------------------------------------------
def _launched(k) -> list[str]:
    """The kernel names ``k`` launches from now on (recorded, then launched as usual)."""
    names, launch = [], k.launch

    def record(file, kernel, grid, block, args):
        names.append(kernel)
        launch(file, kernel, grid, block, args)

    k.launch = record
    return names


@pytest.mark.parametrize("version", ["naive", "tiled", *GEMM])
def test_no_input_gradient_kernel_for_an_input_without_grad(monkeypatch, version):
    """x without requires_grad (the image into the first layer): the backward launches only the
    weight gradient; w and b get the same gradients as when x needs one, and x.grad stays None."""
    k = backend(version)
    monkeypatch.setattr(backends, "get_backend", lambda device: k)
    rng = np.random.default_rng(2)
    xa, wa, ba = f32(rng, 2, 3, 12, 36), f32(rng, 5, 3, 3, 3), f32(rng, 5)
    grads = {}
    for x_grad in (True, False):
        x = mu.Tensor(xa, device="emu", requires_grad=x_grad)
        w = mu.Tensor(wa, device="emu", requires_grad=True)
        b = mu.Tensor(ba, device="emu", requires_grad=True)
        y = F.conv3x3(x, w, b, relu=True)
        names = _launched(k)
        y.sum().backward()
        del k.launch                  # back to the class's launch
        conv_kernels = [n for n in names if n.startswith("conv3x3_") and "grad_weight" not in n
                        and n != "conv3x3_gemm_weights"]
        if x_grad:
            assert conv_kernels and x.grad is not None
        else:
            assert conv_kernels == [], f"{version}: input-gradient kernels launched: {conv_kernels}"
            assert x.grad is None
        grads[x_grad] = (f64(w.grad.numpy()), f64(b.grad.numpy()))
    assert np.array_equal(grads[True][0], grads[False][0]) and np.array_equal(grads[True][1], grads[False][1])


def test_cpu_backward_skips_the_input_gradient():
    rng = np.random.default_rng(1)
    x, w, gy = f32(rng, 1, 2, 9, 9), f32(rng, 3, 2, 3, 3), f32(rng, 1, 3, 7, 7)
    gx, gw, gb = C.cpu_backward(x, w, gy, True, need_gx=False)
    assert gx is None
    assert_close(gw, C.reference_backward(f64(x), f64(w), f64(gy))[1], what="cpu gw", **SUM_TOL)


# ---- item 3 in the network: fused and unfused U-Nets agree ----------------------------------------
def unet_step(device, fuse, monkeypatch):
    """One forward and backward of a small U-Net (base 3, depth 2, 44 x 44 in, N = 2, dropout off):
    the logits and every parameter's gradient, float64."""
    monkeypatch.setattr(nn, "FUSE_RELU", fuse)
    rng = np.random.default_rng(8)
    tile = mu.UNet.valid_input_size(41, 2)
    x = rng.standard_normal((2, 1, tile, tile)).astype(np.float32)
    out = mu.UNet.output_size(tile, 2)
    target = rng.integers(0, 2, (2, out, out))
    model = mu.UNet(base_channels=3, depth=2, dropout=0.0, seed=3, device=device)
    logits = model(mu.Tensor(x, device=device))
    F.weighted_cross_entropy(logits, mu.Tensor(target, device=device)).backward()
    return f64(logits.numpy()), {n: f64(p.grad.numpy()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("device,version", [("cpu", None), ("emu", "tiled"), ("emu", "igemm")])
def test_unet_with_fused_relu_equals_unfused(monkeypatch, device, version):
    """The fused conv + ReLU changes nothing in the network: same logits and gradients (the same
    float32 operations in the same order, so to rounding), same parameter names and order."""
    if version:
        monkeypatch.setattr(backends.get_backend("emu"), "conv3x3_version", version)
    logits_f, grads_f = unet_step(device, True, monkeypatch)
    logits_u, grads_u = unet_step(device, False, monkeypatch)
    assert_close(logits_f, logits_u, what=f"logits on {device}", rtol=1e-6, atol=1e-6)
    assert list(grads_f) == list(grads_u)
    for name in grads_u:
        assert_close(grads_f[name], grads_u[name], what=f"gradient of {name} on {device}", rtol=1e-5,
                     atol=1e-6 * float(np.abs(grads_u[name]).max()))


@functools.lru_cache(maxsize=1)
def cpu_training():
    from .test_kernels import run_training_steps

    return run_training_steps("cpu")


def relative_norm(got, want):
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("version", ["igemm", "wmma-fp32", "wmma", "wmma_big-fp32", "wmma_big"])
def test_unet_trains_on_emu_with_gemm_versions_and_matches_cpu(monkeypatch, version):
    """Two SGD steps of tests/test_kernels.py's small U-Net (base 4, depth 2, 64 x 64 in, N = 2,
    dropout, weighted loss) on emu, every 3x3 conv forced to ``version``, against cpu.

    FP32 ("igemm", and "wmma-fp32" / "wmma_big-fp32": conv3x3_wmma(_big) built without tensor
    cores, i.e. the same loaders, channel splits, staging and fused epilogues in FP32): every logit, gradient and
    parameter to 1e-4 of its array's largest value, as test_kernels.py requires of v1/v2.
    TF32 ("wmma", "wmma_big"): the logits and the loss to 1e-2 (relative norm), the parameters after two
    steps to 5e-2. Elementwise gradients cannot be held to a TF32 bound: an activation within TF32
    rounding of 0 lands on the other side of its ReLU, and that flips one gradient entry entirely
    (on emu: logits 1.3e-3, parameters 1.7e-2 off in norm; "wmma-fp32" shows the rest is exact)."""
    from .test_kernels import run_training_steps

    k = backends.get_backend("emu")
    monkeypatch.setattr(k, "conv3x3_version", version.split("-")[0])
    if version.endswith("-fp32"):
        fallback = EmuModule("#define CONV3X3_NO_WMMA 1\n" + kernel_source("conv3x3"),
                             name="conv3x3_no_wmma.cu")
        original = k.module
        monkeypatch.setattr(k, "module", lambda file: fallback if file == "conv3x3" else original(file))
        monkeypatch.setattr(k, "_functions", {})   # kernels looked up by earlier tests came from `original`
    (logits_ref, loss_ref), grads_ref, params_ref = cpu_training()
    (logits, loss), grads, params = run_training_steps("emu")
    assert list(grads) == list(grads_ref)

    if version in TF32_GEMM:
        assert relative_norm(logits, logits_ref) <= 1e-2
        assert abs(loss - loss_ref) <= 1e-2 * abs(loss_ref)
        for name in params_ref:
            assert relative_norm(params[name], params_ref[name]) <= 5e-2, name
        return

    def close(got, want, what):
        assert_close(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), what=f"{what} [{version}]")

    close(logits, logits_ref, "logits")
    assert abs(loss - loss_ref) <= 1e-4 * abs(loss_ref)
    for name in grads_ref:
        close(grads[name], grads_ref[name], f"step-2 gradient of {name}")
        close(params[name], params_ref[name], f"{name} after two steps")


# ---- compiling for real GPUs --------------------------------------------------------------------
@pytest.mark.parametrize("arch,tensor_cores",
                         [("compute_75", False), ("compute_80", True), ("compute_90", True)])
def test_nvrtc_with_the_cuda_headers_uses_tensor_cores_from_sm80(arch, tensor_cores):
    """With <mma.h> on the include path (CuPy's NVRTC on a GPU machine) conv3x3_wmma is TF32 wmma on
    sm_80/90 and the FP32 fallback on sm_75. (tests/test_nvrtc.py compiles without it.)"""
    ptx = compile_with_cuda_headers(kernel_source("conv3x3"), "conv3x3.cu", arch)
    assert ("wmma.mma.sync" in ptx and ".tf32" in ptx) == tensor_cores


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_75", "sm_80"])
def test_no_spills_on_older_architectures(arch, tmp_path):
    """tests/test_nvrtc.py checks sm_90; the GEMM kernels must not spill on sm_75 / sm_80 either."""
    done = subprocess.run([shutil.which("nvcc"), f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-std=c++17",
                           "-o", str(tmp_path / "c.cubin"), str(kernels_dir() / "conv3x3.cu")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert " 0 bytes spill stores" in done.stderr
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in line
               for line in done.stderr.splitlines() if "spill" in line)
