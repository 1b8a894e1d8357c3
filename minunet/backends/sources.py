"""Find and read the CUDA C sources in the top-level ``kernels/`` folder.

The same ``.cu`` text is compiled by CuPy/NVRTC on a GPU (``device="cuda"``) and by the system C++
compiler against minunet's emulation header (``device="emu"``). In a source checkout the files sit
in ``<repo>/kernels``; an installed minunet carries them as the data package ``minunet.kernels``.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path


@functools.lru_cache(maxsize=1)
def kernels_dir() -> Path:
    """The folder that holds ``*.cu``: the checkout's ``kernels/`` first, else the installed copy.
    Found once per process (every kernel launch asks for it; the search costs tens of us)."""
    checkout = Path(__file__).resolve().parents[2] / "kernels"
    if checkout.is_dir() and any(checkout.glob("*.cu")):
        return checkout
    try:
        installed = Path(str(resources.files("minunet.kernels")))
    except ModuleNotFoundError:  # pragma: no cover - only in a broken install
        installed = None
    if installed is not None and installed.is_dir():
        return installed
    raise FileNotFoundError(
        "minunet cannot find its CUDA sources (kernels/*.cu); reinstall with `pip install -e .`"
    )


@functools.lru_cache(maxsize=1)
def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder, or None: NVRTC does not ship ``<mma.h>`` (nvcuda::wmma)
    or ``<cuda_pipeline.h>``, so the tensor-core kernels need it on the include path. Looked for
    in $CUDA_HOME, $CUDA_PATH, beside ``nvcc`` and in /usr/local/cuda."""
    import os
    import shutil

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):
        candidates.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if (Path(root) / "include" / "crt" / "mma.h").is_file():
            return Path(root) / "include"
    return None


def kernel_files() -> list[Path]:
    """Every ``.cu`` file, sorted by name."""
    return sorted(kernels_dir().glob("*.cu"))


def read_kernel(name: str) -> tuple[str, tuple[Path, ...]]:
    """The text of ``kernels/<name>.cu`` (``name`` with or without the suffix) with its local
    headers (``#include "gemm_tiles.cuh"``) inlined, and the files it was made of: the ``.cu``
    file, then the headers. This text is what CuPy's NVRTC and the emulator compile: one text
    on every path, and their caches, keyed by the text, see a header's edits
    (``minunet.emulator.source.inline_local_includes``)."""
    from ..emulator.source import inline_local_includes

    stem = name[:-3] if name.endswith(".cu") else name
    path = kernels_dir() / f"{stem}.cu"
    if not path.is_file():
        known = ", ".join(p.stem for p in kernel_files())
        raise FileNotFoundError(f"no kernel file {path.name} in {path.parent}; known: {known}")
    text, headers = inline_local_includes(path.read_text(), [path.parent], path.name)
    return text, (path, *headers)


def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>.cu``, its local headers inlined (``read_kernel``)."""
    return read_kernel(name)[0]


def cu_defines(name: str) -> dict[str, int]:
    """The integer ``#define`` constants of ``kernels/<name>.cu`` and of the local headers it
    includes (``kernel_source``: the weight-gradient tiles WG_* / WT_* are gemm_tiles.cuh's),
    evaluated in order.

    A launch configuration must agree with the tile and block sizes a kernel was written for;
    reading them from the ``.cu`` file (instead of copying them into Python) keeps each constant
    in one place. A definition may use earlier ones and integer arithmetic:
    ``#define TILE_H (BLOCK_ROWS * ROWS_PER_THREAD)`` (``/`` is C's integer division). Function-like
    macros and non-integer values are skipped."""
    import ast
    import re

    values: dict[str, int] = {}
    for line in kernel_source(name).splitlines():
        found = re.match(r"\s*#\s*define\s+([A-Za-z_]\w*)\s+(.*)", line)
        if found is None:
            continue
        key, expr = found.group(1), found.group(2).split("//")[0].strip().replace("/", "//")
        expr = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: str(values.get(m.group(0), m.group(0))), expr)
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError:
            continue
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
                   ast.FloorDiv, ast.Mod, ast.USub, ast.LShift, ast.RShift)
        if all(isinstance(node, allowed) for node in ast.walk(tree)):
            value = eval(compile(tree, name, "eval"))  # integers and arithmetic only (checked above)
            if isinstance(value, int):
                values[key] = value
    return values


def function_source(file: str, name: str, comment: bool = True) -> str:
    """The definition of the function ``name`` (a ``__global__`` kernel or a ``__device__``
    helper, template or not) in ``kernels/<file>.cu``, exactly as written: from its first line
    (``template <...>``, ``extern "C" __global__ ...``) to its closing brace, with the ``//``
    comment block just above it when ``comment`` is true. The notebooks print kernels with it, so
    what a reader sees is the code that runs."""
    import re

    from ..emulator.source import blank_comments_and_strings, matching_bracket

    text = kernel_source(file)
    clean = blank_comments_and_strings(text)  # same length: positions carry over to `text`
    for found in re.finditer(rf"\b{re.escape(name)}\s*\(", clean):
        close = matching_bracket(clean, found.end() - 1)
        body = re.compile(r"[^;{}()]*\{").match(clean, close + 1)  # `) {` or `) const {`: a definition
        if body is None:
            continue  # a call or a declaration
        end = matching_bracket(clean, body.end() - 1) + 1
        lines = text[:found.start()].split("\n")
        start_line = len(lines) - 1
        # Earlier lines of the same declaration: `template <int N>`, `extern "C" __global__ void`.
        while start_line > 0 and lines[start_line - 1].strip() and \
                not lines[start_line - 1].lstrip().startswith(("//", "#")) and \
                not lines[start_line - 1].rstrip().endswith((";", "}", "{")):
            start_line -= 1
        while comment and start_line > 0 and lines[start_line - 1].lstrip().startswith("//"):
            start_line -= 1
        start = len("\n".join(lines[:start_line])) + (1 if start_line else 0)
        return text[start:end]
    raise KeyError(f"no definition of {name!r} in kernels/{file.removesuffix('.cu')}.cu")
