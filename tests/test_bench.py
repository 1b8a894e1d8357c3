"""The benchmark runs end to end, and the registry of ops drives its rows (a smoke test: speed is
never asserted)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from minunet import bench, ops


def test_bench_prints_a_row_for_every_backend_function_and_the_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--base-channels", "2", "--tile", "188", "--step-tiles", "188",
                       "--repeat", "1", "--no-torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    names = {row["name"] for row in results["ops"]}
    assert names == set(ops.functions()), "every backend function of every op gets a row"
    assert all(row["ms"] > 0 and row["torch_ms"] is None for row in results["ops"])
    step = results["steps"]["188"]
    assert [r["name"] for r in step][-1] == "training step"
    assert abs(step[-1]["ms"] - sum(r["ms"] for r in step[:-1])) < 1e-6
    assert "conv3x3_backward" in printed and "training step" in printed
    iteration = results["iterations"]["188"]     # batch preparation + step, beside the bare step
    assert [r["name"] for r in iteration] == ["batch preparation"] + ["training iteration"] * 2 + [
        "  host: batch preparation", "  host: training step", "  host + device: training step"]
    assert all(r["ms"] > 0 for r in iteration) and "prefetch 1" in iteration[2]["shape"]
    assert iteration[4]["ms"] <= iteration[5]["ms"], "the host's share of a step exceeds the step"


def test_bench_refuses_an_invalid_tile_with_one_line(capsys):
    assert bench.main(["--device", "cpu", "--tile", "200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_kernel_profile_covers_every_function_and_labels_times_as_predicted():
    """--kernels: the emulator's counters for every backend function, FLOPs from the op's cost
    shared by its arithmetic kernels, and a time that the table calls PREDICTED."""
    rows = bench.profile_kernels(base=2, tile=188, batch=1, gpu="sm_80", sample_blocks=2)
    assert {r["function"] for r in rows} == set(ops.functions())
    for r in rows:
        assert r["kernels"] >= 1 and r["dram_bytes"] > 0 and r["predicted_us"] > 0, r
        assert "PREDICTED" in r["report"]
    conv = next(r for r in rows if r["function"] == "conv3x3_forward")
    assert conv["shared_wavefronts"] == 1.0   # the tiled conv reads shared memory without conflicts
    assert "PREDICTED for sm_80" in bench.format_kernel_profile(rows, "sm_80")


def test_unet_layers_trace_the_paper_network():
    """23 convolutions (18 3x3, 4 up-convs, the classifier) whose forward FLOPs, x3 for a training
    step, are the 902.6 GFLOP of the H200 step table (counted there by PyTorch hooks)."""
    layers = bench.unet_layers(dict(in_channels=1, num_classes=2, base_channels=64, depth=4), 572, 1)
    assert [op for op, _ in layers].count("conv3x3") == 18 and len(layers) == 23
    assert layers[0] == ("conv3x3", (1, 1, 572, 572, 64)) and layers[-1] == ("conv1x1", (1, 64, 388, 388, 2))
    assert ("conv_transpose2x2", (1, 1024, 28, 28, 512)) in layers
    model = SimpleNamespace(config=dict(in_channels=1, num_classes=2, base_channels=64, depth=4))
    assert abs(3 * bench.unet_flops(model, 572, 1) / 1e9 - 902.6) < 0.05


def test_every_kernel_version_gets_a_row_read_from_the_backend_at_run_time(monkeypatch):
    """On emu the classifier's backward gets its "auto" row and one per reduction, including a
    version added to REDUCTIONS after this test was written (as K1's "gemm" will be)."""
    from minunet.backends import kernels
    from minunet.ops import conv1x1

    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    monkeypatch.setattr(ops, "OPS", (conv1x1,))
    monkeypatch.setattr(kernels, "REDUCTIONS", (*kernels.REDUCTIONS, "added"))
    rows = bench.bench_ops("emu", 2, 188, 1, 1, bench.TorchTwin("emu", enabled=False), "tf32")
    names = [r.name for r in rows]
    assert names == ["conv1x1_forward", "conv1x1_backward", "conv1x1_backward [reduction=tree]",
                     "conv1x1_backward [reduction=serial]", "conv1x1_backward [reduction=gemm]",
                     "conv1x1_backward [reduction=gemm_large]", "conv1x1_backward [reduction=added]"]
    assert all(r.ms > 0 and r.flops == rows[1].flops for r in rows[1:])
    from minunet.backends import get_backend

    assert get_backend("emu").reduction == "auto" and get_backend("emu").precision == "fp32", "settings restored"


def test_a_version_that_fails_gets_a_row_that_says_why():
    def refuses():
        raise ValueError("this shape exceeds the grid")

    auto = bench.Row("conv3x3_forward", "(1,1,9,9,2)", 10.0, 20.0, 1.0)
    row = bench._version_row("cpu", auto, "conv3x3=wmma", {}, refuses, lambda: None, 1)
    assert math.isnan(row.ms) and "exceeds the grid" in row.extra["error"]
    assert "conv3x3_forward [conv3x3=wmma]" in bench.format_table([row]) and "not run" in bench.format_table([row])


def test_torch_twin_absent_or_off_is_falsy_and_its_modes_do_nothing():
    twin = bench.TorchTwin("cpu", enabled=False)
    assert not twin and twin.modes == ("fp32",) and twin.label("tf32") == "PyTorch CPU float32"
    with twin.mode("tf32"):
        pass


def test_torch_twin_on_cuda_switches_tf32_both_ways_and_restores_it():
    """PyTorch is not installed here: a stand-in module with PyTorch's two TF32 switches checks
    that mode("fp32") is strict (both off), mode("tf32") turns both on, and the user's setting
    comes back after."""
    flags = SimpleNamespace(cudnn=SimpleNamespace(allow_tf32=True), cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=False)))
    twin = bench.TorchTwin("cuda", enabled=False)
    twin.torch, twin.device = SimpleNamespace(backends=flags), "cuda"
    assert twin.modes == ("fp32", "tf32") and "strict FP32" in twin.label("fp32") and "TF32" in twin.label("tf32")
    with twin.mode("fp32"):
        assert (flags.cudnn.allow_tf32, flags.cuda.matmul.allow_tf32) == (False, False)
    with twin.mode("tf32"):
        assert (flags.cudnn.allow_tf32, flags.cuda.matmul.allow_tf32) == (True, True)
    assert (flags.cudnn.allow_tf32, flags.cuda.matmul.allow_tf32) == (True, False)


def test_the_step_summary_compares_each_precision_with_each_pytorch_mode():
    step = bench.Row("training step", "base 64, tile 572", 9e11, 0.0, 173.5)
    step.extra["torch_step_ms"] = {"PyTorch cuDNN strict FP32 (allow_tf32 off)": 28.7,
                                   "PyTorch cuDNN TF32 (allow_tf32 on)": 11.4}
    text = bench.format_step_summary({"fp32": [step]})
    assert text.startswith("minunet fp32:") and "strict FP32" in text and "TF32 (allow_tf32 on)" in text
    assert "6.05" in text and "15.22" in text      # 173.5 / 28.7 and 173.5 / 11.4


def test_save_writes_what_was_printed_and_names_the_gpu(tmp_path, monkeypatch, capsys):
    assert bench.gpu_file_name("NVIDIA H200") == "cuda_nvidia_h200.txt"
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    saved = tmp_path / "out.txt"
    assert bench.main(["--device", "cpu", "--base-channels", "1", "--step-tiles", "188", "--repeat", "1",
                       "--no-ops", "--no-torch", "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    text = saved.read_text()
    assert text.startswith("$ python -m minunet.bench --device cpu") and "training step" in text
    assert text in printed


def test_tune_refuses_cpu_and_an_emu_run_without_its_own_output(capsys):
    assert bench.main(["--device", "cpu", "--tune"]) == 2
    assert bench.main(["--device", "emu", "--tune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)


def test_tune_times_every_version_per_layer_and_precision(tmp_path, monkeypatch):
    """A dry run on emu with two small layers: a time for every version of every knob that
    concerns each layer, in both precisions, and the fastest chosen; the table says emu, so
    the cuda device would never follow it."""
    from minunet.backends import choices

    layers = [("conv3x3", (2, 3, 9, 11, 5)), ("conv1x1", (1, 3, 4, 5, 2))]
    monkeypatch.setattr(bench, "unet_layers", lambda config, tile, batch: layers)
    out = tmp_path / "emu_choices.json"
    assert bench.main(["--device", "emu", "--tune", "--tile", "188", "--repeat", "1",
                       "--tune-output", str(out)]) == 0
    table = choices.load_table(out)
    assert table["device"] == "emu" and table["date"]
    for precision in ("fp32", "tf32"):
        conv, pointwise = (choices.layer_key(op, case, precision) for op, case in layers)
        for knob, key in (("conv3x3", conv), ("reduction", conv), ("reduction", pointwise)):
            entry = table["choices"][knob][key]
            assert set(entry["ms"]) == set(choices.KNOBS[knob].versions())
            assert all(t > 0 for t in entry["ms"].values())
            assert entry["chosen"] == min(entry["ms"], key=entry["ms"].get)
            assert choices.measured_choice(knob, key, table) is None      # an emulator's table
        assert pointwise not in table["choices"]["conv3x3"]


def test_tune_keeps_what_it_measured_when_stopped_midway(tmp_path, monkeypatch):
    """gpu_check.sh stops --tune at its time limit: every layer measured so far is in the file."""
    from minunet.backends import choices

    layers = [("conv1x1", (1, 3, 4, 5, 2)), ("no_such_op", (1, 1, 1, 1, 1))]
    monkeypatch.setattr(bench, "unet_layers", lambda config, tile, batch: layers)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyError):
        bench.main(["--device", "emu", "--tune", "--tile", "188", "--repeat", "1", "--precision", "fp32",
                    "--tune-output", str(out)])
    assert list(choices.load_table(out)["choices"]["reduction"]) == ["conv1x1 1x3x4x5->2 fp32"]


@pytest.mark.slow
def test_precision_both_times_the_step_in_each_precision(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    out = tmp_path / "b.json"
    assert bench.main(["--device", "emu", "--no-ops", "--base-channels", "1", "--step-tiles", "188",
                       "--repeat", "1", "--precision", "both", "--no-torch", "--json", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert set(steps) == {"188 fp32", "188 tf32"}
    assert [r["extra"]["precision"] for r in steps["188 tf32"]] == ["tf32"] * 5


def test_gpu_check_script_parses_and_its_bench_commands_are_valid(tmp_path):
    """bench/gpu_check.sh runs on a lent GPU where a typo costs GPU minutes: bash parses it, and
    every `python -m minunet.bench` command it would run (listed by GPU_CHECK_ECHO=1), on cuda
    and in the dry run on emu, parses with the bench's own parser."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    root = Path(__file__).parents[1]
    subprocess.run(["bash", "-n", "bench/gpu_check.sh"], check=True, cwd=root)
    parser = bench.build_parser()
    for dry in ("0", "1"):
        env = dict(os.environ, GPU_CHECK_ECHO="1", GPU_CHECK_DRY=dry, OUT=str(tmp_path / dry))
        listed = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, env=env, check=True,
                                capture_output=True, text=True).stdout
        commands = [line.split("-m minunet.bench", 1)[1] for line in listed.splitlines()
                    if line.startswith("stage ") and "-m minunet.bench" in line]
        assert len(commands) == 6, listed
        for command in commands:
            args = parser.parse_args(shlex.split(command))
            assert args.device == ("emu" if dry == "1" else "cuda")
        assert any("--precision both" in c for c in commands) and any("--tune" in c for c in commands)
        if dry == "0":
            assert "ncu_steps.py 64 572" in listed and "pytest" in listed
