"""Train a U-Net the way the paper does (Section 3): one large tile per step, SGD with momentum
0.99, the weighted softmax cross-entropy of eq. 1 with the weight map of eq. 2, elastic
deformations, dropout at the end of the contracting path.

    python -m minunet.train                          # synthetic EM-like data, best device, ~5 min on 2 CPU cores
    python -m minunet.train --data DIR [--val-data DIR] [--instances] --out runs/mine
    python -m minunet.train --out runs/mine --resume # continue an interrupted run exactly

Every run writes into ``--out``: ``checkpoint.npz`` (atomically, every ``--checkpoint-every``
iterations, on Ctrl-C and at the end), ``log.csv`` (one row per iteration), ``metrics.json``
(validation IoU, pixel/Rand/warping error, final loss), ``loss.png`` and ``prediction.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import functional as F
from .autograd import no_grad
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .cli import EXIT_FAILED, EXIT_OK, check_tile, device_arg, run
from .data.io import standardize
from .devices import resolve_device
from .inference import predict_probabilities
from .nn import UNet
from .optim import SGD
from .tensor import Tensor

EXIT_INTERRUPTED = 130


# ---- arguments ---------------------------------------------------------------------------------
DEFAULT_TILE_AT_LEAST = 340
# The loss is the mean of w(x) times the cross-entropy, so its gradient grows with the weights.
# Eq. 2's border weights (up to w0 + w_c ~ 12 on the gaps) made lr 0.002 diverge on the built-in
# touching cells after ~300 steps; 0.001 trained (IoU 0.93 in 6 min on 2 cores).
DEFAULT_LR = 0.002
DEFAULT_LR_BORDER_WEIGHTS = 0.001


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.train",
                                description="Train a U-Net (Ronneberger et al. 2015) with minunet.")
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="folder with images/ and labels/ (default: "
                      "built-in synthetic data)")
    data.add_argument("--val-data", metavar="DIR", help="validation folder (default: hold out "
                      "--val-fraction of --data, or fresh synthetic images)")
    data.add_argument("--val-fraction", type=float, default=0.2)
    data.add_argument("--instances", action="store_true", help="labels are instance masks (0 = "
                      "background, 1..K = cells): separate touching cells, add border weights")
    data.add_argument("--synthetic", choices=("em", "cells"), default="em",
                      help="built-in data when --data is not given: EM membranes (ISBI 2012-like) "
                      "or touching cells with instance labels (cell tracking-like)")
    data.add_argument("--synthetic-count", type=int, default=24, help="synthetic training images")
    data.add_argument("--synthetic-size", type=int, default=256)
    data.add_argument("--w0", type=float, default=10.0, help="border weight w0 of eq. 2")
    data.add_argument("--sigma", type=float, default=5.0, help="border width sigma of eq. 2 (px)")
    data.add_argument("--no-weights", action="store_true", help="w(x) = 1 everywhere (ablation)")
    data.add_argument("--no-augment", action="store_true", help="no elastic deformation etc.")
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, emu or auto")
    model.add_argument("--base-channels", type=int, default=16, help="64 in the paper")
    model.add_argument("--depth", type=int, default=4, help="number of poolings (4 in the paper)")
    model.add_argument("--dropout", type=float, default=0.5)
    model.add_argument("--tile", type=int, default=None, help="input tile side, a valid U-Net "
                       "input size (default: the smallest valid size >= 340: 348 -> 164 for "
                       "depth 4)")
    model.add_argument("--batch-size", type=int, default=1, help="1 large tile, as the paper")
    model.add_argument("--lr", type=float, default=None, help=f"learning rate (default "
                       f"{DEFAULT_LR}, or {DEFAULT_LR_BORDER_WEIGHTS} with the border weights of "
                       "--instances or --synthetic cells)")
    model.add_argument("--momentum", type=float, default=0.99)
    model.add_argument("--iterations", type=int, default=1500)
    model.add_argument("--max-minutes", type=float, default=4.5, help="wall-clock budget: stop, "
                       "validate and save when it is spent (0 = no limit)")
    model.add_argument("--seed", type=int, default=0)
    run_ = p.add_argument_group("output")
    run_.add_argument("--out", default="runs/train", help="output folder")
    run_.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.npz")
    run_.add_argument("--checkpoint-every", type=int, default=100)
    run_.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ---- data --------------------------------------------------------------------------------------
def load_data(args):
    """(train samples, validation samples, one-line description); see minunet.data.dataset.Sample."""
    from .data import dataset

    weights = dict(w0=args.w0, sigma=args.sigma)
    if args.data:
        train = dataset.load_folder(args.data, instances=args.instances, **weights)
        if args.val_data:
            val = dataset.load_folder(args.val_data, instances=args.instances, **weights)
        else:
            train, val = dataset.split_train_val(train, args.val_fraction, args.seed)
        what = f"{len(train)} training / {len(val)} validation slices from {args.data}"
    else:
        n_val = max(2, args.synthetic_count // 6)
        train = dataset.synthetic_samples(args.synthetic, args.synthetic_count,
                                          args.synthetic_size, seed=args.seed, **weights)
        val = dataset.synthetic_samples(args.synthetic, n_val, args.synthetic_size,
                                        seed=args.seed + 10_000, **weights)
        what = (f"synthetic {args.synthetic} data: {len(train)} training / {len(val)} validation "
                f"images of {args.synthetic_size}x{args.synthetic_size}")
    if args.no_weights:
        for sample in train:
            sample.weight = np.ones_like(sample.weight)
    return train, val, what


def training_batch(sampler, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch of augmented tiles, each standardised *after* augmentation. The order matters:
    the gray-value variation (a gamma curve) works on intensities in [0, 1], as the loaders give
    them, and would clip a standardised image's negative half to 0. Standardising last also makes
    the network see what prediction gives it (a standardised image); linear gray-value changes then
    cancel out, and the gamma curve is what remains of that augmentation."""
    xs, targets, weights = sampler.batch(batch_size)
    return np.stack([standardize(x) for x in xs]), targets, weights


# ---- validation --------------------------------------------------------------------------------
def validate(model: UNet, samples, tile: int, device: str) -> tuple[dict, list]:
    """Mean metrics over the validation images, and the probability maps."""
    from .metrics import evaluate_all

    model.eval()
    results, probs = [], []
    for sample in samples:
        prob = predict_probabilities(model, sample.image, tile, device)[1]
        probs.append(prob)
        results.append(evaluate_all(prob, sample.target > 0))
    model.train()
    keys = results[0].keys()
    return {k: float(np.mean([r[k] for r in results])) for k in keys}, probs


# ---- the loop ----------------------------------------------------------------------------------
class _InterruptFlag:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once (the last
    periodic checkpoint is still intact, since every save is atomic)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def default_lr(args) -> float:
    """The learning rate when --lr is not given: smaller when eq. 2's border weights are on."""
    border_weights = (args.instances or (not args.data and args.synthetic == "cells")) \
        and not args.no_weights
    return DEFAULT_LR_BORDER_WEIGHTS if border_weights else DEFAULT_LR


def _check_args(args) -> None:
    for name in ("iterations", "base_channels", "depth", "batch_size", "checkpoint_every",
                 "synthetic_count"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.max_minutes < 0:
        raise ValueError(f"--max-minutes must be >= 0, got {args.max_minutes}")
    if args.data and not Path(args.data).is_dir():
        raise ValueError(f"--data folder {args.data} does not exist; give a folder with images/ and labels/")
    if args.val_data and not Path(args.val_data).is_dir():
        raise ValueError(f"--val-data folder {args.val_data} does not exist")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")


def _write_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["iteration", "loss", "seconds"])
        writer.writeheader()
        writer.writerows(rows)


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [dict(iteration=int(r["iteration"]), loss=float(r["loss"]), seconds=float(r["seconds"]))
                for r in csv.DictReader(f) if int(r["iteration"]) <= upto]


def train(args) -> int:
    from .data.dataset import TileSampler

    if args.lr is None:
        args.lr = default_lr(args)
    _check_args(args)
    device = resolve_device(args.device)
    out_dir = Path(args.out)
    ckpt_path = out_dir / "checkpoint.npz"
    # "We favor large input tiles over a large batch size" (Section 3). Larger tiles also keep
    # more of each step's work in big matrix products: measured on a 2-core CPU in the default
    # 4.5 minutes, a 348 tile (164 x 164 output) reached validation IoU 0.914 where a 300 tile
    # (116 x 116) reached 0.890, although it made 999 steps instead of 1480.
    tile = args.tile if args.tile is not None else UNet.valid_input_size(DEFAULT_TILE_AT_LEAST, args.depth)
    out_size = check_tile(tile, args.depth)
    train_samples, val_samples, what = load_data(args)

    resumed = None
    if args.resume:
        resumed = load_checkpoint(ckpt_path)
        model = model_from_checkpoint(resumed, device)
        if model.config["base_channels"] != args.base_channels or model.depth != args.depth:
            raise ValueError(f"--resume: {ckpt_path} holds a U-Net with base_channels="
                             f"{model.config['base_channels']}, depth={model.depth}; pass the same "
                             f"--base-channels/--depth or a new --out")
    else:
        in_channels = 1
        num_classes = max(2, max(int(s.target.max()) for s in train_samples) + 1)
        model = UNet(in_channels=in_channels, num_classes=num_classes,
                     base_channels=args.base_channels, depth=args.depth, dropout=args.dropout,
                     seed=args.seed, device=device)
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    rng = np.random.default_rng(args.seed)
    start, elapsed_before = 0, 0.0
    if resumed is not None:
        if resumed["optimizer"] is not None:
            optimizer.load_state_dict(resumed["optimizer"])
        meta = resumed["meta"]
        rng.bit_generator.state = meta["rng_state"]
        start, elapsed_before = int(meta["iteration"]), float(meta.get("elapsed", 0.0))
    sampler = TileSampler(train_samples, tile, out_size, rng, augment=not args.no_augment)
    log_rows = _read_log(out_dir / "log.csv", start) if resumed else []
    out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint(iteration: int, elapsed: float) -> None:
        save_checkpoint(ckpt_path, model, optimizer, meta={
            "iteration": iteration, "elapsed": elapsed, "rng_state": rng.bit_generator.state,
            "tile": tile, "args": {k: v for k, v in vars(args).items() if k != "resume"}})
        _write_log(out_dir / "log.csv", log_rows)

    print(f"minunet.train: {what}; U-Net base {model.config['base_channels']}, depth {model.depth}, "
          f"tile {tile} -> {out_size}, device {device}"
          + (f"; resuming at iteration {start}" if resumed else ""), flush=True)
    budget = args.max_minutes * 60.0 if args.max_minutes > 0 else math.inf
    from tqdm import tqdm

    bar = tqdm(total=args.iterations, initial=start, disable=args.quiet, unit="it",
               dynamic_ncols=True, file=sys.stdout)
    t0 = time.perf_counter()
    iteration, status, message = start, EXIT_OK, ""
    with _InterruptFlag() as interrupt:
        while iteration < args.iterations:
            xs, targets, weights = training_batch(sampler, args.batch_size)
            x, target, weight = (Tensor(a, device=device) for a in (xs, targets, weights))
            loss = F.weighted_cross_entropy(model(x), target, weight)
            value = loss.item()
            if not math.isfinite(value):
                status = EXIT_FAILED
                message = (f"error: the loss became {value} at iteration {iteration + 1}; training "
                           f"stopped and the last good checkpoint {ckpt_path} is kept; lower --lr "
                           f"and continue with --resume")
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            iteration += 1
            elapsed = elapsed_before + time.perf_counter() - t0
            log_rows.append({"iteration": iteration, "loss": value, "seconds": round(elapsed, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if iteration % args.checkpoint_every == 0:
                checkpoint(iteration, elapsed)
            if interrupt.raised:
                checkpoint(iteration, elapsed)
                status = EXIT_INTERRUPTED
                message = (f"interrupted at iteration {iteration}; checkpoint saved to {ckpt_path}; "
                           f"continue with: python -m minunet.train --out {out_dir} --resume")
                break
            if elapsed >= budget:
                message = f"time budget of {args.max_minutes} min spent at iteration {iteration}"
                break
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    if status == EXIT_FAILED:
        print(message, file=sys.stderr)
        return status
    if status == EXIT_OK:
        checkpoint(iteration, elapsed)
    if message:
        print(message, flush=True)
    if status == EXIT_INTERRUPTED:
        return status
    return finish(args, model, val_samples, tile, device, out_dir, log_rows, iteration, elapsed)


def finish(args, model, val_samples, tile, device, out_dir: Path, log_rows, iteration, elapsed) -> int:
    """Validate, write metrics.json and the plots, print a summary."""
    from .plots import plot_loss_curve, plot_prediction

    metrics, probs = validate(model, val_samples, tile, device)
    recent = [r["loss"] for r in log_rows[-50:]]
    metrics["loss"] = float(np.mean(recent)) if recent else float("nan")
    metrics.update(iterations=iteration, seconds=round(elapsed, 1), device=device, tile=tile)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if log_rows:
        plot_loss_curve([r["iteration"] for r in log_rows], [r["loss"] for r in log_rows],
                        out_dir / "loss.png")
    first = val_samples[0]
    plot_prediction(first.image, first.target, probs[0], first.weight, out_dir / "prediction.png",
                    title=f"validation image 0: IoU {metrics['iou']:.3f}")
    print(f"validation: IoU {metrics['iou']:.4f}, pixel error {metrics['pixel_error']:.4f}, "
          f"Rand error {metrics['rand_error']:.4f}, warping error {metrics['warping_error']:.5f}; "
          f"{iteration} iterations in {elapsed / 60:.1f} min; wrote {out_dir}/", flush=True)
    return EXIT_OK


def main(argv=None) -> int:
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run(main))
