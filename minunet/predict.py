"""Overlap-tile prediction of arbitrarily large images (paper Fig. 2).

    python -m minunet.predict --checkpoint runs/train/checkpoint.npz image.tif [more images...] --out preds/

The image is mirror-padded by the network's border margin, cut into valid input tiles whose
outputs tile the image seamlessly, and each tile is predicted with the valid-convolution U-Net
(no padding inside the network, so a tile's output depends only on real or mirrored context).
For each input ``NAME`` it writes ``NAME_prob.tif`` (float32 foreground probability, one page per
slice of a stack) and ``NAME_mask.png`` / ``NAME_mask.tif`` (uint8, 255 = foreground).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint, model_from_checkpoint
from .cli import device_arg, run
from .devices import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.predict",
                                description="Overlap-tile prediction with a trained minunet U-Net.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG or TIFF images (a multi-page "
                   "TIFF is a stack of 2-D slices)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.npz written by minunet.train")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--tile", type=int, default=None, help="input tile side, a valid U-Net input "
                   "size (default: the one used in training); larger tiles are faster")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground probability for the mask")
    return p


def main(argv=None) -> int:
    from .data.io import read_image, write_image
    from .train import predict_probabilities

    args = build_parser().parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    ckpt = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = model_from_checkpoint(ckpt, device).eval()
    tile = args.tile if args.tile is not None else int(ckpt["meta"].get("tile", 572))
    model.output_size(tile)  # ValueError naming the nearest valid sizes
    paths = [Path(p) for p in args.inputs]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input {path} does not exist; give PNG or TIFF image files")
    stacks = [read_image(p) for p in paths]        # read all first: fail before writing anything
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, stack in zip(paths, stacks):
        probs = np.stack([predict_probabilities(model, img, tile, device)[1] for img in stack])
        masks = (probs >= args.threshold).astype(np.uint8) * 255
        write_image(out / f"{path.stem}_prob.tif", probs if len(probs) > 1 else probs[0])
        if len(masks) == 1:
            write_image(out / f"{path.stem}_mask.png", masks[0])
        else:
            write_image(out / f"{path.stem}_mask.tif", masks)
        print(f"{path} -> {out / (path.stem + '_prob.tif')} ({len(probs)} slice(s) of "
              f"{probs.shape[1]}x{probs.shape[2]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
