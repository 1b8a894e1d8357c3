"""Resuming and protecting a training run (issue 9, bugs 1 and 4): the printed resume command
continues the same run on the same data, a contradicting argument is refused, an existing run is
never overwritten silently, and the stale temporary files of a killed save are removed."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest

from minunet import train
from minunet.checkpoint import load_checkpoint
from minunet.cli import run

# A depth-2, 2-channel U-Net (44 -> 4 tiles): each step takes milliseconds.
TINY = ["--device", "cpu", "--base-channels", "2", "--depth", "2", "--tile", "44",
        "--max-minutes", "0", "--lr", "0.01", "--val-fraction", "0.34"]


def write_user_folder(root, n: int = 3, size: int = 48, seed: int = 7) -> None:
    """A data folder as a user makes one: PNG images and 0/255 label PNGs of their own names."""
    from minunet.data.io import write_image
    from minunet.data.synthetic import em_images

    images, labels = em_images(n, size=size, seed=seed)
    for k in range(n):
        write_image(root / "images" / f"slice_{k}.png", (images[k] * 255).astype(np.uint8))
        write_image(root / "labels" / f"slice_{k}.png", labels[k].astype(np.uint8) * 255)


def train_on_folder(*extra, out="runs/mine", data="mydata"):
    """minunet.train on the user's folder, relative paths as a user types them (cwd = tmp_path)."""
    return run(train.main, ["--data", data, *TINY, "--out", out, *extra])


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    write_user_folder(tmp_path / "mydata")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Send the process a real SIGINT (Ctrl-C) while it prepares training step `step`."""
    real_batch = train.training_batch
    calls = []

    def batch_then_ctrl_c(sampler, batch_size):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real_batch(sampler, batch_size)

    monkeypatch.setattr(train, "training_batch", batch_then_ctrl_c)


def assert_same_parameters(path_a, path_b) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["meta"]["iteration"] == b["meta"]["iteration"]
    assert a["params"].keys() == b["params"].keys()
    for name, value in a["params"].items():
        assert np.array_equal(value, b["params"][name]), name


def test_printed_resume_command_continues_the_same_run_on_the_users_images(user_folder,
                                                                           monkeypatch, capsys):
    """Ctrl-C at step 3 of 6, then exactly the printed command (a fresh process, no other
    argument): the run continues on the user's folder with its own settings, and ends with the
    parameters of an uninterrupted run (cpu, same seed)."""
    assert train_on_folder("--iterations", "6", "--quiet", out="runs/straight") == 0
    capsys.readouterr()
    interrupt_at_step(monkeypatch, 3)
    # without batches prepared ahead, the Ctrl-C while step 3's batch is prepared stops at 3
    assert train_on_folder("--iterations", "6", "--quiet", "--prefetch", "0") == train.EXIT_INTERRUPTED
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["iteration"] == 3
    printed = [line.split("continue with: ", 1)[1] for line in out.splitlines()
               if "continue with: " in line]
    assert len(printed) == 1, out
    command = shlex.split(printed[0])
    assert command[:3] == ["python", "-m", "minunet.train"]
    proc = subprocess.run([sys.executable, *command[1:]], cwd=user_folder, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mydata" in proc.stdout and "resuming at iteration 3" in proc.stdout
    assert_same_parameters(user_folder / "runs/straight/checkpoint.npz",
                           user_folder / "runs/mine/checkpoint.npz")
    log = (user_folder / "runs/mine/log.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_run_with_batches_prepared_ahead_resumes_bit_identically(user_folder, monkeypatch,
                                                                   capsys, ahead):
    """--prefetch: a background thread prepares the next batches while the step runs, moving the
    random generator ahead of the training; the checkpoint stores the generator as it was after
    the last batch trained on, so the run, interrupted and resumed (with --prefetch again), ends
    with the parameters of an uninterrupted run without prefetching, and the same data order."""
    assert train_on_folder("--iterations", "6", "--quiet", "--prefetch", "0", out="runs/straight") == 0
    interrupt_at_step(monkeypatch, 4)     # which step it stops at depends on the thread's lead
    assert train_on_folder("--iterations", "6", "--quiet", "--prefetch", str(ahead)) == \
        train.EXIT_INTERRUPTED
    monkeypatch.undo()
    stopped = load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["iteration"]
    assert 1 <= stopped < 6
    capsys.readouterr()
    monkeypatch.chdir(user_folder)    # undo() also undid the fixture's chdir
    assert run(train.main, ["--out", "runs/mine", "--resume", "--quiet", "--prefetch", str(ahead)]) == 0
    assert_same_parameters(user_folder / "runs/straight/checkpoint.npz",
                           user_folder / "runs/mine/checkpoint.npz")
    straight = load_checkpoint(user_folder / "runs/straight/checkpoint.npz")["meta"]["rng_state"]
    resumed = load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["rng_state"]
    assert straight == resumed
    header, *rows = (user_folder / "runs/mine/log.csv").read_text().strip().splitlines()
    assert header == "iteration,loss,seconds,data_ms,step_ms"
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r.split(",")[3]) >= 0 and float(r.split(",")[4]) > 0 for r in rows)


@pytest.mark.parametrize("argv,needle", [
    (["--data", "other"], "--data"),
    (["--tile", "48"], "--tile"),
    (["--instances"], "--instances"),
    (["--base-channels", "4"], "--base-channels"),
    (["--seed", "3"], "--seed"),
    (["--no-augment"], "--no-augment"),
])
def test_resume_refuses_an_argument_that_contradicts_the_run(user_folder, capsys, argv, needle):
    write_user_folder(user_folder / "other", seed=8)
    assert train_on_folder("--iterations", "2", "--quiet") == 0
    before = load_checkpoint(user_folder / "runs/mine/checkpoint.npz")
    capsys.readouterr()
    status = run(train.main, ["--out", "runs/mine", "--resume", "--iterations", "3", *argv])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert needle in err and "--out" in err
    after = load_checkpoint(user_folder / "runs/mine/checkpoint.npz")
    assert after["meta"]["iteration"] == before["meta"]["iteration"] == 2


def test_resume_accepts_the_same_arguments_and_a_new_budget_or_learning_rate(user_folder, capsys):
    """Repeating the run's own arguments is no contradiction; --iterations, --max-minutes and
    --lr may change (train longer; the NaN-loss message says to lower --lr and resume), and the
    new learning rate is the one the optimiser then uses."""
    assert train_on_folder("--iterations", "2", "--quiet") == 0
    assert train_on_folder("--iterations", "3", "--quiet", "--resume") == 0
    assert load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["iteration"] == 3
    capsys.readouterr()
    assert run(train.main, ["--out", "runs/mine", "--resume", "--iterations", "4",
                            "--lr", "0.005", "--max-minutes", "5"]) == 0
    ckpt = load_checkpoint(user_folder / "runs/mine/checkpoint.npz")
    assert ckpt["meta"]["iteration"] == 4
    assert ckpt["optimizer"]["lr"] == 0.005
    assert ckpt["meta"]["args"]["lr"] == 0.005 and ckpt["meta"]["args"]["max_minutes"] == 5
    assert ckpt["meta"]["args"]["data"] == str(user_folder.resolve() / "mydata")
    out = capsys.readouterr().out
    assert "--lr 0.005" in out and "0.01" in out   # says what changed


def test_resume_without_a_checkpoint_says_so_for_train(user_folder, capsys):
    assert run(train.main, ["--out", "runs/empty", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume") and "runs/empty" in err and "--out" in err
    assert "minunet.train wrote" not in err and len(err.splitlines()) == 1


def test_resume_of_a_finished_run_says_it_only_validates_again(user_folder, capsys):
    assert train_on_folder("--iterations", "2", "--quiet") == 0
    capsys.readouterr()
    assert run(train.main, ["--out", "runs/mine", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "--iterations" in out and "validation:" in out
    assert load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["iteration"] == 2


def test_an_existing_run_is_not_overwritten_without_overwrite(user_folder, capsys):
    assert train_on_folder("--iterations", "2", "--quiet") == 0
    capsys.readouterr()
    assert train_on_folder("--iterations", "3", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "--resume" in err and "--overwrite" in err and "runs/mine" in err
    assert load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["iteration"] == 2
    assert train_on_folder("--iterations", "3", "--quiet", "--overwrite") == 0
    assert load_checkpoint(user_folder / "runs/mine/checkpoint.npz")["meta"]["iteration"] == 3
    log = (user_folder / "runs/mine/log.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3]
    assert train_on_folder("--iterations", "3", "--resume", "--overwrite") == 2
    assert "--resume" in capsys.readouterr().err


def test_stale_temporary_checkpoints_are_removed_at_the_next_start(user_folder, capsys):
    """A kill -9 during a save leaves checkpoint.npz.XXXX.tmp beside the intact checkpoint."""
    assert train_on_folder("--iterations", "2", "--quiet") == 0
    run_dir = user_folder / "runs/mine"
    stale = [run_dir / "checkpoint.npz.k2j3x9.tmp", run_dir / "checkpoint.npz.a_b.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    unrelated = run_dir / "notes.tmp"
    unrelated.write_text("mine")
    capsys.readouterr()
    assert run(train.main, ["--out", "runs/mine", "--resume", "--iterations", "3"]) == 0
    assert not any(p.exists() for p in stale) and unrelated.exists()
    assert "removed 2 stale temporary file(s)" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoint.npz")["meta"]["iteration"] == 3


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    """atomic_write: an exception (or Ctrl-C) in the middle of a write keeps the old contents."""
    from minunet.checkpoint import atomic_write, remove_stale_temporary_files

    target = tmp_path / "log.csv"
    atomic_write(target, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
    assert remove_stale_temporary_files(tmp_path / "missing" / "x.npz") == []


def test_atomic_writes_get_the_permissions_of_an_ordinary_file(tmp_path):
    """Not mkstemp's private 0600: a checkpoint shared in a lab stays readable as other files."""
    import os

    from minunet.checkpoint import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "c.npz", lambda f: f.write(b"x"))
        ordinary = tmp_path / "ordinary"
        ordinary.write_bytes(b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_batches_prepared_ahead_are_the_batches_in_order(ahead):
    """train.Batches hands out the same batches, in the same order, with the generator state
    after each, whether a thread prepares them ahead or not; an error in the thread is raised
    in the training loop."""
    from minunet.data import TileSampler, synthetic_samples

    samples = synthetic_samples("em", n=2, size=64, seed=1)

    def batches_of(ahead_):
        sampler = TileSampler(samples, 60, 20, np.random.default_rng(3), device="cpu")
        batches = train.Batches(sampler, 2, ahead=ahead_)
        try:
            return [batches.next() for _ in range(3)]
        finally:
            batches.close()

    want, got = batches_of(0), batches_of(ahead)
    for (want_batch, want_state, _), (got_batch, got_state, seconds) in zip(want, got):
        assert got_state == want_state and seconds > 0
        for a, b in zip(got_batch, want_batch):
            assert np.array_equal(a, b)
    assert want[0][1] != want[1][1]

    class Broken:
        rng = np.random.default_rng(0)

        def batch(self, size):
            raise ValueError("the image holds 3 NaN values")

    batches = train.Batches(Broken(), 1, ahead=ahead)
    try:
        with pytest.raises(ValueError, match="NaN"):
            batches.next()
    finally:
        batches.close()
