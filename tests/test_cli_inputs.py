"""What the command lines make of a user's own files (issue 9, bugs 2, 3 and 5): labels with more
than two classes, 16-bit binary masks, NaN or infinite pixels, the tile size prediction and
validation choose for themselves, and one-line errors worded for the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from minunet import evaluate, predict, train
from minunet.checkpoint import load_checkpoint
from minunet.cli import run
from minunet.data.io import write_image
from minunet.nn import UNet

TINY = ["--device", "cpu", "--base-channels", "2", "--depth", "2", "--tile", "44",
        "--max-minutes", "0", "--lr", "0.01", "--quiet", "--val-fraction", "0.34"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def class_folder(root, rng, label_suffix=".png", n=3, size=40, levels=3, dtype=np.uint8,
                 scale=1):
    """Images whose label is the image quantised into `levels` classes (times `scale`)."""
    (root / "labels").mkdir(parents=True)
    for k in range(n):
        image = rng.random((size, size))
        label = np.minimum((image * levels).astype(np.int64), levels - 1) * scale
        write_image(root / "images" / f"c{k}.png", (image * 255).astype(np.uint8))
        if label_suffix == ".png":
            write_image(root / "labels" / f"c{k}.png", label.astype(dtype))
        else:
            tifffile.imwrite(root / "labels" / f"c{k}{label_suffix}", label.astype(dtype),
                             photometric="minisblack")
    return root


# ---- bug 2: labels with more than two classes ---------------------------------------------
def test_labels_with_three_classes_train_a_three_class_network(tmp_path, rng, capsys):
    data = class_folder(tmp_path / "d", rng)
    out = tmp_path / "run"
    assert run(train.main, ["--data", str(data), *TINY, "--iterations", "2", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.npz")["meta"]["config"]["num_classes"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["iou"] <= 1
    # prediction: P(foreground) = 1 - P(class 0) in [0, 1], and the class map
    image = tmp_path / "x.png"
    write_image(image, (rng.random((36, 52)) * 255).astype(np.uint8))
    assert run(predict.main, ["--checkpoint", str(out / "checkpoint.npz"), "--out",
                              str(tmp_path / "p"), "--device", "cpu", str(image)]) == 0
    prob = tifffile.imread(tmp_path / "p" / "x_prob.tif")
    assert prob.shape == (36, 52) and prob.min() >= 0 and prob.max() <= 1 + 1e-6
    from minunet.data.io import read_slices
    (classes,) = read_slices(tmp_path / "p" / "x_classes.png", as_label=True)
    assert classes.shape == (36, 52) and set(np.unique(classes)) <= {0, 1, 2}
    assert "x_classes.png" in capsys.readouterr().out


def test_validation_predicts_each_image_once_and_plots_its_class_map(tmp_path, rng, monkeypatch):
    """With three classes, prediction.png's class map is image 0's argmax from the validation
    pass itself: no validation image is predicted a second time for the plot."""
    from minunet import plots

    data = class_folder(tmp_path / "d", rng)
    calls, plotted = [], {}
    real_predict, real_plot = train.predict_probabilities, plots.plot_prediction

    def counting_predict(model, image, *args, **kwargs):
        probs = real_predict(model, image, *args, **kwargs)
        calls.append(probs)
        return probs

    def recording_plot(*args, **kwargs):
        plotted.update(kwargs)
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(train, "predict_probabilities", counting_predict)
    monkeypatch.setattr(plots, "plot_prediction", recording_plot)
    out = tmp_path / "run"
    assert run(train.main, ["--data", str(data), *TINY, "--iterations", "1", "--out", str(out)]) == 0
    assert len(calls) == 1                     # 3 images, --val-fraction 0.34: one validation image
    assert plotted["num_classes"] == 3
    np.testing.assert_array_equal(plotted["classes"], calls[0].argmax(axis=0))


def test_num_classes_option_and_an_out_of_range_label_named_by_its_file(tmp_path, rng, capsys):
    """The message names the label file (labels/c0.tif), not the image (images/c0.png)."""
    data = class_folder(tmp_path / "d", rng, label_suffix=".tif")
    out = tmp_path / "run"
    argv = ["--data", str(data), *TINY, "--iterations", "1", "--out", str(out)]
    assert run(train.main, argv + ["--num-classes", "2"]) == 2
    err = one_line_error(capsys)
    assert "c0.tif" in err and "c0.png" not in err and "--num-classes" in err
    assert run(train.main, argv + ["--num-classes", "4"]) == 0
    assert load_checkpoint(out / "checkpoint.npz")["meta"]["config"]["num_classes"] == 4
    assert run(train.main, argv + ["--num-classes", "3", "--instances", "--overwrite"]) == 2
    assert "--instances" in one_line_error(capsys)


def test_a_16_bit_0_65535_mask_is_binary(tmp_path, rng):
    data = class_folder(tmp_path / "d", rng, label_suffix=".tif", levels=2, dtype=np.uint16,
                        scale=65535)
    out = tmp_path / "run"
    assert run(train.main, ["--data", str(data), *TINY, "--iterations", "1", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.npz")["meta"]["config"]["num_classes"] == 2


def test_gray_values_as_labels_are_not_taken_for_256_classes(tmp_path, rng, capsys):
    """A label saved as a gray image (values 0..255) is far more likely a mistake than 256
    classes: refused with the file named, and --num-classes to insist."""
    data = class_folder(tmp_path / "d", rng, levels=200)
    assert run(train.main, ["--data", str(data), *TINY, "--iterations", "1",
                            "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "labels" in err and "--num-classes" in err


# ---- bug 3: NaN or infinite pixels ------------------------------------------------------------
def nan_tiff(path, rng, bad=np.nan, size=40):
    image = rng.random((size, size)).astype(np.float32)
    image[10:15, 20:25] = bad
    tifffile.imwrite(path, image, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    argv = ["--synthetic-count", "3", "--synthetic-size", "48", *TINY, "--iterations", "1",
            "--out", str(out)]
    assert run(train.main, argv) == 0
    return out / "checkpoint.npz"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_predict_refuses_nan_or_infinite_pixels(tmp_path, rng, capsys, checkpoint, bad):
    image = nan_tiff(tmp_path / "bad.tif", rng, bad)
    status = run(predict.main, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "p"),
                                "--device", "cpu", str(image)])
    err = one_line_error(capsys)
    assert status == 2
    assert "bad.tif" in err and "25 NaN or infinite" in err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_train_refuses_an_image_with_nan(tmp_path, rng, capsys):
    data = class_folder(tmp_path / "d", rng, levels=2)
    (data / "images" / "c1.png").unlink()
    nan_tiff(data / "images" / "c1.tif", rng, size=40)
    assert run(train.main, ["--data", str(data), *TINY, "--iterations", "1",
                            "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "c1.tif" in err and "NaN or infinite" in err


def test_evaluate_refuses_a_prediction_with_nan(tmp_path, rng, capsys):
    (tmp_path / "pred").mkdir()
    nan_tiff(tmp_path / "pred" / "a_prob.tif", rng)
    write_image(tmp_path / "truth" / "a.png", (rng.random((40, 40)) > 0.5))
    assert run(evaluate.main, ["--pred", str(tmp_path / "pred"), "--truth",
                               str(tmp_path / "truth")]) == 2
    err = one_line_error(capsys)
    assert "a_prob.tif" in err and "NaN or infinite" in err


# ---- bug 5: prediction and validation choose their own tile ----------------------------------
@pytest.fixture
def count_forward(monkeypatch):
    calls = []
    forward = UNet.forward

    def counting(self, x):
        calls.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", counting)
    return calls


def test_predict_chooses_its_own_tile_and_keeps_tile_as_an_option(tmp_path, rng, capsys,
                                                                  checkpoint, count_forward):
    """Trained with --tile 44 (a 4 x 4 output): a 48 x 48 image is one tile of 88 (-> 48), not
    144 tiles of 44; --tile 44 still gives 144."""
    write_image(tmp_path / "img.png", (rng.random((48, 48)) * 255).astype(np.uint8))
    base = ["--checkpoint", str(checkpoint), "--device", "cpu", str(tmp_path / "img.png")]
    assert run(predict.main, base + ["--out", str(tmp_path / "auto")]) == 0
    assert count_forward == [(1, 1, 88, 88)]
    assert "tile 88" in capsys.readouterr().out
    count_forward.clear()
    assert run(predict.main, base + ["--out", str(tmp_path / "fixed"), "--tile", "44"]) == 0
    assert len(count_forward) == 144 and count_forward[0] == (1, 1, 44, 44)


def test_validation_does_not_use_the_training_tile(tmp_path, count_forward, capsys):
    """3 training steps on 44-tiles, then 2 validation images of 48 x 48: one tile each."""
    argv = ["--synthetic-count", "3", "--synthetic-size", "48", *TINY, "--iterations", "3",
            "--out", str(tmp_path / "run")]
    assert run(train.main, argv) == 0
    assert len(count_forward) == 3 + 2, count_forward
    assert count_forward[3:] == [(1, 1, 88, 88)] * 2


# ---- command-line wording ----------------------------------------------------------------------
def test_an_invalid_tile_is_answered_with_tile_options(tmp_path, capsys, checkpoint):
    assert run(train.main, ["--synthetic-count", "3", "--synthetic-size", "48", *TINY,
                            "--iterations", "1", "--out", str(tmp_path / "r"), "--tile", "45"]) == 2
    err = one_line_error(capsys)
    assert "use --tile 44 or --tile 48" in err and "UNet." not in err
    assert run(predict.main, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "p"),
                              "--tile", "50", str(checkpoint)]) == 2
    err = one_line_error(capsys)
    assert "use --tile 48 or --tile 52" in err and "UNet." not in err


def test_evaluate_skips_hidden_files_as_training_does(tmp_path, rng):
    """One rule for image files everywhere: '._a.png' (macOS metadata) is not an image."""
    mask = rng.random((20, 20)) > 0.5
    for folder in ("pred", "truth"):
        write_image(tmp_path / folder / "a.png", mask)
    (tmp_path / "pred" / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert run(evaluate.main, ["--pred", str(tmp_path / "pred"), "--truth",
                               str(tmp_path / "truth")]) == 0
