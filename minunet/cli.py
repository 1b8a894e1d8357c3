"""What the command-line entry points share: one-line errors and exit statuses, help that shows
the defaults, and checks of options worded for the command line.

Bad input (a missing folder, a corrupt checkpoint, an invalid tile size, ...) is reported as one
line, ``error: <what is wrong>; <how to fix it>``, with exit status 2 - never a traceback. The
library raises ValueError for such problems; this wrapper turns them into that line.
"""
from __future__ import annotations

import argparse
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


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, e.g. "(default: 1500)"; options whose default is
    None or False (computed later, or a switch) say it in their own help text instead."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "%(default)" not in text and "default" not in text):
            text += " (default: %(default)s)"
        return text


def check_tile(tile: int, depth: int, option: str = "--tile") -> int:
    """The output side of a valid input tile; otherwise a ValueError that names the two nearest
    valid values of the command-line option."""
    from .nn import UNet

    try:
        return UNet.output_size(tile, depth)
    except ValueError:
        pass
    step, smallest = 2 ** depth, UNet.valid_input_size(1, depth)
    valid = [s for s in range(max(1, tile - step), tile) if _is_valid(s, depth)]
    above = UNet.valid_input_size(tile, depth)
    choices = f"{option} {valid[-1]} or {option} {above}" if valid else f"{option} {above}"
    raise ValueError(f"{option} {tile} is not a valid tile size for a depth-{depth} U-Net (valid "
                     f"sizes are {smallest}, {smallest + step}, {smallest + 2 * step}, ...: every "
                     f"pooled size must be even); use {choices}")


def _is_valid(size: int, depth: int) -> bool:
    from .nn import UNet

    try:
        UNet.output_size(size, depth)
        return True
    except ValueError:
        return False


def device_arg(value: str) -> str:
    """Validate a --device value early (argparse calls this), keeping 'auto' as is."""
    from .devices import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
