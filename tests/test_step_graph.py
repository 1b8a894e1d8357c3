"""minunet.step_graph: a training step captured once and replayed gives exactly the eager steps.

Emu's replay calls the recorded kernel functions with their recorded arguments, which is what a
CUDA graph does; it reproduces the eager steps only if a step is nothing but launches of
kernels/ (an array operation of NumPy in the step would not be redone and leave stale data), so
the equivalence tests below also prove that. The ``cuda`` test checks the real CUDA graph (it
skips without CuPy and a GPU). Small shapes: base 4, depth 2, 3 classes, tile 52 -> 12.
"""
from __future__ import annotations

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F
from minunet import autograd, emulator
from minunet.backends import reference as R
from minunet.devices import cuda_status, to_host
from minunet.ops.elementwise import DeviceSeed
from minunet.step_graph import StepGraph

TILE = 52                          # a valid depth-2 input: 12 x 12 out
OUT = mu.UNet.output_size(TILE, 2)


@pytest.fixture(autouse=True)
def fast_emulator():
    """The fast emulator (no access checks): these tests compare whole steps, not one kernel's
    accesses (tests/test_kernels.py checks every kernel in checked mode)."""
    previous = emulator.emu_mode()
    emulator.set_emu_mode("fast")
    yield
    emulator.set_emu_mode(previous)


def need(device: str) -> None:
    if device == "cuda":
        available, reason = cuda_status()
        if not available:
            pytest.skip(f"CuPy with a GPU is not available: {reason}")


def batches(rng, count: int, n: int = 2, tile: int = TILE):
    out = mu.UNet.output_size(tile, 2)
    return [(rng.standard_normal((n, 1, tile, tile)).astype(np.float32),
             rng.integers(0, 3, (n, out, out)).astype(np.int32),
             rng.uniform(0.5, 3.0, (n, out, out)).astype(np.float32)) for _ in range(count)]


def model_and_optimizer(device: str, lr: float = 0.05):
    model = mu.UNet(in_channels=1, num_classes=3, base_channels=4, depth=2, dropout=0.5, seed=11,
                    device=device)
    return model, mu.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def eager_step(model, optimizer, device, x, target, weight) -> float:
    """The training loop's step (minunet.train): the loss checked before the backward."""
    loss = F.weighted_cross_entropy(model(mu.Tensor(x, device=device)), mu.Tensor(target, device=device),
                                    mu.Tensor(weight, device=device))
    value = loss.item()
    if np.isfinite(value):
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    return value


def state(model, optimizer) -> list[np.ndarray]:
    """Every weight and momentum value, as host copies."""
    return [p.numpy() for p in model.parameters()] + \
        [np.array(to_host(v)) if v is not None else None for v in optimizer.velocity]


def assert_same_state(a, b, what: str) -> None:
    assert len(a) == len(b)
    for k, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}: array {k} exists on one side only"
            continue
        assert np.array_equal(u, v), f"{what}: array {k} differs (max |diff| {np.abs(u - v).max():.3g})"


def check_equivalence(device: str, data) -> StepGraph:
    """len(data) steps eagerly and through a StepGraph (eager warm-up, capture, replays) from the
    same seed: the same loss, weights and momentum after every step, bit for bit; and each
    replay's dropout masks are the eager path's masks (the reference's, for the seed of that
    forward count)."""
    model, optimizer = model_and_optimizer(device)
    twin, twin_optimizer = model_and_optimizer(device)
    graph = StepGraph(twin, twin_optimizer)
    for i, (x, target, weight) in enumerate(data):
        count = model.forward_count
        want = eager_step(model, optimizer, device, x, target, weight)
        got = graph.step(x, target, weight)
        assert got == want, f"step {i}: loss {got} replayed, {want} eager"
        assert twin.forward_count == model.forward_count
        assert_same_state(state(twin, twin_optimizer), state(model, optimizer), f"{device} step {i}")
        if graph.captured:
            masks = [(args[2], int(args[-1])) for _, _, _, args, _, kernel in graph.launches
                     if kernel == "dropout_forward_seed_buffer"]
            assert [layer for _, layer in masks] == [0, 1]
            for mask, layer in masks:
                _, want_mask = R.dropout_forward(np.zeros(mask.shape, np.float32), 0.5,
                                                 model.layer_dropout_seed(layer, count))
                assert np.array_equal(to_host(mask), want_mask), f"step {i}: dropout mask {layer}"
    return graph


@pytest.mark.parametrize("n", [1, 2])
def test_replayed_steps_equal_eager_steps_bit_for_bit_on_emu(rng, n):
    graph = check_equivalence("emu", batches(rng, 5, n))
    assert (graph.captures, graph.replays) == (1, 3)    # warm-up, capture, then three replays
    kernels = [launch[5] for launch in graph.launches]
    assert "grad_add" in kernels and "grad_scale" in kernels   # autograd's sums are launches
    assert kernels.count("sgd_momentum_if_finite") == len(graph.optimizer.params)


def test_replayed_steps_equal_eager_steps_bit_for_bit_on_cuda(rng):
    """The same with a real CUDA graph (stream capture, Graph.launch)."""
    need("cuda")
    graph = check_equivalence("cuda", batches(rng, 5, 2))
    assert (graph.captures, graph.replays) == (1, 3) and graph._graph is not None


def test_an_array_operation_in_the_step_breaks_the_replay(rng, monkeypatch):
    """The equivalence test has teeth: with autograd's gradient sum done by NumPy (as it was
    before grad_add) instead of a kernel, the replay reuses the captured step's sums."""
    monkeypatch.setattr(autograd, "_add_gradients", lambda device, a, b: a + b)
    with pytest.raises(AssertionError, match="differs"):
        check_equivalence("emu", batches(rng, 3, 1))


@pytest.mark.parametrize("poison", ["nan image", "inf weight"])
def test_a_non_finite_loss_leaves_weights_and_momentum_untouched(rng, poison):
    data = batches(rng, 4, 1)
    model, optimizer = model_and_optimizer("emu")
    graph = StepGraph(model, optimizer)
    for x, target, weight in data[:3]:                  # warm-up, capture, one replay
        assert np.isfinite(graph.step(x, target, weight))
    before = state(model, optimizer)
    x, target, weight = (a.copy() for a in data[3])
    if poison == "nan image":
        x[0, 0, 5, 7] = np.nan
    else:
        weight[0, 3, 2] = np.inf
    assert not np.isfinite(graph.step(x, target, weight))
    assert graph.replays == 2
    assert_same_state(state(model, optimizer), before, "after a non-finite loss")


def test_a_new_batch_shape_or_learning_rate_is_captured_again(rng):
    """Batch 2, then batch 1 (a new shape: warm-up and capture again), then a lower lr (a launch
    argument): still the eager steps, bit for bit, and one capture per configuration."""
    data = batches(rng, 3, 2) + batches(rng, 3, 1)
    model, optimizer = model_and_optimizer("emu")
    twin, twin_optimizer = model_and_optimizer("emu")
    graph = StepGraph(twin, twin_optimizer)
    for i, (x, target, weight) in enumerate(data + data[3:]):
        if i == 6:
            optimizer.lr = twin_optimizer.lr = 0.02
        assert graph.step(x, target, weight) == eager_step(model, optimizer, "emu", x, target, weight)
        assert_same_state(state(twin, twin_optimizer), state(model, optimizer), f"step {i}")
    assert (graph.captures, graph.replays) == (3, 3)


def test_loaded_weights_are_captured_again(rng):
    """load_state_dict replaces the parameters' arrays, which the old graph would go on updating:
    the graph is dropped, and the steps after the load are still the eager ones."""
    data = batches(rng, 6, 1)
    model, optimizer = model_and_optimizer("emu")
    twin, twin_optimizer = model_and_optimizer("emu")
    graph = StepGraph(twin, twin_optimizer)
    loaded = mu.UNet(in_channels=1, num_classes=3, base_channels=4, depth=2, seed=5).state_dict()
    for i, (x, target, weight) in enumerate(data):
        if i == 3:
            model.load_state_dict(loaded)
            twin.load_state_dict(loaded)
        assert graph.step(x, target, weight) == eager_step(model, optimizer, "emu", x, target, weight)
        assert_same_state(state(twin, twin_optimizer), state(model, optimizer), f"step {i}")
    assert (graph.captures, graph.replays) == (2, 2)


def test_target_out_of_range_is_refused_before_a_replay(rng):
    data = batches(rng, 3, 1)
    model, optimizer = model_and_optimizer("emu")
    graph = StepGraph(model, optimizer)
    for x, target, weight in data[:2]:
        graph.step(x, target, weight)
    x, target, weight = data[2]
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        graph.step(x, np.full_like(target, 3), weight)


def test_cpu_is_refused_with_one_line():
    model, optimizer = model_and_optimizer("cpu")
    with pytest.raises(ValueError, match="needs a kernel device"):
        StepGraph(model, optimizer)


# ---- the kernels the replay needs --------------------------------------------------------------
@pytest.mark.parametrize("device", ["emu", "cuda"])
@pytest.mark.parametrize("shape,p,seed", [((3, 5, 7), 0.5, 0), ((2, 4, 9, 11), 0.3, 2**32 - 1),
                                          ((1000,), 0.9, 123456789)])
def test_dropout_reading_its_seed_from_device_memory_draws_the_reference_mask(rng, device, shape, p, seed):
    need(device)
    emulator.set_emu_mode("checked")    # a single kernel: every access checked (restored after)
    backend = mu.backends.get_backend(device)
    x = rng.standard_normal(shape).astype(np.float32)
    seeds = backend.xp.asarray(np.array([7, seed, 9], np.uint32))
    y = F.dropout(mu.Tensor(x, device=device), p, True, seed=DeviceSeed(seeds, 1))
    want, _ = R.dropout_forward(x, p, seed)
    assert np.array_equal(y.numpy(), want)
    cpu = F.dropout(mu.Tensor(x), p, True, seed=DeviceSeed(np.array([seed], np.uint32), 0))
    assert np.array_equal(cpu.numpy(), want)


def test_a_device_seed_of_the_wrong_kind_is_refused():
    x = mu.Tensor(np.ones((2, 3), np.float32), device="emu")
    with pytest.raises(ValueError, match="1-D uint32 array"):
        F.dropout(x, 0.5, True, seed=DeviceSeed(np.zeros(2, np.int64), 0))
    with pytest.raises(ValueError, match="index 2"):
        F.dropout(x, 0.5, True, seed=DeviceSeed(np.zeros(2, np.uint32), 2))


@pytest.mark.parametrize("device", ["emu", "cuda"])
@pytest.mark.parametrize("loss", [np.nan, np.inf, -np.inf, 0.75])
def test_sgd_if_finite_updates_exactly_like_sgd_or_not_at_all(rng, device, loss):
    need(device)
    emulator.set_emu_mode("checked")
    backend = mu.backends.get_backend(device)
    param, grad, velocity = (rng.standard_normal(1000).astype(np.float32) for _ in range(3))
    want_p, want_v = backend.xp.asarray(param), backend.xp.asarray(velocity)
    if np.isfinite(loss):
        backend.sgd_step(want_p, backend.xp.asarray(grad), want_v, 0.01, 0.99)
    got_p, got_v = backend.xp.asarray(param), backend.xp.asarray(velocity)
    backend.sgd_step_if_finite(got_p, backend.xp.asarray(grad), got_v, 0.01, 0.99,
                               backend.xp.asarray(np.array([loss], np.float32)))
    assert np.array_equal(to_host(got_p), to_host(want_p)) and np.array_equal(to_host(got_v), to_host(want_v))


# ---- python -m minunet.train --graph -------------------------------------------------------------
TINY_EMU = ["--device", "emu", "--emu-mode", "fast", "--synthetic-count", "3", "--synthetic-size", "48",
            "--base-channels", "2", "--depth", "2", "--tile", "44", "--max-minutes", "0", "--quiet",
            "--checkpoint-every", "1"]


def train_run(tmp_path, name: str, *extra):
    from minunet import train
    from minunet.cli import run

    return run(train.main, TINY_EMU + ["--out", str(tmp_path / name), *extra])


def test_train_with_graph_is_the_eager_run(tmp_path):
    """--graph changes how the steps are launched, nothing else: the same losses and weights."""
    from minunet.checkpoint import load_checkpoint

    assert train_run(tmp_path, "eager", "--iterations", "4") == 0
    assert train_run(tmp_path, "graph", "--iterations", "4", "--graph") == 0
    logs = [[row.split(",")[1] for row in (tmp_path / name / "log.csv").read_text().splitlines()[1:]]
            for name in ("eager", "graph")]
    assert logs[0] == logs[1] and len(logs[0]) == 4
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.npz") for name in ("eager", "graph"))
    for key, value in a["params"].items():
        assert np.array_equal(value, b["params"][key]), key


def test_train_with_graph_stops_on_a_nan_loss_like_the_eager_loop(tmp_path, capsys):
    """lr 1e9 diverges: both loops stop at the same iteration with the same message, keeping the
    same last good checkpoint (the replayed update skipped the NaN step on the device)."""
    from minunet.checkpoint import load_checkpoint

    errors = []
    for name, extra in (("eager", ()), ("graph", ("--graph",))):
        with np.errstate(over="ignore", invalid="ignore"):
            assert train_run(tmp_path, name, "--iterations", "30", "--lr", "1e9", *extra) == 1
        errors.append(capsys.readouterr().err.replace(str(tmp_path / name), "RUN"))
    assert "the loss became" in errors[0] and errors[0] == errors[1]
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.npz") for name in ("eager", "graph"))
    assert a["meta"]["iteration"] == b["meta"]["iteration"]
    for key, value in a["params"].items():
        assert np.array_equal(value, b["params"][key]), key


def test_train_refuses_graph_on_cpu_with_one_line(tmp_path, capsys):
    from minunet import train
    from minunet.cli import run

    assert run(train.main, ["--device", "cpu", "--graph", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--graph" in err and "--device cuda" in err


def test_bench_graph_row(tmp_path):
    """python -m minunet.bench --graph adds the replayed step beside the bare one (times: any)."""
    import json

    from minunet import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--device", "emu", "--base-channels", "1", "--step-tiles", "188", "--no-ops",
                       "--no-torch", "--repeat", "1", "--save", "none", "--graph", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["steps"]["188"]
    assert [r["name"] for r in rows[-2:]] == ["training step", "training step (graph replay)"]
    assert rows[-1]["ms"] > 0
