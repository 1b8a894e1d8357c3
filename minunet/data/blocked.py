"""Overlap-tile prediction (paper Fig. 2) of images larger than memory, as a Dask computation.

The overlap-tile strategy *is* a blocked computation with a halo: to predict one block of output
pixels, the network needs the block plus its context around it, and nothing else. Here the
output is a lazy ``dask.array`` cut into blocks of ``chunk`` x ``chunk`` pixels; each block is
one task that reads its window of the image (a Zarr array, a TIFF read piece by piece, see
:mod:`minunet.data.lazy_io`, or any array that slices): the block plus a halo of the network's
context, mirror-extended where it leaves the image (as in Fig. 2). It predicts the window tile
by tile and keeps the block's own probabilities. Blocks share nothing but the weights (one task
that every block depends on), so Dask can run them on local threads or on a
``dask.distributed`` cluster in any order, and memory is bounded by the blocks in flight and the
network's tile, not by the image. (Dask's ``map_overlap`` would instead pass halos between
neighbouring blocks, keeping about two rows of blocks in memory.)

**Exactness.** Max-pooling makes a U-Net equivariant only to shifts by multiples of
``2**depth`` (notebook 07): a tile whose input starts elsewhere pairs other pixels in its first
pooling and predicts slightly different values. So every tile here starts on one *pooling grid*:
output squares start at multiples of ``2**depth`` counted from the image's first pixel, i.e. input
tiles start at ``-margin`` plus such a multiple, exactly where one pass of the network over the
whole mirror-padded image would pool. Blocks are multiples of ``2**depth`` too, so every block,
every tile size and every chunking give the same probabilities, up to float32 rounding: those of
a single pass over the whole image, which is also what the in-memory prediction computes (its
tiles lie on the same grid: :func:`minunet.data.tiling.tile_origins` with ``grid = 2**depth``).

**The halo.** A block of L output rows is predicted by tiles whose outputs cover it; valid output
sides are ``o = o_min + k * 2**depth`` (388 = 4 + 24 * 16 in the paper), so aligned tiles end
``e = (o - L) mod 2**depth`` rows past the block (fewer than ``2**depth``), and their inputs reach
``margin`` rows before the block and ``margin + e`` rows after it: that is the halo, exactly the
input the network reads. Outside the image the window is the infinite mirror of
:func:`minunet.data.tiling.mirror_crop` (no edge repetition; Dask's own "reflect" boundary
repeats the edge pixel).

**Intensities.** Like ``python -m minunet.predict`` on a file (per-slice min/max to [0, 1] when
reading, then standardising each slice to zero mean and unit variance), but the statistics are
global: min, max, mean and variance of every slice are computed first, in one lazy pass over the
array, and then applied block by block, so the network sees what the in-memory path gives it.
"""
from __future__ import annotations

import threading

import numpy as np

from ..autograd import no_grad
from ..nn import UNet
from ..tensor import Tensor
from .tiling import reflect_indices

_EPS = 1e-6  # the epsilon of minunet's per-image standardisation: (x - mean) / (std + eps)


# ---- the network on a worker -------------------------------------------------------------------
class TilePredictor:
    """Softmax class probabilities of input tiles, shipped to Dask workers as one object.

    In this process it uses the model itself (no copy of the weights). Pickled for a cluster,
    it carries the configuration and the weights as NumPy arrays, and each worker rebuilds the
    UNet on first use, on the device the model was on: the weights travel once per worker, as
    one task's result that every block depends on, not once per block. One forward pass runs
    at a time per process: the network's kernels already use every core, and blocks queued
    behind the lock only hold their input."""

    def __init__(self, model: UNet):
        if model.training:
            raise ValueError("the model is in training mode (dropout on); call model.eval() "
                             "before predicting")
        self.config = dict(model.config)
        self.device = next(iter(model.parameters())).device
        self._model, self._state = model, None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self._state if self._model is None else self._model.state_dict()
        return {"config": self.config, "device": self.device, "_state": state}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._model = None
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        return int(self.config["depth"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def _network(self) -> UNet:
        if self._model is None:                             # on a worker: rebuild it once
            model = UNet(**self.config, seed=0)
            model.load_state_dict(self._state)
            self._model, self._state = model.to(self.device).eval(), None
        return self._model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, s, s) float32 -> (B, K, o, o) float32 softmax, computed in float64 exactly as
        the in-memory prediction does."""
        with self._lock, no_grad():
            logits = self._network()(Tensor(batch, device=self.device)).numpy().astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---- geometry ----------------------------------------------------------------------------------
class Geometry:
    """The network's tile geometry for blocked prediction.

    Attributes: ``margin`` (context on each side, 92 in the paper), ``grid`` (2**depth, the
    pooling grid), ``tile`` and ``output`` (the input and output side of the largest tile used)."""

    def __init__(self, depth: int, tile: int):
        self.depth, self.grid, self.tile = depth, 2 ** depth, int(tile)
        self.output = UNet.output_size(self.tile, depth)  # ValueError naming the nearest sizes
        self.margin = (self.tile - self.output) // 2
        if self.output < self.grid:
            from ..inference import smallest_grid_tile   # (inference imports minunet.data)

            bigger = smallest_grid_tile(depth)
            raise ValueError(f"tile {tile} gives a {self.output}-pixel output square, smaller than "
                             f"the {self.grid}-pixel pooling grid it must step along; use a tile "
                             f"of at least {bigger}")

    def output_for(self, length: int) -> int:
        """The output side of the tiles for a block of `length` rows: the full tile, or the
        smallest valid one covering a shorter block."""
        if length >= self.output:
            return self.output
        return UNet.output_size(UNet.valid_input_size(length + 2 * self.margin, self.depth),
                                self.depth)

    def overhang(self, length: int) -> int:
        """e: how far the last aligned tile of a block of `length` rows ends past it (< grid)."""
        return (self.output_for(length) - length) % self.grid

    def origins(self, length: int) -> tuple[int, list[int]]:
        """(o, starts): the output side and the aligned starts of the tiles covering a block.

        Tiles step by the largest multiple of the grid that fits in o (their outputs overlap by
        o mod grid pixels and agree there); the last one ends at length + overhang."""
        o = self.output_for(length)
        end = length + self.overhang(length)
        if end <= o:
            return o, [0]
        step = o - o % self.grid
        last = end - o
        return o, list(range(0, last, step)) + [last]

    def smallest_chunk(self) -> int:
        """The smallest block side: one output tile and the halo, rounded up to the grid."""
        smallest = max(self.output, self.margin + self.grid)
        return -(-smallest // self.grid) * self.grid

    def check_chunk(self, chunk: int, what: str = "chunk") -> None:
        """A block side must be at least one output tile and the halo (Dask takes a block's
        halo from its neighbours), and a multiple of the pooling grid."""
        smallest = self.smallest_chunk()
        if chunk < self.output:
            raise ValueError(f"{what} {chunk} is smaller than the network's output tile "
                             f"({self.output} pixels for tile {self.tile}); use a {what} of at "
                             f"least {smallest} or a smaller tile")
        if chunk < self.margin + self.grid:
            raise ValueError(f"{what} {chunk} is smaller than the halo a block takes from its "
                             f"neighbours ({self.margin} + {self.grid} = "
                             f"{self.margin + self.grid} pixels for tile {self.tile}); use a "
                             f"{what} of at least {smallest}")
        if chunk % self.grid:
            lo, hi = chunk // self.grid * self.grid, -(-chunk // self.grid) * self.grid
            near = f"{lo} or {hi}" if lo >= smallest else f"{hi}"
            raise ValueError(f"{what} {chunk} is not a multiple of the network's pooling grid "
                             f"({self.grid} = 2**depth), so blocks would see shifted poolings; "
                             f"use {near}")


def axis_chunks(length: int, chunk: int) -> tuple[int, ...]:
    """Dask chunks of an axis: ``chunk`` rows each, the remainder last."""
    full, rest = divmod(length, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


DEFAULT_CHUNK = 1024   # block side when the input's own chunks are too thin (TIFF strips)


def default_chunk(chunksize, depth: int) -> int:
    """A block side for an input stored in chunks of `chunksize` (..., rows, columns): the
    smaller stored side rounded down to the pooling grid, so blocks are the stored chunks (and
    the output is chunked like the input) when those are aligned; DEFAULT_CHUNK if that is
    below 512 (thin strips would make the halo most of the work)."""
    grid = 2 ** depth
    side = min(chunksize[-2:]) // grid * grid
    return side if side >= 512 else -(-DEFAULT_CHUNK // grid) * grid


def choose_block_tile(chunk_rows: int, chunk_cols: int, config: dict,
                      memory_mb: float = 1024) -> int:
    """The valid tile that predicts a chunk_rows x chunk_cols block with the fewest operations
    (aligned tiles as :meth:`Geometry.origins` places them, times the forward pass of
    :func:`minunet.inference.forward_cost`), among tiles whose output fits the block and whose
    forward pass fits `memory_mb`; ties go to the larger tile. If none fits the budget, the
    smallest tile whose output spans the pooling grid."""
    from ..inference import forward_cost

    depth = int(config["depth"])
    grid, budget = 2 ** depth, memory_mb * 2 ** 20
    tile = UNet.valid_input_size(1, depth)
    while UNet.output_size(tile, depth) < grid:
        tile = UNet.valid_input_size(tile + 1, depth)
    best, best_cost = tile, None
    while UNet.output_size(tile, depth) <= min(chunk_rows, chunk_cols):
        flops, nbytes = forward_cost(tile, config)
        if nbytes > budget:
            break
        g = Geometry(depth, tile)
        cost = len(g.origins(chunk_rows)[1]) * len(g.origins(chunk_cols)[1]) * flops
        if best_cost is None or cost <= best_cost:
            best, best_cost = tile, cost
        tile = UNet.valid_input_size(tile + 1, depth)
    return best


# ---- the lazy pieces ---------------------------------------------------------------------------
def slice_statistics(stack):
    """Lazy per-slice (min, max, mean, std, count of NaN/inf pixels) of a (N, H, W) dask array,
    in float64, all from one pass. Non-finite pixels count as 0 in the others (no warnings)."""
    import dask.array as da

    x = stack.astype(np.float64)
    axes = (1, 2)
    if stack.dtype.kind == "f":
        finite = da.isfinite(x)
        bad = (~finite).sum(axis=axes)
        x = da.where(finite, x, 0.0)
    else:
        bad = da.zeros(stack.shape[0], dtype=np.int64, chunks=1)
    return (da.min(x, axis=axes), da.max(x, axis=axes), da.mean(x, axis=axes),
            da.std(x, axis=axes), bad)


class Intensities:
    """Per-slice intensity normalisation from global statistics, applied window by window:
    rescale by the slice's min/max to [0, 1] in float64 and cast to float32 (as reading a file
    does), then standardise in float32 with the mean and standard deviation of the rescaled
    slice, derived from the raw ones (as :func:`minunet.data.standardize` does in memory)."""

    def __init__(self, statistics):
        lo, hi, mean, std = (np.asarray(s, np.float64).reshape(-1) for s in statistics[:4])
        bad = np.asarray(statistics[4]).reshape(-1)
        if bad.any():
            first = int(np.argmax(bad > 0))
            which = f"slice {first} of the stack holds" if len(bad) > 1 else "the image holds"
            raise ValueError(f"{which} {int(bad[first])} NaN or infinite pixel values; replace "
                             "them (for example with the image's median) or crop them away")
        self.lo = lo
        self.span = np.where(hi > lo, hi - lo, np.inf)   # a constant slice becomes all zeros
        self.mean = ((mean - lo) / self.span).astype(np.float32)
        self.std = (std / self.span).astype(np.float32)

    def __call__(self, window: np.ndarray, n: int) -> np.ndarray:
        unit = ((window.astype(np.float64) - self.lo[n]) / self.span[n]).astype(np.float32)
        return (unit - self.mean[n]) / (self.std[n] + np.float32(_EPS))


class _DaskWindows:
    """Reads windows of a dask array by computing just them (in the calling task's thread). It
    hides the array from Dask, which would otherwise compute it whole as a dependency."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        return np.asarray(self.array[key].compute(scheduler="sync"))


def read_window(source, n, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """source[n][rows][:, cols] for index arrays that may fold back at the image border (the
    infinite mirror), reading one rectangle: the rows and columns they span."""
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    window = np.asarray(source[r0:r1, c0:c1] if n is None else source[n, r0:r1, c0:c1])
    if r1 - r0 != len(rows) or c1 - c0 != len(cols):        # at the border: mirror
        window = window[(rows - r0)[:, None], (cols - c0)[None, :]]
    return window


def _predict_block(source, predictor: TilePredictor, geometry: Geometry,
                   intensities: Intensities, flat: bool, block_info=None):
    """One output block (1, K, L_y, L_x): read its window (the block plus the halo, mirrored
    past the image border), normalise it, predict it in tiles on the pooling grid (multiples
    of 2**depth from the block's first pixel, which lies on the image's grid)."""
    info = block_info[None]
    (n, _), _, (y0, y1), (x0, x1) = info["array-location"]
    m, (height, width) = geometry.margin, source.shape[-2:]
    (oy, ys), (ox, xs) = (geometry.origins(length) for length in (y1 - y0, x1 - x0))
    rows = reflect_indices(y0 - m, ys[-1] + oy + 2 * m, height)
    cols = reflect_indices(x0 - m, xs[-1] + ox + 2 * m, width)
    window = intensities(read_window(source, None if flat else n, rows, cols), n)
    out = np.empty((predictor.num_classes, ys[-1] + oy, xs[-1] + ox), np.float32)
    for y in ys:
        for x in xs:
            tile = window[y:y + oy + 2 * m, x:x + ox + 2 * m]
            out[:, y:y + oy, x:x + ox] = predictor(np.ascontiguousarray(tile[None, None]))[0]
    return out[None, :, :y1 - y0, :x1 - x0]


def stored_chunks(image) -> tuple:
    """The (rows, columns) an image is stored in, for choosing blocks; () if unknown."""
    chunks = getattr(image, "chunksize", None) or getattr(image, "chunks", None)
    return tuple(int(c) for c in chunks[-2:]) if isinstance(chunks, tuple) and chunks and \
        all(np.ndim(c) == 0 for c in chunks) else ()


def predict_blocked(image, model: UNet, tile: int, chunk=None, statistics=None):
    """Class probabilities of a 2-D image or a stack of 2-D slices, as a lazy dask array.

    Each output block is one task: it reads its window of the image (the block plus the halo,
    mirror-extended past the border), so tasks share nothing but the weights and memory stays
    bounded by the blocks in flight, whatever the image size.

    Args:
        image: (H, W) or (N, H, W), any real dtype, each slice one image of the network's single
            input channel; anything that reads windows by slicing: a Zarr array, a TIFF opened
            by :func:`minunet.data.lazy_io.open_lazy`, a NumPy array, or a dask array (each
            window computed alone; on a cluster prefer a Zarr array, whose handle is small).
        model: a trained UNet with one input channel, in evaluation mode (``model.eval()``),
            on the device to predict on. It is used as it is (do not change it until the
            result is computed) and reaches each Dask worker once.
        tile: the input side of the tiles the network runs on (a valid size; larger is faster
            and needs more memory); the result does not depend on it.
        chunk: output block side, an int or (rows, columns): multiples of ``2**depth`` of at
            least the tile's output (and its halo). Default: :func:`default_chunk` of the
            image's stored chunks. Memory grows with it; the result does not depend on it.
        statistics: per-slice (min, max, mean, std, bad) from :func:`slice_statistics`, already
            computed; by default they are computed here (one pass over the image, on the
            current Dask scheduler).
    Returns:
        float32 dask array (K, H, W) or (N, K, H, W) of softmax probabilities, chunked
        (K, chunk rows, chunk columns): what :func:`minunet.inference.predict_probabilities`
        gives for one tile covering the image, up to float32 rounding.
    Raises:
        ValueError for a 4-D array, an empty one, a model with several input channels, an
        invalid tile, a chunk that is too small or off the pooling grid, or NaN/inf pixels.
    """
    import uuid

    import dask
    import dask.array as da

    shape, dtype = tuple(getattr(image, "shape", ())), np.dtype(getattr(image, "dtype", object))
    if len(shape) not in (2, 3) or 0 in shape:
        raise ValueError(f"blocked prediction takes a 2-D image (H, W) or a 3-D stack of slices "
                         f"(N, H, W); got an array of shape {shape}")
    if dtype.kind not in "biuf":
        raise ValueError(f"the image has dtype {dtype}; give real-valued pixels")
    if model.config["in_channels"] != 1:
        raise ValueError(f"blocked prediction reads gray images, but the model takes "
                         f"{model.config['in_channels']} input channels; use a 1-channel model")
    flat = len(shape) == 2
    geometry = Geometry(model.depth, tile)
    if chunk is None:
        chunk = default_chunk(stored_chunks(image) or (0, 0), model.depth)
    square = np.ndim(chunk) == 0
    chunks = (int(chunk),) * 2 if square else tuple(int(c) for c in chunk)
    for c, what in zip(chunks, ("chunk",) * 2 if square else ("chunk rows", "chunk columns")):
        geometry.check_chunk(c, what)
    source = _DaskWindows(image) if isinstance(image, da.Array) else image
    if statistics is None:
        stored = stored_chunks(image)                      # read whole stored chunks, but
        if stored:                                         # about a block's worth per task
            stored = tuple(max(s, c // s * s) for s, c in zip(stored, chunks))
        view = image if isinstance(image, da.Array) else \
            da.from_array(image, chunks=(stored or chunks) if flat else (1, *(stored or chunks)))
        statistics = dask.compute(*slice_statistics(view[None] if flat else view))
    intensities = Intensities(statistics)
    predictor = TilePredictor(model)
    token = uuid.uuid4().hex
    k, n = predictor.num_classes, 1 if flat else shape[0]
    out = da.map_blocks(
        _predict_block, dtype=np.float32, meta=np.empty((0, 0, 0, 0), np.float32),
        chunks=((1,) * n, (k,), axis_chunks(shape[-2], chunks[0]),
                axis_chunks(shape[-1], chunks[1])),
        # one key each for the weights and the image handle: every block depends on them
        source=dask.delayed(source, name=f"blocked-source-{token}"),
        predictor=dask.delayed(predictor, name=f"unet-weights-{token}"),
        geometry=geometry, intensities=intensities, flat=flat, name=f"unet-blocks-{token}")
    return out[0] if flat else out
