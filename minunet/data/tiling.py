"""The overlap-tile strategy (paper Fig. 2): segmenting images of any size with a valid-conv net.

A U-Net with unpadded ("valid") convolutions maps an input tile of side `input_size` to the
segmentation of its central `output_size` square; the `margin = (input_size - output_size) / 2`
pixels around it are context. To segment a whole image, the output squares tile the image and
each is predicted from its input tile; where the tile reaches beyond the image, the missing
context is extrapolated by mirroring the image. Since every output pixel only sees its own
context, the result is the same as running the network once on the whole mirror-padded image,
but with bounded memory.

Mirroring here never repeats the edge pixel (NumPy's 'reflect': ... c b | a b c d | c b ...,
scipy.ndimage's 'mirror'): the extrapolation is then as smooth as the image itself at its edge.
Padding wider than the image keeps reflecting back and forth.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def reflect_indices(start: int, length: int, n: int) -> np.ndarray:
    """Indices start, ..., start + length - 1 of the infinitely mirrored axis of length n,
    folded back into 0..n-1 (period 2(n - 1); an axis of length 1 repeats its pixel).

    Returns int64 (length,)."""
    if n < 1:
        raise ValueError(f"cannot mirror an empty axis (length {n}); pass a non-empty image")
    idx = np.arange(start, start + length, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx < n, idx, period - idx)


def mirror_crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The window [top, top + height) x [left, left + width) of the image mirrored without end.

    Works on the last two axes of an array (..., H, W); windows may extend past any side by any
    amount. Returns a new array (..., height, width) of the image's dtype."""
    image = np.asarray(image)
    rows = reflect_indices(top, height, image.shape[-2])
    cols = reflect_indices(left, width, image.shape[-1])
    return image[..., rows[:, None], cols[None, :]]


def mirror_pad(image: np.ndarray, pad) -> np.ndarray:
    """Mirror-pad the last two axes (no edge repetition, like np.pad(mode='reflect'), but any pad
    width, also wider than the image).

    Args:
        image: (..., H, W).
        pad: int (all four sides) or ((top, bottom), (left, right)), non-negative.
    Returns:
        (..., H + top + bottom, W + left + right), the image's dtype.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"mirror_pad needs an array of at least 2 dims (..., H, W), "
                         f"got shape {image.shape}")
    if np.ndim(pad) == 0:
        (top, bottom), (left, right) = (pad, pad), (pad, pad)
    else:
        (top, bottom), (left, right) = pad
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pad widths must be >= 0, got {pad!r}")
    h, w = image.shape[-2:]
    return mirror_crop(image, -top, -left, h + top + bottom, w + left + right)


def tile_origins(length: int, output_size: int, grid: int = 1) -> list[int]:
    """Where the output squares start along one axis of `length` pixels.

    With ``grid = 1``: squares sit side by side from 0; if `length` is not a multiple of
    `output_size`, the last one is moved back to end exactly at the image edge (it overlaps its
    neighbour). An axis shorter than one square gets a single square at 0 (its overhang reads
    mirrored context and is cropped away).

    With ``grid = 2**depth`` (the network's pooling grid; what :func:`predict_overlap_tile`'s
    callers in minunet pass): every square starts at a multiple of `grid`, where one pass of the
    network over the whole mirror-padded image would pool, so overlapping squares compute the same
    values where they overlap and the result is that of the whole-image pass (notebook 07).
    Squares step by the largest multiple of `grid` that fits in `output_size` (388 -> 384 for the
    paper's network) and the last one may end up to `grid - 1` pixels past the image edge (its
    overhang reads mirrored context, like a short axis). A square smaller than the grid cannot
    step along it; then the ``grid = 1`` placement is used. Returns a sorted list of ints."""
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1 (2**depth of the network), got {grid}")
    if output_size < grid:
        grid = 1
    end = length + (output_size - length) % grid   # the last square's end: >= length, on the grid
    if end <= output_size:
        return [0]
    step = output_size - output_size % grid
    last = end - output_size
    return list(range(0, last, step)) + [last]


def predict_overlap_tile(image: np.ndarray, predict_fn: Callable[[np.ndarray], np.ndarray],
                         input_size: int, output_size: int, batch_size: int = 1,
                         grid: int = 1) -> np.ndarray:
    """Predict an image of any size tile by tile (Fig. 2).

    Args:
        image: float (H, W) or (C, H, W).
        predict_fn: maps a float32 batch (B, C, input_size, input_size) to (B, K, output_size,
            output_size) (e.g. class probabilities of the network's central square).
        input_size, output_size: the network's tile sizes; (input - output) must be even.
        batch_size: tiles per call of predict_fn.
        grid: 2**depth of the network: tiles start on its pooling grid, so that the result is
            that of one pass over the whole image (see :func:`tile_origins`); 1 places them
            side by side from the top-left corner.
    Returns:
        float32 (K, H, W).
    """
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image must be (H, W) or (C, H, W) and non-empty, got shape {image.shape}")
    if output_size < 1 or input_size < output_size or (input_size - output_size) % 2:
        raise ValueError(f"need input_size >= output_size >= 1 with an even difference, got "
                         f"input_size={input_size}, output_size={output_size}; use the network's "
                         "UNet.output_size(input_size)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    margin = (input_size - output_size) // 2
    _, h, w = image.shape
    origins = [(y, x) for y in tile_origins(h, output_size, grid) for x in tile_origins(w, output_size, grid)]
    result = None
    for first in range(0, len(origins), batch_size):
        batch_origins = origins[first:first + batch_size]
        batch = np.stack([mirror_crop(image, y - margin, x - margin, input_size, input_size)
                          for y, x in batch_origins])
        out = np.asarray(predict_fn(batch))
        if out.ndim != 4 or out.shape[0] != len(batch) or out.shape[2:] != (output_size,) * 2:
            raise ValueError(f"predict_fn returned shape {out.shape} for a batch of shape "
                             f"{batch.shape}; expected ({len(batch)}, K, {output_size}, "
                             f"{output_size}) -- check output_size against the network")
        if result is None:
            result = np.zeros((out.shape[1], h, w), np.float32)
        for (y, x), tile in zip(batch_origins, out):
            result[:, y:y + output_size, x:x + output_size] = \
                tile[:, :min(output_size, h - y), :min(output_size, w - x)]
    return result
