"""The CUDA emulator (minunet.emulator): correct kernels give the right answers, and the classic
kernel bugs (out-of-bounds, missing __syncthreads(), unwritten shared memory, divergent barriers)
are caught. The kernels live in tests/emu_kernels/*.cu."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_close
from minunet.emulator import (CompilerNotFoundError, EmuModule, EmulatorError, KernelNotFoundError,
                              LaunchError, compiler)

KERNELS = Path(__file__).parent / "emu_kernels"
SEEDS = [None, 1, 2, 3, 12345]  # None: the default (MINUNET_EMU_SEED or 0)


def load(file: str, **kwargs) -> EmuModule:
    return EmuModule((KERNELS / file).read_text(), name=file, **kwargs)


@pytest.fixture(scope="module")
def broken() -> EmuModule:
    return load("broken.cu")


def blocks_for(n: int, block: int) -> int:
    return (n + block - 1) // block


# ---- correct kernels ---------------------------------------------------------------------------

def test_vector_add_grid_stride_any_size(rng):
    fn = load("vector_add.cu").get_function("vector_add")
    for _ in range(4):
        n = int(rng.integers(1, 5000))
        block = int(rng.choice([32, 96, 128, 256]))
        grid = int(rng.integers(1, blocks_for(n, block) + 2))  # often fewer threads than elements
        a, b = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
        c = np.full(n, np.nan, np.float32)
        fn(grid, block, (a, b, c, np.int32(n)))
        assert_close(c, a + b, rtol=0, atol=0, what=f"vector_add n={n} grid={grid} block={block}")


def test_in_place_call_with_the_same_array_twice(rng):
    fn = load("vector_add.cu").get_function("scale")
    n = int(rng.integers(100, 1000))
    x = rng.standard_normal(n).astype(np.float32)
    expected = np.float32(2.5) * x
    fn(blocks_for(n, 64), 64, (x, x, np.float32(2.5), np.uint32(n)))  # x is input and output
    assert_close(x, expected, rtol=0, atol=0, what="in-place scale")


@pytest.mark.parametrize("seed", SEEDS)
def test_block_sum_with_barriers_is_right_for_every_thread_order(rng, seed):
    mod = load("block_sum.cu", shuffle_seed=seed)
    fn = mod.get_function("block_sum")
    n = int(rng.integers(300, 3000))
    x = rng.random(n, np.float32)
    out = np.zeros(1, np.float32)
    fn(blocks_for(n, 256), 256, (x, out, np.int32(n)))
    assert fn.uses_barriers  # the launch found the __syncthreads() and ran the threads as fibers
    assert_close(out[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-4, what=f"block_sum seed={seed}")


def test_block_sum_compile_option_and_dynamic_shared_memory(rng):
    fixed = load("block_sum.cu", options=("-DBLOCK=64",)).get_function("block_sum")
    dynamic = load("block_sum.cu").get_function("block_sum_dynamic")
    n = int(rng.integers(100, 2000))
    x = rng.random(n, np.float32)
    ref = x.astype(np.float64).sum()
    out = np.zeros(1, np.float32)
    fixed(blocks_for(n, 64), 64, (x, out, np.int32(n)))
    assert_close(out[0], ref, rtol=1e-5, atol=1e-4, what="block_sum -DBLOCK=64")
    for block in (32, 128, 512):
        out[:] = 0
        dynamic(blocks_for(n, block), block, (x, out, np.int32(n)), shared_mem=4 * block)
        assert_close(out[0], ref, rtol=1e-5, atol=1e-4, what=f"block_sum_dynamic block={block}")


def test_launch_bounds_are_enforced():
    fn = load("block_sum.cu").get_function("block_sum")  # __launch_bounds__(256)
    with pytest.raises(LaunchError, match=r"__launch_bounds__\(256\)"):
        fn(1, 512, (np.zeros(4, np.float32), np.zeros(1, np.float32), np.int32(4)))


def test_3d_grid_of_3d_blocks(rng):
    mod = load("grid_index.cu")
    write, count = mod.get_function("write_coordinates"), mod.get_function("count_threads")
    for _ in range(3):
        block = tuple(int(v) for v in rng.integers(1, [9, 7, 5]))
        shape = tuple(int(v) for v in rng.integers(1, [6, 13, 17]))  # (D, H, W)
        grid = tuple(blocks_for(s, b) for s, b in zip(shape[::-1], block))
        zyx = np.full(shape + (3,), -1, np.int32)
        write(grid, block, (zyx, *(np.int32(s) for s in shape)))
        expected = np.stack(np.indices(shape), axis=-1).astype(np.int32)
        assert_close(zyx, expected, rtol=0, atol=0, what=f"coordinates grid={grid} block={block}")
        counter = np.zeros(1, np.uint32)
        count(grid, block, (counter,))
        assert counter[0] == np.prod(grid) * np.prod(block)
    zyx = np.full((1, 5, 7, 3), -1, np.int32)  # a 2-D launch (z defaults to 1)
    write((1, 1), (7, 5), (zyx, np.int32(1), np.int32(5), np.int32(7)))
    assert_close(zyx, np.stack(np.indices((1, 5, 7)), axis=-1), rtol=0, atol=0, what="2-D launch")


def test_atomic_histogram_and_float_atomics(rng):
    mod = load("histogram.cu")
    n, nbins = int(rng.integers(500, 5000)), int(rng.integers(3, 40))
    values = rng.integers(-3, nbins + 3, n).astype(np.int32)  # some outside: clamped to the ends
    bins = np.zeros(nbins, np.int32)
    mod.get_function("histogram")(7, 128, (values, bins, np.int32(n), np.int32(nbins)))
    expected = np.bincount(np.clip(values, 0, nbins - 1), minlength=nbins)
    assert_close(bins, expected, rtol=0, atol=0, what="histogram")

    x = rng.standard_normal(n).astype(np.float32)
    total, max_bits = np.zeros(1, np.float32), np.zeros(1, np.int32)
    mod.get_function("sum_and_max")(blocks_for(n, 256), 256, (x, total, max_bits, np.int32(n)))
    assert_close(total[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-3, what="atomicAdd float")
    assert max_bits.view(np.float32)[0] == max(x.max(), 0.0)


def test_math_functions_match_numpy(rng):
    n = int(rng.integers(50, 300))
    v = rng.uniform(0.5, 2.0, n).astype(np.float32)
    y = np.zeros((n, 10), np.float32)
    load("histogram.cu").get_function("math_functions")(blocks_for(n, 64), 64, (v, y, np.int32(n)))
    d = v.astype(np.float64)
    expected = np.stack([
        np.exp(d) + np.exp(-d), np.log(d) + np.log(2 * d), np.ones_like(d),
        np.maximum(d, 1) - np.minimum(d, 1) + d, np.floor(3 * v) + np.ceil(3 * v) + d ** 1.5, 1 / d,
        np.rint(np.float32(2.5) * v) + np.trunc(np.float32(-2.5) * v),
        np.maximum(3, np.floor(4 * v)) - np.minimum(2, np.floor(4 * v)),
        np.zeros_like(d), 2 * d], axis=1)
    assert np.array_equal(y[:, 8], np.where(v > 1, np.inf, -np.finfo(np.float32).max)), "INFINITY, FLT_MAX"
    y[:, 8] = 0
    assert_close(y, expected, rtol=1e-6, atol=1e-6, what="math functions")


def test_uint32_hash_matches_numpy(rng):
    n, seed = int(rng.integers(100, 3000)), np.uint32(rng.integers(0, 2**32))
    u = np.zeros(n, np.float32)
    load("features.cu").get_function("hash_uniform")(blocks_for(n, 128), 128, (u, seed, np.int32(n)))
    h = np.arange(n, dtype=np.uint32) + np.array([seed]) * np.uint32(0x9E3779B9)  # arrays wrap like C
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = (h ^ (h >> np.uint32(shift))) * np.uint32(factor)
    h ^= h >> np.uint32(16)
    assert_close(u, (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24), rtol=0, atol=0, what="hash")


@pytest.mark.parametrize("seed", [None, 7])
def test_tiled_transpose_with_2d_blocks(rng, seed):
    height, width = (int(v) for v in rng.integers(1, 40, 2))
    x = rng.standard_normal((height, width)).astype(np.float32)
    out = np.full((width, height), np.nan, np.float32)
    load("features.cu", shuffle_seed=seed).get_function("transpose")(
        (blocks_for(width, 8), blocks_for(height, 8)), (8, 8), (x, out, np.int32(height), np.int32(width)))
    assert_close(out, x.T, rtol=0, atol=0, what=f"transpose {height}x{width}")


# ---- bugs the emulator catches ---------------------------------------------------------------

def test_read_one_past_the_end_fails_the_launch_and_names_the_buffer(broken):
    a, c = np.ones(300, np.float32), np.zeros(300, np.float32)
    with pytest.raises(EmulatorError, match=r"copy_off_by_one.*out-of-bounds read.*argument 0 `a`.*element 300"):
        broken.get_function("copy_off_by_one")(3, 128, (a, c, np.int32(300)))
    assert not c.any(), "a failed launch must leave the arrays unchanged"


def test_write_past_the_end_fails_the_launch(broken, rng):
    n = int(rng.integers(1, 1000))
    with pytest.raises(EmulatorError, match=rf"out-of-bounds write .*argument 1 `c`.*element {n} "):
        broken.get_function("write_past_end")(blocks_for(n, 64), 64,
                                              (np.ones(n, np.float32), np.zeros(n, np.float32), np.int32(n)))


def test_negative_index_fails_the_launch(broken, rng):
    n = int(rng.integers(1, 5000))  # any size: the check does not depend on page alignment
    with pytest.raises(EmulatorError, match=r"out-of-bounds read .*thread \(0,0,0\) of block \(0,0,0\).*element -1 "):
        broken.get_function("left_difference")(blocks_for(n, 128), 128,
                                               (np.ones(n, np.float32), np.zeros(n, np.float32), np.int32(n)))


def test_overrun_of_dynamic_shared_memory_is_caught(broken):
    with pytest.raises(EmulatorError, match=r"out-of-bounds write .*extern __shared__ buffer \(256 bytes"):
        broken.get_function("dynamic_shared_overrun")(1, 64, (np.zeros(64, np.float32),), shared_mem=256)


@pytest.mark.parametrize("kernel", ["shared_tile_too_small", "shared_tile_too_small_template"])
def test_overrun_of_a_static_shared_array_names_it(broken, kernel):
    """Also when the array is declared in a template device function (conv3x3.cu's tiled kernels)."""
    with pytest.raises(EmulatorError, match=r"out-of-bounds index by thread \(63,0,0\) of block \(0,0,0\) on line "
                                            r"\d+: the index of __shared__ `tile` \(float tile\[(64|TILE)\]\) is 64, "
                                            r"valid 0..63"):
        broken.get_function(kernel)(1, 64, (np.ones(64, np.float32), np.zeros(64, np.float32)))


@pytest.mark.parametrize("seed", SEEDS)
def test_missing_syncthreads_changes_the_result(rng, seed):
    """With the race checker off, the shuffled thread order alone exposes the missing barrier."""
    n = 2 * 256
    x = rng.random(n, np.float32)
    ref = x.astype(np.float64).sum()
    correct = load("block_sum.cu", shuffle_seed=seed).get_function("block_sum")
    buggy = load("broken.cu", shuffle_seed=seed, racecheck=False).get_function("block_sum_missing_sync")
    out = np.zeros(1, np.float32)
    correct(2, 256, (x, out, np.int32(n)))
    assert abs(out[0] - ref) <= 1e-4 + 1e-5 * ref
    out[:] = 0
    buggy(2, 256, (x, out, np.int32(n)))
    assert abs(out[0] - ref) > 1e-4 + 1e-5 * ref, f"missing __syncthreads() not exposed for seed {seed}"


def test_missing_syncthreads_is_reported_as_a_race(broken):
    """With the race checker on (the default), the first unordered read names both threads and lines."""
    x = np.ones(512, np.float32)
    with pytest.raises(EmulatorError, match=r"block_sum_missing_sync.*race \(read-after-write hazard\) on __shared__ "
                                            r"`partial`.*reads it at broken.cu:31, but thread \(\d+,0,0\) wrote it at "
                                            r"broken.cu:31 with no barrier"):
        broken.get_function("block_sum_missing_sync")(2, 256, (x, np.zeros(1, np.float32), np.int32(512)))


@pytest.mark.parametrize("kernel", ["shared_neighbour_unwritten", "shared_neighbour_unwritten_template"])
def test_read_of_unwritten_shared_memory_shows_nan(broken, rng, kernel):
    n, block = int(rng.integers(200, 600)), 128
    x = rng.random(n, np.float32)
    y = np.zeros(n, np.float32)
    broken.get_function(kernel)(blocks_for(n, block), block, (x, y, np.int32(n)))
    t = np.arange(n) % block
    assert np.array_equal(np.isnan(y), t >= block - 2), "NaN exactly where tile[block-1] is read"
    ok = t < block - 2
    right_neighbour = np.append(x[1:], np.float32(0))  # the kernel stores 0 for i >= n
    assert_close(y[ok], (x + right_neighbour)[ok], rtol=0, atol=0, what="other slots")


@pytest.mark.parametrize("seed", SEEDS)
def test_shared_memory_does_not_carry_over_between_blocks(seed, rng):
    """Whatever order the blocks run in, a block never sees what another block left in shared
    memory: only block 0 writes its tile, and every other block reads NaN."""
    blocks, block = 6, 32
    x = rng.random(block, np.float32)
    y = np.zeros(blocks * block, np.float32)
    load("broken.cu", shuffle_seed=seed).get_function("shared_left_by_another_block_template")(blocks, block, (x, y))
    assert_close(y[:block], x, rtol=0, atol=0, what="block 0")
    assert np.isnan(y[block:]).all(), f"{int((~np.isnan(y[block:])).sum())} values leaked between blocks"


def test_early_return_before_a_barrier_is_reported(broken):
    with pytest.raises(EmulatorError, match=r"returned while thread .* waits at __syncthreads\(\) on line \d+"):
        broken.get_function("early_return_before_barrier")(5, 64, (np.ones(300, np.float32),
                                                                  np.zeros(300, np.float32), np.int32(300)))


def test_divergent_barrier_is_reported(broken):
    with pytest.raises(EmulatorError, match=r"divergent __syncthreads\(\).*line \d+.*line \d+"):
        broken.get_function("divergent_barrier")(1, 64, (np.zeros(64, np.float32),))


def test_device_assert_faults_const_writes_and_stack_overflow_are_reported(broken):
    x = np.ones(200, np.float32)
    x[77] = -1
    with pytest.raises(EmulatorError, match=r"assert\(x\[i\] > 0.0f\) failed \(broken.cu:\d+\) in thread \(77,0,0\)"):
        broken.get_function("checked_positive")(2, 128, (x, np.int32(200)))
    with pytest.raises(EmulatorError, match="integer division by zero"):
        broken.get_function("divide_by")(1, 32, (np.zeros(32, np.int32), np.int32(0)))
    with pytest.raises(EmulatorError, match=r"segmentation fault at address 0x10 by thread \(3,0,0\)"):
        broken.get_function("store_to_address")(1, 8, (np.uint64(16),))
    with pytest.raises(EmulatorError, match=r"write through a const pointer .*argument 0 `x`"):
        broken.get_function("write_through_const")(1, 8, (np.ones(8, np.float32),))
    with pytest.raises(EmulatorError, match=r"overflowed its 64 KiB emulator stack"):
        broken.get_function("huge_local_array")(1, 4, (np.zeros(4, np.float32), np.int32(32 * 1024)))
    y = np.zeros(32, np.int32)  # and the process is fine afterwards
    broken.get_function("divide_by")(1, 32, (y, np.int32(7)))
    assert (y == 14).all()


# ---- thread order ------------------------------------------------------------------------------

def test_thread_order_is_shuffled_by_default_and_reproducible():
    code = (KERNELS / "grid_index.cu").read_text()

    def arrival(seed):
        order, counter = np.full(4 * 64, -1, np.int32), np.zeros(1, np.int32)
        EmuModule(code, "grid_index.cu", shuffle_seed=seed).get_function("arrival_order")(
            4, 64, (order, counter))
        return order

    natural = arrival(-1)
    assert np.array_equal(natural, np.arange(4 * 64)), "seed -1: blocks and threads in index order"
    shuffled = arrival(None)
    assert np.array_equal(np.sort(shuffled), np.arange(4 * 64)) and not np.array_equal(shuffled, natural)
    assert np.array_equal(arrival(None), shuffled), "the same seed and launch count give the same order"
    assert not np.array_equal(arrival(5), shuffled)


# ---- launch checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, block, args, message", [
    (1, 2048, "ok", r"block \(2048, 1, 1\) has x = 2048"),
    (1, (32, 32, 2), "ok", r"block \(32, 32, 2\) has 2048 threads; a block holds at most 1024"),
    ((2, 0), 32, "ok", r"grid \(2, 0, 1\) has y = 0"),
    (1, 32, "short", r"takes 4 arguments \(a, b, c, n\), got 3"),
    (1, 32, "python_int", r"argument 3 `n` is a int; pass a NumPy scalar .*np.int32"),
    (1, 32, "int64", r"argument 3 `n` must be np.int32, got np.int64"),
    (1, 32, "float64_array", r"argument 0 `a` points to float32 .* got a float64 array"),
    (1, 32, "list", r"argument 1 `b` is a pointer parameter; pass a NumPy array"),
    (1, 32, "strided", r"argument 2 `c` must be C-contiguous"),
])
def test_invalid_launches_name_the_kernel_and_the_problem(grid, block, args, message):
    fn = load("vector_add.cu").get_function("vector_add")
    a, n = np.zeros(8, np.float32), np.int32(8)
    choices = {
        "ok": (a, a, a.copy(), n), "short": (a, a, a),
        "python_int": (a, a, a.copy(), 8), "int64": (a, a, a.copy(), np.int64(8)),
        "float64_array": (a.astype(np.float64), a, a.copy(), n), "list": (a, [0.0] * 8, a.copy(), n),
        "strided": (a, a, np.zeros(16, np.float32)[::2], n),
    }
    with pytest.raises(LaunchError, match=rf"kernel 'vector_add' \(module vector_add.cu\): {message}"):
        fn(grid, block, choices[args])


def test_unknown_kernel_lists_the_known_ones():
    with pytest.raises(KernelNotFoundError, match=r"no __global__ function 'vector_sub'; it defines: vector_add, scale"):
        load("vector_add.cu").get_function("vector_sub")


# ---- compiling ------------------------------------------------------------------------------------

def test_compile_error_names_the_module_and_the_line():
    code = "extern \"C\" __global__ void k(float* y) {\n  y[threadIdx.x] = undefined_name;\n}\n"
    with pytest.raises(EmulatorError, match=r"(?s)compiling oops.cu for the CUDA emulator failed.*oops.cu:2:.*undefined_name"):
        EmuModule(code, name="oops.cu")


def test_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/bin/g++")
    with pytest.raises(CompilerNotFoundError, match=r"apt-get install g\+\+"):
        EmuModule("extern \"C\" __global__ void k() {}", name="k.cu")


def test_second_module_of_the_same_code_is_a_cache_hit(monkeypatch, tmp_path):
    monkeypatch.setenv("MINUNET_CACHE_DIR", str(tmp_path))
    code = f"// unique {tmp_path.name}\nextern \"C\" __global__ void k(float* y) {{ y[threadIdx.x] = 1.0f; }}\n"
    before = compiler.compile_count()
    first = EmuModule(code, name="cached.cu")
    assert compiler.compile_count() == before + 1
    libraries = list((tmp_path / "emu").glob("cached.cu-*.so"))
    assert len(libraries) == 1
    stamp = libraries[0].stat().st_mtime_ns
    EmuModule(code, name="cached.cu")                      # same process: already loaded
    monkeypatch.setattr(compiler, "_loaded", {})           # a fresh process: found on disk
    second = EmuModule(code, name="cached.cu")
    assert compiler.compile_count() == before + 1
    assert libraries[0].stat().st_mtime_ns == stamp
    y = np.zeros(4, np.float32)
    second.get_function("k")(1, 4, (y,))
    assert first.kernel_names == second.kernel_names == ("k",) and (y == 1).all()
    EmuModule(code, name="cached.cu", options=("-DVARIANT=2",))  # other options: another library
    assert compiler.compile_count() == before + 2


def test_a_real_file_is_compiled_once_whatever_the_working_folder(monkeypatch, tmp_path):
    """A kernel file's #line names are absolute, so the library built from the repository root
    serves a notebook running in notebooks/ too; a source without a file (a relative name) is
    keyed by the folder, whose path its debug line tables depend on."""
    monkeypatch.setenv("MINUNET_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "src" / "once.cu"
    source.parent.mkdir()
    source.write_text(f"// unique {tmp_path.name}\nextern \"C\" __global__ void k(float* y) {{ y[0] = 2.0f; }}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = compiler.compile_count()
    EmuModule(source.read_text(), name=str(source))
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(compiler, "_loaded", {})           # a fresh process in another folder
    y = np.zeros(1, np.float32)
    EmuModule(source.read_text(), name=str(source)).get_function("k")(1, 1, (y,))
    assert compiler.compile_count() == before + 1 and y[0] == 2.0
    code = f"// relative {tmp_path.name}\nextern \"C\" __global__ void k(float* y) {{ y[0] = 3.0f; }}\n"
    EmuModule(code, name="relative.cu")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compiler, "_loaded", {})
    EmuModule(code, name="relative.cu")
    assert compiler.compile_count() == before + 3


def test_debug_build_compiles_without_optimisation(monkeypatch, tmp_path):
    monkeypatch.setenv("MINUNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MINUNET_EMU_DEBUG", "1")
    assert "-O0" in compiler._flags("g++ (Debian 12.2.0) 12.2.0") and "-g" in compiler._flags("g++")
    fn = load("vector_add.cu").get_function("vector_add")
    a = np.arange(10, dtype=np.float32)
    c = np.zeros(10, np.float32)
    fn(1, 32, (a, a, c, np.int32(10)))
    assert (c == 2 * a).all()
    with pytest.raises(ValueError, match=r"option '-O3' .* is not supported"):
        EmuModule("", name="x.cu", options=("-O3",))
