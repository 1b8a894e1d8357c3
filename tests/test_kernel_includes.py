"""Local headers of the CUDA sources (``#include "gemm_tiles.cuh"``): inlined into the ``.cu``
text before NVRTC or the emulator compile it (``minunet.emulator.source.inline_local_includes``),
followed by ``cu_defines`` and by ``KernelBackend.reload``, and the shared weight-gradient header
really is the one place of its constants."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from minunet.backends.kernels import KernelBackend
from minunet.backends.sources import cu_defines, kernels_dir, read_kernel
from minunet.emulator import EmuModule
from minunet.emulator.source import inline_local_includes

GEMM_FILES = ("conv3x3", "conv1x1", "conv_transpose2x2")

HEADER = """\
// header.cuh
#ifndef HEADER_CUH
#define HEADER_CUH
#include "inner.cuh"
#define HEADER_THREADS (INNER_WIDTH * 2)
__device__ __forceinline__ int header_line() { return __LINE__; }   // line 6 of header.cuh
template <int N>
__device__ __forceinline__ float block_sum(float v) {   // a shared-memory tree, as the gemm headers use
    __shared__ float s[N];
    s[threadIdx.x] = v;
    __syncthreads();
    for (int stride = N / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    return s[0];
}
#endif
"""
INNER = "#define INNER_WIDTH 16\n"
MAIN = """\
/* #include "missing_in_a_comment.cuh" stays a comment */
#include "header.cuh"
#include "header.cuh"
#include "not_here.cuh"
#define MAIN_BLOCK (HEADER_THREADS + 0)
extern "C" __global__ void probe(float* out, int* lines) {
    const float total = block_sum<MAIN_BLOCK>(1.0f + threadIdx.x);
    if (threadIdx.x == 0) { out[0] = total; lines[0] = header_line(); lines[1] = __LINE__; }   // line 8
}
"""


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "header.cuh").write_text(HEADER)
    (tmp_path / "inner.cuh").write_text(INNER)
    (tmp_path / "main.cu").write_text(MAIN)
    return tmp_path


def test_headers_are_inlined_once_recursively_with_line_directives(sources):
    text, files = inline_local_includes(MAIN.replace('#include "not_here.cuh"\n', ""), [sources], "main.cu")
    assert files == ((sources / "header.cuh").resolve(), (sources / "inner.cuh").resolve())
    assert text.count("#define HEADER_THREADS") == 1 and text.count("#define INNER_WIDTH") == 1
    assert "missing_in_a_comment" in text                      # a comment is not an include
    assert '#line 1 "header.cuh"' in text and '#line 1 "inner.cuh"' in text
    assert '#line 4 "header.cuh"' in text                      # back in header.cuh after inner.cuh
    assert '#line 2 "main.cu"' in text                         # back in main.cu after header.cuh
    assert not re.search(r'^\s*#\s*include\s*"(header|inner)\.cuh"', text, re.M)


def test_a_header_not_found_is_left_to_the_compiler(sources):
    text, files = inline_local_includes('#include "not_here.cuh"\n#include <mma.h>\n', [sources], "x.cu")
    assert text == '#include "not_here.cuh"\n#include <mma.h>\n' and files == ()


def test_the_emulator_compiles_a_file_with_its_headers(sources):
    """From a path, the emulator finds the header beside the file, rewrites its __shared__ array
    (the tree gives the right sum) and reports the lines of the file each line came from."""
    source = (sources / "main.cu").read_text().replace('#include "not_here.cuh"\n', "\n")
    module = EmuModule(source, name=str(sources / "main.cu"))
    out, lines = np.zeros(1, np.float32), np.zeros(2, np.int32)
    module.get_function("probe")((1,), (32,), (out, lines))
    assert out[0] == sum(1.0 + t for t in range(32))
    assert list(lines) == [6, 8]


def test_an_edited_header_is_compiled_again_after_reload(sources, monkeypatch):
    """The backend's module cache follows the headers of a file, not only the file itself."""
    import minunet.backends.kernels as kernels_module
    import minunet.backends.sources as sources_module

    (sources / "main.cu").write_text(MAIN.replace('#include "not_here.cuh"\n', "\n"))
    monkeypatch.setattr(kernels_module, "kernels_dir", lambda: sources)
    monkeypatch.setattr(sources_module, "kernels_dir", lambda: sources)
    backend = KernelBackend("emu")

    def launch(threads: int) -> float:
        out, lines = np.zeros(1, np.float32), np.zeros(2, np.int32)
        backend.launch("main", "probe", (1,), (threads,), (out, lines))
        return float(out[0])

    assert launch(32) == sum(1.0 + t for t in range(32))
    assert cu_defines("main")["MAIN_BLOCK"] == 32               # through header.cuh and inner.cuh
    (sources / "inner.cuh").write_text("#define INNER_WIDTH 8\n")
    os.utime(sources / "inner.cuh", ns=(0, 10**9))                # a distinct modification time
    assert launch(32) == sum(1.0 + t for t in range(32))        # not looked at before reload()
    assert backend.reload() == [str(sources / "main.cu")]
    assert launch(16) == sum(1.0 + t for t in range(16))        # the tree of the new 16-float array
    assert cu_defines("main")["MAIN_BLOCK"] == 16
    assert backend.reload() == []


def test_weight_gradient_tiles_live_in_the_shared_header():
    """The three convolutions include gemm_tiles.cuh and define none of its WG_* / WT_* tile
    constants themselves (one place); the launchers still read them through cu_defines."""
    header = (kernels_dir() / "gemm_tiles.cuh").read_text()
    for name in GEMM_FILES:
        _, files = read_kernel(name)
        assert [f.name for f in files] == [f"{name}.cu", "gemm_tiles.cuh"]
        own = (kernels_dir() / f"{name}.cu").read_text()
        assert not re.search(r"^\s*#\s*define\s+W[GT]_", own, re.M), name
        defines = cu_defines(name)
        for key in ("WG_BM", "WG_BN", "WG_THREADS", "WG_MAX_SLICE", "WG_MIN_SLICE", "WT_BM", "WT_BN", "WT_THREADS"):
            assert re.search(rf"^#define {key} ", header, re.M) and key in defines, (name, key)
    assert cu_defines("conv3x3")["WG_THREADS"] == 256 and cu_defines("conv3x3")["WT_THREADS"] == 128
