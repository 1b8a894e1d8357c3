"""The augmentation on the device (paper Section 3.1), everything Python about kernels/resample.cu:
the coordinate map composed from a few random numbers, the gather through it, and the gray values.

    compose_coordinates(out_shape, in_shape, angle, flips, shift, nodes, rows, cols) -> coords
    resample(coefficients, label, weight, coords, origin, bounds) -> (image, label, weight)
    gray_values(x, gamma, contrast, brightness, standardize) -> x (updated in place)

``compose_coordinates`` builds the (2, h, w) source coordinates of a flip + rotation + shift +
elastic warp on the device from the ~20 numbers the host drew (minunet.data.elastic.Transform);
its oracle is the host's ``Transform.coordinates``, which it repeats rounding for rounding.
``gray_values`` applies the gray-value variation (``elastic.apply_gray_values``) and/or the
standardisation (``minunet.data.io.standardize``) to each plane ``x[i]``, one block per plane.
Together they leave the host only the random numbers: a training tile on ``cuda`` costs a few
launches instead of milliseconds of NumPy per tile on the host, which the launch-bound step
needs (measured times: bench/results/training_iteration.md).

Resampling: the image is interpolated with a cubic B-spline, the label with nearest neighbour
(class ids are never blended), the weight map linearly (clamped at 0), all at the same source
coordinates, beyond the arrays mirrored without repeating the edge pixel (scipy's mode "mirror").

The oracle is ``scipy.ndimage.map_coordinates`` with exactly the modes ``minunet.data.elastic``
uses: order 3 (after scipy's spline prefilter), 0 and 1, mode "mirror". scipy's cubic
interpolation evaluates a B-spline through *coefficients* that its prefilter computes from the
image; :func:`spline_coefficients` computes them once per slice on the host (scipy's own
``spline_filter``), and every implementation evaluates the spline from them.

    resample(coefficients, label, weight, coords, origin, bounds) -> (image, label, weight)

- coefficients: float (C, H, W), ``spline_coefficients(image)``
- label: int32 (H, W); weight: float (H, W)
- coords: float (2, h, w), source (y, x) of every output pixel, relative to ``origin``
- origin: (oy, ox) ints; the source of output p is ``origin + coords[:, p]`` in the arrays'
  endless mirror extension, so a tile can be cut from a slice without first copying (and
  prefiltering) a mirrored region around it
- bounds: (lo, hi), the image result is clipped to it (cubic splines overshoot at sharp edges)

Returns image float32 (C, h, w), label int32 (h, w), weight float32 (h, w).

Implementations: the NumPy/scipy reference, a parallel Numba kernel for ``cpu`` (one task per
output row) and ``kernels/resample.cu`` for ``cuda`` and ``emu`` (one thread per output pixel).
compose_coordinates has a Numba twin for ``cpu`` too (the same float64 operations, one task per
row); gray_values has none: on ``cpu`` its reference is what the host ran anyway (NumPy, about a
millisecond per tile beside a step of ~60-100 ms there).
"""
from __future__ import annotations

import numpy as np
from numba import prange
from scipy import ndimage

from ..backends.kernels import check_size, require
from ..backends.sources import cu_defines
from .numba_config import jit

KERNEL_FILE = "resample"
GRAY_THREADS = cu_defines(KERNEL_FILE)["GRAY_THREADS"]   # gray_values' block (one block per plane)
MODE = "mirror"   # d c b | a b c d | c b a: the edge pixel is not repeated (minunet.data.elastic)


def spline_coefficients(image) -> np.ndarray:
    """The cubic B-spline coefficients of ``image`` ((H, W) or (C, H, W)) for mode "mirror",
    computed in float64 by scipy (``ndimage.spline_filter``, what ``map_coordinates`` does before
    every order-3 interpolation) per channel; float32 (C, H, W) out."""
    image = np.asarray(image)
    planes = image[None] if image.ndim == 2 else image
    return np.stack([ndimage.spline_filter(plane, order=3, mode=MODE, output=np.float64)
                     for plane in planes]).astype(np.float32)


def _check(coefficients, label, weight, coords, origin, bounds):
    require(np.ndim(coefficients) == 3, f"resample: coefficients must be (C, H, W), got shape "
                                        f"{tuple(np.shape(coefficients))}")
    hw = tuple(np.shape(coefficients)[1:])
    require(min(hw) >= 1 and np.shape(coefficients)[0] >= 1,
            f"resample: empty coefficients {tuple(np.shape(coefficients))}")
    require(tuple(np.shape(label)) == hw and tuple(np.shape(weight)) == hw,
            f"resample: label {tuple(np.shape(label))} and weight {tuple(np.shape(weight))} must "
            f"have the image's (H, W) = {hw}")
    require(np.ndim(coords) == 3 and np.shape(coords)[0] == 2,
            f"resample: coords must be (2, h, w) source (y, x), got shape {tuple(np.shape(coords))}")
    require(label.dtype.kind in "iu", f"resample: label must hold integer class ids, got {label.dtype}")
    require(len(origin) == 2 and len(bounds) == 2,
            f"resample: origin (oy, ox) and bounds (lo, hi) are pairs, got {origin!r}, {bounds!r}")
    require(not float(bounds[0]) > float(bounds[1]), f"resample: bounds {bounds!r} need lo <= hi")


# ---- the NumPy reference (the oracle): scipy -------------------------------------------------------
def reference(coefficients, label, weight, coords, origin, bounds):
    """scipy.ndimage.map_coordinates at origin + coords: order 3 on the spline coefficients
    (prefilter=False: they are already filtered), order 0 on the label, order 1 on the weight,
    mode "mirror". The image keeps the coefficients' float dtype, the label its dtype."""
    _check(coefficients, label, weight, coords, origin, bounds)
    where = np.asarray(coords, np.float64) + np.array(origin, np.float64)[:, None, None]
    dtype = coefficients.dtype
    image = np.stack([ndimage.map_coordinates(np.asarray(plane, np.float64), where, order=3,
                                              mode=MODE, prefilter=False) for plane in coefficients])
    image = np.clip(image, bounds[0], bounds[1]).astype(dtype)
    out_label = ndimage.map_coordinates(np.asarray(label), where, order=0, mode=MODE)
    out_weight = np.maximum(ndimage.map_coordinates(np.asarray(weight, np.float64), where, order=1,
                                                    mode=MODE), 0).astype(weight.dtype)
    return image, out_label.astype(label.dtype), out_weight


# ---- the fast CPU kernel (Numba) -------------------------------------------------------------------
# The twin of kernels/resample.cu (same folding, same rounding, same spline weights), one task per
# output row (prange), arithmetic in float64: a gather, bound by memory, where double precision
# costs nothing measurable and follows scipy more closely.
@jit(parallel=False)
def _mirror(c, n):
    """scipy's map_coordinate for mode "mirror": fold c into [0, n - 1]."""
    if n <= 1:
        return 0.0
    period = 2 * n - 2
    if c < 0.0:
        c = float(period * np.int64(-c / period)) + c
        c = c + period if c <= 1 - n else -c
    elif c > n - 1:
        c -= float(period * np.int64(c / period))
        if c >= n:
            c = period - c
    return c


@jit()
def _resample(coef, label, weight, coords, oy, ox, lo, hi, out_image, out_label, out_weight):
    channels, H, W = coef.shape
    h, w = coords.shape[1], coords.shape[2]
    for y in prange(h):
        wy = np.empty(4)
        wx = np.empty(4)
        rows = np.empty(4, np.int64)
        cols = np.empty(4, np.int64)
        for x in range(w):
            cy = _mirror(np.float64(coords[0, y, x]) + oy, H)
            cx = _mirror(np.float64(coords[1, y, x]) + ox, W)
            out_label[y, x] = label[int(_mirror(np.floor(cy + 0.5), H)),
                                    int(_mirror(np.floor(cx + 0.5), W))]
            fy, fx = np.floor(cy), np.floor(cx)
            ty, tx = cy - fy, cx - fx
            y0, y1 = int(_mirror(fy, H)), int(_mirror(fy + 1.0, H))
            x0, x1 = int(_mirror(fx, W)), int(_mirror(fx + 1.0, W))
            v = (1.0 - ty) * ((1.0 - tx) * weight[y0, x0] + tx * weight[y0, x1]) \
                + ty * ((1.0 - tx) * weight[y1, x0] + tx * weight[y1, x1])
            out_weight[y, x] = v if v > 0.0 else 0.0
            sy, sx = 1.0 - ty, 1.0 - tx
            wy[0] = sy * sy * sy / 6.0
            wy[1] = (3.0 * ty * ty * ty - 6.0 * ty * ty + 4.0) / 6.0
            wy[2] = (-3.0 * ty * ty * ty + 3.0 * ty * ty + 3.0 * ty + 1.0) / 6.0
            wy[3] = ty * ty * ty / 6.0
            wx[0] = sx * sx * sx / 6.0
            wx[1] = (3.0 * tx * tx * tx - 6.0 * tx * tx + 4.0) / 6.0
            wx[2] = (-3.0 * tx * tx * tx + 3.0 * tx * tx + 3.0 * tx + 1.0) / 6.0
            wx[3] = tx * tx * tx / 6.0
            iy, ix = int(fy), int(fx)
            for k in range(4):      # inside the array (most pixels) no index needs mirroring
                rows[k] = iy - 1 + k if 1 <= iy and iy + 2 < H else int(_mirror(fy - 1.0 + k, H))
                cols[k] = ix - 1 + k if 1 <= ix and ix + 2 < W else int(_mirror(fx - 1.0 + k, W))
            for c in range(channels):
                total = 0.0
                for i in range(4):
                    row = 0.0
                    for j in range(4):
                        row += wx[j] * coef[c, rows[i], cols[j]]
                    total += wy[i] * row
                out_image[c, y, x] = min(max(total, lo), hi)


def cpu(coefficients, label, weight, coords, origin, bounds):
    """The fast CPU resampling (float32 arrays; other float dtypes go to the reference)."""
    if not all(np.asarray(a).dtype == np.float32 for a in (coefficients, weight, coords)):
        return reference(coefficients, label, weight, coords, origin, bounds)
    _check(coefficients, label, weight, coords, origin, bounds)
    coefficients, weight, coords = (np.ascontiguousarray(a) for a in (coefficients, weight, coords))
    label = np.ascontiguousarray(label, np.int32)
    h, w = coords.shape[1:]
    out_image = np.empty((coefficients.shape[0], h, w), np.float32)
    out_label, out_weight = np.empty((h, w), np.int32), np.empty((h, w), np.float32)
    _resample(coefficients, label, weight, coords, float(origin[0]), float(origin[1]),
              float(np.float32(bounds[0])), float(np.float32(bounds[1])), out_image, out_label,
              out_weight)
    return out_image, out_label, out_weight


# ---- the CUDA kernel (kernels/resample.cu): one thread per output pixel ----------------------------
def kernels(k, coefficients, label, weight, coords, origin, bounds):
    _check(coefficients, label, weight, coords, origin, bounds)
    coefficients = k.floats(coefficients, "coefficients", 3)
    weight, coords = k.floats(weight, "weight", 2), k.floats(coords, "coords", 3)
    label = k.xp.ascontiguousarray(k.xp.asarray(label, dtype=k.xp.int32))
    channels, H, W = coefficients.shape
    h, w = coords.shape[1:]
    check_size((channels, h, w), "the resampled image")
    out_image, out_label, out_weight = k.empty((channels, h, w)), k.empty((h, w), np.int32), k.empty((h, w))
    k.launch_elementwise(KERNEL_FILE, "resample", h * w,
                         (coefficients, label, weight, coords, out_image, out_label, out_weight,
                          *(np.int32(v) for v in (channels, H, W, h, w, origin[0], origin[1])),
                          np.float32(bounds[0]), np.float32(bounds[1])))
    return out_image, out_label, out_weight



# ---- compose_coordinates: the coordinate map from the transform's numbers ---------------------------
def _check_compose(out_shape, in_shape, angle, flips, shift, nodes, rows, cols):
    require(len(out_shape) == 2 and len(in_shape) == 2 and min(out_shape) >= 1,
            f"compose_coordinates: out_shape {out_shape!r} and in_shape {in_shape!r} must be (h, w) pairs")
    require(len(flips) == 2 and len(shift) == 2,
            f"compose_coordinates: flips {flips!r} and shift {shift!r} must be (y, x) pairs")
    if nodes is None:
        return
    grid = np.shape(nodes)[-1]
    require(np.shape(nodes) == (2, grid, grid) and grid >= 2,
            f"compose_coordinates: nodes must be (2, grid, grid), got {tuple(np.shape(nodes))}")
    require(tuple(np.shape(rows)) == (out_shape[0], grid) and tuple(np.shape(cols)) == (out_shape[1], grid),
            f"compose_coordinates: rows {tuple(np.shape(rows))} and cols {tuple(np.shape(cols))} must be "
            f"({out_shape[0]}, {grid}) and ({out_shape[1]}, {grid}): elastic.spline_matrix(n, grid)")


def compose_reference(out_shape, in_shape, angle, flips, shift, nodes, rows, cols):
    """The host's map (elastic.transform_coordinates), the displacement from the given spline
    matrices: float32 (2, h, w)."""
    from ..data.elastic import spline_field, transform_coordinates

    _check_compose(out_shape, in_shape, angle, flips, shift, nodes, rows, cols)
    displacement = None if nodes is None else spline_field(np.asarray(nodes, np.float64),
                                                           np.asarray(rows, np.float64),
                                                           np.asarray(cols, np.float64))
    return transform_coordinates(out_shape, in_shape, angle, bool(flips[0]), bool(flips[1]),
                                 (float(shift[0]), float(shift[1])), displacement)


@jit()
def _compose(nodes, rows, cols, elastic, cos_a, sin_a, flip_y, flip_x, centre_y, centre_x,
             shift_y, shift_x, coords):
    """The twin of kernels/resample.cu's compose_coordinates: the same float64 operations in the
    same order (Numba, like the kernel, never fuses a product into an add without fastmath)."""
    h, w = coords.shape[1], coords.shape[2]
    grid = nodes.shape[2]
    for y in prange(h):
        a = np.zeros((2, grid))      # (rows @ nodes[c])[y, j]
        if elastic:
            for c in range(2):
                for j in range(grid):
                    total = 0.0
                    for i in range(grid):
                        total = total + rows[y, i] * nodes[c, i, j]
                    a[c, j] = total
        vy = np.float64(y) - (h - 1) / 2.0
        if flip_y:
            vy = -vy
        for x in range(w):
            vx = np.float64(x) - (w - 1) / 2.0
            if flip_x:
                vx = -vx
            sy = cos_a * vy + sin_a * vx
            sx = -sin_a * vy + cos_a * vx
            sy = sy + centre_y
            sx = sx + centre_x
            sy = sy + shift_y
            sx = sx + shift_x
            if elastic:
                dy = 0.0
                dx = 0.0
                for j in range(grid):
                    dy = dy + a[0, j] * cols[x, j]
                    dx = dx + a[1, j] * cols[x, j]
                sy = sy + np.float64(np.float32(dy))
                sx = sx + np.float64(np.float32(dx))
            coords[0, y, x] = np.float32(sy)
            coords[1, y, x] = np.float32(sx)


def compose_cpu(out_shape, in_shape, angle, flips, shift, nodes, rows, cols):
    """The fast CPU map: one task per output row (about 10x NumPy's whole-array version, which
    builds eight float64 arrays of the tile's size)."""
    _check_compose(out_shape, in_shape, angle, flips, shift, nodes, rows, cols)
    h, w = int(out_shape[0]), int(out_shape[1])
    elastic = nodes is not None
    if elastic:
        nodes, rows, cols = (np.ascontiguousarray(a, np.float64) for a in (nodes, rows, cols))
    else:
        nodes, rows, cols = np.zeros((2, 1, 1)), np.zeros((h, 1)), np.zeros((w, 1))   # not read
    coords = np.empty((2, h, w), np.float32)
    _compose(nodes, rows, cols, elastic, float(np.cos(angle)), float(np.sin(angle)),
             bool(flips[0]), bool(flips[1]), (in_shape[0] - 1) / 2.0, (in_shape[1] - 1) / 2.0,
             float(shift[0]), float(shift[1]), coords)
    return coords


def compose_kernels(k, out_shape, in_shape, angle, flips, shift, nodes, rows, cols):
    """kernels/resample.cu's compose_coordinates: one thread per output pixel. The small arrays
    (nodes, rows, cols) are float64; pass device arrays to avoid an upload per call (the spline
    matrices depend only on the tile size: TileSampler keeps them on the device)."""
    _check_compose(out_shape, in_shape, angle, flips, shift, nodes, rows, cols)
    xp = k.xp
    h, w = int(out_shape[0]), int(out_shape[1])
    check_size((2, h, w), "the coordinate map")
    elastic = nodes is not None
    if elastic:
        nodes, rows, cols = (xp.ascontiguousarray(xp.asarray(a, dtype=xp.float64)) for a in (nodes, rows, cols))
        grid = int(nodes.shape[-1])
    else:
        nodes = rows = cols = xp.zeros(1, dtype=xp.float64)   # not read
        grid = 0
    coords = k.empty((2, h, w))
    k.launch_elementwise(KERNEL_FILE, "compose_coordinates", h * w,
                         (nodes, rows, cols, coords, np.int32(h), np.int32(w), np.int32(grid),
                          np.int32(elastic), np.float64(np.cos(angle)), np.float64(np.sin(angle)),
                          np.int32(bool(flips[0])), np.int32(bool(flips[1])),
                          np.float64((in_shape[0] - 1) / 2.0), np.float64((in_shape[1] - 1) / 2.0),
                          np.float64(shift[0]), np.float64(shift[1])))
    return coords


# ---- gray_values: gray-value variation and standardisation, per plane -------------------------------
def _check_gray(x, gamma, contrast, brightness, standardize):
    require(np.ndim(x) >= 2 and np.shape(x)[0] >= 1 and np.size(x) >= 1,
            f"gray_values: x must be (N, ...) planes, got shape {tuple(np.shape(x))}")
    require(gamma is None or (gamma > 0 and contrast is not None and brightness is not None),
            f"gray_values: gamma must be None (no variation) or positive with a contrast and a "
            f"brightness, got {gamma!r}, {contrast!r}, {brightness!r}")


def gray_reference(x, gamma, contrast, brightness, standardize):
    """Each plane x[i]: elastic.apply_gray_values (when gamma is not None), then
    (v - mean) / (std + 1e-6) (io.standardize) when ``standardize``; in float64, written back
    into ``x`` (returned)."""
    from ..data.elastic import apply_gray_values

    _check_gray(x, gamma, contrast, brightness, standardize)
    for plane in x:
        values = np.asarray(plane, np.float64)
        if gamma is not None:
            clipped = np.clip(values, 0.0, 1.0) ** gamma
            values = (clipped - clipped.mean()) * contrast + clipped.mean() + brightness
            values = values.astype(np.float32).astype(np.float64)   # the gray step ends in float32
        if standardize:
            values = (values - values.mean()) / (values.std() + 1e-6)
        plane[...] = values
    return x


def gray_kernels(k, x, gamma, contrast, brightness, standardize):
    """kernels/resample.cu's gray_values, in place on a C-contiguous float32 ``x``: one block of
    GRAY_THREADS per plane."""
    _check_gray(x, gamma, contrast, brightness, standardize)
    require(x.dtype == np.float32 and x.flags.c_contiguous,
            "gray_values updates x in place: it must be a C-contiguous float32 array")
    planes = int(x.shape[0])
    n = x.size // planes
    gray = gamma is not None
    k.launch(KERNEL_FILE, "gray_values", (planes,), (GRAY_THREADS,),
             (x, np.int32(n), np.int32(gray), np.float64(gamma if gray else 1.0),
              np.float64(contrast if gray else 1.0), np.float64(brightness if gray else 0.0),
              np.int32(bool(standardize))))
    return x


# ---- registry entry --------------------------------------------------------------------------------
IMPLEMENTATIONS = {"resample": {"reference": reference, "cpu": cpu, "kernels": kernels},
                   "compose_coordinates": {"reference": compose_reference, "cpu": compose_cpu,
                                           "kernels": compose_kernels},
                   "gray_values": {"reference": gray_reference, "kernels": gray_kernels}}
# (C, H, W, h, w, origin): odd sizes, a 1-pixel-wide array (mirror of length 1), outputs larger
# than the input (coordinates folded over several periods), non-zero origins. compose_coordinates
# maps an (h, w) output onto an (H, W) input (grid 3, or 4 when C is even, no elastic part when
# C is 3); gray_values works on C planes of (h, w): gray and standardised (C = 1), standardised
# only (C = 2), gray only (C = 3).
TEST_CASES = [(1, 13, 17, 9, 11, (0, 0)), (2, 7, 5, 19, 23, (-4, 9)), (1, 1, 6, 5, 7, (3, -2)),
              (3, 31, 29, 33, 35, (-40, 57))]
# float32 sums of 16 products of coefficients (|c| <= ~2 for images in [0, 1]) with weights
# that sum to 1: error a few float32 ulps of the values; labels exact (see tests/test_resample.py)
TOLERANCE = dict(rtol=1e-5, atol=2e-6)
# the coordinates repeat the host's roundings: equal but for the last bit of the host's BLAS sum
# in the displacement (one float32 ulp, 2^-23 relative); the gray values compute in float64 and
# round once to float32 (values up to ~5 after standardising: a few ulps, summation order)
COMPOSE_TOLERANCE = dict(rtol=2.0 ** -23, atol=1e-12)
GRAY_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def tolerance(function: str, case) -> dict:
    return {"compose_coordinates": COMPOSE_TOLERANCE, "gray_values": GRAY_TOLERANCE}.get(function, TOLERANCE)


def example(rng, case, dtype=np.float32) -> dict:
    """resample: an image in [0, 1], its coefficients, 4 label classes, weights in [0.5, 3],
    coordinates spread over -2..+2 array sizes (folded several times) with some exact
    half-integers (the nearest-neighbour ties) and integers (the knots). compose_coordinates: a
    random transform (TEST_CASES' comment). gray_values: C planes with values in [-0.1, 1.1]
    (some clipped)."""
    from ..data.elastic import spline_matrix

    channels, H, W, h, w, origin = case
    image = rng.random((channels, H, W))
    coefficients = spline_coefficients(image).astype(dtype)
    label = rng.integers(0, 4, (H, W)).astype(np.int32)
    weight = (0.5 + 2.5 * rng.random((H, W))).astype(dtype)
    spans = np.array([H, W], np.float64)[:, None, None]
    coords = (rng.random((2, h, w)) * 5.0 - 2.0) * spans
    ties = rng.random((2, h, w)) < 0.15
    coords[ties] = np.floor(coords[ties]) + 0.5
    knots = rng.random((2, h, w)) < 0.1
    coords[knots] = np.round(coords[knots])
    bounds = (float(image.min()), float(image.max()))
    grid = 4 if channels % 2 == 0 else 3
    nodes = None if channels == 3 else rng.normal(0.0, 10.0, (2, grid, grid))
    splines = (None, None) if nodes is None else (spline_matrix(h, grid), spline_matrix(w, grid))
    transform = ((h, w), (H, W), float(rng.uniform(0.0, 2.0 * np.pi)), tuple(bool(f) for f in rng.random(2) < 0.5),
                 tuple(float(v) for v in rng.uniform(-10.0, 10.0, 2)), nodes, *splines)
    planes = (rng.random((channels, h, w)) * 1.2 - 0.1).astype(dtype)
    gray = (float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))), float(rng.uniform(0.8, 1.2)),
            float(rng.uniform(-0.1, 0.1))) if channels != 2 else (None, None, None)
    return {"resample": (coefficients, label, weight, coords.astype(dtype), origin, bounds),
            "compose_coordinates": transform,
            "gray_values": (planes, *gray, channels != 3)}


def bench_cases(base: int, tile: int, batch: int) -> list:
    """One training tile of side ``tile`` from a 512 x 512 slice."""
    return [(1, 512, 512, tile, tile, (0, 0))]


def cost(case) -> dict:
    """resample, per output pixel: ~40 FLOPs per channel + ~70; bytes: coordinates, outputs, the
    gathered inputs once (neighbours share cache lines). compose_coordinates: ~46 FP64 operations
    and 8 bytes written per pixel. gray_values (gray and standardised): ~45 FLOPs per pixel, 5
    passes of 4 bytes read and 2 of 4 written."""
    channels, _, _, h, w, _ = case
    pixels = float(h * w)
    return {"resample": ((40.0 * channels + 70.0) * pixels, (8.0 * channels + 24.0) * pixels),
            "compose_coordinates": (46.0 * pixels, 8.0 * pixels),
            "gray_values": (45.0 * channels * pixels, 28.0 * channels * pixels)}
