"""Lazy inputs and Zarr outputs for blocked prediction (minunet.data.lazy_io): the same slices as
reading the whole file, nothing replaced silently, every chunk written once."""
from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import tifffile

from minunet.data.io import read_slices
from minunet.data.lazy_io import create_output, open_lazy, store_chunks, threshold_mask

zarr = pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")


@pytest.mark.parametrize("kind", ["pages", "tiled", "rgb", "one-page"])
def test_tiff_read_lazily_gives_the_slices_read_slices_gives(tmp_path, rng, kind):
    path = tmp_path / f"{kind}.tif"
    if kind == "pages":
        tifffile.imwrite(path, rng.integers(0, 4000, (4, 37, 53), dtype=np.uint16),
                         photometric="minisblack")
    elif kind == "tiled":
        tifffile.imwrite(path, rng.random((150, 131), dtype=np.float32), tile=(32, 48))
    elif kind == "rgb":
        tifffile.imwrite(path, rng.integers(0, 255, (29, 41, 3), dtype=np.uint8), photometric="rgb")
    else:
        tifffile.imwrite(path, rng.integers(0, 255, (29, 41), dtype=np.uint8))
    lazy = open_lazy(path)
    expected = np.stack(read_slices(path))
    got = np.asarray(lazy[...])
    assert got.ndim == lazy.ndim == (3 if kind == "pages" else 2) and got.dtype == lazy.dtype
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-12)
    shipped = pickle.loads(pickle.dumps(lazy))           # a cluster's worker opens it again
    window = (1, slice(3, 20), slice(5, 33)) if lazy.ndim == 3 else (slice(3, 20), slice(5, 33))
    np.testing.assert_array_equal(shipped[window], got[window])
    assert np.array_equal(da.from_array(lazy, chunks=lazy.chunks).compute(), got)


def test_zarr_arrays_and_groups(tmp_path, rng):
    data = rng.random((3, 40, 50)).astype(np.float32)
    z = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 16, 32),
                          dtype="f4")
    z[...] = data
    lazy = open_lazy(tmp_path / "a.zarr")
    assert lazy.chunks == (1, 16, 32) and np.array_equal(lazy[...], data)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", shape=(8, 8), dtype="f4")
    with pytest.raises(ValueError, match="is a Zarr group, not an array; give one of its arrays"):
        open_lazy(tmp_path / "g.zarr")
    with pytest.raises(ValueError, match="does not exist"):
        open_lazy(tmp_path / "nothing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a TIFF nor a Zarr array"):
        open_lazy(tmp_path / "notes.txt")


def test_create_output_never_replaces_silently(tmp_path):
    create_output(tmp_path / "o.zarr", (10, 10), (5, 5), "f4")
    with pytest.raises(ValueError, match="already exists; .* --overwrite"):
        create_output(tmp_path / "o.zarr", (10, 10), (5, 5), "f4")
    z = create_output(tmp_path / "o.zarr", (12, 10), (6, 5), "u1", overwrite=True)
    assert z.shape == (12, 10) and z.dtype == np.uint8


def test_store_chunks_writes_every_chunk_and_its_transform(tmp_path, rng):
    data = rng.random((3, 45, 70)).astype(np.float32)
    x = da.from_array(data, chunks=(1, 16, 32))
    prob = create_output(tmp_path / "p.zarr", data.shape, (1, 16, 32), "f4")
    mask = create_output(tmp_path / "m.zarr", data.shape, (1, 16, 32), "u1")
    to_mask = functools.partial(threshold_mask, threshold=0.3)
    count = store_chunks(x, [(prob, None), (mask, to_mask)], progress=False)
    assert count == 3 * 3 * 3
    assert np.array_equal(prob[...], data)
    assert np.array_equal(mask[...], np.where(data >= 0.3, 255, 0).astype(np.uint8))
    other = create_output(tmp_path / "q.zarr", data.shape, (1, 32, 32), "f4")
    with pytest.raises(ValueError, match="do not match"):
        store_chunks(x, [(other, None)], progress=False)
