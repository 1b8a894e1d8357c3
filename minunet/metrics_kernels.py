"""Compiled (Numba) kernels of the two slow metrics: the warping error's simple-point heap and
the Rand error's contingency table. :mod:`minunet.metrics` calls them; its pure-Python
``*_reference`` functions are the oracle the tests compare them to, number for number.

Why the results are *exactly* the reference's:

- Warping: the reference pops ``(-priority, index)`` tuples from a ``heapq``. A heap pops a
  smallest element of what it holds, and entries with equal keys are the same pixel, so the
  sequence of pops (and hence of flips) depends only on the key order: any structure that
  always hands out the smallest waiting key pops the same pixels. :func:`priority_order` ranks
  the pixels in that order (``priority = |p - threshold|`` in float64 as the reference computes
  it; ``a > b`` and ``-a < -b`` agree exactly, negation being exact; NaN is refused before),
  and :func:`warp_slice` hands out the smallest waiting rank.
- Rand: every sum of the reference (``sum n_ij^2`` and the others) adds integers no larger than
  ``n^2`` in float64, exact in any order while ``n^2 < 2**53`` (slices under 94 million
  pixels); the kernel adds the same integers in int64, and :mod:`minunet.metrics` then does
  the reference's few float operations in its order.

Every kernel runs on one thread: a slice at one threshold takes milliseconds, and on cores
shared with other work a second thread made a sweep slower, not faster (bench/results/metrics.md).
Compiled once (``cache=True``, see :mod:`minunet.ops.numba_config`), then loaded from the cache.
"""
from __future__ import annotations

import numpy as np

from .ops.numba_config import jit


# ---------------------------------------------------------------------------------------------
# warping error (Jain et al. 2010): flip simple points, most urgent first
# ---------------------------------------------------------------------------------------------
@jit(parallel=False)
def _write_side(pixels, values, start, stop, step, threshold, out_pixels, out_keys):
    """One side of the threshold in decreasing urgency: walk the sorted `values` from `start`
    toward the threshold (`step` +1 from the lowest, -1 from the highest value), writing each
    pixel and its urgency ``|value - threshold|``. Along such a walk the urgency never grows
    (float subtraction and abs are monotone), but pixels of EQUAL urgency must come in index
    order: a run of one value is in index order walking up (the sort is stable) and reversed
    walking down; a run mixing values (distinct values that round to the same difference)
    is sorted."""
    k = 0
    pos = start
    while pos != stop:
        key = abs(values[pos] - threshold)
        run = k
        while pos != stop and abs(values[pos] - threshold) == key:
            out_pixels[k] = pixels[pos]
            out_keys[k] = key
            k += 1
            pos += step
        if k - run > 1:
            ascending = True
            descending = True
            for m in range(run + 1, k):
                ascending = ascending and out_pixels[m - 1] < out_pixels[m]
                descending = descending and out_pixels[m - 1] > out_pixels[m]
            if descending:
                for m in range((k - run) // 2):
                    a, b = run + m, k - 1 - m
                    out_pixels[a], out_pixels[b] = out_pixels[b], out_pixels[a]
            elif not ascending:
                _heap_sort(out_pixels, run, k)


@jit(parallel=False)
def _heap_sort(a, lo, hi):
    """Sort a[lo:hi] in place (heapsort: O(m log m), no recursion; hand-written because
    compiling Numba's np.sort and np.searchsorted took seconds longer than these loops)."""
    m = hi - lo
    for root in range(m // 2 - 1, -1, -1):
        _sift(a, lo, root, m)
    for end in range(m - 1, 0, -1):
        a[lo], a[lo + end] = a[lo + end], a[lo]
        _sift(a, lo, 0, end)


@jit(parallel=False)
def _sift(a, lo, root, size):
    """Sift a[lo + root] down the max-heap a[lo:lo + size]."""
    while True:
        child = 2 * root + 1
        if child >= size:
            return
        if child + 1 < size and a[lo + child + 1] > a[lo + child]:
            child += 1
        if a[lo + root] >= a[lo + child]:
            return
        a[lo + root], a[lo + child] = a[lo + child], a[lo + root]
        root = child


@jit(parallel=False)
def priority_order(pixels, values, threshold):
    """The pixels in the warping's order at `threshold`: decreasing urgency
    ``|value - threshold|``, ties in increasing index, i.e. the order of the reference's heap
    tuples (-urgency, index). `pixels` sorts the flat float64 map `values` (a stable argsort,
    shared by all thresholds), so the order is built in O(n) per threshold: the values at or
    below the threshold walked up from the lowest, those above walked down from the highest,
    each in decreasing urgency (:func:`_write_side`), then merged."""
    n = pixels.size
    sorted_values = values[pixels]
    split = 0                               # the first position of a value > threshold
    top = n
    while split < top:
        middle = (split + top) // 2
        if sorted_values[middle] > threshold:
            top = middle
        else:
            split = middle + 1
    low_pixels, low_keys = np.empty(split, np.int64), np.empty(split, np.float64)
    high_pixels, high_keys = np.empty(n - split, np.int64), np.empty(n - split, np.float64)
    _write_side(pixels, sorted_values, 0, split, 1, threshold, low_pixels, low_keys)
    _write_side(pixels, sorted_values, n - 1, split - 1, -1, threshold, high_pixels, high_keys)
    order = np.empty(n, np.int64)
    lo = 0
    hi = 0
    for r in range(n):
        take_low = hi == n - split or (lo < split and (
            low_keys[lo] > high_keys[hi]
            or (low_keys[lo] == high_keys[hi] and low_pixels[lo] < high_pixels[hi])))
        if take_low:
            order[r] = low_pixels[lo]
            lo += 1
        else:
            order[r] = high_pixels[hi]
            hi += 1
    return order


@jit(parallel=False)
def _heap_push(heap, size, item):
    """Push the int `item` on the min-heap heap[:size] (the caller makes room)."""
    k = size
    while k > 0:
        parent = (k - 1) >> 1
        if heap[parent] <= item:
            break
        heap[k] = heap[parent]
        k = parent
    heap[k] = item


@jit(parallel=False)
def _heap_pop(heap, size):
    """Remove and return the smallest of heap[:size] (size > 0)."""
    top = heap[0]
    size -= 1
    last = heap[size]
    k = 0
    while True:
        child = 2 * k + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= last:
            break
        heap[k] = heap[child]
        k = child
    if size > 0:
        heap[k] = last
    return top


VALUE, DIFFERS, WAITING = 1, 2, 4   # the bits of warp_slice's state byte per pixel


@jit(parallel=False)
def warp_slice(truth, target, order, table):
    """Warp the 2-D bool mask `truth` toward `target` by flipping simple points (``table``, 256
    bytes, :func:`minunet.metrics.simple_point_table`) in the priority `order` (flat pixel
    indices, most urgent first: :func:`priority_order`) until no mismatched pixel is simple.
    Returns (warped mask, number of pixels left mismatched).

    The reference (``metrics._warp_slice_reference``) keeps the mismatched pixels in a heap; a
    popped pixel that is not simple now is dropped, and pushed again when a neighbour flips (the
    only event that can make it simple). Here a pixel's key is its rank in `order`, and the
    waiting pixels are held in two places whose union is the reference's heap:

    - a *stream*: a flag per rank, read by a cursor that only moves forward (every pixel
      mismatched at the start, and every pixel pushed at a rank the cursor has not passed);
    - a small binary heap of ranks the cursor has passed (pixels dropped and pushed again).
    Every heap rank is below the cursor, every stream rank at or above it, so the smallest
    waiting rank is the heap's top if the heap is not empty, else the stream's next flag:
    the same pixel the reference pops. A pixel already waiting is not pushed twice (in the
    reference the copy pops right after the first, or after neighbours pushed by its flip,
    and is then skipped or dropped again: it changes no flip).
    One pixel of permanent background pads the image, as in the reference.
    """
    h, w = truth.shape
    stride = w + 2
    n = h * w
    # One byte per padded pixel holds all a pop reads near it (one cache line for 3 rows of
    # neighbours): bit 0 its value, bit 1 "differs from the target", bit 2 "waiting".
    state = np.zeros((h + 2) * stride, np.uint8)
    for y in range(h):
        for x in range(w):
            state[(y + 1) * stride + x + 1] = truth[y, x] | (truth[y, x] != target[y, x]) << 1
    padded = np.empty(n, np.int32)                  # rank -> padded index
    rank = np.zeros((h + 2) * stride, np.int32)     # padded index -> rank
    in_stream = np.zeros(n, np.uint8)               # per rank
    mismatched = 0
    for r in range(n):
        y, x = divmod(order[r], w)
        i = (y + 1) * stride + x + 1
        padded[r] = i
        rank[i] = r
        if state[i] & DIFFERS:
            state[i] |= WAITING
            in_stream[r] = 1
            mismatched += 1
    offsets = np.array([-stride - 1, -stride, -stride + 1, -1, 1,
                        stride - 1, stride, stride + 1], np.int64)
    heap = np.empty(64, np.int64)
    size = 0
    cursor = 0
    while True:
        if size > 0:
            r = _heap_pop(heap, size)
            size -= 1
        else:
            while cursor < n and in_stream[cursor] == 0:
                cursor += 1
            if cursor == n:
                break
            r = cursor
            cursor += 1
        i = np.int64(padded[r])
        state[i] &= ~WAITING
        code = 0
        for k in range(8):
            code |= np.int64(state[i + offsets[k]] & VALUE) << k
        if table[code] == 0:
            continue
        state[i] ^= VALUE | DIFFERS          # flipped, and now equal to the target
        mismatched -= 1
        for k in range(8):
            j = i + offsets[k]
            if state[j] & (DIFFERS | WAITING) == DIFFERS:
                state[j] |= WAITING
                rj = np.int64(rank[j])
                if rj >= cursor:
                    in_stream[rj] = 1
                else:
                    if size == heap.size:
                        heap = np.concatenate((heap, np.empty(size, np.int64)))
                    _heap_push(heap, size, rj)
                    size += 1
    warped = np.empty((h, w), np.bool_)
    for y in range(h):
        for x in range(w):
            warped[y, x] = state[(y + 1) * stride + x + 1] & VALUE
    return warped, mismatched


# ---------------------------------------------------------------------------------------------
# Rand error (ISBI 2012): the sums of squares of the foreground-restricted contingency table
# ---------------------------------------------------------------------------------------------
@jit(parallel=False)
def rand_sums(truth_ids, pred_ids, n_truth, n_pred):
    """The integer sums of the foreground-restricted Rand error of one slice.

    `truth_ids` and `pred_ids` are flat int64 label images, 0 = boundary/background, segments
    numbered 1..n_truth and 1..n_pred (gaps allowed). Over the n truth-foreground pixels:
    returns (n, singletons, sum_ij n_ij^2, sum_i a_i^2, sum_j b_j^2), where a_i is the size of
    truth segment i, b_j the number of pixels of proposal segment j inside the truth
    foreground, n_ij their overlap, and singletons the proposal-background pixels inside it.

    n_ij without a hash table: the pixels are grouped by proposal segment (a counting sort on
    j), each group counts its truth ids in a scratch array, and the counts are squared and
    cleared on a second pass over the same group. O(n + n_truth + n_pred).
    """
    a = np.zeros(n_truth + 1, np.int64)
    b = np.zeros(n_pred + 1, np.int64)
    n = 0
    singletons = 0
    for k in range(truth_ids.size):
        t = truth_ids[k]
        if t > 0:
            n += 1
            a[t] += 1
            p = pred_ids[k]
            if p > 0:
                b[p] += 1
            else:
                singletons += 1
    start = np.zeros(n_pred + 2, np.int64)
    for j in range(1, n_pred + 1):
        start[j + 1] = start[j] + b[j]
    fill = start.copy()
    grouped = np.empty(n - singletons, np.int64)   # truth id of each pixel, grouped by j
    for k in range(truth_ids.size):
        t = truth_ids[k]
        p = pred_ids[k]
        if t > 0 and p > 0:
            grouped[fill[p]] = t
            fill[p] += 1
    scratch = np.zeros(n_truth + 1, np.int64)
    sum_ab = 0
    for j in range(1, n_pred + 1):
        for k in range(start[j], start[j + 1]):
            scratch[grouped[k]] += 1
        for k in range(start[j], start[j + 1]):
            c = scratch[grouped[k]]
            sum_ab += c * c
            scratch[grouped[k]] = 0      # counted once: later pixels of segment i see 0
    sum_a = 0
    for i in range(1, n_truth + 1):
        sum_a += a[i] * a[i]
    sum_b = 0
    for j in range(1, n_pred + 1):
        sum_b += b[j] * b[j]
    return n, singletons, sum_ab, sum_a, sum_b
