"""What the command-line entry points share: one-line errors and exit statuses, help that shows
the defaults, which options a command line gave, checks of options worded for the command line,
and progress reports that suit a terminal and a log file alike.

Bad input (a missing folder, a corrupt checkpoint, an invalid tile size, ...) is reported as one
line, ``error: <what is wrong>; <how to fix it>``, with exit status 2 - never a traceback. The
library raises ValueError for such problems; this wrapper turns them into that line.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

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
        hidden = action.default is None or action.default is False \
            or action.default is argparse.SUPPRESS
        if action.option_strings and not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


def given_options(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The destinations of the options `argv` gives explicitly, as opposed to those argparse
    fills with defaults (so that a resumed run can tell "--lr 0.01" from no --lr at all)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


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
    """Validate a --device value early (argparse calls this), keeping 'auto' as is. A device
    that cannot be used (``cuda`` without CuPy, a misspelt name) stops the command with the one
    line ``error: ...`` and exit status 2, not argparse's usage block before it."""
    from .devices import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        print(f"error: --device {value}: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return value


class Progress:
    """Progress of a training run toward whichever limit it reaches first: `iterations` steps or
    the wall-clock budget of `budget_s` seconds (math.inf: none).

    On a terminal, a tqdm bar of that fraction (so its time estimate is right whichever limit
    ends the run) with the iteration, the budget and the loss after it. Written to a file or a
    pipe, a plain line at every tenth of the way and at least every `every_s` seconds, instead
    of a bar redrawn with carriage returns. `enabled=False` prints nothing."""

    def __init__(self, iterations: int, budget_s: float, iteration: int = 0, elapsed: float = 0.0,
                 enabled: bool = True, stream=None, every_s: float = 60.0):
        self.iterations, self.budget_s, self.every_s = iterations, budget_s, every_s
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.start_fraction = self.fraction(iteration, elapsed)
        self.start_time = self.last_line = time.perf_counter()
        self.next_tenth = math.floor(self.start_fraction * 10) + 1
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            # the text after the bar goes in tqdm's "desc" field: its "postfix" adds a comma
            self.bar = tqdm(total=1000, initial=round(1000 * self.start_fraction), file=self.stream,
                            dynamic_ncols=True, desc="",
                            bar_format="training {percentage:3.0f}%|{bar}| {desc} "
                                       "[{elapsed}<{remaining}]")

    def fraction(self, iteration: int, elapsed: float) -> float:
        by_time = elapsed / self.budget_s if math.isfinite(self.budget_s) else 0.0
        return min(1.0, max(iteration / self.iterations, by_time))

    def describe(self, iteration: int, elapsed: float, loss: float, note: str = "") -> str:
        text = f"iteration {iteration}/{self.iterations}"
        if math.isfinite(self.budget_s):
            text += f", {elapsed / 60:.1f} of {self.budget_s / 60:g} min"
        return text + f", loss {loss:.4f}" + (f", {note}" if note else "")

    def update(self, iteration: int, elapsed: float, loss: float, note: str = "") -> None:
        """`note`: more to show after the loss (the training loop's data and step times)."""
        if not self.enabled:
            return
        fraction = self.fraction(iteration, elapsed)
        if self.bar is not None:
            self.bar.set_description_str(self.describe(iteration, elapsed, loss, note), refresh=False)
            self.bar.update(round(1000 * fraction) - self.bar.n)
            return
        now = time.perf_counter()
        if fraction * 10 < self.next_tenth and now - self.last_line < self.every_s:
            return
        self.next_tenth = math.floor(fraction * 10) + 1
        self.last_line = now
        line = f"training {100 * fraction:3.0f}%: {self.describe(iteration, elapsed, loss, note)}"
        done = fraction - self.start_fraction
        if 0 < done and fraction < 1:
            left = (now - self.start_time) * (1 - fraction) / done
            line += f", about {left / 60:.1f} min left"
        print(line, file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """Print a line of its own (above the bar on a terminal, which stays intact)."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CountBar:
    """Progress over `total` items (tiles, chunks): a tqdm bar on a terminal; written to a file
    or a pipe (a log), a plain line at every tenth of the way and at least every `every_s`
    seconds, never carriage returns; nothing when `enabled` is False or there is one item
    only. A context manager."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, stream=None,
                 every_s: float = 60.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.n, self.next_tenth = enabled and total > 1, 0, 1
        self.last_line = time.perf_counter()
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.n * 10 < self.next_tenth * self.total and now - self.last_line < self.every_s:
            return
        self.next_tenth = self.n * 10 // self.total + 1
        self.last_line = now
        print(f"{self.desc}: {100 * self.n // self.total}% ({self.n} of {self.total} "
              f"{self.unit}s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
