"""Reading and writing PNG/TIFF: bit depths, stacks, colour, normalisation, label values, NaN
refusal, which files count as images."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from minunet.data.io import (image_files, labels_to_classes, normalize_intensity, read_image,
                             read_slices, standardize, write_image)


def test_png_round_trips_8_and_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    a16 = rng.integers(0, 65536, (13, 17), dtype=np.uint16)
    write_image(tmp_path / "a8.png", a8)
    write_image(tmp_path / "sub" / "a16.png", a16)
    (b8,) = read_slices(tmp_path / "a8.png")
    (b16,) = read_slices(tmp_path / "sub" / "a16.png")
    np.testing.assert_array_equal(b8, a8)
    np.testing.assert_array_equal(b16, a16)
    (n16,) = read_image(tmp_path / "sub" / "a16.png")
    assert n16.dtype == np.float32 and n16.min() == 0.0 and n16.max() == 1.0
    np.testing.assert_allclose(n16, (a16 - a16.min()) / (a16.max() - a16.min()), atol=1e-6)


def test_multipage_tiff_is_a_stack_and_rgb_tiff_is_one_gray_slice(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4096, (3, 9, 11), dtype=np.uint16)  # 3 pages, not RGB
    write_image(tmp_path / "stack.tif", stack)
    slices = read_slices(tmp_path / "stack.tif")
    assert len(slices) == 3
    for got, want in zip(slices, stack):
        np.testing.assert_array_equal(got, want)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    (gray,) = read_slices(tmp_path / "rgb.tif")
    np.testing.assert_allclose(gray, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-9)
    probabilities = rng.random((9, 11)).astype(np.float32)
    write_image(tmp_path / "p.tiff", probabilities)
    np.testing.assert_array_equal(read_slices(tmp_path / "p.tiff")[0], probabilities)


def test_rgb_png_to_gray_and_label_colour_rules(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    (gray,) = read_slices(tmp_path / "rgb.png")
    np.testing.assert_allclose(gray, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-9)
    with pytest.raises(ValueError, match="colour channels"):
        read_slices(tmp_path / "rgb.png", as_label=True)
    grey_rgb = np.repeat(rng.integers(0, 3, (6, 7, 1), dtype=np.uint8), 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_slices(tmp_path / "grey_rgb.png", as_label=True)[0],
                                  grey_rgb[..., 0])
    indexed = Image.fromarray(rng.integers(0, 3, (6, 7), dtype=np.uint8), mode="P")
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    indexed.save(tmp_path / "indexed.png")
    np.testing.assert_array_equal(read_slices(tmp_path / "indexed.png", as_label=True)[0],
                                  np.asarray(indexed))


def test_bool_mask_png_reads_back_as_classes(tmp_path):
    mask = np.random.default_rng(3).random((8, 5)) > 0.5
    write_image(tmp_path / "mask.png", mask)
    (raw,) = read_slices(tmp_path / "mask.png", as_label=True)
    assert set(np.unique(raw)) <= {0, 255}
    np.testing.assert_array_equal(labels_to_classes(raw, 2), mask.astype(np.int32))


def test_normalize_intensity():
    a = np.array([[10, 20], [30, 50]], np.uint16)
    np.testing.assert_allclose(normalize_intensity(a), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(normalize_intensity(np.full((3, 3), 7)), np.zeros((3, 3)))


def test_labels_to_classes():
    np.testing.assert_array_equal(labels_to_classes(np.array([[0, 255]], np.uint8), 2), [[0, 1]])
    np.testing.assert_array_equal(labels_to_classes(np.array([[0, 2, 1]]), 3), [[0, 2, 1]])
    with pytest.raises(ValueError, match=r"my.png.*outside 0\.\.1"):
        labels_to_classes(np.array([[0, 2]]), 2, source="my.png")
    with pytest.raises(ValueError, match="fractional"):
        labels_to_classes(np.array([[0.5, 1.0]]), 2)


def test_unreadable_and_unwritable(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)
    bad_tif = tmp_path / "broken.tif"
    bad_tif.write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="broken.tif"):
        read_slices(bad_tif)
    with pytest.raises(ValueError, match=r"\.tif"):
        write_image(tmp_path / "p.png", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="use a .png"):
        write_image(tmp_path / "p.xyz", np.zeros((3, 3), np.uint8))


def test_binary_masks_8_and_16_bit_and_class_indices():
    """{0, 255} and {0, 65535} are binary masks; anything else is class indices as they are."""
    np.testing.assert_array_equal(labels_to_classes(np.array([[0, 65535]], np.uint16)), [[0, 1]])
    np.testing.assert_array_equal(labels_to_classes(np.array([[65535, 65535]], np.uint16)), [[1, 1]])
    np.testing.assert_array_equal(labels_to_classes(np.array([[0, 255]], np.uint16)), [[0, 1]])
    np.testing.assert_array_equal(labels_to_classes(np.array([[0, 1, 255]], np.uint8)), [[0, 1, 255]])
    np.testing.assert_array_equal(labels_to_classes(np.array([[0, 5, 2]])), [[0, 5, 2]])
    with pytest.raises(ValueError, match=r"lab.tif has negative values \[-1\]"):
        labels_to_classes(np.array([[0, -1]]), source="lab.tif")
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*--num-classes"):
        labels_to_classes(np.array([[0, 3]]), 3)


def test_image_files_skip_hidden_and_other_files(tmp_path):
    for name in ("b.png", "a.TIF", "._a.TIF", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.TIF", "b.png"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_pixels_are_refused_with_file_and_place(tmp_path, bad):
    stack = np.zeros((3, 9, 7), np.float32)
    stack[2, 4, 5] = stack[2, 6, 1] = bad
    write_image(tmp_path / "vol.tif", stack)
    with pytest.raises(ValueError, match=r"vol.tif holds 2 NaN or infinite pixel values \(the "
                                         r"first at slice 2, row 4, column 5\)"):
        read_image(tmp_path / "vol.tif")
    write_image(tmp_path / "one.tif", stack[2])
    with pytest.raises(ValueError, match=r"one.tif .*first at row 4, column 5\)"):
        read_slices(tmp_path / "one.tif", as_label=True)


def test_standardize(rng):
    image = rng.random((13, 17)) * 40 + 3
    s = standardize(image)
    assert s.dtype == np.float32 and s.shape == (13, 17)
    assert abs(float(s.mean())) < 1e-5 and abs(float(s.std()) - 1) < 1e-4
    np.testing.assert_allclose(standardize(s), s, atol=1e-5)        # idempotent
    np.testing.assert_array_equal(standardize(np.full((4, 5), 7.0)), np.zeros((4, 5)))
    image[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        standardize(image)
