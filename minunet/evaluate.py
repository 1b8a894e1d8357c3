"""Score predictions against ground truth with the challenges' metrics.

    python -m minunet.evaluate --pred preds/ --truth data/labels/ [--json scores.json]

Predictions and truth are paired by sorted file name (multi-page TIFFs by slice). Probability
maps (``*_prob.tif``, written by minunet.predict) are thresholded at every threshold of a sweep and
the best value of each metric is reported, as the ISBI 2012 challenge did; binary masks are
scored as they are. Truth: label images ({0, 255} or class indices, foreground = non-zero) or
instance masks. Hidden files are skipped and NaN or infinite values refused, as in training.
Prints a table and writes JSON (default ``PRED/evaluation.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .cli import HelpFormatter, run

METRICS = ("iou", "pixel_error", "rand_error", "warping_error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.evaluate", formatter_class=HelpFormatter,
                                description="Pixel, Rand and warping error and IoU of predictions.")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predictions")
    p.add_argument("--truth", required=True, metavar="DIR", help="folder of ground-truth labels")
    p.add_argument("--json", metavar="FILE", help="where to write the scores (default PRED/evaluation.json)")
    return p


def pair_files(pred_dir: Path, truth_dir: Path) -> list[tuple[Path, Path]]:
    """(prediction, truth) pairs. Of minunet.predict's outputs the ``NAME_prob`` probability maps
    are taken (not the masks and class maps beside them) and paired with the truth file ``NAME``
    when every truth file has one; otherwise files are paired by sorted name (the "_prob" suffix
    can sort differently from the names it extends: "a_1_prob" < "a_prob" but "a" < "a_1")."""
    from .data.io import image_files

    for name, folder in (("--pred", pred_dir), ("--truth", truth_dir)):
        if not folder.is_dir():
            raise ValueError(f"{name} folder {folder} does not exist")
    preds = image_files(pred_dir)
    probs = [p for p in preds if p.stem.endswith("_prob")]
    preds = probs or preds
    truths = image_files(truth_dir)
    if not preds:
        raise ValueError(f"no PNG or TIFF images in --pred folder {pred_dir}")
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} prediction(s) in {pred_dir} but {len(truths)} truth image(s) in "
                         f"{truth_dir}; they are paired by sorted name, so the counts must match")
    by_name = {p.stem[:-len("_prob")]: p for p in probs}
    if probs and all(t.stem in by_name for t in truths):
        return [(by_name[t.stem], t) for t in truths]
    return list(zip(preds, truths))


def evaluate_pair(pred_path: Path, truth_path: Path) -> list[dict]:
    """Scores for each slice of one (prediction, truth) pair."""
    from .data.io import read_slices
    from .metrics import evaluate_all

    pred = np.stack(read_slices(pred_path))
    truth = np.stack(read_slices(truth_path, as_label=True))
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred_path.name} has shape {pred.shape} but truth "
                         f"{truth_path.name} has {truth.shape}; pair images of the same size")
    if pred.dtype.kind == "f":
        if pred.min() < 0 or pred.max() > 1:
            raise ValueError(f"prediction {pred_path.name} holds floats outside [0, 1]; give "
                             f"probability maps or binary masks")
    else:
        pred = pred > 0
    return [evaluate_all(p, t > 0) for p, t in zip(pred, truth)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    pred_dir, truth_dir = Path(args.pred), Path(args.truth)
    rows = []
    for pred_path, truth_path in pair_files(pred_dir, truth_dir):
        for i, scores in enumerate(evaluate_pair(pred_path, truth_path)):
            rows.append({"prediction": pred_path.name, "truth": truth_path.name, "slice": i, **scores})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    header = f"{'prediction':<28} {'slice':>5} " + " ".join(f"{k:>14}" for k in METRICS)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['prediction'][:28]:<28} {r['slice']:>5} " + " ".join(f"{r[k]:>14.5f}" for k in METRICS))
    print("-" * len(header))
    label = f"mean of {len(rows)} slice(s)"
    print(f"{label:<28} {'':>5} " + " ".join(f"{mean[k]:>14.5f}" for k in METRICS))
    out = Path(args.json) if args.json else pred_dir / "evaluation.json"
    out.write_text(json.dumps({"mean": mean, "images": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
