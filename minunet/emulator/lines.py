"""Source lines for code addresses in an emulated module, so a report can say where an access is.

Checked builds carry debug line tables (``-g``); the runtime reports the offset of the failing
instruction in the library, and binutils' ``addr2line -i`` maps it to the chain of inlined calls
that produced it. The first frame outside the emulator's own headers is the kernel's line -- in the
``.cu`` file's own numbering, thanks to the ``#line`` directive of the translation unit -- so a
float4 copy or an atomicAdd inlined from ``cuda_emu.h`` is reported at the line that called it.
Without ``addr2line`` (binutils) the reports just leave the line out.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

_EMULATOR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=4096)
def source_line(library: str, offset: int) -> str | None:
    """``"file.cu:42"`` for the instruction at ``offset`` bytes into ``library``, or None."""
    if offset <= 0 or shutil.which("addr2line") is None:
        return None
    # The runtime reports return addresses (just after the call); one byte back is the call itself.
    try:
        done = subprocess.run(["addr2line", "-i", "-e", library, f"{offset - 1:#x}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for text in done.stdout.splitlines():  # innermost first, then the code it was inlined into
        file, _, line = text.strip().rpartition(":")
        line = line.split()[0] if line else ""
        if not file or file.startswith("??") or not line.isdigit() or line == "0":
            continue
        path = Path(file)
        if path.parent == _EMULATOR or path.parent == _EMULATOR / "include":
            continue  # the emulator's own headers: look further out
        return f"{path.name}:{line}"
    return None
