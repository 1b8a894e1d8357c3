"""Count what makes a kernel fast, without a GPU: ``profile`` and ``format_profile``.

    from minunet import emulator
    with emulator.profile(gpu="sm_90", sample_blocks=8, flops={"conv3x3_forward_tiled": 2.1e9}) as report:
        ...                                   # launches on device="emu" (any mode)
    print(emulator.format_profile(report))   # one row per kernel, PREDICTED times

Inside the ``with``, every emulated launch runs in the checked build with counting on (see
emu_profile.h): global-memory requests and 32-byte sectors per request (coalescing), shared-
memory wavefronts per request (bank conflicts; broadcasts count once), on a sample of about
``sample_blocks`` blocks per launch, scaled up to the whole grid; the distinct sectors each
launch reads and writes over all blocks (the DRAM traffic it cannot avoid); tensor-core FLOPs of
``wmma::mma_sync``; the busiest thread's loads and stores (its critical path) and how many of its
global loads hit L1. Each launch is kept (``report.launches``, in order). When the report closes,
each kernel gets ptxas's registers and shared memory (``nvcc --resource-usage``, if installed),
its theoretical occupancy on ``gpu``, and each launch a time, its binding term and an achieved
occupancy from ``gpu_model.predict_launch``: all *predicted* by a model from the counts, never
measured. How far the model is from a real GPU is measured in bench/results/calibration_*.txt
(``python -m minunet.bench --calibrate``).

``flops`` (optional) is what the caller knows and the emulator cannot see: FLOPs per launch per
kernel name (a dict), or one number for everything launched inside (then only the total row gets
a compute bound). ``report.set_flops(kernel, flops_per_launch)`` does the same later.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from dataclasses import dataclass, field

from . import gpu_model as occ

_active: list["ProfileReport"] = []

COUNTERS = ("global_load_requests", "global_load_sectors", "global_load_bytes", "global_store_requests",
            "global_store_sectors", "global_store_bytes", "shared_load_requests", "shared_load_wavefronts",
            "shared_load_bytes", "shared_store_requests", "shared_store_wavefronts", "shared_store_bytes")


def active() -> "ProfileReport | None":
    """The innermost open ``profile`` report, if any (launcher.py asks before each launch)."""
    return _active[-1] if _active else None


@dataclass
class LaunchProfile:
    """One launch, in the order made: its kernel, grid and counts (scaled to the whole grid), and
    what the model predicts for it."""

    kernel: str
    module: str
    grid: tuple
    block: tuple
    counts: occ.LaunchCounts
    prediction: occ.Prediction | None = None

    @property
    def predicted_seconds(self) -> float | None:
        return None if self.prediction is None else self.prediction.seconds


@dataclass
class KernelProfile:
    """One kernel's counts, summed over its launches in the report (sampled counts scaled to
    whole grids), and what the model predicts from them."""

    kernel: str
    module: str
    launches: int = 0
    blocks: int = 0                 # summed over launches
    threads_per_block: int = 0      # of the last launch
    dynamic_shared_bytes: int = 0   # of the last launch
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))
    dram_read_bytes: int = 0
    dram_write_bytes: int = 0
    tensor_flops: int = 0
    flops: float | None = None      # per launch, from the caller
    resources: occ.Resources | None = None
    occupancy: occ.Occupancy | None = None
    predicted_seconds: float | None = None   # summed over its launches
    bound: str = ""                           # the binding term of its longest launch
    achieved_occupancy: float | None = None   # predicted, of its longest launch
    _source: tuple = ()

    def per_request(self, what: str, kind: str) -> float | None:
        requests = self.counts[f"{what}_requests"]
        return self.counts[f"{what}_{kind}"] / requests if requests else None

    @property
    def sectors_per_load(self) -> float | None:
        return self.per_request("global_load", "sectors")

    @property
    def sectors_per_store(self) -> float | None:
        return self.per_request("global_store", "sectors")

    @property
    def wavefronts_per_shared_load(self) -> float | None:
        return self.per_request("shared_load", "wavefronts")

    @property
    def wavefronts_per_shared_store(self) -> float | None:
        return self.per_request("shared_store", "wavefronts")

    @property
    def bank_conflicts(self) -> float:
        """Wavefronts beyond one per shared-memory request (extra passes through the banks)."""
        c = self.counts
        return (c["shared_load_wavefronts"] - c["shared_load_requests"]
                + c["shared_store_wavefronts"] - c["shared_store_requests"])

    @property
    def dram_bytes(self) -> int:
        return self.dram_read_bytes + self.dram_write_bytes

    @property
    def total_flops(self) -> float:
        return max(self.flops * self.launches if self.flops is not None else 0.0, float(self.tensor_flops))


@dataclass
class ProfileReport:
    gpu: occ.GPU
    sample_blocks: int
    racecheck: bool
    flops: dict | float | None = None
    kernels: dict = field(default_factory=dict)   # (module, kernel) -> KernelProfile
    launches: list = field(default_factory=list)  # LaunchProfile, in launch order
    closed: bool = False

    def add_launch(self, fn, grid, block, shared_mem: int, counts) -> None:
        key = (fn.module.name, fn.name)
        row = self.kernels.get(key)
        if row is None:
            row = self.kernels[key] = KernelProfile(fn.name, fn.module.name,
                                                    _source=(fn.module.code, fn.module.name, fn.module.options))
        blocks = grid[0] * grid[1] * grid[2]
        scale = blocks / counts.sampled_blocks if counts.sampled_blocks else 0.0
        for name in COUNTERS:
            row.counts[name] += getattr(counts, name) * scale
        row.launches += 1
        row.blocks += blocks
        row.threads_per_block = block[0] * block[1] * block[2]
        row.dynamic_shared_bytes = shared_mem
        row.dram_read_bytes += 32 * counts.dram_read_sectors
        row.dram_write_bytes += 32 * counts.dram_write_sectors
        row.tensor_flops += counts.tensor_flops
        lanes = counts.busy_l1_hits + counts.busy_l1_misses
        self.launches.append(LaunchProfile(fn.name, fn.module.name, tuple(grid), tuple(block), occ.LaunchCounts(
            blocks=blocks, threads_per_block=row.threads_per_block,
            thread_global_loads=counts.thread_global_loads, thread_global_stores=counts.thread_global_stores,
            thread_shared_loads=counts.thread_shared_loads, thread_shared_stores=counts.thread_shared_stores,
            l1_hit_fraction=counts.busy_l1_hits / lanes if lanes else 0.0,
            global_lines=counts.global_lines * scale,
            global_load_requests=counts.global_load_requests * scale,
            global_load_sectors=counts.global_load_sectors * scale,
            global_store_requests=counts.global_store_requests * scale,
            global_store_sectors=counts.global_store_sectors * scale,
            shared_requests=(counts.shared_load_requests + counts.shared_store_requests) * scale,
            shared_wavefronts=(counts.shared_load_wavefronts + counts.shared_store_wavefronts) * scale,
            dram_read_bytes=32 * counts.dram_read_sectors, dram_write_bytes=32 * counts.dram_write_sectors,
            tensor_flops=float(counts.tensor_flops))))

    def set_flops(self, kernel: str, flops_per_launch: float) -> None:
        """FLOPs of one launch of ``kernel`` (every module), for the compute side of the roofline."""
        for row in self.kernels.values():
            if row.kernel == kernel:
                row.flops = float(flops_per_launch)
        if self.closed:
            self._predict()

    @property
    def rows(self) -> list[KernelProfile]:
        return list(self.kernels.values())

    @property
    def total_predicted_seconds(self) -> float | None:
        """The rows' predicted times added up (launches run one after another); with one total
        ``flops`` number for the report, at least that many FLOPs at the FP32 peak."""
        times = [r.predicted_seconds for r in self.rows]
        if not times or any(t is None for t in times):
            return None
        total = sum(times)
        if isinstance(self.flops, (int, float)) and not isinstance(self.flops, bool):
            total = max(total, float(self.flops) / self.gpu.fp32_flops)
        return total

    def _close(self) -> None:
        self.closed = True
        if isinstance(self.flops, dict):
            for kernel, value in self.flops.items():
                self.set_flops(kernel, value)
        resources: dict[tuple, dict | None] = {}
        for row in self.rows:
            if row._source not in resources:
                code, name, options = row._source
                resources[row._source] = occ.kernel_resources(code, name, options, self.gpu.arch)
            found = resources[row._source]
            row.resources = found.get(row.kernel) if found else None
            if row.resources is not None:
                row.occupancy = occ.occupancy(self.gpu, row.threads_per_block, row.resources.registers,
                                              row.resources.shared_bytes + row.dynamic_shared_bytes)
        self._predict()

    def _predict(self) -> None:
        """Each launch's prediction (gpu_model.predict_launch); a kernel's row adds its launches'."""
        for row in self.rows:
            row.predicted_seconds, row.bound, row.achieved_occupancy = 0.0, "", None
        longest: dict = {}
        for launch in self.launches:
            row = self.kernels[(launch.module, launch.kernel)]
            launch.counts.occupancy = row.occupancy
            if row.flops is not None:   # the caller's FLOPs, less those the tensor cores did
                launch.counts.flops = max(row.flops - launch.counts.tensor_flops, 0.0)
            launch.prediction = occ.predict_launch(self.gpu, launch.counts)
            row.predicted_seconds += launch.prediction.seconds
            if launch.prediction.seconds > longest.get(id(row), -1.0):
                longest[id(row)] = launch.prediction.seconds
                row.bound, row.achieved_occupancy = launch.prediction.bound, launch.prediction.achieved_occupancy


@contextlib.contextmanager
def profile(gpu: str = "sm_90", sample_blocks: int = 8, flops: dict | float | None = None, racecheck: bool = False):
    """Count the emulated launches made inside the ``with`` block; yields a ``ProfileReport``.

    gpu: "sm_80" (A100), "sm_90" (H100) or "h200" for occupancy and the predicted times.
    sample_blocks: about how many blocks per launch have their requests traced (the counts are
        scaled to the whole grid); the DRAM sectors are counted over every block.
    flops: FLOPs per launch by kernel name, or one total for everything inside.
    racecheck: also run the race checker during these launches (off: counting only)."""
    g = occ.gpu(gpu)
    if isinstance(sample_blocks, bool) or not isinstance(sample_blocks, int) or sample_blocks < 1:
        raise ValueError(f"sample_blocks must be a positive int, got {sample_blocks!r}")
    report = ProfileReport(g, sample_blocks, racecheck, flops)
    _active.append(report)
    try:
        yield report
    finally:
        _active.remove(report)
        report._close()


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def calibration_lines() -> list[str]:
    """The last lines of the committed calibrations (bench/results/calibration_*.txt: the model's
    error MEASURED against Nsight Compute on a real GPU), when this is a source checkout."""
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    lines = []
    for path in sorted(results.glob("calibration_*.txt")) if results.is_dir() else []:
        last = [line for line in path.read_text().splitlines() if line.startswith("calibration:")]
        if last:
            lines.append(f"  {path.name}: {last[-1][len('calibration: '):]}")
    return lines


def format_profile(report: ProfileReport) -> str:
    """The report as a text table, one row per kernel, with a header that says what is predicted."""
    g = report.gpu
    lines = [f"Emulator counts, and times PREDICTED for {g.name} ({g.arch}, {g.clock_hz / 1e9:.2f} GHz base clock) by "
             "gpu_model.predict_launch: per launch, the launch floor + the largest of latency (waves x the busiest "
             "thread's chain), issue, L1, shared, L2 and DRAM: not measurements.",
             "thr: threads per block (of the last launch); sect/req: 32-byte sectors per global request "
             "(4 = coalesced floats); wf/req: shared-memory wavefronts per request (1 = no bank conflicts); "
             "DRAM: distinct sectors read + written; occ th: theoretical occupancy (ptxas registers, shared "
             "memory); occ ach: predicted achieved occupancy (blocks per SM the grid really gives); bound: the "
             "binding term of the kernel's longest launch."]
    calibrated = calibration_lines()
    if calibrated:
        lines.append("The model's error MEASURED on an H200 (Nsight Compute, python -m minunet.bench --calibrate):")
        lines += calibrated
    width = max([30] + [len(r.kernel) for r in report.rows])   # whole kernel names, never cut
    header = (f"{'kernel':<{width}} {'launch':>6} {'blocks':>7} {'thr':>5} {'ld req':>9} {'sect/req':>8} {'st req':>9} "
              f"{'sect/req':>8} {'sm ld wf/req':>12} {'sm st wf/req':>12} {'DRAM MB':>8} {'GFLOP':>7} {'regs':>5} "
              f"{'smem B':>7} {'occ th':>6} {'occ ach':>7} {'predicted us':>12} {'bound':>7}")
    lines += [header, "-" * len(header)]
    for r in sorted(report.rows, key=lambda r: -(r.predicted_seconds or 0)):
        c = r.counts
        flops = r.total_flops if (r.flops is not None or r.tensor_flops) else None
        lines.append(
            f"{r.kernel:<{width}} {r.launches:>6} {r.blocks:>7} {r.threads_per_block:>5} "
            f"{c['global_load_requests']:>9.0f} {_fmt(r.sectors_per_load, '>8.2f'):>8} "
            f"{c['global_store_requests']:>9.0f} {_fmt(r.sectors_per_store, '>8.2f'):>8} "
            f"{_fmt(r.wavefronts_per_shared_load, '>12.2f'):>12} {_fmt(r.wavefronts_per_shared_store, '>12.2f'):>12} "
            f"{r.dram_bytes / 1e6:>8.3f} {_fmt(None if flops is None else flops / 1e9, '>7.3f'):>7} "
            f"{_fmt(r.resources.registers if r.resources else None, '>5d', 'n/a'):>5} "
            f"{_fmt(r.resources.shared_bytes + r.dynamic_shared_bytes if r.resources else None, '>7d', 'n/a'):>7} "
            f"{_fmt(r.occupancy.occupancy if r.occupancy else None, '>6.0%', 'n/a'):>6} "
            f"{_fmt(r.achieved_occupancy, '>7.0%'):>7} "
            f"{_fmt(None if r.predicted_seconds is None else r.predicted_seconds * 1e6, '>12.2f'):>12} {r.bound:>7}")
    total = report.total_predicted_seconds
    if total is not None:
        lines.append(f"{'total (predicted)':<{width}} {'':>6} {'':>7} {'':>5} {'':>9} {'':>8} {'':>9} {'':>8} {'':>12} "
                     f"{'':>12} {sum(r.dram_bytes for r in report.rows) / 1e6:>8.3f} {'':>7} {'':>5} {'':>7} "
                     f"{'':>6} {'':>7} {total * 1e6:>12.2f}")
    if any(r.resources is None for r in report.rows):
        lines.append("regs/smem/occ th n/a: nvcc (the CUDA toolkit) is not installed or did not compile the source; "
                     "the prediction then assumes only the warp and block limits.")
    return "\n".join(lines)
