"""PNG figures a training run writes: the loss curve, and input / truth / prediction / weights.

matplotlib with the non-interactive Agg backend, so this works on a headless machine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(iterations, losses, path, val_points=None) -> Path:
    """Training loss per iteration (and a running mean), log-scaled; optional validation marks."""
    plt = _pyplot()
    iterations, losses = np.asarray(iterations), np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(iterations, losses, lw=0.6, alpha=0.4, label="loss (one tile)")
    if len(losses) >= 10:
        k = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(iterations[k - 1:], smooth, lw=1.5, label=f"running mean of {k}")
    if val_points:
        vi, vl = zip(*val_points)
        ax.plot(vi, vl, "o", ms=4, label="validation 1 - IoU")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("weighted cross-entropy (eq. 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def prediction_panels(image, truth, prob, weight=None, classes=None,
                      num_classes: int = 2) -> list[tuple[str, np.ndarray, object]]:
    """The panels of :func:`plot_prediction` as (title, array, colour map): input, ground truth,
    predicted foreground probability, the predicted classes when there are more than two (with
    the truth in the same class colours, :func:`minunet.data.io.class_palette`), and the weight
    map."""
    truth_map = "gray"
    panels = [("input", image, "gray")]
    if classes is not None and num_classes > 2:
        from matplotlib.colors import ListedColormap

        from .data.io import class_palette

        truth_map = ListedColormap(class_palette(num_classes) / 255.0, name="classes")
    panels.append(("truth", truth, truth_map))
    panels.append(("prediction P(foreground)", prob, "magma"))
    if classes is not None and num_classes > 2:
        panels.append((f"predicted class (of {num_classes})", classes, truth_map))
    if weight is not None:
        panels.append(("weight map w(x)", weight, "jet"))
    return panels


def plot_prediction(image, truth, prob, weight, path, title: str = "", classes=None,
                    num_classes: int = 2) -> Path:
    """Panels side by side: input, ground truth, predicted foreground probability, the predicted
    class of each pixel for more than two classes (`classes`, in class colours), weight map."""
    plt = _pyplot()
    panels = prediction_panels(image, truth, prob, weight, classes, num_classes)
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), dpi=100)
    for ax, (name, img, cmap) in zip(np.atleast_1d(axes), panels):
        categorical = not isinstance(cmap, str)
        im = ax.imshow(img, cmap=cmap, interpolation="nearest",
                       **(dict(vmin=-0.5, vmax=cmap.N - 0.5) if categorical else {}))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        if name.startswith("weight"):
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        if name.startswith("predicted class"):
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, ticks=range(cmap.N))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
