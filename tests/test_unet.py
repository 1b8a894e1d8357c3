"""The paper's U-Net: shapes, parameter count, size rules, state dicts, SGD, and learning."""
from __future__ import annotations

import numpy as np
import pytest

import minunet as mu
import minunet.functional as F


def test_paper_network_shape_and_parameter_count():
    model = mu.UNet()
    assert sum(p.size for p in model.parameters()) == 31_030_658      # Fig. 1, 2 classes
    assert mu.UNet.output_size(572) == 388 and model.output_size(572) == 388
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["down1.conv1.weight", "down1.conv1.bias"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert all(a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0] for a, b in zip(names[::2], names[1::2]))


def test_forward_shape_small_network(rng):
    model = mu.UNet(in_channels=1, num_classes=3, base_channels=2, depth=4)
    with mu.no_grad():
        y = model.eval()(mu.Tensor(rng.standard_normal((2, 1, 188, 204))))
    assert y.shape == (2, 3, 4, 20)


def test_valid_sizes_rule():
    valid = [s for s in range(150, 700) if s == mu.UNet.valid_input_size(s)]
    assert valid == [s for s in range(188, 700) if s % 16 == 12]         # DESIGN: s = 12 mod 16
    assert all(mu.UNet.output_size(s) == s - 184 for s in valid)
    assert mu.UNet.valid_input_size(573) == 588
    # depth 2 by hand: 44 -4-> 40 /2-> 20 -4-> 16 /2-> 8 -4-> 4 (bottom) x2-4-> 4 x2-4-> 4
    assert mu.UNet.output_size(44, 2) == 4 and mu.UNet.valid_input_size(30, 2) == 44
    assert [s for s in range(30, 70) if s == mu.UNet.valid_input_size(s, 2)] == list(range(44, 70, 4))


def test_invalid_input_size_names_nearest_valid_sizes():
    model = mu.UNet(base_channels=1)
    with pytest.raises(ValueError, match="nearest valid sizes are 188 or 204"):
        model(mu.Tensor(np.zeros((1, 1, 200, 188))))
    with pytest.raises(ValueError, match="1 input channel"):
        model(mu.Tensor(np.zeros((1, 3, 188, 188))))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        mu.UNet(depth=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        mu.UNet(dropout=1.5)


def test_init_is_gaussian_with_he_std():
    model = mu.UNet(base_channels=8, seed=1)
    w = model.down2.conv1.weight.numpy()        # fan_in = 8 * 9
    assert abs(w.std() - np.sqrt(2 / 72)) < 0.02 * np.sqrt(2 / 72) * 10
    assert np.all(model.down2.conv1.bias.numpy() == 0)


def test_state_dict_round_trip_through_npz(tmp_path):
    a = mu.UNet(base_channels=4, seed=1)
    b = mu.UNet(base_channels=4, seed=2)
    np.savez(tmp_path / "w.npz", **a.state_dict())
    with np.load(tmp_path / "w.npz") as f:
        b.load_state_dict(dict(f))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and np.array_equal(pa.numpy(), pb.numpy())
    with pytest.raises(ValueError, match="another architecture"):
        mu.UNet(base_channels=8).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        mu.UNet(base_channels=4, depth=3).load_state_dict(a.state_dict())


def test_sgd_matches_the_momentum_formula(rng):
    p = mu.Parameter(rng.standard_normal(5))
    opt = mu.optim.SGD([p], lr=0.1, momentum=0.9)
    v = np.zeros(5)
    x = p.numpy().astype(np.float64)
    for _ in range(3):
        g = rng.standard_normal(5)
        p.grad = mu.Tensor(g)
        opt.step()
        v = 0.9 * v + g.astype(np.float32)
        x = x - 0.1 * v
    np.testing.assert_allclose(p.numpy(), x, rtol=1e-5, atol=1e-6)


def test_dropout_masks_change_between_steps_but_not_in_eval(rng):
    model = mu.UNet(base_channels=2, depth=2, dropout=0.5)
    x = mu.Tensor(rng.standard_normal((1, 1, 44, 44)))
    a, b = model(x).numpy(), model(x).numpy()
    assert not np.array_equal(a, b)
    model.eval()
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())


def test_overfits_one_tile_on_cpu(rng):
    """Training works end to end: on one small tile the loss falls more than 10x."""
    model = mu.UNet(in_channels=1, num_classes=2, base_channels=8, depth=2, dropout=0.0, seed=0)
    size = mu.UNet.valid_input_size(60, 2)
    out = mu.UNet.output_size(size, 2)
    img = rng.standard_normal((1, 1, size, size)).astype(np.float32)
    m = (size - out) // 2
    # a learnable target: foreground where the smoothed image is bright
    target = (img[0, 0, m:m + out, m:m + out] > 0.2).astype(np.int32)[None]
    x, t = mu.Tensor(img), mu.Tensor(target)
    opt = mu.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.weighted_cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
