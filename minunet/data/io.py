"""Reading and writing images: PNG (Pillow) and TIFF (tifffile), 8- or 16-bit, gray or RGB.

A file holds one or more 2-D *slices*: a PNG is one slice, a multi-page TIFF (like ISBI 2012's
train-volume.tif, 30 pages of 512x512) is a stack of them. Raw images become float32 in [0, 1]
by *per-slice* min/max normalisation: microscopes often use a small part of the 16-bit range, so
dividing by the dtype's maximum would leave images nearly black, and per-slice scaling also
evens out exposure differences between frames. The network then sees each image standardised
(:func:`standardize`). Label images keep their integer values. A NaN or infinite pixel is
refused when a file is read: per-image normalisation would spread it over the whole image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TIFF_SUFFIXES = (".tif", ".tiff")
# ITU-R BT.601 luma, the weights Pillow's RGB -> L conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114])


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted by name: known suffixes only, hidden files (such as
    macOS's ``._name.png`` metadata) skipped. Every command pairs files by this order."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3 or 4) RGB(A) -> (..., H, W) float64 luma; alpha is ignored."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Rescale one slice to [0, 1] by its own min and max; a constant slice becomes all zeros.

    Returns float32 of the input's shape."""
    image = np.asarray(image, np.float64)
    lo, hi = image.min(), image.max()
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def standardize(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per image (float32), what the network sees in training and
    prediction alike. The U-Net has no normalisation layers, so a centred input keeps the first
    layers' pre-activations centred too, which speeds up SGD. Idempotent: standardising twice
    gives the same image. Raises ValueError for NaN or infinite values, which would turn every
    pixel of the result into NaN."""
    image = np.asarray(image, np.float32)
    bad = image.size - int(np.count_nonzero(np.isfinite(image)))
    if bad:
        raise ValueError(f"the image holds {bad} NaN or infinite values; replace them (for "
                         "example with the image's median) or crop them away")
    return (image - image.mean()) / (image.std() + 1e-6)


def _refuse_non_finite(stack: np.ndarray, path: Path) -> None:
    """One line naming the file, how many pixels and where the first one is."""
    if stack.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(stack)
    if not bad.any():
        return
    first = np.argwhere(bad)[0]
    where = f"row {first[1]}, column {first[2]}"
    if len(stack) > 1:
        where = f"slice {first[0]}, " + where
    raise ValueError(f"image file {path} holds {int(bad.sum())} NaN or infinite pixel values "
                     f"(the first at {where}); replace them (for example with the image's median) "
                     "or crop them away")


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF as (S, H, W[, samples]) with the samples (colour) axis, if any, last."""
    with tifffile.TiffFile(path) as tif:
        array = tif.asarray()
        axes = tif.series[0].axes
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)
        return array.reshape((-1,) + array.shape[-3:])
    return array.reshape((-1,) + array.shape[-2:])


def _read_pillow(path: Path, as_label: bool) -> np.ndarray:
    """A PNG/JPEG/BMP as (1, H, W[, channels]). Palette images: indices for labels (they are the
    class ids), RGB colours for images."""
    with Image.open(path) as img:
        if img.mode == "P":
            img = img if as_label else img.convert("RGB")
        elif img.mode in ("LA", "PA"):
            img = img.convert("L") if img.mode == "LA" else img.getchannel(0)
        elif img.mode in ("CMYK", "YCbCr", "HSV", "LAB", "1"):
            img = img.convert("RGB" if img.mode != "1" else "L")
        array = np.asarray(img)
    return array[None]


def read_slices(path: str | Path, as_label: bool = False) -> list[np.ndarray]:
    """All 2-D slices of an image file, colour converted to gray, values not rescaled.

    Args:
        path: a .png / .tif / .tiff (also .jpg, .bmp) file.
        as_label: for label images, a colour image is accepted only if its channels are equal
            (a gray image saved as RGB) -- mixing colours into luma would corrupt class ids.
    Returns:
        list of 2-D arrays (H, W) in the file's dtype (gray luma as float64 for colour images).
    Raises:
        ValueError (one line naming the file) if it cannot be read or holds NaN or infinite
        values.
    """
    path = Path(path)
    try:
        stack = _read_tiff(path) if path.suffix.lower() in _TIFF_SUFFIXES \
            else _read_pillow(path, as_label)
    except Exception as error:  # any decoder failure: report the file, not a deep traceback
        raise ValueError(f"cannot read image file {path}: {error}; check that it is a valid "
                         f"PNG or TIFF") from None
    if stack.ndim == 4:  # colour: (S, H, W, channels)
        if stack.shape[-1] == 1:
            stack = stack[..., 0]
        elif stack.shape[-1] in (3, 4) and not as_label:
            stack = rgb_to_gray(stack)
        elif stack.shape[-1] in (3, 4) and np.all(stack[..., :3] == stack[..., :1]):
            stack = stack[..., 0]
        else:
            raise ValueError(f"label image {path} has {stack.shape[-1]} differing colour "
                             f"channels; save labels as single-channel gray or indexed images")
    if stack.ndim != 3 or stack.shape[1] == 0 or stack.shape[2] == 0:
        raise ValueError(f"image file {path} has unsupported shape {stack.shape}; expected 2-D "
                         "slices (a gray or RGB image, or a multi-page TIFF stack)")
    _refuse_non_finite(stack, path)
    return list(stack)


def read_image(path: str | Path) -> list[np.ndarray]:
    """The slices of a raw image file, each float32 (H, W) in [0, 1] (per-slice min/max)."""
    return [normalize_intensity(s) for s in read_slices(path, as_label=False)]


def labels_to_classes(label: np.ndarray, num_classes: int | None = None,
                      source: str = "label") -> np.ndarray:
    """Label image -> int32 class indices. A binary mask stored as {0, 255} (8-bit, ISBI's black
    and white) or {0, 65535} (16-bit) becomes {0, 1}; any other values are class indices already.

    Args:
        num_classes: the number of classes K; values must then lie in 0..K-1. None: any
            non-negative integers (the caller counts the classes).
        source: names the label in error messages (the label file, not its image).
    Raises ValueError naming `source` for negative, fractional or out-of-range values."""
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(label == np.round(label)):
            raise ValueError(f"{source} holds fractional values; label images must hold "
                             "integer class indices (or 0/255)")
    if label.dtype == bool:
        return label.astype(np.int32)
    values = np.unique(label)
    for white in (255, 65535):
        if values.size and values.max() == white and set(values.tolist()) <= {0, white}:
            label = label // white
            values = np.unique(label)
            break
    if values.size and values.min() < 0:
        raise ValueError(f"{source} has negative values {values[values < 0][:8].tolist()}; class "
                         "indices are 0, 1, 2, ... (or 0/255 for a binary mask)")
    if num_classes is not None and values.size and values.max() >= num_classes:
        raise ValueError(f"{source} has values {values[:8].astype(np.int64).tolist()} outside "
                         f"0..{num_classes - 1}; instance masks (one value per cell) need "
                         f"--instances; otherwise use {{0, 255}} for a binary mask or class "
                         f"indices 0..{num_classes - 1}, or raise the number of classes "
                         "(--num-classes)")
    return label.astype(np.int32)


def write_image(path: str | Path, array: np.ndarray, palette=None) -> None:
    """Write one 2-D array (or a (S, H, W) stack as a multi-page TIFF).

    * .tif / .tiff: any numeric dtype as is (float32 probability maps, 16-bit masks, stacks).
    * .png: bool (written as 0/255, so it reads back as {0, 1}), uint8 or uint16 2-D arrays as
      they are; other integer arrays are written as uint8/uint16 when their values fit.
      `palette`: (n, 3) uint8 RGB colours (:func:`class_palette`) make an indexed PNG of a uint8
      array: viewers show the colours, readers (and :func:`read_slices` with ``as_label``) get
      the values back unchanged.
    Parent folders are created. Raises ValueError for a PNG of floats or out-of-range values.
    """
    path = Path(path)
    array = np.asarray(array)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in _TIFF_SUFFIXES:
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        # Gray pages: without this, tifffile would store a (3, H, W) stack as one RGB image.
        tifffile.imwrite(path, array, photometric="minisblack")
        return
    if suffix != ".png":
        raise ValueError(f"cannot write {path}: use a .png (masks) or .tif (probability maps) name")
    if array.ndim != 2:
        raise ValueError(f"cannot write shape {array.shape} to PNG {path}; a PNG holds one 2-D "
                         "slice, use .tif for stacks")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype in (np.uint8, np.uint16):
        pass                       # as they are: a uint16 label image stays 16-bit
    elif array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"values of {path} do not fit a 16-bit PNG; write a .tif instead")
        array = array.astype(np.uint8 if array.size == 0 or array.max() <= 255 else np.uint16)
    else:
        raise ValueError(f"cannot write {array.dtype} values to PNG {path}; write float "
                         "probability maps to a .tif, or convert masks to uint8")
    image = Image.fromarray(array)
    if palette is not None:
        if array.dtype != np.uint8:
            raise ValueError(f"a palette PNG holds at most 256 values; write {path} without one")
        image = image.convert("L") if image.mode != "L" else image
        image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())   # mode "P" now
    image.save(path)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours for a class map: class 0 (background) black, the others
    bright hues spread around the colour wheel by the golden angle, so neighbouring class
    indices get clearly different colours for any number of classes."""
    import colorsys

    colours = [(0, 0, 0)] + [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 1.0)
                             for k in range(num_classes - 1)]
    return (np.array(colours) * 255).round().astype(np.uint8)
