"""Occupancy and a predicted time per launch for a named GPU, from ptxas's resource report and the
emulator's counts.

``kernel_resources(code, name, options, arch)`` compiles a source with ``nvcc -cubin
--resource-usage`` (no GPU needed) and returns each kernel's registers per thread and static
shared memory per block, as ptxas allocated them; results are cached on disk next to the
emulator's libraries. ``occupancy(gpu, threads, registers, shared_bytes)`` is the CUDA occupancy
calculator's arithmetic: how many blocks of a kernel fit on one multiprocessor at once, limited by
warps, blocks, registers (allocated per warp in units of 256) and shared memory (allocated per
block in units of 128 bytes, plus 1 KiB the runtime reserves per block on compute capability 8.0
and later): the *theoretical* occupancy.

``predict_launch(gpu, launch)`` turns one launch's counts into a *predicted* time -- a model,
never a measurement (docs/emulator.md, "The timing model", explains each term):

    time = launch floor + max(latency, issue, L1, shared, L2, DRAM)

- launch: the fixed cost of any launch (the grid is set up, the blocks are dispatched, the end is
  signalled), however small the kernel;
- latency: waves x the critical path of the busiest thread (its first global load from DRAM, then
  its L1 hits, L1 misses and shared loads, each at its latency, one after another: a thread waits
  for a load before it uses it, and with a few warps per multiprocessor nothing else hides the
  wait). Waves: the blocks one multiprocessor must run, ceil(blocks / multiprocessors), in groups
  of the blocks resident at once (the occupancy calculator's limit): 8 blocks use 8
  multiprocessors for the whole kernel;
- issue: the warp instructions the busiest multiprocessor issues (memory requests, and FMAs when
  the caller gives FLOPs), 4 per cycle (4 schedulers);
- L1: the 128-byte lines the busiest multiprocessor's global requests touch (one tag lookup
  each: 1 for a coalesced request, up to 32 for a scattered one), l1_lines_per_clock per cycle;
- shared: the shared-memory wavefronts of the busiest multiprocessor, one per cycle;
- L2: the sectors that miss L1, at the L2's bandwidth;
- DRAM: the distinct bytes read (the caches start empty: Nsight Compute flushes them before each
  kernel), plus the bytes written when the launch's working set exceeds the L2 (else they stay
  there), at DRAM bandwidth.

Constants are the GPU's published figures and a few physical ones (clock, launch floor,
latencies, the L1's lines per cycle); none is fitted to a kernel. The GPU figures are NVIDIA's
(A100 SXM4 80 GB, H100 SXM5 80 GB and H200 SXM 141 GB data sheets, the CUDA C++ Programming
Guide's table of compute-capability limits). The latencies were chosen, in round numbers, on one
network measured on an H200 (docs/emulator.md, "The timing model"): the L1-hit and shared ones
are close to what microbenchmarks report for Hopper (Luo et al. 2024, "Benchmarking and
Dissecting the Nvidia Hopper GPU Architecture"); the L1-miss one is an effective cost, below an L2
round trip, because the misses of one loop iteration overlap.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .compiler import cache_dir


@dataclass(frozen=True)
class GPU:
    name: str
    arch: str
    multiprocessors: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int
    register_unit: int              # registers are allocated per warp in multiples of this
    max_registers_per_thread: int
    shared_per_sm: int              # bytes, largest carveout
    shared_reserved_per_block: int  # bytes the CUDA runtime keeps per block
    shared_unit: int                # shared memory allocation granularity, bytes
    fp32_flops: float               # peak FLOP/s on CUDA cores (FMA = 2 FLOPs)
    tf32_flops: float               # peak dense TF32 tensor-core FLOP/s
    dram_bandwidth: float           # bytes/s
    l2_bytes: int = 50 * 2**20      # L2 cache size
    clock_hz: float = 1.59e9        # SM clock the cycles are counted at: the base clock (Nsight Compute locks it)
    boost_hz: float = 1.98e9        # the clock of the published peak FLOP/s
    l2_bytes_per_clock: float = 5120.0   # L2 bandwidth (A100 white paper: 5120 B/clk)
    launch_floor_s: float = 2.3e-6  # the least a launch takes, however small (a 1-thread kernel)
    l1_hit_cycles: float = 35.0     # a global load that hits L1, as the thread waits for it
    l2_cycles: float = 120.0        # one that misses L1 and is served by L2 (overlapping the next loads)
    dram_cycles: float = 1000.0     # a thread's first global load: from DRAM (the caches start empty)
    shared_cycles: float = 30.0     # a shared-memory load
    store_cycles: float = 4.0       # a store: issued, never waited for
    l1_lines_per_clock: float = 2.0  # 128-byte lines of global requests the L1 serves per cycle per SM


# Base clocks: A100 SXM4 1095 MHz, H100 SXM5 and H200 SXM 1590 MHz (boost 1410 / 1980 MHz).
GPUS = {
    "sm_80": GPU("A100 SXM4 80GB", "sm_80", 108, 64, 32, 65536, 256, 255, 164 * 1024, 1024, 128,
                 19.5e12, 156e12, 2.039e12, l2_bytes=40 * 2**20, clock_hz=1.095e9, boost_hz=1.41e9),
    "sm_90": GPU("H100 SXM5 80GB", "sm_90", 132, 64, 32, 65536, 256, 255, 228 * 1024, 1024, 128,
                 67e12, 494.7e12, 3.35e12, l2_bytes=50 * 2**20, clock_hz=1.59e9),
    "h200": GPU("H200 SXM 141GB", "sm_90", 132, 64, 32, 65536, 256, 255, 228 * 1024, 1024, 128,
                67e12, 494.7e12, 4.8e12, l2_bytes=60 * 2**20, clock_hz=1.59e9),
}
ALIASES = {"a100": "sm_80", "h100": "sm_90"}


def gpu(name: str) -> GPU:
    """The GPU for ``"sm_80"`` (A100), ``"sm_90"`` (H100) or ``"h200"``; also ``"a100"``,
    ``"h100"`` (ValueError otherwise)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r} for the profiler; use one of {', '.join([*GPUS, *ALIASES])}")
    return GPUS[key]


@dataclass(frozen=True)
class Resources:
    registers: int       # per thread
    shared_bytes: int    # static shared memory per block
    spill_bytes: int     # spill stores + loads (local memory traffic ptxas could not avoid)


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float     # active warps / the multiprocessor's maximum (theoretical)
    limit: str           # what limits it: "warps", "blocks", "registers", "shared memory"


def occupancy(g: GPU, threads_per_block: int, registers: int, shared_bytes: int) -> Occupancy:
    """Blocks and warps of one kernel resident on one multiprocessor of ``g`` at once."""
    if threads_per_block < 1 or registers < 0 or shared_bytes < 0:
        raise ValueError("occupancy needs threads_per_block >= 1 and registers, shared_bytes >= 0")
    warps = math.ceil(threads_per_block / 32)
    limits = {"warps": g.max_warps_per_sm // warps, "blocks": g.max_blocks_per_sm}
    if registers > 0:
        per_warp = math.ceil(registers * 32 / g.register_unit) * g.register_unit
        limits["registers"] = (g.registers_per_sm // per_warp) // warps
    per_block = math.ceil((shared_bytes + g.shared_reserved_per_block) / g.shared_unit) * g.shared_unit
    limits["shared memory"] = g.shared_per_sm // per_block
    limit = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    blocks = max(limits[limit], 0)
    return Occupancy(blocks, blocks * warps, blocks * warps / g.max_warps_per_sm, limit)


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_resource_usage(text: str) -> dict[str, Resources]:
    """Per kernel, from ptxas's ``-v`` / ``--resource-usage`` lines."""
    found, current, spills = {}, None, 0
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current, spills = m.group(1), 0
        elif current and (m := _SPILL.search(line)):
            spills = int(m.group(1)) + int(m.group(2))
        elif current and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            found[current] = Resources(int(m.group(1)), int(smem.group(1)) if smem else 0, spills)
    return found


def nvcc() -> str | None:
    return shutil.which("nvcc")


def kernel_resources(code: str, name: str, options: tuple[str, ...], arch: str) -> dict[str, Resources] | None:
    """ptxas's registers and static shared memory of every kernel in ``code`` for ``arch``
    ("sm_80"), or None when nvcc is not installed or the source does not compile with it."""
    tool = nvcc()
    if tool is None:
        return None
    flags = ["-std=c++17", f"-arch={arch}", "-cubin", "--resource-usage", *options]
    key = hashlib.sha256("\0".join([code, tool, *flags]).encode()).hexdigest()[:24]
    cached = cache_dir() / "resources" / f"{key}.json"
    if cached.is_file():
        return {k: Resources(**v) for k, v in json.loads(cached.read_text()).items()}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / (Path(name).name if name.endswith(".cu") else "module.cu")
        source.write_text(code)
        include = [f"-I{Path(name).resolve().parent}"] if Path(name).is_file() else []
        done = subprocess.run([tool, *flags, *include, "-o", str(Path(tmp) / "out.cubin"), str(source)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        return None
    found = parse_resource_usage(done.stdout + done.stderr)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps({k: asdict(v) for k, v in found.items()}))
    os.replace(tmp_path, cached)
    return found


@dataclass
class LaunchCounts:
    """One launch as the model sees it (``profiler.LaunchProfile`` fills it from the emulator)."""

    blocks: int
    threads_per_block: int
    thread_global_loads: float = 0.0    # of the busiest thread (the most accesses of all its block's)
    thread_global_stores: float = 0.0
    thread_shared_loads: float = 0.0
    thread_shared_stores: float = 0.0
    l1_hit_fraction: float = 0.0        # of the busiest sampled thread's global loads: L1 hits
    global_lines: float = 0.0           # 128-byte lines of all global requests (L1 tag lookups)
    global_load_requests: float = 0.0   # warp-level, whole launch
    global_load_sectors: float = 0.0
    global_store_requests: float = 0.0
    global_store_sectors: float = 0.0
    shared_requests: float = 0.0
    shared_wavefronts: float = 0.0
    dram_read_bytes: float = 0.0        # distinct sectors read, x 32
    dram_write_bytes: float = 0.0
    flops: float = 0.0                  # FP32 FLOPs on CUDA cores, when the caller knows them (FMA = 2)
    tensor_flops: float = 0.0           # tensor-core FLOPs (counted: wmma::mma_sync)
    occupancy: Occupancy | None = None  # ptxas's resources on this GPU; None: warps and blocks limits only


@dataclass(frozen=True)
class Prediction:
    seconds: float                # PREDICTED, never measured
    bound: str                    # the binding term: launch, latency, issue, L1, shared, L2 or DRAM
    terms: dict                   # term -> seconds ("launch" is the floor, added to the largest other)
    waves: int                    # rounds of resident blocks on the busiest multiprocessor
    resident_blocks: int          # blocks resident at once on the busiest multiprocessor
    achieved_occupancy: float     # average active warps / maximum, over the multiprocessors in use
    theoretical_occupancy: float  # the occupancy calculator's


TERMS = ("launch", "latency", "issue", "L1", "shared", "L2", "DRAM")


def predict_launch(g: GPU, c: LaunchCounts) -> Prediction:
    """The predicted time of one launch: the launch floor plus the largest of the latency, issue,
    L1, shared, L2 and DRAM terms (module docstring; docs/emulator.md)."""
    blocks = max(int(c.blocks), 1)
    warps = math.ceil(max(c.threads_per_block, 1) / 32)
    occ = c.occupancy if c.occupancy is not None and c.occupancy.blocks_per_sm > 0 else \
        occupancy(g, max(c.threads_per_block, 1), 0, 0)
    per_sm = math.ceil(blocks / g.multiprocessors)          # blocks the busiest SM runs
    resident = max(1, min(occ.blocks_per_sm, per_sm))
    waves = math.ceil(per_sm / resident)
    in_use = min(blocks, g.multiprocessors)
    achieved = min(blocks / (in_use * waves), resident) * warps / g.max_warps_per_sm
    share = per_sm / blocks                                  # the busiest SM's share of the work
    first = 1.0 if c.thread_global_loads > 0 else 0.0         # the thread's first load: from DRAM
    per_load = c.l1_hit_fraction * g.l1_hit_cycles + (1.0 - c.l1_hit_fraction) * g.l2_cycles
    chain = (first * g.dram_cycles + (c.thread_global_loads - first) * per_load
             + c.thread_shared_loads * g.shared_cycles
             + (c.thread_global_stores + c.thread_shared_stores) * g.store_cycles)
    instructions = c.global_load_requests + c.global_store_requests + c.shared_requests + c.flops / 64
    tensor_per_clock = g.tf32_flops / (g.multiprocessors * g.boost_hz)     # per SM
    missed = c.global_load_sectors * (1 - c.l1_hit_fraction) + c.global_store_sectors
    written = c.dram_write_bytes if c.dram_read_bytes + c.dram_write_bytes > g.l2_bytes else 0.0
    terms = {"launch": g.launch_floor_s,
             "latency": waves * chain / g.clock_hz,
             "issue": (instructions / 4 + c.tensor_flops / tensor_per_clock) * share / g.clock_hz,
             "L1": c.global_lines * share / g.l1_lines_per_clock / g.clock_hz,
             "shared": c.shared_wavefronts * share / g.clock_hz,
             "L2": 32 * missed / (g.l2_bytes_per_clock * g.clock_hz),
             "DRAM": (c.dram_read_bytes + written) / g.dram_bandwidth}
    slowest = max(TERMS[1:], key=lambda t: terms[t])
    bound = slowest if terms[slowest] > terms["launch"] else "launch"
    return Prediction(terms["launch"] + terms[slowest], bound, terms, waves, resident, achieved, occ.occupancy)


def roofline(g: GPU, blocks: int, flops: float, tensor_flops: float, dram_bytes: float) -> tuple[float, str]:
    """The FLOP/byte roofline alone, the model's old lower bound (predict_launch adds latency,
    waves, the launch floor and the caches): (predicted seconds, "compute" or "memory"), the larger
    of the compute time (tensor-core
    FLOPs at the TF32 peak, the rest at the FP32 peak) and the DRAM time, each divided by the
    share of multiprocessors that ``blocks`` blocks can occupy (a launch of 8 blocks keeps 8 of
    132 busy)."""
    busy = min(1.0, max(blocks, 1) / g.multiprocessors)
    compute = (tensor_flops / g.tf32_flops + max(flops - tensor_flops, 0.0) / g.fp32_flops) / busy
    memory = dram_bytes / g.dram_bandwidth / busy
    return (compute, "compute") if compute > memory else (memory, "memory")
