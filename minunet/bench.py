"""Benchmarks: every op and a whole training step, with napkin math and PyTorch side by side.

    python -m minunet.bench --device cpu                    # ops + training steps (tiles 252 and 348), base 16
    python -m minunet.bench --device cuda --base-channels 64 --tile 572
    python -m minunet.bench --kernels --gpu sm_90           # ptxas resources + emulator counters, predicted times

The op rows come from the registry (``minunet/ops``): every backend function of every op, on the
shapes each op's ``bench_cases`` picks from a U-Net with ``--base-channels`` on a ``--tile`` input
(the first, widest and a deep 3x3 conv, the first pooling, the last up-conv and its crop-concat,
the classifier, the loss, ReLU, dropout, SGD). Each row shows the work (FLOPs: 2 per multiply-add;
bytes: the minimum traffic, every input read once and every output written once), the measured
time (median of ``--repeat`` runs after a warm-up), the achieved GFLOP/s and GB/s, and - when
PyTorch is importable and has a twin of the op - PyTorch's time for the same op on the same device
and the ratio minunet/PyTorch (> 1 means minunet is slower). A benchmark prints; it never asserts
a time. A time measured on a GPU is a measurement; the emulator's kernel reports are predictions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import functional as F
from .backends.kernels import PRECISIONS, set_precision
from .devices import resolve_device, to_host
from .nn import UNet
from .optim import SGD
from .tensor import Tensor

# After a call, OpenBLAS's and OpenMP's worker threads spin for a while before they sleep; on a
# 2-core machine the spinning threads of the library timed just before (minunet's BLAS or Numba,
# or PyTorch's OpenMP) steal the cores from the one timed now (measured: PyTorch's 1.5 ms
# convolution took 22 ms right after a NumPy GEMM). Every timing first waits this long.
SETTLE_S = 0.3


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
    not wanted (``--no-torch``) or without the device."""

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

    def __bool__(self) -> bool:
        return self.torch is not None

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


def bench_ops(device: str, base: int, tile: int, batch: int, repeat: int, twin: TorchTwin) -> list[Row]:
    from . import ops
    from .backends import get_backend

    backend, sync = get_backend(device), device_sync(device)
    rng = np.random.default_rng(0)
    rows = []
    for op in ops.OPS:
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
                    row.torch_ms = _torch_op_time(twin, torch_fn, function == forward_name,
                                                  examples[forward_name], repeat)
                rows.append(row)
    return rows


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
def unet_flops(model: UNet, tile: int, batch: int) -> float:
    """Forward FLOPs of the convolutions (2 per multiply-add), traced layer by layer."""
    depth, base = model.depth, model.config["base_channels"]
    fl, s, cin = 0.0, tile, model.config["in_channels"]
    for i in range(depth + 1):
        co = base * 2 ** i
        fl += 2 * (s - 2) ** 2 * co * cin * 9 + 2 * (s - 4) ** 2 * co * co * 9
        s -= 4
        cin = co
        if i < depth:
            s //= 2
    for i in reversed(range(depth)):
        co = base * 2 ** i
        fl += 2 * s * s * cin * co * 4          # up-conv: each input pixel x 4 outputs
        s *= 2
        fl += 2 * (s - 2) ** 2 * co * 2 * co * 9 + 2 * (s - 4) ** 2 * co * co * 9
        s -= 4
        cin = co
    fl += 2 * s * s * cin * model.config["num_classes"]
    return fl * batch


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


def bench_step(device: str, base: int, tile: int, batch: int, repeat: int, twin: TorchTwin) -> list[Row]:
    """One SGD step of the U-Net (forward, weighted loss, backward, update), phase by phase,
    and the same step of the same network in PyTorch."""
    model = UNet(base_channels=base, seed=0, device=device).train()
    out = UNet.output_size(tile, model.depth)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, 1, tile, tile)).astype(np.float32)
    target_np = rng.integers(0, 2, (batch, out, out)).astype(np.int32)
    weight_np = rng.uniform(1, 10, (batch, out, out)).astype(np.float32)
    x, target, weight = (Tensor(a, device=device) for a in (x_np, target_np, weight_np))
    opt = SGD(model.parameters(), lr=1e-4, momentum=0.99)
    state = {}
    phases = {
        "forward": lambda: state.__setitem__("logits", model(x)),
        "loss": lambda: state.__setitem__("loss", F.weighted_cross_entropy(state["logits"], target, weight)),
        "backward": lambda: state["loss"].backward(),
        "sgd": lambda: (opt.step(), opt.zero_grad()),
    }
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
    if twin:
        torch = twin.torch
        net = torch_unet(model).to(twin.device)
        with torch.no_grad():   # the whole network cross-checked on the same weights, dropout off
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
        tms = time_phases(tphases, twin.sync, repeat)
        for row, k in zip(rows, tphases):
            row.torch_ms = tms[k]
        rows[-1].torch_ms = sum(tms.values())
    return rows


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


# ---- output ------------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    head = (f"{'op':<31} {'shape':<34} {'MFLOP':>9} {'MB':>7} {'ms':>8} {'GFLOP/s':>8} "
            f"{'GB/s':>6} {'torch ms':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tm = f"{r.torch_ms:9.2f}" if r.torch_ms else f"{'-':>9}"
        ra = f"{r.ratio:6.2f}" if r.ratio else f"{'-':>6}"
        lines.append(f"{r.name:<31} {r.shape:<34} {r.flops / 1e6:9.1f} {r.bytes / 1e6:7.1f} "
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, emu or auto")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--tile", type=int, default=252, help="input tile side of the op rows (a valid U-Net size)")
    p.add_argument("--step-tiles", type=int, nargs="+", default=[252, 348],
                   help="input tiles of the training-step tables (348 is python -m minunet.train's default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    p.add_argument("--no-step", action="store_true", help="skip the training-step tables")
    p.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch")
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
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="minunet's kernels on "
                   "cuda/emu: 'tf32' (tensor cores where a kernel has them) or 'fp32' (strict) "
                   "(default: $MINUNET_PRECISION or fp32)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.precision is not None:
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
    twin = TorchTwin(device, enabled=not args.no_torch)
    env = environment(device, twin)
    print("# minunet benchmark:", ", ".join(f"{k}={v}" for k, v in env.items()))
    results = {"env": env, "ops": [], "steps": {}}
    if not args.no_ops:
        rows = bench_ops(device, args.base_channels, args.tile, args.batch, args.repeat, twin)
        print(f"\n## ops (shapes from a U-Net with base {args.base_channels} on a {args.tile} tile, "
              f"batch {args.batch}; median of {args.repeat})")
        print(format_table(rows))
        results["ops"] = rows
    for tile in ([] if args.no_step else args.step_tiles):
        rows = bench_step(device, args.base_channels, tile, args.batch, args.repeat, twin)
        print(f"\n## training step (U-Net base {args.base_channels}, tile {tile}, batch {args.batch}; "
              f"median of {args.repeat})")
        print(format_table(rows))
        diff = rows[0].extra.get("max_abs_diff_logits_vs_torch")
        if diff is not None:
            print(f"logits vs PyTorch with the same weights (eval mode): max |diff| = {diff:.3g}")
        results["steps"][str(tile)] = rows
    if args.json:
        def as_dicts(rows):
            return [dict(asdict(r), gflops=r.gflops, gbps=r.gbps, ratio=r.ratio) for r in rows]

        with open(args.json, "w") as f:
            json.dump({"env": env, "ops": as_dicts(results["ops"]),
                       "steps": {k: as_dicts(v) for k, v in results["steps"].items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
