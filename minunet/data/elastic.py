"""Data augmentation of the paper (Section 3.1): elastic deformation, shifts, rotations, flips,
gray-value variations.

"We generate smooth deformations using random displacement vectors on a coarse 3 by 3 grid.
The displacements are sampled from a Gaussian distribution with 10 pixels standard deviation.
Per-pixel displacements are then computed using bicubic interpolation."

Every geometric change is one map from output pixels to source coordinates, and the image, its
label and its weight map are resampled through the *same* map, so they stay aligned:
the image with cubic interpolation, the label with nearest-neighbour (class ids must not be
blended), the weight map with linear interpolation (no overshoot: weights stay positive).
Beyond the array, values are mirrored without repeating the edge pixel (ndimage mode 'mirror',
NumPy's 'reflect'), like the overlap-tile strategy (Fig. 2).

The resampling here is scipy's (``ndimage.map_coordinates``), the oracle. Training resamples on
its own device instead: :func:`random_coordinates` draws the same random numbers and builds the
same coordinate map on the host, and ``TileSampler(device=...)`` (minunet.data.dataset) reads the
slice through it with the device's ``resample`` (minunet/ops/resample.py: a parallel Numba
kernel on cpu, kernels/resample.cu on cuda and emu), matching scipy within the tolerances of
tests/test_resample.py (labels exactly).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_BOUNDARY = "mirror"  # d c b | a b c d | c b a : the edge pixel is not repeated


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


def displacement_field(shape: tuple[int, int], rng: np.random.Generator, grid: int = 3,
                       std: float = 10.0) -> np.ndarray:
    """Smooth random displacements: Gaussian vectors (std pixels) on a coarse grid x grid lattice
    whose nodes span the array corner to corner, interpolated bicubically (a cubic spline
    through the nodes) to every pixel.

    Args:
        shape: (H, W) of the region to deform.
        grid: nodes per side (the paper: 3), >= 2.
        std: standard deviation of each displacement component, pixels (the paper: 10).
    Returns:
        float32 (2, H, W): displacement[0] along y (rows), displacement[1] along x (columns).
    """
    _check_rng(rng)
    return field_from_nodes(shape, _random_nodes(rng, grid, std))


def _random_nodes(rng: np.random.Generator, grid: int, std: float) -> np.ndarray:
    """The elastic grid's displacement vectors: float64 (2, grid, grid), Gaussian with `std`."""
    if int(grid) != grid or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return rng.normal(0.0, std, size=(2, int(grid), int(grid)))


def field_from_nodes(shape: tuple[int, int], nodes: np.ndarray) -> np.ndarray:
    """The dense float32 (2, H, W) displacement of :func:`displacement_field` from its grid's
    nodes (float64 (2, grid, grid))."""
    h, w = int(shape[0]), int(shape[1])
    grid = nodes.shape[-1]
    # The bicubic interpolation is separable: displacement[c] = Wy @ nodes[c] @ Wx^T, where column
    # j of Wy holds the cubic spline through the unit vector e_j sampled at the pixels' lattice
    # coordinates. The same numbers as map_coordinates(nodes[c], lattice, order=3, mode="nearest")
    # (up to float64 rounding), at a fraction of the cost: 2 small matrix products instead of 16
    # spline taps per pixel (13 ms per 348 x 348 tile on a 2-core VM).
    return spline_field(nodes, spline_matrix(h, grid), spline_matrix(w, grid))


def spline_field(nodes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 (2, h, w): rows @ nodes[c] @ cols^T for each component c, the spline matrices
    rows (h, grid) and cols (w, grid) of :func:`spline_matrix`."""
    return np.stack([rows @ nodes[c] @ cols.T for c in range(2)]).astype(np.float32)


@functools.lru_cache(maxsize=32)
def spline_matrix(n: int, grid: int) -> np.ndarray:
    """(n, grid): row i holds the weights of the grid nodes in the cubic spline (scipy's order 3,
    mode "nearest", with its prefilter) at pixel i, whose lattice coordinate is
    i * (grid - 1) / (n - 1). Read-only: it is cached."""
    positions = np.linspace(0.0, grid - 1.0, n) if n > 1 else np.zeros(1)
    matrix = np.stack([ndimage.map_coordinates(np.eye(grid)[j], positions[None], order=3,
                                               mode="nearest") for j in range(grid)], axis=1)
    matrix.setflags(write=False)
    return matrix


def _resample(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Sample `array` ((H, W) or (C, H, W)) at source coordinates `coords` (2, h, w)."""
    if array.ndim == 2:
        return ndimage.map_coordinates(array, coords, order=order, mode=_BOUNDARY)
    # (C, H, W): sample every channel at the same (y, x). The channel coordinate is an integer,
    # where the cubic spline reproduces the samples exactly, so channels are not blended.
    channels = np.broadcast_to(np.arange(array.shape[0], dtype=coords.dtype)[:, None, None],
                               (array.shape[0],) + coords.shape[1:])
    full = np.stack([channels,
                     np.broadcast_to(coords[0], channels.shape),
                     np.broadcast_to(coords[1], channels.shape)])
    return ndimage.map_coordinates(array, full, order=order, mode=_BOUNDARY)


def warp_with_coordinates(image: np.ndarray, label: np.ndarray | None,
                          weight: np.ndarray | None, coords: np.ndarray):
    """Resample through one coordinate map: output pixel p takes the value at coords[:, p].

    image float (H, W) or (C, H, W): cubic, clipped to the input's own range (cubic splines
    overshoot next to sharp edges); label int (H, W): nearest, dtype kept; weight float (H, W):
    linear. coords: (2, h, w) source (y, x). Returns (image float32, label or None,
    weight float32 or None), each with spatial shape (h, w)."""
    image = np.asarray(image)
    warped = _resample(image.astype(np.float32), coords, order=3)
    warped = np.clip(warped, image.min(), image.max()).astype(np.float32)
    warped_label = None if label is None else \
        _resample(np.asarray(label), coords, order=0).astype(np.asarray(label).dtype)
    warped_weight = None if weight is None else \
        np.maximum(_resample(np.asarray(weight, np.float32), coords, order=1), 0).astype(np.float32)
    return warped, warped_label, warped_weight


def _check_arrays(image, label, weight) -> tuple[int, int]:
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (C, H, W), got shape {image.shape}")
    if image.size == 0:
        raise ValueError("image is empty; pass an image with at least one pixel")
    hw = image.shape[-2:]
    for name, other in (("label", label), ("weight", weight)):
        if other is not None and np.shape(other) != hw:
            raise ValueError(f"{name} shape {np.shape(other)} does not match the image's "
                             f"(H, W) = {hw}; pass arrays of the same size")
    return hw


def elastic_deform(image: np.ndarray, label: np.ndarray | None = None,
                   weight: np.ndarray | None = None, rng: np.random.Generator | None = None,
                   grid: int = 3, std: float = 10.0):
    """The paper's elastic deformation of an image and, identically, its label and weight map.

    Output pixel p takes the value at p + displacement(p) (see :func:`displacement_field`).

    Args:
        image: float (H, W) or (C, H, W).
        label: int (H, W) or None.
        weight: float (H, W) or None.
        rng: numpy.random.Generator (required: the deformation is random but reproducible).
        grid, std: coarse grid size and displacement std in pixels (the paper: 3 and 10).
    Returns:
        (image float32, label same dtype or None, weight float32 or None,
         displacement float32 (2, H, W)); draw the displacement to see the deformed grid.
    """
    _check_rng(rng)
    h, w = _check_arrays(image, label, weight)
    displacement = displacement_field((h, w), rng, grid=grid, std=std)
    coords = np.mgrid[0:h, 0:w].astype(np.float32) + displacement
    return (*warp_with_coordinates(image, label, weight, coords), displacement)


def transform_coordinates(out_shape: tuple[int, int], in_shape: tuple[int, int],
                          angle: float = 0.0, flip_y: bool = False, flip_x: bool = False,
                          shift: tuple[float, float] = (0.0, 0.0),
                          displacement: np.ndarray | None = None) -> np.ndarray:
    """Source coordinates for every output pixel of a flip + rotation + shift + elastic warp.

    The output region (out_shape) is centred on the input array (in_shape): with no transform,
    output pixel p reads the input at p + (in - out) / 2. Around the centre, the offset v of p is
    flipped, rotated, shifted, and the elastic displacement at p is added. The content turns
    counter-clockwise on screen by `angle` radians (angle = pi/2 with no flip gives np.rot90).

    Returns:
        float32 (2, out_H, out_W): source (y, x) per output pixel.
    """
    oh, ow = int(out_shape[0]), int(out_shape[1])
    v = np.mgrid[0:oh, 0:ow].astype(np.float64)
    v[0] -= (oh - 1) / 2.0
    v[1] -= (ow - 1) / 2.0
    if flip_y:
        v[0] = -v[0]
    if flip_x:
        v[1] = -v[1]
    cos, sin = np.cos(angle), np.sin(angle)
    # Rows point down, so this rotation of the *sampling* offsets turns the content
    # counter-clockwise on screen.
    src_y = cos * v[0] + sin * v[1] + (in_shape[0] - 1) / 2.0 + shift[0]
    src_x = -sin * v[0] + cos * v[1] + (in_shape[1] - 1) / 2.0 + shift[1]
    coords = np.stack([src_y, src_x])
    if displacement is not None:
        coords += displacement
    return coords.astype(np.float32)


def gray_value_variation(image: np.ndarray, rng: np.random.Generator,
                         gamma: tuple[float, float] = (0.7, 1.4),
                         contrast: tuple[float, float] = (0.8, 1.2),
                         brightness: tuple[float, float] = (-0.1, 0.1)) -> np.ndarray:
    """Random gamma (log-uniform in `gamma`), then contrast around the mean and a brightness
    offset (uniform). Expects intensities in [0, 1] (what the loaders produce); float32 out."""
    return apply_gray_values(image, *random_gray_values(rng, gamma, contrast, brightness))


def random_gray_values(rng: np.random.Generator, gamma: tuple[float, float] = (0.7, 1.4),
                       contrast: tuple[float, float] = (0.8, 1.2),
                       brightness: tuple[float, float] = (-0.1, 0.1)) -> tuple[float, float, float]:
    """(gamma, contrast, brightness) of :func:`gray_value_variation`, drawn in this order."""
    _check_rng(rng)
    g = np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1])))
    c = rng.uniform(*contrast)
    b = rng.uniform(*brightness)
    return float(g), float(c), float(b)


def apply_gray_values(image, gamma: float, contrast: float, brightness: float):
    """clip(image, 0, 1)^gamma, its contrast scaled around its mean, brightness added; computed
    in float64, float32 out (the oracle of the devices' ``gray_values``, minunet/ops/resample.py)."""
    xp = np if isinstance(image, np.ndarray) else _array_module(image)  # NumPy, or CuPy on cuda
    out = xp.clip(xp.asarray(image, xp.float32), 0.0, 1.0).astype(xp.float64) ** gamma
    return ((out - out.mean()) * contrast + out.mean() + brightness).astype(xp.float32)


def _array_module(array):
    """NumPy for host data (lists too), CuPy for a CuPy array."""
    if type(array).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


@dataclass(frozen=True)
class Transform:
    """One draw of Section 3.1's geometric augmentation: flips, a rotation by `angle` radians, a
    `shift` (pixels, y and x) and the elastic grid's `nodes` (float64 (2, grid, grid), None for
    no elastic deformation). :meth:`coordinates` composes it into a coordinate map on the host
    (the oracle); the devices' ``compose_coordinates`` (minunet/ops/resample.py, a kernel in
    kernels/resample.cu) builds the same map where the model trains, from these ~20 numbers."""
    flip_y: bool
    flip_x: bool
    angle: float
    shift: tuple[float, float]
    nodes: np.ndarray | None

    def coordinates(self, out_shape: tuple[int, int], in_shape: tuple[int, int]) -> np.ndarray:
        """float32 (2, out_H, out_W) source coordinates of an output region centred on an input
        of `in_shape` (:func:`transform_coordinates`)."""
        displacement = None if self.nodes is None else field_from_nodes(out_shape, self.nodes)
        return transform_coordinates(out_shape, in_shape, self.angle, self.flip_y, self.flip_x,
                                     self.shift, displacement)


def random_transform(rng: np.random.Generator, *, max_shift: float = 10.0, rotate: bool = True,
                     flip: bool = True, elastic_std: float = 10.0, grid: int = 3) -> Transform:
    """Draws flips, angle, shift and the elastic nodes from `rng`, in this order (always the same
    numbers for the same generator state, whichever device composes them)."""
    _check_rng(rng)
    flip_y, flip_x = (rng.random(2) < 0.5) if flip else (False, False)
    angle = rng.uniform(0.0, 2.0 * np.pi) if rotate else 0.0
    shift = rng.uniform(-max_shift, max_shift, size=2) if max_shift > 0 else (0.0, 0.0)
    nodes = _random_nodes(rng, grid, elastic_std) if elastic_std > 0 else None
    return Transform(bool(flip_y), bool(flip_x), float(angle),
                     (float(shift[0]), float(shift[1])), nodes)


def random_coordinates(rng: np.random.Generator, out_shape: tuple[int, int],
                       in_shape: tuple[int, int], *, max_shift: float = 10.0, rotate: bool = True,
                       flip: bool = True, elastic_std: float = 10.0, grid: int = 3) -> np.ndarray:
    """The random part of :func:`random_augment`: :func:`random_transform` composed into the
    source coordinates (float32 (2, out_H, out_W)) of an output region centred on an input of
    `in_shape`. Any resampler can then read through them: scipy (:func:`warp_with_coordinates`)
    or the device's ``resample`` (minunet/ops/resample.py)."""
    return random_transform(rng, max_shift=max_shift, rotate=rotate, flip=flip,
                            elastic_std=elastic_std, grid=grid).coordinates(out_shape, in_shape)


def random_augment(image: np.ndarray, label: np.ndarray | None = None,
                   weight: np.ndarray | None = None, rng: np.random.Generator | None = None, *,
                   out_shape: tuple[int, int] | None = None, max_shift: float = 10.0,
                   rotate: bool = True, flip: bool = True, elastic_std: float = 10.0,
                   grid: int = 3, gray: bool = True):
    """All of Section 3.1's augmentations at once, in a single resampling.

    Flips (each axis with probability 1/2), a rotation by an arbitrary angle, a shift of up to
    `max_shift` pixels per axis and the elastic deformation are composed into one coordinate
    map (one interpolation, so the image is blurred once, not four times); then random gray-value
    variations (gamma, contrast, brightness) are applied to the image only.

    To avoid border artefacts, pass an array larger than you need and ask for its centre with
    `out_shape`: the source coordinates then mostly fall inside real data (the elastic grid
    spans the output region, as in the paper, where it spans the network's input tile).

    Args:
        image: float (H, W) or (C, H, W), intensities in [0, 1].
        label: int (H, W) or None. weight: float (H, W) or None.
        rng: numpy.random.Generator (required).
        out_shape: (h, w) of the centred output region; default (H, W).
    Returns:
        (image float32 (h, w) or (C, h, w), label (h, w) or None, weight float32 (h, w) or None).
    """
    _check_rng(rng)
    hw = _check_arrays(image, label, weight)
    out_shape = hw if out_shape is None else (int(out_shape[0]), int(out_shape[1]))
    coords = random_coordinates(rng, out_shape, hw, max_shift=max_shift, rotate=rotate, flip=flip,
                                elastic_std=elastic_std, grid=grid)
    image, label, weight = warp_with_coordinates(image, label, weight, coords)
    if gray:
        image = gray_value_variation(image, rng)
    return image, label, weight
