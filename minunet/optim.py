"""Stochastic gradient descent with momentum (paper Section 3: momentum 0.99).

With a batch of a single large tile, each gradient is noisy; a high momentum makes "a large
number of the previously seen training samples determine the update in the current optimization
step". The update itself runs on the parameters' device (a CUDA kernel on cuda and emu).
"""
from __future__ import annotations

import numpy as np

from .backends import get_backend
from .devices import to_device_array, to_host


class SGD:
    """``v = momentum * v + grad;  p = p - lr * v``  (PyTorch's formulation)."""

    def __init__(self, params, lr: float, momentum: float = 0.99):
        self.params = list(params)
        if not self.params:
            raise ValueError("SGD got an empty parameter list; pass model.parameters()")
        if not lr > 0:
            raise ValueError(f"SGD: lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.velocity = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.velocity[i] is None or self.velocity[i].shape != p.data.shape:
                self.velocity[i] = p.xp.zeros_like(p.data)
            elif not isinstance(self.velocity[i], type(p.data)):  # the model moved device
                self.velocity[i] = to_device_array(self.velocity[i], p.device)
            get_backend(p.device).sgd_step(p.data, p.grad.data, self.velocity[i], self.lr,
                                           self.momentum)

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
