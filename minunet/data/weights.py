"""The paper's pixel-wise loss weights (Section 3, eq. 2).

    w(x) = w_c(x) + w0 * exp( -(d1(x) + d2(x))^2 / (2 sigma^2) )

w_c balances the class frequencies; the second term gives the thin background gaps between
touching cells a large weight, so the network is forced to learn to separate them. d1 and d2 are
the distances to the border of the nearest and the second-nearest cell. The paper uses
w0 = 10 and sigma ~ 5 pixels.

A border term needs a border: in the cell tracking challenge's masks touching cells share an
edge with no background between them, so :func:`separate_touching` first carves a 1-pixel
background gap between them, as the authors' own tool does.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# Beyond this many sigmas, w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) < 1e-6 * w0: a cell farther than
# that from a pixel cannot contribute to its border weight, which bounds each cell's distance map
# to a window around the cell.
_REACH_IN_SIGMAS = 5.3


def _check_instances(instances: np.ndarray) -> np.ndarray:
    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise ValueError(f"instance mask must be 2-D (H, W), got shape {instances.shape}; "
                         "pass one image at a time")
    if not (np.issubdtype(instances.dtype, np.integer) or instances.dtype == bool):
        raise TypeError(f"instance mask must hold integers (0 = background, 1..K = cells), "
                        f"got dtype {instances.dtype}; convert it with .astype(np.int32)")
    if instances.size and instances.min() < 0:
        raise ValueError("instance mask has negative ids; use 0 for background and 1..K for cells")
    return instances


def separate_touching(instances: np.ndarray) -> np.ndarray:
    """Give touching instances a 1-pixel background gap between them.

    A cell pixel becomes background when its 3x3 neighbourhood holds a cell with a *larger* id.
    Only one side of each contact gives up pixels, so the gap is one pixel wide, and because the
    test uses all 8 neighbours, no pixel of one cell stays 4- or 8-adjacent to another cell.
    Cells that touch nothing are returned unchanged (a cell only one pixel thick along a
    contact can lose those pixels).

    Args:
        instances: int (H, W), 0 = background, 1..K = cells.
    Returns:
        a new array of the same shape and dtype.
    """
    instances = _check_instances(instances)
    if instances.dtype == bool:
        return instances.copy()  # a binary mask has one class of cells: nothing to separate
    # Largest id in each 3x3 window; the image border does not count as a neighbour.
    largest_neighbour = ndimage.maximum_filter(instances, size=3, mode="constant", cval=0)
    separated = instances.copy()
    separated[(instances > 0) & (largest_neighbour > instances)] = 0
    return separated


def class_balance_weights(mask: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """The class-frequency term w_c of eq. 2: the majority class gets 1, a class k gets
    count(majority) / count(k).

    Normalising to the majority class (rather than to the mean) keeps w_c on the same scale as
    the paper's w0 = 10: a background pixel far from any cell weighs 1.

    Args:
        mask: int or bool (H, W) (any shape works), class indices 0..C-1.
        num_classes: C; classes absent from the mask simply get no pixels. Defaults to max + 1.
    Returns:
        float32 map of the mask's shape.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.int64)
    if not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"class mask must hold integer class indices, got dtype {mask.dtype}")
    if mask.size == 0:
        return np.zeros(mask.shape, np.float32)
    if mask.min() < 0:
        raise ValueError("class mask has negative values; class indices are 0..num_classes-1")
    n = int(mask.max()) + 1 if num_classes is None else int(num_classes)
    if mask.max() >= n:
        raise ValueError(f"class mask has value {int(mask.max())} but num_classes={n}; "
                         "raise num_classes or fix the labels")
    counts = np.bincount(mask.ravel(), minlength=n).astype(np.float64)
    per_class = np.where(counts > 0, counts.max() / np.maximum(counts, 1.0), 0.0)
    return per_class[mask].astype(np.float32)


def nearest_two_cell_distances(instances: np.ndarray, reach: float = np.inf
                               ) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2 of eq. 2: Euclidean distance from every pixel to the nearest pixel of the nearest
    and of the second-nearest cell (float32 (H, W) each).

    One exact distance transform per cell, restricted to the cell's bounding box grown by
    `reach` pixels (exact inside that window, since the whole cell lies in it); the two smallest
    of the K distances are kept with a running update (d1, d2) <- (min(d1, d), min(d2, max(d1, d))),
    which is a partial sort that never holds all K maps in memory.

    With a finite `reach`, d1 and d2 are exact wherever they are <= `reach`. A pixel outside a
    cell's window never sees that cell, so beyond `reach` a value may belong to a farther cell
    than the true nearest/second-nearest (measured up to ~20 px too large), or be +inf. The weight
    map passes a reach at which the border term exp(-(d1+d2)^2 / 2 sigma^2) is negligible, so this
    changes w(x) by less than 1e-6.
    """
    instances = _check_instances(instances)
    h, w = instances.shape
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    grow = int(np.ceil(min(reach, max(h, w))))
    for cell_id, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue  # an id with no pixels
        window = (slice(max(box[0].start - grow, 0), min(box[0].stop + grow, h)),
                  slice(max(box[1].start - grow, 0), min(box[1].stop + grow, w)))
        distance = ndimage.distance_transform_edt(instances[window] != cell_id).astype(np.float32)
        near1, near2 = d1[window], d2[window]  # views: updated in place
        np.minimum(near2, np.maximum(near1, distance), out=near2)
        np.minimum(near1, distance, out=near1)
    return d1, d2


def unet_weight_map(instances: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The paper's weight map, eq. 2, for an instance mask whose cells are already separated.

    w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, w_c(x) on cell
    pixels (the border term is meant for the background between cells; inside a cell d1 = 0 and
    the term would just reward the cell's own border). With fewer than two cells d2 = +inf and
    the border term is 0 everywhere.

    Args:
        instances: int (H, W), 0 = background, 1..K = cells (call :func:`separate_touching` first
            for touching cells).
        w0, sigma: the paper's 10 and 5 (pixels).
    Returns:
        float32 (H, W).
    """
    instances = _check_instances(instances)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    foreground = instances > 0
    weight = class_balance_weights(foreground.astype(np.int64), num_classes=2)
    if w0 == 0:
        return weight
    d1, d2 = nearest_two_cell_distances(instances, reach=_REACH_IN_SIGMAS * sigma)
    background = ~foreground & np.isfinite(d2)
    total = d1[background] + d2[background]
    weight[background] += (w0 * np.exp(-(total * total) / (2.0 * sigma * sigma))).astype(np.float32)
    return weight


def instance_targets(instances: np.ndarray, w0: float = 10.0, sigma: float = 5.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """From an instance mask to the training pair of the paper's cell experiments.

    Args:
        instances: int (H, W), 0 = background, 1..K = cells, touching allowed.
    Returns:
        target: int32 (H, W), 1 = cell, 0 = background (including the carved 1-pixel gaps).
        weight: float32 (H, W), :func:`unet_weight_map` of the separated cells.
    """
    separated = separate_touching(instances)
    return (separated > 0).astype(np.int32), unet_weight_map(separated, w0=w0, sigma=sigma)


def semantic_weight_map(mask: np.ndarray, w0: float = 0.0, sigma: float = 5.0) -> np.ndarray:
    """Weight map for a binary (semantic) label image such as ISBI 2012's.

    With w0 = 0 (default): class balance only. With w0 > 0 the 4-connected components of the
    foreground are treated as cells and eq. 2 adds the border term in the background between them
    (for EM, the membranes between neighbouring cells).

    Args:
        mask: int or bool (H, W), 1 = foreground, 0 = background.
    Returns:
        float32 (H, W).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise ValueError("semantic_weight_map needs a binary mask with values {0, 1}; "
                         "for more classes use class_balance_weights")
    if w0 == 0:
        return class_balance_weights(mask.astype(np.int64), num_classes=2)
    components, _ = ndimage.label(mask > 0)  # default structure: 4-connectivity
    return unet_weight_map(components.astype(np.int32), w0=w0, sigma=sigma)
