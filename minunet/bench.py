"""Benchmarks: per-op and whole-training-step timings, with napkin math and PyTorch side by side.

    python -m minunet.bench --device cpu                    # ops + training step, base 16, 252x252
    python -m minunet.bench --device cuda --base-channels 64 --tile 572
    python -m minunet.bench --kernels                       # registers/shared memory/spills (nvcc)

For every op the table shows the work it does (FLOPs: 2 per multiply-add; bytes: the minimum
traffic, every input read once and every output written once), the measured time (median of
``--repeat`` runs after a warm-up), the achieved GFLOP/s and GB/s, and - when PyTorch is
importable - PyTorch's time for the same op on the same device and the ratio minunet/PyTorch
(> 1 means minunet is slower). A benchmark prints; it never asserts a time.
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
from .devices import array_module, resolve_device
from .nn import UNet
from .optim import SGD
from .tensor import Tensor


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


def _sync(device: str) -> None:
    if device == "cuda":
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


SETTLE_S = 0.3


def time_it(fn, device: str, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds (device synchronised around each run).

    It first waits ``SETTLE_S``: after a call, OpenBLAS's and OpenMP's worker threads spin for a
    while before they sleep, and on a 2-core machine the spinning threads of the library timed
    just before (minunet's BLAS, or PyTorch's OpenMP) steal the cores from the one timed now
    (measured: PyTorch's 1.5 ms convolution took 22 ms right after a NumPy GEMM)."""
    time.sleep(SETTLE_S)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---- PyTorch, only for comparison --------------------------------------------------------------
def _torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def _torch_device(device: str) -> str | None:
    torch = _torch()
    if torch is None:
        return None
    if device == "cuda":
        return "cuda" if torch.cuda.is_available() else None
    return "cpu" if device in ("cpu", "emu") else None


def _torch_time(fn, tdev: str, repeat: int) -> float:
    """Like time_it, with three warm-up calls: oneDNN compiles a kernel for each new shape on its
    first call (measured here: 15 ms instead of 0.3 ms for the first layer's conv)."""
    torch = _torch()

    def run():
        fn()
        if tdev == "cuda":
            torch.cuda.synchronize()

    return time_it(run, "cpu", repeat, warmup=3)


def _torch_backward_time(forward, inputs, grad_output, tdev: str, repeat: int) -> float:
    """PyTorch's backward alone: the graph is built once and ``autograd.grad`` replays it
    (``retain_graph``), so no forward time has to be subtracted (a difference of two noisy
    medians, which came out negative for small ops)."""
    torch = _torch()
    out = forward()
    return _torch_time(lambda: torch.autograd.grad(out, inputs, grad_output, retain_graph=True),
                       tdev, repeat)


# ---- per-op benchmarks -------------------------------------------------------------------------
def op_cases(base: int, tile: int, batch: int):
    """Representative ops of a U-Net with ``base`` channels on a ``tile`` input: the first and a
    deep 3x3 conv, the first pooling, the last up-conv, its crop-concat, the classifier, the loss."""
    h1 = tile - 2
    cases = [
        ("conv3x3", (batch, 1, tile, tile), (base, 1, 3, 3)),
        ("conv3x3", (batch, base, h1, h1), (base, base, 3, 3)),
        ("conv3x3", (batch, 4 * base, (tile - 4) // 4 - 4, (tile - 4) // 4 - 4), (4 * base, 4 * base, 3, 3)),
        ("max_pool2x2", (batch, base, tile - 4, tile - 4), None),
        ("conv_transpose2x2", (batch, 2 * base, (tile - 4) // 2 - 40, (tile - 4) // 2 - 40), (2 * base, base, 2, 2)),
        ("relu", (batch, base, tile - 2, tile - 2), None),
    ]
    return cases


def bench_ops(device: str, base: int, tile: int, batch: int, repeat: int) -> list[Row]:
    from .backends import get_backend

    be = get_backend(device)
    xp = array_module(device)
    rng = np.random.default_rng(0)
    tdev = _torch_device(device)
    torch = _torch()
    rows = []

    def arr(shape):
        return xp.asarray(rng.standard_normal(shape).astype(np.float32))

    def tarr(a):
        from .devices import to_host

        return torch.from_numpy(np.asarray(to_host(a))).to(tdev)

    for name, xs, ws in op_cases(base, tile, batch):
        if min(xs[2:]) < 4:
            continue
        x = arr(xs)
        n, c, h, w = xs
        if name == "conv3x3":
            wt, b = arr(ws), arr((ws[0],))
            co = ws[0]
            ho, wo = h - 2, w - 2
            y = be.conv3x3_forward(x, wt, b)
            fl = 2.0 * n * co * ho * wo * c * 9
            by = 4.0 * (x.size + wt.size + y.size)
            rows.append(Row(f"conv3x3 fwd", f"{xs}->{co}", fl, by,
                            time_it(lambda: be.conv3x3_forward(x, wt, b), device, repeat)))
            gy = arr(y.shape)
            rows.append(Row(f"conv3x3 bwd", f"{xs}->{co}", 2 * fl, 4.0 * (x.size * 2 + wt.size * 2 + y.size),
                            time_it(lambda: be.conv3x3_backward(x, wt, gy, True), device, repeat)))
            if tdev:
                tx, tw, tb, tgy = tarr(x).requires_grad_(), tarr(wt).requires_grad_(), tarr(b).requires_grad_(), tarr(gy)
                cf = torch.nn.functional.conv2d
                with torch.no_grad():
                    rows[-2].torch_ms = _torch_time(lambda: cf(tx, tw, tb), tdev, repeat)
                    ty = cf(tx, tw, tb)
                    diff = float((ty.cpu() - torch.from_numpy(np.asarray(_host(y)))).abs().max())
                    rows[-2].extra["max_abs_diff_vs_torch"] = diff
                rows[-1].torch_ms = _torch_backward_time(lambda: cf(tx, tw, tb), (tx, tw, tb), tgy,
                                                         tdev, repeat)
        elif name == "max_pool2x2":
            y, am = be.max_pool2x2_forward(x)
            rows.append(Row("max_pool2x2 fwd", str(xs), 3.0 * y.size, 4.0 * x.size + 5.0 * y.size,
                            time_it(lambda: be.max_pool2x2_forward(x), device, repeat)))
            gy = arr(y.shape)
            rows.append(Row("max_pool2x2 bwd", str(xs), 0.0, 4.0 * x.size + 5.0 * y.size,
                            time_it(lambda: be.max_pool2x2_backward(gy, am, xs), device, repeat)))
            if tdev:
                tx = tarr(x).requires_grad_()
                with torch.no_grad():
                    rows[-2].torch_ms = _torch_time(lambda: torch.nn.functional.max_pool2d(tx, 2), tdev, repeat)
                rows[-1].torch_ms = _torch_backward_time(lambda: torch.nn.functional.max_pool2d(tx, 2),
                                                         (tx,), tarr(gy), tdev, repeat)
        elif name == "conv_transpose2x2":
            wt, b = arr(ws), arr((ws[1],))
            y = be.conv_transpose2x2_forward(x, wt, b)
            fl = 2.0 * n * c * h * w * ws[1] * 4
            rows.append(Row("up-conv2x2 fwd", f"{xs}->{ws[1]}", fl, 4.0 * (x.size + wt.size + y.size),
                            time_it(lambda: be.conv_transpose2x2_forward(x, wt, b), device, repeat)))
            gy = arr(y.shape)
            rows.append(Row("up-conv2x2 bwd", f"{xs}->{ws[1]}", 2 * fl, 4.0 * (2 * x.size + 2 * wt.size + y.size),
                            time_it(lambda: be.conv_transpose2x2_backward(x, wt, gy, True), device, repeat)))
            if tdev:
                tx, tw, tb = (tarr(a).requires_grad_() for a in (x, wt, b))
                up = torch.nn.functional.conv_transpose2d
                with torch.no_grad():
                    rows[-2].torch_ms = _torch_time(lambda: up(tx, tw, tb, stride=2), tdev, repeat)
                rows[-1].torch_ms = _torch_backward_time(lambda: up(tx, tw, tb, stride=2), (tx, tw, tb),
                                                         tarr(gy), tdev, repeat)
        elif name == "relu":
            rows.append(Row("relu fwd", str(xs), float(x.size), 8.0 * x.size,
                            time_it(lambda: be.relu_forward(x), device, repeat)))
            if tdev:
                tx = tarr(x)
                rows[-1].torch_ms = _torch_time(lambda: torch.relu(tx), tdev, repeat)
    return rows


def _host(a):
    from .devices import to_host

    return to_host(a)


# ---- whole training step -----------------------------------------------------------------------
def unet_flops(model: UNet, tile: int, batch: int) -> float:
    """Forward FLOPs of the convolutions (2 per multiply-add), traced layer by layer."""
    depth, base = model.depth, model.config["base_channels"]
    fl, s, cin = 0.0, tile, model.config["in_channels"]
    sizes = []
    for i in range(depth + 1):
        co = base * 2 ** i
        fl += 2 * (s - 2) ** 2 * co * cin * 9 + 2 * (s - 4) ** 2 * co * co * 9
        s -= 4
        sizes.append(s)
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
    """The same network in PyTorch, with our weights copied in (so the logits can be compared)."""
    torch = _torch()
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

    class TUNet(nn.Module):
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

    net = TUNet()
    state = {k: torch.from_numpy(v) for k, v in model.state_dict().items()}
    net.load_state_dict(state, strict=True)
    return net


def bench_step(device: str, base: int, tile: int, batch: int, repeat: int) -> list[Row]:
    model = UNet(base_channels=base, seed=0, device=device)
    model.train()
    out = UNet.output_size(tile, model.depth)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((batch, 1, tile, tile)).astype(np.float32), device=device)
    target = Tensor(rng.integers(0, 2, (batch, out, out)).astype(np.int32), device=device)
    weight = Tensor(rng.uniform(1, 10, (batch, out, out)).astype(np.float32), device=device)
    opt = SGD(model.parameters(), lr=1e-4, momentum=0.99)
    fwd_flops = unet_flops(model, tile, batch)
    nparam = sum(p.size for p in model.parameters())
    state = {}

    def forward():
        state["logits"] = model(x)

    def loss():
        state["loss"] = F.weighted_cross_entropy(state["logits"], target, weight)

    def backward():
        state["loss"].backward()

    def step():
        opt.step()
        opt.zero_grad()

    phases = {"forward": forward, "loss": loss, "backward": backward, "sgd step": step}
    times = {k: [] for k in phases}
    for it in range(repeat + 1):
        for k, fn in phases.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if it > 0:
                times[k].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    act_bytes = 4.0 * batch * tile * tile  # lower bound, only for the input
    rows = [
        Row("step: forward", f"{batch}x1x{tile}^2", fwd_flops, act_bytes, ms["forward"]),
        Row("step: loss", f"{batch}x2x{out}^2", 10.0 * batch * out * out * 2, 4.0 * batch * out * out * 6, ms["loss"]),
        Row("step: backward", "", 2 * fwd_flops, act_bytes, ms["backward"]),
        Row("step: sgd", f"{nparam} params", 3.0 * nparam, 4.0 * nparam * 4, ms["sgd step"]),
    ]
    total = sum(ms.values())
    rows.append(Row("training step", f"base {base}, tile {tile}", 3 * fwd_flops, 0.0, total))

    tdev = _torch_device(device)
    if tdev:
        torch = _torch()
        net = torch_unet(model).to(tdev).train()
        net.drop.p = 0.0
        model_eval_logits = None
        with torch.no_grad():  # correctness cross-check of the whole network, dropout off
            model.eval()
            from .autograd import no_grad

            with no_grad():
                model_eval_logits = _host(model(x).data)
            model.train()
            ref = net.eval()(torch.from_numpy(np.asarray(_host(x.data))).to(tdev)).cpu().numpy()
            net.train()
            net.drop.p = model.dropout_p
        diff = float(np.abs(ref - model_eval_logits).max())
        rows[0].extra["max_abs_diff_logits_vs_torch"] = diff
        tx = torch.from_numpy(np.asarray(_host(x.data))).to(tdev)
        tt = torch.from_numpy(np.asarray(_host(target.data))).long().to(tdev)
        tw = torch.from_numpy(np.asarray(_host(weight.data))).to(tdev)
        topt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99)
        tstate = {}

        def tsync():
            if tdev == "cuda":
                torch.cuda.synchronize()

        tphases = {
            "forward": lambda: tstate.__setitem__("logits", net(tx)),
            "loss": lambda: tstate.__setitem__("loss", (torch.nn.functional.cross_entropy(
                tstate["logits"], tt, reduction="none") * tw).mean()),
            "backward": lambda: tstate["loss"].backward(),
            "sgd step": lambda: (topt.step(), topt.zero_grad()),
        }
        ttimes = {k: [] for k in tphases}
        for it in range(repeat + 1):
            for k, fn in tphases.items():
                tsync()
                t0 = time.perf_counter()
                fn()
                tsync()
                if it > 0:
                    ttimes[k].append((time.perf_counter() - t0) * 1e3)
        tms = {k: statistics.median(v) for k, v in ttimes.items()}
        for row, k in zip(rows, tphases):
            row.torch_ms = tms[k]
        rows[-1].torch_ms = sum(tms.values())
    return rows


# ---- output ------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    head = (f"{'op':<18} {'shape':<28} {'MFLOP':>10} {'MB':>8} {'ms':>9} {'GFLOP/s':>8} "
            f"{'GB/s':>7} {'torch ms':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tm = f"{r.torch_ms:9.2f}" if r.torch_ms else f"{'-':>9}"
        ra = f"{r.ratio:6.2f}" if r.ratio else f"{'-':>6}"
        lines.append(f"{r.name:<18} {r.shape:<28} {r.flops / 1e6:10.1f} {r.bytes / 1e6:8.1f} "
                     f"{r.ms:9.2f} {r.gflops:8.1f} {r.gbps:7.1f} {tm} {ra}")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import os
    import platform

    info = {"device": device, "python": platform.python_version(), "numpy": np.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine()}
    torch = _torch()
    info["torch"] = getattr(torch, "__version__", None)
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    if device == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["cupy"] = cupy.__version__
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minunet.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, emu or auto (default)")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--tile", type=int, default=252, help="input tile side (a valid U-Net size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    parser.add_argument("--no-step", action="store_true", help="skip the training-step table")
    parser.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch")
    parser.add_argument("--kernels", action="store_true",
                        help="print each kernel's registers, shared memory and spills (nvcc -Xptxas -v)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.kernels:
        from .backends import nvrtc_check

        return nvrtc_check.main([])
    try:
        device = resolve_device(args.device)
        UNet.output_size(args.tile)
        if args.base_channels < 1 or args.batch < 1 or args.repeat < 1:
            raise ValueError("--base-channels, --batch and --repeat must be positive")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_torch:
        global _torch
        _torch = lambda: None  # noqa: E731
    env = environment(device)
    print("# minunet benchmark:", ", ".join(f"{k}={v}" for k, v in env.items()))
    rows_ops, rows_step = [], []
    if not args.no_ops:
        rows_ops = bench_ops(device, args.base_channels, args.tile, args.batch, args.repeat)
        print(f"\n## ops (U-Net base {args.base_channels}, tile {args.tile}, batch {args.batch})")
        print(format_table(rows_ops))
    if not args.no_step:
        rows_step = bench_step(device, args.base_channels, args.tile, args.batch, args.repeat)
        print(f"\n## training step (U-Net base {args.base_channels}, tile {args.tile}, batch {args.batch}; "
              f"median of {args.repeat})")
        print(format_table(rows_step))
        diff = rows_step[0].extra.get("max_abs_diff_logits_vs_torch")
        if diff is not None:
            print(f"\nlogits vs PyTorch with the same weights (eval mode): max |diff| = {diff:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "ops": [dict(asdict(r), gflops=r.gflops, gbps=r.gbps, ratio=r.ratio)
                                           for r in rows_ops],
                       "step": [dict(asdict(r), gflops=r.gflops, gbps=r.gbps, ratio=r.ratio)
                                for r in rows_step]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
