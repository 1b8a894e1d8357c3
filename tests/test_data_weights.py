"""Weight maps of the paper's eq. 2, on hand-made masks whose distances are known."""
import numpy as np
import pytest
from scipy import ndimage

from minunet.data.weights import (class_balance_weights, instance_targets,
                                  nearest_two_cell_distances, semantic_weight_map,
                                  separate_touching, unet_weight_map)

ATOL, RTOL = 1e-5, 1e-5


def _two_squares(gap: int) -> np.ndarray:
    """Two 10x10 squares side by side, `gap` background columns between them, in a 30 x (40+gap)
    frame."""
    m = np.zeros((30, 40 + gap), np.int32)
    m[10:20, 10:20] = 1
    m[10:20, 20 + gap:30 + gap] = 2
    return m


def test_class_balance_majority_gets_one():
    mask = np.zeros((4, 5), np.int64)
    mask[0, :2] = 1  # 2 foreground pixels, 18 background
    w = class_balance_weights(mask)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w[mask == 0], 1.0)
    np.testing.assert_allclose(w[mask == 1], 18 / 2)
    # three classes, one absent: num_classes may exceed the values present
    w3 = class_balance_weights(mask, num_classes=3)
    np.testing.assert_allclose(w3, w)
    with pytest.raises(ValueError, match="num_classes"):
        class_balance_weights(mask + 1, num_classes=2)


def test_gap_between_two_squares_gets_the_analytic_border_weight():
    gap, w0, sigma = 4, 10.0, 5.0
    m = _two_squares(gap)
    w = unet_weight_map(m, w0=w0, sigma=sigma)
    wc = class_balance_weights((m > 0).astype(np.int64))
    # Every gap pixel on the squares' rows is at d1 = k, d2 = gap + 1 - k from the two squares:
    # d1 + d2 = gap + 1 whatever the column.
    expected = wc[10:20, 20:20 + gap] + w0 * np.exp(-(gap + 1) ** 2 / (2 * sigma ** 2))
    np.testing.assert_allclose(w[10:20, 20:20 + gap], expected, atol=ATOL, rtol=RTOL)
    # Cell pixels get the class weight only.
    np.testing.assert_allclose(w[m > 0], wc[m > 0], atol=ATOL, rtol=RTOL)
    # A background pixel in the frame corner: d1, d2 from the squares' corners, by hand.
    d1 = np.hypot(10, 10)                 # (0, 0) to (10, 10) of square 1
    d2 = np.hypot(10, 20 + gap)           # (0, 0) to (10, 20 + gap) of square 2
    np.testing.assert_allclose(w[0, 0], wc[0, 0] + w0 * np.exp(-(d1 + d2) ** 2 / (2 * sigma ** 2)),
                               atol=ATOL, rtol=RTOL)


def test_far_background_gets_class_weight_only():
    m = np.zeros((120, 120), np.int32)
    m[5:10, 5:10] = 1
    m[5:10, 14:19] = 2
    w = unet_weight_map(m)
    wc = class_balance_weights((m > 0).astype(np.int64))
    np.testing.assert_allclose(w[100:, 100:], wc[100:, 100:], atol=1e-6)


def test_zero_or_one_cell_has_no_border_term():
    empty = np.zeros((9, 11), np.int32)
    np.testing.assert_array_equal(unet_weight_map(empty), np.ones((9, 11), np.float32))
    single = np.zeros((9, 11), np.int32)
    single[2:5, 3:7] = 1
    np.testing.assert_allclose(unet_weight_map(single),
                               class_balance_weights(single.astype(np.int64)))


def test_distances_match_brute_force_on_random_cells():
    rng = np.random.default_rng(0)
    h, w = 37, 29
    m = np.zeros((h, w), np.int32)
    for k in range(1, 6):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        m[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = k
    d1, d2 = nearest_two_cell_distances(m)
    ids = [k for k in range(1, 6) if (m == k).any()]
    maps = np.stack([ndimage.distance_transform_edt(m != k) for k in ids])
    maps.sort(axis=0)
    np.testing.assert_allclose(d1, maps[0], atol=1e-5)
    np.testing.assert_allclose(d2, maps[1], atol=1e-5)
    # Restricting each transform to a window changes nothing within the window's reach.
    r1, r2 = nearest_two_cell_distances(m, reach=6.0)
    near = maps[1] <= 6.0
    np.testing.assert_allclose(r2[near], maps[1][near], atol=1e-5)
    # Elsewhere the windowed d2 may be larger (a cell out of reach is skipped), never smaller.
    assert np.all(r2 >= maps[1] - 1e-5) and np.all(r1 >= maps[0] - 1e-5)
    assert np.all(maps[1][r2 > maps[1] + 1e-5] > 6.0)


def test_separate_touching_carves_a_gap_and_keeps_loners():
    m = np.zeros((12, 16), np.int32)
    m[2:8, 2:6] = 1
    m[2:8, 6:10] = 2      # touches cell 1 along a 6-pixel edge
    m[9:11, 12:15] = 3    # touches nothing
    s = separate_touching(m)
    # exactly one column of cell 1 went to background, cell 2 and cell 3 untouched
    np.testing.assert_array_equal(s[2:8, 5], 0)
    np.testing.assert_array_equal(s[2:8, 2:5], 1)
    np.testing.assert_array_equal(s[m == 2], 2)
    np.testing.assert_array_equal(s[m == 3], 3)
    # no pixel of one cell remains 8-adjacent to another cell
    grown = ndimage.maximum_filter(s, size=3, mode="constant")
    assert not np.any((s > 0) & (grown > s))
    # diagonal contact is separated too
    d = np.zeros((5, 5), np.int32)
    d[1, 1], d[2, 2] = 1, 2
    assert separate_touching(d)[1, 1] == 0 and separate_touching(d)[2, 2] == 2


def test_separate_touching_on_random_tessellation_keeps_every_large_cell():
    rng = np.random.default_rng(1)
    seeds = rng.integers(0, 40, size=(12, 2))
    yy, xx = np.mgrid[0:40, 0:40]
    nearest = np.argmin((yy[None] - seeds[:, 0, None, None]) ** 2
                        + (xx[None] - seeds[:, 1, None, None]) ** 2, axis=0)
    m = (nearest + 1).astype(np.int32)
    s = separate_touching(m)
    grown = ndimage.maximum_filter(s, size=3, mode="constant")
    assert not np.any((s > 0) & (grown > s))
    for k in np.unique(m):
        if (m == k).sum() > 30:
            assert (s == k).sum() > 0


def test_instance_targets_gives_gap_a_high_weight():
    m = np.zeros((20, 24), np.int32)
    m[4:16, 2:12] = 1
    m[4:16, 12:22] = 2
    target, weight = instance_targets(m)
    assert target.dtype == np.int32 and weight.dtype == np.float32
    np.testing.assert_array_equal(target[4:16, 11], 0)  # the carved gap is background
    # d1 = d2 = 1 in the gap: weight = w_c(background) + 10 * exp(-4 / 50)
    wc = class_balance_weights(target)
    np.testing.assert_allclose(weight[4:16, 11], wc[4:16, 11] + 10 * np.exp(-4 / 50), rtol=1e-5)
    assert weight[4:16, 11].min() > weight[target == 0].mean()


def test_semantic_weight_map_modes():
    mask = np.zeros((10, 10), np.uint8)
    mask[1:4, 1:4] = 1
    mask[1:4, 6:9] = 1
    np.testing.assert_allclose(semantic_weight_map(mask), class_balance_weights(mask.astype(int)))
    with_border = semantic_weight_map(mask, w0=10.0)
    np.testing.assert_allclose(with_border, unet_weight_map(ndimage.label(mask)[0]))
    assert with_border[2, 5] > semantic_weight_map(mask)[2, 5]
    with pytest.raises(ValueError, match="binary"):
        semantic_weight_map(mask * 3)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        unet_weight_map(np.zeros((2, 3, 4), np.int32))
    with pytest.raises(TypeError, match="integers"):
        unet_weight_map(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        separate_touching(-np.ones((3, 3), np.int32))
