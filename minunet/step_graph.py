"""A whole training step captured once and replayed for every later batch (CUDA graphs).

The default run's step (base 16, tile 348) is ~200 kernel launches; on an H200 it took 6.5 ms of
wall time, bound by the host: Python autograd plus one CuPy launch per kernel
(bench/results/h200-2026-12-04-run2/final/default_step.txt). A CUDA graph records those launches
once and replays them all with ONE ``cudaGraphLaunch``: no Python, no per-kernel launch cost.
``StepGraph(model, optimizer).step(x, target, weight)`` does that for the forward, the weighted
loss, the backward, the SGD update and zero_grad:

1. the first call on a new batch shape (or after anything below changed) runs the step eagerly:
   it compiles and loads the kernels, asks the device its one-time questions (host reads), and on
   ``cuda`` fills CuPy's memory pool with blocks of the step's sizes (the warm-up keeps its launch
   arguments until it ends, so the pool holds all of them at once, as the capture will need);
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
  graph's private memory pool; on ``cuda`` so is every other block allocated during the capture
  (below). The price is memory: a captured step keeps all of its buffers at once (an eager
  backward frees activations as it goes), so this is for small networks, where launches dominate
  anyway. ``release()`` drops them.
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

The ``cuda`` capture, checked line by line against CuPy's documentation and source
(``cupy/cuda/stream.pyx``, ``cupy/cuda/graph.pyx``, ``cupy/_core/core.pyx``; class
:class:`CudaCapture`):

- ``Stream.begin_capture()`` without a mode uses ``cudaStreamCaptureModeRelaxed``; CuPy chose it so
  that its memory pool may call ``cudaMalloc`` (an "unsafe" call in the other modes) when it has
  to grow during a capture. A capture must begin and end on the same stream, not the legacy
  default stream (CuPy refuses it), and the launches must go to that stream: CuPy launches every
  kernel (``RawKernel.__call__``, its own fills and copies) on ``get_current_stream()``, so the
  capture runs inside ``with stream:``, as the example of CuPy's ``begin_capture`` docstring does.
- No host synchronisation inside: CuPy's ``ndarray.get()`` (``float(a)``, ``int(a)``, ``a.item()``
  and ``cupy.asnumpy`` go through it) copies to pageable host memory, which a capture cannot
  record (CUDA: cudaErrorStreamCaptureUnsupported, and the capture is invalidated); a host-to-
  device copy from pinned memory would be recorded with the host buffer's address baked in.
  The step has neither (module docstring above; tests/test_step_graph.py's fake CuPy fails on
  both); a violation ends the capture and raises :class:`StepGraphError`.
- Kernels are compiled and loaded before the capture: the eager warm-up launches every kernel of
  the step once, and the two kernels only a captured step uses (``CAPTURE_ONLY_KERNELS``) are
  launched once on one element before the capture. CUDA's lazy loading (the default since 12.2)
  loads a kernel at its first use, and a module load must not fall inside a capture.
- Memory: the graph bakes in every pointer it was captured with. Besides the recorded launch
  arguments, every block CuPy allocates during the capture (``cupy.cuda.using_allocator``, a
  thread-local allocator that forwards to the current one and keeps each block) is held by the
  StepGraph until ``release()``: a temporary freed inside the capture would otherwise go back to
  the memory pool and be handed to other code while later replays still write it. The batch is
  copied into fixed buffers before each replay.
- A failure inside the capture (a host read, a launch error) ends the capture, puts the host
  state back (the forward count, the gradients), drops what was captured and raises
  :class:`StepGraphError` with one line; ``python -m minunet.train --graph`` then trains on
  without the graph (the same numbers).

The ``cuda`` path was NOT run on a GPU in the sessions that wrote it: tests/test_step_graph.py
runs the same :class:`CudaCapture` code on emu against a fake CuPy, and has a ``cuda`` test that
the next GPU session runs (bench/gpu_check.sh); any speed given for it is predicted.
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from .backends import get_backend
from .backends import kernels as _kernels
from .ops.cross_entropy import WeightedCrossEntropy
from .ops.elementwise import dropout_kernels_forward_seed_buffer
from .tensor import Tensor


# the kernels a captured step uses and an eager one does not (kernels/elementwise.cu)
CAPTURE_ONLY_KERNELS = ("dropout_forward_seed_buffer", "sgd_momentum_if_finite")


class StepGraphError(RuntimeError):
    """Capturing the training step failed; one line that says why. Nothing of the step ran and
    the StepGraph holds no capture (module docstring)."""


def _raw(a):
    return a.data if isinstance(a, Tensor) else a


class CudaCapture:
    """CuPy's stream capture, as StepGraph uses it (module docstring: each call checked against
    CuPy's documentation and source). ``cupy`` is the module to use: CuPy itself, or in
    tests/test_step_graph.py a fake that runs the same calls on emu."""

    def __init__(self, cupy=None):
        if cupy is None:
            import cupy
        self.cupy = cupy
        # A capture cannot use the legacy default stream (Stream.begin_capture refuses it), and a
        # non-blocking stream is not synchronised with legacy-stream work of other threads, which
        # would invalidate the capture.
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.ready = cupy.cuda.Event(disable_timing=True)   # recorded again before each step

    def after_caller(self) -> None:
        """Order this stream after the work queued so far on the caller's current stream (an
        event recorded there; wait_event takes the event's state at the call)."""
        self.ready.record(self.cupy.cuda.get_current_stream())
        self.stream.wait_event(self.ready)

    def current(self):
        """``with capture.current():`` makes the stream CuPy's current one: CuPy launches every
        kernel, copy and fill on ``get_current_stream()``, so all of them go to this stream, the
        capturing one during a capture."""
        return self.stream

    @contextlib.contextmanager
    def holding(self, held: list):
        """Keep every device block allocated in this thread inside the block (appended to
        ``held``): ``cupy.cuda.using_allocator`` sets a thread-local allocator; this one forwards
        to the allocator in use (``cupy.cuda.get_allocator()``, the memory pool by default) and
        keeps each MemoryPointer, so no block the graph uses returns to the pool while the graph
        may be replayed."""
        allocate = self.cupy.cuda.get_allocator()
        if type(getattr(allocate, "__self__", None)).__name__ == "MemoryAsyncPool":
            # cudaMallocAsync inside a capture becomes a memory node of the graph, and a graph
            # whose allocations are not freed in it cannot be launched again
            raise StepGraphError("a captured training step needs CuPy's default memory pool, not "
                                 "cupy.cuda.MemoryAsyncPool (stream-ordered allocations become "
                                 "graph nodes); run without --graph")

        def keep(size):
            memory = allocate(size)
            held.append(memory)
            return memory

        with self.cupy.cuda.using_allocator(keep):
            yield

    def begin(self) -> None:
        # No mode: CuPy's default, cudaStreamCaptureModeRelaxed, under which the memory pool may
        # cudaMalloc when it grows (the comment in cupy/cuda/stream.pyx, begin_capture)
        self.stream.begin_capture()

    def end(self):
        """The captured graph (``cupy.cuda.Graph``, instantiated by CuPy). Raises when CUDA
        invalidated the capture; the capture is over either way (cudaStreamEndCapture)."""
        return self.stream.end_capture()

    def abort(self) -> None:
        """End a capture that failed, dropping its graph, unless it is already over. CuPy's
        ``is_capturing()`` raises RuntimeError for a capture CUDA invalidated (a host read inside
        it, say: cupy_backends/cuda/api/runtime.pyx, streamIsCapturing), and such a capture is
        still to be ended: cudaStreamEndCapture ends it and reports the invalidation (suppressed)."""
        try:
            capturing = self.stream.is_capturing()
        except RuntimeError:
            capturing = True
        if capturing:
            with contextlib.suppress(Exception):
                self.stream.end_capture()

    def launch(self, graph) -> None:
        graph.launch(self.stream)


class StepGraph:
    """A training step (forward, weighted loss, backward, SGD update, zero_grad) captured once on a
    kernel device (``cuda`` or ``emu``) and replayed for every later batch; module docstring.

    >>> graph = StepGraph(model, optimizer)          # doctest: +SKIP
    >>> loss = graph.step(x, target, weight)         # a float; weights updated unless it is not finite

    ``capture``: on ``cuda`` a :class:`CudaCapture` is made; on ``emu`` none (the recorded launches
    are replayed), unless one is given (the tests give a CudaCapture over a fake CuPy).
    """

    def __init__(self, model, optimizer, capture: CudaCapture | None = None):
        device = model.device
        if device not in ("cuda", "emu"):
            raise ValueError(f"a captured training step needs a kernel device (cuda or emu), not "
                             f"{device!r}: the cpu device has no kernel launches to capture")
        if {p.device for p in optimizer.params} != {device}:
            raise ValueError("StepGraph: the optimizer's parameters must be the model's, on its device")
        self.model, self.optimizer, self.device = model, optimizer, device
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        if capture is None and device == "cuda":
            capture = CudaCapture()
        self.capture = capture
        layers = getattr(model, "DROPOUT_LAYERS", 0)
        self.seeds = self.xp.zeros(max(layers, 1), dtype=np.uint32)   # the dropout seeds, rewritten per step
        self.captures = 0    # steps captured so far (a new capture after each invalidation)
        self.replays = 0
        self.launches: list = []    # (function, grid, block, args, file, kernel) of the captured step
        self.loaded: set = set()    # (file, kernel) launched by this thread before the capture
        self._graph = None          # the captured graph (capture.end())
        self._held: list = []       # the device blocks allocated during the capture (cuda)
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
        self.launches, self._graph, self._held, self._inputs, self._loss = [], None, [], None, None
        self._captured = self._warmed = None

    # ---- the step ---------------------------------------------------------------------------
    def step(self, x, target, weight) -> float:
        """One training step on this batch: x (N,C,H,W), target (N,H',W') class indices, weight
        (N,H',W'), arrays or Tensors (host or device). Returns the loss; when it is not finite
        the weights and momentum are left as they were. Eager the first time a signature is seen,
        captured the second time, replayed afterwards. Raises StepGraphError when the capture
        fails (nothing of this step ran then)."""
        signature = self.signature(x, target, weight)
        if self._captured is not None and signature != self._captured:
            self.release()
        if self.capture is not None:   # after the caller's work so far (the batch's upload, say)
            self.capture.after_caller()
        with self._on_stream():
            if self._captured is not None:
                return self._replay(x, target, weight)
            if self._warmed == signature:
                return self._capture(x, target, weight)
            value = self._eager(x, target, weight)
            self._warmed = self.signature(x, target, weight)   # the update may have built buffers
            return value

    def _on_stream(self):
        return self.capture.current() if self.capture is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _recording(self, launches: list):
        """Every kernel launch of this thread inside the block is appended to ``launches``."""
        self.backend.recorder = (threading.get_ident(), launches)
        try:
            yield
        finally:
            self.backend.recorder = None

    def _eager(self, x, target, weight) -> float:
        from . import functional as F

        x, target, weight = (a if isinstance(a, Tensor) else Tensor(a, device=self.device)
                             for a in (x, target, weight))
        launches = []
        with self._recording(launches):     # which kernels are loaded now (a capture must not load one)
            loss = F.weighted_cross_entropy(self.model(x), target, weight)
            value = loss.item()
            if math.isfinite(value):
                loss.backward()
                self.optimizer.step()
            self.optimizer.zero_grad()
        self.loaded.update((launch[4], launch[5]) for launch in launches)
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

    def _load_capture_only_kernels(self) -> None:
        """Launch the kernels only a captured step uses once, on one element, before the capture:
        CUDA loads a kernel lazily at its first use (the default since CUDA 12.2), and a module
        load must not fall inside a capture. The update sees a NaN loss and changes nothing."""
        xp, launches = self.xp, []
        with self._recording(launches):
            dropout_kernels_forward_seed_buffer(self.backend, xp.zeros(1, dtype=np.float32), 0.5, self.seeds, 0)
            self.backend.sgd_step_if_finite(xp.zeros(1, dtype=np.float32), xp.zeros(1, dtype=np.float32),
                                            xp.zeros(1, dtype=np.float32), 0.0, 0.0,
                                            xp.full(1, np.nan, dtype=np.float32))
        self.loaded.update((launch[4], launch[5]) for launch in launches)

    def _capture(self, x, target, weight) -> float:
        model, opt, capture = self.model, self.optimizer, self.capture
        opt.prepare()      # an update inside the capture must not replace the arrays it updates
        self._inputs = (self._device_copy(x, np.float32), self._device_copy(target, np.int32),
                        self._device_copy(weight, np.float32))
        self._check_target(self._inputs[1])
        tx, tt, tw = (Tensor._from_array(a, self.device) for a in self._inputs)
        self._write_seeds()
        self._load_capture_only_kernels()
        launches, held = [], []
        count = getattr(model, "forward_count", None)
        seeds_from = getattr(model, "dropout_seeds_from", None)
        graph = None
        try:
            with self._recording(launches), \
                    (seeds_from(self.seeds) if seeds_from else contextlib.nullcontext()), \
                    (capture.holding(held) if capture is not None else contextlib.nullcontext()):
                if capture is not None:
                    capture.begin()
                loss = WeightedCrossEntropy.apply(model(tx), tt, tw)
                loss.backward()
                opt.step(unless_nonfinite=loss.data)
                opt.zero_grad()
                if capture is not None:
                    graph = capture.end()
        except BaseException as exc:
            self.release()
            if capture is None:     # emu's own recording: the launches ran, the error is the step's
                raise
            # End the capture (the stream must not stay capturing). Nothing of the step ran on the
            # device (a capture runs nothing), so the host state goes back to before it: the
            # dropout masks' forward count, no gradients.
            capture.abort()
            if count is not None:
                object.__setattr__(model, "forward_count", count)
            opt.zero_grad()
            if not isinstance(exc, Exception):     # KeyboardInterrupt and the like: as they are
                raise
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StepGraphError(f"capturing the training step as a CUDA graph on {self.device!r} failed: "
                                 f"{type(exc).__name__}: {detail} (a captured step may only launch "
                                 f"kernels: no host read, no host-device copy); run without --graph") from exc
        self.launches, self._graph, self._held, self._loss = launches, graph, held, loss.data
        self.captures += 1
        if graph is not None:
            capture.launch(graph)          # a capture ran nothing: this is the step's work
        self._captured = self.signature(x, target, weight)
        return self._read_loss()

    def _replay(self, x, target, weight) -> float:
        self._load(x, target, weight)
        self._write_seeds()
        if self._graph is not None:
            self.capture.launch(self._graph)
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
        """The loss as a float. On cuda, ``get()`` copies on the current stream (this one) into
        pageable host memory, which returns once the copy is done, after the whole step."""
        loss = self._loss
        return float(loss.get() if hasattr(loss, "get") else loss)
