"""Training samples: loading a data folder, the validation split, and random training tiles.

A *sample* is one 2-D slice with its target classes and its per-pixel loss weights (eq. 2).
:class:`TileSampler` cuts training examples for a valid-convolution U-Net out of samples:
an input tile of `input_size` with the label and weight of its central `output_size` square,
mirroring the image where the tile leaves it (Fig. 2), augmented as in Section 3.1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from minunet.data.elastic import random_augment, random_gray_values, random_transform, spline_matrix
from minunet.data.io import IMAGE_SUFFIXES, image_files, labels_to_classes, read_image, read_slices
from minunet.data.synthetic import cell_images, em_images
from minunet.data.tiling import mirror_crop, reflect_indices
from minunet.data.weights import class_balance_weights, instance_targets


@dataclass
class Sample:
    """One training/evaluation slice.

    image: float32 (H, W) in [0, 1]. target: int32 (H, W) class indices (1 = cell / foreground).
    weight: float32 (H, W) loss weights. name: where it came from ("file.tif[3]").
    instances: int32 (H, W) instance ids (0 = background) when the labels were instances
    (kept for instance metrics such as SEG), else None.
    """
    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    name: str
    instances: np.ndarray | None = None


def make_sample(image: np.ndarray, label: np.ndarray, name: str, instances: bool = False,
                num_classes: int | None = None, w0: float = 10.0, sigma: float = 5.0,
                label_name: str | None = None) -> Sample:
    """Build a :class:`Sample` from one image slice and its label slice.

    Args:
        image: float (H, W) in [0, 1].
        label: semantic labels ({0, 255}, {0, 65535} or class indices), or with `instances=True`
            an instance mask (0 background, 1..K cells). An instance mask with a single non-zero
            value (a binary mask) has its 4-connected components numbered as cells.
        instances: labels are instances: target = cells after separate_touching, weight = the
            paper's eq. 2 (w0, sigma). Otherwise weight = class balancing only.
        num_classes: class indices must lie below it; None accepts any (the caller counts them
            with :func:`count_classes`). Instances always give 2 classes.
        label_name: names the label in error messages (default: "label <name>").
    """
    image = np.asarray(image, np.float32)
    label = np.asarray(label)
    label_name = label_name or f"label {name}"
    if image.shape != label.shape:
        raise ValueError(f"{name}: image size {image.shape} differs from label size "
                         f"{label.shape}; pair each image with a label of the same size")
    if not instances:
        target = labels_to_classes(label, num_classes, source=label_name)
        weight = class_balance_weights(target, num_classes)
        return Sample(image, target, weight, name)
    if num_classes not in (None, 2):
        raise ValueError(f"instance labels give 2 classes (cell, background), got "
                         f"num_classes={num_classes}; use num_classes=2 with instances")
    if label.dtype.kind not in "iub" or (label.size and label.min() < 0):
        raise ValueError(f"instance mask {label_name} must hold non-negative integer ids "
                         "(0 background, 1..K cells)")
    ids = label.astype(np.int64)
    if len(np.unique(ids[ids > 0])) == 1:
        ids = ndimage.label(ids > 0)[0]
    ids = ids.astype(np.int32)
    target, weight = instance_targets(ids, w0=w0, sigma=sigma)
    return Sample(image, target, weight, name, instances=ids)


# Without an explicit number of classes, labels with values up to 255 are far more likely a gray
# image saved as the label (or an anti-aliased mask) than 256 classes.
MAX_INFERRED_CLASSES = 16


def count_classes(samples: list) -> int:
    """The number of classes the samples' targets need: the largest class index + 1, at least 2."""
    return max([2] + [int(s.target.max()) + 1 for s in samples if s.target.size])


def load_folder(directory: str | Path, instances: bool = False, num_classes: int | None = None,
                w0: float = 10.0, sigma: float = 5.0) -> list[Sample]:
    """Load DIR/images and DIR/labels, paired by sorted file name, every slice a Sample.

    PNG or TIFF files, multi-page TIFFs being stacks of slices (the label file must then have as
    many pages). Images are normalised per slice to [0, 1]; labels {0, 255} or {0, 65535} become
    {0, 1}, other values are class indices (below `num_classes`; None counts them, refusing more
    than MAX_INFERRED_CLASSES); with `instances`, labels are instance masks (see
    :func:`make_sample`). Raises ValueError with one line naming the file and the fix for: a
    missing folder, missing images/ or labels/, no image files, unpaired files, unreadable files,
    NaN or infinite pixels, size mismatches, label values out of range.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist; pass a folder holding images/ "
                         "and labels/")
    folders = {}
    for part in ("images", "labels"):
        folders[part] = root / part
        if not folders[part].is_dir():
            raise ValueError(f"data folder {root} has no {part}/ subfolder; put the raw images in "
                             f"{root / 'images'} and the labels in {root / 'labels'}")
    image_paths, label_files = image_files(folders["images"]), image_files(folders["labels"])
    if not image_paths:
        raise ValueError(f"{folders['images']} holds no image files ({', '.join(IMAGE_SUFFIXES)});"
                         " add the training images there")
    if len(image_paths) != len(label_files):
        label_stems = {p.stem for p in label_files}
        image_stems = {p.stem for p in image_paths}
        unmatched = [p for p in image_paths if p.stem not in label_stems] + \
                    [p for p in label_files if p.stem not in image_stems]
        if not unmatched:  # same stems cannot explain different counts; name the first extra
            longer = image_paths if len(image_paths) > len(label_files) else label_files
            unmatched = longer[min(len(image_paths), len(label_files)):]
        raise ValueError(f"{len(image_paths)} image files but {len(label_files)} label files in "
                         f"{root}; {unmatched[0]} has no partner -- give every image one label "
                         "file (paired by sorted name)")
    samples = []
    for image_file, label_file in zip(image_paths, label_files):
        image_slices = read_image(image_file)
        label_slices = read_slices(label_file, as_label=True)
        if len(image_slices) != len(label_slices):
            raise ValueError(f"{image_file} has {len(image_slices)} slices but {label_file} has "
                             f"{len(label_slices)}; stacks must have one label page per image page")
        for k, (image, label) in enumerate(zip(image_slices, label_slices)):
            name = image_file.name if len(image_slices) == 1 else f"{image_file.name}[{k}]"
            if image.shape != label.shape:
                raise ValueError(f"{image_file} (slice {k}) is {image.shape} but {label_file} is "
                                 f"{label.shape}; image and label must have the same size")
            label_name = f"label file {label_file}"
            if len(label_slices) > 1:
                label_name += f" (slice {k})"
            sample = make_sample(image, label, name, instances=instances, num_classes=num_classes,
                                 w0=w0, sigma=sigma, label_name=label_name)
            if num_classes is None and count_classes([sample]) > MAX_INFERRED_CLASSES:
                raise ValueError(f"{label_name} has class values up to "
                                 f"{sample.target.max()}: instance masks (0 = background, one "
                                 "value per cell) need --instances; class labels are 0/255 masks "
                                 "or class indices 0, 1, 2, ... (give --num-classes if there "
                                 "really are that many)")
            samples.append(sample)
    return samples


def synthetic_samples(kind: str = "em", n: int = 30, size: int = 256, seed: int = 0,
                      w0: float = 10.0, sigma: float = 5.0) -> list[Sample]:
    """Samples from :mod:`minunet.data.synthetic`: kind "em" (membranes, class-balance weights,
    like ISBI 2012) or "cells" (touching instances, the paper's eq. 2 weights)."""
    if kind == "em":
        images, labels = em_images(n, size=size, seed=seed)
        return [make_sample(im, lb, f"em-{seed}-{k}") for k, (im, lb) in enumerate(zip(images, labels))]
    if kind == "cells":
        images, masks = cell_images(n, size=size, seed=seed)
        return [make_sample(im, m, f"cells-{seed}-{k}", instances=True, w0=w0, sigma=sigma)
                for k, (im, m) in enumerate(zip(images, masks))]
    raise ValueError(f"unknown synthetic data kind {kind!r}; use 'em' or 'cells'")


def split_train_val(samples: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """Random split into (train, validation), the validation part holding round(fraction * n)
    samples (at least 1 when fraction > 0). Deterministic for a seed; order within each part
    follows the input order. fraction = 0 gives ([...all...], [])."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(samples)
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * n)))
    if n_val >= n and n_val > 0:
        raise ValueError(f"cannot hold out {n_val} of {n} samples for validation and keep some for "
                         "training; lower the validation fraction or add data")
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [s for k, s in enumerate(samples) if k not in chosen]
    val = [s for k, s in enumerate(samples) if k in chosen]
    return train, val


class TileSampler:
    """Random training examples for a valid-convolution network.

    Each example: a sample chosen with probability proportional to its area, an output square
    of side `output_size` at a uniformly random position inside it (at 0 where the image is
    smaller), the input tile of side `input_size` around it (mirrored where it leaves the
    image), and the label and weight of the output square.

    With `augment`, a region large enough for any rotation, shift and elastic displacement is
    cut around the tile first (mirroring beyond the image), deformed by
    :func:`minunet.data.elastic.random_augment`, and the tile taken from its centre: the tile
    never shows the deformation's own border artefacts.

    Args:
        samples: list of :class:`Sample`.
        input_size, output_size: the network's tile sizes ((input - output) even, >= 0).
        rng: numpy.random.Generator; the sequence of examples is reproducible from it.
        augment: apply Section 3.1's augmentation.
        elastic_std, grid, max_shift, gray: passed to random_augment.
        device: where the augmentation resamples. None (the default): scipy on the host
            (:func:`random_augment` on a mirrored region around the tile, the oracle). "cpu",
            "cuda" or "emu": the device's ``resample`` (minunet/ops/resample.py: the Numba
            kernel, or kernels/resample.cu), reading the slice directly through the same
            coordinates, from spline coefficients computed once per slice; the examples are
            then that device's arrays. The random numbers are drawn on the host in the same
            order either way, so the sequence of examples is the same; the pixels agree with
            the scipy path within tests/test_data_elastic.py's tolerance.
    """

    def __init__(self, samples: list, input_size: int, output_size: int,
                 rng: np.random.Generator, augment: bool = True, *, elastic_std: float = 10.0,
                 grid: int = 3, max_shift: float = 0.0, gray: bool = True,
                 device: str | None = None):
        if not samples:
            raise ValueError("TileSampler needs at least one sample; check the data folder")
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
        if output_size < 1 or input_size < output_size or (input_size - output_size) % 2:
            raise ValueError(f"need input_size >= output_size >= 1 with an even difference, got "
                             f"{input_size} and {output_size}; use UNet.output_size(input_size)")
        self.samples = samples
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.margin = (self.input_size - self.output_size) // 2
        self.rng = rng
        self.augment = augment
        self.augment_options = dict(elastic_std=elastic_std, grid=grid, max_shift=max_shift,
                                    gray=gray)
        # Room around the input tile for the augmentation's source coordinates: a rotated tile
        # reaches sqrt(2)/2 of its side from the centre; shifts and displacements (4 std covers
        # the Gaussian, and the cubic interpolation between nodes stays within it) add to that.
        self.extra = int(np.ceil(self.input_size * (np.sqrt(2.0) - 1.0) / 2.0
                                 + max_shift + 4.0 * elastic_std)) + 2
        areas = np.array([s.image.size for s in samples], np.float64)
        self.probabilities = areas / areas.sum()
        if device not in (None, "cpu", "cuda", "emu"):
            raise ValueError(f"TileSampler device must be None (scipy), 'cpu', 'cuda' or 'emu', "
                             f"got {device!r}")
        self.device = device
        self._on_device = {}   # sample index -> (spline coefficients, target, weight) on device
        self._splines = {}     # (tile size, grid) -> the elastic spline matrix on device

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One example: (x float32 (1, input, input), target int32 (output, output),
        weight float32 (output, output))."""
        index = self.rng.choice(len(self.samples), p=self.probabilities)
        s = self.samples[index]
        h, w = s.image.shape
        top = int(self.rng.integers(0, max(h - self.output_size, 0) + 1))
        left = int(self.rng.integers(0, max(w - self.output_size, 0) + 1))
        m, out = self.margin, self.output_size
        if not self.augment:
            x = mirror_crop(s.image, top - m, left - m, self.input_size, self.input_size)
            target = mirror_crop(s.target, top, left, out, out)
            weight = mirror_crop(s.weight, top, left, out, out)
            return x[None].astype(np.float32), target.astype(np.int32), weight.astype(np.float32)
        side = self.input_size + 2 * self.extra
        if self.device is not None:
            return self._device_sample(index, top - m - self.extra, left - m - self.extra, side)
        region = [mirror_crop(a, top - m - self.extra, left - m - self.extra, side, side)
                  for a in (s.image, s.target, s.weight)]
        x, target, weight = random_augment(*region, rng=self.rng,
                                           out_shape=(self.input_size, self.input_size),
                                           **self.augment_options)
        centre = (slice(m, m + out), slice(m, m + out))
        return x[None], target[centre].astype(np.int32), weight[centre].astype(np.float32)

    def _device_sample(self, index: int, top: int, left: int, side: int):
        """The augmented example of :meth:`sample` on the device: the host draws the transform's
        ~20 random numbers (the same ones, in the same order, as the scipy path), the device
        composes them into the coordinate map (``compose_coordinates``), reads the slice through
        it (``resample``: the region of `side` x `side` pixels at (top, left) of the slice's
        mirror extension is never copied; the kernel reads the slice at origin (top, left) + the
        region's coordinates) and varies the gray values (``gray_values``). No array is built on
        the host per example."""
        from minunet.backends import get_backend
        from minunet.devices import to_device_array

        s = self.samples[index]
        options = self.augment_options
        backend = get_backend(self.device)
        transform = random_transform(self.rng, max_shift=options["max_shift"],
                                     elastic_std=options["elastic_std"], grid=options["grid"])
        if index not in self._on_device:
            self._on_device[index] = tuple(to_device_array(a, self.device) for a in (
                spline_coefficients(s.image), s.target.astype(np.int32), s.weight.astype(np.float32)))
        coefficients, target, weight = self._on_device[index]
        size = self.input_size
        splines = (None, None)
        if transform.nodes is not None:
            key = (size, transform.nodes.shape[-1])
            if key not in self._splines:   # the spline weights depend only on the tile's size
                self._splines[key] = to_device_array(spline_matrix(*key), self.device)
            splines = (self._splines[key], self._splines[key])
        coords = backend.compose_coordinates((size, size), (side, side), transform.angle,
                                             (transform.flip_y, transform.flip_x), transform.shift,
                                             transform.nodes, *splines)
        x, target, weight = backend.resample(coefficients, target, weight, coords, (top, left),
                                             _window_range(s.image, top, left, side))
        if options["gray"]:
            x = backend.gray_values(x, *random_gray_values(self.rng), standardize=False)
        m, out = self.margin, self.output_size
        centre = (slice(m, m + out), slice(m, m + out))
        return x, target[centre], weight[centre]

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`batch_size` examples stacked: x (B, 1, input, input), target (B, output, output),
        weight (B, output, output) (arrays of ``device``, NumPy for None)."""
        examples = [self.sample() for _ in range(batch_size)]
        xp = np
        if self.device == "cuda" and self.augment:
            import cupy as xp
        return tuple(xp.stack(parts) for parts in zip(*examples))


def spline_coefficients(image: np.ndarray) -> np.ndarray:
    """(1, H, W) float32 cubic spline coefficients of a slice (minunet.ops.resample)."""
    from minunet.ops.resample import spline_coefficients as coefficients

    return coefficients(image)


def _window_range(image: np.ndarray, top: int, left: int, side: int) -> tuple[float, float]:
    """(min, max) of the side x side window at (top, left) of the image's mirror extension,
    without building it: the mirrored rows of a window form one contiguous range of the image's
    rows (neighbouring rows map to neighbouring rows), the same for the columns. What the scipy
    path clips the cubic interpolation to (the range of the region it resamples)."""
    rows = reflect_indices(top, side, image.shape[0])
    cols = reflect_indices(left, side, image.shape[1])
    window = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return float(window.min()), float(window.max())
