"""What the command-line entry points share: one-line errors and exit statuses.

Bad input (a missing folder, a corrupt checkpoint, an invalid tile size, ...) is reported as one
line, ``error: <what is wrong>; <how to fix it>``, with exit status 2 - never a traceback. The
library raises ValueError for such problems; this wrapper turns them into that line.
"""
from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(main, argv=None) -> int:
    """Call ``main(argv)``; turn ValueError/FileNotFoundError into ``error: ...`` and status 2."""
    try:
        return int(main(argv) or 0)
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


def device_arg(value: str) -> str:
    """Validate a --device value early (argparse calls this), keeping 'auto' as is."""
    import argparse

    from .devices import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
