"""Compile a CUDA C source for the CPU with the system C++ compiler, and cache the result.

``build(code, name, options, mode)`` returns a ``Build``: the loaded shared library
(``ctypes.CDLL``) and the kernels it exports. The library is keyed by a SHA-256 of everything that
shapes it (the translation unit, every emulator header, the compiler and its flags), stored as
``<cache>/<name>-<hash>.so`` where ``<cache>`` is ``$MINUNET_CACHE_DIR/emu`` or
``~/.cache/minunet/emu``, and written atomically (compile to a temporary name, then
``os.replace``), so parallel test processes never see half a library. The generated ``.cpp`` is
kept next to it for reading and debugging.

Flags, and why:
    -std=c++17 -shared -fPIC -pthread  a loadable library; C++17 for `inline` variables, `if constexpr`
    -I<emulator> -I<emulator>/include  cuda_emu.h and the runtime; <mma.h>, <cuda_fp16.h> for kernels
    -fvisibility=hidden                only the entry points are exported; each module keeps its own runtime
    -fno-strict-aliasing               kernels may reinterpret bits (as CUDA code often does)
    -U_FORTIFY_SOURCE                  the runtime siglongjmps out of fibers, which fortify's check rejects
    -fstack-clash-protection           a large local array touches each stack page in turn, so a fiber
                                       that outgrows its stack hits its guard page (STACK_OVERFLOW)
  checked mode (-DEMU_CHECKED=1):
    -O2 -g -gdwarf-4, or -O0 ...       -g: line tables with inlining, so a failing access is reported with
                                       its source line even inside inlined helpers (DWARF 4: binutils 2.40's
                                       addr2line misreads GCC 12's DWARF 5 file names); -O0 when
                                       MINUNET_EMU_DEBUG=1, so gdb can step through
    -fsanitize=thread --param ...      calls our check before every load/store (GCC only; see emu_check.h);
                                       compiled to an object, then linked without libtsan
  fast mode (-DEMU_CHECKED=0):
    -O3                                no checks at all; blocks run on several OS threads
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CompilerNotFoundError, EmulatorError
from .source import KernelInfo, find_kernels, inline_local_includes, translation_unit

HEADER_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = HEADER_DIR / "include"   # the emulator's <mma.h>, <cuda_fp16.h>, ...
MODES = ("checked", "fast")
_GCC_ACCESS_HOOKS = ("-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0",
                     "--param", "tsan-distinguish-volatile=0")
_ALLOWED_OPTION = re.compile(r"^-[DUI]\S+$")

_compile_count = 0            # how many times this process ran the compiler (the cache test reads it)
_loaded: dict[str, "Build"] = {}  # libraries already loaded in this process, by cache key


@dataclass(frozen=True)
class Build:
    """A compiled, loaded module: the library and its kernels (name -> KernelInfo)."""

    library: ctypes.CDLL
    kernels: dict[str, KernelInfo]
    path: Path
    mode: str = "checked"


def compile_count() -> int:
    """The number of compiler runs in this process (cache hits do not count)."""
    return _compile_count


def cache_dir() -> Path:
    """``$MINUNET_CACHE_DIR/emu`` if set, else ``~/.cache/minunet/emu``."""
    root = os.environ.get("MINUNET_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "minunet"
    return base / "emu"


def debug_build() -> bool:
    """MINUNET_EMU_DEBUG=1 compiles with -O0 -g so a debugger can step through kernels."""
    return os.environ.get("MINUNET_EMU_DEBUG", "").strip() not in ("", "0")


def find_compiler() -> list[str]:
    """The C++ compiler command: ``$CXX`` if set (it must exist), else g++, c++ or clang++."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        command = shlex.split(cxx)
        if shutil.which(command[0]) is None:
            raise CompilerNotFoundError(
                f"the C++ compiler CXX={cxx!r} was not found; set CXX to an installed compiler "
                "or unset it (then g++ is used; install it with `apt-get install g++`)")
        return command
    for candidate in ("g++", "c++", "clang++"):
        if shutil.which(candidate):
            return [candidate]
    raise CompilerNotFoundError(
        "the CUDA emulator needs a C++17 compiler and found none (g++, c++, clang++); "
        "install one (`apt-get install g++`) or set CXX")


@functools.lru_cache(maxsize=8)
def _compiler_identity(command: tuple[str, ...]) -> str:
    """The first line of ``--version`` (part of the cache key: another compiler, another build)."""
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise CompilerNotFoundError(f"cannot run the C++ compiler {command[0]!r} ({exc}); "
                                    "install g++ (`apt-get install g++`) or set CXX") from exc
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else command[0]


def headers() -> list[Path]:
    """Every header the emulator compiles into a module (part of the cache key)."""
    return sorted(HEADER_DIR.glob("*.h")) + sorted(INCLUDE_DIR.glob("*.h"))


def _flags(identity: str, mode: str = "checked") -> list[str]:
    flags = ["-std=c++17", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing",
             "-U_FORTIFY_SOURCE", "-fstack-clash-protection", "-w"]
    if mode == "fast":
        return flags + ["-DEMU_CHECKED=0"] + (["-O0", "-g"] if debug_build() else ["-O3"])
    flags += ["-DEMU_CHECKED=1"]
    flags += ["-O0", "-g", "-gdwarf-4", "-fno-omit-frame-pointer"] if debug_build() else ["-O2", "-g", "-gdwarf-4"]
    if "clang" not in identity.lower():  # GCC: exact checks (clang: faults on unmapped memory only)
        flags += list(_GCC_ACCESS_HOOKS)
    return flags


def _check_options(options: tuple[str, ...], name: str) -> list[str]:
    for option in options:
        if not isinstance(option, str) or not _ALLOWED_OPTION.match(option):
            raise ValueError(f"option {option!r} for module {name!r} is not supported by the emulator: "
                             "use -DNAME[=VALUE], -UNAME or -I<dir> (written as one string)")
    return list(options)


def _first_errors(stderr: str, limit: int = 3) -> str:
    """The first few `error:` lines with the source line the compiler quotes under each."""
    lines = stderr.splitlines()
    picked, errors = [], 0
    for i, line in enumerate(lines):
        if "error" in line and errors < limit:
            picked.extend(lines[i:i + 3])
            errors += 1
    return "\n".join(picked) if picked else "\n".join(lines[:12])


def build(code: str, name: str, options: tuple[str, ...] = (), mode: str = "checked") -> Build:
    """Compile ``code`` for ``mode`` ("checked" or "fast"), or reuse the cached library, and load it."""
    global _compile_count
    if mode not in MODES:
        raise ValueError(f"emulator mode {mode!r} is not one of {', '.join(MODES)}")
    extra = _check_options(tuple(options), name)
    source_path = Path(name)
    if source_path.is_file():  # a real file: let #include "x.cuh" and gdb find its folder
        extra.append(f"-I{source_path.resolve().parent}")
        label = str(source_path.resolve())
    else:
        label = name
    # #include "x.cuh" of a header beside the file or in a -I folder: its text in place (so the
    # rewrites below reach it, and the cache key below changes when it does)
    # (searched like a compiler's quoted includes: the file's own folder first, then the -I options)
    folders = [Path(option[2:]) for option in extra if option.startswith("-I")]
    code, _ = inline_local_includes(code, folders[-1:] + folders[:-1] if source_path.is_file() else folders, label)
    kernels = find_kernels(code)
    unit = translation_unit(code, label, kernels)
    command = find_compiler()
    identity = _compiler_identity(tuple(command))
    flags = _flags(identity, mode) + extra
    # The working directory is part of the key when the source's name is relative: the library's
    # debug information records it (DW_AT_comp_dir), and a relative file name in the line tables
    # is resolved through it, so a library built from another folder would report the wrong
    # lines. A real file's #line names are absolute, so its library serves every folder (the
    # notebooks, run from notebooks/, reuse the test suite's kernels instead of compiling them again).
    where = "" if Path(label).is_absolute() else os.getcwd()
    key_text = "\0".join([unit, *[h.read_text() for h in headers()],
                          " ".join(command), identity, " ".join(flags), where])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    if key in _loaded:
        return _loaded[key]

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", source_path.name or "module")
    library_path = directory / f"{stem}-{mode}-{key}.so"
    if not library_path.is_file():
        fd, tmp_cpp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".cpp", dir=directory)
        tmp_so = tmp_cpp[:-4] + ".so"
        try:
            with os.fdopen(fd, "w") as f:
                f.write(unit)
            tmp_o = tmp_cpp[:-4] + ".o"
            run = subprocess.run([*command, *flags, f"-I{HEADER_DIR}", f"-I{INCLUDE_DIR}", "-c", tmp_cpp, "-o", tmp_o],
                                 capture_output=True, text=True)
            if run.returncode == 0:  # link without the sanitizer's runtime library: the hooks are ours
                run = subprocess.run([*command, "-shared", "-pthread", tmp_o, "-o", tmp_so, "-ldl"],
                                     capture_output=True, text=True)
            _compile_count += 1
            if run.returncode != 0:
                raise EmulatorError(
                    f"compiling {name} for the CUDA emulator failed ({command[0]} exit status "
                    f"{run.returncode}):\n{_first_errors(run.stderr)}")
            os.replace(tmp_cpp, library_path.with_suffix(".cpp"))
            os.replace(tmp_so, library_path)  # atomic: readers see no library or a whole one
        finally:
            for leftover in (tmp_cpp, tmp_so, tmp_cpp[:-4] + ".o"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    library = ctypes.CDLL(str(library_path))
    result = Build(library, {k.name: k for k in kernels}, library_path, mode)
    _loaded[key] = result
    return result
