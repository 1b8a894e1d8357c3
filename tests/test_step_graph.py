"""minunet.step_graph: a training step captured once and replayed gives exactly the eager steps.

Emu's replay calls the recorded kernel functions with their recorded arguments, which is what a
CUDA graph does; it reproduces the eager steps only if a step is nothing but launches of
kernels/ (an array operation of NumPy in the step would not be redone and leave stale data), so
the equivalence tests below also prove that. The ``cuda`` test checks the real CUDA graph (it
skips without CuPy and a GPU). Small shapes: base 4, depth 2, 3 classes, tile 52 -> 12.
"""
from __future__ import annotations

import contextlib
import threading
import types

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F
from minunet import autograd, devices, emulator
from minunet.backends import reference as R
from minunet.devices import cuda_status, to_host
from minunet.ops.cross_entropy import WeightedCrossEntropy
from minunet.ops.elementwise import DeviceSeed
from minunet.step_graph import CAPTURE_ONLY_KERNELS, CudaCapture, StepGraph, StepGraphError

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


def check_equivalence(device: str, data, make_graph=StepGraph) -> StepGraph:
    """len(data) steps eagerly and through a StepGraph (eager warm-up, capture, replays) from the
    same seed: the same loss, weights and momentum after every step, bit for bit; and each
    replay's dropout masks are the eager path's masks (the reference's, for the seed of that
    forward count)."""
    model, optimizer = model_and_optimizer(device)
    twin, twin_optimizer = model_and_optimizer(device)
    graph = make_graph(twin, twin_optimizer)
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
    assert (graph.captures, graph.replays) == (1, 3) and graph._graph is not None and graph._held
    assert {(f, k) for *_, f, k in graph.launches} <= graph.loaded   # all loaded before the capture


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


# ---- the cuda capture path, run on emu against a fake CuPy -------------------------------------
class CaptureViolation(RuntimeError):
    """What CUDA would answer (cudaErrorStreamCaptureUnsupported, capture invalidated)."""


class FakeEvent:
    def __init__(self, disable_timing=False):
        self.stream = None

    def record(self, stream=None):
        self.stream = stream


class FakeGraph:
    """cupy.cuda.Graph: launch() runs the captured launches, in order, on the given stream."""

    def __init__(self, cupy, launches):
        self.cupy, self.launches, self.streams = cupy, launches, []

    def launch(self, stream=None):
        self.streams.append(stream)
        with self.cupy.running(stream):
            for function, grid, block, args in self.launches:
                function(grid, block, args)


class FakeStream:
    """cupy.cuda.Stream with CUDA's capture rules: while capturing, the launches made with this
    stream current are recorded (not run); a host read, a launch on another stream or a first
    launch of a kernel (a module load) invalidates the capture, as on a GPU."""

    def __init__(self, cupy, null=False, non_blocking=False):
        self.cupy, self.null, self.non_blocking = cupy, null, non_blocking
        self.capture = None          # the launches recorded since begin_capture
        self.invalidated = None      # why CUDA would refuse end_capture

    def __enter__(self):
        self.cupy.stack.append(self)
        return self

    def __exit__(self, *exc):
        assert self.cupy.stack.pop() is self

    def record(self, event=None):
        return event or FakeEvent()

    def wait_event(self, event):
        assert not self.cupy.capturing(), "an event wait inside the capture"
        assert event.stream is not None and event.stream is not self, "a wait on an event not recorded"
        self.cupy.waits.append((self, event.stream))

    def begin_capture(self, mode=None):
        if self.null:
            raise RuntimeError("cannot capture on the default (legacy) stream")   # CuPy's check
        assert self.capture is None, "begin_capture on a stream already capturing"
        self.cupy.modes.append(mode)
        self.capture, self.invalidated = [], None

    def is_capturing(self):
        if self.invalidated:      # what CuPy's streamIsCapturing does
            raise RuntimeError("the stream was capturing, but an error has invalidated the capture sequence")
        return self.capture is not None

    def end_capture(self):
        assert self.capture is not None, "end_capture without begin_capture"
        launches, invalidated = self.capture, self.invalidated
        self.capture = self.invalidated = None     # the capture is over, valid or not (CUDA)
        if invalidated:
            raise CaptureViolation(f"cudaErrorStreamCaptureInvalidated: {invalidated}")
        return FakeGraph(self.cupy, launches)


class FakeCupy:
    """The part of CuPy that minunet.step_graph.CudaCapture calls, over the emu backend: the
    ``cuda`` namespace (Stream, get_current_stream, get_allocator, using_allocator) and hooks that
    make a host read or a misplaced launch inside a capture fail the way CUDA does."""

    def __init__(self):
        self.stack, self.modes, self.allocated, self.unheld, self.waits = [], [], [], [], []
        self.null = FakeStream(self, null=True)
        self.streams = [self.null]
        self.executed = set()    # the kernel functions that ran at least once (are loaded)
        self.allocators = threading.local()
        self.cuda = self

    # cupy.cuda.*
    def Stream(self, null=False, non_blocking=False):   # noqa: N802 (CuPy's name)
        self.streams.append(FakeStream(self, null, non_blocking))
        return self.streams[-1]

    def Event(self, disable_timing=False):   # noqa: N802 (CuPy's name)
        return FakeEvent(disable_timing)

    def get_current_stream(self):
        return self.stack[-1] if self.stack else self.null

    def get_allocator(self):
        def malloc(size):
            memory = object()
            self.allocated.append((size, memory))
            return memory
        return malloc

    @contextlib.contextmanager
    def using_allocator(self, allocator=None):
        previous = getattr(self.allocators, "current", None)
        self.allocators.current = allocator
        try:
            yield
        finally:
            self.allocators.current = previous

    def alloc(self, size):
        """cupy.cuda.alloc: the thread's allocator (using_allocator) or the pool. A block taken
        from the pool during a capture and not kept would go back to it while the graph uses it."""
        allocator = getattr(self.allocators, "current", None)
        if allocator is None and self.capturing() is not None:
            self.unheld.append(size)
        return (allocator or self.get_allocator())(size)

    # what the hooks below ask
    def capturing(self):
        return next((s for s in self.streams if s.capture is not None), None)

    def violation(self, what: str):
        """Inside a capture, ``what`` is illegal: invalidate the capture and raise."""
        stream = self.capturing()
        if stream is not None:
            stream.invalidated = what
            raise CaptureViolation(f"{what} while a stream is capturing (cudaErrorStreamCaptureUnsupported)")

    @contextlib.contextmanager
    def running(self, stream):
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    def launch(self, function, grid, block, args):
        """A kernel launch on the current stream: recorded when that stream captures, refused when
        another stream captures (it would run now, outside the graph), run otherwise."""
        current, capturing = self.get_current_stream(), self.capturing()
        if capturing is not None and current is not capturing:
            self.violation("a kernel launched on a stream other than the capturing one")
        if current.capture is not None:
            if id(function) not in self.executed:
                self.violation("a kernel's first launch (lazy loading loads its module)")
            current.capture.append((function, grid, block, args))
            return
        function(grid, block, args)
        self.executed.add(id(function))


class DeviceArray(np.ndarray):
    """An emu array that, like a CuPy array, cannot be read by the host while a capture is in
    progress (``float``, ``int``, ``bool``, ``item()``, ``tolist()``, an element, ``get()``)."""
    cupy = None

    def _read(self, what):
        if DeviceArray.cupy is not None:
            DeviceArray.cupy.violation(f"a host read of a device array ({what})")

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if not isinstance(out, np.ndarray):
            self._read("an element")
        return out

    def get(self):
        self._read("get()")
        return np.array(self)


def _read_guarded(name: str):
    def method(self, *args):
        self._read(name)
        return getattr(np.ndarray, name)(self, *args)
    return method


for _name in ("__float__", "__int__", "__index__", "__bool__", "item", "tolist"):
    setattr(DeviceArray, _name, _read_guarded(_name))


class DeviceNumpy(types.SimpleNamespace):
    """numpy for the emu backend's ``xp``, with the arrays it creates DeviceArrays."""

    def __getattr__(self, name):
        value = getattr(np, name)
        if name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like"):
            return lambda *a, **k: value(*a, **k).view(DeviceArray)
        return value


@pytest.fixture
def fake_cupy(monkeypatch):
    """A FakeCupy wired into the emu backend: every kernel launch goes through FakeCupy.launch, the
    backend's arrays are DeviceArrays, and ``to_host`` (every module's import of it) refuses to
    read inside a capture."""
    import sys

    cupy = FakeCupy()
    backend = mu.backends.get_backend("emu")
    original_function, original_empty = backend.function, backend.empty

    class Launch:
        def __init__(self, function):
            self.function = function

        def __call__(self, grid, block, args):
            cupy.launch(self.function, grid, block, args)

    wrapped = {}

    def function(file, kernel):
        f = original_function(file, kernel)
        return wrapped.setdefault(id(f), Launch(f))

    monkeypatch.setattr(backend, "function", function)
    def empty(*args, **kwargs):    # a kernel's output, allocated from the fake's memory pool
        out = original_empty(*args, **kwargs).view(DeviceArray)
        cupy.alloc(out.nbytes)
        return out

    monkeypatch.setattr(backend, "empty", empty)
    monkeypatch.setattr(backend, "xp", DeviceNumpy())
    monkeypatch.setattr(DeviceArray, "cupy", cupy)
    original_to_host = devices.to_host

    def to_host(array):
        cupy.violation("a host read of a device array (to_host)")
        return original_to_host(array)

    for name, module in list(sys.modules.items()):
        if name.startswith("minunet") and getattr(module, "to_host", None) is original_to_host:
            monkeypatch.setattr(module, "to_host", to_host)
    return cupy


def fake_cuda_graph(cupy):
    return lambda model, optimizer: StepGraph(model, optimizer, capture=CudaCapture(cupy))


def test_the_capture_code_replays_the_eager_steps_bit_for_bit_on_a_fake_cupy(rng, fake_cupy):
    """StepGraph's cuda path (CudaCapture: stream capture, graph launches) on emu: launches are
    recorded on the capturing stream and run only by the graph's launch, as on a GPU, and the
    steps are still the eager ones, bit for bit. The fake fails any launch on another stream and
    any kernel first launched inside the capture, so passing proves neither happens."""
    graph = check_equivalence("emu", batches(rng, 4, 2), fake_cuda_graph(fake_cupy))
    stream = graph.capture.stream
    assert (graph.captures, graph.replays) == (1, 2) and isinstance(graph._graph, FakeGraph)
    assert fake_cupy.modes == [None]                      # CuPy's default: relaxed mode
    assert stream.non_blocking and not stream.is_capturing()
    assert graph._graph.streams == [stream] * 3           # the capture's own launch, then 2 replays
    assert fake_cupy.waits == [(stream, fake_cupy.null)] * 4   # each step after the caller's stream
    assert len(graph._graph.launches) == len(graph.launches)   # every launch went to the graph
    assert {k for *_, k in graph.launches} >= set(CAPTURE_ONLY_KERNELS)
    assert {(f, k) for *_, f, k in graph.launches} <= graph.loaded   # all loaded before the capture
    assert fake_cupy.unheld == [] and len(graph._held) >= len(graph.launches) // 2   # outputs held


def test_the_memory_allocated_during_a_capture_is_held(fake_cupy):
    capture, held = CudaCapture(fake_cupy), []
    with capture.holding(held):
        blocks = [fake_cupy.alloc(n) for n in (256, 512)]
    assert held == blocks and fake_cupy.alloc(128) not in held    # outside: the pool's own


class ReadingLoss(WeightedCrossEntropy):
    """The step's loss with a host read added after it (what the tests below must catch)."""
    read = None

    @classmethod
    def apply(cls, *args):
        loss = WeightedCrossEntropy.apply(*args)
        cls.read(loss)
        return loss


HOST_READS = {
    "loss.item()": lambda loss: loss.item(),
    "float(loss.data)": lambda loss: float(loss.data),
    "np.isfinite check": lambda loss: bool(np.isfinite(loss.data)),
    "to_host": lambda loss: devices.to_host(loss.data),
    "an element": lambda loss: loss.data.reshape(1)[0],
    "loss.numpy()": lambda loss: loss.numpy(),
}


@pytest.mark.parametrize("read", HOST_READS)
def test_a_host_read_inside_the_captured_step_fails_with_one_line_and_ends_the_capture(rng, fake_cupy,
                                                                                     monkeypatch, read):
    """A host read added to the captured step (here after the loss) fails as it would on a GPU:
    StepGraphError, one line; the capture is ended, the host state is as before the step (the
    forward count, no gradients) and the weights are untouched (nothing ran)."""
    import minunet.step_graph as step_graph

    monkeypatch.setattr(ReadingLoss, "read", staticmethod(HOST_READS[read]))
    data = batches(rng, 2, 1)
    model, optimizer = model_and_optimizer("emu")
    graph = StepGraph(model, optimizer, capture=CudaCapture(fake_cupy))
    graph.step(*data[0])                                  # eager warm-up: the read is not there
    monkeypatch.setattr(step_graph, "WeightedCrossEntropy", ReadingLoss)
    count, before = model.forward_count, state(model, optimizer)
    with pytest.raises(StepGraphError, match="host read") as error:
        graph.step(*data[1])
    assert len(str(error.value).splitlines()) == 1 and "run without --graph" in str(error.value)
    assert not graph.capture.stream.is_capturing() and not graph.captured
    assert model.forward_count == count and all(p.grad is None for p in optimizer.params)
    assert_same_state(state(model, optimizer), before, "after a failed capture")


@pytest.mark.parametrize("read", ["float(loss.data)", "loss.item()"])
def test_a_host_read_inside_the_captured_step_fails_with_one_line_on_cuda(rng, monkeypatch, read):
    """What the fake CuPy claims, on a GPU: CUDA refuses the read inside the capture; StepGraph
    ends the capture and raises one line; the stream works again and the weights are untouched."""
    import minunet.step_graph as step_graph

    need("cuda")
    monkeypatch.setattr(ReadingLoss, "read", staticmethod(HOST_READS[read]))
    data = batches(rng, 3, 1)
    model, optimizer = model_and_optimizer("cuda")
    graph = StepGraph(model, optimizer)
    graph.step(*data[0])
    monkeypatch.setattr(step_graph, "WeightedCrossEntropy", ReadingLoss)
    before = state(model, optimizer)
    with pytest.raises(StepGraphError) as error:
        graph.step(*data[1])
    assert len(str(error.value).splitlines()) == 1
    assert not graph.capture.stream.is_capturing() and not graph.captured
    assert_same_state(state(model, optimizer), before, "after a failed capture")
    monkeypatch.setattr(step_graph, "WeightedCrossEntropy", WeightedCrossEntropy)
    assert np.isfinite(graph.step(*data[2]))       # eager again, on the same stream


def test_the_fake_cupy_lets_the_same_reads_through_outside_a_capture(rng, fake_cupy):
    """The reads above are refused only inside a capture (the eager step reads its loss)."""
    model, optimizer = model_and_optimizer("emu")
    x, target, weight = batches(rng, 1, 1)[0]
    loss = F.weighted_cross_entropy(model(mu.Tensor(x, device="emu")), mu.Tensor(target, device="emu"),
                                    mu.Tensor(weight, device="emu"))
    assert isinstance(loss.data, DeviceArray)
    for read in HOST_READS.values():
        read(loss)


def test_a_capture_refused_at_its_end_is_one_line(rng, fake_cupy, monkeypatch):
    """CUDA refuses the capture only at its end (end_capture reports it invalidated):
    StepGraphError, one line, the stream no longer capturing; the next steps are eager again."""
    data = batches(rng, 3, 1)
    model, optimizer = model_and_optimizer("emu")
    graph = StepGraph(model, optimizer, capture=CudaCapture(fake_cupy))
    graph.step(*data[0])
    end_capture = FakeStream.end_capture

    def invalidated(stream):
        stream.invalidated = "an operation CUDA cannot capture"
        return end_capture(stream)

    monkeypatch.setattr(FakeStream, "end_capture", invalidated)
    with pytest.raises(StepGraphError, match="cudaErrorStreamCaptureInvalidated") as error:
        graph.step(*data[1])
    assert len(str(error.value).splitlines()) == 1
    assert not graph.capture.stream.is_capturing() and not graph.captured


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


def test_train_goes_on_eagerly_when_the_capture_fails(tmp_path, monkeypatch, capsys):
    """A StepGraphError (the capture failed, nothing of the step ran) is one warning line, and the
    run trains on with the eager step: the same losses as a run without --graph."""
    import minunet.step_graph as step_graph

    step = step_graph.StepGraph.step

    def failing(self, x, target, weight):
        if self.captures == 0 and self._warmed is not None:     # the call that would capture
            raise StepGraphError("capturing the training step as a CUDA graph failed: test")
        return step(self, x, target, weight)

    monkeypatch.setattr(step_graph.StepGraph, "step", failing)
    assert train_run(tmp_path, "eager", "--iterations", "4") == 0
    assert train_run(tmp_path, "graph", "--iterations", "4", "--graph") == 0
    printed = capsys.readouterr()
    warnings = [line for line in (printed.out + printed.err).splitlines() if line.startswith("warning: capturing")]
    logs = [[row.split(",")[1] for row in (tmp_path / name / "log.csv").read_text().splitlines()[1:]]
            for name in ("eager", "graph")]
    assert logs[0] == logs[1] and len(logs[0]) == 4 and len(warnings) == 1


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
