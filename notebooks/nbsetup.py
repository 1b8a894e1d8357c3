"""The setup every notebook runs in its first code cell: ``from nbsetup import F, mu, np, plt``.

Importing this module, in the notebook's kernel (working directory ``notebooks/``):

- puts the repository root first on ``sys.path`` when it holds the package
  (``minunet/__init__.py``), so the notebooks use this checkout's ``minunet`` even where the
  package is not installed; a copied ``notebooks/`` folder elsewhere (say next to an unrelated
  folder named ``minunet``) leaves ``sys.path`` alone and imports the installed package;
- sets NumPy's printing to fit a line and seeds the global random generators (the notebooks draw
  from their own seeded ``np.random.default_rng``; the seeds only pin anything else), so a rebuild
  prints the same numbers on the same machine (elsewhere, float rounding that depends on the
  CPU and the thread count can change the last digits, and in notebook 8's training more than
  that: its settings are chosen so that the loss falls all the same);
- sets readable plotting defaults (100 dpi, 9 pt text, nothing smaller than 8 pt) and, inside
  IPython, shows figures as 256-colour PNGs: they look
  the same at a third of the bytes, keeping the committed notebooks small (tests/test_notebooks.py
  checks the size), and carry no matplotlib version or date, so a rebuild gives the same bytes;
- offers ``machine()``, the line naming the CPU every timing in a notebook was measured on
  (timings only hold on the machine that made them).
"""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_checkout(root: Path = ROOT) -> bool:
    """Put ``root`` first on ``sys.path`` if it is a minunet checkout; True when it is one.

    Only a folder holding ``minunet/__init__.py`` counts: a folder that merely contains a
    directory named ``minunet`` would otherwise shadow the installed package with an empty
    namespace package ("module 'minunet' has no attribute 'UNet'")."""
    if not (root / "minunet" / "__init__.py").is_file():
        return False
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return True


use_checkout()

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import minunet as mu  # noqa: E402
import minunet.functional as F  # noqa: E402

__all__ = ["F", "mu", "np", "plt", "compact_png", "machine"]

SEED = 0
# 100 dpi and text of at least 8 pt: a figure stays readable on the web page at its natural size
PLOT_DEFAULTS = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.titlesize": 9,
                 "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
                 "legend.fontsize": 8, "figure.titlesize": 9, "image.interpolation": "nearest"}


def machine() -> str:
    """The CPU this process runs on, as one line: model, usable cores, widest SIMD, load.

    Every timing a notebook prints is followed by this line: a time measured on a 2-core
    AVX-512 VM shared with other work says little about a laptop, and nothing about a GPU."""
    import os
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        import platform
        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model}, {cores} cores" + (f" ({simd})" if simd else "") + load


def compact_png(fig) -> bytes:
    """A figure as a 256-colour PNG without metadata (small, and the same bytes every run)."""
    raw, small = io.BytesIO(), io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight")
    Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
        small, format="png", optimize=True)
    return small.getvalue()


def _use_compact_png(ipython) -> None:
    """Show figures in this IPython kernel as compact PNGs."""
    ipython.run_line_magic("config", "InlineBackend.figure_formats = ['png']")
    # the inline backend installs its PNG formatter with the first figure: replace it after that
    plt.close(plt.figure())
    ipython.display_formatter.formatters["image/png"].type_printers[plt.Figure] = compact_png


def setup() -> None:
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    np.random.seed(SEED)
    random.seed(SEED)
    plt.rcParams.update(PLOT_DEFAULTS)
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: nothing to display into
        return
    ipython = get_ipython()
    if ipython is not None and hasattr(ipython, "display_formatter"):
        _use_compact_png(ipython)


setup()
