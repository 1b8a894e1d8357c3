"""The benchmark runs end to end, and the registry of ops drives its rows (a smoke test: speed is
never asserted)."""
from __future__ import annotations

import json

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
    assert [r["name"] for r in iteration] == ["batch preparation"] + ["training iteration"] * 2
    assert all(r["ms"] > 0 for r in iteration) and "prefetch 1" in iteration[2]["shape"]


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
