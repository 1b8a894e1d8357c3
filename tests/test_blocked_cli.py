"""python -m minunet.predict into Zarr (blocked prediction of large images): the same
probabilities as the in-memory command on the same image, locally and on a two-worker
dask.distributed cluster on 127.0.0.1, and one-line errors with exit status 2 for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

import minunet as mu
from minunet import predict
from minunet.checkpoint import save_checkpoint
from minunet.cli import run
from minunet.data.blocked import TilePredictor
from tests.conftest import assert_close

zarr = pytest.importorskip("zarr")

ATOL = 2e-5  # float32 rounding (see tests/test_blocked.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A depth-3 U-Net with 2 base channels: margin 44, pooling grid 8, milliseconds a tile."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.npz"
    return save_checkpoint(path, mu.UNet(base_channels=2, depth=3, seed=11))


def predict_cli(checkpoint, *args):
    return run(predict.main, ["--checkpoint", str(checkpoint), "--device", "cpu", *map(str, args)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def write_zarr(path, data, chunks):
    z = zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype)
    z[...] = data
    return path


def in_memory_cli(checkpoint, tmp_path, image_file, shape):
    """The in-memory command with one tile covering the image (one pass over it)."""
    tile = mu.UNet.valid_input_size(max(shape) + 2 * 44, 3)
    assert predict_cli(checkpoint, image_file, "--out", tmp_path / "mem", "--tile", tile) == 0
    return tifffile.imread(tmp_path / "mem" / f"{image_file.stem}_prob.tif")


def test_zarr_in_zarr_out_equals_in_memory(tmp_path, rng, checkpoint, capsys):
    """A 2-D uint16 image of 173 x 229 (primes) stored as Zarr in 64-pixel chunks and as TIFF."""
    image = (rng.normal(size=(173, 229)) * 3000 + 30000).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", image)
    expected = in_memory_cli(checkpoint, tmp_path, tmp_path / "img.tif", image.shape)
    src = write_zarr(tmp_path / "img.zarr", image, (64, 64))
    assert predict_cli(checkpoint, src, "--out", tmp_path / "p.zarr", "--mask", tmp_path / "m.zarr",
                       "--tile", 116, "--quiet") == 0
    prob = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")
    assert prob.shape == image.shape and prob.dtype == np.float32
    assert prob.chunks == image.shape      # 64-pixel input chunks are thin: one default block
    assert_close(prob[...], expected, rtol=0, atol=ATOL, what="blocked vs in-memory")
    mask = zarr.open_array(str(tmp_path / "m.zarr"), mode="r")[...]
    assert np.array_equal(mask, (prob[...] >= 0.5).astype(np.uint8) * 255)
    assert "p.zarr" in capsys.readouterr().out


def test_lazy_tiff_stack_with_chunks_and_overwrite(tmp_path, rng, checkpoint):
    """A multi-page float TIFF read piece by piece, blocks of 64 with several tiles each;
    a second run into the same output needs --overwrite."""
    stack = rng.random((3, 97, 141)).astype(np.float32)
    stack[1] *= 50
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    expected = in_memory_cli(checkpoint, tmp_path, tmp_path / "stack.tif", stack.shape[1:])
    out = tmp_path / "stack.zarr"
    for extra in ([], ["--overwrite"]):
        assert predict_cli(checkpoint, tmp_path / "stack.tif", "--out", out, "--chunk", 64,
                           "--tile", 108, "--quiet", *extra) == 0
        prob = zarr.open_array(str(out), mode="r")
        assert prob.chunks == (1, 64, 64)
        assert_close(prob[...], expected, rtol=0, atol=ATOL, what=f"lazy TIFF stack {extra}")


def test_two_worker_cluster_equals_local(tmp_path, rng, checkpoint, monkeypatch):
    """A LocalCluster on 127.0.0.1 (two workers as threads of this process, talking over TCP,
    so the graph and the weights are serialised as for remote workers), always closed. The
    weights are unpickled at most once by the scheduler and once per worker, not per block."""
    distributed = pytest.importorskip("distributed")
    unpickled = []
    setstate = TilePredictor.__setstate__
    monkeypatch.setattr(TilePredictor, "__setstate__",
                        lambda self, state: (unpickled.append(1), setstate(self, state)))
    image = rng.random((150, 190)).astype(np.float32)
    src = write_zarr(tmp_path / "img.zarr", image, (64, 64))
    args = [src, "--chunk", 64, "--tile", 108, "--quiet"]
    assert predict_cli(checkpoint, *args, "--out", tmp_path / "local.zarr") == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  protocol="tcp", host="127.0.0.1", dashboard_address=None) as cl:
        assert predict_cli(checkpoint, *args, "--out", tmp_path / "cluster.zarr",
                           "--scheduler", cl.scheduler_address) == 0
    assert 1 <= len(unpickled) <= 3, unpickled                 # 3 x 3 = 9 blocks
    local = zarr.open_array(str(tmp_path / "local.zarr"), mode="r")[...]
    cluster = zarr.open_array(str(tmp_path / "cluster.zarr"), mode="r")[...]
    assert_close(cluster, local, rtol=0, atol=1e-6, what="cluster vs local")


def test_bad_input_one_line_exit_2(tmp_path, rng, checkpoint, capsys):
    image = rng.random((90, 90)).astype(np.float32)
    good = write_zarr(tmp_path / "good.zarr", image, (64, 64))
    out = ["--out", tmp_path / "o.zarr", "--quiet"]
    assert predict_cli(checkpoint, tmp_path / "missing.zarr", *out) == 2
    assert "missing.zarr does not exist" in one_line_error(capsys)
    four_d = write_zarr(tmp_path / "4d.zarr", np.zeros((2, 2, 30, 30), np.float32), (1, 1, 30, 30))
    assert predict_cli(checkpoint, four_d, *out) == 2
    assert "has 4 dimensions" in one_line_error(capsys)
    assert predict_cli(checkpoint, good, *out, "--tile", 140, "--chunk", 48) == 2
    assert "--chunk 48 is smaller than the network's output tile" in one_line_error(capsys)
    assert predict_cli(checkpoint, good, *out, "--tile", 108, "--chunk", 60) == 2
    assert "use 56 or 64" in one_line_error(capsys)
    (tmp_path / "o.zarr").mkdir()
    assert predict_cli(checkpoint, good, *out) == 2
    assert "o.zarr already exists; choose another path or pass --overwrite" in \
        one_line_error(capsys)
    bad = image.copy()
    bad[5, 80] = np.inf
    nan = write_zarr(tmp_path / "nan.zarr", bad, (64, 64))
    assert predict_cli(checkpoint, nan, "--out", tmp_path / "n.zarr", "--quiet") == 2
    assert "1 NaN or infinite pixel values" in one_line_error(capsys)
    assert predict_cli(checkpoint, good, "--out", tmp_path / "folder") == 2
    assert "give --out PATH.zarr" in one_line_error(capsys)
    assert predict_cli(checkpoint, good, "--out", tmp_path / "x.zarr",
                       "--mask", tmp_path / "m") == 2
    assert "must be a Zarr path ending in .zarr" in one_line_error(capsys)
