"""python -m minunet.evaluate on real files: which threshold each score used, the delivered
masks' own scores, per-class IoU and the cell tracking challenge's SEG (issue 20, point 3 and
the SEG of point 2). File names follow minunet.predict: NAME_prob.tif, NAME_mask.png,
NAME_classes.png, NAME_instances.png."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minunet.metrics as M
from minunet import evaluate
from minunet.cli import run
from minunet.data.io import write_image


def evaluate_cli(tmp_path, *extra):
    return run(evaluate.main, ["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                               *map(str, extra)])


def scores(tmp_path) -> dict:
    return json.loads((tmp_path / "pred" / "evaluation.json").read_text())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def squares(shape=(24, 30), boxes=((3, 11, 4, 12), (14, 21, 15, 27))) -> np.ndarray:
    """Instance labels: one square cell per box, numbered 1, 2, ..."""
    labels = np.zeros(shape, np.uint16)
    for k, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = k
    return labels


def write_prediction(tmp_path, name, truth, rng, with_mask=True):
    """A map whose best pixel error is at 0.3 (cells 0.35, background 0.25, a little noise),
    and predict's mask at 0.5 (all background)."""
    prob = np.where(truth > 0, 0.35, 0.25) + rng.uniform(-0.02, 0.02, truth.shape)
    write_image(tmp_path / "truth" / f"{name}.png", truth)
    write_image(tmp_path / "pred" / f"{name}_prob.tif", prob.astype(np.float32))
    if with_mask:
        write_image(tmp_path / "pred" / f"{name}_mask.png", (prob >= 0.5).astype(np.uint8) * 255)
    return prob.astype(np.float32)


def test_each_score_names_its_threshold_and_the_delivered_masks_are_scored(tmp_path, rng, capsys):
    truths = {"a": squares() > 0, "b": squares(boxes=((2, 20, 3, 9),)) > 0}
    probs = {name: write_prediction(tmp_path, name, truth.astype(np.uint8) * 255, rng)
             for name, truth in truths.items()}
    assert evaluate_cli(tmp_path) == 0
    out = capsys.readouterr().out
    doc = scores(tmp_path)
    for row in doc["images"]:
        prob, truth = probs[row["prediction"][:-len("_prob.tif")]], truths[row["truth"][:-4]]
        best = M.best_scores(prob, truth)
        assert row["thresholds"] == {"iou": 0.5, **{k: t for k, (_, t) in best.items()}}
        assert row["thresholds"]["pixel_error"] == 0.3 and row["pixel_error"] == 0.0
        assert row["delivered"]["mask"] == row["prediction"].replace("_prob.tif", "_mask.png")
        assert row["delivered"] == {"mask": row["delivered"]["mask"],
                                    **M.evaluate_all(prob >= 0.5, truth)}
        assert row["delivered"]["pixel_error"] == 1.0      # the mask predict delivered is empty
    assert "best over thresholds" in out and "0.00000 [0.3]" in out and "[0.5]" in out
    assert "delivered masks (a_mask.png, ...)" in out
    (mean_row,) = [line for line in out.splitlines() if line.startswith("mean")]
    assert [float(v) for v in mean_row.split()[4:]] == pytest.approx(
        [doc["mean"][k] for k in evaluate.METRICS], abs=1e-5)
    (mask_row,) = [line for line in out.splitlines() if line.startswith("masks: mean of 2")]
    assert [float(v) for v in mask_row.split()[4:]] == pytest.approx(
        [doc["delivered"]["mean"][k] for k in evaluate.METRICS], abs=1e-5)


def test_without_mask_files_the_map_is_thresholded_as_predict_does(tmp_path, rng):
    truth = squares() > 0
    prob = write_prediction(tmp_path, "a", truth, rng, with_mask=False)
    assert evaluate_cli(tmp_path, "--threshold", 0.3) == 0
    (row,) = scores(tmp_path)["images"]
    assert row["delivered"]["mask"] == "a_prob.tif >= 0.3"
    assert row["delivered"]["pixel_error"] == M.pixel_error(prob >= 0.3, truth) == 0.0


def test_per_class_iou_from_the_class_map(tmp_path, rng, capsys):
    truth = np.zeros((6, 8), np.uint8)
    truth[:, 4:] = 1
    truth[4:, :] = 2                       # classes 0, 1, 2; class 3 nowhere
    classes = truth.copy()
    classes[0, :2] = 1                     # class 0 loses 2 of its 16 pixels to class 1
    classes[5, :] = 0                      # class 2 loses a row of 8 of its 16 to class 0
    write_image(tmp_path / "truth" / "a.png", truth)
    write_image(tmp_path / "pred" / "a_prob.tif", rng.uniform(0.2, 0.8, truth.shape).astype(np.float32))
    write_image(tmp_path / "pred" / "a_classes.png", classes)
    assert evaluate_cli(tmp_path) == 0
    # class 0: 14 shared, union 16 + the 8 of row 5; class 1: 16 of 18; class 2: 8 of 16
    expected = [14 / 24, 16 / 18, 8 / 16]
    (row,) = scores(tmp_path)["images"]
    assert row["class_iou"] == pytest.approx(expected)
    assert scores(tmp_path)["class_iou"]["mean"] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert "IoU per class" in out and "class 2" in out and f"{8 / 16:.5f}" in out


def test_an_absent_class_is_not_scored_as_zero(tmp_path, rng):
    truth = np.zeros((4, 4), np.uint8)
    truth[:, 2:] = 2                       # class 1 in neither image
    write_image(tmp_path / "truth" / "a.png", truth)
    write_image(tmp_path / "pred" / "a_prob.tif", rng.uniform(0.2, 0.8, truth.shape).astype(np.float32))
    write_image(tmp_path / "pred" / "a_classes.png", truth)
    assert evaluate_cli(tmp_path) == 0
    assert scores(tmp_path)["images"][0]["class_iou"] == [1.0, None, 1.0]


def test_seg_of_instance_files_is_pooled_over_all_cells(tmp_path, rng, capsys):
    """Image a: cell 1 found exactly, of cell 2 (7 x 12 pixels) only its left 4 columns (28 of
    84 pixels, not more than half: 0); image b: its one cell found exactly. Pooled over the 3
    cells: (1 + 0 + 1) / 3, not the mean over images ((1/2 + 1) / 2)."""
    truth_a, truth_b = squares(), squares(boxes=((2, 20, 3, 9),))
    pred_a = truth_a.copy()
    pred_a[(truth_a == 2) & (np.arange(30) >= 19)] = 0          # columns 15..18 remain
    pred_a[(truth_a == 2) & (np.arange(30) < 19)] = 5           # under another id
    for name, truth, cells in (("a", truth_a, pred_a), ("b", truth_b, truth_b)):
        write_prediction(tmp_path, name, truth, rng)
        write_image(tmp_path / "pred" / f"{name}_instances.png", cells)
    kept = np.count_nonzero(pred_a == 5)
    assert kept == 28 and np.count_nonzero(truth_a == 2) == 84
    assert evaluate_cli(tmp_path) == 0
    doc = scores(tmp_path)
    assert doc["seg"] == {"value": pytest.approx(2 / 3), "cells": 3}
    assert [r["seg"] for r in doc["images"]] == pytest.approx([1 / 2, 1.0])
    assert doc["images"][0]["seg"] == M.seg(pred_a, truth_a)
    out = capsys.readouterr().out
    assert "SEG (cell tracking challenge) of the predicted cells (instance labels: " \
           "a_instances.png, ...)" in out and "SEG over 3 cell(s)" in out


def test_instances_flag_without_instance_files_scores_the_mask_components(tmp_path, rng):
    truth = squares()
    write_image(tmp_path / "truth" / "a.png", truth)
    write_image(tmp_path / "pred" / "a_mask.png", (truth > 0).astype(np.uint8) * 255)
    assert evaluate_cli(tmp_path) == 0
    assert "seg" not in scores(tmp_path)                   # nothing says the truth holds cells
    assert evaluate_cli(tmp_path, "--instances") == 0
    doc = scores(tmp_path)
    assert doc["seg"] == {"value": 1.0, "cells": 2}
    assert doc["images"][0]["seg_of"] == "a_mask.png"
    assert doc["images"][0]["seg_cells"] == "4-connected components of the mask"
    assert "thresholds" not in doc["images"][0] and doc["mean"]["iou"] == 1.0


def test_bad_threshold_and_mismatched_companion_are_one_line_errors(tmp_path, rng, capsys):
    truth = squares() > 0
    write_prediction(tmp_path, "a", truth, rng)
    assert evaluate_cli(tmp_path, "--threshold", 1.5) == 2
    assert "--threshold must be in [0, 1]" in one_line_error(capsys)
    write_image(tmp_path / "pred" / "a_instances.png", np.zeros((5, 5), np.uint16))
    assert evaluate_cli(tmp_path) == 2
    err = one_line_error(capsys)
    assert "a_instances.png" in err and "shape" in err
