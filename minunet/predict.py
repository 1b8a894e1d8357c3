"""Overlap-tile prediction of arbitrarily large images (paper Fig. 2).

    python -m minunet.predict --checkpoint runs/train/checkpoint.npz image.tif [more images...] --out preds/

The image is mirror-padded by the network's border margin, cut into valid input tiles whose
outputs tile the image seamlessly, and each tile is predicted with the valid-convolution U-Net
(no padding inside the network, so a tile's output depends only on real or mirrored context).
The tile is chosen for each image (the cheapest valid tile within ``--memory-mb``, see
:func:`minunet.inference.choose_tile`), not taken from training; ``--tile`` fixes it.
For each input ``NAME`` it writes ``NAME_prob.tif`` (float32 foreground probability, i.e.
1 - P(class 0), one page per slice of a stack) and ``NAME_mask.png`` / ``NAME_mask.tif`` (uint8,
255 = foreground); a network with more than two classes also gets ``NAME_classes.png`` /
``.tif`` (the most probable class of each pixel).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint, model_from_checkpoint
from .cli import HelpFormatter, check_tile, device_arg, run
from .devices import resolve_device
from .inference import DEFAULT_MEMORY_MB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.predict", formatter_class=HelpFormatter,
                                description="Overlap-tile prediction with a trained minunet U-Net.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG or TIFF images (a multi-page "
                   "TIFF is a stack of 2-D slices)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.npz written by minunet.train")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, emu or auto")
    p.add_argument("--tile", type=int, default=None, help="input tile side, a valid U-Net input "
                   "size (default: chosen per image, the fastest tile within --memory-mb)")
    p.add_argument("--memory-mb", type=float, default=DEFAULT_MEMORY_MB, help="memory for one "
                   "tile's forward pass when the tile is chosen automatically")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground probability for the mask")
    return p


def _write_slices(path: Path, slices: np.ndarray) -> Path:
    """One slice as it is, a stack as a multi-page TIFF (PNG holds one slice only)."""
    from .data.io import write_image

    if len(slices) > 1 and path.suffix == ".png":
        path = path.with_suffix(".tif")
    write_image(path, slices if len(slices) > 1 else slices[0])
    return path


def main(argv=None) -> int:
    from .data.io import read_image
    from .inference import choose_tile, foreground_probability, predict_probabilities

    args = build_parser().parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not args.memory_mb > 0:
        raise ValueError(f"--memory-mb must be positive, got {args.memory_mb}")
    ckpt = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = model_from_checkpoint(ckpt, device).eval()
    if args.tile is not None:
        check_tile(args.tile, model.depth)
    paths = [Path(p) for p in args.inputs]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input {path} does not exist; give PNG or TIFF image files")
    stacks = [read_image(p) for p in paths]        # read all first: fail before writing anything
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, stack in zip(paths, stacks):
        height, width = stack[0].shape
        tile = args.tile or choose_tile(height, width, model.config, args.memory_mb)
        probs = [predict_probabilities(model, image, tile, device) for image in stack]
        foreground = np.stack([foreground_probability(p) for p in probs])
        written = [_write_slices(out / f"{path.stem}_prob.tif", foreground),
                   _write_slices(out / f"{path.stem}_mask.png",
                                 (foreground >= args.threshold).astype(np.uint8) * 255)]
        if model.config["num_classes"] > 2:
            dtype = np.uint8 if model.config["num_classes"] <= 256 else np.uint16
            classes = np.stack([p.argmax(axis=0) for p in probs]).astype(dtype)
            written.append(_write_slices(out / f"{path.stem}_classes.png", classes))
        print(f"{path} -> {', '.join(str(w) for w in written)} ({len(stack)} slice(s) of "
              f"{height}x{width}, tile {tile} -> {model.output_size(tile)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
