"""The command-line entry points: train -> predict -> evaluate on tiny synthetic data, exact
resumption, Ctrl-C, NaN handling, and one-line errors with exit status 2 for bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from minunet import evaluate, predict, train
from minunet.checkpoint import load_checkpoint
from minunet.cli import run

# A depth-2, 2-channel U-Net on 48x48 synthetic images: each step takes milliseconds.
TINY = ["--device", "cpu", "--synthetic-count", "3", "--synthetic-size", "48", "--base-channels",
        "2", "--depth", "2", "--tile", "44", "--max-minutes", "0", "--quiet", "--lr", "0.01"]


def train_cli(tmp_path, *extra, out="run"):
    return run(train.main, TINY + ["--out", str(tmp_path / out), *extra])


def test_train_writes_every_output(tmp_path, capsys):
    assert train_cli(tmp_path, "--iterations", "4") == 0
    out = tmp_path / "run"
    for name in ("checkpoint.npz", "metrics.json", "log.csv", "loss.png", "prediction.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"iou", "pixel_error", "rand_error", "warping_error", "loss"} <= metrics.keys()
    assert 0 <= metrics["iou"] <= 1 and np.isfinite(metrics["loss"])
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 4
    assert "validation: IoU" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path):
    """6 iterations straight == 3 iterations, then --resume to 6 (same seed, on cpu)."""
    assert train_cli(tmp_path, "--iterations", "6", out="straight") == 0
    assert train_cli(tmp_path, "--iterations", "3", out="resumed") == 0
    assert train_cli(tmp_path, "--iterations", "6", "--resume", out="resumed") == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.npz")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    assert a["meta"]["iteration"] == b["meta"]["iteration"] == 6
    for name, value in a["params"].items():
        assert np.array_equal(value, b["params"][name]), name
    log = (tmp_path / "resumed" / "log.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, monkeypatch, capsys):
    class InterruptAfterTwoSteps(train._InterruptFlag):
        checks = 0

        @property
        def raised(self):
            type(self).checks += 1
            return type(self).checks >= 2

        @raised.setter
        def raised(self, value):
            pass

    monkeypatch.setattr(train, "_InterruptFlag", InterruptAfterTwoSteps)
    assert train_cli(tmp_path, "--iterations", "10") == train.EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert ckpt["meta"]["iteration"] == 2
    monkeypatch.undo()
    assert train_cli(tmp_path, "--iterations", "4", "--resume") == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz")["meta"]["iteration"] == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # lr 1e9 is meant to overflow: NumPy's overflow warnings are expected here, not reported
    with np.errstate(over="ignore", invalid="ignore"):
        status = train_cli(tmp_path, "--iterations", "50", "--lr", "1e9", "--checkpoint-every", "1")
    assert status == 1
    err = capsys.readouterr().err
    assert "the loss became" in err and "last good checkpoint" in err
    assert f"--out {tmp_path / 'run'} --resume --lr 5e+08" in err
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert all(np.isfinite(v).all() for v in ckpt["params"].values())
    assert ckpt["meta"]["iteration"] < 50


def test_predict_then_evaluate(tmp_path, capsys):
    from minunet.data.io import write_image
    from minunet.data.synthetic import em_images

    assert train_cli(tmp_path, "--iterations", "2") == 0
    images, labels = em_images(2, size=40, seed=5)
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    for k in range(2):
        write_image(tmp_path / "in" / f"img{k}.png", (images[k] * 255).astype(np.uint8))
        write_image(tmp_path / "truth" / f"img{k}.png", labels[k].astype(np.uint8) * 255)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    inputs = [str(tmp_path / "in" / f"img{k}.png") for k in range(2)]
    assert run(predict.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "pred"),
                              "--device", "cpu", *inputs]) == 0
    printed = capsys.readouterr().out
    for k in range(2):   # every file written is named
        for name in (f"img{k}_prob.tif", f"img{k}_mask.png"):
            assert (tmp_path / "pred" / name).is_file() and name in printed
    assert run(evaluate.main, ["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 0
    scores = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    assert set(evaluate.METRICS) <= scores["mean"].keys() and len(scores["images"]) == 2
    out = capsys.readouterr().out
    (mean_row,) = [line for line in out.splitlines() if line.startswith("mean")]
    assert mean_row.startswith("mean of 2 slice(s)")
    assert [float(v) for v in mean_row.split()[4:]] == pytest.approx(
        [scores["mean"][k] for k in evaluate.METRICS], abs=1e-5)  # the scores under their names


def test_evaluate_scores_a_perfect_prediction_as_perfect(tmp_path):
    from minunet.data.io import write_image
    from minunet.data.synthetic import em_images

    _, labels = em_images(1, size=40, seed=1)
    for d in ("pred", "truth"):
        write_image(tmp_path / d / "a.png", labels[0].astype(np.uint8) * 255)
    assert run(evaluate.main, ["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 0
    mean = json.loads((tmp_path / "pred" / "evaluation.json").read_text())["mean"]
    assert mean["iou"] == 1.0 and mean["pixel_error"] == 0.0 and mean["warping_error"] == 0.0
    assert mean["rand_error"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("argv,needle", [
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--tile", "45"], "use --tile 44 or --tile 48"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_train_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    assert train_cli(tmp_path, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_resume_with_another_architecture_or_corrupt_checkpoint(tmp_path, capsys):
    assert train_cli(tmp_path, "--iterations", "1") == 0
    assert train_cli(tmp_path, "--iterations", "2", "--resume", "--base-channels", "4") == 2
    assert "--base-channels 4 contradicts the run's --base-channels 2" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoint.npz").write_bytes(b"not a zip file")
    assert run(predict.main, ["--checkpoint", str(tmp_path / "run" / "checkpoint.npz"), "--out",
                              str(tmp_path / "p"), str(tmp_path / "x.png")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_predict_and_evaluate_bad_input(tmp_path, capsys):
    assert train_cli(tmp_path, "--iterations", "1") == 0
    ckpt = str(tmp_path / "run" / "checkpoint.npz")
    assert run(predict.main, ["--checkpoint", ckpt, "--out", str(tmp_path / "p"),
                              str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(predict.main, ["--checkpoint", ckpt, "--out", str(tmp_path / "p"), "--tile", "50",
                              ckpt]) == 2
    assert "use --tile 48 or --tile 52" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run(evaluate.main, ["--pred", str(tmp_path / "a"), "--truth", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
    """`python -m minunet.train` itself: bad input -> status 2 and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "minunet.train", "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_training_tiles_are_standardised_after_augmentation():
    """The network trains on augmented tiles with zero mean and unit variance, and the gray-value
    augmentation (a gamma curve on [0, 1] intensities) runs before that standardisation: done the
    other way round it would clip every below-mean pixel to one value."""
    from minunet.data import TileSampler, synthetic_samples

    samples = synthetic_samples("em", n=2, size=96, seed=3)
    sampler = TileSampler(samples, 92, 4, np.random.default_rng(0))
    xs, targets, weights = train.training_batch(sampler, 3)
    assert xs.shape == (3, 1, 92, 92) and targets.shape == weights.shape == (3, 4, 4)
    for x in xs:
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
        at_minimum = float(np.mean(x == x.min()))
        assert at_minimum < 0.01, f"{at_minimum:.0%} of the pixels share the minimum: clipped"


@pytest.mark.parametrize("argv,lr", [([], 0.002), (["--synthetic", "cells"], 0.001),
                                     (["--synthetic", "cells", "--no-weights"], 0.002),
                                     (["--data", "d", "--instances"], 0.001),
                                     (["--synthetic", "cells", "--lr", "0.05"], 0.05)])
def test_default_learning_rate_is_smaller_with_border_weights(argv, lr):
    """Eq. 2's border weights enlarge the loss and its gradient: lr 0.002 diverged on them."""
    args = train.build_parser().parse_args(argv)
    assert (args.lr if args.lr is not None else train.default_lr(args)) == lr


@pytest.mark.parametrize("module,defaults", [
    (train, ["--out", "runs/train", "--iterations", "1500", "--max-minutes", "4.5",
             "--val-fraction", "0.2", "--checkpoint-every", "100"]),
    (predict, ["--threshold", "0.5", "--memory-mb", "1024"]),
])
def test_help_shows_the_defaults(module, defaults):
    lines = module.build_parser().format_help().splitlines()
    for option, default in zip(defaults[::2], defaults[1::2]):
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option))
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].lstrip().startswith("-") or not lines[i].strip()), len(lines))
        entry = " ".join(" ".join(lines[start:end]).split())
        assert f"(default: {default})" in entry, entry


def test_progress_written_to_a_file_is_plain_lines_with_the_budget(tmp_path, capsys):
    """Not a terminal (capsys): one line per tenth of the run, no carriage returns, the budget
    shown next to the iterations; then a line saying that validation runs."""
    argv = [a for a in TINY if a not in ("--quiet",)]
    argv[argv.index("--max-minutes") + 1] = "10"
    assert run(train.main, argv + ["--out", str(tmp_path / "run"), "--iterations", "20"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("training")]
    assert 10 <= len(lines) <= 11, out
    assert re.match(r"training  10%: iteration 2/20, \d+\.\d of 10 min, loss \d", lines[0])
    assert lines[-1].startswith("training 100%: iteration 20/20")
    after = out.split(lines[-1], 1)[1]
    assert after.index("validating on 2 image(s)") < after.index("validation: IoU")


def test_progress_counts_toward_the_budget_when_it_ends_the_run():
    """The fraction shown is the larger of iterations and time spent: a 1500-iteration run with a
    4.5-minute budget is half done after 2.25 minutes, whatever its iteration."""
    import io

    from minunet.cli import Progress

    stream = io.StringIO()
    progress = Progress(1500, 270.0, stream=stream)
    assert progress.fraction(100, 135.0) == 0.5
    assert progress.fraction(1200, 135.0) == 0.8
    assert progress.fraction(100, 400.0) == 1.0
    progress.update(100, 135.0, 0.25)
    assert stream.getvalue().startswith("training  50%: iteration 100/1500, 2.2 of 4.5 min, loss 0.2500")
    assert Progress(10, float("inf")).fraction(5, 1e9) == 0.5


def test_evaluate_pairs_predictions_with_the_truth_of_their_name(tmp_path, rng):
    """'a_1_prob.tif' sorts before 'a_prob.tif' but 'a.png' before 'a_1.png': pairing by sorted
    name would swap them; predictions are paired with the truth file they were named after."""
    from minunet.data.io import write_image

    masks = {"a": rng.random((16, 16)) > 0.5, "a_1": rng.random((16, 16)) > 0.5}
    for name, mask in masks.items():
        write_image(tmp_path / "truth" / f"{name}.png", mask)
        write_image(tmp_path / "pred" / f"{name}_prob.tif", mask.astype(np.float32))
        write_image(tmp_path / "pred" / f"{name}_mask.png", ~mask)    # ignored: probabilities win
    assert run(evaluate.main, ["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 0
    scores = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    assert [(r["prediction"], r["truth"]) for r in scores["images"]] == \
        [("a_prob.tif", "a.png"), ("a_1_prob.tif", "a_1.png")]
    assert scores["mean"]["iou"] == 1.0


def test_train_on_emu_says_which_emulator_mode_it_runs(tmp_path, capsys):
    """--device emu names its mode in the header line; --emu-mode fast switches it (and, like
    --threads, is this session's choice, not part of the run)."""
    from minunet import emulator
    from minunet.train import main

    previous = emulator.emu_mode()
    try:
        code = main(["--device", "emu", "--emu-mode", "fast", "--threads", "1", "--iterations", "1",
                     "--base-channels", "2", "--depth", "1", "--tile", "44", "--max-minutes", "0",
                     "--out", str(tmp_path / "run"), "--quiet"])
        out = capsys.readouterr().out
    finally:
        emulator.set_emu_mode(previous)
    assert code == 0
    assert "device emu (emulator mode: fast, no checks" in out
