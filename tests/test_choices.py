"""The measured choice table of the cuda device (minunet/backends/choices.py): how it is read,
answered, written and merged, and that the committed table holds only what the H200 files show."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from minunet import bench
from minunet.backends import choices, kernels

H200 = "bench/results/h200-2026-12-04"


def table_with(chosen: dict, device: str = "cuda", gpu: str = "Test GPU") -> dict:
    """A table whose ``choices`` hold ``{(knob, key): {version: ms}}``, recorded as --tune does."""
    table = choices.new_table(device, gpu, "a test", date="2026-12-04")
    for (knob, key), ms in chosen.items():
        choices.record(table, knob, key, ms)
    return table


def like(backend, **changes):
    """A stand-in for a KernelBackend: ``backend`` with some attributes changed."""
    return SimpleNamespace(**{**vars(backend), **changes})


def test_layer_key_names_the_op_the_case_and_the_precision():
    assert choices.layer_key("conv3x3", (1, 64, 570, 570, 64), "fp32") == "conv3x3 1x64x570x570->64 fp32"
    keys = {choices.layer_key(op, case, p) for op in ("conv3x3", "conv1x1") for p in ("fp32", "tf32")
            for case in ((1, 2, 9, 11, 5), (1, 2, 11, 9, 5), (2, 2, 9, 11, 5))}
    assert len(keys) == 12, "every op, case and precision gets its own key"


def test_fastest_needs_two_versions_that_ran():
    assert choices.fastest({"tree": 2.0, "serial": 0.5, "gemm": None}) == "serial"
    assert choices.fastest({"tree": 2.0, "serial": None}) is None      # one time alone chooses nothing
    assert choices.fastest({}) is None


def test_measured_choice_answers_only_for_measured_cuda_shapes_and_known_versions():
    key = choices.layer_key("conv3x3", (1, 16, 40, 40, 32), "fp32")
    table = table_with({("reduction", key): {"tree": 3.0, "serial": 9.0},
                        ("conv3x3", key): {"naive": 1.0, "tiled": 2.0}})
    assert choices.measured_choice("reduction", key, table) == "tree"
    assert choices.measured_choice("conv3x3", key, table) == "naive"
    assert choices.measured_choice("reduction", key.replace("fp32", "tf32"), table) is None   # not measured
    assert choices.measured_choice("reduction", key, dict(table, device="emu")) is None       # not a GPU's
    table["choices"]["reduction"][key]["ms"] = {"retired_version": 1.0, "tree": 3.0}
    assert choices.measured_choice("reduction", key, table) is None   # one version left: no choice
    with pytest.raises(ValueError, match="unknown knob"):
        choices.measured_choice("tiles", key, table)


def test_choose_follows_the_table_on_cuda_only_and_never_over_a_forced_version(tmp_path, monkeypatch):
    case = (1, 8, 20, 20, 16)
    key = choices.layer_key("conv3x3", case, "tf32")
    path = tmp_path / "table.json"
    choices.save_table(path, table_with({("conv3x3", key): {"naive": 0.2, "tiled": 0.1}}))
    monkeypatch.setenv("MINUNET_CHOICES", str(path))
    gpu = SimpleNamespace(device="cuda", conv3x3_version="auto", reduction="auto", precision="tf32")
    assert choices.choose(gpu, "conv3x3", "conv3x3", case) == "tiled"
    assert choices.choose(like(gpu, precision="fp32"), "conv3x3", "conv3x3", case) is None
    assert choices.choose(like(gpu, conv3x3_version="naive"), "conv3x3", "conv3x3", case) is None
    assert choices.choose(like(gpu, device="emu"), "conv3x3", "conv3x3", case) is None
    assert choices.choose(gpu, "conv3x3", "conv3x3", None) is None     # a launcher that passes no layer
    monkeypatch.setenv("MINUNET_CHOICES", "off")
    assert choices.load_table() == {} and choices.choose(gpu, "conv3x3", "conv3x3", case) is None


def test_a_broken_table_is_refused_with_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        choices.load_table(bad)
    assert "\n" not in str(info.value)
    bad.write_text(json.dumps({"format": 99, "choices": {}}))
    with pytest.raises(ValueError, match="format-1"):
        choices.load_table(bad)
    assert choices.load_table(tmp_path / "missing.json") == {}


def test_tune_runs_merge_into_one_table_per_gpu(tmp_path):
    path = tmp_path / "t.json"
    a, b = (choices.layer_key("conv3x3", (1, 1, s, s, 4), "fp32") for s in (30, 40))
    choices.save_table(path, choices.merge_into(path, table_with({("reduction", a): {"tree": 1.0, "serial": 2.0}})))
    second = table_with({("reduction", b): {"tree": 5.0, "serial": 2.0}})
    second["source"] = "another run"
    choices.save_table(path, choices.merge_into(path, second))
    merged = choices.merge_into(path, second)             # --tune saves after every layer
    assert set(merged["choices"]["reduction"]) == {a, b}
    assert merged["source"] == "a test; another run", "each run named once"
    other = choices.merge_into(path, table_with({("reduction", b): {"tree": 5.0, "serial": 2.0}}, gpu="Other GPU"))
    assert set(other["choices"]["reduction"]) == {b}, "another GPU's table replaces it"


def test_knob_versions_are_read_from_the_kernel_backend_at_run_time(monkeypatch):
    assert choices.KNOBS["reduction"].versions() == tuple(v for v in kernels.REDUCTIONS if v != "auto")
    monkeypatch.setattr(kernels, "REDUCTIONS", (*kernels.REDUCTIONS, "gemm"))
    assert choices.KNOBS["reduction"].versions()[-1] == "gemm"
    from minunet.ops import conv3x3

    assert choices.KNOBS["reduction"].functions(conv3x3) == ("conv3x3_backward",)
    assert "conv3x3_forward" in choices.KNOBS["conv3x3"].functions(conv3x3)


def test_strict_fp32_never_chooses_a_tf32_only_version():
    """wmma computes in TF32 whatever the precision: a layer measured faster with it still runs
    a strict float32 version under fp32 (the H200's first tuned table chose it for fp32 keys)."""
    fp32 = choices.layer_key("conv3x3", (1, 64, 570, 570, 64), "fp32")
    tf32 = fp32.replace("fp32", "tf32")
    times = {"naive": 9.4, "tiled": 3.8, "igemm": 2.6, "wmma": 2.2}
    table = table_with({("conv3x3", fp32): times, ("conv3x3", tf32): times})
    assert table["choices"]["conv3x3"][fp32]["chosen"] == "igemm"
    assert choices.measured_choice("conv3x3", fp32, table) == "igemm"
    assert choices.measured_choice("conv3x3", tf32, table) == "wmma"
    table["choices"]["conv3x3"][fp32]["chosen"] = "wmma"        # a table written before the rule
    assert choices.measured_choice("conv3x3", fp32, table) == "igemm"


def test_the_committed_table_was_measured_on_a_gpu_and_chooses_the_fastest_allowed():
    """cuda_choices.json: written by --tune on an NVIDIA H200 (bench/results/h200-2026-12-04-run2),
    every layer's answer the fastest of at least two versions it may run; none TF32 under fp32."""
    table = choices.load_table(choices.TABLE_PATH)
    assert table["device"] == "cuda" and "H200" in table["gpu"] and table["date"]
    assert set(table["choices"]) == set(choices.KNOBS)
    for knob, entries in table["choices"].items():
        for key, entry in entries.items():
            chosen = choices.measured_choice(knob, key, table)
            allowed = {v: t for v, t in entry["ms"].items()
                       if t is not None and v in choices.KNOBS[knob].allowed(key)}
            assert chosen == min(allowed, key=allowed.get), (knob, key)
            assert not (key.endswith("fp32") and chosen in choices.KNOBS[knob].tf32_only), key


def test_observed_versions_refuses_a_profile_of_another_network():
    launches = choices.ncu_launches(f"{H200}/ncu16.csv")
    shallow = bench.unet_layers(dict(in_channels=1, num_classes=2, base_channels=16, depth=3), 348, 1)
    with pytest.raises(ValueError, match="launches of conv3x3_forward for 14 conv3x3 layers"):
        choices.observed_versions(launches, shallow)
