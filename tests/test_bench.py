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


def test_bench_refuses_an_invalid_tile_with_one_line(capsys):
    assert bench.main(["--device", "cpu", "--tile", "200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
