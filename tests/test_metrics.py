"""Metrics on hand-made cases whose answers are known."""

import numpy as np
import pytest
from scipy import ndimage

import minunet.metrics as M

TOL = 1e-12


def _square_image(shape=(20, 20), box=(5, 15, 5, 15)):
    m = np.zeros(shape, bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    truth = rng.random((17, 23)) > 0.4
    assert M.pixel_error(truth, truth) == 0.0
    assert M.rand_error(truth, truth) == 0.0
    assert M.warping_error(truth, truth) == 0.0
    assert M.iou(truth, truth) == 1.0
    assert M.seg(truth, truth) == 1.0
    assert M.evaluate_all(truth.astype(np.float32), truth) == {
        "pixel_error": 0.0, "rand_error": 0.0, "warping_error": 0.0, "iou": 1.0}


def test_rand_error_by_hand_on_a_2x3_image():
    truth = np.array([[1, 1, 2], [1, 2, 2]])
    pred = np.array([[1, 1, 1], [2, 2, 2]])
    # n_ij = [[2, 1], [1, 2]]: sum n_ij^2 = 10, row and column sums 3, 3 -> 18 each.
    # P = R = 10/18, error = 1 - 10/18 = 4/9
    assert abs(M.rand_error(pred, truth) - 4 / 9) < TOL
    # One proposal-background pixel inside truth segment 2: a singleton.
    pred_with_gap = np.array([[1, 1, 0], [2, 2, 2]])
    # joint: 2^2 + 1^2 + 2^2 + 1 = 10; truth rows: 3^2 + 3^2 = 18; proposal: 2^2 + 3^2 + 1 = 14
    p, r = 10 / 14, 10 / 18
    assert abs(M.rand_error(pred_with_gap, truth) - (1 - 2 * p * r / (p + r))) < TOL
    # Truth background (0) pixels are ignored, whatever the proposal says there.
    truth_bg = np.array([[1, 1, 0], [1, 0, 0]])
    assert M.rand_error(np.array([[1, 1, 5], [1, 7, 3]]), truth_bg) == 0.0


def test_split_and_merge_raise_rand_and_warping_error_but_a_shift_does_not_warp():
    truth = _square_image()
    split = truth.copy()
    split[5:15, 10] = False                 # one cell predicted as two
    two = truth.copy()
    two[5:15, 10] = False                   # two true cells ...
    merged = truth                          # ... predicted as one
    shifted = np.roll(truth, 1, axis=0)     # same cell, boundary moved by 1 px
    n = truth.size

    assert M.rand_error(split, truth) > 0.05
    assert M.rand_error(merged, two) > 0.3
    # The truth can be cut open from either end of the cut, pixel by pixel, until the last pixel
    # would split it: exactly one pixel remains.
    assert M.warping_error(split, truth) == pytest.approx(1 / n)
    # Filling the 10-pixel gap: every gap pixel touches both true cells, so adding any of them
    # would merge them: all 10 remain.
    assert M.warping_error(merged, two) == pytest.approx(10 / n)
    # a shift is only geometry
    assert M.warping_error(shifted, truth) == 0.0
    assert M.pixel_error(shifted, truth) > 0.05
    # missing object: a whole cell vanishes -> it cannot be warped away entirely
    assert M.warping_error(np.zeros_like(truth), truth) == pytest.approx(1 / n)


def test_warped_truth_keeps_the_truth_topology():
    rng = np.random.default_rng(1)
    truth = ndimage.binary_opening(rng.random((40, 40)) > 0.45)
    prob = np.clip(truth + rng.normal(0, 0.5, truth.shape), 0, 1)
    warped = M.warp_truth(prob, truth, threshold=0.5)
    four, eight = ndimage.generate_binary_structure(2, 1), ndimage.generate_binary_structure(2, 2)
    count = lambda a: (ndimage.label(np.pad(a, 1), four)[1], ndimage.label(~np.pad(a, 1), eight)[1])
    assert count(warped) == count(truth)
    remaining = np.count_nonzero(warped != (prob > 0.5))
    assert remaining < np.count_nonzero(truth != (prob > 0.5))
    assert M.warping_error(prob, truth) == pytest.approx(remaining / truth.size)


def test_simple_point_table_matches_global_topology():
    """Flipping a pixel the table calls simple keeps the number of 4-connected objects and of
    8-connected background components; flipping any other pixel changes one of them."""
    table = M.simple_point_table()
    four, eight = ndimage.generate_binary_structure(2, 1), ndimage.generate_binary_structure(2, 2)

    def counts(a):
        padded = np.pad(a, 1)
        return ndimage.label(padded, four)[1], ndimage.label(~padded, eight)[1]

    rng = np.random.default_rng(2)
    for _ in range(40):
        a = rng.random((6, 6)) < rng.uniform(0.3, 0.7)
        before, padded = counts(a), np.pad(a, 1)
        for y in range(6):
            for x in range(6):
                code = sum(int(padded[y + 1 + dy, x + 1 + dx]) << k
                           for k, (dy, dx) in enumerate(M._NEIGHBOURS))
                flipped = a.copy()
                flipped[y, x] = ~flipped[y, x]
                assert bool(table[code]) == (counts(flipped) == before)


def test_iou_pixel_error_and_seg_by_hand():
    pred = np.array([[1, 1, 0, 0], [0, 1, 1, 0]])
    truth = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    # TP 3, FP 1, FN 1
    assert M.iou(pred, truth) == pytest.approx(3 / 5)
    assert M.pixel_error(pred, truth) == pytest.approx(1 - 6 / 8)
    true_labels = np.array([[1, 1, 0, 2],
                            [1, 1, 0, 2],
                            [0, 0, 0, 0],
                            [3, 3, 3, 0]])
    pred_labels = np.array([[5, 5, 0, 6],
                            [5, 9, 0, 0],
                            [0, 0, 0, 0],
                            [7, 7, 7, 7]])
    # R1 (4 px) ~ S5 (3 px): overlap 3 > 2 -> 3/4; R2 (2 px) ~ S6: overlap 1, not > 1 -> 0;
    # R3 (3 px) in S7 (4 px): 3/4.  SEG = (3/4 + 0 + 3/4) / 3
    assert M.seg(pred_labels, true_labels) == pytest.approx(0.5)
    assert np.isnan(M.seg(pred_labels, np.zeros_like(true_labels)))
    assert M.iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert M.pixel_error(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0


def test_best_over_thresholds_and_evaluate_all_on_probabilities():
    truth = _square_image()
    prob = np.where(truth, 0.35, 0.25)
    assert M.best_over_thresholds(prob, truth, M.pixel_error) == (0.0, 0.3)
    assert M.best_over_thresholds(prob, truth, M.iou) == (1.0, 0.3)
    # at 0.0 everything is foreground: one object, background connected to the outside, the
    # same topology as the truth -- so the warping error is 0 there already (first threshold)
    assert M.best_over_thresholds(prob, truth, M.warping_error) == (0.0, 0.0)
    assert M.warping_error(prob, truth, threshold=0.3) == 0.0
    # at 0.5 nothing is segmented (every truth pixel a singleton); at 0.1 everything is one
    # segment, which the foreground-restricted Rand error does not penalise
    assert M.rand_error(prob > 0.5, truth) > 0.9
    assert M.best_over_thresholds(prob, truth, M.rand_error, thresholds=(0.5, 0.1)) == (0.0, 0.1)
    assert M.best_over_thresholds(prob, truth, M.pixel_error, thresholds=(0.31, 0.3)) == (0.0, 0.31)
    report = M.evaluate_all(prob, truth)
    assert set(report) == {"pixel_error", "rand_error", "warping_error", "iou"}
    assert report["pixel_error"] == 0.0 and report["rand_error"] == 0.0
    assert report["warping_error"] == 0.0
    assert report["iou"] == 0.0  # at 0.5 nothing is foreground


def test_stacks_average_per_slice():
    truth = np.stack([_square_image(), _square_image(box=(2, 9, 3, 18))])
    pred = truth.copy()
    pred[0, 5:15, 10] = False
    per_slice = [M.rand_error(p, t) for p, t in zip(pred, truth)]
    assert M.rand_error(pred, truth) == pytest.approx(np.mean(per_slice))
    assert M.warping_error(pred, truth) == pytest.approx(0.5 / 400)


def test_errors_on_bad_input():
    with pytest.raises(ValueError, match="shape"):
        M.iou(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="binary mask"):
        M.pixel_error(np.full((3, 3), 0.7), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="outside"):
        M.evaluate_all(np.full((3, 3), 2.5), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="empty"):
        M.best_over_thresholds(np.zeros((3, 3)), np.zeros((3, 3)), M.iou, thresholds=())


# ---- the compiled kernels against the Python oracle (exact equality, not a tolerance) --------
_reference_rand_error = M.rand_error_reference
_reference_warping_error = M.warping_error_reference
_reference_evaluate_all = M.evaluate_all_reference


def _random_truth(rng, shape, kind):
    if kind == "empty":
        return np.zeros(shape, bool)
    if kind == "full":
        return np.ones(shape, bool)
    noise = rng.random(shape) < rng.uniform(0.2, 0.8)
    return noise if kind == "noise" else ndimage.binary_opening(noise)


def _random_map(rng, shape, kind):
    """Probability maps with the orders that matter: distinct values, many equal values
    (rounded), float32 (as predict writes them), and values so small that distinct ones have
    the same |p - t| in float64 (1e-20 - 0.3 == 2e-20 - 0.3), so ties mix several values."""
    p = rng.random(shape)
    if kind == "rounded":
        return np.round(p, 1)
    if kind == "float32":
        return p.astype(np.float32)
    if kind == "tiny":
        return np.where(p < 0.5, rng.integers(0, 4, shape) * 1e-20, p)
    return p


@pytest.mark.parametrize("seed", range(12))
def test_warp_kernel_flips_exactly_as_the_python_heap(seed):
    """Same warped mask, pixel for pixel, on random odd shapes, every kind of truth and map,
    at thresholds that include 0 and values equal to some pixels of the map."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 42, 2))
    truth = _random_truth(rng, shape, ("opened", "noise", "empty", "full")[seed % 4])
    prob = _random_map(rng, shape, ("uniform", "rounded", "float32", "tiny")[seed // 3 % 4])
    for t in (0.0, 0.3, 0.5, float(np.float64(prob.flat[0])), 0.9, 1.0):
        target, priority = M._binarize_with_priority(prob, t)
        want = M._warp_slice_reference(truth, target, priority)
        got, left = M._warp_slice(truth, prob, t)
        assert np.array_equal(got, want), (seed, t)
        assert left == np.count_nonzero(want != target)
    mask = prob > 0.5   # a mask: row-major order, its own values
    target, priority = M._binarize_with_priority(mask, 0.5)
    assert np.array_equal(M._warp_slice(truth, mask, 0.5)[0],
                          M._warp_slice_reference(truth, target, priority))


@pytest.mark.parametrize("kind", ["uniform", "rounded", "float32", "tiny"])
def test_priority_order_is_the_reference_heap_order(kind, rng):
    """The O(n) order built from one sort equals sorting by (-|p - t|, index) per threshold."""
    from minunet.metrics_kernels import priority_order

    values = np.asarray(_random_map(rng, (23, 29), kind), np.float64).ravel()
    pixels = M._sorted_pixels(values)
    for t in (0.0, 0.3, 0.5, values[7], 1.0):
        want = np.lexsort((np.arange(values.size), -np.abs(values - t)))
        assert np.array_equal(priority_order(pixels, values, t), want), t


@pytest.mark.parametrize("seed", range(6))
def test_rand_kernel_equals_the_numpy_reference(seed):
    """Bit-identical Rand errors: masks (components numbered first), label images with gaps
    and huge ids, empty truth, empty and full predictions, stacks."""
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(s) for s in rng.integers(1, 40, 2))
    truth = _random_truth(rng, shape, ("opened", "noise", "empty", "full")[seed % 4])
    cases = [(rng.random(shape) > 0.4, truth), (np.zeros(shape, bool), truth),
             (np.ones(shape, bool), truth),
             (rng.integers(0, 6, shape) * 7, rng.integers(0, 4, shape) * 10**12),
             (rng.integers(0, 3, (3,) + shape), rng.random((3,) + shape) > 0.5)]
    for pred, true in cases:
        assert M.rand_error(pred, true) == _reference_rand_error(pred, true)


@pytest.mark.parametrize("seed", range(6))
def test_sweep_and_evaluate_all_equal_the_one_call_per_threshold_protocol(seed):
    """Every threshold's value of the shared sweep is the metric's own value there, and the
    report is exactly the one of the Python implementation; slices and stacks."""
    rng = np.random.default_rng(200 + seed)
    shape = ((2,) if seed % 2 else ()) + tuple(int(s) for s in rng.integers(5, 37, 2))
    truth = _random_truth(rng, shape, ("opened", "noise", "opened", "empty", "full", "opened")[seed])
    prob = np.clip(truth + rng.normal(0, 0.4, shape), 0, 1)
    prob = prob.astype(np.float32) if seed % 3 == 0 else np.round(prob, 2 + seed % 2)
    sweep = M.sweep_thresholds(prob, truth)
    for k, t in enumerate(M.ISBI_THRESHOLDS):
        assert sweep["pixel_error"][k] == M.pixel_error(prob > t, truth)
        assert sweep["rand_error"][k] == _reference_rand_error(prob > t, truth)
        assert sweep["warping_error"][k] == _reference_warping_error(prob, truth, threshold=t)
    assert M.evaluate_all(prob, truth) == _reference_evaluate_all(prob, truth)
    best = M.best_scores(prob, truth)
    assert best["warping_error"] == M.best_over_thresholds(prob, truth, _reference_warping_error)


def test_evaluate_all_of_a_label_image_truth_uses_its_segments():
    rng = np.random.default_rng(7)
    labels = ndimage.label(ndimage.binary_opening(rng.random((30, 30)) > 0.4))[0]
    prob = np.clip((labels > 0) + rng.normal(0, 0.3, labels.shape), 0, 1)
    assert M.evaluate_all(prob, labels) == _reference_evaluate_all(prob, labels)


def test_nan_in_a_prediction_is_refused():
    prob = np.full((4, 4), 0.5)
    prob[1, 2] = np.nan
    for call in (lambda: M.warping_error(prob, prob > 2), lambda: M.evaluate_all(prob, prob > 2)):
        with pytest.raises(ValueError, match="NaN"):
            call()


def test_the_metrics_benchmark_runs_and_compares_with_the_oracle(capsys):
    """python -m minunet.bench_metrics on two small slices: it prints its table and finds the
    compiled numbers equal to the oracle's (it reports times; nothing here checks one)."""
    from minunet import bench_metrics

    assert bench_metrics.main(["--size", "64", "--slices", "2", "--reference-slices", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("trained-like", "untrained"))]
    assert len(rows) == 2 and all(row[-1] == "yes" for row in rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sorted_pixels_is_the_stable_argsort(dtype, rng):
    """The integer-key sort of float32-exact maps (and the fallback for float64 maps) gives
    np.argsort(kind="stable"): ties in index order, -0.0 equal to 0.0, negatives and infinities
    in place."""
    values = np.round(rng.normal(0, 2, (31, 17)), 1).astype(dtype)
    values.flat[rng.integers(0, values.size, 40)] = rng.choice([-0.0, 0.0, np.inf, -np.inf], 40)
    values = values.astype(np.float64)
    assert np.array_equal(M._sorted_pixels(values), np.argsort(values.ravel(), kind="stable"))
