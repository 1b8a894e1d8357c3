"""Benchmark: prediction of large images, blocked (Dask over Zarr) against in memory.

    python -m minunet.bench_large                       # 2048^2 and 4096^2, the paper's network
    python -m minunet.bench_large --sizes 2048 --base-channels 16 --out /tmp/large.md

For each image size it writes one synthetic EM-like image (``minunet.data.synthetic``, 16-bit)
as a TIFF and as Zarr arrays stored in ``--chunks`` chunks, then runs the commands, each in a
fresh process so that peaks are independent:

* in memory: ``python -m minunet.predict --checkpoint C em.tif --out DIR`` (the whole image,
  its probabilities and the network's tile in memory at once);
* blocked:   ``python -m minunet.predict --checkpoint C em.zarr --out em_prob.zarr --chunk N``
  for each N of ``--chunks`` (the blocks are the stored chunks).

It reports wall time (the whole command: start-up, reading, predicting, writing), pixels per
second, and peak resident memory (the process's VmHWM), with the bound the blocked peak should
stay under, whatever the image size:

    bound = base + forward + threads x block

``base`` is the peak of the blocked command on a 64 x 64 image with the smallest tile (imports,
the model, Dask's and Zarr's machinery, one small forward pass); ``forward`` is
:func:`minunet.inference.forward_cost`'s memory of one forward pass of the tile the blocked run
used (an upper bound; one pass runs at a time); ``block`` is what one block in flight holds: the
stored chunks its window touches (decoded whole by Zarr), the window with the halo in the stored
dtype, in float64 and float32 while being standardised, and its class and foreground
probabilities (float32). Dask's local scheduler runs ``threads`` blocks at once
(:data:`minunet.data.lazy_io.LOCAL_THREADS`). The weights are random: speed and memory do not
depend on them. The results go to ``--out`` (Markdown) and a JSON file next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Each measured command runs under this wrapper, which reports the process's own peak resident
# memory (VmHWM) at exit. The kernel's ru_maxrss of a child is not usable here: a child forked
# from a large parent starts its high-water mark at the parent's size.
PEAK_WRAPPER = """import atexit, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"PEAK_KB {kb}", file=sys.stderr, flush=True)
atexit.register(_peak)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    sys.argv = sys.argv[1:]
    exec(sys.argv[0])
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
def run_measured(args: list[str], log: Path) -> dict:
    """Run ``python -m MODULE ARGS`` (or ``python -c CODE ARGS``) in a fresh process: wall
    seconds, peak resident memory (bytes) and its output."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text()
    peaks = re.findall(r"PEAK_KB (\d+)", text)
    if proc.returncode != 0 or not peaks:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{text[-2000:]}")
    return {"wall_s": wall, "peak_bytes": int(peaks[-1]) * 1024, "stdout": text}


def write_inputs(folder: Path, size: int, chunks) -> tuple[Path, dict]:
    """One synthetic EM image of size x size, 16-bit, as TIFF and as Zarr arrays stored in
    chunk x chunk chunks, one per chunk size (the blocks are then the stored chunks)."""
    import tifffile
    import zarr

    from .data.synthetic import em_images

    image = (em_images(1, size, seed=size)[0][0] * 65535).astype(np.uint16)
    tiff = folder / f"em_{size}.tif"
    tifffile.imwrite(tiff, image)
    stores = {}
    for chunk in chunks:
        stores[chunk] = folder / f"em_{size}_{chunk}.zarr"
        z = zarr.create_array(store=str(stores[chunk]), shape=image.shape,
                              chunks=(min(chunk, size),) * 2, dtype=image.dtype, overwrite=True)
        z[...] = image
    return tiff, stores


def block_bytes(chunk: int, margin: int, grid: int, classes: int) -> int:
    """Memory of one block in flight (see the module docstring), plus the stored chunks its
    window touches, which Zarr decodes whole (3 x 3 of them for an interior block when the
    blocks are the stored chunks)."""
    side = chunk + 2 * margin + grid
    touched = (-(-side // chunk) + 1) ** 2 * chunk * chunk * 2
    return touched + side * side * (2 + 8 + 4 + 4) + chunk * chunk * 4 * (classes + 1)


def compare(mem_prob: Path, blocked: Path, tile_output: int) -> dict:
    """Largest |difference| of the foreground probabilities: where the in-memory path's first
    tile wrote (its input starts on the whole image's pooling grid, as every blocked tile's
    does, so the two must agree to float32 rounding), and everywhere else (later in-memory
    tiles start off that grid and see other poolings; notebook 07)."""
    import tifffile
    import zarr

    a = tifffile.imread(mem_prob).astype(np.float64)
    b = zarr.open_array(str(blocked), mode="r")[...]
    h, w = a.shape
    first = np.zeros(a.shape, bool)
    first[:min(tile_output, h - tile_output) if h > tile_output else h,
          :min(tile_output, w - tile_output) if w > tile_output else w] = True
    diff = np.abs(a - b)
    return {"diff_on_grid": float(diff[first].max()),
            "diff_off_grid": float(diff[~first].max()) if (~first).any() else None}


def measure(args) -> dict:
    import minunet as mu

    from .checkpoint import save_checkpoint
    from .data.blocked import Geometry
    from .data.lazy_io import LOCAL_THREADS
    from .inference import forward_cost
    from .nn import UNet

    code = code_version()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="minunet-bench-large-"))
    work.mkdir(parents=True, exist_ok=True)
    model = mu.UNet(base_channels=args.base_channels, depth=args.depth, seed=0)
    ckpt = save_checkpoint(work / "checkpoint.npz", model)
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--memory-mb", str(args.memory_mb)]
    # base: the blocked command on a 64 x 64 image with the smallest tile and block (imports,
    # the model, Dask's and Zarr's machinery, and one small forward pass)
    small = UNet.valid_input_size(1, args.depth)
    while UNet.output_size(small, args.depth) < 2 ** args.depth:
        small = UNet.valid_input_size(small + 1, args.depth)
    tiny = write_inputs(work, 64, [64])[1][64]
    base = run_measured(["minunet.predict", *common, str(tiny), "--out", str(work / "tiny.zarr"),
                         "--tile", str(small), "--chunk",
                         str(Geometry(args.depth, small).smallest_chunk()), "--quiet",
                         "--overwrite"], work / "base.log")
    load = [os.getloadavg()[0]]
    threads = LOCAL_THREADS
    rows = []
    for size in args.sizes:
        tiff, stores = write_inputs(work, size, args.chunks)
        runs = []
        if not args.blocked_only:
            runs.append((None, run_measured(
                ["minunet.predict", *common, str(tiff), "--out", str(work / f"mem_{size}")],
                work / f"mem_{size}.log")))
        for chunk in args.chunks:
            out = work / f"blk_{size}_{chunk}.zarr"
            runs.append((chunk, run_measured(
                ["minunet.predict", *common, str(stores[chunk]), "--out", str(out), "--chunk",
                 str(chunk), "--quiet", "--overwrite"], work / f"blk_{size}_{chunk}.log")))
        for chunk, run in runs:
            tile, out = (int(v) for v in re.findall(r"tile (\d+) -> (\d+)", run.pop("stdout"))[-1])
            row = {"path": "blocked" if chunk else "in memory", "size": size, "tile": tile,
                   "tile_output": out, "chunk": chunk, "wall_s": run["wall_s"],
                   "pixels_per_s": size * size / run["wall_s"], "peak_bytes": run["peak_bytes"]}
            if chunk:
                margin = (tile - out) // 2
                row["bound_bytes"] = (base["peak_bytes"] + forward_cost(tile, model.config)[1]
                                      + threads * block_bytes(chunk, margin, 2 ** args.depth,
                                                              model.config["num_classes"]))
                if not args.blocked_only:
                    row.update(compare(work / f"mem_{size}" / f"em_{size}_prob.tif",
                                       work / f"blk_{size}_{chunk}.zarr", memory_output))
            else:
                memory_output = out
            rows.append(row)
            print(format_row(row), flush=True)
            load.append(os.getloadavg()[0])
        tiff.unlink()
    return {"rows": rows, "base_bytes": base["peak_bytes"], "threads": threads,
            "network": dict(model.config), "parameters": sum(p.size for p in model.parameters()),
            "chunks": args.chunks, "memory_mb": args.memory_mb, "machine": machine(),
            "load_average_1min": load, "workdir": str(work), "code": [code, code_version()]}


def code_version() -> str:
    """The commit the package was run from, and whether its files had uncommitted edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "minunet"], cwd=root,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted edits in minunet/" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def mb(n: float) -> str:
    return f"{n / 2 ** 20:,.0f}"


def format_row(r: dict) -> str:
    bound = mb(r["bound_bytes"]) if "bound_bytes" in r else ""
    on = f"{r['diff_on_grid']:.2g}" if r.get("diff_on_grid") is not None else ""
    off = f"{r['diff_off_grid']:.2g}" if r.get("diff_off_grid") is not None else ""
    return (f"| {r['path']} | {r['size']} x {r['size']} | {r['tile']} -> {r['tile_output']} | "
            f"{r['chunk'] or ''} | {r['wall_s']:.1f} | {r['pixels_per_s'] / 1e3:,.1f} | "
            f"{mb(r['peak_bytes'])} | {bound} | {on} | {off} |")


HEADER = ("| path | image | tile -> output | chunk | wall (s) | kpixels/s | peak RSS (MiB) | "
          "bound (MiB) | diff, first tile | diff, other tiles |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def report(result: dict, command: str) -> str:
    net = result["network"]
    lines = [
        "# Large images: blocked (Dask over Zarr) vs in-memory prediction",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}; no GPU (device `cpu`). One-minute load average during "
        f"the runs: {min(result['load_average_1min']):.1f} to "
        f"{max(result['load_average_1min']):.1f} "
        "(other work shared the cores, so wall times are upper bounds).  ",
        f"Code: {result['code'][0]}" + ("" if result["code"][0] == result["code"][1] else
                                          f", {result['code'][1]} at the end") + ".  ",
        f"Network: UNet(base_channels={net['base_channels']}, depth={net['depth']}), "
        f"{result['parameters']:,} parameters, random weights. Memory budget for the tile "
        f"choice: {result['memory_mb']} MB (`--memory-mb`). Blocked: Zarr input stored in "
        "chunks of the block size, Dask's local threaded scheduler "
        f"({result['threads']} worker thread; the network's kernels use every core).",
        "",
        HEADER,
        *[format_row(r) for r in result["rows"]],
        "",
        f"`base` (the blocked command on a 64 x 64 image) = {mb(result['base_bytes'])} MiB. "
        "`bound` = base + "
        "one forward pass of the tile (`inference.forward_cost`) + threads x one block in flight "
        "(see `minunet/bench_large.py`). `diff`: the largest |difference| of the foreground "
        "probability, blocked vs in memory on the same image, where the in-memory path's first "
        "tile wrote (that tile starts on the whole image's pooling grid, like every blocked "
        "tile) and where its other tiles wrote (they start off that grid: with max-pooling a "
        "U-Net is equivariant only to shifts by multiples of 2**depth, notebook 07).",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.bench_large", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="image sides")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 512], help="block sides, "
                   "each also the stored chunk side of its Zarr input")
    p.add_argument("--base-channels", type=int, default=64, help="64: the paper's network")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--memory-mb", type=float, default=1024, help="--memory-mb of both commands")
    p.add_argument("--blocked-only", action="store_true", help="skip the in-memory runs")
    p.add_argument("--workdir", default=None, help="where images and outputs go (default: a "
                   "new temporary folder, kept for inspection)")
    p.add_argument("--out", default="bench/results/large_predict.md", help="Markdown report; "
                   "the raw table goes next to it as .json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(HEADER, flush=True)
    result = measure(args)
    command = "python -m minunet.bench_large " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(result, command.strip()))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
