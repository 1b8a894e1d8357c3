"""Every kernels/*.cu compiles with NVRTC -- the compiler CuPy uses on a GPU -- with exactly the
options KernelBackend gives CuPy, for compute capabilities 7.5, 8.0 and 9.0. No GPU or driver is
needed: libnvrtc.so comes from the nvidia-cuda-nvrtc wheel. nvcc's resource report is parsed
and, where nvcc is installed, checked for spills."""
from __future__ import annotations

import re
import shutil

import pytest

from minunet.backends import nvrtc_check
from minunet.backends.kernels import CUDA_OPTIONS
from minunet.backends.sources import kernel_files, kernel_source


@pytest.fixture(scope="module")
def nvrtc():
    try:
        nvrtc_check.find_libnvrtc()
    except nvrtc_check.NvrtcNotFound as exc:
        pytest.skip(f"NVRTC not installed: {exc}")
    return nvrtc_check


def kernel_names(source: str) -> set[str]:
    # __launch_bounds__(THREADS) or (THREADS, MIN_BLOCKS): names, numbers, commas, spaces
    return set(re.findall(r'extern "C" __global__ void(?:\s+__launch_bounds__\([\w\s,]+\))?\s+(\w+)\s*\(', source))


@pytest.mark.parametrize("arch", nvrtc_check.ARCHITECTURES)
@pytest.mark.parametrize("path", kernel_files(), ids=lambda p: p.name)
def test_kernel_file_compiles_with_nvrtc(nvrtc, path, arch):
    source = kernel_source(path.name)   # its local headers inlined: the text CuPy compiles
    ptx = nvrtc.nvrtc_compile(source, path.name, arch, CUDA_OPTIONS)
    target = arch.replace("compute_", "sm_")
    assert f".target {target}" in ptx
    names = kernel_names(source)
    assert names, f"{path.name} defines no extern \"C\" kernels"
    for name in names:  # extern "C": the PTX entry carries the plain name CuPy looks up
        assert f".entry {name}(" in ptx, f"{name} missing from the PTX of {path.name}"


def test_a_broken_kernel_is_reported_with_the_compiler_log(nvrtc):
    source = 'extern "C" __global__ void broken(float* y) { y[threadIdx.x] = undefined_name; }'
    with pytest.raises(nvrtc.CompileError, match="undefined_name"):
        nvrtc.nvrtc_compile(source, "broken.cu", "compute_80")


PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'tiled' for 'sm_90'
ptxas info    : Function properties for tiled
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 21888 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'plain' for 'sm_90'
ptxas info    : Function properties for plain
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
"""


def test_parse_ptxas_output():
    rows = nvrtc_check.parse_ptxas(PTXAS_SAMPLE, "x.cu")
    assert rows == [nvrtc_check.KernelResources("x.cu", "tiled", 48, 21888, 4, 12, 8),
                    nvrtc_check.KernelResources("x.cu", "plain", 10, 0, 0, 0, 0)]
    table = nvrtc_check.format_table(rows)
    assert "tiled" in table and "21888" in table


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA toolkit not installed)")
def test_resource_report_covers_every_kernel_without_spills():
    rows = nvrtc_check.resource_report("sm_90")
    expected = {(p.name, k) for p in kernel_files() for k in kernel_names(p.read_text())}
    assert {(r.file, r.kernel) for r in rows} == expected
    spilling = [r for r in rows if r.spill_stores or r.spill_loads]
    assert not spilling, f"kernels spill registers to local memory: {spilling}"
    assert all(r.shared_bytes <= 48 * 1024 for r in rows)
