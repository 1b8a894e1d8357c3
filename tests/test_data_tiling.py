"""Overlap-tile prediction (Fig. 2) against one pass over the whole mirror-padded image."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from minunet.data.tiling import (mirror_crop, mirror_pad, predict_overlap_tile, reflect_indices,
                                 tile_origins)

ATOL, RTOL = 1e-5, 1e-5


def _valid_conv_net(seed: int, in_channels: int, classes: int):
    """Two valid 5x5 correlations with a ReLU between: translation-equivariant, margin 4."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, in_channels, 5, 5)).astype(np.float32)
    w2 = rng.normal(size=(classes, 4, 5, 5)).astype(np.float32)

    def layer(x, w):
        windows = sliding_window_view(x, (5, 5), axis=(2, 3))  # (B, C, H-4, W-4, 5, 5)
        return np.einsum("bchwij,kcij->bkhw", windows, w)

    calls = []

    def predict(batch):
        calls.append(batch.shape)
        assert batch.dtype == np.float32
        return layer(np.maximum(layer(batch, w1), 0.0), w2)

    return predict, calls


@pytest.mark.parametrize("h,w", [(37, 29), (7, 5), (12, 12), (24, 36), (1, 17), (13, 2)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiles_equal_whole_padded_image(h, w, batch_size):
    channels, classes, input_size, output_size = 2, 3, 20, 12
    predict, calls = _valid_conv_net(seed=h * 100 + w, in_channels=channels, classes=classes)
    image = np.random.default_rng(h + w).random((channels, h, w)).astype(np.float32)
    tiled = predict_overlap_tile(image, predict, input_size, output_size, batch_size=batch_size)
    whole = predict(mirror_pad(image, 4)[None])[0]
    assert tiled.shape == (classes, h, w) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, atol=ATOL, rtol=RTOL)
    n_tiles = len(tile_origins(h, output_size)) * len(tile_origins(w, output_size))
    assert sum(shape[0] for shape in calls[:-1]) == n_tiles
    assert all(shape[0] <= batch_size and shape[2:] == (20, 20) for shape in calls[:-1])


def test_gray_image_without_channel_axis():
    predict, _ = _valid_conv_net(seed=0, in_channels=1, classes=2)
    image = np.random.default_rng(0).random((30, 41)).astype(np.float32)
    tiled = predict_overlap_tile(image, predict, 18, 10)
    np.testing.assert_allclose(tiled, predict(mirror_pad(image, 4)[None, None])[0],
                               atol=ATOL, rtol=RTOL)


def test_mirror_pad_matches_numpy_reflect_even_when_wider_than_the_image():
    rng = np.random.default_rng(1)
    for h, w in [(5, 7), (1, 4), (3, 1), (2, 2)]:
        image = rng.random((2, h, w))
        for pad in [0, 1, 3, 11]:
            np.testing.assert_array_equal(
                mirror_pad(image, pad), np.pad(image, ((0, 0), (pad, pad), (pad, pad)), "reflect"))
    image = rng.random((4, 6))
    np.testing.assert_array_equal(mirror_pad(image, ((1, 9), (0, 2))),
                                  np.pad(image, ((1, 9), (0, 2)), "reflect"))
    # the edge pixel is not repeated
    assert list(reflect_indices(-3, 10, 4)) == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    np.testing.assert_array_equal(mirror_crop(image, 1, 2, 2, 3), image[1:3, 2:5])


def test_tile_origins_cover_the_axis():
    assert tile_origins(10, 4) == [0, 4, 6]
    assert tile_origins(8, 4) == [0, 4]
    assert tile_origins(3, 4) == [0]
    for length in range(1, 40):
        covered = np.zeros(max(length, 7), bool)
        for o in tile_origins(length, 7):
            covered[o:o + 7] = True
            assert o >= 0 and (o + 7 <= length or o == 0)
        assert covered[:length].all()


@pytest.mark.parametrize("grid", [1, 4, 8, 16])
def test_tile_origins_on_the_pooling_grid_cover_the_axis(grid):
    """Every square starts on the grid, squares step by the largest multiple of the grid that
    fits, the axis is covered, and the last square ends fewer than `grid` pixels past it."""
    for output in (4, 7, 12, 20, 28, 36, 388):
        for length in list(range(1, 90)) + [571, 1000]:
            origins = tile_origins(length, output, grid)
            covered = np.zeros(length + output, bool)
            for o in origins:
                covered[o:o + output] = True
            assert covered[:length].all(), (grid, output, length, origins)
            if output < grid:
                assert origins == tile_origins(length, output), "a square smaller than the grid: grid 1"
                continue
            assert all(o % grid == 0 for o in origins)
            if len(origins) > 1:   # (one square on a short axis overhangs as far as it must)
                assert origins[-1] + output - length < grid and origins[-1] < length
            steps = np.diff(origins)
            assert all(s == output - output % grid for s in steps[:-1]) and all(steps > 0)
    assert tile_origins(600, 388, 16) == [0, 224] and tile_origins(10, 4, 1) == [0, 4, 6]


def test_bad_arguments():
    predict, _ = _valid_conv_net(0, 1, 1)
    image = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="even difference"):
        predict_overlap_tile(image, predict, 21, 12)
    with pytest.raises(ValueError, match="predict_fn returned"):
        predict_overlap_tile(image, predict, 20, 10)  # the net really outputs 12
    with pytest.raises(ValueError, match="pad widths"):
        mirror_pad(image, ((1, -1), (0, 0)))
