"""Occupancy and a roofline time for a named GPU, from ptxas's resource report.

``kernel_resources(code, name, options, arch)`` compiles a source with ``nvcc -cubin
--resource-usage`` (no GPU needed) and returns each kernel's registers per thread and static
shared memory per block, as ptxas allocated them; results are cached on disk next to the
emulator's libraries. ``occupancy(gpu, threads, registers, shared_bytes)`` is the CUDA occupancy
calculator's arithmetic: how many blocks of a kernel fit on one multiprocessor at once, limited by
warps, blocks, registers (allocated per warp in units of 256) and shared memory (allocated per
block in units of 128 bytes, plus 1 KiB the runtime reserves per block on compute capability 8.0
and later). ``roofline(...)`` turns counted work into a *predicted* time -- a model, never a
measurement: max(FLOPs / peak FLOP/s, bytes / peak DRAM bandwidth), both scaled by the share of
multiprocessors a launch with that few blocks can keep busy.

The GPU figures are NVIDIA's published ones (A100 SXM4 80 GB and H100 SXM5 80 GB data sheets and
the CUDA C++ Programming Guide's table of compute-capability limits).
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


GPUS = {
    "sm_80": GPU("A100 SXM4 80GB", "sm_80", 108, 64, 32, 65536, 256, 255, 164 * 1024, 1024, 128,
                 19.5e12, 156e12, 2.039e12),
    "sm_90": GPU("H100 SXM5 80GB", "sm_90", 132, 64, 32, 65536, 256, 255, 228 * 1024, 1024, 128,
                 67e12, 494.7e12, 3.35e12),
}


def gpu(name: str) -> GPU:
    """The GPU for ``"sm_80"`` or ``"sm_90"`` (ValueError otherwise)."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r} for the profiler; use one of {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class Resources:
    registers: int       # per thread
    shared_bytes: int    # static shared memory per block
    spill_bytes: int     # spill stores + loads (local memory traffic ptxas could not avoid)


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float     # active warps / the multiprocessor's maximum
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


def roofline(g: GPU, blocks: int, flops: float, tensor_flops: float, dram_bytes: float) -> tuple[float, str]:
    """(predicted seconds, "compute" or "memory"): the larger of the compute time (tensor-core
    FLOPs at the TF32 peak, the rest at the FP32 peak) and the DRAM time, each divided by the
    share of multiprocessors that ``blocks`` blocks can occupy (a launch of 8 blocks keeps 8 of
    132 busy)."""
    busy = min(1.0, max(blocks, 1) / g.multiprocessors)
    compute = (tensor_flops / g.tf32_flops + max(flops - tensor_flops, 0.0) / g.fp32_flops) / busy
    memory = dram_bytes / g.dram_bandwidth / busy
    return (compute, "compute") if compute > memory else (memory, "memory")
