"""Finding the CUDA sources, and cutting one function out of them (what the notebooks print)."""
from __future__ import annotations

import re

import pytest

from minunet.backends.sources import function_source, kernel_files, kernel_source
from minunet.emulator.source import find_kernels


@pytest.mark.parametrize("path", kernel_files(), ids=lambda p: p.name)
def test_every_kernel_can_be_cut_out_whole(path):
    """Each __global__ function of each file: the cut starts at its declaration, holds balanced
    braces, ends at the closing one, and is itself found again by the emulator's kernel finder."""
    for kernel in find_kernels(path.read_text()):
        text = function_source(path.stem, kernel.name, comment=False)
        assert text.startswith('extern "C" __global__'), text[:80]
        assert text.rstrip().endswith("}") and text.count("{") == text.count("}")
        assert [k.name for k in find_kernels(text)] == [kernel.name]
        assert text in kernel_source(path.stem)


def test_template_device_function_with_its_comment():
    text = function_source("conv3x3", "conv3x3_tiled")
    assert re.match(r"(//.*\n)*template <bool GRAD_INPUT>\n__device__", text), text[:200]
    assert "__shared__" in text and text.rstrip().endswith("}")
    # a call of the helper is not its definition
    forward = function_source("conv3x3", "conv3x3_forward_tiled", comment=False)
    assert "conv3x3_tiled<false>" in forward


def test_unknown_function_or_file():
    with pytest.raises(KeyError, match="no definition of 'nope' in kernels/maxpool2x2.cu"):
        function_source("maxpool2x2", "nope")
    with pytest.raises(FileNotFoundError, match="known: "):
        function_source("nope", "x")
