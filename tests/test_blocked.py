"""Blocked overlap-tile prediction on Dask (minunet.data.blocked): the same probabilities as one
in-memory pass over the whole image, for every chunking and tile size, on odd image sizes."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import minunet as mu
from minunet.data.blocked import Geometry, predict_blocked
from minunet.data.io import normalize_intensity
from minunet.inference import predict_probabilities
from tests.conftest import assert_close

da = pytest.importorskip("dask.array")

# Float32 rounding only: the same tiles' worth of arithmetic in a different order (other tile
# sizes, per-chunk standardisation with statistics summed in float64) moves probabilities by a
# few 1e-7; a tile off the pooling grid moves them by 0.1-0.9 for these untrained networks.
ATOL = 2e-5


def in_memory(model, image):
    """Today's in-memory path on one slice: per-slice min/max (as reading a file does), then
    one tile covering the whole image, so every pooling is on the whole image's grid."""
    depth = model.depth
    margin = (mu.UNet.valid_input_size(1, depth) - mu.UNet.output_size(
        mu.UNet.valid_input_size(1, depth), depth)) // 2
    whole = mu.UNet.valid_input_size(max(image.shape) + 2 * margin, depth)
    return predict_probabilities(model, normalize_intensity(image), whole, "cpu")


@pytest.mark.parametrize("depth, base, tile, chunks", [
    (2, 4, 52, [24, 48, (32, 56)]),     # outputs 12 = 0 mod 4: tiles end on the grid
    (3, 3, 116, [56, 72, (64, 96)]),    # outputs 28 = 4 mod 8: the last tile overhangs by 4
])
def test_equals_in_memory_on_odd_sizes(rng, depth, base, tile, chunks):
    """157 x 211 (both prime), 3 classes, a uint16 image with an offset: every chunking gives
    the in-memory probabilities, including chunks with several tiles and a short last chunk."""
    model = mu.UNet(base_channels=base, depth=depth, num_classes=3,
                    seed=int(rng.integers(99))).eval()
    image = (rng.normal(size=(157, 211)) * 900 + 20000).astype(np.uint16)
    expected = in_memory(model, image)
    for chunk in chunks:
        got = predict_blocked(da.from_array(image, chunks=(40, 50)), model, tile, chunk).compute()
        assert_close(got, expected, rtol=0, atol=ATOL, what=f"depth {depth}, chunk {chunk}")


def test_stack_of_slices(rng):
    """(N, H, W): each slice standardised by its own statistics, like reading a multi-page TIFF;
    a constant slice gives the network all zeros, as in memory."""
    model = mu.UNet(base_channels=3, depth=3, seed=3).eval()
    stack = rng.normal(size=(3, 83, 131)).astype(np.float32)
    stack[1] = stack[1] * 40 + 7
    stack[2] = 5.0
    got = predict_blocked(da.from_array(stack, chunks=(2, 64, 64)), model, 108, 64).compute()
    assert got.shape == (3, 2, 83, 131)
    for i in range(3):
        assert_close(got[i], in_memory(model, stack[i]), rtol=0, atol=ATOL, what=f"slice {i}")


def test_tile_does_not_change_the_result(rng):
    """Unlike tiles off the pooling grid, any tile size gives the same probabilities."""
    model = mu.UNet(base_channels=2, depth=3, seed=5).eval()
    image = rng.random((130, 97)).astype(np.float32)
    runs = [predict_blocked(image, model, tile, 80).compute() for tile in (100, 124, 140)]
    for tile, got in zip((124, 140), runs[1:]):
        assert_close(got, runs[0], rtol=0, atol=ATOL, what=f"tile {tile} vs 100")


@pytest.mark.parametrize("depth, tile", [(2, 48), (3, 108), (4, 236)])
def test_tile_origins_cover_each_block_on_the_grid(depth, tile):
    g = Geometry(depth, tile)
    for length in range(1, 3 * g.output + 2 * g.grid):
        o, starts = g.origins(length)
        assert all(s % g.grid == 0 for s in starts), (length, starts)
        assert starts[0] == 0 and all(b - a <= o for a, b in zip(starts, starts[1:]))
        end = starts[-1] + o
        assert end == length + g.overhang(length) and 0 <= end - length < g.grid
        mu.UNet.output_size(o + 2 * g.margin, depth)        # a valid tile


def test_weights_are_one_task(rng):
    """Every block depends on one task holding the weights: serialising the graph's tasks one
    by one, as a cluster ships them, carries the weights once, not once per block."""
    model = mu.UNet(base_channels=4, depth=2, seed=7).eval()
    marker = model.state_dict()[next(iter(model.state_dict()))].tobytes()
    image = rng.random((100, 100)).astype(np.float32)
    result = predict_blocked(image, model, 48, 24)
    assert result.numblocks[1] * result.numblocks[2] >= 16
    graph = dict(result.__dask_graph__())
    holding = [k for k, task in graph.items() if marker in pickle.dumps(task)]
    assert len(holding) == 1, holding


def test_bad_input(rng):
    model = mu.UNet(base_channels=2, depth=3, seed=0).eval()  # margin 44, grid 8
    image = rng.random((90, 90)).astype(np.float32)
    with pytest.raises(ValueError, match="2-D image .* or a 3-D stack"):
        predict_blocked(np.zeros((2, 2, 90, 90), np.float32), model, 108)
    with pytest.raises(ValueError, match="chunk 48 is smaller than the network's output tile"):
        predict_blocked(image, model, 140, 48)               # output 52 > 48
    with pytest.raises(ValueError, match="chunk columns 48 is smaller .* halo"):
        predict_blocked(image, model, 108, (64, 48))         # halo 44 + 8 > 48
    with pytest.raises(ValueError, match="not a multiple of the .* pooling grid .* use 56 or 64"):
        predict_blocked(image, model, 108, 60)
    with pytest.raises(ValueError, match="smaller than the 8-pixel pooling grid"):
        predict_blocked(image, model, 92, 64)                # output 4
    with pytest.raises(ValueError, match="110 is not valid"):
        predict_blocked(image, model, 110, 64)
    with pytest.raises(ValueError, match="input channels"):
        predict_blocked(image, mu.UNet(in_channels=2, base_channels=2, depth=3), 108, 64)
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\)"):
        predict_blocked(image, mu.UNet(base_channels=2, depth=3), 108, 64)
    bad = image.copy()
    bad[70, 3] = np.nan
    bad[3, 70] = -np.inf
    with pytest.raises(ValueError, match="the image holds 2 NaN or infinite"):
        predict_blocked(bad, model, 108, 64)
    stack = np.stack([image, image])
    stack[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="slice 1 of the stack holds 1 NaN or infinite"):
        predict_blocked(stack, model, 108, 64)
