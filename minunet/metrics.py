"""Segmentation metrics of the paper's two challenges, as their organisers defined them.

ISBI 2012 (EM segmentation, paper Table 1) ranked by three errors computed with Fiji's
Trainable Segmentation metrics: the *pixel error*, the *Rand error* (foreground-restricted Rand
F-score) and the *warping error* (Jain et al. 2010), each the best over thresholds of the
submitted probability map. The cell tracking challenge (Table 2) used *SEG*, a matched IoU per
cell; :func:`iou` is the plain foreground IoU.

Conventions: NumPy arrays in, Python floats out; prediction and truth have the same shape,
(H, W) or a stack (N, H, W). "Foreground" is the cell interior (label 1 / white in ISBI). Masks may
be bool, integers (non-zero = foreground), or floats holding only 0 and 1; probability maps go
through :func:`best_over_thresholds` or :func:`evaluate_all`.

The warping and Rand errors run compiled (Numba, :mod:`minunet.metrics_kernels`); the pure
Python / NumPy implementation they replaced is kept as their oracle (``*_reference`` below), and
the tests require the same numbers from both, bit for bit. :func:`sweep_thresholds` evaluates
all thresholds of a probability map sharing the work that does not depend on the threshold.
"""
from __future__ import annotations

import functools
import heapq
import inspect
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

#: The challenge's thresholds 0.0, 0.1, ..., 0.9 on the foreground probability.
ISBI_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(10))


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}; "
                         "compare arrays of the same (H, W) or (N, H, W)")
    if pred.ndim not in (2, 3) or pred.size == 0:
        raise ValueError(f"metrics need non-empty (H, W) or (N, H, W) arrays, got {pred.shape}")
    return pred, truth


def _as_mask(a: np.ndarray, name: str) -> np.ndarray:
    """bool mask from bool / integer (non-zero) / float holding only 0 and 1."""
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return a > 0
    if np.issubdtype(a.dtype, np.floating) and np.all((a == 0) | (a == 1)):
        return a > 0.5
    raise ValueError(f"{name} must be a binary mask (bool, integer or 0/1 floats); threshold a "
                     "probability map first, or use best_over_thresholds / evaluate_all")


def _as_labels(a: np.ndarray, name: str) -> np.ndarray:
    """Integer segment ids per slice: a binary mask's 4-connected components are numbered,
    a label image (ids beyond 1) is used as is. 0 = boundary / background."""
    if a.dtype != bool and np.issubdtype(a.dtype, np.integer) and a.size and a.max() > 1:
        if a.min() < 0:
            raise ValueError(f"{name} has negative labels; use 0 for boundary and 1..K for cells")
        return a.astype(np.int64)
    mask = _as_mask(a, name)
    four = ndimage.generate_binary_structure(2, 1)
    if mask.ndim == 2:
        return ndimage.label(mask, structure=four)[0].astype(np.int64)
    return np.stack([ndimage.label(m, structure=four)[0] for m in mask]).astype(np.int64)


def _per_slice_mean(fn: Callable, pred: np.ndarray, truth: np.ndarray, **kwargs) -> float:
    if pred.ndim == 2:
        return float(fn(pred, truth, **kwargs))
    return float(np.mean([fn(p, t, **kwargs) for p, t in zip(pred, truth)]))


# ---------------------------------------------------------------------------------------------
# pixel error and IoU
# ---------------------------------------------------------------------------------------------
def _confusion(pred_mask, true_mask) -> tuple[int, int, int]:
    pred, truth = _check_pair(pred_mask, true_mask)
    p, t = _as_mask(pred, "prediction"), _as_mask(truth, "truth")
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p & ~t)), int(np.count_nonzero(~p & t))


def pixel_error(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """1 - F1 score of the foreground pixels, 2 TP / (2 TP + FP + FN), pooled over a stack.
    Both masks empty: 0."""
    tp, fp, fn = _confusion(pred_mask, true_mask)
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 1.0 - 2.0 * tp / denominator


def iou(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Intersection over union of the foreground, TP / (TP + FP + FN), pooled over a stack.
    Both masks empty: 1."""
    tp, fp, fn = _confusion(pred_mask, true_mask)
    denominator = tp + fp + fn
    return 1.0 if denominator == 0 else tp / denominator


iou.higher_is_better = True


# ---------------------------------------------------------------------------------------------
# Rand error (ISBI 2012, foreground-restricted, Fiji's RandError with N^2 normalisation)
# ---------------------------------------------------------------------------------------------
def _rand_error_slice_reference(pred_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """The Rand error of one slice in NumPy: the oracle of :func:`_rand_error_slice`."""
    foreground = true_ids > 0
    n = np.count_nonzero(foreground)
    if n == 0:
        return 0.0  # no truth foreground: no pair of pixels to disagree about
    t = np.unique(true_ids[foreground], return_inverse=True)[1].ravel()
    p_all = pred_ids[foreground]
    in_proposal = p_all > 0
    singletons = float(np.count_nonzero(~in_proposal))  # proposal background inside truth fg
    p = np.unique(p_all[in_proposal], return_inverse=True)[1].ravel()
    t_in = t[in_proposal]
    pair_keys = t_in.astype(np.int64) * (int(p.max(initial=-1)) + 1) + p
    n_ij = np.unique(pair_keys, return_counts=True)[1].astype(np.float64)
    a_i = np.bincount(t).astype(np.float64)           # truth segment sizes (all their pixels)
    b_j = np.bincount(p).astype(np.float64)           # proposal segment sizes inside truth fg
    # Counts squared = n^2 * (sum of p^2). Each proposal-background pixel is its own singleton
    # segment: it adds 1 (i.e. 1/n^2 in probabilities) to both the joint and the proposal sums.
    sum_ab = np.sum(n_ij ** 2) + singletons
    sum_a = np.sum(a_i ** 2)
    sum_b = np.sum(b_j ** 2) + singletons
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    return 1.0 - 2.0 * precision * recall / (precision + recall)


def _compact_ids(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(flat int64 ids with 0 kept as 0, the largest id): ids as they are when the largest is at
    most the pixel count (labelled components are 1..K), else renumbered 1..K (a few huge ids
    would otherwise size the kernel's count arrays)."""
    flat = np.ascontiguousarray(ids, dtype=np.int64).ravel()
    largest = int(flat.max(initial=0))
    if largest <= flat.size:
        return flat, largest
    values, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.astype(np.int64).ravel()
    if values[0] != 0:
        inverse += 1
    return inverse, int(inverse.max(initial=0))


def _rand_error_slice(pred_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """The Rand error of one slice of label images: the integer sums come from the compiled
    :func:`minunet.metrics_kernels.rand_sums`, the float steps are the reference's, in its
    order, so the result is bit-identical to :func:`_rand_error_slice_reference`."""
    from .metrics_kernels import rand_sums

    truth, n_truth = _compact_ids(true_ids)
    pred, n_pred = _compact_ids(pred_ids)
    n, singletons, joint, truth_sq, pred_sq = rand_sums(truth, pred, n_truth, n_pred)
    if n == 0:
        return 0.0  # no truth foreground: no pair of pixels to disagree about
    sum_ab, sum_a, sum_b = float(joint + singletons), float(truth_sq), float(pred_sq + singletons)
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    return 1.0 - 2.0 * precision * recall / (precision + recall)


def rand_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """1 - foreground-restricted Rand F-score (ISBI 2012).

    Both arguments are label images (0 = boundary/background, ids = segments) or binary cell
    masks, whose 4-connected components are numbered first. Over the n truth-foreground pixels,
    with n_ij pixels in truth segment i and proposal segment j (proposal background pixels
    counted as singletons): P = sum n_ij^2 / sum n_.j^2, R = sum n_ij^2 / sum n_i.^2, error =
    1 - 2PR / (P + R). A stack gives the mean over slices. Not scikit-image's adapted_rand_error.
    """
    pred, truth = _check_pair(pred, truth)
    return _per_slice_mean(_rand_error_slice, _as_labels(pred, "prediction"),
                           _as_labels(truth, "truth"))


# ---------------------------------------------------------------------------------------------
# warping error (Jain et al. 2010)
# ---------------------------------------------------------------------------------------------
# The 8 neighbours of a pixel, bit k of a neighbourhood code <-> offset _NEIGHBOURS[k].
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@functools.lru_cache(maxsize=1)
def simple_point_table() -> bytes:
    """256-entry lookup table: is a pixel with this 8-neighbourhood code a *simple point* for
    4-connected foreground / 8-connected background?

    A simple point can be flipped without changing the topology: no object split, merged,
    created or deleted, no hole opened or closed. The test is local (Bertrand's topological
    numbers): exactly one 4-connected foreground component of the 8-neighbourhood touches the
    pixel 4-adjacently, and the background of the 8-neighbourhood is one 8-connected component.
    The pixel's own value does not matter (flipping either way is the same question), which is
    why 256 entries (not 512) suffice.
    """
    four = ndimage.generate_binary_structure(2, 1)
    eight = ndimage.generate_binary_structure(2, 2)
    table = bytearray(256)
    for code in range(256):
        ring = np.zeros((3, 3), bool)
        for k, (dy, dx) in enumerate(_NEIGHBOURS):
            ring[1 + dy, 1 + dx] = (code >> k) & 1
        fg_labels, _ = ndimage.label(ring, structure=four)
        touching_fg = {int(fg_labels[y, x]) for y, x in ((0, 1), (1, 0), (1, 2), (2, 1))} - {0}
        background = ~ring
        background[1, 1] = False
        _, n_bg = ndimage.label(background, structure=eight)
        table[code] = int(len(touching_fg) == 1 and n_bg == 1)
    return bytes(table)


def _warp_slice_reference(truth: np.ndarray, target: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Warp the bool mask `truth` toward `target` by flipping simple points only, most urgent
    (largest `priority`) first, until no mismatched pixel is simple. Returns the warped mask.
    Pure Python: the oracle of the compiled :func:`_warp_slice`.

    A heap holds the mismatched pixels. A popped pixel that is not simple (now) is dropped; it
    is pushed again whenever a neighbour flips, the only event that can make it simple. So the
    pixel flipped is always the highest-priority simple mismatch, as in Jain et al.
    """
    h, w = truth.shape
    stride = w + 2
    # One pixel of permanent background around the image: pixels outside count as background.
    labels = np.zeros((h + 2, w + 2), np.uint8)
    labels[1:-1, 1:-1] = truth
    goal = np.zeros_like(labels)
    goal[1:-1, 1:-1] = target
    urgency = np.zeros((h + 2, w + 2))
    urgency[1:-1, 1:-1] = priority
    neg_priority = (-urgency).ravel().tolist()
    current = bytearray(labels.tobytes())
    wanted = goal.tobytes()
    table = simple_point_table()
    offsets = [dy * stride + dx for dy, dx in _NEIGHBOURS]
    up_left, up, up_right, left, right, down_left, down, down_right = offsets
    mismatched = np.flatnonzero(labels != goal).tolist()
    heap = [(neg_priority[i], i) for i in mismatched]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if current[i] == wanted[i]:
            continue
        code = (current[i + up_left] | current[i + up] << 1 | current[i + up_right] << 2
                | current[i + left] << 3 | current[i + right] << 4 | current[i + down_left] << 5
                | current[i + down] << 6 | current[i + down_right] << 7)
        if not table[code]:
            continue
        current[i] ^= 1
        for offset in offsets:
            j = i + offset
            if current[j] != wanted[j]:
                heapq.heappush(heap, (neg_priority[j], j))
    warped = np.frombuffer(bytes(current), np.uint8).reshape(h + 2, w + 2)[1:-1, 1:-1]
    return warped.astype(bool)


def _warp_slice(truth: np.ndarray, pred: np.ndarray, threshold: float,
                sorted_pixels: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(warped truth, pixels left mismatched): the truth (2-D bool) warped toward the
    binarised prediction by the compiled kernels of :mod:`minunet.metrics_kernels`, flip for
    flip the same as :func:`_warp_slice_reference` on ``_binarize_with_priority(pred,
    threshold)``. `sorted_pixels`: :func:`_sorted_pixels` of `pred`, when the caller shares it
    between thresholds."""
    from .metrics_kernels import priority_order, warp_slice

    values, threshold = _warping_input(pred, threshold)
    if sorted_pixels is None:
        sorted_pixels = _sorted_pixels(values)
    order = priority_order(sorted_pixels, values.ravel(), threshold)
    table = np.frombuffer(simple_point_table(), np.uint8)
    warped, left = warp_slice(np.ascontiguousarray(truth, dtype=bool), values > threshold,
                              order, table)
    return warped, int(left)


def _sorted_pixels(values: np.ndarray) -> np.ndarray:
    """Flat pixel indices sorting the float64 map `values` (no NaN), equal values in index
    order: ``np.argsort(values, kind="stable")``.

    A map that float32 holds exactly (predict's maps, masks) is sorted faster as one uint64 key
    per pixel: its float32 bits made monotone (the sign bit set for positive values, all bits
    flipped for negative ones, the usual trick for sorting floats as integers) above the pixel
    index. The keys are distinct, so any sort gives the stable order, and NumPy sorts plain
    integers with its vectorised sort, several times quicker than a stable argsort of floats.
    """
    flat = values.ravel()
    single = flat.astype(np.float32)
    if flat.size >= 2**32 or not np.array_equal(single, flat):
        return np.argsort(flat, kind="stable")
    bits = (single + np.float32(0)).view(np.uint32)      # + 0: -0.0 becomes 0.0, as it compares
    negative = bits >= np.uint32(1 << 31)
    monotone = np.where(negative, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)
    keys = (monotone << np.uint64(32)) | np.arange(flat.size, dtype=np.uint64)
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _is_mask_dtype(pred: np.ndarray) -> bool:
    return pred.dtype == bool or np.issubdtype(pred.dtype, np.integer)


def _warping_input(pred: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """(float64 map, threshold) such that ``map > threshold`` and ``|map - threshold|`` are
    the target and priority of :func:`_binarize_with_priority`: a mask becomes 0/1 at 0.5 (a
    uniform priority, like the reference's zeros: ties go in row-major order either way)."""
    if _is_mask_dtype(pred):
        return np.ascontiguousarray(pred > 0, dtype=np.float64), 0.5
    return np.ascontiguousarray(pred, dtype=np.float64), float(threshold)


def warp_truth(pred: np.ndarray, true_mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The truth warped toward the thresholded prediction (2-D), for inspection: its remaining
    differences from ``pred > threshold`` are the topological errors (splits, merges, ...)."""
    pred, truth = _check_pair(pred, true_mask)
    if pred.ndim != 2:
        raise ValueError(f"warp_truth works on one 2-D slice, got shape {pred.shape}")
    _check_prediction_values(pred)
    return _warp_slice(_as_mask(truth, "truth"), pred, threshold)[0]


def _check_prediction_values(pred: np.ndarray) -> None:
    if pred.dtype != bool and not np.issubdtype(pred.dtype, np.number):
        raise TypeError(f"prediction must be numeric or bool, got {pred.dtype}")
    if pred.dtype.kind in "fc" and not np.isfinite(pred).all():
        raise ValueError("prediction holds NaN or infinite values; give probabilities in [0, 1] "
                         "or a binary mask")


def _binarize_with_priority(pred: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """A probability map gives (pred > threshold, |pred - threshold|); a mask gives itself and a
    uniform priority (ties are then broken in row-major order)."""
    if pred.dtype == bool or np.issubdtype(pred.dtype, np.integer):
        return pred > 0, np.zeros(pred.shape)
    pred = pred.astype(np.float64)
    return pred > threshold, np.abs(pred - threshold)


def _warping_error_slice_reference(pred: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    target, priority = _binarize_with_priority(pred, threshold)
    warped = _warp_slice_reference(truth, target, priority)
    return np.count_nonzero(warped != target) / target.size


def _warping_error_slice(pred: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    return _warp_slice(truth, pred, threshold)[1] / pred.size


def warping_error(pred_mask: np.ndarray, true_mask: np.ndarray, threshold: float = 0.5) -> float:
    """Warping error (Jain et al. 2010) as a fraction of all pixels.

    The truth is warped toward the prediction by flipping *simple points* only (topology
    preserving for 4-connected foreground / 8-connected background), in order of decreasing
    |p - threshold| (a mask: row-major order), until no mismatch can be flipped; the error is the
    number of remaining mismatches over the number of pixels. Boundary shifts cost nothing, each
    split, merge, missing or extra object leaves at least one pixel.

    Args:
        pred_mask: binary mask, or a probability map (floats in [0, 1]) binarised at `threshold`.
        true_mask: binary mask (non-zero = foreground).
    A stack gives the mean over slices.
    """
    pred, truth = _check_pair(pred_mask, true_mask)
    _check_prediction_values(pred)
    return _per_slice_mean(_warping_error_slice, pred, _as_mask(truth, "truth"),
                           threshold=threshold)


# ---------------------------------------------------------------------------------------------
# SEG (cell tracking challenge)
# ---------------------------------------------------------------------------------------------
def _seg_slice(pred_ids: np.ndarray, true_ids: np.ndarray) -> tuple[float, int]:
    """(sum of matched Jaccard indices, number of true objects) for one slice."""
    t = np.unique(true_ids, return_inverse=True)
    p = np.unique(pred_ids, return_inverse=True)
    t_ids, t_idx = t[0], t[1].ravel()
    p_ids, p_idx = p[0], p[1].ravel()
    t_size = np.bincount(t_idx, minlength=len(t_ids)).astype(np.float64)
    p_size = np.bincount(p_idx, minlength=len(p_ids)).astype(np.float64)
    both = (true_ids.ravel() > 0) & (pred_ids.ravel() > 0)
    keys, overlap = np.unique(t_idx[both].astype(np.int64) * len(p_ids) + p_idx[both],
                              return_counts=True)
    ti, pi = keys // len(p_ids), keys % len(p_ids)
    # |R and S| > 0.5 |R| can hold for at most one S per R.
    match = overlap > 0.5 * t_size[ti]
    jaccard = overlap[match] / (t_size[ti[match]] + p_size[pi[match]] - overlap[match])
    n_true = int(np.count_nonzero(t_ids > 0))
    return float(jaccard.sum()), n_true


def seg_counts(pred_labels: np.ndarray, true_labels: np.ndarray) -> tuple[float, int]:
    """(sum over true objects of their matched Jaccard index, number of true objects): the two
    sums of :func:`seg`, to pool SEG over several images (the challenge's mean is over all
    cells, not over images)."""
    pred, truth = _check_pair(pred_labels, true_labels)
    pred_ids, true_ids = _as_labels(pred, "prediction"), _as_labels(truth, "truth")
    if pred.ndim == 2:
        pred_ids, true_ids = pred_ids[None], true_ids[None]
    total, count = 0.0, 0
    for p, t in zip(pred_ids, true_ids):
        s, n = _seg_slice(p, t)
        total, count = total + s, count + n
    return total, count


def seg(pred_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Cell tracking challenge SEG: for each true object R, the predicted object S with
    |R and S| > 0.5 |R| (if any) scores |R and S| / |R or S|, otherwise 0; the mean over all true
    objects (of all slices of a stack). Label images, or binary masks whose 4-connected
    components are numbered first. No true object at all: NaN (the measure is undefined)."""
    total, count = seg_counts(pred_labels, true_labels)
    return float("nan") if count == 0 else total / count


seg.higher_is_better = True


# ---------------------------------------------------------------------------------------------
# thresholds and the full report
# ---------------------------------------------------------------------------------------------
def _best(values: Sequence[float], thresholds: Sequence[float],
          maximize: bool) -> tuple[float, float]:
    """(best value, its threshold) of values[k] at thresholds[k]; ties go to the first."""
    best_value, best_threshold = None, None
    for t, value in zip(thresholds, values):
        better = best_value is None or (value > best_value if maximize else value < best_value)
        if better:
            best_value, best_threshold = float(value), float(t)
    return best_value, best_threshold


def best_over_thresholds(prob: np.ndarray, truth: np.ndarray, metric: Callable,
                         thresholds: Sequence[float] = ISBI_THRESHOLDS,
                         maximize: bool | None = None) -> tuple[float, float]:
    """The best value of `metric` over binarisations ``prob > t`` (the challenge's protocol).

    A metric with a `threshold` keyword (warping_error) gets the probability map itself, so that
    it can order its pixel flips by confidence. `maximize` defaults to the metric's
    ``higher_is_better`` attribute (True for iou and seg), else False (errors).
    Returns (best value, its threshold); ties go to the first threshold.
    (:func:`sweep_thresholds` does the three ISBI errors together, sharing the work.)
    """
    prob, truth = _check_pair(prob, truth)
    if len(thresholds) == 0:
        raise ValueError("thresholds is empty; pass at least one threshold, e.g. (0.5,)")
    if maximize is None:
        maximize = bool(getattr(metric, "higher_is_better", False))
    takes_threshold = "threshold" in inspect.signature(metric).parameters
    values = (metric(prob, truth, threshold=t) if takes_threshold else metric(prob > t, truth)
              for t in thresholds)
    return _best(values, thresholds, maximize)


#: The metrics that evaluate_all reports as the best over thresholds of a probability map.
SWEPT_METRICS = ("pixel_error", "rand_error", "warping_error")


def sweep_thresholds(prob: np.ndarray, truth: np.ndarray,
                     thresholds: Sequence[float] = ISBI_THRESHOLDS) -> dict[str, list[float]]:
    """The three ISBI errors of a probability map at every threshold.

    ``sweep[name][k]`` is exactly what the metric gives at ``thresholds[k]``:
    ``pixel_error(prob > t, truth)``, ``rand_error(prob > t, truth)`` and
    ``warping_error(prob, truth, threshold=t)``. Shared across thresholds: the truth's mask and
    segments, and the float64 copy of each slice with its sort (which gives every threshold's
    warping order in O(n)).
    """
    prob, truth = _check_pair(prob, truth)
    if len(thresholds) == 0:
        raise ValueError("thresholds is empty; pass at least one threshold, e.g. (0.5,)")
    _check_prediction_values(prob)
    true_mask = _as_mask(truth, "truth")
    true_ids = _as_labels(truth, "truth")
    probs, masks, ids = (a if a.ndim == 3 else a[None] for a in (prob, true_mask, true_ids))
    four = ndimage.generate_binary_structure(2, 1)
    orders = [_sorted_pixels(_warping_input(p, 0.5)[0]) for p in probs]
    sweep = {name: [] for name in SWEPT_METRICS}
    for t in thresholds:
        above = prob > t
        above_slices = above if above.ndim == 3 else above[None]
        rand = [_rand_error_slice(ndimage.label(a, structure=four)[0], i)
                for a, i in zip(above_slices, ids)]
        warp = [_warp_slice(m, p, t, s)[1] / p.size for p, m, s in zip(probs, masks, orders)]
        sweep["pixel_error"].append(pixel_error(above, true_mask))
        for name, values in (("rand_error", rand), ("warping_error", warp)):
            # as _per_slice_mean: a slice's value itself, a stack's mean over slices
            sweep[name].append(float(values[0]) if prob.ndim == 2 else float(np.mean(values)))
    return sweep


def best_scores(prob: np.ndarray, truth: np.ndarray,
                thresholds: Sequence[float] = ISBI_THRESHOLDS) -> dict[str, tuple[float, float]]:
    """``{name: (best value, its threshold)}`` of the three ISBI errors over `thresholds` (as
    :func:`best_over_thresholds`, ties to the first threshold), from one :func:`sweep_thresholds`."""
    sweep = sweep_thresholds(prob, truth, thresholds)
    return {name: _best(sweep[name], thresholds, maximize=False) for name in SWEPT_METRICS}


def evaluate_all(prob_or_mask: np.ndarray, truth: np.ndarray,
                 thresholds: Sequence[float] = ISBI_THRESHOLDS) -> dict:
    """The report written to metrics.json: pixel_error, rand_error, warping_error, iou.

    Args:
        prob_or_mask: foreground probabilities (floats in [0, 1]) or a binary mask, (H, W) or
            (N, H, W).
        truth: binary mask or label image of the same shape (non-zero = foreground; a label image
            gives the Rand error its segments directly).
    The three ISBI errors are the best over `thresholds` (the challenge's 0.0 .. 0.9) for a
    probability map (:func:`best_scores` also says which threshold gave each); the IoU is taken
    at 0.5 (the network's own decision, argmax for 2 classes). A mask is evaluated as is.
    """
    pred, truth = _check_pair(prob_or_mask, truth)
    _check_prediction_values(pred)
    is_mask = pred.dtype == bool or np.issubdtype(pred.dtype, np.integer) \
        or np.all((pred == 0) | (pred == 1))
    if not is_mask and (pred.min() < 0 or pred.max() > 1):
        raise ValueError("prob_or_mask holds values outside [0, 1]; pass foreground "
                         "probabilities (softmax output) or a binary mask")
    if is_mask:
        mask = pred > 0
        return {"pixel_error": pixel_error(mask, truth), "rand_error": rand_error(mask, truth),
                "warping_error": warping_error(mask, truth), "iou": iou(mask, truth)}
    best = best_scores(pred, truth, thresholds)
    return {**{name: value for name, (value, _) in best.items()}, "iou": iou(pred > 0.5, truth)}


# ---------------------------------------------------------------------------------------------
# the oracle: the pure Python / NumPy implementation the compiled kernels replaced
# ---------------------------------------------------------------------------------------------
def rand_error_reference(pred: np.ndarray, truth: np.ndarray) -> float:
    """:func:`rand_error` with NumPy's contingency table (the compiled one's oracle)."""
    pred, truth = _check_pair(pred, truth)
    return _per_slice_mean(_rand_error_slice_reference, _as_labels(pred, "prediction"),
                           _as_labels(truth, "truth"))


def warping_error_reference(pred_mask: np.ndarray, true_mask: np.ndarray,
                            threshold: float = 0.5) -> float:
    """:func:`warping_error` with the Python heap (the compiled one's oracle; slow: seconds
    per 512 x 512 slice, bench/results/metrics.md)."""
    pred, truth = _check_pair(pred_mask, true_mask)
    _check_prediction_values(pred)
    return _per_slice_mean(_warping_error_slice_reference, pred, _as_mask(truth, "truth"),
                           threshold=threshold)


def evaluate_all_reference(prob: np.ndarray, truth: np.ndarray,
                           thresholds: Sequence[float] = ISBI_THRESHOLDS) -> dict:
    """:func:`evaluate_all` of a probability map as it was computed before the kernels: one
    metric call per threshold, the Python heap and NumPy's Rand error. The tests require the
    same numbers from :func:`evaluate_all`; ``python -m minunet.bench_metrics`` times both."""
    return {"pixel_error": best_over_thresholds(prob, truth, pixel_error, thresholds)[0],
            "rand_error": best_over_thresholds(prob, truth, rand_error_reference, thresholds)[0],
            "warping_error": best_over_thresholds(prob, truth, warping_error_reference,
                                                  thresholds)[0],
            "iou": iou(prob > 0.5, truth)}
