"""Elastic deformation and the other augmentations of Section 3.1."""
import numpy as np
import pytest

from minunet.data.elastic import (displacement_field, elastic_deform, gray_value_variation,
                                  random_augment, transform_coordinates,
                                  warp_with_coordinates)


def _blocky_label(rng, h, w, n_classes=3, block=8):
    """Large constant regions (so no class vanishes under a 10-px deformation)."""
    coarse = rng.integers(0, n_classes, size=(-(-h // block), -(-w // block)))
    return np.kron(coarse, np.ones((block, block), np.int64))[:h, :w].astype(np.int32)


def test_std_zero_is_identity():
    rng = np.random.default_rng(0)
    image = rng.random((2, 23, 31)).astype(np.float32)
    label = rng.integers(0, 4, (23, 31)).astype(np.int32)
    weight = rng.random((23, 31)).astype(np.float32) + 0.5
    out_image, out_label, out_weight, field = elastic_deform(image, label, weight, rng, std=0.0)
    np.testing.assert_allclose(out_image, image, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out_label, label)
    np.testing.assert_allclose(out_weight, weight, atol=1e-6, rtol=0)
    assert field.shape == (2, 23, 31) and not field.any()


def test_field_interpolates_gaussian_nodes_smoothly():
    rng = np.random.default_rng(1)
    corners = np.array([displacement_field((9, 13), rng)[:, [0, 0, -1, -1], [0, -1, 0, -1]]
                        for _ in range(300)])
    # node values are N(0, 10^2): the sample std of 2400 draws is within ~5 % of 10
    assert abs(corners.std() - 10.0) < 0.8 and abs(corners.mean()) < 1.0
    field = displacement_field((64, 64), np.random.default_rng(2), std=10.0)
    assert field.dtype == np.float32 and field.shape == (2, 64, 64)
    # smooth: neighbouring pixels move almost alike (a 3x3 grid over 64 px)
    assert np.abs(np.diff(field, axis=1)).max() < 3.0
    assert np.abs(np.diff(field, axis=2)).max() < 3.0
    assert field.std() > 2.0


def test_deformed_label_keeps_its_values_and_moves_with_the_image():
    rng = np.random.default_rng(3)
    label = _blocky_label(rng, 48, 40)
    image = label.astype(np.float32) / 2.0
    out_image, out_label, _, field = elastic_deform(image, label, None, np.random.default_rng(4))
    assert out_label.dtype == label.dtype
    assert set(np.unique(out_label)) == set(np.unique(label))
    assert np.abs(field).max() > 2.0  # it really moved
    # image (cubic) and label (nearest) went through the same map: they disagree only on
    # pixels straddling a class edge
    agree = np.mean(np.rint(out_image * 2.0) == out_label)
    assert agree > 0.97
    # while an independent deformation of the label would disagree much more
    _, other_label, _, _ = elastic_deform(image, label, None, np.random.default_rng(5))
    assert np.mean(np.rint(out_image * 2.0) == other_label) < agree - 0.05


def test_determinism_and_range():
    rng_image = np.random.default_rng(6)
    image = rng_image.random((30, 30)).astype(np.float32)
    weight = rng_image.random((30, 30)).astype(np.float32)
    a = elastic_deform(image, None, weight, np.random.default_rng(11))
    b = elastic_deform(image, None, weight, np.random.default_rng(11))
    c = elastic_deform(image, None, weight, np.random.default_rng(12))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[3], b[3])
    assert not np.array_equal(a[0], c[0])
    assert a[0].min() >= image.min() and a[0].max() <= image.max()
    assert a[2].min() >= 0.0


def test_rotation_flip_and_shift_geometry():
    rng = np.random.default_rng(7)
    a = rng.random((6, 9)).astype(np.float32)

    def warp(coords):
        return warp_with_coordinates(a, None, None, coords)[0]

    np.testing.assert_allclose(warp(transform_coordinates((9, 6), (6, 9), angle=np.pi / 2)),
                               np.rot90(a), atol=1e-5)
    np.testing.assert_allclose(warp(transform_coordinates((6, 9), (6, 9), flip_x=True)),
                               a[:, ::-1], atol=1e-5)
    np.testing.assert_allclose(warp(transform_coordinates((6, 9), (6, 9), flip_y=True)),
                               a[::-1, :], atol=1e-5)
    np.testing.assert_allclose(warp(transform_coordinates((4, 5), (6, 9), shift=(1.0, 2.0))),
                               a[2:6, 4:9], atol=1e-5)


def test_random_augment_keeps_alignment_shapes_and_seed():
    rng = np.random.default_rng(8)
    label = _blocky_label(rng, 80, 80, n_classes=2, block=10)
    image = label.astype(np.float32)
    weight = 1.0 + label.astype(np.float32)
    out = random_augment(image, label, weight, np.random.default_rng(9), out_shape=(50, 44),
                         gray=False)
    assert out[0].shape == out[1].shape == out[2].shape == (50, 44)
    assert out[0].dtype == np.float32 and out[1].dtype == np.int32 and out[2].dtype == np.float32
    assert np.mean(np.rint(out[0]) == out[1]) > 0.97
    assert np.mean(np.rint(out[2]) == 1.0 + out[1]) > 0.97
    again = random_augment(image, label, weight, np.random.default_rng(9), out_shape=(50, 44),
                           gray=False)
    for x, y in zip(out, again):
        np.testing.assert_array_equal(x, y)
    # channels are resampled alike and not blended
    stacked = np.stack([image, 1.0 - image])
    two = random_augment(stacked, None, None, np.random.default_rng(10), gray=False)[0]
    np.testing.assert_allclose(two[0] + two[1], 1.0, atol=1e-4)


def test_gray_value_variation_is_monotone_and_seeded():
    ramp = np.linspace(0, 1, 50, dtype=np.float32).reshape(5, 10)
    out = gray_value_variation(ramp, np.random.default_rng(0))
    assert out.dtype == np.float32
    assert np.all(np.diff(out.ravel()) > 0)  # order of intensities preserved
    assert not np.allclose(out, ramp)
    np.testing.assert_array_equal(out, gray_value_variation(ramp, np.random.default_rng(0)))


def test_bad_arguments():
    with pytest.raises(TypeError, match="Generator"):
        elastic_deform(np.zeros((4, 4)), None, None, rng=0)
    with pytest.raises(ValueError, match="does not match"):
        elastic_deform(np.zeros((4, 4)), np.zeros((4, 5)), None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="grid"):
        displacement_field((4, 4), np.random.default_rng(0), grid=1)


def _map_coordinates_field(shape, rng, grid=3, std=10.0):
    """displacement_field as it was first written: map_coordinates on the lattice (the oracle)."""
    from scipy import ndimage

    h, w = shape
    nodes = rng.normal(0.0, std, size=(2, grid, grid))
    ys = np.linspace(0.0, grid - 1.0, h) if h > 1 else np.zeros(1)
    xs = np.linspace(0.0, grid - 1.0, w) if w > 1 else np.zeros(1)
    lattice = np.stack(np.meshgrid(ys, xs, indexing="ij"))
    return np.stack([ndimage.map_coordinates(nodes[c], lattice, order=3, mode="nearest")
                     for c in range(2)]).astype(np.float32)


@pytest.mark.parametrize("shape,grid", [((348, 348), 3), ((23, 31), 3), ((1, 7), 3), ((40, 9), 5)])
def test_separable_field_equals_the_map_coordinates_field(shape, grid):
    """The separable evaluation (two small matrix products) gives the same float32 field."""
    for seed in range(3):
        got = displacement_field(shape, np.random.default_rng(seed), grid=grid)
        want = _map_coordinates_field(shape, np.random.default_rng(seed), grid=grid)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,count,tile,out", [("cpu", 6, 92, 20), ("emu", 1, 44, 4)])
def test_device_augmentation_follows_the_scipy_path(device, count, tile, out):
    """TileSampler(device=...) resamples on the device, straight from the slice (no mirrored
    region, spline coefficients once per slice), and gives scipy's examples: the same random
    numbers drawn (same generator state after), labels exactly, image and weight within 1e-5
    (the region's own prefilter differs from the slice's only near the region's border, which
    the augmentation's margin keeps the coordinates away from)."""
    from minunet.data.dataset import TileSampler, synthetic_samples

    samples = synthetic_samples("cells", 3, size=48, seed=2)   # smaller than the region: mirrored
    scipy_path = TileSampler(samples, tile, out, np.random.default_rng(5), max_shift=3.0)
    device_path = TileSampler(samples, tile, out, np.random.default_rng(5), max_shift=3.0,
                              device=device)
    for _ in range(count):
        want, got = scipy_path.sample(), device_path.sample()
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
        assert [a.dtype for a in got] == [a.dtype for a in want]
    assert device_path.rng.bit_generator.state == scipy_path.rng.bit_generator.state
    with pytest.raises(ValueError, match="device"):
        TileSampler(samples, tile, out, np.random.default_rng(5), device="gpu")
