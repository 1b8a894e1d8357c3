"""Images too large to load: lazy inputs (Zarr arrays, TIFFs read through tifffile's Zarr
interface), Zarr outputs, and writing a Dask computation into them chunk by chunk with a
progress bar, on local threads or on a ``dask.distributed`` cluster.

A Zarr array is read as it is stored: 2-D (H, W) or 3-D (slices, H, W). A TIFF of any size is
read piece by piece (its strips or tiles) and gives the same gray slices as
:func:`minunet.data.io.read_slices`: pages of a multi-page TIFF are slices, colour samples become
luma. Nothing is read until the computation runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import rgb_to_gray

TIFF_SUFFIXES = (".tif", ".tiff")


class _TiffPages:
    """Array-like view of a TIFF's first series (pyramid level 0) that opens the file lazily in
    each process, so a Dask graph reading it can be shipped to cluster workers (an open file
    handle cannot be pickled); every worker must see the same path."""

    def __init__(self, path: Path):
        import zarr

        self.path = str(path)
        z = zarr.open(self._store(), mode="r")
        self.shape, self.dtype, self.chunks, self.ndim = z.shape, z.dtype, z.chunks, z.ndim
        self._array = z

    def _store(self):
        import tifffile

        return tifffile.imread(self.path, aszarr=True, series=0, level=0)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_array"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = None

    def __getitem__(self, key):
        if self._array is None:
            import zarr

            self._array = zarr.open(self._store(), mode="r")
        return self._array[key]


def _open_tiff(path: Path):
    """(slices, H, W) or (H, W) dask array of a TIFF, colour converted to luma lazily."""
    import dask.array as da
    import tifffile
    from dask.base import tokenize

    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        pages = _TiffPages(path)
    except Exception as error:  # any decoder failure: one line naming the file
        raise ValueError(f"cannot read TIFF {path} lazily: {error}; check that it is a valid "
                         "TIFF") from None
    name = "tiff-" + tokenize(str(path.resolve()), path.stat().st_mtime_ns)
    x = da.from_array(pages, chunks=pages.chunks, asarray=True, name=name)
    if "S" in axes:                                         # colour samples -> luma (float64)
        x = da.moveaxis(x, axes.index("S"), -1)
        if x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"TIFF {path} has {x.shape[-1]} samples per pixel; give a gray "
                             "or RGB(A) image")
        x = x.rechunk({x.ndim - 1: -1})
        x = x[..., 0] if x.shape[-1] == 1 else \
            x.map_blocks(rgb_to_gray, drop_axis=x.ndim - 1, dtype=np.float64)
    if x.ndim > 3:                                          # e.g. TZYX: all planes are slices
        x = x.reshape((-1,) + x.shape[-2:])
    return x


def open_lazy(path):
    """A dask array of an image too large to load: a Zarr array (a directory) or a TIFF.

    Returns (H, W) or (slices, H, W), chunked as stored. Raises ValueError (one line) for a
    path that does not exist, a Zarr group instead of an array, an unreadable TIFF, or an array
    that is not 2-D or 3-D."""
    import dask.array as da
    import zarr

    path = Path(path)
    if not path.exists():
        raise ValueError(f"input {path} does not exist; give a Zarr array (a directory) or a "
                         "TIFF file")
    if path.suffix.lower() in TIFF_SUFFIXES and path.is_file():
        x = _open_tiff(path)
    else:
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as error:
            raise ValueError(f"input {path} is neither a TIFF nor a Zarr array ({error}); give a "
                             "Zarr array (a directory) or a TIFF file") from None
        if not isinstance(node, zarr.Array):
            names = sorted(name for name, _ in node.arrays())
            hint = f"one of its arrays, e.g. {path / names[0]}" if names else "a Zarr array"
            raise ValueError(f"input {path} is a Zarr group, not an array; give {hint}")
        x = da.from_zarr(node)
    if x.ndim not in (2, 3):
        raise ValueError(f"input {path} has {x.ndim} dimensions {tuple(x.shape)}; give a 2-D "
                         "image (H, W) or a 3-D stack of 2-D slices (slices, H, W)")
    if 0 in x.shape:
        raise ValueError(f"input {path} is empty {tuple(x.shape)}; give a non-empty image")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"input {path} has dtype {x.dtype}; give real-valued pixels")
    return x


def create_output(path, shape, chunks, dtype, overwrite: bool = False):
    """A new Zarr array at `path` to write results into.

    Raises ValueError if something already exists there and `overwrite` is False (results
    are never replaced silently)."""
    import zarr

    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"output {path} already exists; choose another path or pass "
                         "--overwrite to replace it")
    return zarr.create_array(store=str(path), shape=tuple(shape), chunks=tuple(chunks),
                             dtype=dtype, overwrite=overwrite)


def _write_block(block, *targets_and_transforms, block_info=None):
    """Store one block into each target (after its transform); returns a 1-element marker."""
    region = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    for target, transform in zip(targets_and_transforms[::2], targets_and_transforms[1::2]):
        target[region] = block if transform is None else transform(block)
    return np.ones((1,) * block.ndim, bool)


def store_chunks(array, outputs, client=None, progress: bool = True, desc: str = "chunks") -> int:
    """Compute `array` and write it into Zarr arrays, chunk by chunk, with a progress bar.

    Args:
        array: dask array whose chunks are exactly the targets' chunks (so no two tasks write
            one Zarr chunk).
        outputs: list of (zarr array, transform or None); a transform maps a block to what is
            stored (e.g. a threshold for a mask), computed in the same task.
        client: a ``distributed.Client`` to run on, or None for Dask's local threads.
        progress: show a tqdm bar over chunks.
    Returns the number of chunks written. Errors raised in a task (e.g. ValueError for bad
    input found while reading) are raised here.
    """
    from tqdm import tqdm

    for target, _ in outputs:
        if tuple(target.chunks) != tuple(c[0] for c in array.chunks) or \
                tuple(target.shape) != tuple(array.shape):
            raise ValueError(f"target chunks {target.chunks} / shape {target.shape} do not match "
                             f"the computation's {array.chunksize} / {array.shape}")
    flat = [item for pair in outputs for item in pair]
    markers = array.map_blocks(_write_block, *flat, dtype=bool,
                               chunks=tuple((1,) * len(c) for c in array.chunks))
    total = int(np.prod(markers.numblocks))
    with tqdm(total=total, desc=desc, unit="chunk", disable=not progress) as bar:
        if client is None:
            from dask.callbacks import Callback

            class _Bar(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    if isinstance(key, tuple) and key[0] == markers.name:
                        bar.update(1)

            with _Bar():
                markers.compute(scheduler="threads")
        else:
            from distributed import as_completed

            futures = client.compute(list(markers.to_delayed().ravel()))
            for future in as_completed(futures):
                future.result()                          # re-raise a task's error here
                bar.update(1)
    return total


def threshold_mask(probability: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 mask, 255 where the probability is at least `threshold` (as minunet.predict)."""
    return (probability >= threshold).astype(np.uint8) * 255
