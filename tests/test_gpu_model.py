"""The timing model of minunet.emulator.gpu_model, term by term, on cases computed by hand, and the
calibration against Nsight Compute (minunet.calibrate): its CSV reader on a tiny file written here,
and the CLI's last line on the smallest U-Net. Every time here is PREDICTED; nothing needs a GPU."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from minunet import calibrate
from minunet.emulator import EmuModule, gpu_model, profile
from minunet.emulator.gpu_model import LaunchCounts, predict_launch

H200 = gpu_model.gpu("h200")


def cycles(n: float) -> float:
    return n / H200.clock_hz


# ---- each term by hand --------------------------------------------------------------------------
def test_h200_beside_h100_and_a100():
    assert (H200.arch, H200.multiprocessors, H200.dram_bandwidth, H200.l2_bytes) == ("sm_90", 132, 4.8e12, 60 * 2**20)
    assert gpu_model.gpu("H100") is gpu_model.GPUS["sm_90"] and gpu_model.gpu("a100") is gpu_model.GPUS["sm_80"]
    assert gpu_model.GPUS["sm_90"].l2_bytes == 50 * 2**20
    with pytest.raises(ValueError, match="unknown GPU 'v100'"):
        gpu_model.gpu("v100")


def test_an_empty_launch_costs_the_floor():
    p = predict_launch(H200, LaunchCounts(blocks=1, threads_per_block=1))
    assert p.seconds == pytest.approx(H200.launch_floor_s) and p.bound == "launch"
    assert (p.waves, p.resident_blocks) == (1, 1)


@pytest.mark.parametrize("shared_loads", [100, 1000])
def test_one_block_is_the_floor_plus_one_threads_chain(shared_loads):
    """1 block: one multiprocessor runs it; the time is the floor plus the busiest thread's chain
    (of 16 global loads the first from DRAM, then 10 L1 hits and 5 from L2; the shared loads; 2 stores)."""
    c = LaunchCounts(blocks=1, threads_per_block=256, thread_global_loads=16, l1_hit_fraction=10 / 15,
                     thread_shared_loads=shared_loads, thread_global_stores=2)
    chain = (H200.dram_cycles + 10 * H200.l1_hit_cycles + 5 * H200.l2_cycles
             + shared_loads * H200.shared_cycles + 2 * H200.store_cycles)
    p = predict_launch(H200, c)
    assert p.terms["latency"] == pytest.approx(cycles(chain))
    assert p.seconds == pytest.approx(H200.launch_floor_s + cycles(chain)) and p.bound == "latency"
    assert p.achieved_occupancy == pytest.approx(8 / 64)   # 8 warps of one block on its SM


def test_waves_and_the_tail():
    """1024-thread blocks: 2 fit on a multiprocessor (64 warps). 8 blocks: one wave on 8 SMs;
    264 blocks: 2 per SM at once, one wave; 265: the busiest SM runs 3, so a second wave (the tail)."""
    chain = LaunchCounts(blocks=8, threads_per_block=1024, thread_shared_loads=1000)
    one = predict_launch(H200, chain)
    assert (one.waves, one.resident_blocks, one.achieved_occupancy) == (1, 1, pytest.approx(32 / 64))
    chain.blocks = 264
    full = predict_launch(H200, chain)
    assert (full.waves, full.resident_blocks, full.achieved_occupancy) == (1, 2, pytest.approx(1.0))
    assert full.terms["latency"] == pytest.approx(one.terms["latency"])
    chain.blocks = 265
    tail = predict_launch(H200, chain)
    assert (tail.waves, tail.resident_blocks) == (2, 2)
    assert tail.terms["latency"] == pytest.approx(2 * one.terms["latency"])
    assert tail.achieved_occupancy == pytest.approx(265 / (132 * 2) * 32 / 64)


def test_theoretical_occupancy_limits_resident_blocks():
    occ = gpu_model.occupancy(H200, 256, 128, 0)   # 128 registers: 2 blocks of 256 threads
    c = LaunchCounts(blocks=132 * 4, threads_per_block=256, thread_shared_loads=100, occupancy=occ)
    p = predict_launch(H200, c)
    assert (occ.blocks_per_sm, p.resident_blocks, p.waves) == (2, 2, 2)
    assert p.theoretical_occupancy == occ.occupancy == pytest.approx(16 / 64)


def test_an_l2_resident_buffer_writes_no_dram():
    """1 MB read and written: the writes stay in the 60 MB L2; 100 MB: they go to DRAM."""
    small = LaunchCounts(blocks=1024, threads_per_block=256, dram_read_bytes=1e6, dram_write_bytes=1e6)
    assert predict_launch(H200, small).terms["DRAM"] == pytest.approx(1e6 / 4.8e12)
    big = LaunchCounts(blocks=1024, threads_per_block=256, dram_read_bytes=100e6, dram_write_bytes=100e6)
    p = predict_launch(H200, big)
    assert p.terms["DRAM"] == pytest.approx(200e6 / 4.8e12) and p.bound == "DRAM"
    assert p.seconds == pytest.approx(H200.launch_floor_s + 200e6 / 4.8e12)


def test_issue_l1_shared_and_l2_terms():
    """Per multiprocessor: 4 warp instructions, l1_lines_per_clock L1 lines and 1 shared wavefront
    per cycle; the L2 moves l2_bytes_per_clock. 132 blocks: each SM does 1/132 of the launch."""
    c = LaunchCounts(blocks=132, threads_per_block=32, global_load_requests=132 * 4000, shared_requests=0,
                     shared_wavefronts=132 * 20000, global_load_sectors=132 * 16000, l1_hit_fraction=0.5,
                     flops=132 * 64 * 8000, global_lines=132 * 10000)
    p = predict_launch(H200, c)
    assert p.terms["issue"] == pytest.approx(cycles((4000 + 8000) / 4))
    assert p.terms["L1"] == pytest.approx(cycles(10000 / H200.l1_lines_per_clock))
    assert p.terms["shared"] == pytest.approx(cycles(20000)) and p.bound == "shared"
    assert p.terms["L2"] == pytest.approx(32 * 132 * 8000 / (H200.l2_bytes_per_clock * H200.clock_hz))


SERIAL_SUM = r'''
extern "C" __global__ void serial_sum(const float* x, float* y, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += x[i];   // one thread, one load after another
    y[0] = s;
}
'''


def test_a_latency_bound_serial_loop_is_counted_and_predicted():
    """One thread sums n floats: n loads, of which the first of each 32-byte sector (8 floats)
    misses L1 and the other 7 hit; the prediction is its chain, load after load (the first from
    DRAM); one warp request per load, each on one 128-byte line."""
    n = 8 * int(np.random.default_rng(18).integers(20, 40))
    fn = EmuModule(SERIAL_SUM, name="serial_sum.cu").get_function("serial_sum")
    x, y = np.ones(n, np.float32), np.zeros(1, np.float32)
    with profile(gpu="h200", sample_blocks=1) as report:
        fn(1, 1, (x, y, np.int32(n)))
    launch, = report.launches
    c = launch.counts
    assert (c.thread_global_loads, c.thread_global_stores, c.thread_shared_loads) == (n, 1, 0)
    assert c.l1_hit_fraction == pytest.approx(7 / 8)
    assert c.global_lines == n + 1   # n load requests and 1 store, one line each
    chain = (H200.dram_cycles + (n - 1) * (7 / 8 * H200.l1_hit_cycles + 1 / 8 * H200.l2_cycles)
             + H200.store_cycles)
    assert launch.prediction.bound == "latency"
    assert launch.predicted_seconds == pytest.approx(H200.launch_floor_s + cycles(chain), rel=0.02)
    assert report.rows[0].predicted_seconds == launch.predicted_seconds and y[0] == n


# ---- the calibration ------------------------------------------------------------------------------
CSV = '''==PROF== Connected to process 1 (python3)
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python3","h","relu_forward","1","7","(256, 1, 1)","(1082, 1, 1)","0","9.0","s","dram__bytes_read.sum","byte","1,109,760"
"0","1","python3","h","relu_forward","1","7","(256, 1, 1)","(1082, 1, 1)","0","9.0","s","gpu__time_duration.sum","ns","3,200"
"1","1","python3","h","void cub::DeviceReduceSingleTileKernel<int, int *>(T2, T3)","1","7","(256, 1, 1)","(1, 1, 1)","0","9.0","s","gpu__time_duration.sum","us","3.17"
'''


def test_the_ncu_csv_reader(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text(CSV)
    first, second = calibrate.read_ncu_csv(path)
    assert (first.id, first.kernel, first.block, first.grid) == (0, "relu_forward", (256, 1, 1), (1082, 1, 1))
    assert first.seconds == pytest.approx(3.2e-6) and first.metrics["dram__bytes_read.sum"] == 1109760
    assert second.short_name == "cub::DeviceReduceSingleTileKernel" and second.seconds == pytest.approx(3.17e-6)
    path.write_text(CSV.replace("gpu__time_duration.sum", "other.sum"))
    with pytest.raises(ValueError, match="launch 0 has no gpu__time_duration.sum"):
        calibrate.read_ncu_csv(path)
    path.write_text("no header\n")
    with pytest.raises(ValueError, match="no Nsight Compute CSV header"):
        calibrate.read_ncu_csv(path)


def test_summary_line_and_ratios():
    rows = [calibrate.Row(calibrate.MeasuredLaunch(i, "k", (1, 1, 1), (1, 1, 1), m * 1e-6), p * 1e-6, "latency", True)
            for i, (m, p) in enumerate([(10, 5), (10, 30), (10, 10), (10, 12)])]
    s = calibrate.summarize(rows)
    assert (s.launches, s.within_2x) == (4, 0.75)
    assert s.median_ratio == pytest.approx((1.2 + 2.0) / 2)   # median of max(r, 1/r): 2, 3, 1, 1.2
    assert s.line() == ("calibration: step measured 40.0 us, predicted 57.0 us (ratio 1.43); 4 launches, "
                        "median ratio 1.60, within 2x 75%")


@pytest.mark.slow
def test_calibrate_cli_on_the_smallest_unet(tmp_path, capsys):
    """The CLI on a base-1 U-Net (tile 188): a CSV naming a few of its launches (and one library
    kernel the emulator does not run) is matched in order; the last line has the fixed format."""
    from minunet import bench

    rows = [("relu_forward", "(256, 1, 1)", "(136, 1, 1)", "3,104"), ("cupy_fill", "(1, 1, 1)", "(1, 1, 1)", "2,112"),
            ("sgd_momentum", "(256, 1, 1)", "(1, 1, 1)", "3,200")]
    lines = [CSV.splitlines()[1]] + [
        f'"{i}","1","python3","h","{k}","1","7","{b}","{g}","0","9.0","s","gpu__time_duration.sum","ns","{t}"'
        for i, (k, b, g, t) in enumerate(rows)]
    path = tmp_path / "small.csv"
    path.write_text("\n".join(lines) + "\n")
    assert bench.main(["--calibrate", str(path), "--base-channels", "1", "--tile", "188", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"calibration: step measured 8\.4 us, predicted \d+\.\d us \(ratio \d+\.\d\d\); 3 launches, "
                        r"median ratio \d+\.\d\d, within 2x \d+%", out[-1]), out[-1]
    assert any(line.split()[1:2] == ["cupy_fill"] and line.endswith("lib") for line in out)
    assert bench.main(["--calibrate", str(tmp_path / "missing.csv"), "--base-channels", "1", "--tile", "188"]) == 2
    assert math.isfinite(float(out[-1].split("ratio ")[1].split(")")[0]))


def test_version_pairs_match_layers_and_check_the_order():
    """The k-th 3x3 weight gradient of one file pairs with the k-th of the other; the order is right
    when the model puts the faster measured version first."""
    def row(i, kernel, measured, predicted):
        return calibrate.Row(calibrate.MeasuredLaunch(i, kernel, (256, 1, 1), (1, 1, 1), measured * 1e-6),
                             predicted * 1e-6, "latency", True)

    a = [row(0, "conv3x3_forward_naive", 10, 12), row(1, "relu_forward", 3, 3), row(2, "conv3x3_grad_weight", 50, 40),
         row(3, "conv3x3_grad_weight", 20, 30)]
    b = [row(0, "conv3x3_forward_tiled", 20, 25), row(1, "relu_forward", 3, 3),
         row(2, "conv3x3_grad_weight_serial", 90, 80),
         row(3, "conv3x3_grad_weight_serial", 10, 35)]
    pairs = calibrate.version_pairs(a, b)
    assert [(op, x.measured.id, y.measured.id) for op, x, y in pairs] == [
        ("conv3x3 forward", 0, 0), ("conv3x3 weight gradient", 2, 2), ("conv3x3 weight gradient", 3, 3)]
    text = calibrate.format_version_pairs(pairs)
    assert text.splitlines()[-1] == ("versions ordered as measured: 2 of 3; of the pairs measured more than 10% "
                                     "apart: 2 of 3") and "WRONG" in text


def test_kernel_choices_follow_the_file_launch_by_launch():
    names = ["conv3x3_forward_tiled", "relu_forward", "conv3x3_forward_naive", "conv3x3_gemm_weights",
             "conv3x3_igemm_wide", "conv3x3_sum_splits", "conv3x3_grad_input_naive",
             "conv3x3_grad_weight_serial", "conv3x3_wmma_narrow", "conv_transpose2x2_grad_weight",
             "conv1x1_grad_weight_gemm_tf32", "conv3x3_grad_weight_gemm", "conv3x3_wmma_big",
             "conv3x3_grad_weight_gemm_128x128", "conv_transpose2x2_grad_weight_gemm_64x128_tf32",
             "conv3x3_grad_weight_has_tf32", "sgd_momentum"]
    measured = [calibrate.MeasuredLaunch(i, k, (256, 1, 1), (1, 1, 1), 1e-6) for i, k in enumerate(names)]
    versions = calibrate.kernel_choices(measured, layers=2)
    assert versions.conv3x3 == ["tiled", "naive", "igemm", "naive", "wmma", "wmma_big"]
    assert versions.weight_gradient == ["serial", "tree", "gemm", "gemm", "gemm_large", "gemm_large"]
    assert versions.conv_transpose2x2 == "naive" and versions.precision == "tf32"
    assert versions.input_gradient    # 5 conv3x3 launches for 2 layers: the input got a gradient too
    old_style = calibrate.kernel_choices(measured[:1] + measured[2:3] + measured[6:8], layers=2)
    assert old_style.conv3x3 == ["tiled", "naive", "naive"] and old_style.precision == "fp32"
    assert not old_style.input_gradient and old_style.weight_gradient == ["serial"]
    assert versions.fused_sgd       # one sgd_momentum launch
    per_parameter = measured + [calibrate.MeasuredLaunch(99, "sgd_momentum", (256, 1, 1), (1, 1, 1), 1e-6)]
    assert not calibrate.kernel_choices(per_parameter, layers=2).fused_sgd