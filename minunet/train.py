"""Train a U-Net the way the paper does (Section 3): one large tile per step, SGD with momentum
0.99, the weighted softmax cross-entropy of eq. 1 with the weight map of eq. 2, elastic
deformations, dropout at the end of the contracting path.

    python -m minunet.train                          # synthetic EM-like data, best device, 4.5-min budget
    python -m minunet.train --data DIR [--val-data DIR] [--instances] --out runs/mine
    python -m minunet.train --out runs/mine --resume # continue an interrupted run exactly

Every run writes into ``--out``: ``checkpoint.npz`` (atomically, every ``--checkpoint-every``
iterations, on Ctrl-C and at the end), ``log.csv`` (one row per iteration), ``metrics.json``
(validation IoU, pixel/Rand/warping error, final loss), ``loss.png`` and ``prediction.png``.
The checkpoint stores the run's arguments: ``--resume`` restores them, so the run continues on
the same data with the same settings, and refuses an argument that contradicts them.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import queue
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import functional as F
from .checkpoint import (atomic_write, load_checkpoint, model_from_checkpoint,
                         remove_stale_temporary_files, save_checkpoint)
from .cli import (EXIT_FAILED, EXIT_OK, HelpFormatter, Progress, check_tile, device_arg,
                  given_options, run)
from .backends.kernels import PRECISIONS, set_precision
from .data.io import standardize
from .devices import resolve_device
from .inference import foreground_probability, predict_probabilities
from .nn import UNet
from .optim import SGD
from .tensor import Tensor

EXIT_INTERRUPTED = 130
# What the user is told about speed (README, "How long training takes"), both measured on an idle
# 2-core AVX-512 VM with the default run (base 16, depth 4, tile 348): the first compile of every
# CPU kernel (Numba), and the training rate in FLOP/s per core, data preparation included.
COMPILE_S_MEASURED = 12
STEP_FLOPS_PER_CORE = 85e9
PACE_AFTER_STEPS = 3     # steps timed (after the first) before the estimate is printed
SLOW_FACTOR = 3.0        # a step this many times the expected one: say why it may be slow
MIN_JUDGED_STEP_S = 0.05 # below this the step is overheads, not FLOPs: not judged

# ---- arguments ---------------------------------------------------------------------------------
DEFAULT_TILE_AT_LEAST = 340
# The loss is the mean of w(x) times the cross-entropy, so its gradient grows with the weights:
# with eq. 2's border weights (up to w0 + w_c on the gaps) the plain default step diverged on the
# built-in touching cells (see the README), so border weights get half of it.
DEFAULT_LR = 0.002
DEFAULT_LR_BORDER_WEIGHTS = 0.001
RUN_FILES = ("checkpoint.npz", "log.csv", "metrics.json", "loss.png", "prediction.png")
# What --resume takes from the command line rather than from the checkpoint: where the run is,
# what to do with it, how much to print, and how this machine runs it (threads, emulator mode). Of the restored arguments, these may be changed on
# resuming (train longer, lower a step size that made the loss NaN, move to another device); any
# other that is given must equal the run's own.
NOT_RESTORED = ("out", "resume", "overwrite", "quiet", "threads", "emu_mode", "precision",
                "prefetch", "graph")
CHANGEABLE_ON_RESUME = ("iterations", "max_minutes", "lr", "device", "checkpoint_every")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minunet.train", formatter_class=HelpFormatter,
                                description="Train a U-Net (Ronneberger et al. 2015) with minunet.")
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="folder with images/ and labels/ (default: "
                      "built-in synthetic data)")
    data.add_argument("--val-data", metavar="DIR", help="validation folder (default: hold out "
                      "--val-fraction of --data, or fresh synthetic images)")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share of --data held out "
                      "for validation")
    data.add_argument("--num-classes", type=int, default=None, help="number of classes (default: "
                      "the largest class index in the labels + 1; 0/255 masks are 2 classes)")
    data.add_argument("--instances", action="store_true", help="labels are instance masks (0 = "
                      "background, 1..K = cells): separate touching cells, add border weights")
    data.add_argument("--synthetic", choices=("em", "cells"), default="em",
                      help="built-in data when --data is not given: EM membranes (ISBI 2012-like) "
                      "or touching cells with instance labels (cell tracking-like)")
    data.add_argument("--synthetic-count", type=int, default=24, help="synthetic training images")
    data.add_argument("--synthetic-size", type=int, default=256, help="synthetic image side (px)")
    data.add_argument("--w0", type=float, default=10.0, help="border weight w0 of eq. 2")
    data.add_argument("--sigma", type=float, default=5.0, help="border width sigma of eq. 2 (px)")
    data.add_argument("--no-weights", action="store_true", help="w(x) = 1 everywhere (ablation)")
    data.add_argument("--no-augment", action="store_true", help="no elastic deformation etc.")
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, emu or auto")
    model.add_argument("--base-channels", type=int, default=16, help="64 in the paper")
    model.add_argument("--depth", type=int, default=4, help="number of poolings (4 in the paper)")
    model.add_argument("--dropout", type=float, default=0.5, help="dropout probability")
    model.add_argument("--tile", type=int, default=None, help="input tile side, a valid U-Net "
                       f"input size (default: the smallest valid size >= {DEFAULT_TILE_AT_LEAST}: "
                       "348 -> 164 for depth 4)")
    model.add_argument("--batch-size", type=int, default=1, help="1 large tile, as the paper")
    model.add_argument("--lr", type=float, default=None, help=f"learning rate (default "
                       f"{DEFAULT_LR}, or {DEFAULT_LR_BORDER_WEIGHTS} with the border weights of "
                       "--instances or --synthetic cells)")
    model.add_argument("--momentum", type=float, default=0.99, help="SGD momentum")
    model.add_argument("--iterations", type=int, default=1500, help="training steps")
    model.add_argument("--max-minutes", type=float, default=4.5, help="wall-clock budget: stop, "
                       "validate and save when it is spent (0 = no limit); the one-time compile "
                       "of the CPU kernels on a fresh install is not counted")
    model.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order, "
                       "augmentation and dropout")
    model.add_argument("--threads", type=int, default=None, help="CPU threads of the fast cpu "
                       "kernels (Numba) and of the emulator's fast mode (default: every core; "
                       "results do not depend on it)")
    model.add_argument("--emu-mode", choices=("checked", "fast"), default=None, help="for --device "
                       "emu: 'checked' finds out-of-bounds accesses, races and misalignment (slow); "
                       "'fast' skips the checks for long runs (default: $MINUNET_EMU_MODE or checked)")
    model.add_argument("--precision", choices=PRECISIONS, default=None, help="for --device cuda "
                       "or emu: 'tf32' lets the convolutions use tensor cores (TF32 inputs, float32 "
                       "sums, like PyTorch's allow_tf32), 'fp32' is strict float32 (default: "
                       "$MINUNET_PRECISION or fp32); the cpu device always computes in float32")
    model.add_argument("--prefetch", type=int, default=None, choices=(0, 1, 2), help="batches a "
                       "background thread prepares ahead while the device runs the step (0: each "
                       "batch is prepared in the loop; default: 1 on cuda, where the CPU is free "
                       "while the GPU computes, 0 on cpu and emu, whose step already uses every "
                       "core); the data and results do not depend on it")
    model.add_argument("--graph", action="store_true", help="for --device cuda (or emu): capture "
                       "the whole training step once as a CUDA graph and replay it for every batch "
                       "(one launch instead of ~200; the same numbers; minunet.step_graph; if the "
                       "capture fails, a warning and the eager step). Not run on a GPU yet")
    run_ = p.add_argument_group("output")
    run_.add_argument("--out", default="runs/train", help="output folder")
    run_.add_argument("--resume", action="store_true", help="continue the run in --out with its "
                      "own arguments (give --iterations or --max-minutes to train longer)")
    run_.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    run_.add_argument("--checkpoint-every", type=int, default=100, help="iterations between "
                      "checkpoints")
    run_.add_argument("--quiet", action="store_true", help="no progress report")
    return p


def configure_machine(args) -> None:
    """Apply --threads, --emu-mode and --precision (this session's choices, never stored in the run)."""
    from . import emulator
    from .ops import numba_config

    if args.precision is not None:
        set_precision(args.precision)
    if args.emu_mode is not None:
        emulator.set_emu_mode(args.emu_mode)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        numba_config.set_num_threads(min(args.threads, numba_config.max_threads()))
        emulator.set_workers(args.threads)


def device_note(device: str) -> str:
    """What the header line says about how the device runs: the emulator's mode on emu."""
    if device != "emu":
        return ""
    from . import emulator

    if emulator.emu_mode() == "checked":
        return (" (emulator mode: checked, every access checked; --emu-mode fast runs without "
                "the checks, several times faster)")
    return " (emulator mode: fast, no checks; --emu-mode checked finds out-of-bounds accesses and races)"


def default_lr(args) -> float:
    """The learning rate when --lr is not given: smaller when eq. 2's border weights are on."""
    border_weights = (args.instances or (not args.data and args.synthetic == "cells")) \
        and not args.no_weights
    return DEFAULT_LR_BORDER_WEIGHTS if border_weights else DEFAULT_LR


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same(name: str, a, b) -> bool:
    if name in ("data", "val_data") and a and b:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def restore_args(args, given: set, stored: dict, source: Path) -> list[str]:
    """Take the resumed run's arguments from its checkpoint (`stored`) for every option the
    command line did not give; a given option must equal the run's unless it is one of
    CHANGEABLE_ON_RESUME. Returns one note per changed option; raises ValueError (one line) for
    a contradiction."""
    notes = []
    for name, value in stored.items():
        if name in NOT_RESTORED or not hasattr(args, name):
            continue
        if name not in given:
            setattr(args, name, value)
        elif not _same(name, getattr(args, name), value):
            if name not in CHANGEABLE_ON_RESUME:
                if isinstance(value, bool):
                    what = (f"{_option(name)} contradicts the run, which was trained "
                            f"{'with' if value else 'without'} it")
                else:
                    what = (f"{_option(name)} {getattr(args, name)} contradicts the run's "
                            f"{_option(name)} {value}")
                raise ValueError(f"--resume: {what} (stored in {source}); leave it out to "
                                 "continue that run, or start a new run with another --out")
            notes.append(f"{_option(name)} {getattr(args, name)} instead of the run's {value}")
    return notes


def _check_args(args) -> None:
    for name in ("iterations", "base_channels", "depth", "batch_size", "checkpoint_every",
                 "synthetic_count"):
        if getattr(args, name) < 1:
            raise ValueError(f"{_option(name)} must be >= 1, got {getattr(args, name)}")
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
    if args.num_classes is not None and args.num_classes < 2:
        raise ValueError(f"--num-classes must be >= 2, got {args.num_classes}")
    if args.instances and args.num_classes not in (None, 2):
        raise ValueError(f"--num-classes {args.num_classes} with --instances: instance masks give "
                         "2 classes (cell and background); leave out --num-classes")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; --resume continues the "
                         "run in --out, --overwrite replaces it")
    check_tile(args.tile, args.depth)
    if getattr(args, "graph", False) and resolve_device(args.device) == "cpu":
        raise ValueError("--graph replays the step's kernel launches as a CUDA graph and needs "
                         "--device cuda (or emu); the cpu device has no launches to capture: "
                         "leave out --graph")


def resolve_args(args, given: set | None, out_dir: Path) -> tuple[dict | None, list[str]]:
    """Fill in what the command line left open: with --resume the run's own arguments (returns
    the checkpoint and notes on changed options), otherwise computed defaults. Absolute data
    paths, so that the run can be resumed from any folder. Raises ValueError for bad arguments
    and for an existing run that would be overwritten."""
    ckpt_path, resumed, notes = out_dir / "checkpoint.npz", None, []
    if args.resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: {out_dir} holds no checkpoint.npz to continue; give the "
                             "--out folder of the run to continue, or leave out --resume to start "
                             "a new run")
        resumed = load_checkpoint(ckpt_path)
        if given is None:   # called from Python: the options that differ from the defaults
            defaults = vars(build_parser().parse_args([]))
            given = {k for k, v in vars(args).items() if v != defaults.get(k)}
        notes = restore_args(args, given, resumed["meta"].get("args", {}), ckpt_path)
        if args.tile is None:   # checkpoints of older versions kept the tile beside the args
            args.tile = resumed["meta"].get("tile")
    else:
        existing = [name for name in RUN_FILES if (out_dir / name).exists()]
        if existing and not args.overwrite:
            raise ValueError(f"{out_dir} already holds a run ({', '.join(existing)}); continue it "
                             "with --resume, replace it with --overwrite, or choose another --out")
    if args.lr is None:
        args.lr = default_lr(args)
    if args.tile is None:
        args.tile = UNet.valid_input_size(DEFAULT_TILE_AT_LEAST, args.depth)
    for name in ("data", "val_data"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    _check_args(args)
    return resumed, notes


# ---- data --------------------------------------------------------------------------------------
def load_data(args):
    """(train samples, validation samples, one-line description); see minunet.data.dataset.Sample."""
    from .data import dataset

    weights = dict(w0=args.w0, sigma=args.sigma)
    if args.data:
        options = dict(instances=args.instances, num_classes=args.num_classes, **weights)
        train = dataset.load_folder(args.data, **options)
        if args.val_data:
            val = dataset.load_folder(args.val_data, **options)
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
    cancel out, and the gamma curve is what remains of that augmentation. Where the sampler
    augments on a kernel device (cuda, emu) the tiles are standardised there too, one launch for
    the batch (kernels/resample.cu's gray_values, one block per tile)."""
    xs, targets, weights = sampler.batch(batch_size)
    device = getattr(sampler, "device", None)
    if device in ("cuda", "emu") and getattr(sampler, "augment", False):
        from .backends import get_backend

        return get_backend(device).gray_values(xs, None, None, None, standardize=True), targets, weights
    return np.stack([standardize(x) for x in xs]), targets, weights


class Batches:
    """The training batches in order, each with the random generator's state right after it was
    drawn (what a checkpoint must store so that a resumed run draws the next batch next) and the
    seconds it took to prepare.

    With ``ahead`` > 0 a background thread prepares up to ``ahead`` batches while the device runs
    the current step (the generator is then used by that thread only, in the same order, so the
    batches are the very same); with 0 each batch is prepared when asked for. On cuda the thread
    works on its own CUDA stream and waits for it before handing a batch over."""

    def __init__(self, sampler, batch_size: int, ahead: int = 1, device: str = "cpu"):
        self.sampler, self.batch_size, self.ahead, self.device = sampler, batch_size, ahead, device
        self._queue: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
        self._stop = threading.Event()
        self._thread = None
        # the GPU the training loop uses: a new thread starts on device 0 whatever the caller's
        self._gpu = None
        if device == "cuda":
            import cupy

            self._gpu = cupy.cuda.Device().id
        if ahead > 0:
            self._thread = threading.Thread(target=self._work, name="minunet-batches", daemon=True)
            self._thread.start()

    def _prepare(self):
        start = time.perf_counter()
        batch = training_batch(self.sampler, self.batch_size)   # looked up here: tests replace it
        return batch, self.sampler.rng.bit_generator.state, time.perf_counter() - start

    def _work(self) -> None:
        stream = None
        if self.device == "cuda":
            import cupy

            cupy.cuda.Device(self._gpu).use()
            stream = cupy.cuda.Stream(non_blocking=True)
        try:
            while not self._stop.is_set():
                if stream is None:
                    item = self._prepare()
                else:
                    with stream:
                        item = self._prepare()
                    stream.synchronize()
                self._put(("batch", item))
        except BaseException as exc:     # handed to the training loop, raised there
            self._put(("error", exc))

    def _put(self, message) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self):
        """(batch, generator state after it, seconds its preparation took)."""
        if self._thread is None:
            return self._prepare()
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the thread (a batch it is preparing is finished and dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run carries from step to step, and saves in its checkpoint."""
    args: argparse.Namespace
    out_dir: Path
    device: str
    model: UNet
    optimizer: SGD
    rng: np.random.Generator
    sampler: object
    iteration: int = 0
    elapsed_before: float = 0.0     # seconds of training so far, over all sessions
    log_rows: list = field(default_factory=list)
    # the generator's state after the last batch trained on (batches prepared ahead have moved
    # the generator itself further); None: the generator's own state
    rng_state: dict | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.npz"

    def save(self, elapsed: float) -> None:
        """The log first, then the checkpoint (both atomic): a resumed run reads the log only up
        to the checkpoint's iteration, so a kill between the two writes loses nothing."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.log_rows)
        atomic_write(self.out_dir / "log.csv", lambda f: f.write(text.getvalue().encode()))
        save_checkpoint(self.checkpoint_path, self.model, self.optimizer, meta={
            "iteration": self.iteration, "elapsed": elapsed,
            "rng_state": self.rng_state or self.rng.bit_generator.state, "tile": self.args.tile,
            "args": {k: v for k, v in vars(self.args).items() if k not in ("resume", "overwrite")}})


# log.csv: per iteration, the loss, the seconds of training so far, and where the iteration's time
# went: data_ms, the time the loop waited for its batch (all of its preparation without
# --prefetch, what the background thread had not finished with it), and step_ms, the forward,
# loss, backward and update on the device
LOG_FIELDS = ["iteration", "loss", "seconds", "data_ms", "step_ms"]


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [dict(iteration=int(r["iteration"]), loss=float(r["loss"]), seconds=float(r["seconds"]),
                     data_ms=r.get("data_ms") or "", step_ms=r.get("step_ms") or "")
                for r in csv.DictReader(f) if int(r["iteration"]) <= upto]


def build_run(args, resumed: dict | None, train_samples, val_samples, out_dir: Path) -> Run:
    """The model, optimiser, random generator and tile sampler: new, or as the checkpoint left
    them (then the same data order and dropout masks follow as in an uninterrupted run)."""
    from .data.dataset import TileSampler, count_classes

    device = resolve_device(args.device)
    needed = count_classes(train_samples + val_samples)
    if resumed is not None:
        model = model_from_checkpoint(resumed, device)
    else:
        model = UNet(in_channels=1, num_classes=args.num_classes or needed,
                     base_channels=args.base_channels, depth=args.depth, dropout=args.dropout,
                     seed=args.seed, device=device)
    args.num_classes = model.config["num_classes"]
    if needed > args.num_classes:
        raise ValueError(f"the labels hold class indices up to {needed - 1} but the network has "
                         f"{args.num_classes} classes; fix the labels or train a new run")
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    rng = np.random.default_rng(args.seed)
    run_ = Run(args, out_dir, device, model, optimizer, rng, sampler=None)
    if resumed is not None:
        if resumed["optimizer"] is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            optimizer.lr = args.lr      # the run's, or the one --lr gives on resuming
        meta = resumed["meta"]
        rng.bit_generator.state = meta["rng_state"]
        run_.iteration, run_.elapsed_before = int(meta["iteration"]), float(meta.get("elapsed", 0.0))
        run_.log_rows = _read_log(out_dir / "log.csv", run_.iteration)
    run_.sampler = TileSampler(train_samples, args.tile, model.output_size(args.tile), rng,
                               augment=not args.no_augment, device=device)
    return run_


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


def _budget_s(args) -> float:
    return args.max_minutes * 60.0 if args.max_minutes > 0 else math.inf


def _resume_command(run_: Run, *extra: str) -> str:
    return " ".join(["python -m minunet.train --out", shlex.quote(str(run_.out_dir)), "--resume",
                     *extra])


def train_steps(run_: Run) -> tuple[int, str]:
    """SGD steps until --iterations, the time budget, a Ctrl-C or a non-finite loss. Returns the
    exit status and the message to print."""
    args, budget = run_.args, _budget_s(run_.args)
    progress = Progress(args.iterations, budget, run_.iteration, run_.elapsed_before,
                        enabled=not args.quiet)
    pace = Pace(run_, budget, expected_step_s(run_), enabled=not args.quiet, write=progress.write)
    t0 = time.perf_counter()
    status, message = EXIT_OK, ""
    if run_.rng_state is None:      # before a thread moves the generator ahead
        run_.rng_state = run_.rng.bit_generator.state
    ahead = getattr(args, "prefetch", None)
    if ahead is None:
        ahead = 1 if run_.device == "cuda" else 0
    batches = Batches(run_.sampler, args.batch_size, ahead, run_.device)
    recent = []     # (data ms, step ms) of the last iterations, for the progress line
    # On cuda a batch was allocated on the loader thread's CUDA stream, whose memory pool may hand
    # its memory out again as soon as it is freed, while this thread's stream may still be reading
    # it. So a batch stays referenced until the next step's loss.item() has waited for this stream,
    # i.e. until every kernel of the step that read it has finished.
    held = []
    from .step_graph import StepGraph, StepGraphError

    graph = None
    if getattr(args, "graph", False):   # forward, loss, backward and update as one replayed graph
        graph = StepGraph(run_.model, run_.optimizer)
    with _InterruptFlag() as interrupt:
        try:
            while run_.iteration < args.iterations:
                started = time.perf_counter()
                (xs, targets, weights), rng_state, _ = batches.next()
                x, target, weight = (Tensor(a, device=run_.device) for a in (xs, targets, weights))
                data_ms = 1e3 * (time.perf_counter() - started)
                if graph is not None:   # a non-finite loss has left the weights untouched (the update checks it)
                    try:
                        value = graph.step(x, target, weight)
                    except StepGraphError as exc:   # nothing of the step ran: it runs eagerly below
                        progress.write(f"warning: {exc}; training on without it (the same numbers)")
                        graph = None
                if graph is None:
                    loss = F.weighted_cross_entropy(run_.model(x), target, weight)
                    value = loss.item()
                held[:] = (xs, targets, weights)     # frees the previous batch (see above)
                if not math.isfinite(value):
                    status, message = EXIT_FAILED, _nan_message(run_, value)
                    break
                if graph is None:
                    loss.backward()
                    run_.optimizer.step()
                    run_.optimizer.zero_grad()
                run_.iteration += 1
                run_.rng_state = rng_state
                now = time.perf_counter()
                step_ms = 1e3 * (now - started) - data_ms
                elapsed = run_.elapsed_before + now - t0
                run_.log_rows.append({"iteration": run_.iteration, "loss": value,
                                      "seconds": round(elapsed, 3), "data_ms": round(data_ms, 2),
                                      "step_ms": round(step_ms, 2)})
                recent = (recent + [(data_ms, step_ms)])[-20:]
                progress.update(run_.iteration, elapsed, value, _time_split(recent))
                pace.update(run_.iteration, elapsed)
                stop = interrupt.raised     # read once: a Ctrl-C between two reads must still save
                if run_.iteration % args.checkpoint_every == 0 or stop:
                    run_.save(elapsed)
                if stop:
                    status = EXIT_INTERRUPTED
                    message = (f"interrupted at iteration {run_.iteration}; checkpoint saved to "
                               f"{run_.checkpoint_path}; continue with: {_resume_command(run_)}")
                    break
                if elapsed >= budget:
                    message = (f"time budget of {args.max_minutes:g} min spent at iteration "
                               f"{run_.iteration} of {args.iterations}")
                    break
        finally:
            batches.close()
    progress.close()
    run_.elapsed_before += time.perf_counter() - t0
    if status == EXIT_OK:
        run_.save(run_.elapsed_before)
    return status, message


def _time_split(recent: list) -> str:
    """'data 3 ms + step 58 ms' per iteration, averaged over `recent` (data ms, step ms) pairs."""
    data, step = (sum(v) / len(recent) for v in zip(*recent))
    return f"data {data:.0f} ms + step {step:.0f} ms"


def _nan_message(run_: Run, value: float) -> str:
    lower = f"--lr {run_.args.lr / 2:g}"
    if not run_.checkpoint_path.is_file():
        return (f"error: the loss became {value} at iteration {run_.iteration + 1}, before the "
                f"first checkpoint; start again with a lower learning rate ({lower} --overwrite)")
    return (f"error: the loss became {value} at iteration {run_.iteration + 1}; training stopped "
            f"and the last good checkpoint {run_.checkpoint_path} is kept; lower the learning "
            f"rate and continue with: {_resume_command(run_, lower)}")


def _finished(run_: Run) -> str:
    """Why a resumed run has nothing left to train ('' if it has)."""
    args = run_.args
    if run_.iteration >= args.iterations:
        return (f"it reached --iterations {args.iterations}; to train longer, resume with a "
                "larger --iterations")
    if run_.elapsed_before >= _budget_s(args):
        return (f"its --max-minutes {args.max_minutes:g} budget was spent at iteration "
                f"{run_.iteration}; to train longer, resume with a larger --max-minutes "
                "(0 = no limit) and --iterations")
    return ""


def train(args, given: set | None = None) -> int:
    """Run ``python -m minunet.train`` for parsed `args`; `given` names the options the command
    line gave, which a resumed run checks against its own (None: those that differ from the
    defaults)."""
    out_dir = Path(args.out)
    resumed, notes = resolve_args(args, given, out_dir)
    configure_machine(args)
    train_samples, val_samples, what = load_data(args)
    run_ = build_run(args, resumed, train_samples, val_samples, out_dir)
    if args.overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporary_files(out_dir / "checkpoint.npz") + \
        remove_stale_temporary_files(out_dir / "log.csv")
    model = run_.model
    print(f"minunet.train: {what}; U-Net base {model.config['base_channels']}, depth {model.depth}, "
          f"{model.config['num_classes']} classes, tile {args.tile} -> "
          f"{model.output_size(args.tile)}, device {run_.device}{device_note(run_.device)}"
          + (f"; resuming at iteration {run_.iteration} of {args.iterations}" if resumed else ""),
          flush=True)
    if stale:
        print(f"removed {len(stale)} stale temporary file(s) of an interrupted save: "
              f"{', '.join(p.name for p in stale)}", flush=True)
    if notes:
        print("resuming with " + "; ".join(notes), flush=True)
    if resumed and _finished(run_):
        print(f"the run in {out_dir} already finished: {_finished(run_)}; validating its "
              "checkpoint again", flush=True)
        status, message = EXIT_OK, ""
    else:
        with compile_time_excluded(run_, announce=not args.quiet):
            status, message = train_steps(run_)
    if status == EXIT_FAILED:
        print(message, file=sys.stderr)
        return status
    if message:
        print(message, flush=True)
    if status == EXIT_INTERRUPTED:
        return status
    return finish(run_, val_samples)


# ---- speed a user can predict ------------------------------------------------------------------
def _compile_timer(on_compiled):
    """A Numba event listener that calls `on_compiled(seconds)` at the end of each outermost
    compile (a kernel's compile may nest others)."""
    import numba.core.event as numba_event

    class CompileTimer(numba_event.Listener):
        depth, start = 0, 0.0

        def on_start(self, event):
            if self.depth == 0:
                self.start = time.perf_counter()
            self.depth += 1

        def on_end(self, event):
            self.depth -= 1
            if self.depth == 0:
                on_compiled(time.perf_counter() - self.start)

    return CompileTimer()


@contextlib.contextmanager
def compile_time_excluded(run_: Run, announce: bool = True):
    """Training steps inside this block do not count the time Numba spends compiling the fast
    CPU kernels (once per install: they are cached on disk) against --max-minutes: every
    compile's seconds are taken off ``run_.elapsed_before`` as it ends, and added up in
    ``run_.compile_s``. On the cpu device, when some kernel is not in Numba's cache yet (a fresh
    install, or kernels that changed), it first says so."""
    import numba.core.event as numba_event

    from .ops import numba_config

    run_.compile_s = 0.0
    missing = numba_config.uncached_kernels() if run_.device == "cpu" else []
    if missing and announce:
        print(f"compiling the CPU kernels, once, in the first step ({len(missing)} of "
              f"{len(numba_config.KERNELS)} not in Numba's cache; about {COMPILE_S_MEASURED} s on "
              "an idle 2-core VM, up to a minute on a busy one; not counted in --max-minutes)",
              flush=True)

    def exclude(seconds: float) -> None:
        run_.elapsed_before -= seconds
        run_.compile_s += seconds

    with numba_event.install_listener("numba:compile", _compile_timer(exclude)):
        yield


def expected_step_s(run_: Run) -> float | None:
    """The seconds one training step should take on this machine's cores if they were idle
    (STEP_FLOPS_PER_CORE, measured), or None off the cpu device."""
    from .inference import forward_cost
    from .ops import numba_config

    if run_.device != "cpu":
        return None
    flops = 3 * forward_cost(run_.args.tile, run_.model.config)[0] * run_.args.batch_size
    return flops / (STEP_FLOPS_PER_CORE * numba_config.num_threads())


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Pace:
    """After the first step of a session and PACE_AFTER_STEPS more, one line: the seconds spent
    compiling the CPU kernels (``run_.compile_s``, see :func:`compile_time_excluded`), the time
    per step, how many of --iterations fit in the --max-minutes budget, and, when a step takes
    far longer than this machine's cores should need (`expected_s`), why that may be and what
    helps."""

    def __init__(self, run_: Run, budget_s: float, expected_s: float | None, enabled: bool = True,
                 write=print):
        self.run, self.args, self.budget_s, self.expected_s = run_, run_.args, budget_s, expected_s
        self.first = run_.iteration + 1          # its time holds first-call overheads: skipped
        self.enabled, self.write = enabled, write
        self.start_elapsed = None

    def update(self, iteration: int, elapsed: float) -> None:
        if not self.enabled:
            return
        if iteration == self.first:
            self.start_elapsed = elapsed
        elif self.start_elapsed is not None and iteration == self.first + PACE_AFTER_STEPS:
            self.enabled = False
            self.write(self.message(iteration, elapsed,
                                    (elapsed - self.start_elapsed) / PACE_AFTER_STEPS,
                                    getattr(self.run, "compile_s", 0.0)))

    def message(self, iteration: int, elapsed: float, step_s: float,
                compile_s: float = 0.0) -> str:
        args, left = self.args, self.args.iterations - iteration
        text = f"about {step_s:.2f} s per step: "
        if compile_s >= 0.5:
            text = f"compiled in {compile_s:.0f} s (not counted); " + text
        fit = math.inf if not math.isfinite(self.budget_s) else \
            max(0, int((self.budget_s - elapsed) / step_s))
        if fit >= left:
            text += f"the remaining {left} iterations take about {_duration(left * step_s)}"
        else:
            need = (elapsed + left * step_s) / 60
            text += (f"the {args.max_minutes:g}-min budget fits about {iteration + fit} of the "
                     f"{args.iterations} iterations (--max-minutes {math.ceil(need)} for all)")
        if self.expected_s and self.expected_s >= MIN_JUDGED_STEP_S and \
                step_s > SLOW_FACTOR * self.expected_s:
            from .ops import numba_config

            threads = numba_config.num_threads()
            text += (f"; that is {step_s / self.expected_s:.0f}x the {self.expected_s:.2f} s "
                     f"expected on {threads} idle core(s): other programs may be using the cores"
                     + (f" (load average {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg")
                        else ""))
            if threads > 1:
                text += "; on shared cores --threads 1 often runs faster"
                if numba_config.threading_layer() == "omp":
                    text += (" (the kernels run on OpenMP threads, which spin on busy cores; "
                             "with the tbb package installed Numba uses TBB, which copes)")
        return text


# ---- validation --------------------------------------------------------------------------------
def validate(model: UNet, samples, device: str) -> tuple[dict, list, np.ndarray]:
    """Mean metrics over the validation images, their foreground probability maps, and the
    predicted class map of image 0 (for prediction.png when there are more than two classes; the
    argmax of the probabilities already computed, so no image is predicted twice). Each image is
    predicted on the tile that suits it (minunet.inference.choose_tile), whatever tile training
    used."""
    from .metrics import evaluate_all

    model.eval()
    results, probs, first_classes = [], [], None
    for sample in samples:
        class_probs = predict_probabilities(model, sample.image, None, device)
        if first_classes is None:
            first_classes = class_probs.argmax(axis=0)
        prob = foreground_probability(class_probs)
        probs.append(prob)
        results.append(evaluate_all(prob, sample.target > 0))
    model.train()
    keys = results[0].keys()
    return {k: float(np.mean([r[k] for r in results])) for k in keys}, probs, first_classes


def class_map_plot(run_: Run, first_classes: np.ndarray) -> dict:
    """For more than two classes, prediction.png's extra panel: image 0's predicted class map."""
    classes = run_.model.config["num_classes"]
    if classes <= 2:
        return {}
    return dict(classes=first_classes, num_classes=classes)


def finish(run_: Run, val_samples) -> int:
    """Validate, write metrics.json and the plots, print a summary."""
    from .plots import plot_loss_curve, plot_prediction

    args, out_dir, log_rows = run_.args, run_.out_dir, run_.log_rows
    print(f"validating on {len(val_samples)} image(s) and writing {out_dir}/metrics.json and "
          "plots ...", flush=True)
    metrics, probs, first_classes = validate(run_.model, val_samples, run_.device)
    recent = [r["loss"] for r in log_rows[-50:]]
    metrics["loss"] = float(np.mean(recent)) if recent else float("nan")
    metrics.update(iterations=run_.iteration, seconds=round(run_.elapsed_before, 1),
                   device=run_.device, tile=args.tile)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if log_rows:
        plot_loss_curve([r["iteration"] for r in log_rows], [r["loss"] for r in log_rows],
                        out_dir / "loss.png")
    first = val_samples[0]
    plot_prediction(first.image, first.target, probs[0], first.weight, out_dir / "prediction.png",
                    title=f"validation image 0: IoU {metrics['iou']:.3f}",
                    **class_map_plot(run_, first_classes))
    print(f"validation: IoU {metrics['iou']:.4f}, pixel error {metrics['pixel_error']:.4f}, "
          f"Rand error {metrics['rand_error']:.4f}, warping error {metrics['warping_error']:.5f}; "
          f"{run_.iteration} iterations in {run_.elapsed_before / 60:.1f} min; wrote {out_dir}/",
          flush=True)
    return EXIT_OK


def main(argv=None) -> int:
    parser = build_parser()
    return train(parser.parse_args(argv), given_options(parser, argv))


if __name__ == "__main__":
    sys.exit(run(main))
