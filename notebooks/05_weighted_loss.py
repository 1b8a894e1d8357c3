# %% [markdown]
# # 5. The weighted loss and the weight map (eq. 1, eq. 2, Fig. 3)
#
# A U-Net is trained by minimising one number per tile, the paper's **energy function**
# (Section 3): "a pixel-wise soft-max over the final feature map combined with the cross
# entropy loss function",
#
# $$E = \sum_{x \in \Omega} w(x) \log\big(p_{\ell(x)}(x)\big) \qquad \text{(eq. 1)}$$
#
# where $p_k(x) = \exp(a_k(x)) / \sum_{k'} \exp(a_{k'}(x))$ is the soft-max of the class
# scores $a_k(x)$ that the last 1x1 convolution gives pixel $x$, $\ell(x)$ is the true
# class of $x$, and $w(x)$ is a **weight map** computed beforehand from the ground truth.
# The weight map does two jobs: it balances the class frequencies, and — the point of the
# paper's cell experiments (Section 4, Fig. 3) — it forces the network to learn the thin
# background gaps between **touching cells**:
#
# $$w(x) = w_c(x) + w_0 \cdot \exp\left(-\frac{(d_1(x) + d_2(x))^2}{2\sigma^2}\right) \qquad \text{(eq. 2)}$$
#
# with $d_1$, $d_2$ the distances to the border of the nearest and the second-nearest cell,
# $w_0 = 10$ and $\sigma \approx 5$ pixels.
#
# This notebook first builds the weight map on synthetic touching cells and takes it apart
# (Fig. 3), then the loss: the soft-max, why it must be computed with the log-sum-exp
# trick, its gradient, a finite-difference check — and finally the fused CUDA kernel that
# computes loss and gradient in one pass, run on the CUDA emulator and compared with the
# NumPy reference.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %% [markdown]
# ## Touching cells
#
# `minunet.data.cell_images` generates light-microscopy-like frames in the spirit of the
# cell tracking challenge's PhC-U373 and DIC-HeLa sets (Section 4): clusters of cells of
# nearly the same brightness that touch along long borders. Its labels are **instance
# masks**: 0 = background, 1..K = one id per cell. As in the challenge's masks, touching
# cells share an edge with no background between them — so a plain cell / background mask
# would draw a cluster as one blob, and a network trained on it could never learn where
# one cell ends and the next begins.

# %%
from minunet.data import cell_images, separate_touching, class_balance_weights, unet_weight_map, instance_targets
from minunet.data.weights import nearest_two_cell_distances

images, instances = cell_images(1, size=160, seed=3)
image, cells = images[0], instances[0]                  # float32 in [0, 1]; int32 ids
K = cells.max()
right, below = cells[:, :-1] != cells[:, 1:], cells[:-1, :] != cells[1:, :]
contacts = ((cells[:, :-1] > 0) & (cells[:, 1:] > 0) & right).sum() + \
           ((cells[:-1, :] > 0) & (cells[1:, :] > 0) & below).sum()
print(f"image {image.shape}, {K} cells, {(cells > 0).mean():.1%} of pixels are cell; "
      f"{contacts} pixel edges where two different cells touch directly")

# %% [markdown]
# ## Separating the touching cells: Fig. 3c's 1-pixel gaps
#
# The paper introduces "small separation borders ... between touching cells (See Figure 3c
# and d)", obtained with morphological operations. `separate_touching` does it with one
# maximum filter: a cell pixel becomes background when its 3x3 neighbourhood contains a cell
# with a **larger** id. Only one side of each contact gives up pixels, so the gap is exactly
# one pixel wide, and since all 8 neighbours are tested, no pixel of one cell remains 4- or
# 8-adjacent to another cell afterwards. The binary target the network learns is then
# "cell" = separated mask > 0 (Fig. 3c).

# %%
from scipy import ndimage

separated = separate_touching(cells)
target = (separated > 0).astype(np.int32)               # Fig. 3c: 1 = cell, 0 = background
gap = (cells > 0) & (separated == 0)                    # the carved pixels
largest = ndimage.maximum_filter(separated, size=3, mode="constant")
smallest = -ndimage.maximum_filter(np.where(separated > 0, -separated, -10**6), size=3, mode="constant", cval=-10**6)
still_touching = (separated > 0) & ((largest > separated) | (smallest < separated))
print(f"{gap.sum()} pixels carved out ({gap.mean():.2%} of the image); "
      f"cell pixels with another cell among their 8 neighbours afterwards: {still_touching.sum()}")

# %% [markdown]
# ## The distances $d_1$ and $d_2$
#
# For every pixel, $d_1(x)$ is the Euclidean distance to the nearest pixel of the nearest
# cell and $d_2(x)$ that to the second-nearest cell. Both come from **distance transforms**:
# `scipy.ndimage.distance_transform_edt(mask != k)` gives, for every pixel, the exact
# distance to the nearest pixel of cell $k$. With one such map per cell, $d_1$ and $d_2$ are
# the smallest and the second-smallest of the $K$ values at each pixel.
#
# `nearest_two_cell_distances` keeps the two smallest with a running update instead of
# storing all $K$ maps. Below it is checked against the plain version — all $K$ full-image
# transforms, sorted per pixel. For speed, `unet_weight_map` asks it to compute each cell's
# transform only in a window reaching $5.3\sigma$ beyond the cell (farther away the border
# term is below $10^{-6} w_0$, so those cells cannot matter; where fewer than two cells are
# within reach, $d_2 = \infty$): that changes the border term by less than $10^{-5}$.

# %%
w0, sigma = 10.0, 5.0                                   # the paper's values
d1, d2 = nearest_two_cell_distances(separated)          # float32 (H, W) each, exact everywhere
all_maps = np.stack([ndimage.distance_transform_edt(separated != k) for k in range(1, K + 1)])
all_maps.sort(axis=0)                                   # per pixel: nearest cell first
print("d1: max |library - plain| =", np.abs(d1 - all_maps[0]).max())
print("d2: max |library - plain| =", np.abs(d2 - all_maps[1]).max())

def border_term(d1, d2):                                # eq. 2's second term, on background pixels
    total = np.where(np.isfinite(d2), d1 + d2, np.inf)
    return np.where(separated == 0, w0 * np.exp(-total ** 2 / (2 * sigma ** 2)), 0.0)

border = border_term(d1, d2)
windowed = border_term(*nearest_two_cell_distances(separated, reach=5.3 * sigma))
print("border term, windows of 5.3 sigma vs exact: max difference", np.abs(windowed - border).max())

# %% [markdown]
# $d_1 + d_2$ is small only where two cells are close to each other: in a 1-pixel gap both
# distances are 1 (the gap pixel's neighbours on either side belong to different cells), so
# $d_1 + d_2 = 2$ and the border term is $10\, e^{-4/50} = 9.2$. For a background pixel in
# the middle of a gap $g$ pixels wide, $d_1 + d_2 \approx g + 1$: the term falls off quickly
# with the width of the gap, and far from cell clusters it vanishes.

# %%
for g in (1, 2, 3, 5, 8, 12, 20):
    print(f"gap {g:2d} px wide: d1 + d2 = {g + 1:2d}, border term w0*exp(-(d1+d2)^2 / 2 sigma^2) = "
          f"{w0 * np.exp(-(g + 1) ** 2 / (2 * sigma ** 2)):7.4f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(8, 2.5))
for ax, (im, title, cmap, top) in zip(axes, [(d1, "d1: nearest cell (px)", "magma", 30),
                                             (d2, "d2: second-nearest cell (px)", "magma", 30),
                                             (border, "border term of eq. 2", "viridis", None)]):
    shown = ax.imshow(im, cmap=cmap, vmax=top); ax.set_title(title, fontsize=8); ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046)
plt.tight_layout(); plt.show()

# %% [markdown]
# (Colour scales of $d_1$, $d_2$ end at 30 px.) $d_1$ is 0 inside every cell. $d_2$ is large
# almost everywhere and small only between cells
# of a cluster, which is where the border term lights up.
#
# **A deviation from the paper.** Eq. 2 as printed adds the border term at *every* pixel $x$;
# the paper does not say what $d_1$ means inside a cell. minunet adds it on **background**
# pixels only: inside a cell $d_1 = 0$ and $d_2$ is at least 2, so the term would mostly weight
# the cell's own rim, which is not what it is for (the gaps are). Fig. 3d of the paper looks
# the same either way at its scale; the choice is minunet's, made in
# `minunet.data.weights.unet_weight_map`.
#
# **What a notebook's budget can show.** Does the border term make a network separate
# touching cells better? We tried it at notebook scale: the depth-3, 16-channel network of
# notebook 8 trained on 12 synthetic cell images (132 x 132 tiles, lr 0.001 at momentum
# 0.99), once with eq. 2's weights and once with $w_0 = 0$ (class balancing only), and
# counted on 3 held-out images how many of their 33 cells ended up merged with a neighbour.
# After 300 steps (11 s on the 2-core AVX-512 VM) and after 1,500 (47-78 s, the machine
# shared) both networks still merged about 21 of the 33 cells (Rand error 0.49 with the
# border term, 0.53 without, after 1,500 steps): at a CPU budget a notebook can afford,
# the network has not yet learned to draw the gaps at all, with or without help, so the
# comparison shows nothing either way. The paper's effect (Fig. 3, Table 2) needs much
# longer training; this notebook does not claim it. (The experiment:
# `python notebooks/experiments/border_weights.py W0 SEED STEPS`.)
#
# ## Class balancing: $w_c$
#
# "We pre-compute the weight map for each ground truth segmentation to compensate the
# different frequency of pixels from a certain class in the training data set" (Section 3).
# `class_balance_weights` gives the majority class weight 1 and every other class $k$ the
# weight #majority / #class $k$, so that each class contributes the same total weight. The
# majority is the background here; normalising to it (rather than to the mean) keeps $w_c$
# on the same scale as $w_0 = 10$: a background pixel far from cells weighs 1.

# %%
w_c = class_balance_weights(target, num_classes=2)
counts = np.bincount(target.ravel(), minlength=2)
for k, name in enumerate(["background", "cell"]):
    print(f"{name:10s}: {counts[k]:6d} pixels, w_c = {w_c[target == k][0]:.4f}, "
          f"total weight {w_c[target == k].sum():8.1f}")

# %% [markdown]
# ## The weight map, by hand and by the library
#
# Adding the two terms gives eq. 2. `unet_weight_map` (called by `instance_targets`, which
# also does the separation) must give the same map:

# %%
weight = unet_weight_map(separated, w0=w0, sigma=sigma)
by_hand = w_c + border
print("max |unet_weight_map - (w_c + border term)| =", np.abs(weight - by_hand).max())
target_lib, weight_lib = instance_targets(cells, w0=w0, sigma=sigma)   # separation + eq. 2 in one call
print("instance_targets gives the same target and weights:",
      np.array_equal(target_lib, target), np.abs(weight_lib - weight).max() == 0)
print(f"weight range {weight.min():.3f} .. {weight.max():.3f}; "
      f"max over gap pixels {weight[gap].max():.3f} = 1 + 10 exp(-2^2/50) = {1 + 10 * np.exp(-4 / 50):.3f}")

# %% [markdown]
# ## Fig. 3, rebuilt
#
# (a) the raw image; (b) the instance ground truth, one colour per cell; (c) the generated
# segmentation mask, white = cell, black = background, with the 1-pixel gaps that separate
# touching cells; (d) the pixel-wise loss weights: high along the gaps and wherever two
# cells come close, $w_c$ inside cells and 1 in the open background.

# %%
colours = np.random.default_rng(1).uniform(0.2, 1.0, size=(K + 1, 3)); colours[0] = 0
overlay = np.where(cells[..., None] > 0, 0.45 * image[..., None] + 0.55 * colours[cells], image[..., None])
rows, cols = np.nonzero(cells)                            # show the region around the cells
view = (slice(max(rows.min() - 8, 0), rows.max() + 9), slice(max(cols.min() - 8, 0), cols.max() + 9))
fig, axes = plt.subplots(1, 4, figsize=(8, 2.3))
panels = [(image, "(a) raw image", "gray"), (overlay, "(b) instances", None),
          (target, "(c) mask with gaps", "gray"), (weight, "(d) weight map w(x)", "magma")]
for ax, (im, title, cmap) in zip(axes, panels):
    shown = ax.imshow(im[view], cmap=cmap); ax.set_title(title, fontsize=8); ax.axis("off")
fig.colorbar(shown, ax=axes[3], fraction=0.046)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## A profile across narrow gaps
#
# Row 79 of the image crosses the background between two *different* cells several times
# (listed below; the plot shows columns 40 to 111). Inside a gap between two cells, one of
# $d_1$, $d_2$ grows as the other shrinks, so their sum — and with it the border term —
# stays nearly level across the gap, at a height set by how close the two cells are:
#
# * columns 51–56: a natural gap that the row cuts obliquely; the cells are closer than the
#   6 pixels along the row ($d_1 + d_2 \approx 4.5$): a plateau near 8;
# * column 69: a 1-pixel gap carved by `separate_touching`: a spike to $1 + 9.23 = 10.23$;
# * columns 84–104: 21 pixels of open background; the term is nearly 0 in the middle and
#   rises only towards the cells, where a second cell is also within about 10 pixels.
#
# Inside the cells only $w_c$ remains.

# %%
y = 79
row = separated[y]
edges = np.flatnonzero(np.diff(row)) + 1                  # where the id changes along the row
runs = np.split(np.arange(row.size), edges)               # runs of equal id
print(f"row {y}: background runs between two different cells")
for before, run, after in zip(runs, runs[1:], runs[2:]):
    a_id, b_id = row[before[-1]], row[after[0]]
    if row[run[0]] == 0 and a_id > 0 and b_id > 0 and a_id != b_id:
        mid = run[len(run) // 2]
        print(f"  columns {run[0]:3d}..{run[-1]:3d} ({len(run):2d} px) between cells {a_id:2d} and {b_id:2d}: "
              f"at column {mid}, d1 + d2 = {d1[y, mid] + d2[y, mid]:5.2f}, w = {weight[y, mid]:6.3f}")

# %%
cols = np.arange(40, 112)
fig, axes = plt.subplots(1, 2, figsize=(8, 2.4), gridspec_kw=dict(width_ratios=[1, 1.7]))
axes[0].imshow(weight[y - 22:y + 23, cols], cmap="magma", extent=(cols[0] - 0.5, cols[-1] + 0.5, y + 22.5, y - 22.5))
axes[0].axhline(y, color="w", lw=1, ls="--")
axes[0].set_title(f"w(x) around row {y} (dashed)", fontsize=8)
ax = axes[1]
ax.plot(cols, weight[y, cols], "k.-", ms=3, label="w(x)")
ax.plot(cols, w_c[y, cols], "b--", lw=1, label="$w_c$")
ax.plot(cols, border[y, cols], "r-", lw=1, label="border term")
for c in cols:
    if row[c]:
        ax.axvspan(c - 0.5, c + 0.5, color=colours[row[c]], alpha=0.35, lw=0)
ax.set_xlabel(f"column of row {y} (shaded: cell pixels, coloured by cell)", fontsize=8)
ax.legend(fontsize=8, loc="upper right"); ax.grid(alpha=0.3)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Where the weight goes
#
# The carved gaps are a tiny fraction of the pixels, but a network that gets them wrong
# *merges* touching cells — the error that matters most when cells are counted or tracked.
# Eq. 2 gives them a share of the total weight several times their share of the pixels.
#
# What that does to the loss: two imperfect "networks" that are each wrong on the same
# number of pixels, with the same confidence (scores $\pm 3$, so $p = 0.9975$ for the class
# they choose). **A** merges the touching cells: it calls every gap pixel "cell". **B** makes
# its mistakes at random on the outer rim of the cells, drawing some outlines a pixel too fat
# — harmless for counting cells. Without weights the two losses are the same; with eq. 2
# merging costs about twice as much (the rim pixels, too, are often near a second cell and
# get some border weight), so training pushes hardest against the merge.

# %%
print(f"carved gap pixels:  {gap.mean():6.2%} of the pixels, {weight[gap].sum() / weight.sum():6.2%} of the total weight")
near = border > 1.0
print(f"border term > 1:    {near.mean():6.2%} of the pixels, {weight[near].sum() / weight.sum():6.2%} of the total weight")

rim = ndimage.binary_dilation(target) & (target == 0) & ~gap       # background touching a cell, not a gap
rim_errors = np.zeros_like(gap)
rim_errors.flat[np.random.default_rng(0).choice(np.flatnonzero(rim), gap.sum(), replace=False)] = True

def loss_of(wrong, w):
    predicted = np.where(wrong, 1 - target, target)                # the class the network picks
    score = np.where(predicted == 1, 3.0, -3.0).astype(np.float32)
    logits = mu.Tensor(np.stack([-score, score])[None])             # (1, 2, H, W)
    return F.weighted_cross_entropy(logits, mu.Tensor(target[None]), mu.Tensor(w[None])).item()

print(f"\n{'network':30s} {'wrong pixels':>12s} {'loss, w = 1':>12s} {'loss, eq. 2':>12s}")
for name, wrong in [("A: merges touching cells", gap), ("B: fat outlines in places", rim_errors)]:
    print(f"{name:30s} {wrong.sum():12d} {loss_of(wrong, np.ones_like(weight)):12.5f} {loss_of(wrong, weight):12.5f}")
print(f"weighted loss A / B = {loss_of(gap, weight) / loss_of(rim_errors, weight):.2f}; "
      f"mean weight of the wrong pixels: A {weight[gap].mean():.2f}, B {weight[rim_errors].mean():.2f}")

# %% [markdown]
# ## The loss: soft-max and cross-entropy
#
# The paper writes eq. 1 as a sum of $w(x) \log p_{\ell(x)}(x)$, a number $\le 0$ to be
# made as large as possible; minunet, like every deep-learning library, *minimises* its
# negative, and takes the **mean** over the $N \cdot H \cdot W$ pixels of the batch, so that
# the loss does not grow with the tile size:
#
# $$L = \frac{1}{NHW} \sum_{x} w(x)\,\big(-\log p_{\ell(x)}(x)\big), \qquad
# p_k(x) = \frac{e^{a_k(x)}}{\sum_{k'} e^{a_{k'}(x)}}$$
#
# (the paper's $p_k$ with classes counted from 0). One pixel with 3 classes, by hand and by
# `F.weighted_cross_entropy` (logits $(N, C, H, W)$, target $(N, H, W)$ integer classes,
# weight $(N, H, W)$ or `None` for all ones):

# %%
a = np.array([2.0, -1.0, 0.5])                         # class scores a_k(x) of one pixel
p = np.exp(a) / np.exp(a).sum()
print("soft-max p =", p, " sums to", p.sum())
print("true class 2, weight 3: loss = 3 * -log p[2] =", 3 * -np.log(p[2]))
loss = F.weighted_cross_entropy(mu.Tensor(a.reshape(1, 3, 1, 1)), mu.Tensor([[[2]]]), mu.Tensor([[[3.0]]]))
print("F.weighted_cross_entropy                     =", loss.item())

# %% [markdown]
# ## Why log-sum-exp
#
# $-\log p_t = \log \sum_k e^{a_k} - a_t$. Computed literally, $e^{a_k}$ overflows as soon
# as a score exceeds $\log(3.4 \cdot 10^{38}) = 88.7$ in float32 (709.8 in float64): the sum
# becomes `inf` and the loss `inf` or `nan`, although the answer is an ordinary number. A
# confident network easily produces such scores. The fix is free: for any $m$,
# $\log \sum_k e^{a_k} = m + \log \sum_k e^{a_k - m}$; with $m = \max_k a_k$ every exponent
# is $\le 0$ (no overflow), and the largest term is $e^0 = 1$, so the sum is $\ge 1$ and its
# logarithm is safe too.

# %%
a = np.array([100.0, -100.0, 98.0], dtype=np.float32)  # confident, not absurd
with np.errstate(over="ignore", invalid="ignore"):
    print("exp(a) in float32       =", np.exp(a), "(overflow)")
    naive_p = np.exp(a) / np.exp(a).sum()
    naive = -np.log(naive_p[2])
m = a.max()
stable = np.log(np.exp(a - m).sum()) - (a[2] - m)      # log S - (a_t - m), as the kernel does
print("naive  -log p[2]        =", naive)
print("stable -log p[2]        =", stable, f"(exact: log(1 + e^-2 + e^-200) + 2 = {np.log1p(np.exp(-2.0)) + 2:.7f})")
for device in ("cpu", "emu"):
    loss = F.weighted_cross_entropy(mu.Tensor(a.reshape(1, 3, 1, 1), device=device), mu.Tensor([[[2]]], device=device))
    print(f"F.weighted_cross_entropy on {device}: {loss.item()}")

# %% [markdown]
# ## The gradient
#
# With $s_c = p_c(x)$ the soft-max and $t = \ell(x)$:
# $\frac{\partial}{\partial a_c}\left(\log \sum_k e^{a_k} - a_t\right) = s_c - [c = t]$.
# So the gradient of the mean loss with respect to the logits is
#
# $$\frac{\partial L}{\partial a_c(x)} = \frac{w(x)\,\big(s_c(x) - [c = \ell(x)]\big)}{N H W}:$$
#
# the soft-max minus the one-hot target, scaled by the pixel's weight. It is never larger
# than $w(x) / NHW$ in size, it pushes the true class's score up and every other down, and it
# vanishes as the prediction becomes certain and right. A pixel of weight 10 pulls ten times
# as hard as one of weight 1: that is all the weight map does to training. Checked on a small
# batch against `.backward()`:

# %%
rng = np.random.default_rng(0)
N, C, H, W = 2, 3, 4, 5
a = rng.standard_normal((N, C, H, W)).astype(np.float32)
t = rng.integers(0, C, size=(N, H, W))
w = rng.uniform(0.5, 10.0, size=(N, H, W)).astype(np.float32)
logits = mu.Tensor(a, requires_grad=True)
F.weighted_cross_entropy(logits, mu.Tensor(t), mu.Tensor(w)).backward()

s = np.exp(a - a.max(axis=1, keepdims=True)); s /= s.sum(axis=1, keepdims=True)
onehot = np.eye(C, dtype=np.float32)[t].transpose(0, 3, 1, 2)        # (N, H, W, C) -> (N, C, H, W)
formula = w[:, None] * (s - onehot) / (N * H * W)
print("max |autograd - w (softmax - onehot) / NHW| =", np.abs(logits.grad.numpy() - formula).max())
print("sum over the classes of each pixel's gradient (0 in exact arithmetic): max |sum| =",
      np.abs(logits.grad.numpy().sum(axis=1)).max())

# %% [markdown]
# ## A finite-difference check in float64
#
# As for every op (notebook 1), `gradcheck` compares the reference backward with central
# differences, in float64 on the `cpu` device. Target and weight are not differentiated, so
# they are passed as fixed tensors; a few logits of magnitude 30 make sure the stable path is
# exercised too.

# %%
from minunet.gradcheck import gradcheck

rng = np.random.default_rng(1)
a64 = rng.standard_normal((2, 4, 3, 5)) * 3.0
a64[0, :, 0, 0] = [30.0, -30.0, 29.0, 0.0]
t64 = mu.Tensor(rng.integers(0, 4, size=(2, 3, 5)))
w64 = mu.Tensor(rng.uniform(0.5, 10.0, size=(2, 3, 5)), dtype="float64")
errors = gradcheck(lambda z: F.weighted_cross_entropy(z, t64, w64), [a64])
print(f"gradcheck passed: max |analytic - numeric| over {a64.size} logits = {errors[0]:.2e}")

# %% [markdown]
# ## The fused CUDA kernel
#
# On `cuda` and `emu`, loss and gradient come from `kernels/cross_entropy.cu` (and the mean
# from `kernels/reduce.cu`, below). Its kernel, `cross_entropy_forward`, does everything per
# pixel in one go: the channel maximum,
# the sum of exponentials, the loss term and all $C$ gradient entries. That is what *fused*
# means: the soft-max is never stored as an array, and the logits are read straight from
# memory three times by the thread that needs them. Here it is, cut out of the file by its
# name:

# %%
from minunet.backends.kernels import ceil_div
from minunet.backends.sources import function_source, kernel_source

print(function_source("cross_entropy", "cross_entropy_forward", comment=False))


# %% [markdown]
# ### How the threads map to pixels — for a NumPy reader
#
# A CUDA kernel is the body of a `for` loop whose iterations run in parallel. The launch
# asks for a **grid** of **blocks** of 256 **threads** (`THREADS` in `minunet/backends/kernels.py`),
# $\lceil NP / 256 \rceil$ blocks for $N P$ pixels ($P = H W$ per image); every thread runs the
# same function and tells itself apart by `blockIdx.x` and `threadIdx.x`:
#
# * `t = blockIdx.x * blockDim.x + threadIdx.x` is the thread's global number: **thread t
#   handles pixel t** of the flattened (N, H, W) target. The last block has more threads than
#   pixels left; those return at once (`if (t >= N * P) return;`).
# * `n = t / P`, `p = t % P`: the image and the pixel inside it (integer division).
# * Memory is one flat array. In the (N, C, H, W) layout, pixel p's score for class c sits at
#   `n*C*P + c*P + p`: `z` points at class 0 of this pixel, and `z[c * P]` steps P floats to
#   the next class plane. Threads t, t+1, t+2, ... read neighbouring addresses for the same
#   c — "coalesced" reads, which a GPU serves in a few wide transactions.
# * Then three loops over the C classes: the maximum m, the sum S of $e^{z_c - m}$, and
#   the gradient entries, written to the same places in `grad`. The pixel's loss goes to
#   `loss_pixel[t]`.
#
# The same thing in NumPy, line by line, with one array element per thread: `t` is the
# vector of all thread numbers, and every statement acts on all threads at once.

# %%
def cross_entropy_forward_numpy(logits, target, weight):
    """cross_entropy_forward, every thread at once: each array has one entry per thread t."""
    N, C, H, W = logits.shape
    P = H * W
    memory = logits.reshape(-1)                          # device memory: one flat array
    t = np.arange(N * P)                                 # blockIdx.x * blockDim.x + threadIdx.x
    n, p = t // P, t % P
    base = n * C * P + p                                 # z = logits + n*C*P + p;  z[c*P]
    label = target.reshape(-1)
    m = memory[base]
    for c in range(1, C):
        m = np.maximum(m, memory[base + c * P])
    S = np.zeros(N * P, np.float32)
    for c in range(C):
        S += np.exp(memory[base + c * P] - m)
    w = weight.reshape(-1)
    loss_pixel = w * (np.log(S) - (memory[base + label * P] - m))
    grad = np.empty_like(memory)
    scale = w * np.float32(1.0 / (N * P))
    for c in range(C):
        grad[base + c * P] = scale * (np.exp(memory[base + c * P] - m) / S - (c == label))
    return loss_pixel, grad.reshape(logits.shape)

N, C, H, W = 2, 3, 5, 7
print(f"{N * H * W} pixels -> {ceil_div(N * H * W, 256)} block(s) of 256 threads; "
      f"{ceil_div(N * H * W, 256) * 256 - N * H * W} threads return at once")
for t_ in (0, 1, 2, 35, 69):
    n_, p_ = divmod(t_, H * W)
    print(f"thread {t_:2d}: image n={n_}, pixel p={p_:2d} = (row {p_ // W}, col {p_ % W}); "
          f"reads logits at flat offsets {[n_ * C * H * W + c * H * W + p_ for c in range(C)]}")

# %% [markdown]
# Now the real kernel. `EmuModule` compiles `kernels/cross_entropy.cu` for the CPU (the
# `emu` device uses exactly this), and a launch is called like CuPy's: `(grid, block,
# arguments)`, with the arrays as device memory and the scalars as NumPy scalars of the
# kernel's exact C types. The per-pixel losses and the gradient of the kernel agree with the
# NumPy transcription to float32 rounding:

# %%
from minunet.emulator import EmuModule
from minunet.backends.sources import kernels_dir

module = EmuModule(kernel_source("cross_entropy"), name=str(kernels_dir() / "cross_entropy.cu"))
print(module)
rng = np.random.default_rng(2)
a = rng.standard_normal((N, C, H, W)).astype(np.float32) * 3
t = rng.integers(0, C, size=(N, H, W)).astype(np.int32)
w = rng.uniform(0.5, 10.0, size=(N, H, W)).astype(np.float32)
loss_pixel = np.empty(N * H * W, np.float32)
grad = np.empty_like(a)
module.get_function("cross_entropy_forward")(
    (ceil_div(N * H * W, 256),), (256,),
    (a, t, w, loss_pixel, grad, np.int32(N), np.int32(C), np.int32(H * W), np.float32(1 / (N * H * W))))
ref_loss_pixel, ref_grad = cross_entropy_forward_numpy(a, t, w)
print("per-pixel loss: max |kernel - NumPy transcription| =", np.abs(loss_pixel - ref_loss_pixel).max())
print("gradient:       max |kernel - NumPy transcription| =", np.abs(grad - ref_grad).max())

# %% [markdown]
# A target outside $[0, C)$ would make the kernel read outside the logits. It writes NaN for
# that pixel instead — a visible error rather than a plausible wrong number
# (`F.weighted_cross_entropy` already refuses such targets with a message on the Python side):

# %%
bad = t.copy(); bad[0, 0, 0] = C                          # class index C does not exist
module.get_function("cross_entropy_forward")(
    (1,), (256,), (a, bad, w, loss_pixel, grad, np.int32(N), np.int32(C), np.int32(H * W), np.float32(1 / 70)))
print("loss of pixel 0:", loss_pixel[0], "| its gradient:", grad[0, :, 0, 0], "| pixel 1 is fine:", loss_pixel[1])

# %% [markdown]
# ### The reduction to the mean
#
# The loss is the mean of the $NP$ per-pixel values. Adding them up is a **reduction**, and
# on a GPU it has to be shared among threads too. It is done by `sum_scaled` in
# `kernels/reduce.cu`, the file of the sums several ops share: a loop over the block's share of
# the values, then `block_sum`, the classic shared-memory **tree reduction**, a `__device__`
# function:

# %%
print("#define REDUCE_THREADS 256\n")
print(function_source("reduce", "block_sum", comment=False))
print()
print(function_source("reduce", "sum_scaled", comment=False))


# %% [markdown]
# In words, for a block of 256 threads:
#
# 1. **Grid-stride loop.** Thread `t` of block `b` adds up elements `b*256 + t`, then that
#    plus `gridDim.x * blockDim.x` (the number of threads in the whole grid), and so on: however
#    many elements there are, each one is read by exactly one thread, and neighbouring
#    threads read neighbouring elements.
# 2. `block_sum`: the 256 partial sums go into `s_sum`, an array in **shared memory**: fast
#    memory that all threads of one block can read and write. `__syncthreads()` is a barrier:
#    no thread goes past it until all 256 have arrived, so all partial sums are written before
#    anyone reads them.
# 3. **Tree.** With `stride` = 128: threads 0..127 each add the value 128 places further on,
#    so 256 numbers become 128. Barrier. Then 64, 32, ..., 1: after $\log_2 256 = 8$ steps
#    `s_sum[0]` holds the block's sum (instead of 255 additions one after the other), and
#    `block_sum` returns it to every thread. The barrier stands *outside* the `if`: every
#    thread of a block must reach every barrier, even those with nothing left to add.
# 4. Thread 0 writes the block's sum, times `scale`, to `out[blockIdx.x]`.
#
# The loss launcher (`kernels_forward` in `minunet/ops/cross_entropy.py`) launches
# `cross_entropy_forward` and then calls `k.mean(per_pixel, pixels)`, the backend's shared
# mean (`KernelBackend.mean` in `minunet/backends/kernels.py`), which runs `sum_scaled`
# **twice**: first with up to 256 blocks, giving one partial sum per block (scale 1), then
# with a single block that adds those partials and multiplies by $1 / NP$: the mean. Two
# launches rather than each block adding its result into one number with `atomicAdd` keep the
# order of the additions fixed, so the loss is bit-for-bit the same in every run.
#
# The same in NumPy: each step of the tree is one vectorised addition of the upper half of
# `s_sum` onto the lower half. Float32 additions in exactly the kernel's order give exactly
# the kernel's result. Here on 2,000 numbers, launched with only 3 blocks (the launcher
# would take 8) so that the grid-stride loop wraps around: 768 threads for 2,000 numbers, each
# thread adds 2 or 3 of them.

# %%
def sum_scaled_numpy(x, blocks, scale):
    out = np.empty(blocks, np.float32)
    for b in range(blocks):
        acc = np.zeros(256, np.float32)                         # one accumulator per thread
        e = b * 256 + np.arange(256)                            # each thread's first element
        while e.min() < x.size:                                 # grid-stride loop
            acc += np.where(e < x.size, x[np.minimum(e, x.size - 1)], np.float32(0))
            e += blocks * 256
        s_sum = acc
        for stride in (128, 64, 32, 16, 8, 4, 2, 1):            # the tree, one step per barrier
            s_sum[:stride] += s_sum[stride:2 * stride]
        out[b] = s_sum[0] * np.float32(scale)
    return out

values = np.random.default_rng(3).uniform(0, 5, 2000).astype(np.float32)
blocks = 3
partial_k, mean_k = np.empty(blocks, np.float32), np.empty(1, np.float32)
sum_scaled = EmuModule(kernel_source("reduce"), name=str(kernels_dir() / "reduce.cu")).get_function("sum_scaled")
sum_scaled((blocks,), (256,), (values, partial_k, np.int32(values.size), np.float32(1.0)))
sum_scaled((1,), (256,), (partial_k, mean_k, np.int32(blocks), np.float32(1 / values.size)))
partial_np = sum_scaled_numpy(values, blocks, 1.0)
mean_np = sum_scaled_numpy(partial_np, 1, 1 / values.size)
print(f"{blocks} partial sums: kernel {partial_k}, NumPy {partial_np}, equal: {np.array_equal(partial_k, partial_np)}")
print(f"mean: kernel {mean_k[0]:.8g}, NumPy tree {mean_np[0]:.8g}, equal: {mean_k[0] == mean_np[0]}; "
      f"float64 np.mean {values.astype(np.float64).mean():.8g}")

# %% [markdown]
# ### Why the barrier inside the loop matters
#
# On a GPU, threads of a block do not run in lockstep across the whole block: without the
# barrier in the loop, thread 0 could add `s_sum[64]` at stride 64 before thread 64 has
# added its own partner at stride 128 — a *race*. On a GPU that often happens to work, which
# makes it a dangerous bug. The emulator makes it show, in one of two ways: it runs the
# threads of a block between two barriers in a shuffled order (from a seed), so the sum
# changes from seed to seed; or it notices the race itself — a thread reading a slot of
# `s_sum` that another thread writes between the same two barriers — and fails the launch
# with an `EmulatorError` (`minunet.emulator.errors`) naming the kernel, thread and block.
# Which of the two happens depends on how much the emulator checks; the cell prints whichever
# it is. Delete the barrier from the source, compile again, and sum the same 2,000 numbers
# with three shuffle seeds:

# %%
no_barrier = kernel_source("reduce").replace(
    "__syncthreads();  // outside the `if`: every thread must reach every barrier", "// barrier deleted")
from minunet.emulator.errors import EmulatorError

variants = {"with the barrier": kernel_source("reduce"), "barrier deleted": no_barrier}
for label, source in variants.items():
    sums = []
    for seed in (0, 1, 2):
        mod = EmuModule(source, name="reduce.cu", shuffle_seed=seed)
        out = np.empty(blocks, np.float32)
        try:
            mod.get_function("sum_scaled")((blocks,), (256,), (values, out, np.int32(values.size), np.float32(1.0)))
        except EmulatorError as error:
            print(f"{label:17s}: shuffle seed {seed}: the emulator refuses the launch\n"
                  f"{type(error).__name__}: {error}")
            break
        sums.append(float(out.sum()))
    else:
        print(f"{label:17s}: sum with shuffle seeds 0, 1, 2 = {sums}")
print(f"{'exact (float64)':17s}: {values.astype(np.float64).sum():.3f}")

# %% [markdown]
# The emulator also fills shared memory with NaN before each block, so a slot that no thread
# wrote reads as NaN instead of a plausible stale value.
#
# The convolutions' bias gradients need the same kind of sum — over all images and pixels of
# one channel — but they need no kernel of their own: the weight-gradient kernels read the same
# output gradient and add it up on the way, with the same tree in shared memory (notebooks 2
# and 3).


# %% [markdown]
# ## The kernel vs the NumPy reference: loss and gradient
#
# Now through the public API, as training uses it: the same `F.weighted_cross_entropy` and
# `.backward()` on `device="emu"` (the kernels above) and on `device="cpu"` in float64 (the
# NumPy reference, the oracle), on odd shapes, batches of several images, 2 classes and more, with and without
# a weight map, scores of size 100, and the real target and weight map of the cell image.
# Shapes with more than 256 pixels use several blocks in the first pass of the reduction;
# the one with more than $256 \cdot 256$ pixels also makes its grid-stride loop wrap around.

# %%
def compare(device, a, t, w):
    """|loss| difference and max |grad| difference between `device` and the NumPy reference
    (device "cpu" in float64: the reference, whatever fast float32 kernels "cpu" may have)."""
    results = []
    for dev, dtype in (("cpu", "float64"), (device, "float32")):
        logits = mu.Tensor(a, device=dev, dtype=dtype, requires_grad=True)
        weight = None if w is None else mu.Tensor(w, device=dev, dtype=dtype)
        loss = F.weighted_cross_entropy(logits, mu.Tensor(t, device=dev), weight)
        loss.backward()
        results.append((loss.item(), logits.grad.numpy()))
    (l_ref, g_ref), (l_dev, g_dev) = results
    return l_ref, abs(l_dev - l_ref), np.abs(g_dev - g_ref).max(), np.abs(g_ref).max()

rng = np.random.default_rng(4)
cases = []
for (n, c, h, wd), weighted, scale in [((1, 2, 1, 1), True, 1), ((1, 2, 7, 5), False, 1),
                                      ((2, 2, 13, 11), True, 3), ((3, 3, 5, 7), True, 1),
                                      ((2, 5, 17, 9), True, 3), ((1, 4, 33, 31), False, 1),
                                      ((2, 3, 9, 13), True, 100), ((1, 3, 263, 257), True, 1)]:
    a = (rng.standard_normal((n, c, h, wd)) * scale).astype(np.float32)
    t = rng.integers(0, c, size=(n, h, wd))
    w = rng.uniform(0.5, 11.0, size=(n, h, wd)).astype(np.float32) if weighted else None
    cases.append((f"{(n, c, h, wd)}" + (" w" if weighted else "") + (f" x{scale}" if scale > 1 else ""), a, t, w))
cell_logits = np.random.default_rng(5).standard_normal((1, 2) + target.shape).astype(np.float32)
cases.append(("cell image 160x160, eq. 2 w", cell_logits, target[None], weight[None]))

def table(device):
    print(f"{'case (N, C, H, W)':28s} {'blocks':>6s} {'loss (ref)':>11s} {'|loss diff|':>12s} "
          f"{'max |grad diff|':>16s} {'max |grad|':>11s}")
    worst = 0.0
    for name, a, t, w in cases:
        loss, dl, dg, g = compare(device, a, t, w)
        worst = max(worst, dl / abs(loss), dg / g)
        blocks = min(ceil_div(t.size, 256), 256)             # first pass of the reduction
        print(f"{name:28s} {blocks:6d} {loss:11.5f} {dl:12.2e} {dg:16.2e} {g:11.2e}")
    print(f"{device} vs reference: largest relative error {worst:.1e}")
    assert worst < 1e-5, worst

table("emu")

# %% [markdown]
# Differences of a few units in the 7th significant digit: float32 rounding (the kernel
# calls C's `expf`/`logf`, NumPy its own, and the sums are added in another order), the same
# accuracy as float32 itself. On a GPU the same comparison runs when CuPy sees one:

# %%
from minunet.devices import cuda_status

available, reason = cuda_status()
if available:
    table("cuda")
else:
    print(f"cuda: skipped ({reason})")

# %% [markdown]
# ## What to take away
#
# * Touching cells get a 1-pixel background gap (`separate_touching`), so that the binary
#   target can tell them apart (Fig. 3c).
# * Eq. 2's weight map is $w_c$ (each class the same total weight) plus
#   $w_0 \exp(-(d_1 + d_2)^2 / 2\sigma^2)$, large only where two cells are a few pixels apart;
#   $d_1$, $d_2$ come from one exact distance transform per cell (Fig. 3d).
# * Eq. 1 is the weighted soft-max cross-entropy; minunet minimises its mean negative. It
#   must be computed as log-sum-exp with the maximum subtracted, or scores above ~89
#   overflow float32.
# * Its gradient is $w(x)(\text{softmax} - \text{onehot}) / NHW$: the weight map simply
#   scales how hard each pixel pulls.
# * The CUDA kernel gives one thread per pixel (fused loss and gradient), then a two-pass
#   shared-memory tree reduction for the mean, in a fixed order; on the emulator it agrees
#   with the NumPy reference to float32 rounding.

# %% [markdown]
# ## Exercises that run on a laptop
#
# The exercises live in [`notebooks/exercises/`](exercises/): each is a short `.cu` file (the
# starter; open it in any editor, the comment at its top says what to do) with a check that
# compiles it with minunet's CUDA emulator in checked mode, runs it on shapes that cross tile
# and warp boundaries, compares it with NumPy and, where the exercise is about speed, counts
# what a GPU profiler would. No GPU is needed. `check(name)` prints what is still wrong;
# `solution(name)` is the path of a worked solution, for after you have tried.
# `tests/test_notebooks.py` runs every check against its solution (which must pass) and its
# starter (which must fail), so the checks keep working.
#
# **Exercise 05.1: a tree without bank conflicts.**
# [`exercises/bank_conflicts.cu`](exercises/bank_conflicts.cu) sums blocks of 512 numbers with
# a shared-memory tree like the loss kernel's, but addresses the tree as many first attempts
# do: in the step with stride $s$, thread $t$ adds word $2st + s$ into word $2st$. Shared
# memory is split into 32 *banks*, one 4-byte word wide (word $k$ is in bank $k \bmod 32$); a
# bank serves one word at a time, so when the lanes of a warp ask one bank for several
# different words the request takes several passes (*wavefronts*). With the stride-$2s$
# addressing every bank gets 2, 4, 8, ... of a warp's words. The check counts the wavefronts
# per shared load: change the indexing so that the active threads are the first ones and
# read consecutive words, and it falls to 1.

# %%
from exercises.check import check, solution

check("bank_conflicts");

# %% [markdown]
# **Exercise 05.2: a barrier every thread reaches.**
# [`exercises/divergent_barrier.cu`](exercises/divergent_barrier.cu) is the conflict-free tree
# with the barrier moved inside `if (t < stride)`, "because only the adding threads need to
# wait". `__syncthreads()` waits for *every* thread of the block, and the others never come:
# on a GPU a hang or an occasional wrong sum, in the emulator an error that names a thread
# that left and one that waits. (The real kernels put every barrier outside the `if`, with a
# comment saying why.)

# %%
check("divergent_barrier");

# %% [markdown]
# Next: [06_elastic_deformation.ipynb](06_elastic_deformation.ipynb) — how the few annotated
# images, with their weight maps, are deformed into many.
