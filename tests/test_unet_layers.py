"""UNet.layer_table: Fig. 1 as a table, checked against what a real forward pass does.

The forward pass is observed, not re-implemented: every differentiable op that ``UNet.forward``
calls (through ``minunet.functional``) is wrapped to record its output shape, in call order.
"""
from __future__ import annotations

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F

OPS = {"conv3x3": "conv 3x3 + ReLU", "max_pool2x2": "max-pool 2x2", "dropout": "dropout",
       "conv_transpose2x2": "up-conv 2x2", "crop_concat": "crop + concat", "conv1x1": "conv 1x1"}


def recorded_forward(model, x, monkeypatch):
    """Run ``model(x)`` and return [(op, input shape, output shape)], one entry per layer of the
    table: a conv 3x3 and the ReLU that follows it are one layer (the ReLU is checked to follow)."""
    calls = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            main_input = args[1] if name == "crop_concat" else args[0]   # crop_concat(skip, up)
            calls.append((name, main_input.shape, out.shape, args[0].shape))
            return out
        return wrapper

    for name in (*OPS, "relu"):
        monkeypatch.setattr(F, name, recording(name, getattr(F, name)))
    y = model(x)
    layers = []
    for k, (name, shape_in, shape_out, first_arg) in enumerate(calls):
        if name == "relu":
            assert calls[k - 1][0] == "conv3x3" and shape_in == calls[k - 1][2], calls[k - 1:k + 1]
            continue
        layers.append((OPS[name], shape_in, shape_out, first_arg))
    return y, layers


def expected_parameters(row) -> int:
    """Weights + biases of one layer, from its kind and channel counts (not from the model)."""
    cin, cout = row["in_channels"], row["out_channels"]
    per_op = {"conv 3x3 + ReLU": 9 * cin * cout + cout, "up-conv 2x2": 4 * cin * cout + cout,
              "conv 1x1": cin * cout + cout}
    return per_op.get(row["op"], 0)


@pytest.mark.parametrize("depth, base, in_channels, classes, dropout, n",
                         [(1, 3, 1, 2, 0.5, 1), (2, 2, 2, 3, 0.0, 2), (3, 3, 1, 4, 0.5, 2),
                          (4, 1, 3, 2, 0.5, 1)])
def test_layer_table_matches_a_real_forward_pass(depth, base, in_channels, classes, dropout, n,
                                                 rng, monkeypatch):
    """Every row's op, channels and sizes are what the forward pass really does, in order, for
    random valid tile sizes; parameters add up to the model's; crop offsets centre the skip."""
    model = mu.UNet(in_channels=in_channels, num_classes=classes, base_channels=base, depth=depth,
                    dropout=dropout, seed=int(rng.integers(1000)))
    size = mu.UNet.valid_input_size(int(rng.integers(20, 200)), depth)
    table = model.layer_table(size)
    x = mu.Tensor(rng.standard_normal((n, in_channels, size, size)))
    y, layers = recorded_forward(model, x, monkeypatch)

    assert [row["op"] for row in table] == [op for op, *_ in layers]
    for row, (op, shape_in, shape_out, first_arg) in zip(table, layers):
        assert shape_in == (n, row["in_channels"], row["in_size"], row["in_size"]), (row, shape_in)
        assert shape_out == (n, row["out_channels"], row["out_size"], row["out_size"]), (row, shape_out)
        if op == "crop + concat":       # the skip map: its size and the centre crop's offset
            assert first_arg[2:] == (row["skip_size"], row["skip_size"]), (row, first_arg)
            assert 2 * row["crop_offset"] == row["skip_size"] - row["out_size"], row
        else:
            assert row["skip_size"] is None and row["crop_offset"] is None, row
        assert row["parameters"] == expected_parameters(row), row
    assert y.shape == (n, classes, table[-1]["out_size"], table[-1]["out_size"])
    assert table[-1]["out_size"] == mu.UNet.output_size(size, depth)
    assert sum(row["parameters"] for row in table) == sum(p.size for p in model.parameters())
    assert (sum(row["op"] == "dropout" for row in table) == 2) == (dropout > 0)
    assert len({row["name"] for row in table}) == len(table), "layer names must be unique"
    params = dict(model.named_parameters())
    for row in table:
        if row["parameters"]:
            assert params[row["name"] + ".weight"].size + params[row["name"] + ".bias"].size \
                == row["parameters"], row


def test_layer_table_of_the_paper_network():
    """Fig. 1 with the defaults: 572 -> 388, 23 convolutional layers, 31,030,658 parameters,
    crop offsets 4, 16, 40, 88 (from the bottom up)."""
    table = mu.UNet().layer_table(572)
    assert table[0]["in_size"] == 572 and table[-1]["out_size"] == 388
    assert sum(row["op"] in ("conv 3x3 + ReLU", "up-conv 2x2", "conv 1x1") for row in table) == 23
    assert sum(row["parameters"] for row in table) == 31_030_658
    crops = [(row["skip_size"], row["out_size"], row["crop_offset"]) for row in table
             if row["op"] == "crop + concat"]
    assert crops == [(64, 56, 4), (136, 104, 16), (280, 200, 40), (568, 392, 88)]
    assert max(row["out_channels"] for row in table) == 1024


@pytest.mark.parametrize("size", [570, 187, 0])
def test_layer_table_refuses_an_invalid_size(size):
    with pytest.raises(ValueError, match="not valid for a depth-4 U-Net"):
        mu.UNet(base_channels=1).layer_table(size)


def test_layer_table_does_not_change_the_model():
    model = mu.UNet(base_channels=2, depth=2, seed=3)
    before = {name: np.array(p.numpy()) for name, p in model.named_parameters()}
    model.layer_table(mu.UNet.valid_input_size(60, 2))
    assert model.forward_count == 0
    for name, p in model.named_parameters():
        assert np.array_equal(p.numpy(), before[name]), name
