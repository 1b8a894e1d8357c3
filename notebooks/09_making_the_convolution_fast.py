# %% [markdown]
# # 9. Making the convolution fast: measured on a GPU, counted by the emulator
#
# Notebooks 2 and 3 showed *how* minunet's CUDA kernels compute. This one asks *how fast* they
# are, and why. It uses two kinds of numbers, always labelled:
#
# * **MEASURED** on a GPU: one NVIDIA H200, on 2026-12-04, with Nsight Compute (`ncu`) and
#   wall-clock step timings. The files are in
#   [`bench/results/h200-2026-12-04/`](../bench/results/h200-2026-12-04/README.md); this
#   notebook only reads them (it was built on a machine without a GPU).
# * **COUNTED** and **PREDICTED** by minunet's CUDA emulator, run live below on the CPU:
#   memory requests, sectors, shared-memory wavefronts, registers and occupancy are counts
#   of what the kernel does; a time computed from them by a roofline model is a prediction.
#
# The road so far has two steps for the 3x3 convolution: the **naive** kernel (one thread
# per output, notebook 2) and the **tiled** kernel (shared memory and register blocking).
# Faster versions and a better prediction model are being written; the last section is
# their place, and says so until their numbers exist.

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


def ncu_launches(name):
    """Nsight Compute's CSV as {launch id: {"kernel", "grid", metric: value}} (MEASURED)."""
    rows = [line for line in (H200 / name).read_text().splitlines() if line.startswith('"')]
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
    with emulator.profile(gpu="sm_90", sample_blocks=8) as report:
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
# coalescing as the hardware, and no bank conflicts on either side. The **prediction does
# not**: the roofline model predicts about a microsecond; the H200 took about 20 (ncu runs
# at base clocks, up to ~1.3x slower than the wall-clock tables). Why:
#
# * **Too few blocks.** 72 blocks for 132 SMs: 60 SMs idle, and each busy SM holds one block
#   of 8 warps out of 64, which is exactly the **12.5% achieved occupancy** measured. The model
#   assumes the whole GPU works. With 8 warps per SM there is almost nothing to switch to
#   while a warp waits on memory: latency is not hidden, it is paid.
# * **Every launch has a fixed cost** of a few microseconds (the smallest kernels of the
#   step took ~3 us on the H200), more than the whole predicted time.
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
# (MEASURED, H200, median of 5; `torch ms` is PyTorch with its defaults: TF32 convolutions.
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
# ## Next versions of the kernels (a placeholder, to be filled with measured numbers)
#
# Faster convolution kernels and a prediction model that accounts for waves, launch cost and
# occupancy are being written now. When they are merged and **measured on a GPU**, each gets a
# section here with one idea, its napkin math, the emulator's counts, and the predicted and
# measured times side by side. Until then this section holds no results: the numbers above
# are the baseline they have to beat (`bench/results/h200-2026-12-04/`).
#
# ## What to take away
#
# * U-Net's large convolutions are compute-bound; what makes a kernel slow is redundant
#   traffic (tiling removes ~40x of the requests), idle SMs, and arithmetic on CUDA cores
#   where cuDNN uses tensor cores.
# * The emulator's counts (requests, sectors, wavefronts, registers, theoretical occupancy)
#   match the GPU's; its roofline time does not, because it ignores launch cost, partial
#   waves and latency that too few warps cannot hide.
# * Occupancy is resident warps over the maximum; registers per thread limit it here, and
#   a grid smaller than the GPU limits the *achieved* occupancy far more.
# * Measured and predicted numbers are different things; every time in this notebook says
#   which it is and where it comes from.
