"""Images too large to load: lazy inputs (Zarr arrays, TIFFs read through tifffile's Zarr
interface), Zarr outputs, and writing a Dask computation into them chunk by chunk with a
progress bar, on local threads or on a ``dask.distributed`` cluster.

A Zarr array is read as it is stored: 2-D (H, W) or 3-D (slices, H, W). A TIFF of any size is
read piece by piece (its strips or tiles) and gives the same gray slices as
:func:`minunet.data.io.read_slices`: pages of a multi-page TIFF are slices, colour samples become
luma. Nothing is read until a window is asked for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import rgb_to_gray

TIFF_SUFFIXES = (".tif", ".tiff")
# Blocks computed at once on the local scheduler. The network already uses every core and one
# forward pass runs at a time (minunet.data.blocked.TilePredictor), so more threads would only
# overlap reading and writing with it, which is small next to the network, at the cost of more
# blocks in memory and a heap (malloc arena) per thread.
LOCAL_THREADS = 1


class TiffImage:
    """A TIFF's first series (pyramid level 0) as gray slices read window by window: (H, W), or
    (N, H, W) for a multi-page TIFF; colour samples become luma (float64) as in
    :func:`minunet.data.io.read_slices`. It opens the file lazily in each process (an open file
    handle cannot be pickled), so a cluster's workers can read it at the same path."""

    def __init__(self, path: Path):
        import tifffile

        self.path = str(path)
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        z = self._open()
        self._samples = axes.index("S") if "S" in axes else None
        keep = [i for i in range(z.ndim) if i != self._samples]
        if len(keep) not in (2, 3):
            raise ValueError(f"TIFF {path} has axes {axes} {z.shape}; give a 2-D image or a "
                             "3-D stack of 2-D slices")
        if self._samples is not None and z.shape[self._samples] not in (1, 3, 4):
            raise ValueError(f"TIFF {path} has {z.shape[self._samples]} samples per pixel; give "
                             "a gray or RGB(A) image")
        self.shape = tuple(z.shape[i] for i in keep)
        self.chunks = tuple(z.chunks[i] for i in keep)
        self.ndim = len(self.shape)
        colour = self._samples is not None and z.shape[self._samples] > 1
        self.dtype = np.dtype(np.float64) if colour else z.dtype

    def _open(self):
        import tifffile
        import zarr

        return zarr.open(tifffile.imread(self.path, aszarr=True, series=0, level=0), mode="r")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_array"}

    def __getitem__(self, key):
        if getattr(self, "_array", None) is None:
            self._array = self._open()
        key = (key,) if not isinstance(key, tuple) else key
        if key == (Ellipsis,):
            key = ()
        key = key + (slice(None),) * (self.ndim - len(key))
        if self._samples is None:
            return self._array[key]
        full = list(key)
        full.insert(self._samples, slice(None))
        data = self._array[tuple(full)]
        axis = self._samples - sum(1 for k in key[:self._samples] if not isinstance(k, slice))
        data = np.moveaxis(data, axis, -1)
        return data[..., 0] if data.shape[-1] == 1 else rgb_to_gray(data)


def open_lazy(path):
    """An image too large to load, to read window by window: a Zarr array (a directory) or a
    TIFF (:class:`TiffImage`).

    Returns an array-like of shape (H, W) or (slices, H, W) with ``shape``, ``dtype``,
    ``chunks`` (as stored) and slicing. Raises ValueError (one line) for a path that does not
    exist, a Zarr group instead of an array, an unreadable TIFF, or an array that is not 2-D or
    3-D."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise ValueError(f"input {path} does not exist; give a Zarr array (a directory) or a "
                         "TIFF file")
    if path.suffix.lower() in TIFF_SUFFIXES and path.is_file():
        try:
            x = TiffImage(path)
        except ValueError:
            raise
        except Exception as error:  # any decoder failure: one line naming the file
            raise ValueError(f"cannot read TIFF {path} lazily: {error}; check that it is a "
                             "valid TIFF") from None
    else:
        try:
            x = zarr.open(str(path), mode="r")
        except Exception as error:
            raise ValueError(f"input {path} is neither a TIFF nor a Zarr array ({error}); give a "
                             "Zarr array (a directory) or a TIFF file") from None
        if not isinstance(x, zarr.Array):
            names = sorted(name for name, _ in x.arrays())
            hint = f"one of its arrays, e.g. {path / names[0]}" if names else "a Zarr array"
            raise ValueError(f"input {path} is a Zarr group, not an array; give {hint}")
    if x.ndim not in (2, 3):
        raise ValueError(f"input {path} has {x.ndim} dimensions {tuple(x.shape)}; give a 2-D "
                         "image (H, W) or a 3-D stack of 2-D slices (slices, H, W)")
    if 0 in x.shape:
        raise ValueError(f"input {path} is empty {tuple(x.shape)}; give a non-empty image")
    if np.dtype(x.dtype).kind not in "biuf":
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


def store_chunks(array, outputs, client=None, progress: bool = True, desc: str = "chunks",
                 threads: int = LOCAL_THREADS) -> int:
    """Compute `array` and write it into Zarr arrays, chunk by chunk, with a progress bar.

    Args:
        array: dask array whose chunks are exactly the targets' chunks (so no two tasks write
            one Zarr chunk).
        outputs: list of (zarr array, transform or None); a transform maps a block to what is
            stored (e.g. a threshold for a mask), computed in the same task.
        client: a ``distributed.Client`` to run on, or None for Dask's local threaded scheduler
            with `threads` worker threads (blocks in flight).
        progress: show progress over chunks (a bar on a terminal, plain lines in a log:
            :class:`minunet.cli.CountBar`).
    Returns the number of chunks written. Errors raised in a task (e.g. ValueError for bad
    input found while reading) are raised here.
    """
    from ..cli import CountBar

    for target, _ in outputs:
        if tuple(target.chunks) != tuple(c[0] for c in array.chunks) or \
                tuple(target.shape) != tuple(array.shape):
            raise ValueError(f"target chunks {target.chunks} / shape {target.shape} do not match "
                             f"the computation's {array.chunksize} / {array.shape}")
    flat = [item for pair in outputs for item in pair]
    markers = array.map_blocks(_write_block, *flat, dtype=bool,
                               chunks=tuple((1,) * len(c) for c in array.chunks))
    total = int(np.prod(markers.numblocks))
    with CountBar(total, desc, "chunk", enabled=progress) as bar:
        if client is None:
            from dask.callbacks import Callback

            class _Bar(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    if isinstance(key, tuple) and key[0] == markers.name:
                        bar.update(1)

            with _Bar():
                markers.compute(scheduler="threads", num_workers=threads)
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
