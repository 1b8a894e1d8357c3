"""Turn the runtime's failure report (``emu::Report`` in ``emu_runtime.h``) into one clear message:
what went wrong, in which kernel, by which CUDA thread, on which argument and element."""
from __future__ import annotations

import numpy as np

# The values of emu::Failure.
OUT_OF_BOUNDS, WRITE_TO_CONST, WILD_ACCESS, STACK_OVERFLOW, ARITHMETIC = 1, 2, 3, 4, 5
BARRIER_DIVERGENCE, BARRIER_EXIT, DEVICE_ASSERT, SETUP, SHARED_OUT_OF_BOUNDS = 6, 7, 8, 9, 10


def _xyz(v) -> str:
    return f"({v[0]},{v[1]},{v[2]})"


def _element_text(index: int, count: int) -> str:
    if index < 0:
        return f"element {index} ({-index} before the first)"
    if index >= count:
        return f"element {index} ({index - count + 1} past the last, valid 0..{count - 1})"
    return f"element {index} (inside the array: the access straddles its end)"


def _access(report) -> str:
    if report.is_write < 0 or report.size == 0:
        return "access (caught by a guard page)"
    return f"{'write' if report.is_write else 'read'} of {report.size} bytes"


def _buffer_text(fn, report, values, owners, nregions, shared_mem) -> str:
    if report.region == nregions:
        return (f"the extern __shared__ buffer ({shared_mem} bytes, set by shared_mem=) at byte "
                f"offset {report.offset}")
    if not 0 <= report.region < len(owners):
        return f"address {report.address:#x}"
    parts = []
    for arg, offset in owners[report.region]:
        array: np.ndarray = values[arg]
        item = array.itemsize
        index = (report.offset - offset) // item
        parts.append(f"{fn._param(arg)} ({array.dtype} array of {array.size} elements) at "
                     f"{_element_text(index, array.size)}")
    return "; also ".join(parts)


def describe_failure(fn, report, values, owners, nregions, shared_mem, seed, launch) -> str:
    """The EmulatorError message for a failed launch of ``fn`` (an EmuFunction)."""
    who = f"thread {_xyz(report.thread)} of block {_xyz(report.block)}"
    where = fn._where()
    order = f"shuffle seed {seed}, launch #{launch} of this kernel" if seed >= 0 else "no shuffling"
    kind = report.failure
    if kind == OUT_OF_BOUNDS:
        text = (f"out-of-bounds {_access(report)} by {who}: "
                f"{_buffer_text(fn, report, values, owners, nregions, shared_mem)}")
    elif kind == SHARED_OUT_OF_BOUNDS:
        count = report.array_bytes // max(report.element_bytes, 1)
        index = report.offset // max(report.element_bytes, 1)
        text = (f"out-of-bounds {_access(report)} by {who}: __shared__ array "
                f"`{report.text.decode(errors='replace')}` ({count} elements, flattened) at "
                f"{_element_text(index, count)}")
    elif kind == WRITE_TO_CONST:
        text = (f"write through a const pointer by {who}: "
                f"{_buffer_text(fn, report, values, owners, nregions, shared_mem)}")
    elif kind == WILD_ACCESS:
        text = (f"segmentation fault at address {report.address:#x} by {who}: the address belongs "
                "to no argument (a null or uninitialised pointer, or an index far outside a buffer)")
    elif kind == STACK_OVERFLOW:
        text = (f"{who} overflowed its 64 KiB emulator stack (large local arrays or deep "
                "recursion in the kernel)")
    elif kind == ARITHMETIC:
        text = f"arithmetic fault (integer division by zero) in {who}"
    elif kind == BARRIER_DIVERGENCE:
        text = (f"divergent __syncthreads(): {who} waits at the barrier on line {report.other_line} "
                f"while thread {_xyz(report.other_thread)} waits at line {report.line}; every "
                "thread of a block must reach the same barrier (no __syncthreads() in code only "
                "some threads run)")
    elif kind == BARRIER_EXIT:
        text = (f"{who} returned while thread {_xyz(report.other_thread)} of that block waits at "
                f"__syncthreads() on line {report.line}; every thread of a block must reach each "
                "barrier: instead of returning early, guard the work with `if (i < n)` and let every "
                "thread reach the barrier")
    elif kind == DEVICE_ASSERT:
        text = f"device-side {report.text.decode(errors='replace')} in {who}"
    elif kind == SETUP:
        text = "the emulator could not allocate memory for the launch (arguments too large?)"
    else:
        text = f"unknown failure code {kind}"
    return f"{where}: {text} [{order}]"
