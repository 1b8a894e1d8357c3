"""Does eq. 2's border term help at a notebook's budget? The experiment behind notebook 05's note.

    python notebooks/experiments/border_weights.py W0 SEED STEPS

Trains notebook 08's network (depth 3, 16 base channels, 132 tiles, lr 0.001, momentum 0.99) on
12 synthetic touching-cell images whose weight maps use eq. 2 with this W0 (0: class balancing
only), then predicts 3 held-out images and prints one JSON line: the true cells, the predicted
regions that cover two or more of them (merges, each overlap at least 10 pixels), the cells inside
such regions (merged_cells), and the mean Rand error of the mask P > 0.5.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from scipy import ndimage

import minunet as mu
import minunet.functional as F
from minunet.data import TileSampler, standardize, synthetic_samples
from minunet.inference import predict_probabilities
from minunet.metrics import rand_error


def merged(pred: np.ndarray, truth: np.ndarray, min_pixels: int = 10) -> tuple[int, int, int]:
    """(true cells, predicted regions covering 2+ cells, cells inside such regions)."""
    truth_labels, cells = ndimage.label(truth)
    pred_labels, _ = ndimage.label(pred)
    pairs, counts = np.unique(np.stack([truth_labels.ravel(), pred_labels.ravel()]), axis=1,
                              return_counts=True)
    keep = (pairs[0] > 0) & (pairs[1] > 0) & (counts >= min_pixels)
    per_region = np.bincount(pairs[1, keep])           # true cells each predicted region covers
    multi = per_region[per_region >= 2]
    return cells, len(multi), int(multi.sum())


def main(w0: float, seed: int, steps: int) -> dict:
    train = synthetic_samples("cells", n=12, size=160, seed=0, w0=w0)
    val = synthetic_samples("cells", n=3, size=160, seed=10_000)
    model = mu.UNet(base_channels=16, depth=3, seed=seed)
    tile = model.valid_input_size(132)
    sampler = TileSampler(train, tile, model.output_size(tile), np.random.default_rng(seed), augment=True)
    optimizer = mu.optim.SGD(model.parameters(), lr=0.001, momentum=0.99)
    start = time.perf_counter()
    for _ in range(steps):
        x, target, weight = sampler.batch(1)
        loss = F.weighted_cross_entropy(model(mu.Tensor(standardize(x))), mu.Tensor(target), mu.Tensor(weight))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    rows = []
    for sample in val:
        mask = predict_probabilities(model, sample.image, tile, "cpu")[1] > 0.5
        rows.append((*merged(mask, sample.target > 0), rand_error(mask, sample.target > 0)))
    r = np.array(rows, float)
    return dict(w0=w0, seed=seed, steps=steps, seconds=round(time.perf_counter() - start, 1),
                cells=int(r[:, 0].sum()), merges=int(r[:, 1].sum()), merged_cells=int(r[:, 2].sum()),
                rand_error=round(float(r[:, 3].mean()), 4))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    print(json.dumps(main(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
