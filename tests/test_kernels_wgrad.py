"""The weight-gradient GEMM kernels (issue 16): ``<op>_grad_weight_gemm`` (FP32, register tiles)
and ``<op>_grad_weight_gemm_tf32`` (TF32 tensor cores through nvcuda::wmma) of conv3x3, conv1x1
and conv_transpose2x2 (reduction "gemm"), and their larger tiles (reduction "gemm_large":
``_gemm_128x128`` and ``_gemm_64x128`` FP32, ``_gemm_64x128_tf32``), against the float64 NumPy
reference on the same float32 inputs.

Shapes: the registry's cases (odd sizes, N > 1) and cases with channel counts that are not
multiples of the 64 x 64 tiles (several row and column tiles, the last ones partly empty),
pixel counts that are not multiples of the 32-pixel stage, and pixel ranges split into slices:
forced by lowering ``min_pixels_per_slice``, and by more than WG_MAX_SLICE = 2048 pixels per
weight (the launcher's accuracy bound). Each test runs every version forced (``reduction`` =
"gemm" and "gemm_large", precision fp32 and tf32); the older versions ("tree", "serial") stay
tested in tests/test_kernels.py. "gemm_large" runs its own kernels only where gw has at least 128
columns (else gemm's: the cases below 128 check that fallback), so LARGE_CASES have 128 columns
or more: rows <= 64 (the 64 x 128 FP32 tile), 65 .. 128 and past 128 (several 128-row tiles),
columns past 128 (a second, mostly empty column tile), and pixels past WG_MAX_SLICE.

Tolerances:
- FP32: the op's registry tolerance (atol = rtol = 1e-4: sums of N(0, 1) products, float32
  rounding ~6e-8 a term).
- TF32: each input is rounded to 10 mantissa bits (relative error <= 2^-11), so each product is
  off by at most ~2^-10 of its size, and the sum by at most 2^-10 * sum|gy||x| =: 2^-10 * A
  (A is the reference gradient of |x| and |gy|), plus the float32 accumulation, at most
  (P/4 + 64) * 2^-24 * A for P pixels (one rounding per mma_sync of 8 pixels, doubled for a
  GPU's tensor cores, which may truncate, and the slice sums). A rigorous bound, not a guess:
  an error of one missing pixel (~1) exceeds it for the shapes here. And against the reference
  computed on TF32-rounded inputs, only the accumulation term remains: that checks the kernel
  really rounds (and that the tf32 kernel ran: its error against the unrounded reference
  exceeds the FP32 bound).
- The bias gradient is float32 in both precisions (it adds the unrounded gy values).
Results must also be bitwise the same from run to run (no atomics: the slices are added in a
fixed order).

The up-convolution's forward and input gradient have GEMM versions too
(``conv_transpose2x2_{forward,grad_input}_gemm[_tf32]``, MINUNET_CONV_TRANSPOSE2X2=gemm): tested
at the end the same way (FP32 at the registry tolerance, TF32 within 2^-10 * sum|products| plus
the accumulation, and tightly against the TF32-rounded reference).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minunet import ops
from minunet.backends import reference as R
from minunet.backends.kernels import REDUCTIONS, SLICE_SUM_LOOP, KernelBackend
from minunet.backends.sources import cu_defines
from minunet.devices import cuda_status, to_host
from minunet.ops import conv1x1, conv3x3, conv_transpose2x2

from .conftest import assert_close, compile_with_cuda_headers

DEVICES = ["emu", "cuda"]
GEMM_OPS = {"conv3x3": conv3x3, "conv1x1": conv1x1, "conv_transpose2x2": conv_transpose2x2}
MAX_SLICE = cu_defines("conv3x3")["WG_MAX_SLICE"]
MIN_SLICE = cu_defines("conv3x3")["WG_MIN_SLICE"]
# (op, (N, Ci, H, W, Co)) beyond the registry's: channels past one 64 x 64 tile and not multiples
# of it; pixels past WG_MAX_SLICE (2 x 2 x 1100 = 2,200 for conv1x1, 46 x 46 = 2,116 for conv3x3,
# 2 x 35 x 31 = 2,170 for the up-convolution) so that the launcher must split them.
EXTRA_CASES = [
    ("conv3x3", (2, 9, 7, 12, 70)),          # 81 columns (2 column tiles), 70 rows (2 row tiles)
    ("conv3x3", (1, 2, 48, 48, 3)),          # 2,116 pixels: 2 slices of at most 2,048
    ("conv1x1", (3, 67, 5, 7, 66)),          # 2 x 2 tiles
    ("conv1x1", (2, 3, 20, 55, 2)),          # 2,200 pixels
    ("conv_transpose2x2", (2, 65, 3, 5, 17)),   # 68 columns (Co*4), 65 rows (Ci)
    ("conv_transpose2x2", (2, 2, 35, 31, 3)),   # 2,170 input pixels
]
# gemm_large's own tiles: gw (rows x cols) = conv3x3 Co x Ci*9, conv1x1 Co x Ci, up-convolution
# Ci x Co*4, with at least 128 columns
LARGE_CASES = [
    ("conv3x3", (2, 15, 7, 12, 70)),         # 70 x 135: one 128-row tile (two 64-row TF32 ones), 2 column tiles
    ("conv3x3", (1, 16, 9, 8, 33)),          # 33 x 144: the 64 x 128 FP32 tile
    ("conv3x3", (1, 15, 6, 7, 131)),         # 131 x 135: 2 x 2 tiles of 128, the last ones nearly empty
    ("conv3x3", (1, 15, 48, 48, 3)),         # 2,116 pixels: 2 slices of at most 2,048
    ("conv1x1", (3, 130, 5, 7, 66)),         # 66 x 130
    ("conv1x1", (2, 129, 3, 5, 7)),          # 7 x 129
    ("conv1x1", (2, 128, 20, 55, 2)),        # 2 x 128, 2,200 pixels
    ("conv_transpose2x2", (2, 65, 3, 5, 33)),    # 65 x 132
    ("conv_transpose2x2", (2, 7, 3, 5, 35)),     # 7 x 140
    ("conv_transpose2x2", (1, 130, 3, 3, 40)),   # 130 x 160
    ("conv_transpose2x2", (2, 2, 35, 31, 32)),   # 2 x 128, 2,170 input pixels
]
CASES = ([(name, case) for name, op in GEMM_OPS.items() for case in op.TEST_CASES] + EXTRA_CASES)
VERSIONS = ["gemm", "gemm_large"]
VERSION_CASES = [("gemm", name, case) for name, case in CASES] + \
    [("gemm_large", name, case) for name, case in CASES + LARGE_CASES]


def gemm_shape(name: str, case) -> tuple[int, int]:
    """gw's (rows, cols) as the GEMM sees it."""
    _, ci, _, _, co = case
    return {"conv3x3": (co, ci * 9), "conv1x1": (co, ci), "conv_transpose2x2": (ci, co * 4)}[name]


def expected_kernel(name: str, case, version: str, precision: str) -> str:
    """The weight-gradient kernel the launcher must run (written out here, not asked of it)."""
    rows, cols = gemm_shape(name, case)
    suffix = "_tf32" if precision == "tf32" else ""
    if version == "gemm" or cols < 128:   # gemm_large falls back to gemm below 128 columns
        return f"{name}_grad_weight_gemm{suffix}"
    if precision == "tf32":
        return f"{name}_grad_weight_gemm_64x128_tf32"
    return f"{name}_grad_weight_gemm_{128 if rows > 64 else 64}x128"


def make_backend(device: str, precision: str, split: bool, version: str = "gemm") -> KernelBackend:
    if device == "cuda":
        available, reason = cuda_status()
        if not available:
            pytest.skip(f"CuPy with a GPU is not available: {reason}")
    backend = KernelBackend(device, reduction=version, precision=precision)
    if split:
        backend.min_pixels_per_slice = 37  # many slices, the last one only partly full
    return backend


def backward_name(op) -> str:
    return next(f for f in op.IMPLEMENTATIONS if f.endswith("_backward"))


def pixels_of(name: str, case) -> int:
    n, _, h, w, _ = case
    return n * (h - 2) * (w - 2) if name == "conv3x3" else n * h * w


def to_tf32(a: np.ndarray) -> np.ndarray:
    """``wmma::__float_to_tf32`` in NumPy: round a float32 to 10 mantissa bits, to nearest, ties
    away from zero (add half a TF32 ulp to the magnitude's bits, cut the low 13)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return rounded.astype(np.uint32).view(np.float32)


def run(backend, name, case, rng, launched=None):
    """(gx, gw, gb) from the backend, the float32 inputs, and the names of the kernels launched."""
    op = GEMM_OPS[name]
    args = op.example(rng, case)[backward_name(op)]
    names = []
    if launched is not None:
        launch = backend.launch

        def record(file, kernel, grid, block, kernel_args):
            names.append(kernel)
            launch(file, kernel, grid, block, kernel_args)

        launched.setattr(backend, "launch", record)
    dev = tuple(backend.xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
    got = [to_host(g) for g in getattr(backend, backward_name(op))(*dev)]
    return got, args, names


def reference(name, args, absolute=False):
    """The float64 reference (gx, gw, gb); with ``absolute`` of |x|, |w|, |gy| (the sums of
    |products| that bound rounding errors)."""
    x, w, gy, with_bias = args
    conv = (lambda a: np.abs(a.astype(np.float64))) if absolute else (lambda a: a.astype(np.float64))
    return getattr(R, backward_name(GEMM_OPS[name]))(conv(x), conv(w), conv(gy), with_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["", "split"])
@pytest.mark.parametrize("version,name,case", VERSION_CASES)
def test_fp32_gemm_matches_reference(rng, monkeypatch, device, version, name, case, split):
    backend = make_backend(device, "fp32", split, version)
    (gx, gw, gb), args, names = run(backend, name, case, rng, monkeypatch)
    assert expected_kernel(name, case, version, "fp32") in names, names
    pixels = pixels_of(name, case)
    # these grids have at most 4 tiles, far from filling a GPU: split whenever a slice can be smaller
    slices = pixels > min(backend.min_pixels_per_slice, MIN_SLICE)
    assert ("sum_partials" in names) == slices, f"{pixels} pixels: {names}"
    want = reference(name, args)
    tol = ops.tolerance(GEMM_OPS[name], backward_name(GEMM_OPS[name]), case)
    for got, ref, what in zip((gx, gw, gb), want, ("gx", "gw", "gb")):
        assert_close(got, ref, what=f"{name} {case} {what} [{version} fp32{', split' if split else ''}]", **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["", "split"])
@pytest.mark.parametrize("version,name,case", VERSION_CASES)
def test_tf32_gemm_within_its_rounding_bound(rng, monkeypatch, device, version, name, case, split):
    backend = make_backend(device, "tf32", split, version)
    (_, gw, gb), args, names = run(backend, name, case, rng, monkeypatch)
    assert expected_kernel(name, case, version, "tf32") in names, names
    pixels = pixels_of(name, case)
    x, w, gy, _ = args
    _, ref_gw, ref_gb = reference(name, args)
    _, abs_gw, _ = reference(name, args, absolute=True)
    accumulation = (pixels / 4 + 64) * 2.0**-24 * abs_gw
    assert (np.abs(gw - ref_gw) <= 2.0**-10 * abs_gw + accumulation + 1e-6).all(), \
        f"{name} {case}: TF32 error {np.abs(gw - ref_gw).max():.3g} beyond 2^-10 * sum|products|"
    # against the reference of the TF32-rounded inputs only the float32 accumulation remains (the
    # emulator's mma_sync truncates unrounded inputs, as a GPU does: gemm_large's rounding when
    # staging must happen, or this fails)
    _, tf32_gw, _ = getattr(R, backward_name(GEMM_OPS[name]))(
        to_tf32(x).astype(np.float64), w.astype(np.float64), to_tf32(gy).astype(np.float64), True)
    assert (np.abs(gw - tf32_gw) <= accumulation + 1e-6).all(), \
        f"{name} {case}: {np.abs(gw - tf32_gw).max():.3g} from the TF32-rounded reference"
    # the bias adds unrounded float32 gy values in both precisions
    assert_close(gb, ref_gb, rtol=1e-4, atol=1e-4, what=f"{name} {case} gb [{version} tf32]")


@pytest.mark.parametrize("version", VERSIONS)
def test_tf32_really_rounds(version):
    """The TF32 kernel's error against the exact result is far above float32's (it rounds the
    inputs), and the FP32 kernel's is not: the two precisions run different kernels."""
    case = (2, 15, 12, 13, 10)   # 2 x 10 x 11 = 220 pixels per weight; 135 columns (gemm_large's own)
    results = {}
    for precision in ("fp32", "tf32"):
        (_, gw, _), args, _ = run(make_backend("emu", precision, False, version), "conv3x3", case,
                                  np.random.default_rng(5))
        results[precision] = gw
    _, ref_gw, _ = reference("conv3x3", args)
    _, abs_gw, _ = reference("conv3x3", args, absolute=True)
    fp32_bound = 220 * 2.0**-24 * abs_gw
    assert (np.abs(results["fp32"] - ref_gw) <= fp32_bound).all()
    assert (np.abs(results["tf32"] - ref_gw) > fp32_bound).any()


# small layers for the determinism tests: gemm's, and gemm_large's own (at least 128 columns)
ORDER_CASES = {"gemm": {"conv3x3": (2, 5, 9, 14, 7), "conv1x1": (2, 5, 9, 14, 7),
                        "conv_transpose2x2": (2, 5, 5, 7, 3)},
               "gemm_large": {"conv3x3": (2, 15, 9, 14, 7), "conv1x1": (2, 130, 9, 14, 7),
                              "conv_transpose2x2": (2, 5, 5, 7, 33)}}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("name", list(GEMM_OPS))
def test_gemm_is_deterministic(name, precision, version):
    """Bitwise the same twice, with many slices (no atomics; the slices are added in order)."""
    case = ORDER_CASES[version][name]
    outs = [run(make_backend("emu", precision, True, version), name, case, np.random.default_rng(11))[0]
            for _ in range(2)]
    for first, second in zip(*outs):
        assert np.array_equal(first, second)


@pytest.mark.parametrize("shape", [(1, 1, 572, 572, 64), (1, 64, 570, 570, 64), (1, 512, 66, 66, 512),
                                   (1, 1024, 30, 30, 1024), (2, 16, 348, 348, 16)])
def test_gemm_slices_fill_a_gpu_and_bound_each_sum(monkeypatch, shape):
    """The gemm launch for U-Net's conv3x3 layers (paper size, base 64, and the default base 16,
    batch 2): every block sums at most WG_MAX_SLICE pixels, and there are enough blocks for a GPU
    (TARGET_BLOCKS, or one per WG_MIN_SLICE pixels of every tile). Only the grid is checked: the
    launch is recorded, not run."""
    from minunet.backends.kernels import TARGET_BLOCKS

    n, ci, h, w, co = shape
    backend = KernelBackend("emu", reduction="gemm")
    grids = {}
    monkeypatch.setattr(backend, "launch", lambda file, kernel, grid, block, args: grids.setdefault(kernel, (grid, args)))
    x, wt = np.zeros((n, ci, h, w), np.float32), np.zeros((co, ci, 3, 3), np.float32)
    backend.conv3x3_backward(x, wt, np.zeros((n, co, h - 2, w - 2), np.float32), True)
    (tiles_x, tiles_y, slices), args = grids["conv3x3_grad_weight_gemm"]
    pixels, per_slice = n * (h - 2) * (w - 2), int(args[-1])
    assert (tiles_x, tiles_y) == (-(-ci * 9 // 64), -(-co // 64))
    used = -(-pixels // per_slice)   # slices with pixels; the rest (fewer than sqrt(used) + 1) are empty
    assert per_slice <= MAX_SLICE and used <= slices <= used + math.isqrt(max(used - 1, 0)) + 1
    assert tiles_x * tiles_y * used >= min(TARGET_BLOCKS, tiles_x * tiles_y * (pixels // MIN_SLICE))
    assert ("sum_partials" in grids) == (slices > 1)
    if slices > SLICE_SUM_LOOP:   # added in two passes, each thread adding about sqrt(slices) terms
        (first_grid, first_args), = [v for k, v in grids.items() if k == "sum_partials"]
        assert int(first_args[2]) <= math.isqrt(slices) + 1


# U-Net's weight-gradient layers at the paper's size (base 64, 572 x 572): (op, (N, Ci, H, W, Co))
UNET_LAYERS = [("conv3x3", (1, 1, 572, 572, 64)), ("conv3x3", (1, 64, 570, 570, 64)),
               ("conv3x3", (1, 64, 284, 284, 128)), ("conv3x3", (1, 256, 138, 138, 256)),
               ("conv3x3", (1, 512, 66, 66, 512)), ("conv3x3", (1, 1024, 30, 30, 1024)),
               ("conv3x3", (1, 128, 392, 392, 64)), ("conv3x3", (2, 16, 348, 348, 16)),
               ("conv_transpose2x2", (1, 1024, 28, 28, 512)), ("conv_transpose2x2", (1, 128, 196, 196, 64)),
               ("conv1x1", (1, 64, 388, 388, 2))]


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("name,shape", UNET_LAYERS)
def test_gemm_large_grids_fill_a_gpu_for_the_unet_layers(monkeypatch, name, shape, precision):
    """gemm_large's launch for U-Net's layers (64 -> 1024 channels, the up-convolutions, the 1x1
    classifier): the kernel and tile for gw's shape (gemm's below 128 columns), every block sums
    at most WG_MAX_SLICE pixels, and the blocks hold as much work as gemm's TARGET_BLOCKS 64 x 64
    tiles (a 128 x 128 tile counts 4), or one block per WG_MIN_SLICE pixels of every tile. Only
    the grid is checked: the launches are recorded, not run."""
    from minunet.backends.kernels import TARGET_BLOCKS

    n, ci, h, w, co = shape
    backend = KernelBackend("emu", reduction="gemm_large", precision=precision)
    monkeypatch.setattr(backend, "has_tf32", lambda file: True)
    grids = {}
    monkeypatch.setattr(backend, "launch",
                        lambda file, kernel, grid, block, args: grids.setdefault(kernel, (grid, block, args)))
    wshape = {"conv3x3": (co, ci, 3, 3), "conv1x1": (co, ci, 1, 1), "conv_transpose2x2": (ci, co, 2, 2)}[name]
    out = {"conv3x3": (n, co, h - 2, w - 2), "conv1x1": (n, co, h, w), "conv_transpose2x2": (n, co, 2 * h, 2 * w)}[name]
    getattr(backend, f"{name}_backward")(np.zeros((n, ci, h, w), np.float32), np.zeros(wshape, np.float32),
                                         np.zeros(out, np.float32), True)
    kernel = expected_kernel(name, shape, "gemm_large", precision)
    (tiles_x, tiles_y, slices), (threads,), args = grids[kernel]
    rows, cols = gemm_shape(name, shape)
    bm, bn = (64, 64) if kernel.endswith(("_gemm", "_gemm_tf32")) else (64 if "64x128" in kernel else 128, 128)
    assert threads == {(64, 64): 128 if precision == "tf32" else 256, (64, 128): 128, (128, 128): 256}[(bm, bn)]
    assert (tiles_x, tiles_y) == (-(-cols // bn), -(-rows // bm))
    pixels = n * (h - 2) * (w - 2) if name == "conv3x3" else n * h * w
    per_slice = int(args[-1])
    used = -(-pixels // per_slice)
    assert per_slice <= MAX_SLICE and used <= slices <= used + math.isqrt(max(used - 1, 0)) + 1
    work = tiles_x * tiles_y * bm * bn // (64 * 64)   # in 64 x 64 tiles
    assert work * used >= min(TARGET_BLOCKS, work * (pixels // MIN_SLICE))
    if name == "conv1x1" or (name == "conv3x3" and ci == 1):
        assert kernel.endswith(("_gemm", "_gemm_tf32"))   # 64 and 9 columns: gemm's 64 x 64 tiles


def test_auto_runs_gemm_large_only_where_a_gpu_measured_it_faster(monkeypatch):
    """"auto" is unchanged by the new version: the rules never name gemm_large, the shipped table
    (measured before it existed) never does, and a table whose times say it is faster does."""
    from minunet.backends import choices

    for device, precision in (("emu", "fp32"), ("emu", "tf32"), ("cuda", "fp32"), ("cuda", "tf32")):
        backend = KernelBackend("emu", reduction="auto", precision=precision)
        backend.device = device   # the rule only; nothing is launched
        assert all(backend.weight_gradient_version(o, t) != "gemm_large"
                   for o, t in ((147_456, 16), (589_824, 18_496), (9, 324_900)))
    table = choices.load_table(choices.TABLE_PATH)
    for key in table.get("choices", {}).get("reduction", {}):
        assert choices.measured_choice("reduction", key, table) != "gemm_large", key
    key = "conv3x3 1x256x138x138->256 fp32"
    measured = {"device": "cuda", "choices": {"reduction": {key: {"ms": {"gemm": 1.8, "gemm_large": 1.1}}}}}
    assert choices.measured_choice("reduction", key, measured) == "gemm_large"
    measured["choices"]["reduction"][key]["ms"]["gemm_large"] = 2.0
    assert choices.measured_choice("reduction", key, measured) == "gemm"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_gemm_does_not_depend_on_the_thread_order(precision, version):
    """The same bits under three of the emulator's shuffle seeds (the order of blocks, and of a
    block's threads between barriers): no result depends on an order a GPU does not promise."""
    from minunet.emulator import set_shuffle_seed, shuffle_seed

    before = shuffle_seed()
    outs = []
    try:
        for seed in (0, 7, 12345):
            set_shuffle_seed(seed)
            for name in GEMM_OPS:
                case = (2, 5, 9, 14, 7) if version == "gemm" else ORDER_CASES[version][name]
                outs.append((seed, name, run(make_backend("emu", precision, True, version), name,
                                             case, np.random.default_rng(3))[0]))
    finally:
        set_shuffle_seed(before)
    for seed, name, got in outs:
        first = next(o for s_, n_, o in outs if n_ == name)
        assert all(np.array_equal(a, b) for a, b in zip(got, first)), f"{name}: seed {seed} changed the result"


@settings(max_examples=16, deadline=None)
@given(n=st.integers(1, 3), ci=st.integers(1, 20), co=st.integers(1, 140), h=st.integers(3, 17),
       w=st.integers(3, 40), split=st.booleans(), precision=st.sampled_from(["fp32", "tf32"]),
       version=st.sampled_from(VERSIONS), seed=st.integers(0, 2**32 - 1))
def test_conv3x3_gemm_random_shapes(n, ci, co, h, w, split, precision, version, seed):
    """Random shapes (hypothesis), both precisions, both versions (gemm_large's own tiles from
    ci = 15: 135 columns; 64 and 128 rows), with and without the forced slice split."""
    backend = make_backend("emu", precision, split, version)
    (_, gw, gb), args, _ = run(backend, "conv3x3", (n, ci, h, w, co), np.random.default_rng(seed))
    _, ref_gw, ref_gb = reference("conv3x3", args)
    _, abs_gw, _ = reference("conv3x3", args, absolute=True)
    pixels = n * (h - 2) * (w - 2)
    # TF32: input rounding + one rounding per mma_sync of 8 pixels (x2 for a GPU); FP32: one per pixel
    rounding, chain = (2.0**-10, pixels / 4) if precision == "tf32" else (0.0, pixels)
    bound = rounding * abs_gw + (chain + 64) * 2.0**-24 * abs_gw + 1e-6
    assert (np.abs(gw - ref_gw) <= bound).all(), f"{precision}: error {np.abs(gw - ref_gw).max():.3g}"
    assert_close(gb, ref_gb, rtol=1e-4, atol=1e-4, what="gb")


def test_reduction_knob_has_every_version(monkeypatch):
    assert REDUCTIONS == ("auto", "tree", "serial", "gemm", "gemm_large")
    monkeypatch.setenv("MINUNET_REDUCTION", "gemm")
    assert KernelBackend("emu").reduction == "gemm"
    monkeypatch.setenv("MINUNET_REDUCTION", "gemm_large")
    assert KernelBackend("emu").reduction == "gemm_large"


@pytest.mark.parametrize("outputs,terms", [(147_456, 16), (36_864, 400), (576, 512), (4_608, 4_624),
                                           (9, 324_900), (2_359_296, 784)])
def test_auto_on_cuda_is_always_gemm(outputs, terms):
    """"auto" on cuda never runs the serial (or tree) kernel, whatever the shape: the H200
    measured the serial one as the slowest of the training step. (The choice is a pure function
    of device, precision and shape; an emu backend with device set to "cuda" asks it without a
    GPU.) On emu, "auto" keeps the emulator's own choice in fp32 and takes gemm in tf32."""
    backend = KernelBackend("emu", reduction="auto", precision="fp32")
    emu_choice = backend.weight_gradient_version(outputs, terms)
    assert emu_choice == ("serial" if backend.serial_reduction(outputs, terms) else "tree")
    backend.precision = "tf32"
    assert backend.weight_gradient_version(outputs, terms) == "gemm"
    backend.precision = "fp32"
    backend.device = "cuda"
    assert backend.weight_gradient_version(outputs, terms) == "gemm"


def test_tf32_falls_back_to_fp32_with_a_warning(rng, monkeypatch):
    """Where a file was compiled without TF32 wmma (a GPU before sm_80, or no <mma.h>), the
    probe kernel says so: one warning, and the FP32 gemm runs (correct to the FP32 tolerance)."""
    backend = make_backend("emu", "tf32", False)
    launch = backend.launch

    def no_tf32(file, kernel, grid, block, args):
        if kernel.endswith("_has_tf32"):
            args[0][0] = 0   # what the probe writes when compiled without TF32
            return
        launch(file, kernel, grid, block, args)

    monkeypatch.setattr(backend, "launch", no_tf32)
    with pytest.warns(RuntimeWarning, match="conv3x3.cu has no TF32 tensor-core kernel"):
        (_, gw, _), args, _ = run(backend, "conv3x3", (2, 3, 6, 7, 4), rng)
    assert_close(gw, reference("conv3x3", args)[1], rtol=1e-4, atol=1e-4, what="fp32 fallback")
    assert backend.has_tf32("conv3x3") is False


def test_every_file_has_tf32_on_emu():
    backend = KernelBackend("emu")
    assert all(backend.has_tf32(file) for file in GEMM_OPS)


@pytest.mark.parametrize("arch", ["compute_75", "compute_80", "compute_90"])
@pytest.mark.parametrize("name", list(GEMM_OPS))
def test_tf32_kernels_compile_to_tensor_core_code(name, arch):
    """With the CUDA headers on the include path (as CuPy gives NVRTC on a GPU), sm_80 and sm_90
    get wmma.mma.sync on TF32; sm_75 compiles the __trap() version (tests/test_nvrtc.py compiles
    every file without the headers, where the TF32 kernels are __trap() on every architecture)."""
    from minunet.backends.sources import kernel_source

    ptx = compile_with_cuda_headers(kernel_source(name), f"{name}.cu", arch)
    assert f".entry {name}_grad_weight_gemm_tf32(" in ptx
    assert f".entry {name}_grad_weight_gemm_64x128_tf32(" in ptx
    has_mma = "wmma.mma.sync" in ptx and ".tf32" in ptx
    assert has_mma == (arch != "compute_75")


# ---- the up-convolution's forward and input gradient as GEMMs -------------------------------------
# (N, Ci, H, W, Co): the registry's cases, then 68 forward rows (Co*4) and 65 input channels (past
# one 64-row tile; K = 65 and 68: several 16- and 32-channel stages, the last partly empty), and
# 135 pixels (three 64-pixel tiles) with 280 forward rows.
CT_CASES = conv_transpose2x2.TEST_CASES + [(2, 65, 3, 5, 17), (1, 3, 9, 15, 70)]


def ct_backend(precision: str, version: str = "gemm") -> KernelBackend:
    return KernelBackend("emu", conv_transpose2x2=version, precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("case", CT_CASES)
def test_conv_transpose_gemm_forward_and_grad_input(rng, monkeypatch, case, precision):
    backend = ct_backend(precision)
    names = []
    launch = backend.launch

    def record(file, kernel, grid, block, kernel_args):
        names.append(kernel)
        launch(file, kernel, grid, block, kernel_args)

    monkeypatch.setattr(backend, "launch", record)
    example = conv_transpose2x2.example(rng, case)
    x, w, b = example["conv_transpose2x2_forward"]
    _, _, gy, _ = example["conv_transpose2x2_backward"]
    y = backend.conv_transpose2x2_forward(x, w, b)
    gx = backend.conv_transpose2x2_backward(x, w, gy, True)[0]
    suffix = "_tf32" if precision == "tf32" else ""
    names = [name for name in names if not name.endswith("_has_tf32")]   # the probe, once
    assert names[0] == f"conv_transpose2x2_forward_gemm{suffix}"
    assert f"conv_transpose2x2_grad_input_gemm{suffix}" in names

    f64 = (lambda a: np.asarray(a, np.float64))
    want_y = conv_transpose2x2.reference_forward(f64(x), f64(w), f64(b))
    want_gx = conv_transpose2x2.reference_backward(f64(x), f64(w), f64(gy))[0]
    if precision == "fp32":
        assert_close(y, want_y, what=f"forward {case}", **conv_transpose2x2.TOLERANCE)
        assert_close(gx, want_gx, what=f"grad input {case}", **conv_transpose2x2.TOLERANCE)
        return
    n, ci, h, wd, co = case
    abs_y = conv_transpose2x2.reference_forward(np.abs(f64(x)), np.abs(f64(w)))
    abs_gx = conv_transpose2x2.reference_backward(np.abs(f64(x)), np.abs(f64(w)), np.abs(f64(gy)))[0]
    for got, want, absolute, terms, what in ((y, want_y, abs_y, ci, "forward"), (gx, want_gx, abs_gx, 4 * co, "grad input")):
        accumulation = (terms / 4 + 8) * 2.0**-24 * absolute + 1e-6
        assert (np.abs(got - want) <= 2.0**-10 * absolute + accumulation).all(), \
            f"{what} {case}: TF32 error {np.abs(got - want).max():.3g}"
    # against the reference of TF32-rounded inputs only the accumulation remains (the bias is float32)
    tf32_y = conv_transpose2x2.reference_forward(f64(to_tf32(x)), f64(to_tf32(w)), f64(b))
    tf32_gx = conv_transpose2x2.reference_backward(f64(x), f64(to_tf32(w)), f64(to_tf32(gy)))[0]
    assert (np.abs(y - tf32_y) <= (ci / 4 + 8) * 2.0**-24 * abs_y + 1e-6).all()
    assert (np.abs(gx - tf32_gx) <= (co + 8) * 2.0**-24 * abs_gx + 1e-6).all()


def test_conv_transpose_version_choice(monkeypatch):
    """"auto": naive on emu in fp32 (the emulator's speed), gemm in tf32 and on cuda (the H200
    measured the naive kernels at 3x and 9.5x PyTorch); forced by the argument, the environment
    variable or the attribute, a bad value refused with the allowed ones."""
    from minunet.ops.conv_transpose2x2 import gemm_version

    monkeypatch.delenv("MINUNET_CONV_TRANSPOSE2X2", raising=False)
    backend = KernelBackend("emu", precision="fp32")
    assert backend.conv_transpose2x2_version == "auto" and gemm_version(backend) is None
    backend.precision = "tf32"
    assert gemm_version(backend) == "gemm_tf32"
    backend.precision = "fp32"
    backend.device = "cuda"   # the choice only; nothing is launched
    assert gemm_version(backend) == "gemm"
    backend.conv_transpose2x2_version = "naive"
    assert gemm_version(backend) is None
    monkeypatch.setenv("MINUNET_CONV_TRANSPOSE2X2", "gemm")
    assert KernelBackend("emu").conv_transpose2x2_version == "gemm"
    with pytest.raises(ValueError, match="use one of: auto, naive, gemm"):
        backend.conv_transpose2x2_version = "tiled"


# ---- the whole network with the GEMM versions --------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_unet_training_step_with_gemm_kernels_matches_cpu(precision):
    """tests/test_kernels.py's small U-Net (dropout, weighted loss, N = 2), one SGD step on emu with
    every GEMM version forced (weight gradients; the up-convolution's forward and input gradient),
    against the cpu device. FP32: as test_whole_unet_training_steps_match_cpu, 1e-4 of each
    array's largest value. TF32: each layer's products carry ~2^-11 relative input rounding, and
    the input gradients pass it on through ~10 layers; measured on emu the first step's gradients
    differ by at most 0.6% of each array's largest value, the logits by 0.06%; the tolerance is
    2% (a wrong kernel is off by the size of the gradient itself)."""
    from minunet.backends import get_backend

    from .test_kernels import run_training_steps

    backend = get_backend("emu")
    saved = (backend.reduction, backend.precision, backend.conv_transpose2x2_version)
    backend.reduction, backend.precision, backend.conv_transpose2x2_version = "gemm", precision, "gemm"
    try:
        (logits, loss), grads, params = run_training_steps("emu", steps=1)
    finally:
        backend.reduction, backend.precision, backend.conv_transpose2x2_version = saved
    (logits_ref, loss_ref), grads_ref, params_ref = run_training_steps("cpu", steps=1)
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert_close(logits, logits_ref, rtol=tol, atol=tol * float(np.abs(logits_ref).max()), what="logits")
    assert abs(loss - loss_ref) <= tol * abs(loss_ref)
    for name in grads_ref:
        for got, want, what in ((grads[name], grads_ref[name], "gradient"), (params[name], params_ref[name], "value")):
            assert_close(got, want, rtol=tol, atol=tol * float(np.abs(want).max()), what=f"{what} of {name} [{precision}]")


@pytest.mark.parametrize("op, case", [(conv3x3, (2, 3, 9, 11, 5)), (conv1x1, (2, 3, 7, 5, 4)),
                                      (conv_transpose2x2, (2, 4, 5, 3, 3))])
def test_a_version_measured_for_the_layer_wins_over_the_rule(op, case, monkeypatch):
    """grad_weight asks the GPU-measured table (backends/choices.py) first, with the layer's
    (N, Ci, H, W, Co): a version it names runs instead of weight_gradient_version's rule."""
    from minunet.backends import kernels as K

    asked = []

    def measured(backend, knob, file, layer):
        asked.append((knob, file, tuple(layer)))
        return "serial" if knob == "reduction" else None

    monkeypatch.setattr(K.choices, "choose", measured)
    k = KernelBackend("emu", reduction="auto", precision="tf32")   # the rule alone would run gemm
    launched = []
    launch = k.launch
    monkeypatch.setattr(k, "launch", lambda file, kernel, *a, **kw: (launched.append(kernel), launch(file, kernel, *a, **kw))[1])
    args = op.example(np.random.default_rng(5), case)[f"{op.__name__.rsplit('.', 1)[-1]}_backward"]
    got = getattr(k, f"{op.__name__.rsplit('.', 1)[-1]}_backward")(*args)
    want = getattr(R, f"{op.__name__.rsplit('.', 1)[-1]}_backward")(*args)
    assert ("reduction", op.__name__.rsplit(".", 1)[-1], tuple(case)) in asked
    assert any(name.endswith("_grad_weight_serial") for name in launched), launched
    for g, r in zip(got[1:], want[1:]):
        assert_close(to_host(g), r, rtol=1e-4, atol=1e-4)
