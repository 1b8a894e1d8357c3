"""Stochastic gradient descent with momentum (paper Section 3: momentum 0.99).

With a batch of a single large tile, each gradient is noisy; a high momentum makes "a large
number of the previously seen training samples determine the update in the current optimization
step". The update itself runs on the parameters' device (a CUDA kernel on cuda and emu).

On ``cuda`` and ``emu`` the update of all parameters is ONE launch of ``sgd_momentum``
(kernels/elementwise.cu), as PyTorch's fused/foreach optimizers do: the optimizer keeps every
parameter in one flat buffer (each ``Parameter.data`` is a view of its slice) and the momentum
buffers in another, gathers the step's gradients into a third with one concatenation, and updates
the flat buffers. A U-Net of depth 4 has 46 parameter arrays: 46 launches became 2, the update and
the gather (CuPy concatenates more than 8 arrays of one dtype, under 2 MiB each on average, with a
single kernel that reads an array of their pointers: cupy/_core/_routines_manipulation.pyx). The arithmetic per element is the same, so the result is bit-identical to updating
parameter by parameter. On ``cpu`` the parameters are updated one by one with the Numba kernel:
there the gather would cost a copy of every gradient and save nothing (a call costs microseconds).
"""
from __future__ import annotations

import numpy as np

from .backends import get_backend
from .devices import to_device_array, to_host


class SGD:
    """``v = momentum * v + grad;  p = p - lr * v``  (PyTorch's formulation)."""

    def __init__(self, params, lr: float, momentum: float = 0.99, fused: bool | None = None):
        """``fused``: one update launch for all parameters (flat buffers, module docstring);
        None (default): on the kernel devices (cuda, emu), not on cpu."""
        self.params = list(params)
        if not self.params:
            raise ValueError("SGD got an empty parameter list; pass model.parameters()")
        if not lr > 0:
            raise ValueError(f"SGD: lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.fused = fused
        self.velocity = [None] * len(self.params)
        self._flat = None   # (device, flat params, flat velocity, the views handed to the params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _use_fused(self) -> bool:
        devices = {p.device for p in self.params}
        if len(devices) != 1 or any(p.dtype != np.float32 for p in self.params):
            return False
        return self.fused if self.fused is not None else devices != {"cpu"}

    def _flat_buffers(self):
        """The flat parameter and velocity buffers, built (or rebuilt) when a parameter's data is
        no longer the view the optimizer gave it (the model moved device, weights were loaded)."""
        device = self.params[0].device
        if self._flat is not None and self._flat[0] == device and \
                all(p.data is view for p, view in zip(self.params, self._flat[3])):
            return self._flat
        xp = self.params[0].xp
        sizes = [p.data.size for p in self.params]
        flat_param = xp.concatenate([p.data.reshape(-1) for p in self.params])
        flat_velocity = xp.zeros_like(flat_param)
        views, offset = [], 0
        for i, (p, size) in enumerate(zip(self.params, sizes)):
            view = flat_param[offset:offset + size].reshape(p.data.shape)
            velocity = self.velocity[i]
            if velocity is not None and velocity.size == size:   # a parameter replaced by one of
                # another shape starts with zero momentum, as in the per-parameter update below
                flat_velocity[offset:offset + size] = to_device_array(velocity, device).reshape(-1)
            self.velocity[i] = flat_velocity[offset:offset + size].reshape(p.data.shape)
            p.data = view
            views.append(view)
            offset += size
        self._flat = (device, flat_param, flat_velocity, views)
        return self._flat

    def step(self, unless_nonfinite=None) -> None:
        """One update of every parameter that has a gradient. ``unless_nonfinite``: a one-element
        array on the parameters' device (the loss); each update is then skipped ON THE DEVICE
        when it is not finite (``sgd_step_if_finite``: no host read, so minunet.step_graph can
        capture it). That path updates parameter by parameter (on the flat buffers' views, with
        the same arithmetic: bit-identical to the fused update) instead of gathering the
        gradients with an array concatenation, which a replay of the emulator would not redo."""
        if unless_nonfinite is not None:
            self._step_unless_nonfinite(unless_nonfinite)
            return
        if self._use_fused() and all(p.grad is not None for p in self.params):
            device, flat_param, flat_velocity, _ = self._flat_buffers()
            xp = self.params[0].xp
            flat_grad = xp.concatenate([p.grad.data.reshape(-1) for p in self.params]).astype(
                xp.float32, copy=False)
            get_backend(device).sgd_step(flat_param, flat_grad, flat_velocity, self.lr,
                                         self.momentum)
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.velocity[i] is None or self.velocity[i].shape != p.data.shape:
                self.velocity[i] = p.xp.zeros_like(p.data)
            elif not isinstance(self.velocity[i], type(p.data)):  # the model moved device
                self.velocity[i] = to_device_array(self.velocity[i], p.device)
            get_backend(p.device).sgd_step(p.data, p.grad.data, self.velocity[i], self.lr,
                                           self.momentum)

    def prepare(self) -> None:
        """Build now what an update would build on its first call: the flat buffers (fused) and a
        momentum buffer per parameter, so that no later update replaces an array (a captured
        step, minunet.step_graph, must find the arrays it was captured with)."""
        if self._use_fused():
            self._flat_buffers()     # the parameters become views of the flat buffers
        for i, p in enumerate(self.params):
            if self.velocity[i] is None or self.velocity[i].shape != p.data.shape:
                self.velocity[i] = p.xp.zeros_like(p.data)
            elif not isinstance(self.velocity[i], type(p.data)):  # the model moved device
                self.velocity[i] = to_device_array(self.velocity[i], p.device)

    def _step_unless_nonfinite(self, loss) -> None:
        self.prepare()
        for i, p in enumerate(self.params):
            if p.grad is not None:
                get_backend(p.device).sgd_step_if_finite(p.data, p.grad.data, self.velocity[i],
                                                         self.lr, self.momentum, loss)

    def state_dict(self) -> dict:
        """Hyper-parameters and momentum buffers (host arrays), for exact resumption."""
        state = {"lr": self.lr, "momentum": self.momentum}
        for i, v in enumerate(self.velocity):
            if v is not None:
                state[f"velocity.{i}"] = np.array(to_host(v), copy=True)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        for i, p in enumerate(self.params):
            v = state.get(f"velocity.{i}")
            if v is not None and tuple(np.shape(v)) != p.shape:
                raise ValueError(f"optimizer state velocity.{i} has shape {np.shape(v)} but the "
                                 f"parameter has {p.shape}; the checkpoint is from another model")
            self.velocity[i] = None if v is None else to_device_array(np.asarray(v, p.dtype), p.device)
        self._flat = None   # the flat buffers are rebuilt from these velocities at the next step
