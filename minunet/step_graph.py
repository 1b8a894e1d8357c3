"""A whole training step captured once and replayed for every later batch (CUDA graphs).

The default run's step (base 16, tile 348) is ~200 kernel launches; on an H200 it took 6.5 ms of
wall time, bound by the host: Python autograd plus one CuPy launch per kernel
(bench/results/h200-2026-12-04-run2/final/default_step.txt). A CUDA graph records those launches
once and replays them all with ONE ``cudaGraphLaunch``: no Python, no per-kernel launch cost.
``StepGraph(model, optimizer).step(x, target, weight)`` does that for the forward, the weighted
loss, the backward, the SGD update and zero_grad:

1. the first call on a new batch shape (or after anything below changed) runs the step eagerly:
   it compiles the kernels, asks the device its one-time questions (host reads), and on ``cuda``
   fills CuPy's memory pool with blocks of the step's sizes;
2. the second call captures: every launch of ``KernelBackend.launch`` (the single choke point of
   both kernel devices) is appended to a list as (function, grid, block, args); on ``cuda`` the
   step also runs inside ``cupy.cuda.Stream.begin_capture`` / ``end_capture``, which turns the
   same launches into a ``cupy.cuda.Graph`` (nothing runs during a capture: the graph is then
   launched once to do this step's work); on ``emu`` the launches run as they are recorded;
3. every later call copies the batch into the captured input buffers (one copy each), writes the
   dropout seeds, and replays: on ``cuda`` ``graph.launch()``, on ``emu`` the recorded functions
   called in order with their recorded arguments, which is what a graph does. The loss is read
   from its captured buffer afterwards.

The emulator's replay is a faithful model of the GPU graph only if the step is made of backend
launches and nothing else, and that is how the step is written: autograd sums gradients with the
``grad_add`` kernel and scales the loss gradient with ``grad_scale`` (not NumPy/CuPy
arithmetic), the loss skips the host check of the target's range (done here on each new batch),
the optimizer updates each parameter with ``sgd_step_if_finite`` rather than gathering the
gradients with an array concatenation, and the arrays a step creates with the array library
(the ones that seed the backward, an absent mask's placeholder) hold the same values every step.
tests/test_step_graph.py proves the equivalence: N replayed steps give the same weights, losses
and dropout masks, bit for bit, as N eager steps.

Hazards, and how each is met:

- **Memory lifetime.** A graph replays its kernels on the addresses they had when captured. The
  recorded arguments keep every array of the step alive (activations, gradients, the loss), so
  none can be freed and handed out again while the graph may still write it: they are the
  graph's private memory pool. The price is memory: a captured step keeps all of its buffers at
  once (an eager backward frees activations as it goes), so this is for small networks, where
  launches dominate anyway. ``release()`` drops them.
- **Seeds.** Dropout seeds used to be launch arguments: a replay would repeat the captured step's
  masks. Here the dropout kernels read the seed from a device array (``DeviceSeed``,
  ``dropout_forward_seed_buffer``) that the host rewrites before each replay with the seeds the
  eager path would use for the same ``forward_count``: identical masks.
- **Host syncs.** Nothing in a captured step may read the device from the host (CUDA forbids a
  synchronous copy during a capture): the loss is read after the replay, the target's range is
  checked before it, and the one-time questions (tensor cores, TF32) are asked by the warm-up.
- **Non-finite loss.** The eager loop checks the loss before the backward and never updates. A
  replay cannot stop in the middle, so the update kernel reads the loss and leaves weights and
  momentum untouched when it is NaN or infinite; the caller then sees the loss and stops.
- **What invalidates a graph.** Everything baked into the launches: the batch shapes, the model's
  and the optimizer's arrays (a weight load or a new optimizer state replaces them), lr and
  momentum (launch arguments), precision and kernel versions, the emulator mode, a kernel
  ``reload()``, training/eval mode and the dropout probability. ``signature()`` collects them;
  when it changes the graph is dropped, and the next two calls warm up and capture again.
- **Streams and threads.** On ``cuda`` the step runs on a non-blocking stream of its own (a
  capture cannot use the legacy default stream, and a blocking stream would be invalidated by
  any legacy-stream work of another thread during the capture). Each step first waits for an
  event recorded on the caller's current stream (the batch's upload happened there), and ends
  with the host reading the loss, which waits for the whole step: the caller's later work
  (validation, a checkpoint) finds it done. Launches from other threads (the batch-preparing
  thread) are not recorded.

The ``cuda`` path follows CuPy's documented API (Stream.begin_capture's relaxed default mode,
which permits the memory pool to grow during a capture, end_capture, Graph.launch); it was NOT run
on a GPU in the session that wrote it: tests/test_step_graph.py has a ``cuda`` test that the next
GPU session runs (bench/gpu_check.sh), and any speed given for it is predicted.
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from .backends import get_backend
from .backends import kernels as _kernels
from .ops.cross_entropy import WeightedCrossEntropy
from .tensor import Tensor


# the kernels a captured step uses and an eager one does not (kernels/elementwise.cu)
CAPTURE_ONLY_KERNELS = ("dropout_forward_seed_buffer", "sgd_momentum_if_finite")


def _raw(a):
    return a.data if isinstance(a, Tensor) else a


class StepGraph:
    """A training step (forward, weighted loss, backward, SGD update, zero_grad) captured once on a
    kernel device (``cuda`` or ``emu``) and replayed for every later batch; module docstring.

    >>> graph = StepGraph(model, optimizer)          # doctest: +SKIP
    >>> loss = graph.step(x, target, weight)         # a float; weights updated unless it is not finite
    """

    def __init__(self, model, optimizer):
        device = model.device
        if device not in ("cuda", "emu"):
            raise ValueError(f"a captured training step needs a kernel device (cuda or emu), not "
                             f"{device!r}: the cpu device has no kernel launches to capture")
        if {p.device for p in optimizer.params} != {device}:
            raise ValueError("StepGraph: the optimizer's parameters must be the model's, on its device")
        self.model, self.optimizer, self.device = model, optimizer, device
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        self.stream = None
        if device == "cuda":
            import cupy

            self.stream = cupy.cuda.Stream(non_blocking=True)   # ordered by events (step())
        layers = getattr(model, "DROPOUT_LAYERS", 0)
        self.seeds = self.xp.zeros(max(layers, 1), dtype=np.uint32)   # the dropout seeds, rewritten per step
        self.captures = 0    # steps captured so far (a new capture after each invalidation)
        self.replays = 0
        self.launches: list = []    # (function, grid, block, args, file, kernel) of the captured step
        self._graph = None          # the cupy.cuda.Graph (cuda)
        self._inputs = None         # the captured step's input buffers (x, target, weight)
        self._loss = None           # the captured step's loss buffer
        self._captured = None       # signature() of the captured step
        self._warmed = None         # signature() after the last eager warm-up step

    # ---- what a capture bakes in ------------------------------------------------------------
    def signature(self, x, target, weight) -> tuple:
        """Everything the captured launches depend on besides the data in their buffers; a
        different value means the graph is stale (module docstring)."""
        from . import nn
        from .emulator import emu_mode

        b, model, opt = self.backend, self.model, self.optimizer
        return (tuple(_raw(x).shape), tuple(_raw(target).shape), tuple(_raw(weight).shape),
                b.precision, b.conv3x3_version, b.reduction, b.conv_transpose2x2_version,
                b.min_pixels_per_slice, _kernels.RELOADS, emu_mode() if self.device == "emu" else None,
                nn.FUSE_RELU, model.training, getattr(model, "dropout_p", None), opt.lr, opt.momentum,
                tuple(id(p.data) for p in opt.params), tuple(id(v) for v in opt.velocity))

    @property
    def captured(self) -> bool:
        """Whether a captured step is ready to replay."""
        return self._captured is not None

    def release(self) -> None:
        """Drop the captured step and its buffers (the next two steps warm up and capture again)."""
        self.launches, self._graph, self._inputs, self._loss = [], None, None, None
        self._captured = self._warmed = None

    # ---- the step ---------------------------------------------------------------------------
    def step(self, x, target, weight) -> float:
        """One training step on this batch: x (N,C,H,W), target (N,H',W') class indices, weight
        (N,H',W'), arrays or Tensors (host or device). Returns the loss; when it is not finite
        the weights and momentum are left as they were. Eager the first time a signature is seen,
        captured the second time, replayed afterwards."""
        signature = self.signature(x, target, weight)
        if self._captured is not None and signature != self._captured:
            self.release()
        if self.stream is not None:   # after the caller's work so far (the batch's upload, say)
            import cupy

            self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with self._on_stream():
            if self._captured is not None:
                return self._replay(x, target, weight)
            if self._warmed == signature:
                return self._capture(x, target, weight)
            value = self._eager(x, target, weight)
            self._warmed = self.signature(x, target, weight)   # the update may have built buffers
            return value

    def _on_stream(self):
        return self.stream if self.stream is not None else contextlib.nullcontext()

    def _eager(self, x, target, weight) -> float:
        from . import functional as F

        x, target, weight = (a if isinstance(a, Tensor) else Tensor(a, device=self.device)
                             for a in (x, target, weight))
        loss = F.weighted_cross_entropy(self.model(x), target, weight)
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        return value

    def _device_copy(self, a, dtype):
        """A new array of the step (never the caller's own array: the step writes into it)."""
        a = _raw(a)
        if self.device == "cuda":
            import cupy

            return cupy.array(a, dtype=dtype, order="C", copy=True)
        if not isinstance(a, np.ndarray) and hasattr(a, "get"):
            raise TypeError("a GPU array was given to a step on 'emu'; move it to the host first")
        return np.array(a, dtype=dtype, order="C", copy=True)

    def _check_target(self, target) -> None:
        """The check weighted_cross_entropy makes, which cannot run inside a capture (host read)."""
        classes = self.model.config["num_classes"] if hasattr(self.model, "config") else None
        low, high = int(target.min()), int(target.max())
        if low < 0 or (classes is not None and high >= classes):
            raise ValueError(f"weighted_cross_entropy: target values must be class indices in "
                             f"[0, {classes - 1}] for {classes} classes, found {low}..{high}")

    def _load(self, x, target, weight) -> None:
        """Copy the batch into the captured step's input buffers (one copy each, outside the graph)."""
        self._check_target(_raw(target))
        for buffer, a in zip(self._inputs, (x, target, weight)):
            a = _raw(a)
            if self.device == "cuda" and isinstance(a, np.ndarray):
                buffer.set(np.ascontiguousarray(a, dtype=buffer.dtype))
            else:
                self.xp.copyto(buffer, a, casting="same_kind")

    def _capture(self, x, target, weight) -> float:
        model, opt, backend = self.model, self.optimizer, self.backend
        opt.prepare()      # an update inside the capture must not replace the arrays it updates
        self._inputs = (self._device_copy(x, np.float32), self._device_copy(target, np.int32),
                        self._device_copy(weight, np.float32))
        self._check_target(self._inputs[1])
        tx, tt, tw = (Tensor._from_array(a, self.device) for a in self._inputs)
        self._write_seeds()
        for kernel in CAPTURE_ONLY_KERNELS:   # looked up (loaded) now: no module load inside a capture
            backend.function("elementwise", kernel)
        launches = []
        seeds_from = getattr(model, "dropout_seeds_from", None)
        backend.recorder = (threading.get_ident(), launches)
        graph = None
        try:
            with (seeds_from(self.seeds) if seeds_from else contextlib.nullcontext()):
                if self.stream is not None:
                    self.stream.begin_capture()
                try:
                    loss = WeightedCrossEntropy.apply(model(tx), tt, tw)
                    loss.backward()
                    opt.step(unless_nonfinite=loss.data)
                    opt.zero_grad()
                except BaseException:
                    if self.stream is not None:
                        with contextlib.suppress(Exception):
                            self.stream.end_capture()
                    raise
                if self.stream is not None:
                    graph = self.stream.end_capture()
        finally:
            backend.recorder = None
        self.launches, self._graph, self._loss = launches, graph, loss.data
        self.captures += 1
        if graph is not None:
            graph.launch(self.stream)          # a capture ran nothing: this is the step's work
        self._captured = self.signature(x, target, weight)
        return self._read_loss()

    def _replay(self, x, target, weight) -> float:
        self._load(x, target, weight)
        self._write_seeds()
        if self._graph is not None:
            self._graph.launch(self.stream)
        else:
            for function, grid, block, args, file, kernel in self.launches:
                try:
                    function(grid, block, args)
                except Exception as exc:
                    raise _kernels.KernelError(f"replaying kernel {kernel} (kernels/{file}.cu) failed: "
                                               f"{type(exc).__name__}: {exc}") from exc
        if getattr(self.model, "training", False) and hasattr(self.model, "forward_count"):
            object.__setattr__(self.model, "forward_count", self.model.forward_count + 1)
        self.replays += 1
        return self._read_loss()

    def _write_seeds(self) -> None:
        write = getattr(self.model, "write_dropout_seeds", None)
        if write is not None:
            write(self.seeds)

    def _read_loss(self) -> float:
        loss = self._loss
        return float(loss.get() if hasattr(loss, "get") else loss)
