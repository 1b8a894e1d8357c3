"""Synthetic data sets: shapes, dtypes, determinism, and that they pose the problems they claim to."""

import numpy as np
import pytest
from scipy import ndimage

from minunet.data.synthetic import cell_images, em_images


def _touching_pairs(instances: np.ndarray) -> int:
    """Number of distinct unordered pairs of instances that are 4-adjacent."""
    pairs = set()
    for a, b in ((instances[:, 1:], instances[:, :-1]), (instances[1:, :], instances[:-1, :])):
        both = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[both].tolist(), b[both].tolist())}
    return len(pairs)


def test_em_images_shapes_dtypes_and_determinism():
    images, labels = em_images(3, size=96, seed=7)
    assert images.shape == labels.shape == (3, 96, 96)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(labels)) == {0, 1}
    again_images, again_labels = em_images(3, size=96, seed=7)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    other_images, _ = em_images(3, size=96, seed=8)
    assert not np.array_equal(images, other_images)
    # image k does not depend on how many images were asked for
    np.testing.assert_array_equal(em_images(1, size=96, seed=7)[0][0], images[0])


def test_em_images_look_like_isbi_and_are_not_a_threshold_problem():
    images, labels = em_images(4, size=128, seed=1)
    membrane_fraction = 1.0 - labels.mean()
    assert 0.12 < membrane_fraction < 0.35  # ISBI 2012: about 22 % membrane
    # membranes are darker on average, so the task is learnable ...
    assert images[labels == 0].mean() < images[labels == 1].mean() - 0.15
    # ... but no global threshold gets close to a perfect labelling
    errors = [np.mean((images > t) != labels) for t in np.linspace(0, 1, 51)]
    assert min(errors) > 0.05
    # many cells per image, separated by membranes (4-connected components of the interior)
    _, n_cells = ndimage.label(labels[0])
    assert n_cells > 15


def test_cell_images_have_touching_instances_of_similar_intensity():
    images, instances = cell_images(4, size=128, seed=3)
    assert images.shape == instances.shape == (4, 128, 128)
    assert images.dtype == np.float32 and instances.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(cell_images(4, size=128, seed=3)[1], instances)
    for inst in instances:
        ids = np.unique(inst)
        assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))  # 0..K consecutive
        assert len(ids) - 1 >= 4
    assert sum(_touching_pairs(inst) for inst in instances) >= 4
    # interiors of different cells have nearly the same mean intensity
    img, inst = images[0], instances[0]
    means = ndimage.mean(img, inst, index=np.arange(1, inst.max() + 1))
    assert np.ptp(means) < 0.15
    assert img[inst > 0].mean() > img[inst == 0].mean() + 0.1


@pytest.mark.parametrize("generator", [em_images, cell_images])
def test_bad_arguments_raise_clear_errors(generator):
    with pytest.raises(ValueError, match="n must be"):
        generator(0)
    with pytest.raises(ValueError, match="size must be"):
        generator(1, size=8)


@pytest.mark.parametrize("size", [16, 23, 34])
def test_small_images_are_allowed(size):
    """Every size the argument check allows (>= 16) generates, small ones included."""
    images, labels = em_images(2, size=size, seed=1)
    assert images.shape == labels.shape == (2, size, size)
