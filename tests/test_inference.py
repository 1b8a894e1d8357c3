"""minunet.inference: the cost model of one tile, the tile prediction chooses for an image, and
probabilities that do not depend on that choice."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import minunet.functional as F
from minunet.autograd import no_grad
from minunet.data.tiling import tile_origins
from minunet.inference import (choose_tile, foreground_probability, forward_cost,
                               predict_probabilities, smallest_grid_tile)
from minunet.nn import UNet
from minunet.tensor import Tensor


def config(base=3, depth=2, in_channels=2, num_classes=3):
    return dict(in_channels=in_channels, num_classes=num_classes, base_channels=base,
                depth=depth, dropout=0.5)


@pytest.mark.parametrize("cfg,tile", [(config(), 52), (config(base=2, depth=3, in_channels=1,
                                                                     num_classes=2), 108)])
def test_forward_cost_counts_the_operations_of_a_real_forward_pass(monkeypatch, rng, cfg, tile):
    """FLOPs = 2 x multiply-adds of every convolution, counted independently by wrapping the
    functional ops during a real forward pass (any exact mismatch is a bug in the model)."""
    counted = []

    def counting(name, per_output):
        op = getattr(F, name)

        def wrapped(x, w, b=None, **options):   # options: conv3x3's relu=True (fused ReLU)
            y = op(x, w, b, **options)
            counted.append(2 * int(np.prod(y.shape)) * per_output(w))
            return y
        monkeypatch.setattr(F, name, wrapped)

    counting("conv3x3", lambda w: w.shape[1] * 9)
    counting("conv1x1", lambda w: w.shape[1])
    counting("conv_transpose2x2", lambda w: w.shape[0])   # each output sums Ci inputs
    model = UNet(**{k: v for k, v in cfg.items()}, seed=0).eval()
    x = rng.random((1, cfg["in_channels"], tile, tile)).astype(np.float32)
    with no_grad():
        model(Tensor(x))
    flops, _ = forward_cost(tile, cfg)
    assert flops == sum(counted)


@pytest.mark.parametrize("cfg,tile", [(config(), 92), (config(base=8, depth=4, in_channels=1,
                                                                     num_classes=2), 188)])
def test_forward_cost_bytes_bound_the_memory_of_a_forward_pass(rng, cfg, tile):
    """The byte estimate is an upper bound on the peak of NumPy allocations (tracemalloc) during
    one forward pass on cpu, and not a loose one (within 8x)."""
    model = UNet(**cfg, seed=0).eval()
    x = rng.random((1, cfg["in_channels"], tile, tile)).astype(np.float32)
    tracemalloc.start()
    try:
        with no_grad():
            model(Tensor(x)).numpy()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _, estimate = forward_cost(tile, cfg)
    assert peak <= estimate <= 8 * peak, (peak, estimate)


def candidates(depth, up_to):
    tile = smallest_grid_tile(depth)
    while True:
        yield tile
        if UNet.output_size(tile, depth) >= up_to:
            return
        tile = UNet.valid_input_size(tile + 1, depth)


def total_flops(tile, h, w, cfg):
    out = UNet.output_size(tile, cfg["depth"])
    grid = 2 ** cfg["depth"]
    return len(tile_origins(h, out, grid)) * len(tile_origins(w, out, grid)) * forward_cost(tile, cfg)[0]


@pytest.mark.parametrize("h,w,memory_mb", [(48, 48, 1024), (37, 301, 1024), (256, 256, 1024),
                                           (500, 333, 40), (1000, 1000, 8), (5, 3, 1024)])
def test_choose_tile_is_the_cheapest_valid_tile_within_the_budget(h, w, memory_mb):
    """Brute force over every candidate: none within the budget needs fewer operations, and a
    larger tile is never skipped for an equally cheap smaller one."""
    cfg = config(base=4, depth=3, in_channels=1, num_classes=2)
    tile = choose_tile(h, w, cfg, memory_mb)
    UNet.output_size(tile, 3)                                    # valid
    fits = [t for t in candidates(3, max(h, w)) if forward_cost(t, cfg)[1] <= memory_mb * 2 ** 20]
    assert tile in fits
    best = min(total_flops(t, h, w, cfg) for t in fits)
    assert total_flops(tile, h, w, cfg) == best
    assert tile == max(t for t in fits if total_flops(t, h, w, cfg) == best)


def test_choose_tile_prefers_one_large_tile_and_falls_back_to_the_smallest():
    cfg = config(base=2, depth=2, in_channels=1, num_classes=2)
    assert choose_tile(48, 48, cfg) == 88                  # one tile, output 48 covers the image
    assert choose_tile(48, 48, cfg, memory_mb=1e-9) == 44  # nothing fits: the smallest valid
    with pytest.raises(ValueError, match="positive"):
        choose_tile(0, 5, cfg)
    with pytest.raises(ValueError, match="memory"):
        choose_tile(5, 5, cfg, memory_mb=0)


def test_predictions_do_not_depend_on_the_tile(rng):
    """Depth 2: tiles whose output origins are multiples of 4 (2^depth) see the same pooling grid,
    so an automatic single tile (88 -> 48) and 60-tiles (-> 20, origins 0, 20, 28) agree to float32
    rounding (atol 1e-5), for each of three classes."""
    model = UNet(in_channels=1, num_classes=3, base_channels=3, depth=2, seed=1).eval()
    image = rng.random((48, 48)).astype(np.float32)
    auto = predict_probabilities(model, image)
    fixed = predict_probabilities(model, image, tile=60)
    assert auto.shape == fixed.shape == (3, 48, 48)
    np.testing.assert_allclose(auto.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(auto, fixed, atol=1e-5, rtol=0)


def test_tiles_off_a_multiple_of_the_grid_give_the_whole_image_pass(rng):
    """Depth 3, tile 116 -> output 28 = 4 (mod 8) on a 157 x 211 image (both prime): the tiles
    step by 24 and the last overhangs, all on the pooling grid, so the probabilities equal one
    tile covering the whole image (atol 2e-5: float32 rounding). Side by side from 0 (grid 1, as
    before) the tiles after the first pool other pixel pairs, and the untrained network's
    probabilities move by far more."""
    from minunet.data import standardize
    from minunet.data.tiling import predict_overlap_tile

    model = UNet(in_channels=1, num_classes=3, base_channels=3, depth=3, seed=2).eval()
    image = rng.random((157, 211)).astype(np.float32)
    whole = UNet.valid_input_size(211 + 88, 3)                 # one tile: output covers the image
    assert UNet.output_size(whole, 3) >= 211
    expected = predict_probabilities(model, image, tile=whole)
    tiled = predict_probabilities(model, image, tile=116)
    np.testing.assert_allclose(tiled, expected, atol=2e-5, rtol=0)

    def probabilities(batch):
        with no_grad():
            logits = model(Tensor(batch)).numpy()
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    side_by_side = predict_overlap_tile(standardize(image)[None], probabilities, 116, 28, grid=1)
    assert np.abs(side_by_side - expected).max() > 1e-3


def test_tiles_smaller_than_the_pooling_grid_are_refused(rng):
    """A tile whose output square is narrower than 2**depth cannot step along the pooling grid:
    prediction refuses it with one line naming the smallest tile that can, and never chooses it."""
    model = UNet(in_channels=1, num_classes=2, base_channels=2, depth=3, seed=0).eval()
    assert (smallest_grid_tile(3), UNet.output_size(smallest_grid_tile(3), 3)) == (100, 12)
    assert smallest_grid_tile(4) == 204 and smallest_grid_tile(2) == 44
    with pytest.raises(ValueError, match="tile 92 gives a 4-pixel output square.*at least 100"):
        predict_probabilities(model, rng.random((20, 20)).astype(np.float32), tile=92)
    assert choose_tile(300, 300, model.config, memory_mb=1e-9) == 100


def test_predict_probabilities_refuses_nan_and_non_2d_images(rng):
    model = UNet(in_channels=1, num_classes=2, base_channels=2, depth=2, seed=0).eval()
    image = rng.random((20, 23))
    image[4, 7] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        predict_probabilities(model, image)
    with pytest.raises(ValueError, match="2-D"):
        predict_probabilities(model, rng.random((2, 20, 23)))


def test_foreground_probability(rng):
    p = rng.random((2, 5, 6)).astype(np.float32)
    p /= p.sum(axis=0)
    np.testing.assert_array_equal(foreground_probability(p), p[1])   # exactly P(class 1)
    q = rng.random((4, 5, 6)).astype(np.float32)
    q /= q.sum(axis=0)
    fg = foreground_probability(q)
    assert fg.dtype == np.float32
    np.testing.assert_allclose(fg, 1 - q[0], atol=1e-6)
