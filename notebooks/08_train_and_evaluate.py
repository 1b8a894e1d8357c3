# %% [markdown]
# # 8. Training a U-Net and measuring it
#
# Everything so far comes together here, at a size that trains in well under a minute on an
# idle 2-core CPU (the training cell prints how long it took, and on which machine, when this
# notebook was built). The method is the paper's (Section 3):
#
# * **one large tile per step** (batch size 1): "we favor large input tiles over a large
#   batch size";
# * **SGD with momentum 0.99**, "such that a large number of the previously seen training
#   samples determine the update in the current optimization step" (the paper gives no
#   learning rate; the one below is chosen for this small network, see the training loop);
# * the **weighted softmax cross-entropy** of eq. 1, $E = \sum_x w(x) \log p_{\ell(x)}(x)$
#   (negated, averaged over pixels), whose weight map $w$ balances the classes (eq. 2's
#   $w_c$; the border term of eq. 2 matters for touching cells, `--instances`);
# * **Gaussian initialisation** with standard deviation $\sqrt{2/N}$, $N$ = incoming nodes
#   of a neuron (built into `mu.UNet`);
# * **augmentation** by elastic deformation, rotation, flips and gray values
#   (Section 3.1, notebook 6);
# * **overlap-tile prediction** (Fig. 2, notebook 7) and the **ISBI 2012 metrics**
#   (Section 4, Table 1): pixel, Rand and warping error, next to the paper's numbers at the end.
#
# The data are minunet's synthetic EM-like images (cells separated by dark membranes, in the
# spirit of the ISBI 2012 challenge), generated from a seed — no download. The network is
# scaled down: 16 base channels instead of 64, 3 poolings instead of 4.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds
from nbsetup import machine
import time

# %%
from minunet.data import TileSampler, standardize, synthetic_samples
from minunet.inference import predict_probabilities

train = synthetic_samples("em", n=16, size=192, seed=0)     # images in [0, 1]
val = synthetic_samples("em", n=2, size=192, seed=10_000)     # other seeds: unseen images
s = train[0]
print(len(train), "training and", len(val), "validation images;", s.image.shape,
      "| target classes", np.unique(s.target), "| weights", np.unique(s.weight).round(2))

# %% [markdown]
# Each sample has an image, a target (1 = cell interior, 0 = membrane) and a weight map.
# Membranes are the minority class, so eq. 2's $w_c$ gives each membrane pixel the weight
# #cell pixels / #membrane pixels: both classes then pull equally on the loss, and the
# thin membranes — which decide whether two cells are separated — are not ignored.

# %%
fig, axes = plt.subplots(1, 3, figsize=(8, 2.9))
for ax, (im, title, cmap) in zip(axes, [(s.image, "image", "gray"),
                                        (s.target, "target: 1 = cell", "gray"),
                                        (s.weight, "weight map w(x)", "viridis")]):
    shown = ax.imshow(im, cmap=cmap); ax.set_title(title); ax.axis("off")
fig.colorbar(shown, ax=axes[2], fraction=0.046)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## The network and the training tiles
#
# Depth 3 makes valid input sizes $\equiv 4 \pmod 8$ and output = input - 88 (notebook 4).
# `mu.UNet` puts dropout with rate 0.5 at the end of the contracting path: the paper says
# "drop-out layers at the end of the contracting path perform further implicit data
# augmentation" but gives no rate; 0.5 is the rate of the authors' released Caffe model.
# `TileSampler` draws a random image and position, cuts the input tile (mirroring where it
# leaves the image), deforms it with the label and weights (notebook 6) and returns the
# label and weights of the central output square.

# %%
model = mu.UNet(base_channels=16, depth=3, seed=0)            # dropout 0.5: see below
TILE = model.valid_input_size(180)                            # for the model's own depth, 3
OUT = model.output_size(TILE)
print(f"{sum(p.size for p in model.parameters()):,} parameters; tile {TILE} -> {OUT}")
sampler = TileSampler(train, TILE, OUT, np.random.default_rng(0), augment=True)
x, target, weight = sampler.sample()
print("one example:", x.shape, target.shape, weight.shape)

# %%
m = (TILE - OUT) // 2
fig, axes = plt.subplots(1, 3, figsize=(8, 2.9))
axes[0].imshow(x[0], cmap="gray")
axes[0].add_patch(plt.Rectangle((m - 0.5, m - 0.5), OUT, OUT, fill=False, ec="yellow", lw=1.5))
axes[0].set_title(f"input tile {TILE}x{TILE}")
axes[1].imshow(target, cmap="gray"); axes[1].set_title(f"target {OUT}x{OUT}")
shown = axes[2].imshow(weight, cmap="viridis"); axes[2].set_title("weights w(x)")
fig.colorbar(shown, ax=axes[2], fraction=0.046)
for ax in axes: ax.axis("off")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## The training loop
#
# Each step: forward, the weighted loss of eq. 1, backward (notebook 1), one SGD update,
# reset the gradients: the loop of `minunet.train` without its checkpoints and logs, 400
# steps (the cell prints their time and the machine). Each tile is **standardised** (zero mean, unit variance)
# after augmentation — the gray-value changes work on intensities in [0, 1] — and
# `predict_probabilities` below standardises each image the same way: with no
# normalisation layers in the network, a centred input keeps the first layers
# well-behaved, and training and prediction must see inputs on the same scale.
#
# **The learning rate.** With momentum $m$ an update is, in the long run, the recent gradients
# summed with weight $1/(1 - m)$: at the paper's $m = 0.99$ a learning rate of 0.001 moves
# the weights like plain SGD at 0.1. An earlier version of this notebook used 0.003 (plain
# SGD at 0.3): on the machine it was built on its loss fell, but a rebuild on another
# machine, whose float rounding differed, saw the loss rise again after step 200 and a much
# worse Rand error. That is a step size at the edge of stability, where tiny differences
# decide. At 0.001 the mean loss fell in every quarter of the 400 steps for each of three
# seeds tried (model and tile sampler seeds 1, 2, 3, on the 2-core AVX-512 VM named below),
# and it reached the same loss as 0.003 by the end (0.39-0.43 over the last 100 steps). The
# notebook's own seed 0 run with one Numba thread instead of two, which changes the float
# rounding as another machine would, gave 0.883, 0.455, 0.379, 0.368 by quarter: other
# numbers, the same descent. (At 0.0015 one of the three seeds rose in its last quarter, and
# so did one with lr 0.01 at momentum 0.9. The check:
# `python notebooks/experiments/lr_sweep.py LR MOMENTUM SEED STEPS`.)

# %%
optimizer = mu.optim.SGD(model.parameters(), lr=0.001, momentum=0.99)
losses = []
STEPS = 400
start = time.perf_counter()
for step in range(1, STEPS + 1):
    x, target, weight = sampler.batch(1)                      # (1, 1, 180, 180), (1, 92, 92) x 2
    x = standardize(x)
    logits = model(mu.Tensor(x))                              # (1, 2, 92, 92)
    loss = F.weighted_cross_entropy(logits, mu.Tensor(target), mu.Tensor(weight))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
    if step % 100 == 0:
        print(f"step {step}: mean loss of the last 100 steps {np.mean(losses[-100:]):.3f}")
train_seconds = time.perf_counter() - start
print(f"{STEPS} steps in {train_seconds:.0f} s ({1e3 * train_seconds / STEPS:.0f} ms per step, tile "
      f"augmentation included), measured when this notebook was built on: {machine()}")

# %%
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(losses, lw=0.6, alpha=0.4, label="loss of one tile")
ax.plot(np.arange(19, len(losses)), np.convolve(losses, np.ones(20) / 20, "valid"), label="running mean of 20")
ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("weighted cross-entropy (eq. 1)")
ax.legend(); ax.grid(alpha=0.3, which="both")
plt.show()

# %% [markdown]
# The loss of a single tile is noisy (each tile is a different random, deformed piece of a
# different image); the momentum of 0.99 averages the gradients of the last ~100 steps.
#
# ## Predicting the validation images
#
# `predict_probabilities` standardises an image, cuts it into tiles with mirrored context
# (`predict_overlap_tile`, notebook 7), runs the network in `no_grad` mode and returns the
# softmax probabilities. `model.eval()` switches dropout off.

# %%
model.eval()
probs = [predict_probabilities(model, v.image, TILE, "cpu")[1] for v in val]   # P(cell)
fig, axes = plt.subplots(len(val), 4, figsize=(9, 2.4 * len(val)))
for row, (v, prob) in zip(axes, zip(val, probs)):
    for ax, (im, title, cmap) in zip(row, [(v.image, "image", "gray"), (v.target, "truth", "gray"),
                                           (prob, "P(cell)", "magma"), (prob > 0.5, "P > 0.5", "gray")]):
        ax.imshow(im, cmap=cmap); ax.set_title(title, fontsize=8); ax.axis("off")
plt.tight_layout(); plt.show()

# %% [markdown]
# `predict_probabilities` places its output squares on the pooling grid (notebook 7): for
# this depth-3 network they start at multiples of 8 (0, 88 and 104 on a 192-pixel side), so
# the tiles reproduce one pass over the whole mirror-padded image up to float32 rounding.
# Squares placed side by side instead (0, 92 and 100: `grid=1`) see the image through
# shifted pooling grids; for the trained network the difference is small, but not zero:

# %%
from minunet.data import mirror_pad, predict_overlap_tile, tile_origins
image = standardize(val[0].image)
m = (TILE - OUT) // 2
side = model.valid_input_size(192 + 2 * m)
padded = mirror_pad(image, ((m, side - 192 - m), (m, side - 192 - m)))[None, None]
with mu.no_grad():
    logits = model(mu.Tensor(padded)).numpy()[0, :, :192, :192].astype(np.float64)
whole = np.exp(logits[1]) / np.exp(logits).sum(axis=0)

def p_cell(batch):                                     # (B, 1, TILE, TILE) -> P(cell) (B, 2, OUT, OUT)
    with mu.no_grad():
        out = model(mu.Tensor(batch)).numpy().astype(np.float64)
    e = np.exp(out - out.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

off_grid = predict_overlap_tile(image, p_cell, TILE, OUT, grid=1)[1]
print("on the pooling grid, squares at", tile_origins(192, OUT, grid=8),
      f"(predict_probabilities): max |tiles - one pass| = {np.abs(probs[0] - whole).max():.1e}")
print("side by side, squares at", tile_origins(192, OUT),
      f"(grid=1):                    max |tiles - one pass| = {np.abs(off_grid - whole).max():.1e}")

# %% [markdown]
# ## How to measure a segmentation: pixel, Rand and warping error
#
# The ISBI 2012 challenge (Section 4) ranked submissions by three errors, each computed for
# the best of the thresholds 0.0, 0.1, ..., 0.9 of the probability map:
#
# * **pixel error** — 1 - F1 score of the cell pixels: how many pixels are wrong, no matter
#   where.
# * **Rand error** — 1 - Rand F-score: take two pixels of the truth's cells; are they in
#   the same cell in the truth? in the prediction? It counts pairs of pixels on which the
#   two segmentations disagree, so it punishes what matters for neuron tracing — two cells
#   **merged** through a gap in a membrane, or one cell **split** by a spurious membrane —
#   much more than a membrane drawn one pixel too thick.
# * **warping error** (Jain et al. 2010) — the truth is deformed toward the prediction by
#   flipping only pixels whose flip does not change the topology (no object split, merged,
#   created or removed); the pixels that still disagree are topological errors.
# * **IoU** — intersection over union of the cell pixels (not an ISBI metric; a common
#   summary).
#
# Three hand-made predictions for a truth of three cells show the difference: a membrane
# shifted by one pixel, a 4-pixel gap in a membrane (a merge), a spurious membrane (a split).

# %%
from minunet.metrics import pixel_error, rand_error, warping_error, iou, warp_truth, evaluate_all

truth = np.ones((40, 64), bool)                       # True = cell, False = membrane
truth[:, 20:22] = truth[:, 42:44] = False             # three cells side by side
truth[[0, -1], :] = truth[:, [0, -1]] = False         # and a membrane around them
shifted = truth.copy(); shifted[:, 20] = True; shifted[:, 22] = False   # membrane 1 px to the right
merged = truth.copy(); merged[18:22, 20:22] = True                      # a hole in a membrane
split = truth.copy(); split[19:21, 44:63] = False                       # an extra membrane
cases = {"shifted boundary": shifted, "merge": merged, "split": split}

print(f"{'prediction':18s} {'wrong pixels':>12s} {'pixel error':>11s} {'Rand error':>10s} "
      f"{'warping error':>13s} {'IoU':>6s}")
for name, pred in cases.items():
    warped = warp_truth(pred, truth)
    print(f"{name:18s} {np.count_nonzero(pred != truth):12d} {pixel_error(pred, truth):11.4f} "
          f"{rand_error(pred, truth):10.4f} {warping_error(pred, truth):8.5f} ({np.count_nonzero(warped != pred)} px)"
          f" {iou(pred, truth):6.3f}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(10, 2.1))
axes[0].imshow(truth, cmap="gray"); axes[0].set_title("truth: 3 cells", fontsize=8)
for ax, (name, pred) in zip(axes[1:], cases.items()):
    ax.imshow(pred, cmap="gray")
    wrong = np.argwhere(pred != truth)
    topo = np.argwhere(warp_truth(pred, truth) != pred)
    ax.scatter(wrong[:, 1], wrong[:, 0], s=4, c="orange", marker="s", label="differs from truth")
    ax.scatter(topo[:, 1], topo[:, 0], s=8, c="red", marker="s", label="topological error")
    ax.set_title(name, fontsize=8)
for ax in axes: ax.axis("off")
axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
plt.show()

# %% [markdown]
# The shifted membrane has the most wrong pixels but is topologically perfect: no
# warping error, and a small Rand error (a column of pixels changed cells). The merge has
# only 8 wrong pixels, the smallest pixel error — and by far the largest Rand error,
# because two whole cells are now one: every pair of pixels across them disagrees. The
# warping error marks exactly the pixels (red) that would have to change to undo the
# topological mistake. That is why the challenge ranked by Rand and warping error
# rather than by pixel error.
#
# ## The trained network's numbers
#
# `evaluate_all` applies the challenge's protocol (each error at its best threshold; IoU at
# 0.5) to each validation image:

# %%
results = [evaluate_all(prob, v.target > 0) for prob, v in zip(probs, val)]
for k, r in enumerate(results):
    print(f"validation image {k}: " + ", ".join(f"{key} {value:.4f}" for key, value in r.items()))
print("mean:               " + ", ".join(f"{key} {np.mean([r[key] for r in results]):.4f}" for key in results[0]))

# %% [markdown]
# Which topological mistakes are these? Counting connected cell regions (4-connected, at
# least 20 pixels of overlap): a **merge** is a predicted region that covers two or more
# true cells (a gap in a membrane), a **split** a true cell covered by two or more
# predicted regions (a spurious membrane).

# %%
from scipy import ndimage

def merges_and_splits(pred_cells, truth_cells, min_pixels=20):
    truth, _ = ndimage.label(truth_cells)
    pred, _ = ndimage.label(pred_cells)
    pairs, counts = np.unique(np.stack([truth.ravel(), pred.ravel()]), axis=1, return_counts=True)
    keep = (pairs[0] > 0) & (pairs[1] > 0) & (counts >= min_pixels)
    t, p = pairs[0, keep], pairs[1, keep]
    merges = sum(np.count_nonzero(p == label) >= 2 for label in np.unique(p))
    splits = sum(np.count_nonzero(t == label) >= 2 for label in np.unique(t))
    return int(truth.max()), int(pred.max()), merges, splits

for k, (prob, v) in enumerate(zip(probs, val)):
    cells_true, regions, merges, splits = merges_and_splits(prob > 0.5, v.target > 0)
    print(f"validation image {k}: {cells_true} true cells, {regions} predicted regions at P > 0.5: "
          f"{merges} merges, {splits} splits")

# %% [markdown]
# A network trained for well under a minute already gets most pixels right. The topological
# errors left are of both kinds, a handful per image (counted above; the exact numbers
# change with the machine's rounding): **splits**, where the network draws a faint, spurious
# membrane across a cell (in the "P > 0.5" panels, a cell cut in two), and **merges**, where
# a membrane has a gap and two cells run into one. Each costs the Rand error far more than
# its few wrong pixels cost the pixel error, as the hand-made cases showed. Training longer,
# with a wider and deeper network, removes most of them.
#
# ## The full run: the command line
#
# `python -m minunet.train` does all of the above with a larger network (16 base channels,
# depth 4, 348 -> 164 tiles), checkpoints, a log and plots, on the GPU when CuPy sees one:
#
# ```bash
# python -m minunet.train --out runs/em                 # synthetic EM data: 1,500 steps or 4.5 min
# python -m minunet.train --synthetic cells --out runs/cells   # touching cells, eq. 2's border weights
# python -m minunet.train --data DIR --out runs/mine    # your images/ and labels/
# python -m minunet.predict --checkpoint runs/em/checkpoint.npz big_image.tif --out preds/
# python -m minunet.evaluate --pred preds/ --truth DIR/labels
# ```
#
# It writes `checkpoint.npz`, `log.csv`, `metrics.json` (these four metrics and the loss),
# `loss.png` and `prediction.png` into `--out`; `--base-channels 64` gives the paper's
# network.
#
# ## Next to the paper: Tables 1 and 2
#
# The paper's numbers come from the challenges' hidden test data; this notebook's from two
# synthetic images. They measure the same quantities, not the same thing:

# %%
ours = {key: np.mean([r[key] for r in results]) for key in results[0]}
rows = [
    ("EM segmentation (ISBI 2012), Table 1", "warping error", "0.000353", f"{ours['warping_error']:.6f}"),
    ("", "Rand error", "0.0382", f"{ours['rand_error']:.4f}"),
    ("", "pixel error", "0.0611", f"{ours['pixel_error']:.4f}"),
    ("PhC-U373 cells (ISBI 2015), Table 2", "IoU", "0.9203 (2nd best 0.83)", "not measured"),
    ("DIC-HeLa cells (ISBI 2015), Table 2", "IoU", "0.7756 (2nd best 0.46)", "not measured"),
]
print(f"{'data set':38s} {'metric':14s} {'paper (U-Net)':>24s} {'this notebook':>14s}")
for row in rows:
    print(f"{row[0]:38s} {row[1]:14s} {row[2]:>24s} {row[3]:>14s}")
print(f"this notebook: IoU {ours['iou']:.3f}, mean of {len(results)} synthetic validation images, "
      f"after {STEPS} steps ({train_seconds:.0f} s on {machine()})")

# %% [markdown]
# What differs, and why the numbers cannot be compared as a score:
#
# * **Data.** The paper trained on the 30 real ssTEM slices of the ISBI 2012 challenge
#   (512 x 512, Drosophila ventral nerve cord) and was scored by the organisers on 30 other,
#   unpublished slices. Here: 16 synthetic 192 x 192 images, scored on 2 more generated with
#   other seeds (held out from training, but from the same generator, so much easier to
#   generalise to). minunet ships no cell-tracking data, so Table 2 has no counterpart; the
#   synthetic touching cells (`--synthetic cells`) exercise eq. 2, not the PhC-U373 or
#   DIC-HeLa images.
# * **Budget and network.** The paper's network (base 64, depth 4, 31 million parameters)
#   trained for about 10 hours on an NVidia Titan GPU; this one (base 16, depth 3) for the
#   400 steps above on a CPU. The paper's EM result also averaged its predictions over 7
#   rotated versions of the input.
# * **Metrics.** The challenge computed its errors with its own code on its thresholds;
#   `minunet.metrics` follows the published definitions (pixel error as 1 - F1, Rand error
#   as 1 - Rand F-score, warping error per Jain et al. 2010), each at the best of 10
#   thresholds. A longer CPU run of `python -m minunet.train` (base 16, depth 4, tile 348,
#   1,500 steps in 2.2 minutes on the 2-core AVX-512 VM of `bench/results/cpu_numba.md`)
#   reached validation IoU 0.902 and Rand error 0.087 on its synthetic EM data.
#
# So a pixel error below the paper's is no achievement: synthetic membranes are cleaner than
# real ones, and two validation images are a small sample. The Rand and warping errors, many
# times the paper's, show how far a notebook-sized run is from a challenge result.
#
# ## What to take away
#
# * The paper's recipe — one large tile per step, momentum 0.99, the weighted loss, He
#   initialisation, heavy augmentation — is a short loop over library pieces.
# * Prediction is overlap-tile with mirrored context, in `no_grad` mode, dropout off.
# * Pixel error counts wrong pixels; Rand and warping error count wrong *topology* —
#   merges and splits — which is what a segmentation of touching cells is for.
# * The paper's Table 1 and 2 numbers come from real challenge data, a 31-million-parameter
#   network and 10 GPU hours; a notebook-sized run measures the same errors on synthetic data
#   and shows the method working, not the paper's score.
#
# Next: [09_making_the_convolution_fast.ipynb](09_making_the_convolution_fast.ipynb) — what the
# kernels of notebooks 2 and 3 cost on a real GPU, measured on an H200, and what the
# emulator's counters predict about it.
