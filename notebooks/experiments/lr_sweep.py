"""The learning-rate check behind notebook 08's choice (lr 0.001 at momentum 0.99).

    python notebooks/experiments/lr_sweep.py LR MOMENTUM SEED STEPS

Trains notebook 08's network (depth 3, 16 base channels, 180 tiles) on its data (16 synthetic EM
images) for STEPS steps and prints one JSON line: the seconds per step and the mean loss of each
quarter of the run. A setting that converges lowers the mean loss quarter after quarter; run it
for several seeds, and with NUMBA_NUM_THREADS=1 to change the float rounding as another machine
would. About 5 s per 100 steps on an idle 2-core CPU.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

import minunet as mu
import minunet.functional as F
from minunet.data import TileSampler, standardize, synthetic_samples


def main(lr: float, momentum: float, seed: int, steps: int) -> dict:
    train = synthetic_samples("em", n=16, size=192, seed=0)
    model = mu.UNet(base_channels=16, depth=3, seed=seed)
    tile = model.valid_input_size(180)
    sampler = TileSampler(train, tile, model.output_size(tile), np.random.default_rng(seed), augment=True)
    optimizer = mu.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        x, target, weight = sampler.batch(1)
        loss = F.weighted_cross_entropy(model(mu.Tensor(standardize(x))), mu.Tensor(target), mu.Tensor(weight))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    quarters = np.array_split(np.array(losses), 4)
    return dict(lr=lr, momentum=momentum, seed=seed, tile=tile,
                s_per_step=round((time.perf_counter() - start) / steps, 4),
                quarters=[round(float(q.mean()), 3) for q in quarters])


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    print(json.dumps(main(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
