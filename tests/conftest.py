"""Shared test helpers: seeded random arrays and tolerance checks that print the mismatches."""
from __future__ import annotations

import zlib

import numpy as np
import pytest


def assert_close(actual, expected, rtol: float, atol: float, what: str = "") -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere, NaN exactly where the expected
    value is NaN; print the first mismatches."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bad = diff > atol + rtol * np.abs(expected.astype(np.float64))
    bad |= np.isnan(actual) != np.isnan(expected)  # NaN - x is NaN, and NaN > tol is False
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = "; ".join(f"{tuple(int(k) for k in i)}: got {actual[tuple(i)]:.7g}, "
                         f"want {expected[tuple(i)]:.7g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.size} elements differ beyond "
                             f"atol={atol} + rtol={rtol}*|ref| (max abs diff {diff.max():.3g}); {rows}")


def source_line(source: str, marker: str) -> int:
    """The 1-based line of ``source`` that contains ``marker`` (tests that check reported source
    lines follow edits of the kernel file this way)."""
    hits = [i + 1 for i, line in enumerate(source.splitlines()) if marker in line]
    assert len(hits) == 1, f"{marker!r} is on lines {hits}"
    return hits[0]


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name: reproducible from run to run
    (CRC-32 of the node id; Python's ``hash`` of a string is salted per process) and different
    per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _precision_restored():
    """A test that calls minunet.set_precision (a CLI's --precision, say) leaves the next test
    the precision it found: fp32 unless MINUNET_PRECISION says otherwise."""
    from minunet.backends import kernels

    saved = kernels._PRECISION_DEFAULT
    before = {id(b): b.precision for b in list(kernels._BACKENDS)}
    yield
    kernels._PRECISION_DEFAULT = saved
    default = kernels._precision_choice(saved, "MINUNET_PRECISION")
    for backend in list(kernels._BACKENDS):   # those made during the test too (get_backend's)
        backend.precision = before.get(id(backend), default)


def compile_with_cuda_headers(source: str, name: str, arch: str) -> str:
    """PTX of ``source`` compiled by NVRTC for ``arch`` with the options CuPy uses on a GPU,
    the CUDA toolkit's headers included (<mma.h>, <cuda_pipeline.h>); skips the test where NVRTC
    or the toolkit's headers are not installed."""
    from minunet.backends import nvrtc_check
    from minunet.backends.kernels import CUDA_OPTIONS, cuda_options
    from minunet.backends.sources import cuda_include_dir

    try:
        nvrtc_check.find_libnvrtc()
    except nvrtc_check.NvrtcNotFound as exc:
        pytest.skip(f"NVRTC not installed: {exc}")
    if cuda_include_dir() is None:
        pytest.skip("the CUDA toolkit's headers (<mma.h>) are not installed; NVRTC needs them")
    assert cuda_options()[:len(CUDA_OPTIONS)] == CUDA_OPTIONS
    return nvrtc_check.nvrtc_compile(source, name, arch, cuda_options())
