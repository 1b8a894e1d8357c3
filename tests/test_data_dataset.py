"""Data folders, validation split, and the random tile sampler."""
import numpy as np
import pytest
import tifffile

from minunet.data.dataset import (Sample, TileSampler, count_classes, load_folder, make_sample,
                                  split_train_val, synthetic_samples)
from minunet.data.io import write_image
from minunet.data.tiling import mirror_crop
from minunet.data.weights import class_balance_weights


def _write_pair(root, name, image, label, suffix=".png"):
    write_image(root / "images" / f"{name}{suffix}", image)
    write_image(root / "labels" / f"{name}{suffix}", label)


def _semantic_folder(tmp_path, n=3, shape=(12, 15)):
    rng = np.random.default_rng(0)
    for k in range(n):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        _write_pair(tmp_path, f"img{k:02d}", image, (image > 128).astype(np.uint8) * 255)
    return tmp_path


def test_load_folder_pngs_and_tiff_stack(tmp_path):
    _semantic_folder(tmp_path)
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 4096, (4, 12, 15), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "images" / "vol.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels" / "vol.tif", ((volume > 2000) * 255).astype(np.uint8),
                     photometric="minisblack")
    samples = load_folder(tmp_path)
    assert len(samples) == 3 + 4
    assert [s.name for s in samples[:4]] == ["img00.png", "img01.png", "img02.png", "vol.tif[0]"]
    for s in samples:
        assert s.image.dtype == np.float32 and s.image.shape == (12, 15)
        assert s.image.min() == 0.0 and s.image.max() == 1.0
        assert s.target.dtype == np.int32 and set(np.unique(s.target)) <= {0, 1}
        np.testing.assert_allclose(s.weight, class_balance_weights(s.target, 2))
        assert s.instances is None
    np.testing.assert_array_equal(samples[5].target, (volume[2] > 2000).astype(np.int32))
    # the image's own min/max normalisation keeps the label relation intact
    assert np.all((samples[5].image > (2000 - volume[2].min()) / np.ptp(volume[2]))
                  == samples[5].target.astype(bool))


def test_load_folder_instances_builds_gaps_and_border_weights(tmp_path):
    mask = np.zeros((20, 30), np.uint16)
    mask[4:16, 3:14] = 1
    mask[4:16, 14:26] = 300  # touching, 16-bit id
    _write_pair(tmp_path, "frame", (mask > 0).astype(np.uint8) * 200 + 20, mask, suffix=".tif")
    (s,) = load_folder(tmp_path, instances=True)
    np.testing.assert_array_equal(s.target[4:16, 13], 0)   # carved gap
    assert s.target[4:16, 3:13].all() and s.target[4:16, 14:26].all()
    assert s.weight[4:16, 13].min() > 5.0                  # w0 * exp(-4/50) + w_c
    np.testing.assert_array_equal(s.instances, mask.astype(np.int32))
    # a binary mask given as instances: components become cells
    binary = np.zeros((20, 30), np.uint8)
    binary[2:8, 2:8] = 255
    binary[2:8, 11:17] = 255
    sample = make_sample(np.zeros((20, 30)), binary, "b", instances=True)
    assert sample.instances.max() == 2
    assert sample.weight[5, 9] > 2.0


@pytest.mark.parametrize("problem,message", [
    ("no_folder", "does not exist"),
    ("no_images", "no images/"),
    ("no_labels", "no labels/"),
    ("empty", "holds no image files"),
    ("unpaired", "img02.png has no partner"),
    ("unreadable", "cannot read image file .*img01.png"),
    ("size", "img01.png .* same size"),
    ("values", r"label file .*labels/img01.png has values \[0, 3\] outside 0..1"),
    ("pages", "slices but"),
])
def test_load_folder_errors_name_the_problem(tmp_path, problem, message):
    root = tmp_path / "data"
    if problem != "no_folder":
        _semantic_folder(root)
    if problem == "no_images":
        for p in (root / "images").iterdir():
            p.unlink()
        (root / "images").rmdir()
    elif problem == "no_labels":
        for p in (root / "labels").iterdir():
            p.unlink()
        (root / "labels").rmdir()
    elif problem == "empty":
        for sub in ("images", "labels"):
            for p in (root / sub).iterdir():
                p.unlink()
    elif problem == "unpaired":
        (root / "labels" / "img02.png").unlink()
    elif problem == "unreadable":
        (root / "images" / "img01.png").write_bytes(b"garbage")
    elif problem == "size":
        write_image(root / "labels" / "img01.png", np.zeros((7, 7), np.uint8))
    elif problem == "values":
        label = np.full((12, 15), 3, np.uint8)
        label[0, 0] = 0
        write_image(root / "labels" / "img01.png", label)
    elif problem == "pages":
        write_image(root / "images" / "z.tif", np.zeros((3, 12, 15), np.uint8))
        write_image(root / "labels" / "z.tif", np.zeros((2, 12, 15), np.uint8))
    with pytest.raises(ValueError, match=message) as info:
        load_folder(root, num_classes=2)
    assert "\n" not in str(info.value)


def test_split_train_val():
    items = list(range(10))
    train, val = split_train_val(items, 0.3, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert sorted(train + val) == items and not set(train) & set(val)
    assert split_train_val(items, 0.3, seed=1) == (train, val)
    assert split_train_val(items, 0.3, seed=2) != (train, val)
    assert split_train_val(items, 0.0) == (items, [])
    assert len(split_train_val(items[:3], 0.01)[1]) == 1
    with pytest.raises(ValueError, match="fraction"):
        split_train_val(items, 1.0)
    with pytest.raises(ValueError, match="keep some"):
        split_train_val(items[:1], 0.5)


def _aligned_sample(h, w, seed=0):
    """Image equal to its (blocky) target, weight 1 + target: any misalignment shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 2, (-(-h // 6), -(-w // 6)))
    target = np.kron(coarse, np.ones((6, 6), np.int64))[:h, :w].astype(np.int32)
    return Sample(target.astype(np.float32), target, 1.0 + target.astype(np.float32), "aligned")


def test_tile_sampler_without_augmentation_cuts_aligned_tiles():
    s = _aligned_sample(50, 37)
    sampler = TileSampler([s], input_size=28, output_size=12, rng=np.random.default_rng(0),
                          augment=False)
    for _ in range(20):
        x, target, weight = sampler.sample()
        assert x.shape == (1, 28, 28) and x.dtype == np.float32
        assert target.shape == weight.shape == (12, 12)
        assert target.dtype == np.int32 and weight.dtype == np.float32
        np.testing.assert_array_equal(x[0, 8:20, 8:20], target)
        np.testing.assert_array_equal(weight, 1.0 + target)
        # and the tile really comes from the image: find it
        hits = [(t, l) for t in range(50 - 11) for l in range(37 - 11)
                if np.array_equal(s.target[t:t + 12, l:l + 12], target)]
        assert any(np.array_equal(mirror_crop(s.image, t - 8, l - 8, 28, 28), x[0]) for t, l in hits)


def test_tile_sampler_with_augmentation_keeps_alignment_and_handles_small_images():
    s = _aligned_sample(20, 17, seed=1)  # smaller than the tile: mirror padding
    sampler = TileSampler([s], input_size=44, output_size=20, rng=np.random.default_rng(1),
                          augment=True, gray=False)
    agree = []
    for _ in range(8):
        x, target, weight = sampler.sample()
        assert x.shape == (1, 44, 44) and target.shape == (20, 20)
        agree.append(np.mean(np.rint(x[0, 12:32, 12:32]) == target))
        assert set(np.unique(target)) <= {0, 1}
        assert np.mean(np.rint(weight) == 1 + target) > 0.9
    assert np.mean(agree) > 0.95
    xb, tb, wb = sampler.batch(3)
    assert xb.shape == (3, 1, 44, 44) and tb.shape == (3, 20, 20) and wb.shape == (3, 20, 20)
    # reproducible from the rng
    a = TileSampler([s], 44, 20, np.random.default_rng(5)).batch(2)
    b = TileSampler([s], 44, 20, np.random.default_rng(5)).batch(2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_tile_sampler_bad_arguments():
    s = _aligned_sample(10, 10)
    with pytest.raises(ValueError, match="even difference"):
        TileSampler([s], 21, 12, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one sample"):
        TileSampler([], 20, 12, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        TileSampler([s], 20, 12, rng=0)


def test_synthetic_samples():
    em = synthetic_samples("em", n=2, size=48, seed=3)
    cells = synthetic_samples("cells", n=2, size=64, seed=3)
    assert len(em) == 2 and em[0].instances is None and em[0].target.dtype == np.int32
    assert cells[0].instances is not None and cells[0].weight.max() > 3.0
    with pytest.raises(ValueError, match="'em' or 'cells'"):
        synthetic_samples("mri")


def test_load_folder_counts_classes_and_names_the_label_file(tmp_path, rng):
    """Class indices 0..2 give three classes; a gray image saved as the label is not taken for
    200 classes; out-of-range errors name the label file, not its image."""
    for k in range(2):
        image = rng.random((11, 14))
        label = np.minimum((image * 3).astype(np.uint8), 2)
        write_image(tmp_path / "images" / f"s{k}.png", (image * 255).astype(np.uint8))
        (tmp_path / "labels").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "labels" / f"s{k}.tif", label, photometric="minisblack")
    samples = load_folder(tmp_path)
    assert count_classes(samples) == 3
    for s in samples:
        np.testing.assert_allclose(s.weight, class_balance_weights(s.target, 3))
    assert count_classes(load_folder(tmp_path, num_classes=5)) == 3   # the labels' own count
    with pytest.raises(ValueError, match=r"label file .*labels/s0.tif has values \[0, 1, 2\]"):
        load_folder(tmp_path, num_classes=2)
    tifffile.imwrite(tmp_path / "labels" / "s1.tif", (rng.random((11, 14)) * 200).astype(np.uint8),
                     photometric="minisblack")
    with pytest.raises(ValueError, match=r"labels/s1.tif has class values up to 19\d.*--num-classes"):
        load_folder(tmp_path)
    assert count_classes(load_folder(tmp_path, num_classes=200)) >= 190
    with pytest.raises(ValueError, match="num_classes=2 with instances"):
        load_folder(tmp_path, instances=True, num_classes=3)


def test_count_classes():
    def sample(*values):
        target = np.array([values], np.int32)
        return Sample(np.zeros(target.shape, np.float32), target, np.ones(target.shape), "s")

    assert count_classes([sample(0, 0)]) == 2
    assert count_classes([sample(0, 1), sample(0, 4)]) == 5
