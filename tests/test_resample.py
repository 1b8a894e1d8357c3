"""The augmentation's resampling (minunet/ops/resample.py, kernels/resample.cu) against its oracle,
scipy.ndimage.map_coordinates with the modes minunet.data.elastic uses: cubic (order 3, with
scipy's spline prefilter), nearest (order 0) and linear (order 1), mode "mirror".

Tolerances, stated: the image (values in [0, 1]) within atol 1e-5 of scipy (float32 spline
coefficients and float32 16-term sums on cuda/emu; the cpu kernel sums in float64), the weight
map within 1e-6 relative, the label EXACTLY, ties at half-integers and coordinates folded over
several periods of the mirror included. The registry's cases run in tests/test_kernels.py (emu,
cuda) and tests/test_cpu_kernels.py (cpu) against the reference; here every device is compared
with scipy on the raw image, the way elastic.py calls it.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from minunet.backends import get_backend
from minunet.devices import cuda_status, to_host
from minunet.ops import resample as R

from .conftest import assert_close

IMAGE_TOL = dict(rtol=0.0, atol=1e-5)
WEIGHT_TOL = dict(rtol=1e-6, atol=1e-6)


def backend_of(device: str):
    if device == "cuda":
        available, reason = cuda_status()
        if not available:
            pytest.skip(f"CuPy with a GPU is not available: {reason}")
    return get_backend(device)


def random_problem(rng, channels, H, W, h, w, spread=2.0):
    image = rng.random((channels, H, W)).astype(np.float32)
    label = rng.integers(0, 5, (H, W)).astype(np.int32)
    weight = (0.2 + 3.0 * rng.random((H, W))).astype(np.float32)
    spans = np.array([H, W], np.float64)[:, None, None]
    coords = (rng.random((2, h, w)) * (2 * spread + 1) - spread) * spans
    ties = rng.random((2, h, w)) < 0.2
    coords[ties] = np.floor(coords[ties]) + 0.5     # nearest-neighbour ties, in and out of range
    return image, label, weight, coords.astype(np.float32)


def scipy_oracle(image, label, weight, where):
    """What minunet.data.elastic.warp_with_coordinates computes (before its clip)."""
    cubic = np.stack([ndimage.map_coordinates(plane, where, order=3, mode="mirror") for plane in image])
    return (cubic, ndimage.map_coordinates(label, where, order=0, mode="mirror"),
            np.maximum(ndimage.map_coordinates(weight, where, order=1, mode="mirror"), 0))


@pytest.mark.parametrize("device", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("channels,H,W,h,w,origin", [(1, 23, 19, 17, 21, (0, 0)),
                                                      (2, 9, 14, 25, 12, (-7, 30)),
                                                      (1, 2, 11, 6, 9, (5, -3))])
def test_every_device_matches_scipy_map_coordinates(rng, device, channels, H, W, h, w, origin):
    backend = backend_of(device)
    image, label, weight, coords = random_problem(rng, channels, H, W, h, w)
    where = coords.astype(np.float64) + np.array(origin, np.float64)[:, None, None]
    lo, hi = float(image.min()), float(image.max())
    want_image, want_label, want_weight = scipy_oracle(image, label, weight, where)
    xp = backend.xp
    got = backend.resample(xp.asarray(R.spline_coefficients(image)), xp.asarray(label),
                           xp.asarray(weight), xp.asarray(coords), origin, (lo, hi))
    got_image, got_label, got_weight = (to_host(a) for a in got)
    assert got_image.dtype == np.float32 and got_weight.dtype == np.float32
    assert got_label.dtype == np.int32
    np.testing.assert_array_equal(got_label, want_label)
    assert_close(got_image, np.clip(want_image, lo, hi), what=f"image on {device}", **IMAGE_TOL)
    assert_close(got_weight, want_weight, what=f"weight on {device}", **WEIGHT_TOL)


def test_the_reference_is_scipy_with_its_prefilter_split_off(rng):
    """map_coordinates(image, order=3) == map_coordinates(spline_coefficients(image),
    prefilter=False): the coefficients are stored in float32, hence the 1e-6."""
    image, label, weight, coords = random_problem(rng, 2, 15, 12, 10, 13)
    got = R.reference(R.spline_coefficients(image), label, weight, coords, (0, 0), (-9.0, 9.0))
    want = scipy_oracle(image, label, weight, coords.astype(np.float64))
    assert_close(got[0], want[0], rtol=0.0, atol=1e-6, what="image")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2].astype(np.float32))


def test_clipping_and_the_identity_map(rng):
    """Integer coordinates hit the knots: the spline reproduces the pixels; bounds clip."""
    image, label, weight, _ = random_problem(rng, 1, 8, 9, 1, 1)
    coords = np.mgrid[0:8, 0:9].astype(np.float32)
    out = get_backend("cpu").resample(R.spline_coefficients(image), label, weight, coords, (0, 0),
                                      (0.25, 0.75))
    assert_close(out[0], np.clip(image, 0.25, 0.75), rtol=0.0, atol=1e-6, what="identity")
    np.testing.assert_array_equal(out[1], label)
    np.testing.assert_array_equal(out[2], weight)


@pytest.mark.parametrize("bad,match", [
    (dict(label=np.zeros((4, 5), np.int32)), "must have the image"),
    (dict(label=np.zeros((4, 4), np.float32)), "integer class ids"),
    (dict(coords=np.zeros((3, 2, 2), np.float32)), r"coords must be \(2, h, w\)"),
    (dict(coefficients=np.zeros((4, 4), np.float32)), r"coefficients must be \(C, H, W\)"),
    (dict(bounds=(1.0, 0.0)), "lo <= hi"),
])
@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_bad_arguments_are_named(device, bad, match):
    args = dict(coefficients=np.zeros((1, 4, 4), np.float32), label=np.zeros((4, 4), np.int32),
                weight=np.ones((4, 4), np.float32), coords=np.zeros((2, 3, 3), np.float32),
                origin=(0, 0), bounds=(0.0, 1.0))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        get_backend(device).resample(*args.values())


# ---- the coordinate map and the gray values on the device (kernels/resample.cu) -------------------
@pytest.mark.parametrize("device", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("out_shape,in_shape,grid,elastic", [((37, 41), (90, 85), 3, True),
                                                              ((20, 9), (33, 64), 4, True),
                                                              ((31, 31), (60, 60), 3, False)])
def test_composed_coordinates_are_the_hosts_bit_for_bit(device, out_shape, in_shape, grid, elastic):
    """compose_coordinates repeats Transform.coordinates' roundings (products never fused into an
    FMA): the maps are equal except where the host's BLAS product for the displacement summed in
    another order - at most one float32 ulp, and at most 1 pixel in 10,000 of them."""
    from minunet.data.elastic import random_transform, spline_matrix

    backend = backend_of(device)
    rng = np.random.default_rng(11)
    for _ in range(4):
        t = random_transform(rng, max_shift=10.0, elastic_std=10.0 if elastic else 0.0, grid=grid)
        want = t.coordinates(out_shape, in_shape)
        splines = (spline_matrix(out_shape[0], grid), spline_matrix(out_shape[1], grid)) if elastic \
            else (None, None)
        got = to_host(backend.compose_coordinates(out_shape, in_shape, t.angle, (t.flip_y, t.flip_x),
                                                  t.shift, t.nodes, *splines))
        assert got.dtype == np.float32 and got.shape == (2, *out_shape)
        assert np.all(np.abs(got - want) <= np.spacing(np.abs(want))), "more than one ulp apart"
        assert np.count_nonzero(got != want) <= got.size // 10_000


def test_the_device_sampler_builds_no_coordinate_array_on_the_host(monkeypatch):
    """On a kernel device the sampler hands the transform's numbers to compose_coordinates: the
    host's per-pixel composition (transform_coordinates) is never called."""
    from minunet.data import elastic
    from minunet.data.dataset import TileSampler, synthetic_samples

    def refuse(*args, **kwargs):
        raise AssertionError("the host composed a coordinate map")

    samples = synthetic_samples("cells", 2, size=40, seed=1)
    sampler = TileSampler(samples, 44, 4, np.random.default_rng(2), device="emu")
    monkeypatch.setattr(elastic, "transform_coordinates", refuse)
    x, target, weight = sampler.batch(2)
    assert x.shape == (2, 1, 44, 44) and target.shape == weight.shape == (2, 4, 4)
    assert np.isfinite(x).all()


@pytest.mark.parametrize("device", ["emu", "cuda"])
def test_training_batch_standardises_on_the_device_like_the_host(device):
    """train.training_batch on a kernel device (gray values and standardisation in kernels) gives
    the cpu sampler's batch (NumPy gray values, io.standardize) for the same seed: labels
    exactly, weights within WEIGHT_TOL (the cpu resampler sums in float64), images within 2e-5 (float32 means and spreads on the host, float64 in the
    kernel; standardised values up to ~4)."""
    from minunet.data.dataset import TileSampler, synthetic_samples
    from minunet.train import training_batch

    backend_of(device)
    samples = synthetic_samples("em", 2, size=48, seed=4)
    host = TileSampler(samples, 44, 4, np.random.default_rng(9), device="cpu")
    dev = TileSampler(samples, 44, 4, np.random.default_rng(9), device=device)
    for _ in range(2):
        want, got = training_batch(host, 2), training_batch(dev, 2)
        np.testing.assert_array_equal(to_host(got[1]), want[1])
        assert_close(to_host(got[2]), want[2], what=f"weights on {device}", **WEIGHT_TOL)
        x = to_host(got[0])
        assert_close(x, want[0], rtol=0.0, atol=2e-5, what=f"standardised batch on {device}")
        assert_close(x.mean(axis=(1, 2, 3)), np.zeros(2), rtol=0.0, atol=1e-5, what="means")
    assert dev.rng.bit_generator.state == host.rng.bit_generator.state


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_gray_values_refuse_bad_arguments(device):
    backend = get_backend(device)
    with pytest.raises(ValueError, match="gamma"):
        backend.gray_values(np.zeros((1, 4, 4), np.float32), -1.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="planes"):
        backend.gray_values(np.zeros(5, np.float32), None, None, None, True)
    with pytest.raises(ValueError, match="nodes"):
        backend.compose_coordinates((4, 4), (8, 8), 0.0, (False, False), (0.0, 0.0),
                                    np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 3)))
