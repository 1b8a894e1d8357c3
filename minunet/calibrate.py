"""Hold the emulator's PREDICTED kernel times against the times Nsight Compute MEASURED on a GPU.

    python -m minunet.bench --calibrate ncu_small.csv --base-channels 8 --tile 188 --gpu h200

reads an Nsight Compute CSV of one training step (``ncu --csv --metrics gpu__time_duration.sum,...``
as ``bench/results/h200-2026-12-04/ncu_steps.py`` drove it: one row per launch and metric), runs
the same network's training step on ``emu`` under ``minunet.emulator.profile`` with the kernel
versions the file names (3x3 convolution naive, tiled, igemm or wmma, weight gradients tree,
serial or gemm, launch by launch; the up-convolution's version and the precision), matches the launches in order, and prints per launch: kernel, grid, measured us,
predicted us, ratio (predicted / measured) and the model's binding term; then one line

    calibration: step measured 2285.1 us, predicted 1990.0 us (ratio 0.87); 193 launches, median ratio 1.21, within 2x 84%

where the median ratio is the median of max(r, 1/r) over launches. Launches of CuPy's own kernels
(``cupy_*``, ``cub::...``: the loss's reductions and fills) are not emulated; the model predicts
them from their grid as one global load and one store per thread, and their rows are marked
``lib``. Nothing here is fitted to the file: the model's constants are ``gpu_model.GPUS``'.
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TIME_METRIC = "gpu__time_duration.sum"
TIME_UNITS = {"ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3,
              "s": 1.0, "second": 1.0}
CONV3X3_CHOICES = ("conv3x3_forward_", "conv3x3_grad_input_")   # + "naive" / "tiled"
REDUCTION_KERNELS = ("conv3x3_grad_weight", "conv_transpose2x2_grad_weight", "conv1x1_grad_weight")


@dataclass
class MeasuredLaunch:
    """One launch of the CSV: Nsight Compute's ID, kernel name, block and grid, time, all metrics."""

    id: int
    kernel: str
    block: tuple
    grid: tuple
    seconds: float
    metrics: dict = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        """``cub::DeviceReduceKernel`` for a templated library kernel's long signature."""
        name = self.kernel
        if name.startswith("void "):
            name = name[5:]
        return name.split("<")[0].split("(")[0]


def _dims(text: str) -> tuple:
    return tuple(int(v) for v in text.strip("() ").split(","))


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def read_ncu_csv(path) -> list[MeasuredLaunch]:
    """The launches of an Nsight Compute ``--csv`` file, in ID order (lines before the header,
    such as the command line and ``==PROF==`` notes, are skipped). ValueError when the file has no
    header or no ``gpu__time_duration.sum`` for a launch."""
    text = Path(path).read_text()
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no Nsight Compute CSV header (a line starting with \"ID\"); "
                         "make it with `ncu --csv --metrics gpu__time_duration.sum ...`")
    rows = csv.DictReader(io.StringIO("\n".join(line for line in lines[start:] if line.startswith('"'))))
    launches: dict[int, MeasuredLaunch] = {}
    for row in rows:
        i = int(row["ID"])
        launch = launches.get(i)
        if launch is None:
            launch = launches[i] = MeasuredLaunch(i, row["Kernel Name"], _dims(row["Block Size"]),
                                                  _dims(row["Grid Size"]), math.nan)
        value = _number(row["Metric Value"])
        launch.metrics[row["Metric Name"]] = value
        if row["Metric Name"] == TIME_METRIC:
            unit = row["Metric Unit"].strip().lower()
            if unit not in TIME_UNITS:
                raise ValueError(f"{path}: launch {i}: unknown time unit {row['Metric Unit']!r}")
            launch.seconds = value * TIME_UNITS[unit]
    missing = [i for i, launch in launches.items() if math.isnan(launch.seconds)]
    if not launches or missing:
        raise ValueError(f"{path}: {'no launches' if not launches else f'launch {missing[0]} has no {TIME_METRIC}'}; "
                         f"profile with `ncu --csv --metrics {TIME_METRIC}`")
    return [launches[i] for i in sorted(launches)]


# ---- the same step on the emulator, with the file's kernel versions ------------------------------
@dataclass
class Versions:
    """What a measured step ran, read from its kernel names, launch by launch: each 3x3
    convolution launch's version (forward and input gradient in launch order: "naive", "tiled",
    "igemm", "wmma", "wmma_big"), each weight gradient's ("tree", "serial", "gemm", "gemm_large"), the up-convolution's
    (one knob for the step), the precision, whether the network's input got a gradient (the
    code before 2026-12-04 computed one; now the first layer launches no input gradient) and
    whether SGD was one launch (now) or one per parameter (before)."""
    conv3x3: list
    weight_gradient: list
    conv_transpose2x2: str
    precision: str
    input_gradient: bool
    fused_sgd: bool = True    # one sgd_momentum launch for all parameters (the code before: one each)


def conv3x3_version_of(kernel: str) -> str | None:
    """The conv3x3 version a launch of ``kernel`` decides, or None for any other kernel (the
    implicit GEMM's helpers, conv3x3_gemm_weights and conv3x3_sum_splits, decide nothing)."""
    for prefix in CONV3X3_CHOICES:
        if kernel.startswith(prefix):
            return kernel.removeprefix(prefix)          # "naive" / "tiled"
    from .ops.conv3x3 import GEMM_VERSIONS

    # longest name first: conv3x3_wmma_big_... is v5 "wmma_big", not v4 "wmma"
    for version in sorted(GEMM_VERSIONS, key=len, reverse=True):
        if kernel.startswith(f"conv3x3_{version}"):
            return version
    return None


# <op>_grad_weight[_serial | _gemm | _gemm_<tile>][_tf32]: the tile-named GEMMs are "gemm_large"
_WEIGHT_GRADIENT = re.compile(r"(?P<op>\w+?_grad_weight)(?:_(?P<kind>serial|gemm(?:_\d+x\d+)?))?(?:_tf32)?")


def weight_gradient_version_of(kernel: str) -> str | None:
    """The weight-gradient version ("tree", "serial", "gemm", "gemm_large") a launch of
    ``kernel`` ran, or None for any other kernel (``*_has_tf32`` included)."""
    match = _WEIGHT_GRADIENT.fullmatch(kernel)
    if match is None or match["op"] not in REDUCTION_KERNELS:
        return None
    kind = match["kind"] or "tree"
    return "gemm_large" if kind.startswith("gemm_") else kind


def kernel_choices(measured: list[MeasuredLaunch], layers: int) -> Versions:
    """The ``Versions`` of a measured step of a U-Net with ``layers`` 3x3 convolutions."""
    conv3x3 = [v for v in (conv3x3_version_of(m.kernel) for m in measured) if v is not None]
    weight_gradient = [v for v in (weight_gradient_version_of(m.kernel) for m in measured) if v is not None]
    names = {m.kernel for m in measured}
    up_gemm = any(n.startswith("conv_transpose2x2_forward_gemm") for n in names)
    tf32 = any(n.endswith("_tf32") or n.startswith("conv3x3_wmma") for n in names)
    sgd_launches = sum(m.kernel == "sgd_momentum" for m in measured)
    return Versions(conv3x3, weight_gradient, "gemm" if up_gemm else "naive",
                    "tf32" if tf32 else "fp32", input_gradient=len(conv3x3) >= 2 * layers,
                    fused_sgd=sgd_launches <= 1)


@contextmanager
def forced_choices(backend, versions: Versions):
    """Make ``backend`` run the measured versions, one per launch in order (its own choice when
    a list runs out): ``ops.conv3x3.conv3x3_version`` and ``backend.weight_gradient_version`` are
    replaced, and the up-convolution's knob and the precision set, for the ``with``."""
    from .ops import conv3x3

    conv_left, grad_left = iter(versions.conv3x3), iter(versions.weight_gradient)
    own_version, own_gradient = conv3x3.conv3x3_version, backend.weight_gradient_version
    saved = backend.conv_transpose2x2_version, backend.precision

    def conv3x3_version(k, case, grad_input=False):
        choice = next(conv_left, None) if k is backend else None
        return own_version(k, case, grad_input) if choice is None else choice

    def weight_gradient_version(outputs, terms):
        return next(grad_left, None) or own_gradient(outputs, terms)

    conv3x3.conv3x3_version = conv3x3_version
    backend.weight_gradient_version = weight_gradient_version
    backend.conv_transpose2x2_version, backend.precision = versions.conv_transpose2x2, versions.precision
    try:
        yield
    finally:
        conv3x3.conv3x3_version = own_version
        del backend.weight_gradient_version
        backend.conv_transpose2x2_version, backend.precision = saved


def emulate_step(base: int, tile: int, gpu: str, versions: Versions, sample_blocks: int = 2):
    """One training step (forward, weighted cross-entropy, backward, SGD with momentum) of
    ``UNet(base)`` on a ``tile`` input on ``emu``, as ncu_steps.py ran it on the GPU, under
    ``emulator.profile``; returns the report (its ``launches`` in order)."""
    from . import UNet, Tensor, emulator
    from . import functional as F
    from .backends import get_backend
    from .optim import SGD

    model = UNet(base_channels=base, device="emu")
    out = UNet.output_size(tile)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((1, 1, tile, tile)).astype(np.float32), device="emu",
               requires_grad=versions.input_gradient)
    target = Tensor(rng.integers(0, 2, (1, out, out)), device="emu")
    weight = Tensor(rng.uniform(1, 10, (1, out, out)).astype(np.float32), device="emu")
    opt = SGD(model.parameters(), lr=1e-4, momentum=0.99, fused=versions.fused_sgd)
    with forced_choices(get_backend("emu"), versions):
        with emulator.profile(gpu=gpu, sample_blocks=sample_blocks) as report:
            loss = F.weighted_cross_entropy(model(x), target, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return report


# ---- matching and the table ------------------------------------------------------------------------
@dataclass
class Row:
    measured: MeasuredLaunch
    predicted_seconds: float
    bound: str
    emulated: bool
    grid_matches: bool = True

    @property
    def ratio(self) -> float:
        return self.predicted_seconds / self.measured.seconds


def library_prediction(g, m: MeasuredLaunch):
    """A launch the emulator did not run (CuPy's own kernels): one global load and one store per
    thread of its grid, 4 bytes each."""
    from .emulator import gpu_model

    threads, blocks = math.prod(m.block), math.prod(m.grid)
    counts = gpu_model.LaunchCounts(blocks=blocks, threads_per_block=threads, thread_global_loads=1,
                                    thread_global_stores=1,
                                    global_lines=2 * blocks * math.ceil(threads / 32),
                                    global_load_requests=blocks * math.ceil(threads / 32),
                                    global_store_requests=blocks * math.ceil(threads / 32),
                                    global_load_sectors=blocks * threads / 8, global_store_sectors=blocks * threads / 8,
                                    dram_read_bytes=4 * blocks * threads, dram_write_bytes=4 * blocks * threads)
    return gpu_model.predict_launch(g, counts)


def match(measured: list[MeasuredLaunch], report) -> list[Row]:
    """Pair each measured launch with the next emulated launch of the same kernel, in order; the
    measured launches of kernels the emulator never ran get ``library_prediction``."""
    emulated_names = {launch.kernel for launch in report.launches}
    queue = list(report.launches)
    at = 0
    rows = []
    for m in measured:
        if m.kernel in emulated_names:
            while at < len(queue) and queue[at].kernel != m.kernel:
                at += 1
            if at == len(queue):
                raise ValueError(f"launch {m.id} ({m.kernel}): the emulated step has no more launches of it; "
                                 "is this the network of --base-channels and --tile?")
            launch = queue[at]
            at += 1
            rows.append(Row(m, launch.prediction.seconds, launch.prediction.bound, True,
                            tuple(launch.grid) == tuple(m.grid)))
        else:
            p = library_prediction(report.gpu, m)
            rows.append(Row(m, p.seconds, p.bound, False))
    return rows


@dataclass(frozen=True)
class Summary:
    measured_seconds: float
    predicted_seconds: float
    launches: int
    median_ratio: float       # median of max(r, 1/r)
    within_2x: float          # share of launches with 1/2 <= r <= 2

    @property
    def ratio(self) -> float:
        return self.predicted_seconds / self.measured_seconds

    def line(self) -> str:
        return (f"calibration: step measured {self.measured_seconds * 1e6:.1f} us, predicted "
                f"{self.predicted_seconds * 1e6:.1f} us (ratio {self.ratio:.2f}); {self.launches} launches, "
                f"median ratio {self.median_ratio:.2f}, within 2x {100 * self.within_2x:.0f}%")


def summarize(rows: list[Row]) -> Summary:
    errors = [max(r.ratio, 1 / r.ratio) for r in rows]
    return Summary(sum(r.measured.seconds for r in rows), sum(r.predicted_seconds for r in rows), len(rows),
                   statistics.median(errors), sum(e <= 2 for e in errors) / len(errors))


def format_rows(rows: list[Row]) -> str:
    width = max([24] + [len(r.measured.short_name) for r in rows])
    head = (f"{'id':>4} {'kernel':<{width}} {'grid':<14} {'measured us':>11} {'predicted us':>12} {'ratio':>6} "
            f"{'bound':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        grid = "x".join(str(v) for v in r.measured.grid)
        note = "" if r.emulated else "  lib"
        if not r.grid_matches:
            note += "  (emulated grid differs)"
        lines.append(f"{r.measured.id:>4} {r.measured.short_name:<{width}} {grid:<14} "
                     f"{r.measured.seconds * 1e6:>11.1f} "
                     f"{r.predicted_seconds * 1e6:>12.1f} {r.ratio:>6.2f} {r.bound:>7}{note}")
    return "\n".join(lines)


def by_kernel(rows: list[Row]) -> str:
    """Per kernel: launches, measured and predicted totals, their ratio."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.measured.short_name, []).append(r)
    width = max(24, *(len(k) for k in groups))
    head = f"{'kernel':<{width}} {'launches':>8} {'measured us':>11} {'predicted us':>12} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for name, group in sorted(groups.items(), key=lambda kv: -sum(r.measured.seconds for r in kv[1])):
        measured, predicted = sum(r.measured.seconds for r in group), sum(r.predicted_seconds for r in group)
        lines.append(f"{name:<{width}} {len(group):>8} {measured * 1e6:>11.1f} {predicted * 1e6:>12.1f} "
                     f"{predicted / measured:>6.2f}")
    return "\n".join(lines)


VERSIONED_OPS = {"conv3x3_forward_": "conv3x3 forward", "conv3x3_grad_input_": "conv3x3 input gradient",
                 "conv3x3_grad_weight": "conv3x3 weight gradient",
                 "conv_transpose2x2_grad_weight": "conv_transpose2x2 weight gradient",
                 "conv1x1_grad_weight": "conv1x1 weight gradient"}


def _op_of(kernel: str) -> str | None:
    return next((op for prefix, op in VERSIONED_OPS.items() if kernel.startswith(prefix)), None)


def version_pairs(a: list[Row], b: list[Row]) -> list[tuple[str, Row, Row]]:
    """The launches of two calibrations of the same network that ran two versions of one op on the
    same layer: the k-th launch of an op (3x3 forward, input or weight gradient, ...) in ``a``
    with the k-th in ``b``, where their kernels differ."""
    def by_op(rows):
        found: dict[str, list[Row]] = {}
        for r in rows:
            op = _op_of(r.measured.kernel)
            if op:
                found.setdefault(op, []).append(r)
        return found

    ops_a, ops_b = by_op(a), by_op(b)
    return [(op, x, y) for op in ops_a for x, y in zip(ops_a[op], ops_b.get(op, []))
            if x.measured.kernel != y.measured.kernel]


def format_version_pairs(pairs) -> str:
    """Per pair: both kernels' measured and predicted times, and whether the model orders them as
    the GPU did; then how many it orders correctly."""
    lines = [f"{'op':<34} {'version A':<36} {'version B':<36} {'meas. A us':>10} {'meas. B us':>10} "
             f"{'pred. A us':>10} {'pred. B us':>10} {'order':>6}"]
    lines.append("-" * len(lines[0]))
    right = apart = right_apart = 0
    for op, x, y in pairs:
        ok = (x.measured.seconds < y.measured.seconds) == (x.predicted_seconds < y.predicted_seconds)
        far = max(x.measured.seconds, y.measured.seconds) > 1.1 * min(x.measured.seconds, y.measured.seconds)
        right, apart, right_apart = right + ok, apart + far, right_apart + (ok and far)
        lines.append(f"{op:<34} {x.measured.kernel:<36} {y.measured.kernel:<36} {x.measured.seconds * 1e6:>10.1f} "
                     f"{y.measured.seconds * 1e6:>10.1f} {x.predicted_seconds * 1e6:>10.1f} "
                     f"{y.predicted_seconds * 1e6:>10.1f} {'right' if ok else 'WRONG':>6}")
    lines.append(f"versions ordered as measured: {right} of {len(pairs)}; of the pairs measured more than 10% apart: "
                 f"{right_apart} of {apart}")
    return "\n".join(lines)


def calibrate(path, base: int, tile: int, gpu: str = "h200", sample_blocks: int = 2) -> tuple[list[Row], Summary]:
    """Read ``path``, emulate the step with its kernel versions, match and summarize."""
    from . import UNet
    from .bench import unet_layers
    from .emulator import gpu_model

    gpu_model.gpu(gpu)
    UNet.output_size(tile)
    if base < 1:
        raise ValueError(f"--base-channels must be positive, got {base}")
    measured = read_ncu_csv(path)
    layers = sum(1 for op, _ in unet_layers(dict(in_channels=1, num_classes=2, base_channels=base,
                                                  depth=4), tile, 1) if op == "conv3x3")
    report = emulate_step(base, tile, gpu, kernel_choices(measured, layers), sample_blocks)
    rows = match(measured, report)
    return rows, summarize(rows)


def compare_versions(path_a, path_b, base: int, tile: int, gpu: str = "h200") -> str:
    """Two Nsight Compute files of the same network run with different kernel versions (say
    MINUNET_CONV3X3=naive MINUNET_REDUCTION=tree, then tiled and serial): each calibrated, then
    ``format_version_pairs`` of their layers. ``python -c "from minunet import calibrate;
    print(calibrate.compare_versions('a.csv', 'b.csv', 8, 188))"``."""
    rows_a, _ = calibrate(path_a, base, tile, gpu)
    rows_b, _ = calibrate(path_b, base, tile, gpu)
    return format_version_pairs(version_pairs(rows_a, rows_b))


def main(path, base: int, tile: int, gpu: str = "h200") -> int:
    """The CLI of ``python -m minunet.bench --calibrate``: the table, then the calibration line."""
    import sys

    from .emulator import gpu_model

    try:
        rows, summary = calibrate(path, base, tile, gpu)
    except (OSError, ValueError, StopIteration) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    g = gpu_model.gpu(gpu)
    print(f"# {Path(path).name}: Nsight Compute's MEASURED time per launch against the emulator's PREDICTED "
          f"time on {g.name} ({g.arch}, {g.clock_hz / 1e9:.2f} GHz base clock), U-Net base {base}, tile {tile}")
    print("# ratio = predicted / measured; bound = the model's binding term; lib = a CuPy library kernel "
          "the emulator does not run (predicted as one load and one store per thread)")
    print(format_rows(rows))
    print()
    print(by_kernel(rows))
    print()
    print(summary.line())
    return 0
