"""What a new user meets (issue 20, and issue 19's test-time augmentation): the one-time compile
and the pace of training announced, small kernel launches kept off the worker threads, instance
masks end to end (train --instances -> NAME_instances.png), coloured class maps, predict behaving
like train (refuses existing outputs, names its device, shows progress without carriage returns
in logs, takes a run folder), one-line errors, and TTA's rotation equivariance."""
from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import minunet as mu
from minunet import inference, predict, train
from minunet.checkpoint import save_checkpoint
from minunet.cli import CountBar, run
from minunet.data.io import read_slices, write_image
from minunet.ops import elementwise, numba_config
from tests.test_cli_inputs import class_folder, one_line_error

# A depth-2, 2-channel U-Net on 48x48 synthetic images (as tests/test_cli.py): milliseconds a step.
TINY = ["--device", "cpu", "--synthetic-count", "3", "--synthetic-size", "48", "--base-channels",
        "2", "--depth", "2", "--tile", "44", "--max-minutes", "0", "--lr", "0.01"]


def train_cli(tmp_path, *extra, out="run"):
    return run(train.main, TINY + ["--out", str(tmp_path / out), *map(str, extra)])


def predict_cli(*args):
    return run(predict.main, ["--device", "cpu", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A depth-2 U-Net with 2 base channels, saved without a run (two classes)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.npz"
    return save_checkpoint(path, mu.UNet(base_channels=2, depth=2, seed=3))


def png(path, rng, shape=(40, 52)):
    write_image(path, (rng.random(shape) * 255).astype(np.uint8))
    return path


# ---- 1. speed a user can predict -----------------------------------------------------------
class CountingLock:
    """Stands in for numba_config.LAUNCH_LOCK: counts the launches that use the worker threads."""

    def __init__(self):
        self.lock, self.count = threading.Lock(), 0

    def __enter__(self):
        self.count += 1
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


@pytest.mark.parametrize("size", [1, 37, elementwise.SGD_SERIAL_UP_TO + 11])
def test_small_sgd_steps_run_serially_with_the_same_result(monkeypatch, rng, size):
    """An SGD step on a bias (tiny) never wakes the worker threads; a large one does; both give
    exactly the reference's numbers, as does the threaded path forced onto the tiny array."""
    lock = CountingLock()
    monkeypatch.setattr(numba_config, "LAUNCH_LOCK", lock)
    p, g, v = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    want = [a.copy() for a in (p, g, v)]
    elementwise.sgd_reference_step(*want, 0.01, 0.9)
    for serial_small_work in (True, False):
        monkeypatch.setattr(numba_config, "SERIAL_SMALL_WORK", serial_small_work)
        got = [a.copy() for a in (p, g, v)]
        before = lock.count
        elementwise.sgd_cpu_step(*got, 0.01, 0.9)
        threaded = size > elementwise.SGD_SERIAL_UP_TO or not serial_small_work
        assert lock.count - before == int(threaded)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [5, elementwise.BLOCK, elementwise.BLOCK + 3])
def test_relu_small_and_large_equal_the_reference(monkeypatch, rng, size):
    lock = CountingLock()
    monkeypatch.setattr(numba_config, "LAUNCH_LOCK", lock)
    x = rng.standard_normal(size).astype(np.float32)
    np.testing.assert_array_equal(elementwise.relu_cpu_forward(x), np.maximum(x, 0))
    assert lock.count == int(size > elementwise.BLOCK)


def test_uncached_kernels_names_kernels_without_a_cache_file(monkeypatch):
    names = [parallel.py_func.__qualname__ for parallel, _ in numba_config.KERNELS]
    assert "_sgd_step" in names and "_conv3x3_flat" in names
    monkeypatch.setattr(numba_config, "_cached", lambda dispatcher: False)
    assert numba_config.uncached_kernels() == names
    # a kernel counts as compiled when either its threaded or its serial compilation is cached
    monkeypatch.setattr(numba_config, "_cached", lambda d: d.py_func.__name__.endswith("_serial"))
    assert "_sgd_step" not in numba_config.uncached_kernels()
    assert "_conv3x3_flat" in numba_config.uncached_kernels()


def test_compile_time_is_taken_off_the_budget(monkeypatch, capsys):
    """A Numba compile inside the block (here a fresh function, never cached) is subtracted from
    the run's elapsed time and added up; kernels missing from the cache are announced first."""
    import numba

    monkeypatch.setattr(numba_config, "uncached_kernels", lambda: ["_k"])
    run_ = SimpleNamespace(device="cpu", elapsed_before=100.0)
    with train.compile_time_excluded(run_):
        assert numba.njit(lambda a: a * 2 + 1)(3) == 7
    assert "compiling the CPU kernels, once, in the first step" in capsys.readouterr().out
    assert 0 < run_.compile_s < 60
    assert run_.elapsed_before == pytest.approx(100.0 - run_.compile_s)
    monkeypatch.setattr(numba_config, "uncached_kernels", lambda: [])
    run_ = SimpleNamespace(device="cpu", elapsed_before=5.0)
    with train.compile_time_excluded(run_):
        pass                                           # nothing compiled, nothing announced
    assert run_.compile_s == 0 and run_.elapsed_before == 5.0
    assert capsys.readouterr().out == ""


def test_train_announces_the_compile(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(numba_config, "uncached_kernels", lambda: ["_k"])
    assert train_cli(tmp_path, "--iterations", "1") == 0
    assert "not counted in --max-minutes" in capsys.readouterr().out


def test_max_minutes_help_says_the_compile_is_not_counted():
    text = " ".join(train.build_parser().format_help().split())
    assert "compile of the CPU kernels on a fresh install is not counted" in text


def pace(monkeypatch, iterations=1500, max_minutes=4.5, expected_s=0.1, threads=2):
    monkeypatch.setattr(numba_config, "num_threads", lambda: threads)
    monkeypatch.setattr(numba_config, "threading_layer", lambda: "tbb")
    run_ = SimpleNamespace(args=SimpleNamespace(iterations=iterations, max_minutes=max_minutes),
                           iteration=0)
    budget = max_minutes * 60 if max_minutes else float("inf")
    lines = []
    return train.Pace(run_, budget, expected_s, write=lines.append), lines


def test_pace_estimates_the_steps_that_fit_the_budget(monkeypatch):
    p, lines = pace(monkeypatch)
    for iteration, elapsed in ((1, 5.0), (2, 5.2), (3, 5.4), (4, 5.6), (5, 5.8)):
        p.update(iteration, elapsed)
    assert len(lines) == 1                 # once, after the first step and three more
    # 0.2 s a step: (270 - 5.6) / 0.2 = 1322 more steps after iteration 4
    assert "about 0.20 s per step" in lines[0]
    assert "the 4.5-min budget fits about 1326 of the 1500 iterations" in lines[0]
    assert "--max-minutes 6 for all" in lines[0]
    assert "other programs" not in lines[0]


def test_pace_says_why_a_slow_step_may_be_slow(monkeypatch):
    p, _ = pace(monkeypatch, iterations=100, max_minutes=0, expected_s=0.1, threads=2)
    text = p.message(4, 10.0, 1.0, compile_s=12.3)
    assert text.startswith("compiled in 12 s (not counted); about 1.00 s per step")
    assert "the remaining 96 iterations take about 1.6 min" in text
    assert "10x the 0.10 s expected on 2 idle core(s): other programs may be using the cores" \
        in text and "--threads 1" in text
    assert "OpenMP" not in text
    monkeypatch.setattr(numba_config, "threading_layer", lambda: "omp")
    assert "with the tbb package installed Numba uses TBB" in p.message(4, 10.0, 1.0)
    p, _ = pace(monkeypatch, threads=1)
    text = p.message(4, 10.0, 1.0)
    assert "other programs" in text and "--threads 1" not in text     # already one thread
    p, _ = pace(monkeypatch, expected_s=0.001)      # a tiny network: overheads, not judged
    assert "other programs" not in p.message(4, 10.0, 1.0)


def test_expected_step_of_the_default_run(monkeypatch):
    """The default run (base 16, depth 4, tile 348) at the measured rate: 0.088 s on 2 cores."""
    monkeypatch.setattr(numba_config, "num_threads", lambda: 2)
    model = mu.UNet(base_channels=16, depth=4)
    run_ = SimpleNamespace(device="cpu", model=model,
                           args=SimpleNamespace(tile=348, batch_size=1))
    assert train.expected_step_s(run_) == pytest.approx(0.0886, abs=0.001)
    run_.device = "emu"
    assert train.expected_step_s(run_) is None


def test_train_prints_the_pace(tmp_path, capsys):
    assert train_cli(tmp_path, "--iterations", "6") == 0
    assert "s per step: the remaining 2 iterations take about" in capsys.readouterr().out


# ---- 2. instances end to end -----------------------------------------------------------------
def instance_folder(root, rng, n=3, size=48, cells=20):
    """Images with `cells` square cells each, labelled 1..cells (an instance mask)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(n):
        label = np.zeros((size, size), np.uint8)
        for c in range(cells):
            y, x = rng.integers(0, size - 4, 2)
            label[y:y + 4, x:x + 4] = c + 1
        write_image(root / "images" / f"i{k}.png", (label > 0).astype(np.uint8) * 200 +
                    (rng.random((size, size)) * 50).astype(np.uint8))
        write_image(root / "labels" / f"i{k}.png", label)
    return root


def test_instance_masks_without_instances_name_the_option(tmp_path, rng, capsys):
    data = instance_folder(tmp_path / "d", rng)
    assert train_cli(tmp_path, "--data", data, "--iterations", "1", "--quiet") == 2
    err = one_line_error(capsys)
    assert "has class values up to 20: instance masks" in err and "need --instances" in err
    assert train_cli(tmp_path, "--data", data, "--iterations", "1", "--quiet", "--num-classes",
                     "3") == 2
    assert "instance masks (one value per cell) need --instances" in one_line_error(capsys)
    assert train_cli(tmp_path, "--data", data, "--iterations", "1", "--quiet", "--instances") == 0


def test_an_instance_run_predicts_instance_labels(tmp_path, rng, capsys):
    """train --synthetic cells --instances, then predict: NAME_instances.png, a 16-bit label
    image whose cells are the connected components of NAME_mask.png."""
    from scipy import ndimage

    from minunet.data.synthetic import cell_images
    from minunet.metrics import seg

    assert train_cli(tmp_path, "--synthetic", "cells", "--instances", "--iterations", "2",
                     "--quiet") == 0
    images, truth = cell_images(1, size=64, seed=4)
    write_image(tmp_path / "cells.png", (images[0] * 255).astype(np.uint8))
    assert predict_cli("--checkpoint", tmp_path / "run", "--out", tmp_path / "pred",
                       tmp_path / "cells.png") == 0
    assert "cells_instances.png" in capsys.readouterr().out
    # a briefly trained network: threshold at its median probability to get several cells
    median = float(np.median(read_slices(tmp_path / "pred" / "cells_prob.tif")[0]))
    assert predict_cli("--checkpoint", tmp_path / "run", "--out", tmp_path / "pred",
                       "--overwrite", "--threshold", median, tmp_path / "cells.png") == 0
    with Image.open(tmp_path / "pred" / "cells_instances.png") as im:
        assert im.mode.startswith("I;16")
    labels = read_slices(tmp_path / "pred" / "cells_instances.png", as_label=True)[0]
    mask = read_slices(tmp_path / "pred" / "cells_mask.png", as_label=True)[0] > 0
    expected, count = ndimage.label(mask)
    np.testing.assert_array_equal(labels, expected)
    assert labels.max() == count >= 1     # the instance-labelling itself: the test below
    assert 0.0 <= seg(labels, truth[0]) <= 1.0       # what evaluate reports as SEG


def test_instance_labels_are_4_connected_components():
    mask = np.zeros((1, 7, 9), bool)
    mask[0, 1:3, 1:3] = True          # a cell
    mask[0, 3, 3] = True              # touches it only at a corner: another cell
    mask[0, 5:7, 6:9] = True          # a third
    labels = predict.instance_labels(mask)
    assert labels.dtype == np.uint16 and labels.max() == 3
    assert len({labels[0, 1, 1], labels[0, 3, 3], labels[0, 6, 8]}) == 3
    many = np.zeros((1, 520, 520), bool)
    many[0, ::2, ::2] = True          # 67,600 single pixels: more than 16 bits hold
    assert predict.instance_labels(many).dtype == np.uint32


# ---- 3. classes in colour --------------------------------------------------------------------
def test_three_classes_give_a_paletted_class_map_and_a_class_panel(tmp_path, rng, capsys):
    from minunet.plots import prediction_panels

    data = class_folder(tmp_path / "d", rng, levels=3)
    assert train_cli(tmp_path, "--data", data, "--iterations", "2", "--quiet") == 0
    assert (tmp_path / "run" / "prediction.png").is_file()
    image = png(tmp_path / "x.png", rng)
    assert predict_cli("--checkpoint", tmp_path / "run" / "checkpoint.npz", "--out",
                       tmp_path / "pred", image) == 0
    with Image.open(tmp_path / "pred" / "x_classes.png") as im:
        assert im.mode == "P"
        colours = np.array(im.getpalette()[:9]).reshape(3, 3)
    assert len({tuple(c) for c in colours}) == 3 and tuple(colours[0]) == (0, 0, 0)
    classes = read_slices(tmp_path / "pred" / "x_classes.png", as_label=True)[0]
    from minunet.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoint.npz"), "cpu")
    probs = inference.predict_probabilities(model.eval(), read_slices(image)[0] / 255.0)
    np.testing.assert_array_equal(classes, probs.argmax(axis=0))   # the values are kept
    panels = prediction_panels(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 4)), None,
                               classes=classes[:4, :4], num_classes=3)
    titles = [t for t, _, _ in panels]
    assert titles[-1] == "predicted class (of 3)" and not isinstance(panels[1][2], str)
    assert [t for t, _, _ in prediction_panels(*[np.zeros((4, 4))] * 3)] == \
        ["input", "truth", "prediction P(foreground)"]


# ---- 4. predict behaves like train -----------------------------------------------------------
def test_predict_refuses_existing_outputs_without_overwrite(tmp_path, rng, capsys,
                                                            tiny_checkpoint):
    image = png(tmp_path / "a.png", rng)
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "p", image) == 0
    first = (tmp_path / "p" / "a_prob.tif").read_bytes()
    capsys.readouterr()
    png(tmp_path / "a.png", rng)                      # another image under the same name
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "p", image) == 2
    err = one_line_error(capsys)
    assert "already holds predictions (a_prob.tif, a_mask.png)" in err and "--overwrite" in err
    assert (tmp_path / "p" / "a_prob.tif").read_bytes() == first          # untouched
    png(tmp_path / "b.png", rng)
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "p",
                       tmp_path / "b.png") == 0                         # other names: fine
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "p", "--overwrite",
                       image) == 0
    assert (tmp_path / "p" / "a_prob.tif").read_bytes() != first


def test_predict_names_its_device_takes_a_run_folder_and_says_no_slices_of_a_png(tmp_path, rng,
                                                                                capsys):
    import tifffile

    assert train_cli(tmp_path, "--iterations", "1", "--quiet") == 0
    capsys.readouterr()
    image = png(tmp_path / "a.png", rng)
    tifffile.imwrite(tmp_path / "s.tif", (rng.random((3, 40, 44)) * 255).astype(np.uint8),
                     photometric="minisblack")
    assert predict_cli("--checkpoint", tmp_path / "run", "--out", tmp_path / "p", image,
                       tmp_path / "s.tif", "--quiet") == 0
    out = capsys.readouterr()
    assert "device cpu" in out.out
    assert f"checkpoint {tmp_path / 'run' / 'checkpoint.npz'}" in out.out
    (png_line,) = [line for line in out.out.splitlines() if line.startswith(str(image))]
    assert "(40x52, tile" in png_line and "slice" not in png_line
    assert "(3 slices of 40x44, tile" in out.out
    assert out.err == ""                                       # --quiet: no progress
    assert predict_cli("--checkpoint", tmp_path, "--out", tmp_path / "q", image) == 2
    assert "is a folder without checkpoint.npz" in one_line_error(capsys)
    assert predict_cli("--checkpoint", tmp_path / "run", "--out", image, image) == 2
    assert f"--out {image} is a file" in one_line_error(capsys)


def test_predict_progress_is_plain_lines_in_a_log(tmp_path, rng, capsys, tiny_checkpoint):
    image = png(tmp_path / "a.png", rng, shape=(90, 70))
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "p", "--tile", "44",
                       image) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "predicting a.png: 100% (" in err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_count_bar_draws_on_a_terminal_and_prints_tenths_to_a_file():
    log = io.StringIO()
    with CountBar(40, "chunks", "chunk", stream=log) as bar:
        for _ in range(40):
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0] == "chunks: 10% (4 of 40 chunks)"
    assert lines[-1] == "chunks: 100% (40 of 40 chunks)"
    terminal = Terminal()
    with CountBar(3, "tiles", "tile", stream=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue()                          # tqdm's bar
    quiet = io.StringIO()
    with CountBar(3, "tiles", "tile", stream=quiet, enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_zarr_progress_is_plain_lines_in_a_log(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    from minunet.data.lazy_io import store_chunks

    array = da.ones((64, 48), chunks=(16, 16), dtype="f4")
    target = zarr.create_array(store=str(tmp_path / "o.zarr"), shape=(64, 48), chunks=(16, 16),
                               dtype="f4")
    assert store_chunks(array, [(target, None)], progress=True) == 12
    err = capsys.readouterr().err
    assert "\r" not in err and "chunks: 100% (12 of 12 chunks)" in err
    assert np.all(target[...] == 1)


# ---- 5. smaller things -----------------------------------------------------------------------
@pytest.mark.skipif(mu.cuda_available(), reason="CuPy sees a GPU here: --device cuda works")
def test_device_cuda_without_cupy_is_one_line(tmp_path, capsys, tiny_checkpoint):
    for main in (predict.main, train.main):
        with pytest.raises(SystemExit) as stop:
            main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "p"), "--device",
                  "cuda", "x.png"] if main is predict.main else ["--device", "cuda"])
        assert stop.value.code == 2
        err = one_line_error(capsys)
        assert err.startswith("error: --device cuda: ") and "usage" not in err


def test_chunk_below_the_halo_says_halo_not_output_tile():
    from minunet.data.blocked import Geometry

    geometry = Geometry(4, 284)       # output 100, margin 92, grid 16: chunk 100 misses the halo
    with pytest.raises(ValueError) as info:
        geometry.check_chunk(100, "--chunk")
    message = str(info.value)
    assert "smaller than the halo a block takes from its neighbours (92 + 16 = 108 pixels" in \
        message and "output tile" not in message and "at least 112" in message
    with pytest.raises(ValueError, match="--chunk 96 is smaller than the network's output tile "
                                         r"\(100 pixels for tile 284\); use a --chunk of at least"):
        geometry.check_chunk(96, "--chunk")


# ---- 6. test-time augmentation ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    return mu.UNet(base_channels=2, depth=2, seed=5).eval()


@pytest.mark.parametrize("shape", [(37, 53), (44, 44)])
def test_tta_is_equivariant_where_a_single_pass_is_not(tiny_model, rng, shape):
    """TTA(rotate(x)) == rotate(TTA(x)) for every flip and rotation, up to float rounding; one
    pass of the (not rotation-equivariant) network misses by far more."""
    image = rng.random(shape).astype(np.float32)
    tta = inference.predict_probabilities_tta(tiny_model, image)
    single = inference.predict_probabilities(tiny_model, image)
    assert tta.shape == single.shape == (2,) + shape
    np.testing.assert_allclose(tta.sum(axis=0), 1, atol=1e-5)
    for flip, k in inference.SYMMETRIES[1:]:
        seen = np.ascontiguousarray(inference._transform(image, flip, k))
        np.testing.assert_allclose(inference.predict_probabilities_tta(tiny_model, seen),
                                   inference._transform(tta, flip, k), rtol=0, atol=1e-6)
        one_pass = inference.predict_probabilities(tiny_model, seen)
        assert np.abs(one_pass - inference._transform(single, flip, k)).max() > 1e-3


def test_tta_averages_the_eight_undone_passes(tiny_model, rng):
    image = rng.random((29, 41)).astype(np.float32)
    passes = [inference._undo(inference.predict_probabilities(
        tiny_model, np.ascontiguousarray(inference._transform(image, f, k))), f, k)
        for f, k in inference.SYMMETRIES]
    assert len({(f, k) for f, k in inference.SYMMETRIES}) == 8
    np.testing.assert_allclose(inference.predict_probabilities(tiny_model, image, tta=True),
                               np.mean(passes, axis=0), rtol=0, atol=1e-6)


def test_predict_tta_writes_the_tta_probabilities(tmp_path, rng, capsys, tiny_checkpoint):
    from minunet.checkpoint import load_checkpoint, model_from_checkpoint

    image = png(tmp_path / "a.png", rng, shape=(33, 45))
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "p", "--tta",
                       image) == 0
    out = capsys.readouterr()
    assert "test-time augmentation (8 passes per image)" in out.out
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint), "cpu").eval()
    want = inference.foreground_probability(
        inference.predict_probabilities_tta(model, read_slices(image)[0] / 255.0))
    got = read_slices(tmp_path / "p" / "a_prob.tif")[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert predict_cli("--checkpoint", tiny_checkpoint, "--out", tmp_path / "z.zarr", "--tta",
                       image) == 2
    assert "--tta works on in-memory prediction only" in one_line_error(capsys)
