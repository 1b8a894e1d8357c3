"""The emulator's second edition, part 2: warp-level and tensor-core code (and asynchronous
copies). Warp shuffles, votes and __syncwarp with CUDA's semantics (the reference model here is written from the CUDA
Programming Guide's description of each function, independently of the emulator's PTX-based
implementation), their misuse reported, and nvcuda::wmma TF32 and FP16 products against NumPy.
The kernels (tests/emu_kernels/warp.cu, wmma_gemm.cu) are written for a real GPU and also
compile unchanged with NVRTC for sm_80 and sm_90."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_close, compile_with_cuda_headers, source_line
from minunet.emulator import EmuModule, EmulatorError

KERNELS = Path(__file__).parent / "emu_kernels"
WARP_SOURCE = (KERNELS / "warp.cu").read_text()
WMMA_SOURCE = (KERNELS / "wmma_gemm.cu").read_text()


line_of = source_line


@pytest.fixture(scope="module")
def warp() -> EmuModule:
    return EmuModule(WARP_SOURCE, name="warp.cu", mode="checked")


@pytest.fixture(scope="module")
def wmma() -> EmuModule:
    return EmuModule(WMMA_SOURCE, name="wmma_gemm.cu", mode="checked")


# ---- the reference model: the CUDA Programming Guide's words ------------------------------------

def shfl_reference(values: np.ndarray, op: str, arg: int, width: int) -> np.ndarray:
    out = np.empty_like(values)
    for t in range(values.size):
        warp, lane = divmod(t, 32)
        start = lane // width * width  # the lane's subsection
        if op == "idx":    # srcLane modulo width, within the subsection
            src = start + arg % width
        elif op == "up":   # lane - delta; the lower delta lanes of a subsection keep their value
            src = lane - arg if lane - start >= arg else lane
        elif op == "down":  # lane + delta; the upper delta lanes keep their value
            src = lane + arg if lane - start + arg < width else lane
        else:              # lane ^ laneMask; a later subsection is out of reach: own value
            src = lane ^ arg if (lane ^ arg) // width <= lane // width else lane
        out[t] = values[32 * warp + src]
    return out


# ---- shuffles ------------------------------------------------------------------------------------

def test_shuffles_match_the_programming_guide(warp, rng):
    fn = warp.get_function("shuffle_all")
    for _ in range(12):
        width = int(rng.choice([1, 2, 4, 8, 16, 32]))
        src_lane, delta, lane_mask = int(rng.integers(-40, 41)), int(rng.integers(0, 32)), int(rng.integers(0, 32))
        warps = int(rng.integers(1, 4))
        values = rng.integers(-10**6, 10**6, 32 * warps).astype(np.int32)
        out = np.zeros(4 * values.size, np.int32)
        fn(1, 32 * warps, (values, out, np.int32(src_lane), np.uint32(delta), np.int32(lane_mask), np.int32(width)))
        got = out.reshape(-1, 4)
        what = f"width {width}, srcLane {src_lane}, delta {delta}, laneMask {lane_mask}"
        for k, (op, arg) in enumerate([("idx", src_lane), ("up", delta), ("down", delta), ("xor", lane_mask)]):
            assert_close(got[:, k], shfl_reference(values, op, arg, width), rtol=0, atol=0, what=f"__shfl_{op} {what}")


def test_double_shuffle(warp, rng):
    values = rng.standard_normal(32)
    out = np.zeros(32)
    warp.get_function("shuffle_double")(1, 32, (values, out, np.int32(7)))
    assert (out == values[7]).all()


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_warp_shuffle_block_reduction(seed, rng):
    fn = EmuModule(WARP_SOURCE, name="warp.cu", shuffle_seed=seed).get_function("block_reduce")
    for block in (32, 96, 256):
        n = int(rng.integers(1, 3000))
        x = rng.standard_normal(n).astype(np.float32)
        blocks = (n + block - 1) // block
        out = np.full(blocks, np.nan, np.float32)
        fn(blocks, block, (x, out, np.int32(n)))
        expected = np.add.reduceat(np.pad(x, (0, blocks * block - n)).astype(np.float64), np.arange(0, blocks * block, block))
        assert_close(out, expected, rtol=1e-5, atol=1e-5, what=f"block sums, block {block}, n {n}")


def test_votes_and_activemask(warp, rng):
    fn = warp.get_function("votes")
    for k in (0, 1, 7, 16, 32):
        predicate = (rng.random(96) < rng.choice([0.0, 0.3, 1.0], 3).repeat(32)).astype(np.int32)
        ballot, active = np.zeros(96, np.uint32), np.zeros(96, np.uint32)
        any_, all_ = np.zeros(96, np.int32), np.zeros(96, np.int32)
        fn(1, 96, (predicate, ballot, any_, all_, active, np.int32(k)))
        bits = (predicate.reshape(3, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32)
        assert (ballot == bits.repeat(32)).all()
        assert (any_ == predicate.reshape(3, 32).any(axis=1).repeat(32)).all()
        assert (all_ == predicate.reshape(3, 32).all(axis=1).repeat(32)).all()
        lanes = np.arange(96) % 32
        expected = np.where(lanes < k, np.uint32((1 << k) - 1), np.uint32(0))
        assert (active == expected).all(), f"__activemask in a branch of lanes < {k}"


def test_partial_mask(warp, rng):
    values = rng.integers(0, 1000, 32).astype(np.int32)
    out = np.zeros(32, np.int32)
    warp.get_function("half_warp_broadcast")(1, 32, (values, out))
    assert (out[:16] == values[3]).all() and (out[16:] == values[16:]).all()


def test_reading_a_lane_that_does_not_exist_gives_nan(warp, rng):
    """Block of 48: the second warp has 16 lanes; shuffling down from lanes 16..31 of it is
    undefined on a GPU, NaN here."""
    x = rng.standard_normal(48).astype(np.float32)
    out = np.zeros(2, np.float32)
    warp.get_function("reduce_partial_warp")(1, 48, (x, out))
    assert_close(out[0], x[:32].astype(np.float64).sum(), rtol=1e-5, atol=1e-5, what="full warp")
    assert np.isnan(out[1])


# ---- __syncwarp ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 4, -1])
def test_syncwarp_orders_shared_memory_between_lanes(seed, rng):
    fn = EmuModule(WARP_SOURCE, name="warp.cu", shuffle_seed=seed).get_function("warp_shared_reduce")
    x = rng.standard_normal(64).astype(np.float32)
    out = np.zeros(1, np.float32)
    fn(1, 32, (x, out, np.int32(1)))
    assert_close(out[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-5, what="with __syncwarp")
    with pytest.raises(EmulatorError, match=r"'warp_shared_reduce'.*race \((read-after-write|write-after-read) hazard\) "
                                            r"on __shared__ `s`"):
        fn(1, 32, (x, out, np.int32(0)))


# ---- misuse --------------------------------------------------------------------------------------
def launch_one_warp(warp, kernel: str) -> None:
    """One block of one warp, with the (in, out) int32 arrays of 32 that the misuse kernels take."""
    warp.get_function(kernel)(1, 32, (np.zeros(32, np.int32), np.zeros(32, np.int32)))


def test_lane_outside_its_own_mask(warp):
    with pytest.raises(EmulatorError, match=rf"'lane_outside_mask'.*thread \((1[6-9]|2\d|3[01]),0,0\) of block \(0,0,0\) "
                                            rf"calls __shfl_sync on line {line_of(WARP_SOURCE, '__shfl_sync(0x0000ffffu, value')} "
                                            r"with mask 0x0000ffff, which does not include its own lane (1[6-9]|2\d|3[01])"):
        launch_one_warp(warp, "lane_outside_mask")


def test_lanes_at_different_calls(warp):
    first, second = line_of(WARP_SOURCE, "// lower half"), line_of(WARP_SOURCE, "// upper half")
    with pytest.raises(EmulatorError, match=rf"'shuffles_at_different_lines'.*waits at __shfl_sync on line ({first}|{second}) "
                                            rf"\(mask 0xffffffff\) while thread \(\d+,0,0\) of its mask waits at __shfl_sync "
                                            rf"on line ({first}|{second})"):
        launch_one_warp(warp, "shuffles_at_different_lines")


def test_lanes_at_a_shuffle_and_a_barrier(warp):
    with pytest.raises(EmulatorError, match=r"'shuffle_against_barrier'.*waits at __shfl_sync on line \d+ \(mask "
                                            r"0xffffffff\) while thread \((1[6-9]|2\d|3[01]),0,0\) of its mask waits at "
                                            r"__syncthreads\(\) on line \d+"):
        launch_one_warp(warp, "shuffle_against_barrier")


def test_width_must_be_a_power_of_two(warp):
    with pytest.raises(EmulatorError, match=r"calls __shfl_sync on line \d+ with width 3; width must be a power of two"):
        launch_one_warp(warp, "shuffle_width_three")


# ---- TF32 and FP16 conversions -------------------------------------------------------------------

def tf32_nearest_ties_away(x: np.ndarray) -> np.ndarray:
    """Round float32 values to 10 mantissa bits, to nearest, ties away from zero, by arithmetic on
    float64 (an independent statement of cvt.rna.tf32.f32 for finite values)."""
    d = x.astype(np.float64)
    exponent = np.floor(np.log2(np.abs(np.where(d == 0, 1, d))))
    exponent = np.maximum(exponent, -126)  # subnormals share the smallest exponent
    ulp = 2.0 ** (exponent - 10)
    return (np.sign(d) * np.floor(np.abs(d) / ulp + 0.5) * ulp).astype(np.float32)


def test_float_to_tf32_and_half_conversions(wmma, rng):
    n = 4000
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    tf32_grid = tf32_nearest_ties_away(x[:1000]).astype(np.float64)
    ties = tf32_grid + np.sign(tf32_grid) * 2.0 ** (np.floor(np.log2(np.abs(tf32_grid))) - 11)  # exactly half an ulp
    x[:1000] = ties.astype(np.float32)
    x[1000:1010] = [0.0, -0.0, 1e-40, -3e-39, 65504.0, 65520.0, -70000.0, 6e-8, 2.98e-8, 1.0 + 2**-11]
    tf32, half = np.zeros(n, np.float32), np.zeros(n, np.float16)
    wmma.get_function("convert")((n + 127) // 128, 128, (x, tf32, half, np.int32(n)))
    assert_close(tf32, tf32_nearest_ties_away(x), rtol=0, atol=0, what="__float_to_tf32 (nearest, ties away)")
    assert (tf32.view(np.uint32) & 0x1FFF == 0).all(), "the low 13 bits of a TF32 value are zero"
    with np.errstate(over="ignore"):  # values past 65504 become infinity, as they should
        expected_half = x.astype(np.float16)
    assert np.array_equal(half.view(np.uint16), expected_half.view(np.uint16)), "__float2half (nearest even)"
    special = np.array([np.inf, -np.inf, np.nan, 3.4e38], np.float32)
    out, half_out = np.zeros(4, np.float32), np.zeros(4, np.float16)
    wmma.get_function("convert")(1, 4, (special, out, half_out, np.int32(4)))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and out[3] == tf32_nearest_ties_away(special[3:])[0]
    assert half_out[0] == np.inf and half_out[1] == -np.inf and np.isnan(half_out[2]) and half_out[3] == np.inf


# ---- wmma products -------------------------------------------------------------------------------

def mma_bound(a: np.ndarray, b: np.ndarray, steps: int, c: np.ndarray | None = None) -> np.ndarray:
    """What one float32 rounding per mma_sync step can add up to: steps * 2^-24 * (|A||B| + |C|)."""
    scale = np.abs(a) @ np.abs(b) + (0 if c is None else np.abs(c))
    return (steps + 1) * 2.0**-24 * scale


@pytest.mark.parametrize("round_inputs", [1, 0])
def test_wmma_tf32_gemm_matches_numpy(wmma, rng, round_inputs):
    m, n, k = 16 * int(rng.integers(1, 4)), 16 * int(rng.integers(1, 4)), 8 * int(rng.integers(1, 6))
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32)
    wmma.get_function("gemm_tf32")((n // 16, m // 16), 32, (a, b, c, np.int32(m), np.int32(n), np.int32(k), np.int32(round_inputs)))
    if round_inputs:  # __float_to_tf32: nearest, ties away
        at, bt = tf32_nearest_ties_away(a).astype(np.float64), tf32_nearest_ties_away(b).astype(np.float64)
    else:             # unconverted inputs: the tensor cores read the upper 19 bits (truncation)
        at = (a.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
        bt = (b.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
    exact = at @ bt
    bad = np.abs(c - exact) > mma_bound(at, bt, k // 8)
    assert not bad.any(), f"{bad.sum()} elements beyond k/8 float32 roundings of the TF32 product"
    # Against the float32 product: the TF32 tolerance, 2^-10 of sum |a||b| (each input off by at
    # most 2^-11 relative when rounded, 2^-10 when truncated).
    tf32_tolerance = 2.0 ** (-10 if round_inputs else -9) * (np.abs(a) @ np.abs(b)) + mma_bound(a, b, k // 8)
    assert (np.abs(c - a.astype(np.float64) @ b) <= tf32_tolerance).all()


def test_wmma_tf32_other_layouts(wmma, rng):
    m, n, k = 32, 48, 24
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    ct = np.full((n, m), np.nan, np.float32)  # C stored column-major = C^T row-major
    wmma.get_function("gemm_tf32_bt_colmajor_c")((n // 16, m // 16), 32, (a, np.ascontiguousarray(b.T), ct,
                                                                          np.int32(m), np.int32(n), np.int32(k)))
    at, bt = tf32_nearest_ties_away(a).astype(np.float64), tf32_nearest_ties_away(b).astype(np.float64)
    assert (np.abs(ct.T - at @ bt) <= mma_bound(at, bt, k // 8)).all()


def test_wmma_fp16_gemm_with_accumulator_input(wmma, rng):
    m, n, k = 32, 16, 48
    a = rng.standard_normal((m, k)).astype(np.float16)
    b = rng.standard_normal((k, n)).astype(np.float16)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32)
    wmma.get_function("gemm_fp16")((n // 16, m // 16), 32, (a, b, c0, c, np.int32(m), np.int32(n), np.int32(k)))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = a64 @ b64 + c0
    assert (np.abs(c - exact) <= mma_bound(a64, b64, k // 16, c0)).all()


def test_wmma_preconditions(wmma, rng):
    fn = wmma.get_function("load_with")
    a = rng.standard_normal(16 * 16 + 16).astype(np.float32)
    c = np.zeros((16, 16), np.float32)
    fn(1, 32, (a, c, np.int32(8), np.int32(8)))  # 8 floats = 32 bytes: aligned
    assert_close(c, a[8:8 + 128].reshape(16, 8).astype(np.float64).sum(axis=1, keepdims=True).repeat(16, 1),
                 rtol=1e-3, atol=1e-3, what="A row sums (B = ones)")
    with pytest.raises(EmulatorError, match=r"'load_with'.*calls wmma::load_matrix_sync on line \d+: the matrix pointer "
                                            r"must be 256-bit \(32-byte\) aligned"):
        fn(1, 32, (a, c, np.int32(1), np.int32(8)))
    with pytest.raises(EmulatorError, match=r"calls wmma::load_matrix_sync on line \d+: ldm must be a multiple of 4 for "
                                            r"float elements \(pointer 0x[0-9a-f]+, ldm 6\)"):
        fn(1, 32, (a, c, np.int32(0), np.int32(6)))


def test_wmma_needs_the_whole_warp(wmma):
    with pytest.raises(EmulatorError, match=r"'load_by_half_a_warp'.*calls wmma::load_matrix_sync on line \d+, a warp-wide "
                                            r"wmma operation, but thread \((1[6-9]|2\d|3[01]),0,0\) of its warp \(exited\)"):
        wmma.get_function("load_by_half_a_warp")(1, 32, (np.zeros(128, np.float32), np.zeros(32, np.float32)))


def test_warp_code_runs_in_fast_mode(rng):
    fast = EmuModule(WMMA_SOURCE, name="wmma_gemm.cu", mode="fast")
    m, n, k = 32, 32, 16
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    for _ in range(2):  # the first launch learns that the kernel needs fibers; the second runs direct
        c = np.full((m, n), np.nan, np.float32)
        fast.get_function("gemm_tf32")((n // 16, m // 16), 32, (a, b, c, np.int32(m), np.int32(n), np.int32(k), np.int32(1)))
        at, bt = tf32_nearest_ties_away(a).astype(np.float64), tf32_nearest_ties_away(b).astype(np.float64)
        assert (np.abs(c - at @ bt) <= mma_bound(at, bt, k // 8)).all()
    out = np.zeros(3, np.float32)
    x = rng.standard_normal(384).astype(np.float32)
    EmuModule(WARP_SOURCE, name="warp.cu", mode="fast").get_function("block_reduce")(3, 128, (x, out, np.int32(384)))
    assert_close(out, x.reshape(3, 128).astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5, what="fast block sums")


# ---- the same sources compile with NVRTC for sm_80 and sm_90 ------------------------------------

@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("file", ["warp.cu", "wmma_gemm.cu"])
def test_warp_and_wmma_kernels_compile_with_nvrtc(file, arch):
    source = (KERNELS / file).read_text()
    ptx = compile_with_cuda_headers(source, file, arch)
    assert f".target {arch.replace('compute_', 'sm_')}" in ptx
    for name in EmuModule(source, name=file).kernel_names:
        assert f".entry {name}(" in ptx
    if file == "wmma_gemm.cu":
        assert "wmma.mma.sync" in ptx and ".tf32" in ptx
    else:
        assert "shfl.sync" in ptx and "vote.sync" in ptx


# ---- asynchronous copies (cp.async through <cuda_pipeline.h>) --------------------------------------

PIPELINE_SOURCE = (KERNELS / "pipeline.cu").read_text()


@pytest.mark.parametrize("mode", ["checked", "fast"])
def test_async_copy_with_its_wait(rng, mode):
    fn = EmuModule(PIPELINE_SOURCE, name="pipeline.cu", mode=mode).get_function("neighbour_through_async_copy")
    x = rng.standard_normal(3 * 128).astype(np.float32)
    y = np.full_like(x, np.nan)
    fn(3, 128, (x, y, np.int32(1)))
    assert_close(y, np.roll(x.reshape(3, 128), -1, axis=1).reshape(-1), rtol=0, atol=0, what=f"{mode} mode")


def test_a_missing_wait_shows_as_nan(rng):
    """Without __pipeline_wait_prior the destination is still poisoned when the threads read it."""
    fn = EmuModule(PIPELINE_SOURCE, name="pipeline.cu").get_function("neighbour_through_async_copy")
    x = rng.standard_normal(128).astype(np.float32)
    y = np.zeros_like(x)
    fn(1, 128, (x, y, np.int32(0)))
    assert np.isnan(y).all()


def test_wait_prior_completes_only_older_batches(rng):
    fn = EmuModule(PIPELINE_SOURCE, name="pipeline.cu").get_function("two_stages")
    x = rng.standard_normal((64, 4)).astype(np.float32)
    first, second = np.zeros((32, 4), np.float32), np.zeros((32, 4), np.float32)
    fn(1, 32, (x, first, second, np.int32(0)))
    assert (first == x[:32]).all() and np.isnan(second).all()  # the second batch is still in flight
    fn(1, 32, (x, first, second, np.int32(1)))
    expected = x[32:].copy()
    expected[:, 3] = 0  # zfill = 4 bytes: the last float of each copy is zero
    assert (first == x[:32]).all() and (second == expected).all()


def test_misaligned_async_copy(rng):
    fn = EmuModule(PIPELINE_SOURCE, name="pipeline.cu").get_function("misaligned_async_copy")
    with pytest.raises(EmulatorError, match=rf"misaligned read of 16 bytes by thread \(\d+,0,0\) of block \(0,0,0\) at "
                                            rf"pipeline.cu:{line_of(PIPELINE_SOURCE, 'x + 1 + 4 * threadIdx.x')}: .*not a "
                                            r"multiple of 16 \(argument 0 `x`"):
        fn(1, 32, (rng.standard_normal(200).astype(np.float32), np.zeros(32, np.float32)))


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_pipeline_kernels_compile_with_nvrtc(arch):
    ptx = compile_with_cuda_headers(PIPELINE_SOURCE, "pipeline.cu", arch)
    assert "cp.async" in ptx
