"""Synthetic training data, generated on the fly (no downloads), deterministic for a given seed.

Two families, one per experiment of the paper:

* :func:`em_images` -- electron-microscopy-like slices in the spirit of the ISBI 2012 neuronal
  structures challenge (paper Section 4, first experiment): cells packed edge to edge, separated
  by dark membranes of varying thickness and contrast, with textured interiors and dark
  organelle-like blobs that fool a plain threshold. Label 1 = cell interior (white in ISBI's
  {0, 255} label images), 0 = membrane.
* :func:`cell_images` -- light-microscopy-like frames in the spirit of the cell tracking
  challenge's PhC-U373 / DIC-HeLa sets (second experiment): clusters of irregular cells that touch
  along long borders, with nearly the same interior intensity on both sides of a faint border.
  Separating them is what the paper's border weight map (eq. 2) is for. Labels are instances.

Both build their cells from a *weighted Voronoi tessellation* of random seeds evaluated on a
smoothly warped pixel grid: the tessellation gives cells that share borders, the additive seed
weights give varied sizes with curved borders, the warp makes the borders wiggle.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth random field: Gaussian-filtered white noise, zero mean, unit standard deviation.

    Wide filters are costly, so a field smoother than a few pixels is drawn on a coarser grid
    and upsampled (cubic spline): the result is equally smooth and ~50x cheaper."""
    factor = max(1, int(sigma // 3))
    coarse_shape = tuple(-(-n // factor) + 1 for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma / factor, mode="wrap")
    if factor > 1:
        field = ndimage.zoom(field, factor, order=3)
    field = field[: shape[0], : shape[1]]
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _warped_grid(rng: np.random.Generator, size: int, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x), each (size, size) float32, displaced by a smooth random field."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sigma = size / 16.0
    return (yy + amplitude * _smooth_noise(rng, (size, size), sigma),
            xx + amplitude * _smooth_noise(rng, (size, size), sigma))


def _nearest_two_seeds(yy: np.ndarray, xx: np.ndarray, seeds: np.ndarray, weights: np.ndarray,
                       reach: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted Voronoi tessellation of the (warped) pixel grid.

    For every pixel, with distances d_k = |(yy, xx) - seed_k| - weight_k (additive weights: the
    Voronoi cells stay star-shaped around their seed, hence connected, while their sizes vary),
    returns (index of the nearest seed int32, smallest d float32, second-smallest d float32),
    each (H, W). A seed only competes for the pixels within `reach` of it (a window), which keeps
    the cost at a few window-sized array operations per seed; pixels reached by fewer than two
    seeds get d = +inf."""
    shape = yy.shape
    nearest = np.full(shape, -1, np.int32)
    d1 = np.full(shape, np.inf, np.float32)
    d2 = np.full(shape, np.inf, np.float32)
    for k, ((sy, sx), w) in enumerate(zip(seeds, weights)):
        y0, y1 = max(int(sy - reach), 0), min(int(sy + reach) + 1, shape[0])
        x0, x1 = max(int(sx - reach), 0), min(int(sx + reach) + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        win = (slice(y0, y1), slice(x0, x1))
        d = np.hypot(yy[win] - sy, xx[win] - sx) - w
        closer = d < d1[win]
        d2[win] = np.minimum(d2[win], np.where(closer, d1[win], d))
        nearest[win][closer] = k
        d1[win] = np.minimum(d1[win], d)
    return nearest, d1, d2


def _em_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One EM-like slice: (image float32 (size, size) in [0, 1], label uint8 (size, size))."""
    # Cells: seeds on a jittered grid (spacing 20-30 px, like ISBI's neurites at half resolution),
    # some seeds dropped to make larger cells, additive weights to vary sizes further.
    spacing = rng.uniform(20.0, 30.0)
    ticks = np.arange(-spacing, size + spacing, spacing, dtype=np.float32)
    grid = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
    seeds = grid + rng.uniform(-0.4, 0.4, size=grid.shape).astype(np.float32) * spacing
    seeds = seeds[rng.random(len(seeds)) > 0.15]
    weights = rng.uniform(0.0, 0.25 * spacing, size=len(seeds)).astype(np.float32)
    yy, xx = _warped_grid(rng, size, amplitude=3.0)
    cell_of, d1, d2 = _nearest_two_seeds(yy, xx, seeds, weights, reach=3.0 * spacing)

    # Membranes: where the two nearest cells are almost equally near. (d2 - d1) is about twice the
    # distance to the shared border, so `gap < width` marks a membrane about `width` pixels wide,
    # the width varying smoothly along the membranes (1.5 .. 5 px).
    gap = d2 - d1
    width = 1.5 + 3.5 * np.clip(0.45 + 0.3 * _smooth_noise(rng, (size, size), size / 12), 0, 1)
    label = (gap >= width).astype(np.uint8)

    # Interiors: one grey level per cell plus fine texture.
    image = rng.uniform(0.5, 0.8, size=len(seeds)).astype(np.float32)[cell_of]
    image += 0.05 * _smooth_noise(rng, (size, size), 1.2)
    # Organelles (mitochondria, vesicles): dark blobs inside cells (label 1), about as dark as
    # the membranes, so that a global threshold cannot tell the two apart.
    impulses = np.zeros((size, size), np.float32)
    # At least one possible count: below 35 px the upper bound alone would be 0 (an empty range).
    low = size * size // 2500
    n_blobs = int(rng.integers(low, max(size * size // 1200, low + 1)))
    by, bx = rng.integers(0, size, size=(2, n_blobs))
    impulses[by, bx] = rng.uniform(0.5, 1.0, size=n_blobs)
    blobs = ndimage.gaussian_filter(impulses, sigma=(rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)))
    blobs = np.clip(blobs / (blobs.max() + 1e-12) * 2.5, 0, 1) * label
    image *= 1 - 0.6 * blobs

    # Membranes: dark over the labelled width with a 1-2 px soft edge; the contrast varies along
    # the membrane, and some stretches are faint (as where ISBI membranes run oblique to the cut).
    profile = np.clip((width + 1.5 - gap) / 3.0, 0.0, 1.0)
    contrast = np.clip(0.8 + 0.3 * _smooth_noise(rng, (size, size), size / 10), 0.3, 1.0)
    membrane_level = rng.uniform(0.1, 0.22)
    image += (membrane_level - image) * profile * contrast

    # Acquisition: uneven illumination, optical blur, noise.
    image *= 1.0 + 0.12 * _smooth_noise(rng, (size, size), size / 4)
    image = ndimage.gaussian_filter(image, 0.7)
    image += rng.normal(0.0, 0.05, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def em_images(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """EM-like images and their membrane labels (ISBI 2012 style).

    Args:
        n: number of images (>= 1).
        size: height = width in pixels (>= 16).
        seed: seeds a ``numpy.random.Generator``; the same (n, size, seed) gives the same data,
            and image k does not depend on n.
    Returns:
        images: float32 (n, size, size) in [0, 1].
        labels: uint8 (n, size, size): 1 = cell interior (foreground), 0 = membrane.
    """
    _check_count_and_size(n, size)
    images = np.empty((n, size, size), np.float32)
    labels = np.empty((n, size, size), np.uint8)
    for k, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        images[k], labels[k] = _em_slice(np.random.default_rng(child), size)
    return images, labels


def _cluster_seeds(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeds and radii for clusters of touching cells plus a few loners.

    Cells of one cluster are placed so that neighbouring discs overlap (they touch along a long
    border after the tessellation); seeds closer than 0.8 of the sum of radii are rejected, so
    no cell is swallowed by its neighbour."""
    seeds, radii = [], []
    n_clusters = int(rng.integers(2, 4))
    for _ in range(n_clusters):
        centre = rng.uniform(0.2 * size, 0.8 * size, size=2)
        n_members = int(rng.integers(3, 7))
        spread = size / 9.0
        for _attempt in range(40):  # rejection sampling of a handful of seeds
            if n_members == 0:
                break
            candidate = centre + rng.normal(0.0, spread, size=2)
            radius = rng.uniform(size / 16.0, size / 10.0)
            if all(np.hypot(*(candidate - s)) > 0.8 * (radius + r) for s, r in zip(seeds, radii)):
                seeds.append(candidate)
                radii.append(radius)
                n_members -= 1
    for _ in range(int(rng.integers(1, 3))):  # isolated cells
        candidate = rng.uniform(0.1 * size, 0.9 * size, size=2)
        radius = rng.uniform(size / 18.0, size / 12.0)
        if all(np.hypot(*(candidate - s)) > 1.2 * (radius + r) for s, r in zip(seeds, radii)):
            seeds.append(candidate)
            radii.append(radius)
    return np.asarray(seeds, np.float32), np.asarray(radii, np.float32)


def _cell_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One light-microscopy-like frame: (image float32 (size, size) in [0, 1], instances int32)."""
    seeds, radii = _cluster_seeds(rng, size)
    yy, xx = _warped_grid(rng, size, amplitude=size / 40.0)
    # d < 0 inside a seed's disc: the discs of one cluster overlap, the tessellation splits them.
    cell_of, d1, d2 = _nearest_two_seeds(yy, xx, seeds, radii, reach=float(size))
    inside = d1 < 0
    instances = np.where(inside, cell_of + 1, 0).astype(np.int32)
    # Renumber 1..K consecutively (a seed whose region ended up empty leaves no gap in the ids).
    present = np.unique(instances[inside])
    lookup = np.zeros(len(seeds) + 1, np.int32)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    instances = lookup[instances]

    # Interiors: all cells nearly the same brightness, with texture and a faint nucleus.
    background = 0.32 + 0.03 * _smooth_noise(rng, (size, size), size / 6)
    level = 0.58 + rng.uniform(-0.03, 0.03, size=len(seeds)).astype(np.float32)
    image = np.where(inside, level[cell_of], background)
    image += inside * 0.035 * _smooth_noise(rng, (size, size), 2.0)
    nucleus = np.sqrt((yy - seeds[cell_of, 0]) ** 2 + (xx - seeds[cell_of, 1]) ** 2) \
        < 0.35 * radii[cell_of]
    image -= 0.05 * (nucleus & inside)
    # Touching borders: barely darker than the interiors (d2 - d1 small between two cells).
    touching = inside & (d2 < 0) & (d2 - d1 < 1.8)
    image -= 0.06 * touching
    # Outer outline: dark rim just inside, bright phase-contrast-like halo just outside.
    image -= 0.12 * inside * np.exp(-(d1 / 1.5) ** 2)
    image += 0.14 * (~inside) * np.exp(-(d1 / 3.0) ** 2)

    image *= 1.0 + 0.08 * _smooth_noise(rng, (size, size), size / 4)
    image = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
    image += rng.normal(0.0, 0.035, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), instances


def cell_images(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Light-microscopy-like images of touching cells and their instance labels.

    Args:
        n: number of images (>= 1).
        size: height = width in pixels (>= 16).
        seed: seeds a ``numpy.random.Generator``; same arguments, same data.
    Returns:
        images: float32 (n, size, size) in [0, 1].
        instances: int32 (n, size, size): 0 = background, 1..K = cells (K varies per image);
            touching cells share a border with no background between them, as in the cell
            tracking challenge's masks (see ``minunet.data.weights.separate_touching``).
    """
    _check_count_and_size(n, size)
    images = np.empty((n, size, size), np.float32)
    instances = np.empty((n, size, size), np.int32)
    for k, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        images[k], instances[k] = _cell_slice(np.random.default_rng(child), size)
    return images, instances


def _check_count_and_size(n: int, size: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}; ask for at least one image")
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}; use e.g. size=256")
