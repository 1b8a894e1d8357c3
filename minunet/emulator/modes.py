"""The emulator's process-wide defaults: its mode, the thread-order seed, the race checker and
the number of OS threads fast mode uses. Each is read once from the environment and can be
changed from Python; ``EmuModule`` arguments override them per module.

=====================  ==========================  =============================================
setting                environment variable         Python
=====================  ==========================  =============================================
mode                   ``MINUNET_EMU_MODE``         ``emu_mode()``, ``set_emu_mode("fast")``
                       (``checked`` or ``fast``,
                       default ``checked``)
shuffle seed           ``MINUNET_EMU_SEED``         ``shuffle_seed()``, ``set_shuffle_seed(7)``
                       (an integer, default 0;
                       ``off`` or -1: index order)
race checker           ``MINUNET_EMU_RACECHECK``    ``racecheck()``, ``set_racecheck(False)``
                       (``on``/``off``, default on)
fast-mode OS threads   ``MINUNET_EMU_THREADS``      ``workers()``, ``set_workers(4)``
                       (default: the usable cores)
=====================  ==========================  =============================================
"""
from __future__ import annotations

import os

MODES = ("checked", "fast")
DEFAULT_SEED = 0


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _mode_from_env() -> str:
    text = os.environ.get("MINUNET_EMU_MODE", "").strip().lower() or "checked"
    if text not in MODES:
        raise ValueError(f"MINUNET_EMU_MODE={text!r} is not an emulator mode; use 'checked' or 'fast'")
    return text


def _seed_from_env() -> int:
    text = os.environ.get("MINUNET_EMU_SEED", "").strip().lower()
    if text in ("", "default"):
        return DEFAULT_SEED
    if text in ("off", "none", "no", "-1"):
        return -1
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"MINUNET_EMU_SEED={text!r} is not an integer; use e.g. 0, 7 or 'off'") from None


def _racecheck_from_env() -> bool:
    text = os.environ.get("MINUNET_EMU_RACECHECK", "").strip().lower()
    if text in ("", "1", "on", "yes", "true"):
        return True
    if text in ("0", "off", "no", "false"):
        return False
    raise ValueError(f"MINUNET_EMU_RACECHECK={text!r} is not on/off; use 'on' or 'off'")


def _workers_from_env() -> int:
    text = os.environ.get("MINUNET_EMU_THREADS", "").strip()
    if not text:
        return _usable_cores()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"MINUNET_EMU_THREADS={text!r} is not a positive integer; use e.g. 2")
    return int(text)


_state: dict[str, object] = {}


def _get(key: str, read):
    if key not in _state:
        _state[key] = read()
    return _state[key]


def emu_mode() -> str:
    """The process-wide default mode, "checked" or "fast" (from ``MINUNET_EMU_MODE``, default
    "checked"): what ``EmuModule(..., mode=None)`` uses when it is created.

    checked: every load and store is checked (bounds per buffer and per shared-array dimension,
        alignment, races), thread order is shuffled, shared memory poisoned; one OS thread.
    fast: no per-access checks, an optimised build, blocks spread over the CPU cores, fibers only
        for kernels with barriers or warp collectives; for long runs such as training."""
    return _get("mode", _mode_from_env)


def set_emu_mode(mode: str) -> None:
    """Change the default mode for modules created from now on ("checked" or "fast")."""
    if mode not in MODES:
        raise ValueError(f"emulator mode {mode!r} is not one of {', '.join(MODES)}; use 'checked' or 'fast'")
    _state["mode"] = mode


def shuffle_seed() -> int:
    """The default thread-order seed (``MINUNET_EMU_SEED``, default 0; -1 = index order)."""
    return _get("seed", _seed_from_env)


def set_shuffle_seed(seed: int) -> None:
    """Change the default seed; modules created with ``shuffle_seed=None`` follow it at their
    next launch (so a test can rerun kernels of cached modules under other seeds)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"shuffle seed must be an int (-1 for index order), got {seed!r}")
    _state["seed"] = seed


def racecheck() -> bool:
    """Whether checked mode records accesses to find races (``MINUNET_EMU_RACECHECK``, default on).
    It keeps shadow state per byte of shared memory and of every written global buffer; long
    checked runs may switch it off."""
    return _get("racecheck", _racecheck_from_env)


def set_racecheck(on: bool) -> None:
    """Switch the race checker on or off for launches from now on (modules with ``racecheck=None``)."""
    if not isinstance(on, bool):
        raise ValueError(f"racecheck must be True or False, got {on!r}")
    _state["racecheck"] = on


def workers() -> int:
    """OS threads fast mode spreads blocks over (``MINUNET_EMU_THREADS``, default: usable cores)."""
    return _get("workers", _workers_from_env)


def set_workers(n: int) -> None:
    """Change the number of OS threads fast mode uses."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"workers must be a positive int, got {n!r}")
    _state["workers"] = n
