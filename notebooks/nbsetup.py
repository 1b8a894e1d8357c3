"""The setup every notebook runs in its first code cell: ``from nbsetup import F, mu, np, plt``.

Importing this module, in the notebook's kernel (working directory ``notebooks/``):

- puts the repository root first on ``sys.path``, so the notebooks use this checkout's
  ``minunet`` even where the package is not installed;
- sets NumPy's printing to fit a line and seeds the global random generators (the notebooks draw
  from their own seeded ``np.random.default_rng``; the seeds only pin anything else), so a rebuild
  prints the same numbers;
- sets compact plotting defaults and, inside IPython, shows figures as 256-colour PNGs: they look
  the same at a third of the bytes, keeping the committed notebooks small (tests/test_notebooks.py
  checks the size), and carry no matplotlib version or date, so a rebuild gives the same bytes.
"""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import minunet as mu  # noqa: E402
import minunet.functional as F  # noqa: E402

__all__ = ["F", "mu", "np", "plt", "compact_png"]

SEED = 0
PLOT_DEFAULTS = {"figure.dpi": 80, "savefig.dpi": 80, "font.size": 9, "image.interpolation": "nearest"}


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
