"""The emulator's second edition, part 4: fast mode. An optimised build without per-access
checks, blocks spread over several OS threads, fibers only for kernels that need them. It must
give the checked mode's answers (atomics stay atomic across threads, a kernel whose first launch
had to restart with fibers does not apply its side effects twice), and still report faults and
device asserts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_close
from minunet import emulator
from minunet.backends.sources import kernel_source
from minunet.emulator import EmuModule, EmulatorError

KERNELS = Path(__file__).parent / "emu_kernels"


@pytest.fixture
def two_workers():
    previous = emulator.workers()
    emulator.set_workers(2)
    yield
    emulator.set_workers(previous)


def load(file: str, mode: str) -> EmuModule:
    return EmuModule((KERNELS / file).read_text(), name=file, mode=mode)


def test_fast_mode_is_chosen_per_module_and_by_default(monkeypatch):
    assert load("vector_add.cu", "fast").mode == "fast"
    previous = emulator.emu_mode()
    try:
        emulator.set_emu_mode("fast")
        assert EmuModule((KERNELS / "vector_add.cu").read_text(), name="vector_add.cu").mode == "fast"
    finally:
        emulator.set_emu_mode(previous)


def test_elementwise_kernels_match(two_workers, rng):
    fast = load("vector_add.cu", "fast").get_function("vector_add")
    for _ in range(3):
        n = int(rng.integers(1, 20000))
        a, b = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
        c = np.full(n, np.nan, np.float32)
        fast((n + 127) // 128, 128, (a, b, c, np.int32(n)))
        assert_close(c, a + b, rtol=0, atol=0, what=f"vector_add n={n}")


def test_barrier_kernel_with_atomics_is_not_applied_twice(two_workers, rng):
    """The first launch meets __syncthreads() in loop mode and restarts with fibers from copies:
    the atomicAdd of the abandoned attempt must not reach the caller's array."""
    fn = load("block_sum.cu", "fast").get_function("block_sum")
    for launch in range(3):  # the first restarts, the next ones run on the caller's memory directly
        n = int(rng.integers(300, 30000))
        x = rng.random(n, np.float32)
        out = np.zeros(1, np.float32)
        fn((n + 255) // 256, 256, (x, out, np.int32(n)))
        assert fn.uses_barriers
        assert_close(out[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-3, what=f"block_sum launch {launch}")


def test_atomics_from_parallel_blocks(two_workers, rng):
    mod = load("histogram.cu", "fast")
    n, nbins = 200_000, int(rng.integers(3, 40))
    values = rng.integers(-3, nbins + 3, n).astype(np.int32)
    bins = np.zeros(nbins, np.int32)
    mod.get_function("histogram")(64, 256, (values, bins, np.int32(n), np.int32(nbins)))
    assert_close(bins, np.bincount(np.clip(values, 0, nbins - 1), minlength=nbins), rtol=0, atol=0, what="histogram")


def test_real_kernels_agree_with_checked_mode(two_workers, rng):
    """The tiled 3x3 convolution (barriers, shared memory) and its weight and bias gradient (a
    shared-memory tree reduction): fast and checked builds compute the same floats."""
    source = kernel_source("conv3x3")
    n, ci, co, h, w = 2, 3, 9, 21, 37
    x = rng.standard_normal((n, ci, h, w)).astype(np.float32)
    wt = rng.standard_normal((co, ci, 3, 3)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    gy = rng.standard_normal((n, co, h - 2, w - 2)).astype(np.float32)
    results = {}
    for mode in ("checked", "fast"):
        mod = EmuModule(source, name="conv3x3.cu", mode=mode)
        y = np.full((n, co, h - 2, w - 2), np.nan, np.float32)
        grid = (-(-(h - 2) // 16) * -(-(w - 2) // 32), -(-co // 8), n)
        mod.get_function("conv3x3_forward_tiled")(grid, (32, 8), (x, wt, b, y, *(np.int32(v) for v in (n, ci, h, w, co))))
        pixels = n * (h - 2) * (w - 2)
        gw = np.full((2, co * ci * 9), np.nan, np.float32)
        gb = np.full((2, co), np.nan, np.float32)
        mod.get_function("conv3x3_grad_weight")((co * -(-ci // 4), 2), 128,
                                                (x, gy, gw, gb, *(np.int32(v) for v in (n, ci, h, w, co)),
                                                 np.int32(-(-pixels // 2))))
        results[mode] = (y, gw, gb)
    assert np.array_equal(results["fast"][0], results["checked"][0])
    assert_close(results["fast"][1], results["checked"][1], rtol=1e-5, atol=1e-5, what="grad weight partials")
    assert_close(results["fast"][2], results["checked"][2], rtol=1e-5, atol=1e-5, what="grad bias partials")
    assert_close(results["fast"][2].sum(axis=0), gy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4,
                 what="grad bias vs NumPy")
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (3, 3), axis=(2, 3))  # n c i j ky kx
    y_ref = np.einsum("ncijkl,ockl->noij", windows, wt) + b[None, :, None, None]
    assert_close(results["fast"][0], y_ref, rtol=1e-4, atol=1e-4, what="forward vs NumPy")
    gw_ref = np.einsum("noij,ncijkl->ockl", gy, windows).reshape(-1)
    assert_close(results["fast"][1].sum(axis=0), gw_ref, rtol=1e-4, atol=1e-3, what="grad weight vs NumPy")


def test_faults_and_asserts_are_still_reported(two_workers):
    broken = load("broken.cu", "fast")
    with pytest.raises(EmulatorError, match=r"segmentation fault at address 0x10 by thread \(3,0,0\).*fast mode: no "
                                            r"per-access checks; rerun in checked mode"):
        broken.get_function("store_to_address")(4, 8, (np.uint64(16),))
    x = np.ones(2000, np.float32)
    x[1234] = -1
    with pytest.raises(EmulatorError, match=r"assert\(x\[i\] > 0.0f\) failed \(broken.cu:\d+\) in thread \(82,0,0\) "
                                            r"of block \(9,0,0\)"):
        broken.get_function("checked_positive")(16, 128, (x, np.int32(2000)))
    y = np.zeros(32, np.int32)  # the process is fine afterwards
    broken.get_function("divide_by")(1, 32, (y, np.int32(7)))
    assert (y == 14).all()


def test_file_scope_shared_memory_runs_on_one_thread(two_workers, rng):
    """A __shared__ variable at file scope is one copy in the emulator, so fast mode must not run
    two blocks at once; the sum of every block's tile stays right."""
    code = """
__shared__ float tile[64];
extern "C" __global__ void block_sums(const float* x, float* out) {
    tile[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) { float s = 0; for (int i = 0; i < 64; ++i) s += tile[i]; out[blockIdx.x] = s; }
}
"""
    x = rng.standard_normal(64 * 200).astype(np.float32)
    out = np.zeros(200, np.float32)
    EmuModule(code, name="file_scope_shared.cu", mode="fast").get_function("block_sums")(200, 64, (x, out))
    assert_close(out, x.reshape(200, 64).astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-4, what="block sums")


UNROLLED = r"""
extern "C" __global__ void dot8(const float* a, const float* b, float* out, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float acc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
    # pragma unroll 4
    for (int k = 0; k < 8; ++k) acc[k] += a[t * 8 + k] * b[t * 8 + k];
    float s = 0.0f;
#pragma unroll(1)
    for (int k = 0; k < 8; ++k) s += acc[k];   // #pragma unroll in a comment stays a comment
    out[t] = s;
}
"""


def test_pragma_unroll_becomes_gcc_unroll_in_fast_mode(rng):
    """CUDA's `#pragma unroll [N]` (which GCC ignores) is rewritten in place to EMU_UNROLL(N),
    GCC's `#pragma GCC unroll N` in fast mode and nothing in checked mode; the line numbers stay,
    a comment stays a comment, and both builds compute the same thing."""
    import subprocess

    from minunet.emulator import compiler
    from minunet.emulator.source import find_kernels, rewrite_pragma_unroll, translation_unit

    text = rewrite_pragma_unroll(UNROLLED)
    assert text.count("\n") == UNROLLED.count("\n")
    assert "EMU_UNROLL(64)" in text and "    EMU_UNROLL(4)" in text and "EMU_UNROLL(1)" in text
    assert "#pragma" not in text.replace("// #pragma unroll in a comment", "")
    for source, want in [("#pragma unroll 4 // four\n", "EMU_UNROLL(4) // four\n"),
                         ("#pragma unroll /* a\n b */\n", "EMU_UNROLL(64) /* a\n b */\n"),
                         ("#pragma unroll CO_PER_BLOCK\r\n", "EMU_UNROLL(CO_PER_BLOCK)\r\n"),
                         ('const char* s = "#pragma unroll";\n', 'const char* s = "#pragma unroll";\n'),
                         ("#pragma unrolled\n", "#pragma unrolled\n")]:
        assert rewrite_pragma_unroll(source) == want, source
    # What g++ sees after preprocessing: GCC's pragma in the fast build, none in the checked one.
    unit = translation_unit(UNROLLED, "dot8.cu", find_kernels(UNROLLED))
    for checked, present in ((0, True), (1, False)):
        done = subprocess.run([*compiler.find_compiler(), "-E", "-std=c++17", f"-DEMU_CHECKED={checked}",
                               f"-I{compiler.HEADER_DIR}", f"-I{compiler.INCLUDE_DIR}", "-x", "c++", "-"],
                              input=unit, capture_output=True, text=True, check=True)
        assert ("#pragma GCC unroll 64" in done.stdout and "#pragma GCC unroll 4" in done.stdout) == present
    n = 1000
    a, b = rng.standard_normal((n, 8), np.float32), rng.standard_normal((n, 8), np.float32)
    for mode in ("checked", "fast"):
        out = np.full(n, np.nan, np.float32)
        EmuModule(UNROLLED, name="dot8.cu", mode=mode).get_function("dot8")(
            (n + 127) // 128, 128, (a, b, out, np.int32(n)))
        assert_close(out, (a.astype(np.float64) * b).sum(1), rtol=1e-5, atol=1e-5, what=f"dot8 {mode}")


def test_speed_table_has_every_row_and_ratio(capsys):
    """`python -m minunet.emulator.speed` times cpu, the NumPy reference on cpu and emu (fast) in
    their own processes and prints one row each with the ratios to cpu and to the reference (a
    smoke test of the tool: speed itself is measured by running it, not asserted here)."""
    from minunet.emulator import speed

    assert speed.main(["--base", "4", "--tile", "188", "--steps", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "threads 1" in lines[0] and lines[1].split()[:4] == ["device", "wall", "s/step", "x"]
    rows = {line[:16].strip(): line[16:].split() for line in lines[2:]}
    assert set(rows) == {"cpu", "cpu (reference)", "emu (fast)"}
    values = {name: [float(v) for v in row] for name, row in rows.items()}  # wall, x cpu, x ref, CPU, x cpu
    for name, (wall, x_cpu, x_ref, cpu, _) in values.items():
        assert wall > 0 and cpu > 0 and x_cpu > 0 and x_ref > 0, name   # (printed rounded: no ratio check)


def test_speed_refuses_bad_arguments(capsys):
    from minunet.emulator import speed

    assert speed.main(["--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
