"""SGD with momentum: the fused update (one launch for all parameters, flat buffers) gives
bit-for-bit the per-parameter update, survives replaced parameter data and a state round trip."""
from __future__ import annotations

import numpy as np
import pytest

from minunet.nn import Parameter
from minunet.optim import SGD
from minunet.tensor import Tensor


def make_params(rng, device, shapes=((3, 2, 3, 3), (3,), (5, 7), (1,))):
    return [Parameter(rng.standard_normal(s).astype(np.float32), device=device) for s in shapes]


def set_grads(params, rng):
    for p in params:
        p.grad = Tensor(rng.standard_normal(p.shape).astype(np.float32), device=p.device)


def run_steps(fused: bool, device: str, steps: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = make_params(rng, device)
    opt = SGD(params, lr=0.05, momentum=0.9, fused=fused)
    for _ in range(steps):
        set_grads(params, rng)
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("device", ["emu", "cpu"])
def test_fused_update_equals_the_per_parameter_update_exactly(device):
    fused, opt_fused = run_steps(True, device)
    plain, opt_plain = run_steps(False, device)
    for a, b in zip(fused, plain):
        assert np.array_equal(a.numpy(), b.numpy())
    state_a, state_b = opt_fused.state_dict(), opt_plain.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert np.array_equal(state_a[key], state_b[key]), key
    # and each step really moved every parameter
    untouched = make_params(np.random.default_rng(0), device)
    assert all(not np.array_equal(a.numpy(), u.numpy()) for a, u in zip(fused, untouched))


def test_fused_is_the_default_on_kernel_devices_and_uses_one_launch(monkeypatch):
    from minunet.backends import get_backend

    params, opt = run_steps(None, "emu", steps=1)
    flat = opt._flat[1]
    assert all(np.shares_memory(p.data, flat) for p in params)
    launches = []
    backend = get_backend("emu")
    real = backend.launch
    monkeypatch.setattr(backend, "launch", lambda *a, **k: (launches.append(a[1]), real(*a, **k)))
    set_grads(params, np.random.default_rng(1))
    opt.step()
    assert launches == ["sgd_momentum"]
    _, cpu_opt = run_steps(None, "cpu", steps=1)
    assert cpu_opt._flat is None


def test_replaced_parameter_data_and_loaded_state_rebuild_the_flat_buffers():
    params, opt = run_steps(True, "emu", steps=2)
    twin_params, twin = run_steps(False, "emu", steps=2)
    # weights loaded from elsewhere: the optimizer must update the new arrays, not its old buffer
    new = np.full(params[2].shape, 0.5, np.float32)
    params[2].data = new.copy()
    twin_params[2].data = new.copy()
    # and a state round trip (a resumed run)
    opt.load_state_dict(opt.state_dict())
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    set_grads(params, rng_a)
    set_grads(twin_params, rng_b)
    opt.step()
    twin.step()
    for a, b in zip(params, twin_params):
        assert np.array_equal(a.numpy(), b.numpy())


def test_a_parameter_replaced_by_another_shape_restarts_its_momentum_like_the_unfused_update():
    """A parameter given data of a new shape (a layer rebuilt) drops its old velocity in both
    paths, instead of failing to copy it into the new slice."""
    results = []
    for fused in (True, False):
        params, opt = run_steps(fused, "emu", steps=2)
        params[1].data = np.ones(6, np.float32)          # was (3,)
        rng = np.random.default_rng(4)
        set_grads(params, rng)
        opt.step()
        results.append([p.numpy() for p in params])
    for a, b in zip(*results):
        assert np.array_equal(a, b)
