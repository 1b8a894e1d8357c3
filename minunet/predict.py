"""Overlap-tile prediction of arbitrarily large images (paper Fig. 2).

    python -m minunet.predict --checkpoint runs/train/checkpoint.npz image.tif [more images...] --out preds/

The image is mirror-padded by the network's border margin, cut into valid input tiles whose
outputs tile the image seamlessly, and each tile is predicted with the valid-convolution U-Net
(no padding inside the network, so a tile's output depends only on real or mirrored context).
The tile is chosen for each image (the cheapest valid tile within ``--memory-mb``, see
:func:`minunet.inference.choose_tile`), not taken from training; ``--tile`` fixes it.
For each input ``NAME`` it writes ``NAME_prob.tif`` (float32 foreground probability, i.e.
1 - P(class 0), one page per slice of a stack) and ``NAME_mask.png`` / ``NAME_mask.tif`` (uint8,
255 = foreground); a network with more than two classes also gets ``NAME_classes.png`` (the most
probable class of each pixel, an indexed PNG: the values are the class indices 0..K-1, shown in
colour; a stack gets a multi-page ``.tif`` of the indices). A network trained on instance masks
(``train --instances`` or ``--synthetic cells``) also gets ``NAME_instances.png``: the connected
components of the mask, 0 = background and 1..n one value per cell, a 16-bit PNG (a stack, or
more than 65,535 cells: a multi-page ``.tif``), which ``python -m minunet.evaluate`` scores
with the cell tracking challenge's SEG. ``--tta`` averages the prediction over the 8 flips and
rotations of each image (8 times the work). An output folder that already holds predictions of
these inputs is refused unless ``--overwrite`` is given.

Images larger than memory (README, "Large images")::

    python -m minunet.predict --checkpoint C huge.zarr --out probs.zarr [--mask mask.zarr]

With ``--out PATH.zarr`` the one INPUT (a Zarr array, 2-D or a 3-D stack of slices, or a TIFF of
any size, read piece by piece) is predicted block by block by Dask (:mod:`minunet.data.blocked`):
on local threads, or on a ``dask.distributed`` cluster with ``--scheduler ADDRESS``. The output
is a Zarr array of foreground probabilities chunked in the blocks (the input's chunks when they
are multiples of 2**depth), equal to one pass of the network over the whole image.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from .backends.kernels import PRECISIONS, set_precision
from .checkpoint import load_checkpoint, model_from_checkpoint
from .cli import CountBar, HelpFormatter, check_tile, device_arg, run
from .devices import resolve_device
from .inference import DEFAULT_MEMORY_MB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.predict", formatter_class=HelpFormatter,
                                description="Overlap-tile prediction with a trained minunet U-Net.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG or TIFF images (a multi-page "
                   "TIFF is a stack of 2-D slices); with --out PATH.zarr, one Zarr array or TIFF "
                   "of any size")
    p.add_argument("--checkpoint", required=True, help="checkpoint.npz written by minunet.train, "
                   "or the run folder (--out of train) that holds it")
    p.add_argument("--out", required=True, help="output folder; or PATH.zarr, a Zarr array of "
                   "foreground probabilities written block by block (large images)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, emu or auto")
    p.add_argument("--tile", type=int, default=None, help="input tile side, a valid U-Net input "
                   "size (default: chosen per image, the fastest tile within --memory-mb)")
    p.add_argument("--memory-mb", type=float, default=DEFAULT_MEMORY_MB, help="memory for one "
                   "tile's forward pass when the tile is chosen automatically")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground probability for the mask")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over the "
                   "8 flips and 90-degree rotations of each image, each undone before averaging "
                   "(8 times the work; in-memory prediction only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused "
                   "otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress report")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="for --device cuda or emu: "
                   "'tf32' lets the convolutions use tensor cores (like PyTorch's allow_tf32), "
                   "'fp32' is strict float32 (default: $MINUNET_PRECISION or fp32)")
    large = p.add_argument_group("large images (--out PATH.zarr)")
    large.add_argument("--chunk", type=int, default=None, help="block side in pixels, a multiple "
                       "of 2**depth of at least the tile's output; memory grows with it (default: "
                       "the input's chunks if at least 512, else 1024)")
    large.add_argument("--mask", metavar="PATH.zarr", default=None, help="also write the "
                       "thresholded mask there (uint8, 255 = foreground)")
    large.add_argument("--scheduler", metavar="ADDRESS", default=None, help="run on this "
                       "dask.distributed scheduler, e.g. tcp://10.0.0.1:8786 (every worker must "
                       "read INPUT and write --out at the same paths; default: local threads)")
    return p


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() == ".zarr" or (path / "zarr.json").is_file() or \
        (path / ".zarray").is_file()


def _foreground_block(block: np.ndarray) -> np.ndarray:
    """P(foreground) of one block of class probabilities, (K, h, w) or (1, K, h, w)."""
    from .inference import foreground_probability

    if block.ndim == 3:
        return foreground_probability(block)
    return foreground_probability(block[0])[None]


def _connect(address: str):
    """A dask.distributed client for the scheduler at `address`, or one line saying why not."""
    from distributed import Client

    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ValueError(f"cannot reach a Dask scheduler at {address} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); start one with "
                         "'dask scheduler' and 'dask worker ADDRESS', or omit --scheduler") \
            from None


def predict_large(args, model) -> int:
    """Blocked prediction of one Zarr array or TIFF into Zarr arrays (see the module docstring)."""
    from .data.blocked import (Geometry, choose_block_tile, default_chunk, predict_blocked,
                               stored_chunks)
    from .data.lazy_io import create_output, open_lazy, store_chunks, threshold_mask

    if len(args.inputs) != 1:
        raise ValueError(f"prediction into a Zarr array takes one INPUT, got {len(args.inputs)}; "
                         "run once per input")
    outputs = [Path(args.out)] + ([Path(args.mask)] if args.mask else [])
    for path in outputs:
        if path.suffix.lower() != ".zarr":
            raise ValueError(f"{path} must be a Zarr path ending in .zarr (blocked prediction "
                             "writes Zarr arrays)")
        if path.exists() and not args.overwrite:
            raise ValueError(f"output {path} already exists; choose another path or pass "
                             "--overwrite to replace it")
    image = open_lazy(args.inputs[0])
    chunk = args.chunk or default_chunk(stored_chunks(image) or (0, 0), model.depth)
    if args.tile is not None:
        check_tile(args.tile, model.depth)
    tile = args.tile or choose_block_tile(chunk, chunk, model.config, args.memory_mb)
    Geometry(model.depth, tile).check_chunk(chunk, "--chunk")
    client = _connect(args.scheduler) if args.scheduler else None   # Dask's default from now
    try:
        print(f"{args.inputs[0]}: {_describe(image.shape)}, intensity statistics (one "
              "pass)...", flush=True)
        probs = predict_blocked(image, model, tile, chunk)
        foreground = probs.map_blocks(_foreground_block, drop_axis=probs.ndim - 3,
                                      dtype=np.float32)
        targets = [(create_output(outputs[0], foreground.shape, foreground.chunksize, "f4",
                                  args.overwrite), None)]
        targets[0][0].attrs["minunet"] = {"checkpoint": str(args.checkpoint), "tile": tile,
                                          "chunk": chunk, "value": "P(foreground) = 1 - P(class 0)"}
        if args.mask:
            targets.append((create_output(outputs[1], foreground.shape, foreground.chunksize,
                                          "u1", args.overwrite),
                            functools.partial(threshold_mask, threshold=args.threshold)))
        count = store_chunks(foreground, targets, client, progress=not args.quiet)
    finally:
        if client is not None:
            client.close()
    print(f"{args.inputs[0]} -> {', '.join(str(p) for p in outputs)} ({count} chunks of {chunk}, "
          f"tile {tile} -> {model.output_size(tile)})", flush=True)
    return 0


def _describe(shape) -> str:
    """'512x512' for one 2-D image, '30 slices of 512x512' for a stack."""
    size = f"{shape[-2]}x{shape[-1]}"
    if len(shape) == 2 or shape[0] == 1:
        return size
    return f"{shape[0]} slices of {size}"


def _write_slices(path: Path, slices: np.ndarray, palette=None) -> Path:
    """One slice as it is, a stack as a multi-page TIFF (PNG holds one slice only)."""
    from .data.io import write_image

    if len(slices) > 1 and path.suffix == ".png":
        path = path.with_suffix(".tif")
    if len(slices) > 1:
        write_image(path, slices)
    else:
        write_image(path, slices[0], palette=palette if path.suffix == ".png" else None)
    return path


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint a --checkpoint value names: the file, or checkpoint.npz in a run folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "checkpoint.npz").is_file():
            raise ValueError(f"--checkpoint {path} is a folder without checkpoint.npz; give the "
                             "--out folder of a training run or its checkpoint.npz")
        return path / "checkpoint.npz"
    return path


def predicts_instances(ckpt: dict) -> bool:
    """Whether the checkpoint's run trained on instance masks (--instances, or the built-in
    touching cells), so that prediction writes instance labels."""
    args = (ckpt.get("meta") or {}).get("args") or {}
    return bool(args.get("instances")) or \
        (not args.get("data") and args.get("synthetic") == "cells")


def instance_labels(mask: np.ndarray) -> np.ndarray:
    """Instance labels of a (S, H, W) foreground mask: the connected components (4-connected,
    scipy.ndimage.label) of each slice, 0 = background and 1..n one value per cell. The network
    trained with eq. 2's border weights leaves a gap of background between touching cells, so
    each predicted interior is one component (paper Section 3, Fig. 3). uint16 when the
    labels fit, else uint32."""
    from scipy import ndimage

    labels = [ndimage.label(s)[0] for s in mask]
    top = max((int(lb.max()) for lb in labels), default=0)
    return np.stack(labels).astype(np.uint16 if top <= 65535 else np.uint32)


def output_names(stem: str, num_classes: int, instances: bool) -> list[str]:
    """Every file name prediction may write for an input named `stem` (either suffix)."""
    kinds = ["prob", "mask"] + (["classes"] if num_classes > 2 else []) + \
        (["instances"] if instances else [])
    return [f"{stem}_{kind}{suffix}" for kind in kinds for suffix in (".png", ".tif")]


def refuse_existing(out: Path, stems: list[str], num_classes: int, instances: bool) -> None:
    """Refuse to replace predictions already in `out` (as train and the Zarr path do)."""
    existing = [name for stem in stems for name in output_names(stem, num_classes, instances)
                if (out / name).exists()]
    if existing:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise ValueError(f"output {out} already holds predictions ({', '.join(existing[:3])}"
                         f"{more}); choose another --out or pass --overwrite to replace them")


def main(argv=None) -> int:
    from .data.io import class_palette, read_image
    from .inference import choose_tile, count_tiles, foreground_probability, \
        predict_probabilities

    args = build_parser().parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not args.memory_mb > 0:
        raise ValueError(f"--memory-mb must be positive, got {args.memory_mb}")
    if args.precision is not None:
        set_precision(args.precision)
    checkpoint = checkpoint_file(args.checkpoint)
    ckpt = load_checkpoint(checkpoint)
    device = resolve_device(args.device)
    model = model_from_checkpoint(ckpt, device).eval()
    num_classes, instances = model.config["num_classes"], predicts_instances(ckpt)
    print(f"minunet.predict: {len(args.inputs)} input(s), checkpoint {checkpoint} "
          f"({num_classes} classes{', instances' if instances else ''}), device {device}"
          + (", test-time augmentation (8 passes per image)" if args.tta else ""), flush=True)
    if Path(args.out).suffix.lower() == ".zarr":
        if args.tta:
            raise ValueError("--tta works on in-memory prediction only; leave it out with "
                             "--out PATH.zarr, or give an output folder")
        return predict_large(args, model)
    paths = [Path(p) for p in args.inputs]
    large = [f"--{k}" for k in ("chunk", "mask", "scheduler") if getattr(args, k)]
    if large or any(_is_zarr(p) for p in paths):
        what = ", ".join(large) if large else "a Zarr input"
        raise ValueError(f"{what} needs blocked prediction into a Zarr array: give --out PATH.zarr")
    if args.tile is not None:
        check_tile(args.tile, model.depth)
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input {path} does not exist; give PNG or TIFF image files")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the predictions")
    if not args.overwrite:
        refuse_existing(out, [p.stem for p in paths], num_classes, instances)
    stacks = [read_image(p) for p in paths]        # read all first: fail before writing anything
    out.mkdir(parents=True, exist_ok=True)
    for path, stack in zip(paths, stacks):
        height, width = stack[0].shape
        tile = args.tile or choose_tile(height, width, model.config, args.memory_mb)
        passes = len(stack) * (8 if args.tta else 1)
        with CountBar(passes * count_tiles(height, width, model, tile), f"predicting {path.name}",
                      "tile", enabled=not args.quiet) as bar:
            probs = [predict_probabilities(model, image, tile, device, tta=args.tta,
                                           progress=bar.update) for image in stack]
        foreground = np.stack([foreground_probability(p) for p in probs])
        mask = foreground >= args.threshold
        written = [_write_slices(out / f"{path.stem}_prob.tif", foreground),
                   _write_slices(out / f"{path.stem}_mask.png", mask.astype(np.uint8) * 255)]
        if num_classes > 2:
            dtype = np.uint8 if num_classes <= 256 else np.uint16
            classes = np.stack([p.argmax(axis=0) for p in probs]).astype(dtype)
            written.append(_write_slices(out / f"{path.stem}_classes.png", classes,
                                         class_palette(num_classes) if dtype == np.uint8 else None))
        if instances:
            labels = instance_labels(mask)
            name = f"{path.stem}_instances" + (".png" if labels.dtype == np.uint16 else ".tif")
            written.append(_write_slices(out / name, labels))
        print(f"{path} -> {', '.join(str(w) for w in written)} "
              f"({_describe((len(stack), height, width))}, tile {tile} -> {model.output_size(tile)}"
              + (f", {int(labels.max())} cells" if instances else "") + ")", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
