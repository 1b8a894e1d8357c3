# %% [markdown]
# # 9. Making the convolution fast: measured on a GPU, counted by the emulator
#
# Notebooks 2 and 3 showed *how* minunet's CUDA kernels compute. This one asks *how fast* they
# are, and why. It uses two kinds of numbers, always labelled:
#
# * **MEASURED** on a GPU: one NVIDIA H200, on 2026-12-04, with Nsight Compute (`ncu`) and
#   wall-clock step timings, in two runs: the old kernels in
#   [`bench/results/h200-2026-12-04/`](../bench/results/h200-2026-12-04/README.md), the new
#   ones in [`bench/results/h200-2026-12-04-run2/`](../bench/results/h200-2026-12-04-run2/summary.txt);
#   this notebook only reads them (it was built on a machine without a GPU).
# * **COUNTED** and **PREDICTED** by minunet's CUDA emulator, run live below on the CPU:
#   memory requests, sectors, shared-memory wavefronts, registers and occupancy are counts
#   of what the kernel does; a time computed from them by a roofline model is a prediction.
#
# The road has four steps for the 3x3 convolution: the **naive** kernel (one thread per
# output, notebook 2), the **tiled** kernel (shared memory and register blocking), the
# **implicit GEMM** (`igemm`: bigger register tiles, `float4` loads) and **tensor cores**
# (`wmma`, TF32), plus the weight gradient written as a GEMM. The first half of the notebook
# takes the old kernels apart with the emulator's counters and the H200's; the last section
# walks the new steps, and shows the paper's training step going from 173.5 ms to 40.3 ms
# (strict FP32; cuDNN: 30.0 ms) on the H200.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds
from nbsetup import machine

# %%
import csv
import re
import time
from collections import defaultdict
from pathlib import Path

H200 = Path("../bench/results/h200-2026-12-04")


def ncu_launches(name, folder=H200):
    """Nsight Compute's CSV as {launch id: {"kernel", "grid", metric: value}} (MEASURED)."""
    rows = [line for line in (folder / name).read_text().splitlines() if line.startswith('"')]
    launches = defaultdict(dict)
    for r in csv.DictReader(rows):
        launch = launches[int(r["ID"])]
        launch.update(kernel=r["Kernel Name"], grid=r["Grid Size"], block=r["Block Size"])
        launch[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    return dict(launches)


print(machine())

# %% [markdown]
# ## Where we stand: one training step against cuDNN (MEASURED, H200)
#
# `step_vs_pytorch.py` timed one training step (forward, loss, backward, update) of the same
# network in minunet (`device="cuda"`, the kernels of notebooks 2 and 3) and in PyTorch with
# cuDNN, in strict FP32, with TF32 tensor cores, and with bf16:

# %%
steps = {}                                                  # network -> {library: median ms}
for name in ("step_base16_tile348.txt", "step_base64_tile572.txt"):
    network = None
    for line in (H200 / name).read_text().splitlines():
        if line.startswith("## "):
            network = line[3:].split(":")[0]
            if network in steps:                            # a later run repeats a network: keep the first
                network = None
            else:
                steps[network] = {}
            print(line)
        elif network and re.match(r"(minunet|pytorch) ", line):
            print(line.split("params")[0].rstrip())
            label, ms = re.match(r"(.+?)\s+([\d.]+) ms", line).groups()
            steps[network][label.replace("kernels", "").strip()] = float(ms)
    print()

fig, axes = plt.subplots(1, len(steps), figsize=(10, 2.4))
for ax, (network, times) in zip(axes, steps.items()):
    names = list(times)[::-1]
    ax.barh(names, [times[k] for k in names], color=["tab:gray"] * (len(names) - 1) + ["tab:blue"])
    for k, name in enumerate(names):
        ax.text(times[name], k, f" {times[name]:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.2 * max(times.values()))
    ax.set_xlabel("ms per training step, MEASURED on an H200 (median)")
    ax.set_title(network)
plt.tight_layout(); plt.show()

# %% [markdown]
# On the default training network (base 16, 348 tile) minunet is 1.5x behind cuDNN's FP32;
# on the paper's network (base 64, 572 tile, 903 GFLOP per step) 6x behind FP32 and 15x
# behind TF32, which runs on the tensor cores. Nsight Compute splits the paper step's
# 220 ms of kernel time (README of the folder): `conv3x3_grad_weight_serial` 56.5%,
# `conv3x3_grad_input_tiled` 12.6%, `conv3x3_forward_tiled` 11.7%, the tree weight
# gradient 8.9%. The road to speed starts with the weight gradients, and with the tiled
# kernel that computes both the forward pass and the input gradient.
#
# ## One layer, two kernels: what the emulator counts
#
# The H200's per-launch counters exist for the base-8 network on a 188 tile
# (`ncu_small.csv`), so we take a layer of that network: 8 -> 8 channels, 186 x 186 -> 184 x
# 184, and run both kernels on it under `minunet.emulator.profile` (checked mode, every
# access counted on 8 sampled blocks and scaled to the grid; registers from `nvcc`).

# %%
from minunet import emulator
from minunet.backends.kernels import KernelBackend

rng = np.random.default_rng(0)
layer = dict(n=1, ci=8, h=186, co=8)
x = rng.standard_normal((layer["n"], layer["ci"], layer["h"], layer["h"])).astype(np.float32)
w = (rng.standard_normal((layer["co"], layer["ci"], 3, 3)) / 8).astype(np.float32)
b = np.zeros(layer["co"], np.float32)
flops = 2 * 9 * layer["ci"] * layer["co"] * (layer["h"] - 2) ** 2

counted = {}
for version in ("naive", "tiled"):
    with emulator.profile(gpu="h200", sample_blocks=8) as report:
        KernelBackend("emu", conv3x3=version).conv3x3_forward(x, w, b)
    report.set_flops(f"conv3x3_forward_{version}", flops)
    counted[version] = report.rows[0]
print(emulator.format_profile(report).splitlines()[0])
print(f"{'COUNTED (emulator)':22s} {'blocks':>6s} {'load requests':>13s} {'sectors/req':>11s} "
      f"{'shared wf/req':>13s} {'regs':>4s} {'smem B':>6s} {'occupancy':>9s} {'limit':>9s}")
for version, r in counted.items():
    wf = r.wavefronts_per_shared_load
    print(f"{version:22s} {r.blocks:6d} {r.counts['global_load_requests']:13,.0f} {r.sectors_per_load:11.2f} "
          f"{'-' if wf is None else f'{wf:.2f}':>13s} {r.resources.registers:4d} {r.resources.shared_bytes:6d} "
          f"{r.occupancy.occupancy:9.0%} {r.occupancy.limit:>9s}")

# %% [markdown]
# What the counts say, one idea per column:
#
# * **Load requests** (one per warp-wide load instruction): the tiled kernel issues about
#   40 times fewer. Each value it loads into shared memory serves up to 9 taps x 8 output
#   channels; the naive kernel loads every input and weight again for each use (notebook 2's
#   napkin math: 2 loads per multiply-add against 0.019).
# * **Sectors per request** (coalescing): 4 would be 32 consecutive floats; both kernels are
#   below 4 because many requests are broadcasts (all lanes read the same weight: 1 sector).
# * **Shared-memory wavefronts per request** (bank conflicts): 1.00, none. Shared memory has
#   32 banks of 4-byte words; the tiled kernel's weight reads are one address per warp (a
#   broadcast) and its input reads 32 consecutive words, one per bank. (Exercise 05.1 in
#   notebook 5 shows a tree whose strided addressing costs 3.8 wavefronts per request.)
# * **Registers and occupancy**: the tiled kernel keeps 16 sums in registers (register
#   blocking) and `nvcc` gives it 48 registers per thread; 256 threads x 48 = 12,288 of an
#   SM's 65,536 registers, so at most 5 blocks (40 of 64 warps, 62%) fit on an SM: the
#   register file, not shared memory, is the limit. Occupancy matters for **latency
#   hiding**: a load from DRAM takes hundreds of cycles, and an SM keeps its arithmetic units
#   busy by switching to another warp while one waits; the more warps resident, the more
#   latency it can hide.
# * **Divergence** is not in the table: the emulator forms requests as if the lanes of a warp
#   ran in step and does not count the cost of branches. The tiled kernel has one small
#   divergent branch (lanes 0 and 1 also load the two halo columns: the other 30 lanes wait
#   for that instruction).
#
# ## Counted against measured (H200)
#
# The same layer's launch in `ncu_small.csv` is the second `conv3x3_forward_tiled` launch
# of the step (grid 72 x 1 x 1: 12 x 6 tiles of 16 x 32, one group of 8 channels):

# %%
import hashlib
from minunet.backends.sources import function_source

# The H200 measured the kernels of commit 4e71b45. If the tiled kernel has changed since, the
# emulator's column below counts today's kernel and the H200's column the old one: say so.
MEASURED_TILED_SHA = "3e05e4a7c2b22a85"   # sha256 of conv3x3_tiled's source at commit 4e71b45
today = hashlib.sha256(function_source("conv3x3", "conv3x3_tiled").encode()).hexdigest()[:16]
if today != MEASURED_TILED_SHA:
    print("NOTE: kernels/conv3x3.cu's tiled kernel changed after the H200 measurement; the emulator "
          "column counts today's kernel, the H200 column the one of commit 4e71b45.")

launches = ncu_launches("ncu_small.csv")
tiled_launches = [k for k, v in sorted(launches.items()) if v["kernel"] == "conv3x3_forward_tiled"
                  and v["grid"] == "(72, 1, 1)"]
gpu = launches[tiled_launches[1]]        # launch 0 is the first layer (1 input channel)
emu = counted["tiled"]
rows = [
    ("load requests", emu.counts["global_load_requests"], gpu["l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"]),
    ("sectors per load request", emu.sectors_per_load,
     gpu["l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"] / gpu["l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"]),
    ("shared wavefronts per load", emu.wavefronts_per_shared_load,
     gpu["l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"] / gpu["smsp__inst_executed_op_shared_ld.sum"]),
    ("occupancy (warps resident)", emu.occupancy.occupancy,
     gpu["sm__warps_active.avg.pct_of_peak_sustained_active"] / 100),
    ("DRAM MB", emu.dram_bytes / 1e6, (gpu["dram__bytes_read.sum"] + gpu["dram__bytes_write.sum"]) / 1e6),
    ("time, us", emu.predicted_seconds * 1e6, gpu["gpu__time_duration.sum"] / 1e3),
]
print(f"{'conv3x3_forward_tiled, 8 -> 8 at 186^2':40s} {'emulator':>12s} {'H200 (ncu)':>12s}")
labels = {"occupancy (warps resident)": ("theoretical", "achieved"), "time, us": ("PREDICTED", "MEASURED")}
for what, e, g in rows:
    tag_e, tag_g = labels.get(what, ("counted", "measured"))
    print(f"{what:40s} {e:12,.2f} {g:12,.2f}   ({tag_e} / {tag_g})")

# %% [markdown]
# The **counts agree**: the emulator sees nearly the same requests and the same
# coalescing as the hardware, and no bank conflicts on either side. The **predicted time is
# close too** (19 against 21 us; ncu ran at base clocks, up to ~1.3x slower than the
# wall-clock tables), but only because the emulator's timing model (docs/emulator.md) counts
# what a first, roofline-only model ignored and predicted ~1 us for: `max(FLOPs / peak, DRAM
# bytes / bandwidth)` assumes the whole GPU works at full speed. What the H200 actually pays
# for here:
#
# * **Too few blocks.** 72 blocks for 132 SMs: 60 SMs idle, and each busy SM holds one block
#   of 8 warps out of 64, which is exactly the **12.5% achieved occupancy** measured. A roofline
#   assumes the whole GPU works. With 8 warps per SM there is almost nothing to switch to
#   while a warp waits on memory: latency is not hidden, it is paid.
# * **Every launch has a fixed cost** of a few microseconds (the smallest kernels of the
#   step took ~3 us on the H200), more than a roofline's whole prediction. The timing model
#   starts each launch at a floor (2.3 us on the H200) and adds the largest of its terms; here
#   that is latency: waves of blocks times the busiest thread's chain of loads, which 8 warps
#   per SM cannot hide.
# * **The caches.** Most of this small network's tensors stay in the H200's 60 MB L2: DRAM
#   traffic is a fraction of the emulator's "every sector once" count, so a DRAM roofline
#   says little here.
#
# So for small layers the road to speed is *more parallelism per launch* (more, smaller
# blocks; splitting the channel loop), not fewer bytes. For the paper's layers, with 570 x
# 570 pixels and 64 channels, the grid is large, the arithmetic dominates (notebook 2: ~140
# FLOP per byte) and the gap to cuDNN is arithmetic throughput: minunet's tiled forward ran
# that layer at 17.6 TFLOP/s, a quarter of the FP32 peak, while cuDNN in TF32 uses the tensor
# cores.

# %%
for line in (H200 / "bench_ops.txt").read_text().splitlines():
    if line.startswith(("op ", "conv3x3_forward ", "conv3x3_backward ")):
        print(line)

# %% [markdown]
# (MEASURED, H200, the old kernels of the first run, median of 5; `torch ms` is PyTorch with
# its defaults: TF32 convolutions.
# The columns are the op's work, its minimum traffic, minunet's time, the achieved GFLOP/s
# and GB/s, PyTorch's time and the ratio.)
#
# ## The CPU twin
#
# Device `"cpu"` runs the same convolution as a Numba kernel, `_conv3x3_flat` in
# `minunet/ops/conv3x3.py`, printed below. The same ideas, mapped onto a CPU (as the kernel
# is today):
#
# | | CUDA, `conv3x3_forward_tiled` | Numba, `_conv3x3_flat` |
# |---|---|---|
# | unit of work | a block: 8 output channels x a 16 x 32 tile | a task: 3 output channels x a band of rows |
# | parallelism | 256 threads per block, blocks over 132 SMs | tasks over the cores (`prange`), 16 pixels per AVX-512 vector |
# | register blocking | 16 sums per thread (8 channels x 2 rows) | 27 weights (3 channels x 9 taps) held while the pixels stream by |
# | reuse of inputs | a shared-memory tile, loaded once per block | the three input rows, kept in the core's L1/L2 cache |
# | halo | 2 extra rows and columns in the tile | the plane read as one flat row: the 3x3 window is 9 shifted loads |

# %%
import inspect
from minunet.ops import conv3x3 as conv3x3_op

print(inspect.getsource(inspect.unwrap(conv3x3_op._conv3x3_flat)))   # the source, whatever wraps it

# %% [markdown]
# Timed here, on the machine named below, for the full-resolution 16 -> 16 layer of the
# default network at a 252 tile:

# %%
x16 = rng.standard_normal((1, 16, 252, 252)).astype(np.float32)
w16 = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
X, Wt = mu.Tensor(x16), mu.Tensor(w16)
F.conv3x3(X, Wt)                                         # the first call compiles (Numba, cached)
times = []
for _ in range(5):
    start = time.perf_counter()
    F.conv3x3(X, Wt)
    times.append(time.perf_counter() - start)
gflop = 2 * 9 * 16 * 16 * 250 ** 2 / 1e9
print(f"conv3x3 16 -> 16 at 250^2 on cpu: median {1e3 * np.median(times):.2f} ms, "
      f"{gflop / np.median(times):.0f} GFLOP/s, MEASURED when this notebook was built on: {machine()}")
print("bench/results/cpu.txt (an idle 2-core AVX-512 VM): 0.95 ms, 298 GFLOP/s; PyTorch 0.85 ms")

# %% [markdown]
# On an idle machine the CPU twin is within 12% of PyTorch's oneDNN on this layer
# (`bench/results/cpu.txt`); on a busy one, or without AVX-512, the time above can be many
# times longer: a timing without its machine is not a number. `docs/speed.md` collects the
# CPU, emulator and H200 numbers in one page.
#
# %% [markdown]
# ## The road continues: implicit GEMM, tensor cores, weight gradients as GEMMs
#
# Three more steps now exist (`kernels/conv3x3.cu`, docs/backends.md), and they were
# **MEASURED on an NVIDIA H200** on 2026-12-04 in a second run
# ([`bench/results/h200-2026-12-04-run2/`](../bench/results/h200-2026-12-04-run2/summary.txt)):
#
# * **v3 `igemm`**: the convolution as an *implicit GEMM*: a matrix product with M = output
#   channels, N = pixels, K = 9 x input channels, whose K x N matrix (im2col) is never
#   written out but read from the input tile in shared memory. Each thread keeps a bigger
#   register tile (8 channels x 4 pixels = 32 sums), loads 4 floats at a time (`float4`), and
#   double-buffers the shared tiles (one barrier per chunk). Three tile shapes (wide 32 ch x
#   8 x 32 px, narrow 16 ch, deep 64 ch x 8 x 8 px) and a split over input channels when the
#   grid would be smaller than the GPU.
# * **v4 `wmma`**: the same implicit GEMM on the **TF32 tensor cores** (`nvcuda::wmma`,
#   m16n16k8 fragments, FP32 sums). TF32 keeps 10 mantissa bits of each input, so `wmma` is
#   TF32 even when asked for fp32: `cuda` never chooses it for strict fp32.
# * **Weight gradients as GEMMs** (`reduction="gemm"`): gw = gy (Co x P) @ im2col(x) (P x 9 Ci)
#   over the P pixels, in 64 x 64 tiles with a 4 x 4 register tile per thread (FP32) or wmma
#   (TF32), instead of the serial loop (one thread per weight) that took 56% of the old step.
# * **Fused bias + ReLU** in the store of v3/v4 (and the ReLU mask applied as gy is loaded).
#
# `cuda` picks a version per layer from a table measured on the H200 with
# `python -m minunet.bench --tune` (`minunet/backends/cuda_choices.json`). The per-layer
# times below are parsed from `bench_paper.txt` (median of 3; each version forced). The two
# layers are the paper network's widest (64 -> 64 at 570^2) and one of its deepest (256 -> 256
# at 138^2); "backward" is the input gradient with that version plus the weight gradient.

# %%
RUN2 = Path("../bench/results/h200-2026-12-04-run2")
BENCH_ROW = re.compile(r"^(\w+)(?: \[([\w=]+)\])?\s+(\(\S+\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)")


def bench_ops(path):
    """minunet.bench's op tables: {(precision, op, variant, shape): (ms, GFLOP/s, torch ms)} (MEASURED)."""
    table, precision = {}, None
    for line in path.read_text().splitlines():
        header = re.match(r"## ops .*minunet (\w+);", line)
        if header:
            precision = header.group(1)
        elif precision and (m := BENCH_ROW.match(line)):
            op, variant, shape, _, _, ms, gflops, _, torch_ms = m.groups()
            torch_ms = float("nan") if torch_ms == "-" else float(torch_ms)
            table[precision, op, variant or "auto", shape] = (float(ms), float(gflops), torch_ms)
    return table


ops = bench_ops(RUN2 / "bench_paper.txt")
LAYERS = {"64 -> 64 at 570^2": "(1,64,570,570,64)", "256 -> 256 at 138^2": "(1,256,138,138,256)"}
print("conv3x3 of the paper's network (base 64, 572 tile): MEASURED on an H200, median of 3 (bench_paper.txt)")
print(f"{'':22s}" + "".join(f"{name:>36s}" for name in LAYERS))
print(f"{'version':22s}" + f"{'forward ms':>16s}{'TFLOP/s':>9s}{'backward ms':>12s}" * len(LAYERS))
for version in ("naive", "tiled", "igemm", "wmma"):
    cells = ""
    for shape in LAYERS.values():
        fwd_ms, fwd_gflops, _ = ops["fp32", "conv3x3_forward", f"conv3x3={version}", shape]
        bwd_ms = ops["fp32", "conv3x3_backward", f"conv3x3={version}", shape][0]
        cells += f"{fwd_ms:16.2f}{fwd_gflops / 1e3:9.1f}{bwd_ms:12.2f}"
    print(f"minunet {version:14s}{cells}")
for label, precision in (("cuDNN strict FP32", "fp32"), ("cuDNN TF32", "tf32")):
    cells = ""
    for shape in LAYERS.values():
        ms, gflops, fwd = ops[precision, "conv3x3_forward", "auto", shape]
        bwd = ops[precision, "conv3x3_backward", "auto", shape][2]
        cells += f"{fwd:16.2f}{ms * gflops / fwd / 1e3:9.1f}{bwd:12.2f}"
    print(f"{label:22s}{cells}")
print("(wmma runs TF32 tensor cores whatever the precision: forced here, never chosen for strict fp32)")

# %% [markdown]
# One idea per step, read off the table (all **MEASURED**):
#
# * **naive -> tiled** (notebook 2): staging in shared memory, 3.7 -> 1.3 ms, 6 -> 18 TFLOP/s.
# * **tiled -> igemm**: *a bigger register tile*, 1.3 -> 0.72 ms, 33 TFLOP/s: on the wide layer as
#   fast as cuDNN in strict FP32 (0.67 ms), on the deep one 0.82 against 0.74 ms.
# * **igemm -> wmma**: *tensor cores*, 0.72 -> 0.54 ms (44 TFLOP/s), faster than cuDNN's strict
#   FP32 but 1.9x (wide) and 4x (deep) behind cuDNN's own TF32 (82 and 168 TFLOP/s).
#
# ### The napkin math of each step
#
# A GPU kernel is fast when each value it fetches feeds many multiply-adds (FMAs), at two
# levels: a **block** stages a tile of x and w in shared memory and uses each staged value
# many times; a **thread** reads values from shared memory into registers, and with a tile
# of `a` channels x `b` pixels in registers it does `a*b` FMAs per `a+b` reads. The numbers
# below are computed from the `#define`s in `kernels/conv3x3.cu`:

# %%
from minunet.backends.sources import cu_defines
from minunet.emulator import gpu_model

cu = cu_defines("conv3x3")
H200_SPEC = gpu_model.gpu("h200")          # the data sheet's peaks, in one place


def napkin(channels, rows, cols, ci_chunk, thread_channels, thread_pixels):
    """One block's reuse: multiply-adds per value staged in shared memory (x tile with its halo,
    plus weights), and one thread's: multiply-adds per value it reads from shared memory."""
    fma = channels * rows * cols * ci_chunk * 9
    staged = (rows + 2) * (cols + 2) * ci_chunk + channels * ci_chunk * 9
    return fma / staged, thread_channels * thread_pixels / (thread_channels + thread_pixels)


ROAD = {   # version: (block: channels, rows, cols, input channels per stage; thread: channels x pixels)
    "tiled": (cu["CO_PER_BLOCK"], cu["TILE_H"], cu["TILE_W"], cu["CI_CHUNK"], cu["CO_PER_BLOCK"], cu["ROWS_PER_THREAD"]),
    "igemm wide": (cu["IGW_BM"], cu["IGW_TH"], cu["IGW_TW"], cu["IGW_CI"], cu["IGW_TM"], cu["IGW_TN"]),
    "igemm deep": (cu["IGD_BM"], cu["IGD_TH"], cu["IGD_TW"], cu["IGD_CI"], cu["IGD_TM"], cu["IGD_TN"]),
    "wmma": (cu["WM_BM"], cu["WM_TH"], cu["WM_TW"], cu["WM_CI"], 16, 16),   # a warp's 16 x 16 fragment
}
print(f"{'napkin math (kernels/conv3x3.cu #defines)':42s} {'block tile':>22s} {'FMA per staged value':>21s} "
      f"{'thread tile':>12s} {'FMA per shared read':>20s}")
print(f"{'naive':42s} {'1 output per thread':>22s} {'(none staged)':>21s} {'1 x 1':>12s} {'0.5 (global)':>20s}")
for version, (co, th, tw, ci, tm, tn) in ROAD.items():
    block, thread = napkin(co, th, tw, ci, tm, tn)
    print(f"{version:42s} {f'{co} ch x {th}x{tw} px x {ci} ci':>22s} {block:21.0f} {f'{tm} x {tn}':>12s} {thread:20.1f}")
layer = 2 * 9 * 64 * 64 * 568 ** 2, 4 * (64 * 570 ** 2 + 64 * 568 ** 2 + 64 * 64 * 9)
print(f"\nthe 64 -> 64 layer: {layer[0] / 1e9:.1f} GFLOP on {layer[1] / 1e6:.0f} MB at least: "
      f"{layer[0] / layer[1]:.0f} FLOP per byte; the H200's data sheet: {H200_SPEC.fp32_flops / 1e12:.0f} TFLOP/s FP32, "
      f"{H200_SPEC.tf32_flops / 1e12:.0f} TFLOP/s dense TF32, {H200_SPEC.dram_bandwidth / 1e12:.1f} TB/s")

# %% [markdown]
# The wide layer needs 143 FLOP per byte; the H200 can do 67 TFLOP/s / 4.8 TB/s = 14 FLOP per
# byte of DRAM: **compute-bound**. What limits a compute-bound kernel is how many
# instructions besides FMAs it issues. The tiled kernel reads 10 values from shared memory per
# 16 FMAs (1.6 FMA per read); igemm's 8 x 4 tile does 32 FMAs per 12 reads (2.7), and its
# `float4` loads fetch 4 of them per instruction. A tensor core does a 16 x 16 x 8 product
# (2,048 FMAs) from 256 values a warp loads: 8 per read, and on units 7x faster on paper.
#
# ### The emulator's counts for each version (run live, small shape)
#
# The emulator cannot run the 570^2 layer in reasonable time; its counters run the same
# kernels on a 32 -> 32 layer at 34^2 (`minunet.emulator.profile`, checked mode, 8 sampled
# blocks scaled to the grid, registers from `nvcc`). The helper kernels of v3/v4
# (`conv3x3_gemm_weights` lays out the weights, `conv3x3_sum_splits` adds a channel split) and
# the backward's input gradient also run; the table shows the main kernel.

# %%
small = dict(n=1, ci=32, h=34, co=32)       # 32 -> 32 channels, 34 x 34 -> 32 x 32: seconds on the emulator
xs = rng.standard_normal((small["n"], small["ci"], small["h"], small["h"])).astype(np.float32)
ws = (rng.standard_normal((small["co"], small["ci"], 3, 3)) / 17).astype(np.float32)
bs = np.zeros(small["co"], np.float32)
gys = rng.standard_normal((small["n"], small["co"], small["h"] - 2, small["h"] - 2)).astype(np.float32)
small_flops = 2 * 9 * small["ci"] * small["co"] * (small["h"] - 2) ** 2
ROAD_RUNS = [   # (label, backend options, the call, the kernel whose row we read)
    ("naive", dict(conv3x3="naive"), "forward", "conv3x3_forward_naive"),
    ("tiled", dict(conv3x3="tiled"), "forward", "conv3x3_forward_tiled"),
    ("igemm", dict(conv3x3="igemm"), "forward", "conv3x3_igemm_wide"),
    ("wmma (TF32)", dict(conv3x3="wmma", precision="tf32"), "forward", "conv3x3_wmma"),
    ("wgrad tree", dict(reduction="tree"), "backward", "conv3x3_grad_weight"),
    ("wgrad gemm", dict(reduction="gemm"), "backward", "conv3x3_grad_weight_gemm"),
    ("wgrad gemm TF32", dict(reduction="gemm", precision="tf32"), "backward", "conv3x3_grad_weight_gemm_tf32"),
]
road_counted = {}
for label, options, call, kernel in ROAD_RUNS:
    backend = KernelBackend("emu", **options)
    with emulator.profile(gpu="h200", sample_blocks=8) as report:
        if call == "forward":
            backend.conv3x3_forward(xs, ws, bs)
        else:
            backend.conv3x3_backward(xs, ws, gys)
    report.set_flops(kernel, small_flops)
    road_counted[label] = next(r for r in report.rows if r.kernel == kernel)
print(f"COUNTED by the emulator on 32 -> 32 at 34^2 (gpu h200 model); time PREDICTED, no GPU measured this shape")
print(f"{'version':16s} {'kernel':30s} {'blocks':>6s} {'load req':>8s} {'sect/req':>8s} {'shared wf/req':>13s} "
      f"{'B per wf':>8s} {'regs':>4s} {'smem B':>6s} {'occupancy':>9s} {'limit':>9s} {'PREDICTED us':>12s}")
for label, r in road_counted.items():
    c = r.counts
    wf = r.wavefronts_per_shared_load
    per_wf = c["shared_load_bytes"] / c["shared_load_wavefronts"] if c["shared_load_wavefronts"] else None
    print(f"{label:16s} {r.kernel:30s} {r.blocks:6d} {c['global_load_requests']:8,.0f} {r.sectors_per_load:8.2f} "
          f"{'-' if wf is None else f'{wf:.2f}':>13s} {'-' if per_wf is None else f'{per_wf:.0f}':>8s} "
          f"{r.resources.registers:4d} {r.resources.shared_bytes:6d} {r.occupancy.occupancy:9.0%} "
          f"{r.occupancy.limit:>9s} {r.predicted_seconds * 1e6:12.1f}")

# %% [markdown]
# What the counts say (COUNTED; the times are PREDICTED by the emulator's model):
#
# * **Load requests** fall 55x from naive to tiled and another ~6x to igemm: `float4` loads
#   move 16 bytes per lane per request, which is also why igemm's **sectors per request** rise
#   above 4 (up to 16 when 32 lanes read 512 consecutive bytes).
# * **Shared wavefronts per request** are above 1 for igemm (2.5) without a bank conflict:
#   a `float4` read by 32 lanes is 512 bytes, which the banks (128 bytes per pass) serve in up
#   to 4 wavefronts; "bytes per wavefront" stays at 128, every pass full. The **wmma**
#   kernels average 43-46 bytes per wavefront. Take that count with care: the emulator runs
#   `wmma::load_matrix_sync` as each lane reading its fragment's elements in an order of the
#   emulator's choosing (the hardware's fragment layout is not documented), so how those reads
#   fall on the banks is the emulator's guess. No Nsight Compute counters of the new kernels
#   exist to settle it: the first thing to measure on the next GPU run.
# * **Registers and occupancy**: bigger register tiles cost registers. igemm uses 80 per thread
#   (38% occupancy), wmma 148 (19%): the register file limits both. They trade latency hiding
#   (fewer warps to switch to) for more work per instruction, and win on the large layers.
# * **The PREDICTED times** here are for this tiny layer, where a launch of 8-20 blocks uses
#   a fraction of 132 SMs (tiled's 8 blocks are predicted slower than naive's 128). The
#   emulator's timing model (docs/emulator.md) predicts the *old* kernels' step within 1% on
#   both networks measured with Nsight Compute; it has **not** been checked against igemm, wmma
#   or the GEMM weight gradients (no base-8 ncu run of them exists), so take these as
#   untested predictions.
#
# ### The weight gradient
#
# The old step spent 56% of its kernel time in `conv3x3_grad_weight_serial`: one thread per
# weight, each adding 2 loads per FMA over all pixels. As a GEMM, a block stages 32 pixels
# of gy (64 channels) and of im2col(x) (64 columns), 4,096 values for 64 x 64 x 32 = 131,072
# FMAs (32 per staged value), and each thread's 4 x 4 tile does 16 FMAs per 8 reads:

# %%
print("the weight gradient of the 64 -> 64 layer at 570^2: MEASURED on an H200, backward ms (input + weight gradient)")
shape = LAYERS["64 -> 64 at 570^2"]
for reduction in ("serial", "tree", "gemm"):
    print(f"  minunet, reduction={reduction:7s} {ops['fp32', 'conv3x3_backward', f'reduction={reduction}', shape][0]:6.2f}")
print(f"  minunet, reduction=gemm, tf32  {ops['tf32', 'conv3x3_backward', 'reduction=gemm', shape][0]:6.2f}")
print(f"  cuDNN strict FP32 {ops['fp32', 'conv3x3_backward', 'auto', shape][2]:6.2f}, "
      f"cuDNN TF32 {ops['tf32', 'conv3x3_backward', 'auto', shape][2]:6.2f}")

# %% [markdown]
# ### The paper step, before and after (MEASURED, H200)
#
# `final/paper_step.txt`: one training step of the paper's network, minunet against
# PyTorch/cuDNN, each precision with its own cuDNN run (median of 5). "Before" is the step of
# the old kernels, from the first run of the day (above).

# %%
def step_summary(path):
    """minunet.bench's "training step vs PyTorch" lines: {precision: (minunet ms, {library: ms})} (MEASURED)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"minunet (\w+):\s+([\d.]+) ms \| (.+?):\s+([\d.]+) ms .*?\| (.+?):\s+([\d.]+) ms", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), {m.group(3): float(m.group(4)), m.group(5): float(m.group(6))})
    return out


after = step_summary(RUN2 / "final" / "paper_step.txt")
before = steps["base 64, tile 572, batch 1"]
bars = {                                 # each pair measured in the same run of the same script
    "minunet, before (old kernels)": before["minunet cuda"],
    "minunet fp32, after": after["fp32"][0],
    "cuDNN strict FP32": after["fp32"][1]["PyTorch cuDNN strict FP32 (allow_tf32 off)"],
    "minunet tf32, after": after["tf32"][0],
    "cuDNN TF32": after["tf32"][1]["PyTorch cuDNN TF32 (allow_tf32 on)"],
}
fig, ax = plt.subplots(figsize=(8, 2.6))
names = list(bars)[::-1]
colors = {"min": "tab:blue", "cuD": "tab:gray"}
ax.barh(names, [bars[k] for k in names], color=[colors[k[:3]] for k in names])
for k, name in enumerate(names):
    ax.text(bars[name], k, f" {bars[name]:.1f}", va="center", fontsize=9)
ax.set_xlim(0, 1.15 * max(bars.values()))
ax.set_xlabel("ms per training step, MEASURED on an H200 (median)")
ax.set_title("the paper's network (base 64, 572 tile, batch 1): before and after the fast kernels")
plt.tight_layout(); plt.show()
for precision, (ms, libraries) in after.items():
    print(f"minunet {precision}: {ms:6.2f} ms | " + " | ".join(f"{lib}: {t:.2f} ms ({ms / t:.2f}x)" for lib, t in libraries.items()))

# %% [markdown]
# From 173.5 ms to **40.3 ms in strict FP32** (4.3x) and **34.1 ms with TF32**. On the default
# network (base 16, 348 tile; `final/default_step.txt`) minunet's fp32 step (6.53 ms) is now on
# par with cuDNN's strict FP32 (6.74 ms) and TF32 (6.30 ms); its tf32 step is slower (9.31 ms:
# the tensor-core kernels do not pay off on small layers).
#
# ### Where the paper step's kernel time goes now (MEASURED, Nsight Compute)
#
# `ncu_fp32.csv` / `ncu_tf32.csv`: every launch of one paper training step, timed with
# unmodified clocks (the old step's 220 ms were at base clocks, up to ~1.25x slower):

# %%
def kernel_shares(folder, name):
    """Nsight Compute's per-launch times summed per kernel: ({kernel: ms}, total ms) (MEASURED)."""
    per_kernel = defaultdict(float)
    for launch in ncu_launches(name, folder).values():
        per_kernel[launch["kernel"]] += launch["gpu__time_duration.sum"] / 1e6
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])), sum(per_kernel.values())


fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
for ax, (precision, name) in zip(axes, (("fp32", "ncu_fp32.csv"), ("tf32", "ncu_tf32.csv"))):
    shares, total = kernel_shares(RUN2, name)
    top = list(shares.items())[:5]
    print(f"{precision}: {total:.1f} ms of kernel time in one paper step (Nsight Compute, H200, unmodified clocks)")
    for kernel, ms in top:
        print(f"  {kernel:40s} {ms:7.2f} ms {ms / total:6.1%}")
    labels = ["everything else"] + [k for k, _ in top][::-1]            # the largest on top
    values = [total - sum(ms for _, ms in top)] + [ms for _, ms in top][::-1]
    ax.barh(labels, values, color=["tab:gray"] + ["tab:blue"] * len(top))
    for k, ms in enumerate(values):
        ax.text(ms, k, f" {ms / total:.0%}", va="center", fontsize=8)
    ax.set_xlim(0, 1.2 * max(values))
    ax.set_xlabel("ms of kernel time, MEASURED (ncu)")
    ax.set_title(f"paper step, minunet {precision}: {total:.1f} ms")
    ax.tick_params(axis="y", labelsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# ### What is still behind cuDNN, and the next step
#
# * **Strict FP32: 1.34x** (40.3 against 30.0 ms). Half the kernel time is igemm (35 launches:
#   the forward pass and the input gradient, one code) at ~33 TFLOP/s, half of the FP32 peak; a third is the weight-gradient GEMM, whose backward
#   (1.86 ms with the input gradient on the wide layer) already beats cuDNN's (2.16 ms) but not
#   on the deep layer (1.85 against 1.20 ms). The other 16% are igemm's deep tile (4%) and many
#   small launches.
# * **TF32: 3x** (34.1 against 11.5 ms). The wmma kernels reach ~44 TFLOP/s of the data sheet's
#   ~495 TFLOP/s dense TF32: 9%. They stage tiles with ordinary loads and a barrier, feed
#   each 16 x 16 x 8 `wmma` product from shared memory, and use 148 registers (19% occupancy). cuDNN reaches 82-168 TFLOP/s on the same layers.
# * **The next step** is the tensor-core pipeline of Hopper-class GPUs: asynchronous copies
#   (`cp.async`, which the emulator already runs and checks, or TMA) that load the next tile
#   while the tensor cores work on this one, a shared-memory layout measured free of bank
#   conflicts, bigger warp tiles (64 x 64 per
#   warp instead of 16 x 16 fragments) and the `mma.sync`/`wgmma` instructions that `wmma` only
#   partly exposes. Each is one idea, with its own napkin math, for a kernel v5.
# * **The prediction model** has to be checked against these kernels before it can guide that
#   work: an Nsight Compute run of the base-8 network with the new versions forced, read by
#   `python -m minunet.bench --calibrate`, as was done for naive and tiled.
#
# ## What to take away
#
# * U-Net's large convolutions are compute-bound; what makes a kernel slow is redundant
#   traffic (tiling removes ~40x of the requests), idle SMs, and arithmetic on CUDA cores
#   where cuDNN uses tensor cores.
# * The emulator's counts (requests, sectors, wavefronts, registers, theoretical occupancy)
#   match the GPU's. Its timing model, which adds launch cost, partial waves and latency that
#   too few warps cannot hide to the roofline, predicts the old kernels' steps within 1%; it
#   is not yet checked against igemm, wmma and the GEMM weight gradients.
# * The paper's step on the H200 (MEASURED): 173.5 ms -> 40.3 ms in strict FP32 (cuDNN 30.0),
#   34.1 ms with TF32 (cuDNN 11.5): bigger register tiles and GEMM weight gradients closed most
#   of the gap; tensor cores used well (9% of peak so far) are the rest.
# * Occupancy is resident warps over the maximum; registers per thread limit it here, and
#   a grid smaller than the GPU limits the *achieved* occupancy far more.
# * Measured and predicted numbers are different things; every time in this notebook says
#   which it is and where it comes from.
