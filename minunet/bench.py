"""Benchmarks: every op and a whole training step, with napkin math and PyTorch side by side.

    python -m minunet.bench --device cpu                    # ops + training steps (tiles 252 and 348), base 16
    python -m minunet.bench --device cuda --base-channels 64 --tile 572 --step-tiles 572 --precision both
    python -m minunet.bench --device cuda --tune            # time every kernel version per layer: cuda_choices.json
    python -m minunet.bench --kernels --gpu sm_90           # ptxas resources + emulator counters, predicted times

The op rows come from the registry (``minunet/ops``): every backend function of every op, on the
shapes each op's ``bench_cases`` picks from a U-Net with ``--base-channels`` on a ``--tile`` input
(the first, widest and a deep 3x3 conv, the first pooling, the last up-conv and its crop-concat,
the classifier, the loss, ReLU, dropout, SGD). Each row shows the work (FLOPs: 2 per multiply-add;
bytes: the minimum traffic, every input read once and every output written once), the measured
time (median of ``--repeat`` runs after a warm-up), the achieved GFLOP/s and GB/s, and - when
PyTorch is importable and has a twin of the op - PyTorch's time for the same op on the same device
and the ratio minunet/PyTorch (> 1 means minunet is slower). On ``cuda`` and ``emu`` an op whose
kernels come in versions (``minunet.backends.choices.KNOBS``: the 3x3 convolution's
``CONV3X3_VERSIONS``, the weight gradients' ``REDUCTIONS``) gets one more row per version, forced,
after the row of the "auto" choice. On ``cuda`` PyTorch runs in the precision of minunet's table:
cuDNN strict FP32 (``allow_tf32`` off) next to minunet's fp32, TF32 next to its tf32, and the
training step is compared with both. A benchmark prints; it never asserts a time. A time
measured on a GPU is a measurement; the emulator's kernel reports are predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import functional as F
from .backends import choices
from .backends.kernels import PRECISIONS, set_precision
from .devices import resolve_device, to_device_array, to_host
from .nn import UNet
from .optim import SGD
from .tensor import Tensor

# After a call, OpenBLAS's and OpenMP's worker threads spin for a while before they sleep; on a
# 2-core machine the spinning threads of the library timed just before (minunet's BLAS or Numba,
# or PyTorch's OpenMP) steal the cores from the one timed now (measured: PyTorch's 1.5 ms
# convolution took 22 ms right after a NumPy GEMM). Every timing first waits this long.
SETTLE_S = 0.3
# A forced kernel version (and --tune) slower than this per call is timed once, not --repeat times.
SLOW_MS = 200.0


@dataclass
class Row:
    name: str
    shape: str
    flops: float
    bytes: float
    ms: float
    torch_ms: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.flops / (self.ms * 1e6) if self.ms > 0 else 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e6) if self.ms > 0 else 0.0

    @property
    def ratio(self) -> float | None:
        return None if not self.torch_ms else self.ms / self.torch_ms


def time_it(fn, sync, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds, ``sync()`` (the device) around each run,
    after ``SETTLE_S`` of quiet and ``warmup`` untimed calls (Numba and oneDNN compile on the
    first call of a new shape)."""
    time.sleep(SETTLE_S)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_sync(device: str):
    if device == "cuda":
        import cupy

        return cupy.cuda.runtime.deviceSynchronize
    return lambda: None


class TorchTwin:
    """PyTorch on the matching device, for comparison only; ``None``-like when not importable,
    not wanted (``--no-torch``) or without the device. On cuda it runs in two precisions,
    ``mode("fp32")`` (cuDNN and cuBLAS strict FP32: ``allow_tf32`` off) and ``mode("tf32")``
    (tensor cores: ``allow_tf32`` on, PyTorch's default for convolutions), with cuDNN's
    autotuner on (``cudnn.benchmark``: the warm-up runs pick each layer's fastest algorithm)."""

    LABELS = {"fp32": "cuDNN strict FP32 (allow_tf32 off)", "tf32": "cuDNN TF32 (allow_tf32 on)"}

    def __init__(self, device: str, enabled: bool = True):
        self.torch = self.device = None
        if not enabled:
            return
        try:
            import torch
        except Exception:
            return
        if device == "cuda" and not torch.cuda.is_available():
            return
        self.torch, self.device = torch, ("cuda" if device == "cuda" else "cpu")
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True

    def __bool__(self) -> bool:
        return self.torch is not None

    @property
    def modes(self) -> tuple[str, ...]:
        """The precisions PyTorch is timed in: both on cuda, float32 alone on the CPU."""
        return ("fp32", "tf32") if self.device == "cuda" else ("fp32",)

    def label(self, mode: str | None) -> str:
        """What PyTorch computed in, for the tables."""
        if self.device != "cuda":
            return "PyTorch CPU float32"
        return "PyTorch " + self.LABELS[mode or "fp32"]

    @contextlib.contextmanager
    def mode(self, precision: str | None):
        """PyTorch in ``precision`` ("fp32" strict or "tf32") inside the block, on cuda; nothing
        changes on the CPU (no TF32 there)."""
        if self.device != "cuda":
            yield
            return
        backends = self.torch.backends
        saved = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32
        allow = (precision or "fp32") == "tf32"
        backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = allow
        try:
            yield
        finally:
            backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def tensor(self, a, grad: bool = False):
        t = self.torch.from_numpy(np.ascontiguousarray(to_host(a))).to(self.device)
        return t.requires_grad_() if grad and t.is_floating_point() else t

    def time(self, fn, repeat: int) -> float:
        """Like ``time_it``, with three warm-up calls: oneDNN builds a kernel for each new shape
        on its first call (measured: 15 ms instead of 0.3 ms for the first layer's conv)."""
        return time_it(fn, self.sync, repeat, warmup=3)

    def time_backward(self, forward, inputs, grad_output, repeat: int) -> float:
        """The backward alone: the graph is built once and ``autograd.grad`` replays it
        (``retain_graph``), so no forward time is subtracted (a difference of two noisy medians,
        which came out negative for small ops)."""
        out = forward()
        return self.time(lambda: self.torch.autograd.grad(out, inputs, grad_output, retain_graph=True),
                         repeat)


# ---- every op, from the registry -----------------------------------------------------------------
def _describe(case) -> str:
    return str(case).replace(" ", "")


@contextlib.contextmanager
def backend_settings(device: str, **settings):
    """``get_backend(device)``'s attributes (``conv3x3_version``, ``reduction``, ``precision``)
    set to ``settings`` inside the block (a value of None leaves one alone), restored after. The
    cpu backend has none of them: nothing changes there."""
    from .backends import get_backend

    backend = get_backend(device)
    settings = {k: v for k, v in settings.items() if v is not None and hasattr(backend, k)}
    saved = {k: getattr(backend, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(backend, k, v)
        yield backend
    finally:
        for k, v in saved.items():
            setattr(backend, k, v)


def versioned(device: str, op) -> list[tuple[str, choices.Knob]]:
    """The knobs that pick between kernel versions of ``op``'s launches on ``device`` (none on cpu)."""
    if device == "cpu":
        return []
    return [(name, knob) for name, knob in choices.KNOBS.items() if choices.op_name(op) in knob.ops]


def bench_ops(device: str, base: int, tile: int, batch: int, repeat: int, twin: TorchTwin,
              precision: str | None = None) -> list[Row]:
    """A row per backend function and bench case (the "auto" choice), then one per forced
    version of each knob that changes it (``versioned``): ``conv3x3_backward [reduction=tree]``.
    A version that refuses a shape gets a row whose ``extra["error"]`` says why. PyTorch runs in
    ``precision`` (``TorchTwin.mode``)."""
    from . import ops
    from .backends import get_backend

    backend, sync = get_backend(device), device_sync(device)
    rng = np.random.default_rng(0)
    rows = []
    with backend_settings(device, precision=precision):
        for op in ops.OPS:
            _bench_op(device, op, base, tile, batch, repeat, twin, precision, backend, sync, rng, rows)
    return rows


def _bench_op(device, op, base, tile, batch, repeat, twin, precision, backend, sync, rng, rows) -> None:
    """``bench_ops``'s rows of one op (every bench case, function and version), appended to ``rows``."""
    for case in op.bench_cases(base, tile, batch):
        examples = op.example(rng, case)
        costs = op.cost(case)
        for function, args in examples.items():
            dev_args = tuple(backend.xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
            flops, nbytes = costs[function]
            ms = time_it(lambda: getattr(backend, function)(*dev_args), sync, repeat)
            row = Row(function, _describe(case), flops, nbytes, ms)
            forward_name = function.replace("_backward", "_forward")
            torch_fn = getattr(op, "TORCH_TWINS", {}).get(forward_name)
            if twin and torch_fn is not None:
                with twin.mode(precision):
                    row.torch_ms = _torch_op_time(twin, torch_fn, function == forward_name,
                                                  examples[forward_name], repeat)
            rows.append(row)
            for knob_name, knob in versioned(device, op):
                if function not in knob.functions(op):
                    continue
                for version in knob.versions():
                    rows.append(_version_row(device, row, f"{knob_name}={version}",
                                             {knob.attribute: version},
                                             lambda: getattr(backend, function)(*dev_args), sync, repeat))


def _version_row(device: str, auto: Row, label: str, settings: dict, fn, sync, repeat: int) -> Row:
    """``auto``'s row again with one version forced (``settings`` on the backend)."""
    row = Row(f"{auto.name} [{label}]", auto.shape, auto.flops, auto.bytes, math.nan, auto.torch_ms)
    try:
        with backend_settings(device, **settings):
            row.ms = time_capped(fn, sync, repeat, SLOW_MS)
    except Exception as exc:   # a version may refuse a shape (grid limits, no fp32 path, ...)
        row.extra["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _torch_op_time(twin: TorchTwin, torch_fn, forward: bool, forward_args, repeat: int) -> float:
    """PyTorch's time for an op's twin: the forward under no_grad, or the backward of the
    forward's graph (every float input requires grad, as ours computes every gradient)."""
    torch = twin.torch
    inputs = [twin.tensor(a, grad=True) if isinstance(a, np.ndarray) else a for a in forward_args]
    if forward:
        with torch.no_grad():
            return twin.time(lambda: torch_fn(torch, *inputs), repeat)
    out = torch_fn(torch, *inputs)
    grad_output = twin.tensor(np.random.default_rng(1).standard_normal(tuple(out.shape)).astype(np.float32))
    leaves = tuple(t for t in inputs if hasattr(t, "requires_grad") and t.requires_grad)
    return twin.time_backward(lambda: torch_fn(torch, *inputs), leaves, grad_output, repeat)


# ---- a whole training step -------------------------------------------------------------------------
def unet_layers(config: dict, tile: int, batch: int) -> list[tuple[str, tuple]]:
    """Every convolution of a U-Net with ``config`` (``UNet.config``) on a ``tile`` input, in
    forward order, as ``(op, case)`` with the ops' case ``(N, Ci, H, W, Co)`` (input shape,
    output channels): the contracting path's two 3x3 convs per level, the bottom's two, per
    expansive level the up-conv and two 3x3 convs (the first on the concatenation), the 1x1
    classifier."""
    depth, base = config["depth"], config["base_channels"]
    widths = [base * 2 ** i for i in range(depth + 1)]
    layers, s, cin = [], tile, config["in_channels"]
    for i in range(depth + 1):                       # the contracting path, then the bottom block
        layers += [("conv3x3", (batch, cin, s, s, widths[i])), ("conv3x3", (batch, widths[i], s - 2, s - 2, widths[i]))]
        s, cin = s - 4, widths[i]
        if i < depth:
            s //= 2
    for i in reversed(range(depth)):                 # the expansive path
        layers.append(("conv_transpose2x2", (batch, cin, s, s, widths[i])))
        s *= 2
        layers += [("conv3x3", (batch, 2 * widths[i], s, s, widths[i])), ("conv3x3", (batch, widths[i], s - 2, s - 2, widths[i]))]
        s, cin = s - 4, widths[i]
    layers.append(("conv1x1", (batch, cin, s, s, config["num_classes"])))
    return layers


def unet_flops(model: UNet, tile: int, batch: int) -> float:
    """Forward FLOPs of the convolutions (2 per multiply-add): each layer's op ``cost``."""
    from . import ops

    modules = {choices.op_name(op): op for op in ops.OPS}
    return sum(modules[op].cost(case)[f"{op}_forward"][0] for op, case in unet_layers(model.config, tile, batch))


def torch_unet(model: UNet):
    """The same network in PyTorch (torch.nn layers), with our weights copied in, so the logits
    can be compared and the step timed on the same numbers."""
    import torch
    nn = torch.nn

    class Double(nn.Module):
        def __init__(self, ci, co):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(ci, co, 3), nn.Conv2d(co, co, 3)

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    class Up(nn.Module):
        def __init__(self, ci, co):
            super().__init__()
            self.up = nn.ConvTranspose2d(ci, co, 2, stride=2)
            self.convs = Double(2 * co, co)

        def forward(self, x, skip):
            u = self.up(x)
            dy, dx = (skip.shape[2] - u.shape[2]) // 2, (skip.shape[3] - u.shape[3]) // 2
            return self.convs(torch.cat([skip[:, :, dy:dy + u.shape[2], dx:dx + u.shape[3]], u], 1))

    cfg, depth = model.config, model.depth

    class TorchUNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = [cfg["base_channels"] * 2 ** i for i in range(depth + 1)]
            cin = cfg["in_channels"]
            for i in range(depth):
                setattr(self, f"down{i + 1}", Double(cin, w[i]))
                cin = w[i]
            self.bottom = Double(w[depth - 1], w[depth])
            for i in reversed(range(depth)):
                setattr(self, f"up{i + 1}", Up(w[i + 1], w[i]))
            self.classifier = nn.Conv2d(w[0], cfg["num_classes"], 1)
            self.drop = nn.Dropout(cfg["dropout"])

        def forward(self, x):
            skips = []
            for i in range(depth):
                x = getattr(self, f"down{i + 1}")(x)
                if i == depth - 1:
                    x = self.drop(x)
                skips.append(x)
                x = torch.max_pool2d(x, 2)
            x = self.drop(self.bottom(x))
            for i in reversed(range(depth)):
                x = getattr(self, f"up{i + 1}")(x, skips[i])
            return self.classifier(x)

    net = TorchUNet()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=True)
    return net


def time_phases(phases: dict, sync, repeat: int) -> dict:
    """Median milliseconds of each phase of a step, the phases run in order ``repeat + 1`` times
    (the first, warm-up step untimed), after ``SETTLE_S`` of quiet."""
    time.sleep(SETTLE_S)
    times = {k: [] for k in phases}
    for it in range(repeat + 1):
        for k, fn in phases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if it > 0:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def random_step_batch(rng, batch: int, tile: int, out: int):
    """The benchmarks' batch: a standard-normal image, two classes, weights in [1, 10) (NumPy)."""
    return (rng.standard_normal((batch, 1, tile, tile)).astype(np.float32),
            rng.integers(0, 2, (batch, out, out)).astype(np.int32),
            rng.uniform(1, 10, (batch, out, out)).astype(np.float32))


def graph_replay_ms(device: str, base: int, tile: int, batch: int, repeat: int) -> float:
    """Median milliseconds of one replayed training step (minunet.step_graph) of the U-Net with
    ``base`` channels on a ``tile`` input, the "training step (graph replay)" row: warm-up and
    capture untimed, then ``repeat`` replays, each copying the batch in and reading the loss."""
    from .step_graph import StepGraph

    model = UNet(base_channels=base, seed=0, device=device).train()
    out = UNet.output_size(tile, model.depth)
    x, target, weight = (to_device_array(a, device)
                         for a in random_step_batch(np.random.default_rng(0), batch, tile, out))
    graph = StepGraph(model, SGD(model.parameters(), lr=1e-4, momentum=0.99))
    graph.step(x, target, weight)     # eager warm-up
    graph.step(x, target, weight)     # capture
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        graph.step(x, target, weight)  # reads the loss: waits for the device
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_step(device: str, base: int, tile: int, batch: int, repeat: int, twin: TorchTwin,
               precision: str | None = None) -> list[Row]:
    """One SGD step of the U-Net (forward, weighted loss, backward, update), phase by phase,
    and the same step of the same network in PyTorch in each of its ``twin.modes``: the phases'
    PyTorch column is the mode of minunet's ``precision``; the last row ("training step") holds
    every mode's step time in ``extra["torch_step_ms"]``."""
    model = UNet(base_channels=base, seed=0, device=device).train()
    out = UNet.output_size(tile, model.depth)
    rng = np.random.default_rng(0)
    x_np, target_np, weight_np = random_step_batch(rng, batch, tile, out)
    x, target, weight = (Tensor(a, device=device) for a in (x_np, target_np, weight_np))
    opt = SGD(model.parameters(), lr=1e-4, momentum=0.99)
    state = {}
    phases = {
        "forward": lambda: state.__setitem__("logits", model(x)),
        "loss": lambda: state.__setitem__("loss", F.weighted_cross_entropy(state["logits"], target, weight)),
        "backward": lambda: state["loss"].backward(),
        "sgd": lambda: (opt.step(), opt.zero_grad()),
    }
    with backend_settings(device, precision=precision):
        ms = time_phases(phases, device_sync(device), repeat)
    fwd_flops = unet_flops(model, tile, batch)
    nparam = sum(p.size for p in model.parameters())
    input_bytes = 4.0 * batch * tile * tile  # a lower bound: the input alone
    rows = [
        Row("step: forward", f"{batch}x1x{tile}^2", fwd_flops, input_bytes, ms["forward"]),
        Row("step: loss", f"{batch}x2x{out}^2", 10.0 * batch * out * out * 2, 4.0 * batch * out * out * 6, ms["loss"]),
        Row("step: backward", "", 2 * fwd_flops, input_bytes, ms["backward"]),
        Row("step: sgd", f"{nparam} params", 3.0 * nparam, 4.0 * nparam * 4, ms["sgd"]),
        Row("training step", f"base {base}, tile {tile}", 3 * fwd_flops, 0.0, sum(ms.values())),
    ]
    for row in rows:
        row.extra["precision"] = precision or "fp32"
    if twin:
        torch = twin.torch
        net = torch_unet(model).to(twin.device)
        with torch.no_grad(), twin.mode("fp32"):   # the whole network cross-checked on the same weights, dropout off
            from .autograd import no_grad

            with no_grad():
                ours = to_host(model.eval()(x).data)
            model.train()
            theirs = net.eval()(twin.tensor(x_np)).cpu().numpy()
        rows[0].extra["max_abs_diff_logits_vs_torch"] = float(np.abs(theirs - ours).max())
        net.train()
        tx, tt, tw = twin.tensor(x_np), twin.tensor(target_np).long(), twin.tensor(weight_np)
        topt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99)
        cross_entropy = torch.nn.functional.cross_entropy
        tstate = {}
        tphases = {
            "forward": lambda: tstate.__setitem__("logits", net(tx)),
            "loss": lambda: tstate.__setitem__("loss", (cross_entropy(tstate["logits"], tt, reduction="none") * tw).mean()),
            "backward": lambda: tstate["loss"].backward(),
            "sgd": lambda: (topt.step(), topt.zero_grad()),
        }
        per_mode = {}
        for mode in twin.modes:
            with twin.mode(mode):
                per_mode[mode] = time_phases(tphases, twin.sync, repeat)
        tms = per_mode.get(precision or "fp32", per_mode["fp32"])
        for row, k in zip(rows, tphases):
            row.torch_ms = tms[k]
        rows[-1].torch_ms = sum(tms.values())
        rows[-1].extra["torch_step_ms"] = {twin.label(m): sum(t.values()) for m, t in per_mode.items()}
    return rows


def format_step_summary(steps: dict) -> str:
    """One line per minunet precision: its step time and the ratio to each PyTorch step.
    ``steps``: precision -> the rows of ``bench_step``."""
    lines = []
    for precision, rows in steps.items():
        step = next(r for r in rows if r.name == "training step")
        parts = [f"minunet {precision or 'fp32'}: {step.ms:9.2f} ms"]
        for label, ms in step.extra.get("torch_step_ms", {}).items():
            parts.append(f"{label}: {ms:8.2f} ms (minunet / PyTorch {step.ms / ms:5.2f})")
        lines.append(" | ".join(parts))
    return "\n".join(lines)


# ---- what makes each kernel fast: the emulator's counters and a predicted time ----------------------
REDUCTION_KERNELS = ("sum_partials", "sum_scaled")


def profile_kernels(base: int, tile: int, batch: int, gpu: str, sample_blocks: int = 4) -> list[dict]:
    """Every backend function of every op on its bench case, run once on ``emu`` (checked build)
    under ``minunet.emulator.profile``: global sectors per request, shared-memory wavefronts per
    request, DRAM bytes, occupancy on ``gpu``, and the roofline time the model PREDICTS for that GPU
    (never a measurement). The op's FLOPs (its ``cost``) are shared equally by the kernels that do
    its arithmetic (a conv backward's input- and weight-gradient kernels each do one forward's
    worth); the reductions of reduce.cu get none."""
    from . import emulator, ops
    from .backends.kernels import KernelBackend

    backend = KernelBackend("emu")
    rng = np.random.default_rng(0)
    rows = []
    for op in ops.OPS:
        for case in op.bench_cases(base, tile, batch):
            costs = op.cost(case)
            for function, args in op.example(rng, case).items():
                args = tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)
                with emulator.profile(gpu=gpu, sample_blocks=sample_blocks) as report:
                    getattr(backend, function)(*args)
                workers = [r for r in report.rows if r.kernel not in REDUCTION_KERNELS] or report.rows
                for r in workers:
                    report.set_flops(r.kernel, costs[function][0] / len(workers) / r.launches)

                def worst(values):
                    values = [v for v in values if v is not None]
                    return max(values) if values else None

                rows.append(dict(
                    function=function, case=_describe(case), kernels=len(report.rows),
                    flops=costs[function][0], dram_bytes=sum(r.dram_bytes for r in report.rows),
                    load_sectors=worst(r.sectors_per_load for r in report.rows),
                    store_sectors=worst(r.sectors_per_store for r in report.rows),
                    shared_wavefronts=worst(r.wavefronts_per_shared_load for r in report.rows),
                    occupancy=min((r.occupancy.occupancy for r in report.rows if r.occupancy), default=None),
                    achieved=min((r.achieved_occupancy for r in report.rows if r.achieved_occupancy), default=None),
                    predicted_us=None if report.total_predicted_seconds is None
                    else report.total_predicted_seconds * 1e6,
                    bound=max(report.rows, key=lambda r: r.predicted_seconds or 0).bound,
                    report=emulator.format_profile(report)))
    return rows


def format_kernel_profile(rows: list[dict], gpu: str) -> str:
    def num(v, fmt):
        width = int(fmt.split(".")[0])
        return f"{'-':>{width}}" if v is None else format(v, fmt)

    head = (f"{'function':<31} {'case':<34} {'kern':>4} {'GFLOP':>7} {'DRAM MB':>8} {'ld sect/req':>11} "
            f"{'st sect/req':>11} {'smem wf/req':>11} {'occup.':>6} {'ach.':>5} {'PREDICTED us':>12} {'bound':>7}")
    from .emulator.profiler import calibration_lines

    lines = [f"Emulator counts (exact, from every access of the sampled blocks) and times PREDICTED for "
             f"{gpu} by the model of docs/emulator.md: not measurements. Worst kernel of each function shown; "
             "occup.: theoretical occupancy (ptxas), ach.: predicted achieved occupancy; bound: the binding term.",
             *(["The model's error MEASURED on an H200 (python -m minunet.bench --calibrate):"] + calibration_lines()
               if calibration_lines() else []),
             head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['function']:<31} {r['case']:<34} {r['kernels']:>4} {r['flops'] / 1e9:7.3f} "
                     f"{r['dram_bytes'] / 1e6:8.2f} {num(r['load_sectors'], '11.2f')} "
                     f"{num(r['store_sectors'], '11.2f')} {num(r['shared_wavefronts'], '11.2f')} "
                     f"{num(None if r['occupancy'] is None else 100 * r['occupancy'], '5.0f')}% "
                     f"{num(None if r['achieved'] is None else 100 * r['achieved'], '4.0f')}% "
                     f"{num(r['predicted_us'], '12.2f')} {r['bound']:>7}")
    return "\n".join(lines)


# ---- the measured choice of kernel versions (--tune) ---------------------------------------------
def time_capped(fn, sync, repeat: int, slow_ms: float) -> float:
    """Like ``time_it``, but a call slower than ``slow_ms`` is timed once: a version that slow
    (the serial weight gradient of a 570 x 570 layer) loses anyway, and the GPU time is scarce."""
    time.sleep(SETTLE_S)
    fn()                      # warm-up: compiles the kernel file on its first launch
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = (time.perf_counter() - start) * 1e3
    if first > slow_ms or repeat <= 1:
        return first
    return time_it(fn, sync, repeat - 1, warmup=0)


def tune(device: str, base: int, tile: int, batch: int, repeat: int, precisions, slow_ms: float = SLOW_MS,
         table: dict | None = None, log=print, after_layer=None) -> dict:
    """Time every version of every knob (``choices.KNOBS``) on every layer shape of a U-Net with
    ``base`` channels on a ``tile`` input, in each of ``precisions``, and record the times and
    the fastest version per ``(knob, layer_key)`` in ``table`` (``choices.record``). A knob's
    time for a layer is the sum of the backend functions it changes (forward and backward for
    the 3x3 convolution's version: one choice serves both; the backward for the reduction);
    a version that fails is recorded with no time and its error. ``after_layer(table)`` runs after
    each layer (``tune_report`` saves there, so a run stopped by a time limit keeps what it measured)."""
    from . import ops
    from .backends import get_backend

    modules = {choices.op_name(op): op for op in ops.OPS}
    backend, sync = get_backend(device), device_sync(device)
    rng = np.random.default_rng(0)
    table = table if table is not None else choices.new_table(device, "", "")
    config = dict(in_channels=1, num_classes=2, base_channels=base, depth=4)   # UNet's defaults, as bench_step
    layers = list(dict.fromkeys(unet_layers(config, tile, batch)))
    for op_name, case in layers:
        op = modules[op_name]
        examples = {f: tuple(backend.xp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
                    for f, args in op.example(rng, case).items()}
        for precision in precisions:
            for knob_name, knob in versioned(device, op):
                ms, errors = {}, {}
                for version in knob.versions():
                    try:
                        with backend_settings(device, precision=precision, **{knob.attribute: version}):
                            ms[version] = sum(time_capped(lambda f=f: getattr(backend, f)(*examples[f]),
                                                          sync, repeat, slow_ms) for f in knob.functions(op))
                    except Exception as exc:   # a version may refuse a shape
                        ms[version], errors[version] = None, f"{type(exc).__name__}: {exc}"[:300]
                key = choices.layer_key(op_name, case, precision)
                entry = choices.record(table, knob_name, key, ms, errors)
                times = "  ".join(f"{v} {'failed' if t is None else f'{t:.3f}'}" for v, t in entry["ms"].items())
                log(f"{knob_name:<9} {key:<44} {times}  -> {entry['chosen'] or '- (fewer than two ran)'}")
        if after_layer is not None:
            after_layer(table)
    return table


def tune_report(args, device: str, gpu: str) -> int:
    """``--tune``: measure, print, and write (merge into) the choice table."""
    if device == "cpu":
        print("error: --tune times the kernel versions of cuda (or, for a dry run, emu); "
              "the cpu device has none: use --device cuda", file=sys.stderr)
        return 2
    output = args.tune_output or (choices.TABLE_PATH if device == "cuda" else None)
    if output is None:
        print("error: --tune on emu measures the emulator, never a choice for cuda: give --tune-output FILE",
              file=sys.stderr)
        return 2
    precisions = PRECISIONS if args.precision in (None, "both") else (args.precision,)
    source = (f"python -m minunet.bench --device {device} --tune --base-channels {args.base_channels} "
              f"--tile {args.tile} --batch {args.batch} --repeat {args.repeat} (wall time, median)")
    print(f"# kernel versions on {device} ({gpu or 'no GPU'}): U-Net base {args.base_channels}, tile "
          f"{args.tile}, batch {args.batch}, precisions {', '.join(precisions)}; ms per layer, fastest chosen")
    def save(table):
        choices.save_table(output, choices.merge_into(output, table))

    tune(device, args.base_channels, args.tile, args.batch, args.repeat, precisions, args.tune_slow_ms,
         choices.new_table(device, gpu, source), after_layer=save)
    print(f"wrote {output}")
    return 0


# ---- output ------------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    head = (f"{'op':<46} {'shape':<34} {'MFLOP':>9} {'MB':>7} {'ms':>8} {'GFLOP/s':>8} "
            f"{'GB/s':>6} {'torch ms':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r.extra:
            lines.append(f"{r.name:<46} {r.shape:<34} not run: {r.extra['error'][:120]}")
            continue
        tm = f"{r.torch_ms:9.2f}" if r.torch_ms else f"{'-':>9}"
        ra = f"{r.ratio:6.2f}" if r.ratio else f"{'-':>6}"
        lines.append(f"{r.name:<46} {r.shape:<34} {r.flops / 1e6:9.1f} {r.bytes / 1e6:7.1f} "
                     f"{r.ms:8.2f} {r.gflops:8.1f} {r.gbps:6.1f} {tm} {ra}")
    return "\n".join(lines)


def environment(device: str, twin: TorchTwin) -> dict:
    import os
    import platform

    info = {"device": device, "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception:
        pass
    if twin:
        info["torch"] = twin.torch.__version__
        info["torch_threads"] = twin.torch.get_num_threads()
    if device == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["cupy"] = cupy.__version__
    return info


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it is a flag's False or an unset None."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.bench", description=__doc__.split("\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--device", default="auto", help="where minunet runs: cpu, cuda, emu, or auto (cuda when "
                   "CuPy sees a GPU, else cpu)")
    p.add_argument("--base-channels", type=int, default=16, help="channels of the U-Net's first level "
                   "(64 in the paper)")
    p.add_argument("--tile", type=int, default=252, help="input tile side of the op rows and of --tune "
                   "(a valid U-Net size; 572 in the paper)")
    p.add_argument("--step-tiles", type=int, nargs="+", default=[252, 348],
                   help="input tiles of the training-step tables (348 is python -m minunet.train's default)")
    p.add_argument("--batch", type=int, default=1, help="images per op call and per training step")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each row (the median is shown), "
                   "after a warm-up run")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    p.add_argument("--no-step", action="store_true", help="skip the training-step tables")
    p.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch (it is skipped "
                   "anyway when not importable)")
    p.add_argument("--kernels", action="store_true",
                   help="instead of timing: each kernel's registers, shared memory and spills (nvcc "
                   "-Xptxas -v), then the emulator's counters for every op (coalescing, bank "
                   "conflicts, DRAM bytes, occupancy) with a PREDICTED time on --gpu; use a small "
                   "--base-channels and --tile (the emulator is slow)")
    p.add_argument("--gpu", default=None, choices=("sm_80", "sm_90", "h200"),
                   help="GPU model of --kernels (default sm_90) and --calibrate (default h200)")
    p.add_argument("--calibrate", metavar="FILE.csv", help="instead of timing: Nsight Compute's measured "
                   "times of one training step (ncu --csv) against the emulator's PREDICTED ones, per launch "
                   "(minunet/calibrate.py); give the step's --base-channels and --tile")
    p.add_argument("--precision", choices=(*PRECISIONS, "both"), default=None, help="minunet's kernels on "
                   "cuda/emu: 'tf32' (tensor cores where a kernel has them), 'fp32' (strict), or 'both' "
                   "(every table once per precision); default: $MINUNET_PRECISION or fp32, and both for "
                   "--tune. PyTorch on cuda runs in the same precision and, for the training step, in both")
    p.add_argument("--save", default="auto", metavar="FILE", help="also write everything printed to FILE; "
                   "'auto': bench/results/cuda_<gpu>.txt (under the current folder) on --device cuda, "
                   "nothing elsewhere; 'none': never")
    p.add_argument("--tune", action="store_true", help="instead of the tables: time every kernel version "
                   "(conv3x3 versions, weight-gradient reductions) on every layer shape of the U-Net of "
                   "--base-channels and --tile, in both precisions, and write the fastest per layer into "
                   "the choice table that device cuda follows (minunet/backends/cuda_choices.json)")
    p.add_argument("--tune-output", metavar="FILE", default=None, help="where --tune writes its table "
                   "(merged into the file when it holds a table of the same GPU); default: "
                   "minunet/backends/cuda_choices.json on cuda; required on emu (a dry run)")
    p.add_argument("--tune-slow-ms", type=float, default=SLOW_MS, help="--tune times a version slower than "
                   "this once instead of --repeat times")
    p.add_argument("--settle", type=float, default=None, metavar="SECONDS", help="quiet time before each "
                   f"timing, for the CPU's spinning worker threads to sleep (default: {SETTLE_S} on cpu/emu, "
                   "0 on cuda)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--graph", action="store_true", help="add a 'training step (graph replay)' row: the "
                   "step captured once and replayed (minunet.step_graph; cuda or emu, a batch copied in "
                   "and the loss read back each time)")
    return p


def kernels_report(args) -> int:
    """``--kernels``: ptxas's resource report, then the emulator's counters for every op."""
    from .backends import nvrtc_check

    try:
        UNet.output_size(args.tile)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = nvrtc_check.main(["--arch", "sm_90" if args.gpu == "h200" else args.gpu])   # the H200 is sm_90
    rows = profile_kernels(args.base_channels, args.tile, args.batch, args.gpu)
    print(f"\n## kernels on emu (shapes from a U-Net with base {args.base_channels} on a {args.tile} tile)")
    print(format_kernel_profile(rows, args.gpu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "report"} for r in rows], f, indent=2)
    return status


def gpu_file_name(gpu: str) -> str:
    """"NVIDIA H200" -> "cuda_nvidia_h200.txt": the --save file of a cuda run."""
    return "cuda_" + (re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") or "gpu") + ".txt"


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (for --save)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _settle(seconds: float | None, device: str):
    """``SETTLE_S`` set to ``seconds`` (default: unchanged, 0 on cuda) inside the block."""
    global SETTLE_S
    saved = SETTLE_S
    SETTLE_S = seconds if seconds is not None else (0.0 if device == "cuda" else saved)
    try:
        yield
    finally:
        SETTLE_S = saved


def summarize_ncu(path, top: int = 12) -> str:
    """Where one profiled training step's kernel time goes: per kernel name, the launches, the
    total time and its share, from an ``ncu --csv --metrics gpu__time_duration.sum`` file."""
    launches = choices.ncu_launches(path)
    total = sum(us for _, us in launches) or 1.0
    per: dict[str, list] = {}
    for name, us in launches:
        entry = per.setdefault(name.split("(")[0].split("<")[0][:60], [0, 0.0])
        entry[0] += 1
        entry[1] += us
    lines = [f"{len(launches)} launches, {total / 1e3:.2f} ms of kernel time ({path})",
             f"{'kernel':<60} {'launches':>8} {'ms':>9} {'share':>6}"]
    for name, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{name:<60} {count:8d} {us / 1e3:9.3f} {100 * us / total:5.1f}%")
    return "\n".join(lines)


# ---- a training iteration: batch preparation + step (issue 17) ----------------------------------
def bench_training_iteration(device: str, base: int, tile: int, batch: int, repeat: int) -> list[Row]:
    """Where a training iteration's time goes, as ``python -m minunet.train`` runs it on the
    built-in EM data (256 x 256 slices): the batch preparation alone (augmentation on the
    device, minunet.train.training_batch), one iteration with the batch prepared in the loop
    (``--prefetch 0``: preparation + step) and one with the batch prepared ahead by the
    background thread (``--prefetch 1``, the default). Median (mean for the overlapped loop)
    of ``repeat`` iterations after one untimed.

    Then the "host" rows: the same preparation, and a step on one fixed batch, timed until the
    call returns (the host's work: Python and launches; a GPU runs behind it) and until the
    device has finished too. On a GPU, a host time close to its host + device time means the
    host is the bottleneck, and a background thread cannot hide host work behind it (one
    Python interpreter): the H200 measured 5.0 ms of preparation and a 6.5 ms step but 14.3 ms
    per iteration (bench/results/training_iteration.md). On cpu and emu both are the same."""
    from .data.dataset import TileSampler, synthetic_samples
    from .train import Batches, training_batch

    model = UNet(base_channels=base, seed=0, device=device).train()
    out = UNet.output_size(tile, model.depth)
    sampler = TileSampler(synthetic_samples("em", 4, 256, seed=0), tile, out,
                          np.random.default_rng(0), device=device)
    opt = SGD(model.parameters(), lr=1e-6, momentum=0.99)
    sync = device_sync(device)

    def step(xs, targets, weights, wait: bool = True):
        x, target, weight = (Tensor(a, device=device) for a in (xs, targets, weights))
        F.weighted_cross_entropy(model(x), target, weight).backward()
        opt.step()
        opt.zero_grad()
        if wait:
            sync()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    def host_and_device(fn) -> tuple[float, float]:
        """(ms until ``fn`` returns, ms until the device has finished too): on a GPU the first is
        the host's share (Python, launches); when both are equal the host is the bottleneck."""
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3

    def medians(pairs) -> tuple[float, float]:
        pairs = list(pairs)
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)

    time.sleep(SETTLE_S)
    step(*training_batch(sampler, batch))    # warm-up: compiles, caches the slices' coefficients
    prep_host, prep = medians(host_and_device(lambda: training_batch(sampler, batch)) for _ in range(repeat))
    fixed = training_batch(sampler, batch)
    step_host, step_total = medians(host_and_device(lambda: step(*fixed, wait=False)) for _ in range(repeat))
    serial = statistics.median(timed(lambda: step(*training_batch(sampler, batch)))
                               for _ in range(repeat))
    batches = Batches(sampler, batch, ahead=1, device=device)
    try:
        batches.next()
        overlapped = timed(lambda: [step(*batches.next()[0]) for _ in range(repeat)]) / repeat
    finally:
        batches.close()
    what = f"base {base}, tile {tile}"
    rows = [Row("batch preparation", f"{batch}x1x{tile}^2", 0.0, 0.0, prep),
            Row("training iteration", f"{what}, prefetch 0", 0.0, 0.0, serial),
            Row("training iteration", f"{what}, prefetch 1", 0.0, 0.0, overlapped),
            Row("  host: batch preparation", f"{batch}x1x{tile}^2", 0.0, 0.0, prep_host),
            Row("  host: training step", what, 0.0, 0.0, step_host),
            Row("  host + device: training step", what, 0.0, 0.0, step_total)]
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "python -m minunet.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.precision in PRECISIONS:
        set_precision(args.precision)
    if args.calibrate:
        from .calibrate import main as calibrate
        return calibrate(args.calibrate, args.base_channels, args.tile, args.gpu or "h200")
    args.gpu = args.gpu or "sm_90"
    if args.kernels:
        return kernels_report(args)
    try:
        device = resolve_device(args.device)
        for tile in [args.tile, *args.step_tiles]:
            UNet.output_size(tile)
        if args.base_channels < 1 or args.batch < 1 or args.repeat < 1:
            raise ValueError("--base-channels, --batch and --repeat must be positive")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.tune:
        with _settle(args.settle, device):
            return tune_report(args, device, environment(device, TorchTwin(device, enabled=False)).get("gpu", ""))
    twin = TorchTwin(device, enabled=not args.no_torch)
    env = environment(device, twin)
    save = None if args.save == "none" else args.save
    if save == "auto":
        save = Path("bench", "results", gpu_file_name(env["gpu"])) if device == "cuda" else None
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee), _settle(args.settle, device):
            results = run_tables(args, device, twin, env)
    finally:   # what was measured before a failure is saved too
        if save is not None:
            Path(save).parent.mkdir(parents=True, exist_ok=True)
            Path(save).write_text(tee.copy.getvalue())
            print(f"wrote {save}")
    if args.json:
        def as_dicts(rows):
            return [dict(asdict(r), ms=None if math.isnan(r.ms) else r.ms, gflops=r.gflops, gbps=r.gbps,
                         ratio=None if r.ratio is None or math.isnan(r.ratio) else r.ratio) for r in rows]

        with open(args.json, "w") as f:
            json.dump({"env": env, "ops": as_dicts(results["ops"]),
                       "steps": {k: as_dicts(v) for k, v in results["steps"].items()},
                       "iterations": {k: as_dicts(v) for k, v in results.get("iterations", {}).items()}},
                      f, indent=2)
    return 0


def precisions_of(args, device: str) -> list:
    """minunet's precisions to run: [None] on cpu (float32, no knob), both for --precision both,
    else the one given or the backend's default."""
    if device == "cpu":
        return [None]
    if args.precision == "both":
        return list(PRECISIONS)
    from .backends import get_backend

    return [args.precision or get_backend(device).precision]


def run_tables(args, device: str, twin: TorchTwin, env: dict) -> dict:
    """The op table and the training-step tables, printed; returns their rows."""
    print(f"$ {args.command}".rstrip())
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("# minunet benchmark:", ", ".join(f"{k}={v}" for k, v in env.items()))
    precisions = precisions_of(args, device)
    results = {"env": env, "ops": [], "steps": {}}
    for precision in ([] if args.no_ops else precisions):
        rows = bench_ops(device, args.base_channels, args.tile, args.batch, args.repeat, twin, precision)
        for row in rows:
            row.extra["precision"] = precision or "fp32"
        print(f"\n## ops (shapes from a U-Net with base {args.base_channels} on a {args.tile} tile, "
              f"batch {args.batch}; median of {args.repeat}; minunet {precision or 'float32'}"
              f"{'; torch: ' + twin.label(precision) if twin else ''})")
        print(format_table(rows))
        results["ops"] += rows
    for tile in ([] if args.no_step else args.step_tiles):
        steps = {}
        for precision in precisions:
            rows = bench_step(device, args.base_channels, tile, args.batch, args.repeat, twin, precision)
            if args.graph and device != "cpu":   # the same step captured once, then replayed (minunet.step_graph)
                with backend_settings(device, precision=precision):
                    ms = graph_replay_ms(device, args.base_channels, tile, args.batch, args.repeat)
                rows.append(Row("training step (graph replay)", f"base {args.base_channels}, tile {tile}",
                                rows[-1].flops, 0.0, ms, extra={"precision": precision or "fp32"}))
            print(f"\n## training step (U-Net base {args.base_channels}, tile {tile}, batch {args.batch}; "
                  f"median of {args.repeat}; minunet {precision or 'float32'}"
                  f"{'; torch: ' + twin.label(precision) if twin else ''})")
            print(format_table(rows))
            diff = rows[0].extra.get("max_abs_diff_logits_vs_torch")
            if diff is not None:
                print(f"logits vs PyTorch ({twin.label('fp32')}) with the same weights (eval mode): "
                      f"max |diff| = {diff:.3g}")
            steps[precision] = rows
            results["steps"][str(tile) if len(precisions) == 1 else f"{tile} {precision}"] = rows
        if twin:
            print(f"\n## training step vs PyTorch (base {args.base_channels}, tile {tile}, batch {args.batch})")
            print(format_step_summary(steps))
        iteration = bench_training_iteration(device, args.base_channels, tile, args.batch, args.repeat)
        print("\n## training iteration (batch preparation + step, as minunet.train runs it)")
        print(format_table(iteration))
        results.setdefault("iterations", {})[str(tile)] = iteration
    return results


if __name__ == "__main__":
    sys.exit(main())
