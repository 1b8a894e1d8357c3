"""Score predictions against ground truth with the challenges' metrics.

    python -m minunet.evaluate --pred preds/ --truth data/labels/ [--json scores.json]

Predictions and truth are paired by sorted file name (multi-page TIFFs by slice). Of the files
minunet.predict writes for an input ``NAME``, evaluate reads:

- ``NAME_prob.tif``, the probability map: each ISBI 2012 error (pixel, Rand, warping) is the
  best over the thresholds 0.0, 0.1, ..., 0.9, as the challenge ranked entries, and the IoU is
  taken at 0.5; the table shows the threshold each score used, in brackets.
- ``NAME_mask.png`` (``.tif`` for a stack), the mask a user gets: scored as it is, beside the
  best-over-thresholds scores (a mask at one threshold scores worse than the best of ten). If it
  is missing, the map is thresholded as predict does (``>= --threshold``).
- ``NAME_classes.png`` / ``.tif`` (networks of more than two classes): the IoU of every class
  against the truth's class indices.
- ``NAME_instances.png`` / ``.tif`` (networks trained with ``--instances``): the cell tracking
  challenge's SEG against the truth's instance labels, pooled over all true cells. With
  ``--instances`` and no such file, the cells are the 4-connected components of the mask.

A folder of plain masks (no ``_prob`` files) is scored as it is. Truth: label images ({0, 255}
or class indices, foreground = non-zero) or instance masks. Hidden files are skipped and NaN or
infinite values refused, as in training. Prints tables and writes JSON (default
``PRED/evaluation.json``): ``mean`` and ``images`` hold the four headline scores (the best over
thresholds for probability maps), ``delivered``, ``class_iou`` and ``seg`` the others.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .cli import HelpFormatter, run

METRICS = ("iou", "pixel_error", "rand_error", "warping_error")
#: The files minunet.predict writes beside NAME_prob.tif, by kind.
COMPANIONS = ("mask", "classes", "instances")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.evaluate", formatter_class=HelpFormatter,
                                description="Pixel, Rand and warping error and IoU of predictions "
                                "(and per-class IoU and SEG where predict wrote classes or cells).")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predictions")
    p.add_argument("--truth", required=True, metavar="DIR", help="folder of ground-truth labels")
    p.add_argument("--json", metavar="FILE", help="where to write the scores (default PRED/evaluation.json)")
    p.add_argument("--threshold", type=float, default=0.5, help="predict's --threshold: gives "
                   "the delivered mask (map >= threshold) where no NAME_mask file was written")
    p.add_argument("--instances", action="store_true", help="the truth holds instance labels (0 = "
                   "background, 1..K = cells): report SEG also without NAME_instances files")
    return p


def _kind_of(path: Path) -> tuple[str, str | None]:
    """(NAME, kind) of a predict output ``NAME_kind.ext``; (stem, None) for any other file."""
    for kind in ("prob",) + COMPANIONS:
        if path.stem.endswith("_" + kind):
            return path.stem[:-len(kind) - 1], kind
    return path.stem, None


def companion(pred_path: Path, kind: str) -> Path | None:
    """The file of `kind` that predict wrote beside `pred_path` (``NAME_kind.png`` or .tif)."""
    name, _ = _kind_of(pred_path)
    for suffix in (".png", ".tif", ".tiff"):
        path = pred_path.with_name(f"{name}_{kind}{suffix}")
        if path.is_file() and path != pred_path:
            return path
    return None


def pair_files(pred_dir: Path, truth_dir: Path) -> list[tuple[Path, Path]]:
    """(prediction, truth) pairs. Of minunet.predict's outputs the ``NAME_prob`` probability maps
    are taken (else the ``NAME_mask`` masks; the class and instance maps beside them are read as
    companions) and paired with the truth file ``NAME`` when every truth file has one; otherwise
    files are paired by sorted name (the "_prob" suffix can sort differently from the names it
    extends: "a_1_prob" < "a_prob" but "a" < "a_1")."""
    from .data.io import image_files

    for name, folder in (("--pred", pred_dir), ("--truth", truth_dir)):
        if not folder.is_dir():
            raise ValueError(f"{name} folder {folder} does not exist")
    files = image_files(pred_dir)
    by_kind = {kind: [p for p in files if _kind_of(p)[1] == kind] for kind in ("prob", "mask")}
    main_kind = "prob" if by_kind["prob"] else "mask" if by_kind["mask"] else None
    preds = by_kind[main_kind] if main_kind else \
        [p for p in files if _kind_of(p)[1] not in ("classes", "instances")] or files
    truths = image_files(truth_dir)
    if not preds:
        raise ValueError(f"no PNG or TIFF images in --pred folder {pred_dir}")
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} prediction(s) in {pred_dir} but {len(truths)} truth image(s) in "
                         f"{truth_dir}; they are paired by sorted name, so the counts must match")
    by_name = {_kind_of(p)[0]: p for p in preds} if main_kind else {}
    if by_name and all(t.stem in by_name for t in truths):
        return [(by_name[t.stem], t) for t in truths]
    return list(zip(preds, truths))


def _read_companion(path: Path, pred_path: Path, like: np.ndarray, what: str) -> np.ndarray:
    """The slices of a file predict wrote beside `pred_path`, of the same shape."""
    from .data.io import read_slices

    stack = np.stack(read_slices(path, as_label=True))
    if stack.shape != like.shape:
        raise ValueError(f"{what} {path.name} has shape {stack.shape} but {pred_path.name} has "
                         f"{like.shape}; predict writes them together, keep matching files")
    return stack


def _class_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float | None]:
    """IoU of each class 0..num_classes-1 on one slice; None where neither has the class."""
    scores = []
    for k in range(num_classes):
        p, t = pred == k, truth == k
        union = np.count_nonzero(p | t)
        scores.append(None if union == 0 else np.count_nonzero(p & t) / union)
    return scores


def evaluate_pair(pred_path: Path, truth_path: Path, threshold: float = 0.5,
                  instances: bool = False) -> list[dict]:
    """Scores for each slice of one (prediction, truth) pair: the four headline metrics (for a
    probability map: the best over thresholds, with ``thresholds``), and where they apply the
    delivered mask's scores, per-class IoU and SEG's sums (``seg_sum``, ``cells``)."""
    from .data.io import labels_to_classes, read_slices
    from .metrics import best_scores, evaluate_all, iou, seg_counts

    pred = np.stack(read_slices(pred_path))
    truth = np.stack(read_slices(truth_path, as_label=True))
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred_path.name} has shape {pred.shape} but truth "
                         f"{truth_path.name} has {truth.shape}; pair images of the same size")
    is_prob = pred.dtype.kind == "f" and not np.all((pred == 0) | (pred == 1))
    if pred.dtype.kind == "f" and (pred.min() < 0 or pred.max() > 1):
        raise ValueError(f"prediction {pred_path.name} holds floats outside [0, 1]; give "
                         f"probability maps or binary masks")
    mask_path = companion(pred_path, "mask") if is_prob else None
    if not is_prob:
        mask = pred > 0
    elif mask_path is not None:
        mask = _read_companion(mask_path, pred_path, pred, "mask") > 0
    else:
        mask = pred >= threshold
    classes_path, cells_path = companion(pred_path, "classes"), companion(pred_path, "instances")
    classes = _read_companion(classes_path, pred_path, pred, "class map") if classes_path else None
    cells = _read_companion(cells_path, pred_path, pred, "instance labels") if cells_path else None
    rows = []
    for i in range(len(pred)):
        true_mask = truth[i] > 0
        row = {}
        if is_prob:
            best = best_scores(pred[i], true_mask)
            row.update(iou=iou(pred[i] > 0.5, true_mask),
                       **{name: value for name, (value, _) in best.items()})
            row["thresholds"] = {"iou": 0.5, **{name: t for name, (_, t) in best.items()}}
            delivered = evaluate_all(mask[i], true_mask)
            row["delivered"] = {"mask": mask_path.name if mask_path else
                                f"{pred_path.name} >= {threshold:g}", **delivered}
        else:
            row.update(evaluate_all(mask[i], true_mask))
        if classes is not None:
            true_classes = labels_to_classes(truth[i], source=f"truth {truth_path.name}")
            count = int(max(classes[i].max(), true_classes.max())) + 1
            row.update(class_iou=_class_iou(classes[i], true_classes, count),
                       classes_of=classes_path.name)
        if cells is not None or instances:
            true_cells = labels_to_classes(truth[i], source=f"truth {truth_path.name}")
            total, count = seg_counts(cells[i] if cells is not None else mask[i], true_cells)
            row.update(seg=total / count if count else None, seg_sum=total, cells=count,
                       seg_of=(cells_path or mask_path or pred_path).name,
                       seg_cells="instance labels" if cells is not None else
                       "4-connected components of the mask")
        rows.append(row)
    return rows


# ---- printing ----------------------------------------------------------------------------------
def _table(title: str, rows: list[dict], columns: list[str], cell, summary: tuple[str, list],
           name=lambda row: row["prediction"]):
    """Print `title`, one line per row (name, slice, cell(row, column) per column), a rule and
    the summary line (label, values)."""
    header = f"{'prediction':<28} {'slice':>5} " + " ".join(f"{c:>15}" for c in columns)
    print(title)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{name(r)[:28]:<28} {r['slice']:>5} " + " ".join(cell(r, c) for c in columns))
    print("-" * len(header))
    label, values = summary
    print(f"{label:<28} {'':>5} " + " ".join("n/a".rjust(15) if v is None else f"{v:>15.5f}"
                                            for v in values))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _report(rows: list[dict]) -> dict:
    """Print the tables and return the JSON document."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    document = {"mean": mean}
    title = "masks, scored as they are"
    if any("thresholds" in r for r in rows):
        title = ("probability maps: each error the best over thresholds 0.0, 0.1, ..., 0.9 (ISBI "
                 "2012 protocol), IoU at 0.5; [t] = the threshold of each score")
    _table(title, rows, list(METRICS), _headline_cell,
           (f"mean of {len(rows)} slice(s)", [mean[k] for k in METRICS]))
    with_masks = [r for r in rows if "delivered" in r]
    if with_masks:
        delivered = {k: float(np.mean([r["delivered"][k] for r in with_masks])) for k in METRICS}
        print()
        _table(f"delivered masks ({with_masks[0]['delivered']['mask']}, ...), scored as they are",
               with_masks, list(METRICS), lambda r, c: f"{r['delivered'][c]:>15.5f}",
               (f"masks: mean of {len(with_masks)}", [delivered[k] for k in METRICS]),
               name=lambda r: r["delivered"]["mask"])
        document["delivered"] = {"mean": delivered}
    with_classes = [r for r in rows if "class_iou" in r]
    if with_classes:
        count = max(len(r["class_iou"]) for r in with_classes)
        per_class = [_mean(r["class_iou"][k] for r in with_classes if k < len(r["class_iou"]))
                     for k in range(count)]
        print()
        _table("IoU per class (NAME_classes: the most probable class; n/a: class in neither)",
               with_classes, [f"class {k}" for k in range(count)],
               lambda r, c: _class_cell(r["class_iou"], int(c.split()[1])),
               (f"classes: mean of {len(with_classes)}", per_class),
               name=lambda r: r["classes_of"])
        document["class_iou"] = {"mean": per_class}
    with_cells = [r for r in rows if "cells" in r]
    if with_cells:
        total, cells = sum(r["seg_sum"] for r in with_cells), sum(r["cells"] for r in with_cells)
        seg = total / cells if cells else None
        print()
        _table(f"SEG (cell tracking challenge) of the predicted cells ({with_cells[0]['seg_cells']}"
               f": {with_cells[0]['seg_of']}, ...) against the truth's cells", with_cells,
               ["SEG", "true cells"],
               lambda r, c: ("n/a" if r["seg"] is None else f"{r['seg']:.5f}").rjust(15)
               if c == "SEG" else f"{r['cells']:>15d}",
               (f"SEG over {cells} cell(s)", [seg]), name=lambda r: r["seg_of"])
        document["seg"] = {"value": seg, "cells": cells}
    return document


def _headline_cell(row: dict, column: str) -> str:
    if "thresholds" not in row:
        return f"{row[column]:>15.5f}"
    t = row["thresholds"][column]
    return f"{row[column]:.5f} [{t:.1f}]".rjust(15) if t == round(t, 1) else \
        f"{row[column]:.5f} [{t:g}]".rjust(15)


def _class_cell(scores: list, k: int) -> str:
    value = scores[k] if k < len(scores) else None
    return ("n/a" if value is None else f"{value:.5f}").rjust(15)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    pred_dir, truth_dir = Path(args.pred), Path(args.truth)
    rows = []
    for pred_path, truth_path in pair_files(pred_dir, truth_dir):
        for i, scores in enumerate(evaluate_pair(pred_path, truth_path, args.threshold,
                                                 args.instances)):
            rows.append({"prediction": pred_path.name, "truth": truth_path.name, "slice": i,
                         **scores})
    document = _report(rows)
    out = Path(args.json) if args.json else pred_dir / "evaluation.json"
    out.write_text(json.dumps({**document, "images": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
