"""Turn the runtime's failure report (``emu::Report`` in ``emu_state.h``) into one clear message:
what went wrong, in which kernel, by which CUDA thread, on which argument or array and element,
at which source line."""
from __future__ import annotations

import numpy as np

from .lines import source_line

# The values of emu::Failure.
(OUT_OF_BOUNDS, WRITE_TO_CONST, WILD_ACCESS, STACK_OVERFLOW, ARITHMETIC, BARRIER_DIVERGENCE, BARRIER_EXIT,
 DEVICE_ASSERT, SETUP, SHARED_OUT_OF_BOUNDS, SHARED_INDEX, MISALIGNED, RACE, SHARED_LIMIT, WARP_MASK,
 WARP_DIVERGENCE, WARP_EXIT, WARP_ARGUMENT) = range(1, 19)
HAZARDS = {1: "read-after-write", 2: "write-after-read", 3: "write-after-write"}
SPACE_SHARED, SPACE_DYNAMIC_SHARED, SPACE_GLOBAL = 1, 2, 3
SHARED_LIMIT_BYTES = 48 * 1024


def _xyz(v) -> str:
    return f"({v[0]},{v[1]},{v[2]})"


def _element_text(index: int, count: int) -> str:
    if index < 0:
        return f"element {index} ({-index} before the first)"
    if index >= count:
        return f"element {index} ({index - count + 1} past the last, valid 0..{count - 1})"
    return f"element {index}"


def _access(report) -> str:
    if report.is_write < 0 or report.size == 0:
        return "access (caught by a fault)"
    return f"{'write' if report.is_write else 'read'} of {report.size} bytes"


def _at(library: str, pc: int, line: int = 0) -> str:
    """' at line N' / ' (file.cu:N)' when known, else ''."""
    if line > 0:
        return f" on line {line}"
    where = source_line(library, int(pc)) if library and pc else None
    return f" at {where}" if where else ""


def _buffer_text(fn, region: int, offset: int, values, owners, nregions, shared_mem, address: int) -> str:
    if region == nregions:
        return f"the extern __shared__ buffer ({shared_mem} bytes, set by shared_mem=) at byte offset {offset}"
    if not 0 <= region < len(owners):
        return f"address {address:#x}"
    parts = []
    for arg, start in owners[region]:
        array: np.ndarray = values[arg]
        index = (offset - start) // array.itemsize
        parts.append(f"{fn._param(arg)} ({array.dtype} array of {array.size} elements) at "
                     f"{_element_text(index, array.size)}")
    return "; also ".join(parts)


def _shared_text(report) -> str:
    name = report.text.decode(errors="replace")
    decl = report.text2.decode(errors="replace")
    count = report.array_bytes // max(report.element_bytes, 1)
    index = report.offset // max(report.element_bytes, 1)
    return f"__shared__ `{name}` ({decl}; {count} elements, flattened) at {_element_text(index, count)}"


def _race_text(fn, report, values, owners, nregions, shared_mem, library) -> str:
    kind = HAZARDS.get(report.detail, "unknown")
    if report.space == SPACE_SHARED:
        where = _shared_text(report)
    else:
        where = _buffer_text(fn, report.region, report.offset, values, owners, nregions, shared_mem, report.address)
    me, other = _xyz(report.thread), _xyz(report.other_thread)
    my_block, other_block = _xyz(report.block), _xyz(report.other_block)
    verb = "writes" if report.is_write else "reads"
    other_verb = "wrote" if report.other_is_write else "read"
    if report.space == SPACE_GLOBAL and tuple(report.block) != tuple(report.other_block):
        between = (f"thread {other} of block {other_block} {other_verb} it{_at(library, report.other_pc)} "
                   "in the same launch (blocks never synchronise within a launch)")
    else:
        between = (f"thread {other} {other_verb} it{_at(library, report.other_pc)} with no barrier "
                   "(__syncthreads or a __syncwarp naming both) in between")
    same_value = " and the two writes stored different values" if report.detail == 3 else ""
    return (f"race ({kind} hazard) on {where}: thread {me} of block {my_block} {verb} it"
            f"{_at(library, report.pc)}, but {between}{same_value}; make the accesses atomic or "
            "separate them with a barrier")


def _warp_text(report, kind, who) -> str:
    what = report.text.decode(errors="replace")
    other_what = report.text2.decode(errors="replace")
    other = _xyz(report.other_thread)
    line = f" on line {report.line}" if report.line else ""
    other_line = f" on line {report.other_line}" if report.other_line else ""
    if kind == WARP_MASK:
        return (f"{who} calls {what}{line} with mask {report.value & 0xFFFFFFFF:#010x}, which does not "
                f"include its own lane {report.other_value}; every calling lane must be in the mask")
    if kind == WARP_DIVERGENCE:
        if report.other_value == 0 and other_what == "__syncthreads()":
            return (f"{who} waits at {what}{line} (mask {report.value & 0xFFFFFFFF:#010x}) while thread "
                    f"{other} of its mask waits at __syncthreads(){other_line}; the lanes of a mask must "
                    "all reach the same warp collective")
        return (f"{who} waits at {what}{line} (mask {report.value & 0xFFFFFFFF:#010x}) while thread {other} "
                f"of its mask waits at {other_what}{other_line} (mask {report.other_value & 0xFFFFFFFF:#010x}); "
                "every lane named in the mask must reach the same call with the same mask")
    if kind == WARP_EXIT:
        return (f"{who} calls {what}{line}, a warp-wide wmma operation, but thread {other} of its warp "
                f"{other_what}; all 32 lanes of the warp must call it (blocks of a multiple of 32 threads, "
                "no early return)")
    # WARP_ARGUMENT
    if report.detail <= 3:
        return (f"{who} calls {what}{line} with width {report.value}; width must be a power of two "
                "from 1 to 32")
    if report.value == -1:  # a precondition one lane can see alone
        return f"{who} calls {what}{line}: {other_what}"
    return (f"{who} calls {what}{line} with pointer {report.value & (2**64 - 1):#x} while thread "
            f"{other} passes {report.other_value & (2**64 - 1):#x} (or another ldm or layout); every "
            "lane of the warp must pass the same arguments")


def describe_failure(fn, report, values, owners, nregions, shared_mem, seed, launch,
                     library: str = "", mode: str = "checked") -> str:
    """The EmulatorError message for a failed launch of ``fn`` (an EmuFunction)."""
    who = f"thread {_xyz(report.thread)} of block {_xyz(report.block)}"
    where = fn._where()
    order = f"shuffle seed {seed}, launch #{launch} of this kernel" if seed >= 0 else "no shuffling"
    if mode == "fast":
        order = "fast mode: no per-access checks; rerun in checked mode (set_emu_mode('checked')) for details"
    kind = report.failure
    at = _at(library, report.pc)
    if kind == OUT_OF_BOUNDS:
        text = (f"out-of-bounds {_access(report)} by {who}{at}: "
                f"{_buffer_text(fn, report.region, report.offset, values, owners, nregions, shared_mem, report.address)}")
    elif kind == SHARED_OUT_OF_BOUNDS:
        text = f"out-of-bounds {_access(report)} by {who}{at}: {_shared_text(report)}"
    elif kind == SHARED_INDEX:
        name = report.text.decode(errors="replace")
        decl = report.text2.decode(errors="replace")
        dims = decl.count("[")
        which = f"index {report.detail + 1} of {dims} of" if dims > 1 else "the index of"
        hint = (" (each index must stay inside its own dimension, even where the flattened element "
                "exists)" if dims > 1 else "")
        text = (f"out-of-bounds index by {who} on line {report.line}: {which} __shared__ `{name}` "
                f"({decl}) is {report.value}, valid 0..{report.other_value - 1}{hint}")
    elif kind == MISALIGNED:
        if report.space == SPACE_SHARED:
            target = _shared_text(report)
        else:
            target = _buffer_text(fn, report.region, report.offset, values, owners, nregions, shared_mem, report.address)
        text = (f"misaligned {_access(report)} by {who}{at}: address {report.address:#x} is not a multiple of "
                f"{report.size} ({target}); a GPU faults on it (vector types such as float4 need their "
                "natural alignment)")
    elif kind == RACE:
        text = _race_text(fn, report, values, owners, nregions, shared_mem, library)
    elif kind == SHARED_LIMIT:
        text = (f"the kernel uses {report.value} bytes of static __shared__ memory"
                + (f" plus {report.other_value} bytes of dynamic (shared_mem=)" if report.other_value else "")
                + f" per block: more than the {SHARED_LIMIT_BYTES} bytes a GPU allows without opting in "
                f"(ptxas refuses static arrays over the limit); arrays reached: {report.text.decode(errors='replace')}")
    elif kind == WRITE_TO_CONST:
        text = (f"write through a const pointer by {who}{at}: "
                f"{_buffer_text(fn, report.region, report.offset, values, owners, nregions, shared_mem, report.address)}")
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
    elif kind in (WARP_MASK, WARP_DIVERGENCE, WARP_EXIT, WARP_ARGUMENT):
        text = _warp_text(report, kind, who)
    elif kind == DEVICE_ASSERT:
        text = f"device-side {report.text.decode(errors='replace')} in {who}{at}"
    elif kind == SETUP:
        text = "the emulator could not allocate memory for the launch (arguments too large?)"
    else:
        text = f"unknown failure code {kind}"
    return f"{where}: {text} [{order}]"
