"""Prediction with a trained U-Net: class probabilities of whole images by overlap-tile (Fig. 2),
on a tile size chosen for the image rather than the one training used.

Training wants many random tiles; prediction wants the fewest network evaluations. A tile of
input side s yields an s - margin output square (the valid convolutions eat the margin), so
every tile recomputes a margin of context: small tiles spend most of their work on it. "We favor
large input tiles" (Section 3) holds for prediction too, and the only limits are the image (an
output square larger than the image is wasted work) and memory. :func:`choose_tile` takes the
valid tile that needs the fewest floating-point operations for the whole image within a memory
budget, which is the largest useful tile unless a smaller one happens to cover the image with
the same number of tiles.
"""
from __future__ import annotations

import numpy as np

from .autograd import no_grad
from .data.io import standardize
from .data.tiling import predict_overlap_tile, tile_origins
from .nn import UNet
from .tensor import Tensor

DEFAULT_MEMORY_MB = 1024


def forward_cost(tile: int, config: dict) -> tuple[int, int]:
    """(floating-point operations, bytes) of one forward pass of the U-Net `config` (as in
    ``UNet.config``) on one square input tile of side `tile`.

    The bytes count every float32 feature map of the pass as if all were kept at once (the input,
    each convolution's output before and after its ReLU, pooled, up-convolved and concatenated
    maps, the logits) plus the largest im2col buffer of a 3x3 convolution: an upper bound on the
    memory the pass needs, since inference frees most maps as soon as the next layer has run.
    Raises ValueError (from UNet.output_size) for an invalid tile."""
    depth, base = int(config["depth"]), int(config["base_channels"])
    UNet.output_size(tile, depth)
    widths = [base * 2 ** i for i in range(depth + 1)]
    flops, floats, scratch = 0, 0, 0

    def conv3x3(ci: int, co: int, side: int) -> int:
        nonlocal flops, floats, scratch
        out = side - 2
        flops += 2 * 9 * ci * co * out * out
        floats += 2 * co * out * out
        scratch = max(scratch, 9 * ci * out * out)
        return out

    side, channels = tile, int(config["in_channels"])
    floats += channels * side * side
    for width in widths[:depth]:              # contracting path: two convs, then 2x2 pooling
        side = conv3x3(width, width, conv3x3(channels, width, side))
        channels = width
        side //= 2
        floats += channels * side * side
    side = conv3x3(widths[depth], widths[depth], conv3x3(channels, widths[depth], side))
    channels = widths[depth]
    for width in reversed(widths[:depth]):    # expansive path: up-conv, concat, two convs
        flops += 2 * 4 * channels * width * side * side
        side *= 2
        floats += 3 * width * side * side     # the up-conv output and the concatenation
        side = conv3x3(width, width, conv3x3(2 * width, width, side))
        channels = width
    assert side == UNet.output_size(tile, depth)
    classes = int(config["num_classes"])
    flops += 2 * channels * classes * side * side
    floats += 3 * classes * side * side       # logits, and the softmax in float64
    return flops, 4 * (floats + scratch)


def smallest_grid_tile(depth: int) -> int:
    """The smallest valid input tile whose output square is at least the pooling grid (2**depth)
    wide, so that its tiles can step along the grid (204 -> 20 for depth 4; the smallest valid
    tile, 188 -> 4, cannot)."""
    smallest = UNet.valid_input_size(1, depth)
    margin = (smallest - UNet.output_size(smallest, depth)) // 2
    return UNet.valid_input_size(2 ** depth + 2 * margin, depth)


def choose_tile(height: int, width: int, config: dict,
                memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """The valid input tile that predicts an (height, width) image with the fewest operations
    (number of tiles times :func:`forward_cost`), among tiles whose forward pass fits in
    `memory_mb` megabytes; ties go to the larger tile. Candidates run from the smallest tile on
    the pooling grid (:func:`smallest_grid_tile`) up to the first whose output covers the image's
    longer side; if not even the smallest fits the budget, the smallest is returned."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if not memory_mb > 0:
        raise ValueError(f"the memory budget must be positive, got {memory_mb} MB")
    depth = int(config["depth"])
    budget = memory_mb * 2 ** 20
    tile = smallest_grid_tile(depth)
    best, best_cost = None, None
    while True:
        out = UNet.output_size(tile, depth)
        flops, nbytes = forward_cost(tile, config)
        if nbytes > budget and best is not None:
            break
        grid = 2 ** depth
        cost = len(tile_origins(height, out, grid)) * len(tile_origins(width, out, grid)) * flops
        if best is None or cost <= best_cost:
            best, best_cost = tile, cost
        if out >= max(height, width):
            break
        tile = UNet.valid_input_size(tile + 1, depth)
    return best


def count_tiles(height: int, width: int, model: UNet, tile: int) -> int:
    """How many network evaluations :func:`predict_probabilities` makes for an (height, width)
    image on input tiles of side `tile` (for a progress bar)."""
    out, grid = model.output_size(tile), 2 ** model.depth
    return len(tile_origins(height, out, grid)) * len(tile_origins(width, out, grid))


def predict_probabilities(model: UNet, image: np.ndarray, tile: int | None = None,
                          device: str = "cpu", memory_mb: float = DEFAULT_MEMORY_MB,
                          tta: bool = False, progress=None) -> np.ndarray:
    """Softmax class probabilities (K, H, W) of one 2-D image by overlap-tile prediction, with
    every tile on the network's pooling grid: the probabilities of one pass over the whole
    mirror-padded image, whatever the tile (up to float32 rounding), as the blocked prediction.

    The image is standardised as in training (:func:`minunet.data.standardize`, which refuses
    NaN or infinite values). `tile`: the input tile side, a valid size for the model; None
    chooses one for this image (:func:`choose_tile` within `memory_mb`). `tta`: average over
    the 8 flips and rotations instead (:func:`predict_probabilities_tta`). `progress`: called
    with 1 after each tile the network evaluates (e.g. a tqdm bar's ``update``)."""
    if tta:
        return predict_probabilities_tta(model, image, tile, device, memory_mb, progress)
    image = standardize(image)
    if image.ndim != 2:
        raise ValueError(f"predict_probabilities takes one 2-D image (H, W), got shape {image.shape}")
    if tile is None:
        tile = choose_tile(*image.shape, model.config, memory_mb)
    out = model.output_size(tile)
    if out < 2 ** model.depth:
        raise ValueError(f"tile {tile} gives a {out}-pixel output square, smaller than the "
                         f"{2 ** model.depth}-pixel pooling grid its tiles must step along (the "
                         f"probabilities would depend on the tile); use a tile of at least "
                         f"{smallest_grid_tile(model.depth)}")

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        with no_grad():
            logits = model(Tensor(batch, device=device)).numpy().astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        if progress is not None:
            progress(len(batch))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    return predict_overlap_tile(image[None], predict_fn, tile, out, grid=2 ** model.depth)


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """P(foreground) = 1 - P(class 0) from (K, H, W) probabilities, summed over classes 1..K-1
    (for two classes exactly probs[1]). Foreground is every class but 0, as the metrics count it."""
    probs = np.asarray(probs)
    return probs[1:].sum(axis=0, dtype=probs.dtype)


# The 8 symmetries of the square (the dihedral group): k quarter turns, after an optional flip
# of the columns. Each is a permutation of the pixels, undone exactly on the prediction.
SYMMETRIES = tuple((flip, k) for flip in (False, True) for k in range(4))


def _transform(array: np.ndarray, flip: bool, k: int) -> np.ndarray:
    """Apply one symmetry to the last two axes (the image plane)."""
    if flip:
        array = array[..., ::-1]
    return np.rot90(array, k, axes=(-2, -1))


def _undo(array: np.ndarray, flip: bool, k: int) -> np.ndarray:
    array = np.rot90(array, -k, axes=(-2, -1))
    return array[..., ::-1] if flip else array


def predict_probabilities_tta(model: UNet, image: np.ndarray, tile: int | None = None,
                              device: str = "cpu", memory_mb: float = DEFAULT_MEMORY_MB,
                              progress=None) -> np.ndarray:
    """Test-time augmentation: the class probabilities (K, H, W) of :func:`predict_probabilities`
    averaged over the image's 8 flips and 90-degree rotations, each prediction turned back to
    the image's frame before averaging (8 times the work of one pass).

    The paper's ISBI result was "averaged over 7 rotated versions of the input data" (Section
    4). The network itself is not rotation-equivariant, but the average is: since the 8
    symmetries form a group, the TTA prediction of a rotated or flipped image is the same
    transformation of the TTA prediction, up to float rounding (the summation order differs).
    A flip or rotation keeps the image's mean and spread, so the standardisation each pass
    applies (predict_probabilities) gives every transformed copy the same intensities."""
    image = standardize(image)
    if image.ndim != 2:
        raise ValueError(f"predict_probabilities_tta takes one 2-D image (H, W), got shape "
                         f"{image.shape}")
    if tile is None:
        tile = choose_tile(*image.shape, model.config, memory_mb)   # the same for H x W and W x H
    total = None
    for flip, k in SYMMETRIES:
        seen = np.ascontiguousarray(_transform(image, flip, k))
        probs = _undo(predict_probabilities(model, seen, tile, device, progress=progress), flip, k)
        total = probs.astype(np.float64) if total is None else total + probs
    return (total / len(SYMMETRIES)).astype(np.float32)
