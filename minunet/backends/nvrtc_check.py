"""Compile checks for kernels/*.cu without a GPU, and nvcc's per-kernel resource report.

Two tools, both usable on a machine with no GPU and no driver:

1. ``nvrtc_compile(source, name, arch)`` compiles one source with NVRTC -- the runtime compiler
   CuPy's ``RawModule`` uses on a GPU -- called directly through ``ctypes`` on the
   ``libnvrtc.so`` that the ``nvidia-cuda-nvrtc`` wheel ships. It passes exactly
   ``minunet.backends.kernels.CUDA_OPTIONS`` plus ``--gpu-architecture=<arch>``, so a file that
   compiles here compiles for CuPy too (tests/test_nvrtc.py runs it for compute_75/80/90).

2. ``resource_report()`` runs ``nvcc -arch=sm_90 -cubin -Xptxas -v`` (when nvcc is on PATH) on
   every file and parses ptxas's lines into one row per kernel: registers per thread, static
   shared memory per block, spill stores/loads (bytes of registers that did not fit and went to
   slow local memory; should be 0) and stack frame. Registers and shared memory decide how many
   blocks fit on one SM at a time (occupancy).

``python -m minunet.backends.nvrtc_check`` does both and prints a table.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .kernels import CUDA_OPTIONS
from .sources import kernel_files, kernel_source

ARCHITECTURES = ("compute_75", "compute_80", "compute_90")


class NvrtcNotFound(RuntimeError):
    """The nvidia-cuda-nvrtc wheel (libnvrtc.so) is not installed."""


class CompileError(RuntimeError):
    """NVRTC rejected a source; the message holds its log."""


def find_libnvrtc() -> Path:
    """libnvrtc.so.* inside the installed NVIDIA wheels (``site-packages/nvidia/*/lib``)."""
    try:
        import nvidia  # a namespace package created by the nvidia-* wheels
    except ImportError:
        raise NvrtcNotFound("the NVRTC library is not installed: pip install nvidia-cuda-nvrtc") from None
    found = []
    for root in nvidia.__path__:
        found += [p for p in Path(root).glob("*/lib/libnvrtc.so*") if "builtins" not in p.name]
    if not found:
        raise NvrtcNotFound("no libnvrtc.so in the nvidia wheels; pip install nvidia-cuda-nvrtc")
    return sorted(found, key=lambda p: (len(p.name), p.name))[-1]  # the most specific version name


@functools.lru_cache(maxsize=1)
def _nvrtc() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(find_libnvrtc()))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def nvrtc_compile(source: str, name: str, arch: str, options: tuple[str, ...] = CUDA_OPTIONS) -> str:
    """Compile ``source`` to PTX for ``arch`` (e.g. "compute_80"); return the PTX text.
    Raises CompileError with NVRTC's log when the source does not compile."""
    lib = _nvrtc()
    program = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result != 0:
            raise CompileError(f"{name}: {what} failed: {lib.nvrtcGetErrorString(result).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}")]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        result = lib.nvrtcCompileProgram(program, len(opts), argv)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(program, log)
        if result != 0:
            raise CompileError(f"{name} does not compile for {arch} with options {list(opts)}:\n"
                               f"{log.value.decode(errors='replace')}")
        ptx_size = ctypes.c_size_t()
        check(lib.nvrtcGetPTXSize(program, ctypes.byref(ptx_size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(ptx_size.value)
        check(lib.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


# ---- nvcc / ptxas resource report ------------------------------------------------------------
@dataclass(frozen=True)
class KernelResources:
    file: str
    kernel: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str, file: str) -> list[KernelResources]:
    """One KernelResources per 'Compiling entry function' block of ``ptxas -v`` output."""
    rows, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "registers": 0, "shared_bytes": 0, "spill_stores": 0,
                       "spill_loads": 0, "stack_bytes": 0}
            rows.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                current["shared_bytes"] = int(s.group(1))
    return [KernelResources(file=file, **row) for row in rows]


def resource_report(arch: str = "sm_90") -> list[KernelResources]:
    """ptxas's registers / shared memory / spills for every kernel of every file (needs nvcc)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH; the resource report needs the CUDA toolkit")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in kernel_files():
            cmd = [nvcc, f"-arch={arch}", "-cubin", "-Xptxas", "-v", *CUDA_OPTIONS,
                   "-o", str(Path(tmp) / f"{path.stem}.cubin"), str(path)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CompileError(f"nvcc failed on {path.name}:\n{done.stderr}")
            rows += parse_ptxas(done.stdout + done.stderr, path.name)
    return rows


def format_table(rows: list[KernelResources]) -> str:
    width = max([32] + [len(r.kernel) for r in rows])   # the column fits the longest kernel name
    header = f"{'file':<22} {'kernel':<{width}} {'regs':>5} {'smem B':>7} {'spill st':>8} {'spill ld':>8} {'stack':>6}"
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r.file, r.kernel)):
        lines.append(f"{r.file:<22} {r.kernel:<{width}} {r.registers:>5} {r.shared_bytes:>7} "
                     f"{r.spill_stores:>8} {r.spill_loads:>8} {r.stack_bytes:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minunet.backends.nvrtc_check",
                                     description="Compile kernels/*.cu with NVRTC and print nvcc's resource report.")
    parser.add_argument("--arch", default="sm_90", help="architecture for the nvcc report (default sm_90)")
    args = parser.parse_args(argv)
    status = 0
    try:
        major, minor = nvrtc_version()
        for path in kernel_files():
            for arch in ARCHITECTURES:
                try:
                    nvrtc_compile(kernel_source(path.name), path.name, arch)
                except CompileError as exc:
                    print(exc, file=sys.stderr)
                    status = 1
        print(f"NVRTC {major}.{minor}: {len(kernel_files())} files x {', '.join(ARCHITECTURES)}: "
              f"{'all compile' if status == 0 else 'FAILURES above'} (options {' '.join(CUDA_OPTIONS)})")
    except NvrtcNotFound as exc:
        print(f"NVRTC check skipped: {exc}")
    try:
        print(f"ptxas resource usage, nvcc -arch={args.arch} -cubin -Xptxas -v:")
        print(format_table(resource_report(args.arch)))
    except FileNotFoundError as exc:
        print(f"resource report skipped: {exc}")
    except CompileError as exc:
        print(exc, file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
