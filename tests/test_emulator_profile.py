"""The emulator's second edition, part 3: counting what makes a kernel fast. Every counter is
checked on a kernel whose numbers are known by hand (tests/emu_kernels/access_patterns.cu):
a coalesced copy moves 4 sectors per 128-byte warp request, a strided one up to 32, a column read
of a 32x32 shared tile needs 32 wavefronts and its padded version 1; the occupancy arithmetic and
the roofline model are checked against hand-computed cases, and the times are labelled as
predicted."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from minunet import emulator
from minunet.emulator import EmuModule, format_profile, gpu_model, profile

KERNELS = Path(__file__).parent / "emu_kernels"
SOURCE = (KERNELS / "access_patterns.cu").read_text()


@pytest.fixture(scope="module")
def patterns() -> EmuModule:
    return EmuModule(SOURCE, name="access_patterns.cu", mode="checked")


def only_row(report):
    assert len(report.rows) == 1, [r.kernel for r in report.rows]
    return report.rows[0]


def distinct_sector_bytes(byte_offsets) -> int:
    return 32 * len({int(b) // 32 for b in byte_offsets})


def test_coalesced_copy_moves_four_sectors_per_request(patterns, rng):
    n = 256 * int(rng.integers(2, 9))
    x, y = rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32)
    with profile(sample_blocks=100) as report:
        patterns.get_function("copy")(n // 256, 256, (x, y, np.int32(n)))
    row = only_row(report)
    assert (row.launches, row.blocks, row.threads_per_block) == (1, n // 256, 256)
    assert row.counts["global_load_requests"] == row.counts["global_store_requests"] == n // 32
    assert row.sectors_per_load == row.sectors_per_store == 4.0
    assert row.counts["global_load_bytes"] == 4 * n
    assert row.dram_read_bytes == row.dram_write_bytes == 4 * n
    assert row.counts["shared_load_requests"] == 0 and row.bank_conflicts == 0
    assert (y == x).all()


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 16])
def test_strided_copy_sectors_per_request(patterns, rng, stride):
    n = 512
    x, y = rng.standard_normal(n * stride).astype(np.float32), np.zeros(n, np.float32)
    with profile(sample_blocks=100) as report:
        patterns.get_function("strided_copy")(n // 128, 128, (x, y, np.int32(n), np.int32(stride)))
    row = only_row(report)
    assert row.sectors_per_load == min(32, 4 * stride)  # 32 lanes x 4 bytes, stride*4 bytes apart
    assert row.sectors_per_store == 4.0
    assert row.dram_read_bytes == distinct_sector_bytes(4 * stride * np.arange(n))
    assert row.dram_write_bytes == 4 * n


@pytest.mark.parametrize("kernel, wavefronts", [("transpose_tile", 32), ("transpose_tile_padded", 1)])
def test_shared_tile_column_read_bank_conflicts(patterns, rng, kernel, wavefronts):
    x, y = rng.standard_normal(1024).astype(np.float32), np.zeros(1024, np.float32)
    with profile() as report:
        patterns.get_function(kernel)(1, (32, 32), (x, y))
    row = only_row(report)
    assert row.counts["shared_store_requests"] == row.counts["shared_load_requests"] == 32
    assert row.wavefronts_per_shared_store == 1.0          # rows: 32 consecutive words, 32 banks
    assert row.wavefronts_per_shared_load == wavefronts    # columns: one bank (32-way) or all 32
    assert row.bank_conflicts == 32 * (wavefronts - 1)
    assert (y.reshape(32, 32) == x.reshape(32, 32).T).all()


def test_broadcast_is_one_wavefront(patterns):
    with profile() as report:
        patterns.get_function("broadcast")(1, 64, (np.ones(1, np.float32), np.zeros(64, np.float32)))
    row = only_row(report)
    assert row.counts["shared_load_requests"] == 2 and row.wavefronts_per_shared_load == 1.0


def test_float4_copy_is_one_16_byte_request_per_lane(patterns, rng):
    n = 128 * 4
    x, y = rng.standard_normal((n, 4)).astype(np.float32), np.zeros((n, 4), np.float32)
    with profile(sample_blocks=100) as report:
        patterns.get_function("copy_float4")(n // 128, 128, (x, y, np.int32(n)))
    row = only_row(report)
    assert row.counts["global_load_requests"] == n // 32 and row.sectors_per_load == 16.0  # 512 bytes
    assert (y == x).all()


def test_sampled_blocks_scale_to_the_whole_grid(patterns, rng):
    n = 256 * 16
    x, y = rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32)
    with profile(sample_blocks=2) as report:
        patterns.get_function("copy")(16, 256, (x, y, np.int32(n)))
    row = only_row(report)
    assert row.counts["global_load_requests"] == n // 32  # 2 of 16 blocks traced, scaled by 8
    assert row.dram_read_bytes == 4 * n                    # counted over every block


def test_tensor_core_flops_are_counted(rng):
    wmma = EmuModule((KERNELS / "wmma_gemm.cu").read_text(), name="wmma_gemm.cu", mode="fast")  # counted checked
    m, n, k = 32, 48, 16
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    c = np.zeros((m, n), np.float32)
    with profile(gpu="sm_80") as report:
        wmma.get_function("gemm_tf32")((n // 16, m // 16), 32, (a, b, c, np.int32(m), np.int32(n), np.int32(k), np.int32(1)))
    row = only_row(report)
    assert row.tensor_flops == 2 * m * n * k and row.total_flops == 2 * m * n * k
    assert np.abs(c - a @ b).max() < 1e-2


# ---- occupancy and the roofline model ------------------------------------------------------------

@pytest.mark.parametrize("arch, threads, registers, shared, blocks, limit", [
    ("sm_80", 256, 64, 0, 4, "registers"),        # 2048 registers per warp: 32 warps -> 4 blocks of 8 warps
    ("sm_80", 256, 32, 49152, 3, "shared memory"),  # 48 KiB + 1 KiB reserved: 3 in 164 KiB
    ("sm_80", 128, 32, 0, 16, "warps"),           # 4 warps per block, 64 warps per SM
    ("sm_90", 256, 63, 21888, 4, "registers"),    # conv3x3's tiled kernel: 63 -> 64 registers
    ("sm_90", 32, 16, 0, 32, "blocks"),           # 32 one-warp blocks: the block limit (64 warps fit)
    ("sm_90", 1024, 255, 0, 0, "registers"),      # 255 registers x 1024 threads do not fit at all
])
def test_occupancy_by_hand(arch, threads, registers, shared, blocks, limit):
    result = emulator.occupancy(emulator.GPUS[arch], threads, registers, shared)
    assert (result.blocks_per_sm, result.limit) == (blocks, limit)
    assert result.occupancy == pytest.approx(blocks * -(-threads // 32) / 64)


def test_roofline_is_the_larger_bound_scaled_by_busy_multiprocessors():
    g = emulator.GPUS["sm_90"]
    seconds, bound = gpu_model.roofline(g, blocks=132, flops=0, tensor_flops=0, dram_bytes=3.35e9)
    assert (seconds, bound) == (pytest.approx(1e-3), "memory")
    seconds, bound = gpu_model.roofline(g, blocks=66, flops=67e9, tensor_flops=0, dram_bytes=1e6)
    assert (seconds, bound) == (pytest.approx(2e-3), "compute")  # half the SMs busy
    seconds, _ = gpu_model.roofline(g, blocks=1000, flops=494.7e9, tensor_flops=494.7e9, dram_bytes=0)
    assert seconds == pytest.approx(1e-3)


def test_ptxas_output_is_parsed():
    sample = """ptxas info    : Compiling entry function 'tiled' for 'sm_90'
ptxas info    : Function properties for tiled
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 21888 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'plain' for 'sm_90'
ptxas info    : Used 10 registers, used 0 barriers
"""
    assert gpu_model.parse_resource_usage(sample) == {"tiled": gpu_model.Resources(48, 21888, 16),
                                                      "plain": gpu_model.Resources(10, 0, 0)}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_occupancy_from_ptxas_in_the_report(patterns, rng):
    x, y = rng.standard_normal(1024).astype(np.float32), np.zeros(1024, np.float32)
    with profile(gpu="sm_90", flops={"transpose_tile_padded": 1024}) as report:
        patterns.get_function("transpose_tile_padded")(1, (32, 32), (x, y))
    row = only_row(report)
    assert row.resources.shared_bytes == 32 * 33 * 4 and row.resources.registers > 0
    assert row.occupancy == emulator.occupancy(emulator.GPUS["sm_90"], 1024, row.resources.registers, 32 * 33 * 4)
    launch, = report.launches
    assert launch.counts.occupancy == row.occupancy and launch.counts.flops == 1024
    expected = gpu_model.predict_launch(emulator.GPUS["sm_90"], launch.counts)
    assert row.predicted_seconds == pytest.approx(expected.seconds) and row.bound == expected.bound
    assert row.achieved_occupancy == pytest.approx(32 / 64)   # one block of 32 warps on its SM
    table = format_profile(report)
    assert "PREDICTED for H100 SXM5 80GB (sm_90" in table and "predicted us" in table
    assert "occ th" in table and "occ ach" in table and " bound" in table
    assert "transpose_tile_padded" in table and "total (predicted)" in table


def test_format_without_toolkit_or_flops_says_so(patterns, monkeypatch, rng):
    monkeypatch.setattr(gpu_model, "nvcc", lambda: None)
    with profile(gpu="sm_80") as report:
        patterns.get_function("copy")(1, 32, (np.ones(32, np.float32), np.zeros(32, np.float32), np.int32(32)))
    table = format_profile(report)
    assert "PREDICTED for A100 SXM4 80GB (sm_80" in table
    assert "nvcc (the CUDA toolkit) is not installed" in table and "warp and block limits" in table
    assert only_row(report).occupancy is None and only_row(report).predicted_seconds > 0


def test_profile_arguments_are_validated():
    with pytest.raises(ValueError, match=r"unknown GPU 'sm_75' for the profiler; use one of sm_80, sm_90, h200"):
        with profile(gpu="sm_75"):
            pass
    with pytest.raises(ValueError, match="sample_blocks must be a positive int"):
        with profile(sample_blocks=0):
            pass


def test_long_kernel_names_are_printed_whole(rng):
    """The table's kernel column widens to the longest name (conv_transpose2x2_grad_weight_serial
    has 36 characters), so two kernels that share a 30-character prefix stay apart."""
    name = "copy_with_a_name_longer_than_thirty_characters"
    code = f'extern "C" __global__ void {name}(const float* x, float* y, int n) {{\n' \
           "    int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) y[i] = x[i];\n}\n"
    fn = EmuModule(code, name="long_name.cu").get_function(name)
    with profile(gpu="sm_90") as report:
        fn(1, 32, (np.ones(32, np.float32), np.zeros(32, np.float32), np.int32(32)))
    rows = format_profile(report).splitlines()
    row = next(line for line in rows if line.startswith(name))
    header = next(line for line in rows if line.startswith("kernel"))
    assert row.index(" 1 ") > len(name) and header.index("launch") > len(name)


def test_busiest_thread_and_launches_in_order(patterns, rng):
    """Each launch is kept in order with its grid; the busiest thread of a copy makes 1 load and 1
    store (its load touches a new sector: an L1 miss), of the padded transpose 1 global load, 1
    shared store, 1 shared load, 1 global store."""
    n = 256 * 3
    x, y = rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32)
    t_in, t_out = rng.standard_normal(1024).astype(np.float32), np.zeros(1024, np.float32)
    with profile(sample_blocks=4) as report:
        patterns.get_function("copy")(3, 256, (x, y, np.int32(n)))
        patterns.get_function("transpose_tile_padded")(1, (32, 32), (t_in, t_out))
    copy, transpose = report.launches
    assert (copy.kernel, copy.grid, copy.block) == ("copy", (3, 1, 1), (256, 1, 1))
    assert transpose.kernel == "transpose_tile_padded"
    c = copy.counts
    assert (c.thread_global_loads, c.thread_global_stores, c.thread_shared_loads, c.l1_hit_fraction) == (1, 1, 0, 0.0)
    t = transpose.counts
    assert (t.thread_global_loads, t.thread_global_stores) == (1, 1)
    assert (t.thread_shared_loads, t.thread_shared_stores) == (1, 1)
    assert copy.prediction.bound in gpu_model.TERMS and copy.predicted_seconds > 0
    assert t_out.reshape(32, 32).T.ravel().tolist() == t_in.tolist()
