# %% [markdown]
# # 6. Elastic deformation: many training images from few
#
# The ISBI 2012 training set has 30 images. The paper (Section 3.1) makes up for it with
# data augmentation, above all **elastic deformations**: "Especially random elastic
# deformations of the training samples seem to be the key concept to train a segmentation
# network with very few annotated images." The introduction (Section 1) says why: in
# biomedical segmentation "deformation used to be the most common variation in tissue and
# realistic deformations can be simulated efficiently", so the network can learn to be
# invariant to them without ever seeing them in the annotated data.
#
# The recipe: "We generate smooth deformations using random displacement vectors on a
# coarse 3 by 3 grid. The displacements are sampled from a Gaussian distribution with 10
# pixels standard deviation. Per-pixel displacements are then computed using bicubic
# interpolation." This notebook takes it apart step by step with
# `minunet.data.elastic`, then shows the other augmentations (shift, rotation, flips,
# gray values) and why image and label must go through the *same* warp.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %%
from minunet.data import em_images, elastic_deform, displacement_field, random_augment
from minunet.data.elastic import gray_value_variation

SIZE = 193                                   # nodes of the 3x3 grid fall on pixels 0, 96, 192
images, labels = em_images(1, size=SIZE, seed=1)
image, label = images[0], labels[0]          # float32 in [0, 1]; 1 = cell, 0 = membrane
print(image.shape, image.dtype, label.dtype, "label values", np.unique(label))

# %% [markdown]
# ## Step 1: nine random vectors on a coarse grid
#
# A 3x3 lattice of nodes spans the image corner to corner. Each node gets a random
# displacement $(d_y, d_x)$, both components drawn from $\mathcal{N}(0, 10^2)$ pixels.
# `displacement_field` draws exactly these nine vectors first from the generator it is given,
# so drawing them again from a generator with the same seed shows us the nodes.

# %%
SEED = 7
nodes = np.random.default_rng(SEED).normal(0.0, 10.0, size=(2, 3, 3))   # (dy/dx, row, col)
field = displacement_field((SIZE, SIZE), np.random.default_rng(SEED))   # (2, H, W) float32
node_px = np.linspace(0, SIZE - 1, 3).astype(int)                       # 0, 96, 192
print("node displacements dy:\n", nodes[0].round(1), "\n dx:\n", nodes[1].round(1))
at_nodes = field[:, node_px[:, None], node_px[None, :]]
print("per-pixel field at the nodes == node vectors:", np.abs(at_nodes - nodes).max() < 1e-4)

# %% [markdown]
# ## Step 2: bicubic interpolation to every pixel
#
# Between the nodes, a cubic spline through the nine vectors gives every pixel its own
# displacement. The spline passes exactly through the nodes (checked above) and is smooth —
# neighbouring pixels move almost together — so the image is *bent*, never torn or folded.
# On the left the nine node vectors, on the right the interpolated field (arrows every 16
# pixels, colour = length in pixels). All arrows are drawn 3 times longer than the
# displacement, so that they can be seen.

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
gy, gx = np.meshgrid(node_px, node_px, indexing="ij")
axes[0].imshow(image, cmap="gray", alpha=0.5)
axes[0].quiver(gx, gy, nodes[1], nodes[0], color="red", angles="xy", scale_units="xy", scale=1 / 3, width=0.012)
axes[0].scatter(gx, gy, c="red", s=12)
axes[0].set_title("3x3 grid: 9 random vectors (std 10 px)")
im = axes[1].imshow(np.hypot(*field), cmap="viridis")
step = np.arange(0, SIZE, 16)
axes[1].quiver(step[None, :], step[:, None], field[1][np.ix_(step, step)], field[0][np.ix_(step, step)],
               color="white", angles="xy", scale_units="xy", scale=1 / 3, width=0.005)
axes[1].set_title("bicubic per-pixel field |d| (px)")
fig.colorbar(im, ax=axes[1], fraction=0.046)
for ax in axes: ax.set_xlim(-45, SIZE + 45); ax.set_ylim(SIZE + 45, -45)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Step 3: warp — every output pixel *pulls* its value
#
# The deformed image is $I'(p) = I(p + d(p))$: output pixel $p$ looks up the input at the
# displaced position, interpolating between input pixels (cubic for images). Pulling rather
# than pushing guarantees that every output pixel gets exactly one value — no holes, no
# collisions. Positions that fall outside the image read a mirrored copy of it (the same
# extrapolation as the overlap-tile strategy of Fig. 2). So an arrow drawn above at $p$
# points to where output pixel $p$ reads from: the image content moves the opposite way.
#
# A regular grid shows the deformation best. `elastic_deform` with the same seed draws the
# same field, and returns it too:

# %%
grid_image = np.ones((SIZE, SIZE), np.float32)
lines = np.arange(SIZE) % 16 < 2                     # 2-pixel lines every 16 pixels
grid_image[lines, :] = grid_image[:, lines] = 0.0
warped_grid, _, _, d = elastic_deform(grid_image, rng=np.random.default_rng(SEED))
print("elastic_deform used the same field:", np.array_equal(d, field))
fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
for ax, im, title in zip(axes, (grid_image, warped_grid), ("regular grid", "after the elastic warp")):
    ax.imshow(im, cmap="gray"); ax.set_title(title); ax.axis("off")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Image and label through the same warp
#
# The label must be deformed *identically*, or the network would learn to put membranes
# where there are none. `elastic_deform(image, label, weight, rng)` resamples all three
# through one coordinate map: the image with cubic interpolation, the label with
# nearest-neighbour (class ids must not be blended: 0.5 is not a class), the weight map
# (eq. 2) linearly. The red lines are the label's membrane/cell boundary drawn over the
# image, before and after: they still follow the dark membranes.

# %%
from minunet.data import class_balance_weights
weight = class_balance_weights(label)
image_d, label_d, weight_d, _ = elastic_deform(image, label, weight, rng=np.random.default_rng(SEED))
print("label after:", label_d.dtype, np.unique(label_d), "| weight values", np.unique(weight).round(2),
      "->", weight_d.min().round(2), "..", weight_d.max().round(2))
fig, axes = plt.subplots(1, 2, figsize=(6, 3.1))
for ax, im, lb, title in ((axes[0], image, label, "original + label boundary"),
                          (axes[1], image_d, label_d, "deformed together")):
    ax.imshow(im, cmap="gray")
    ax.contour(lb, levels=[0.5], colors="red", linewidths=0.6)
    ax.set_title(title); ax.axis("off")
plt.tight_layout(); plt.show()


# %% [markdown]
# A number for "they stay aligned": the mean intensity under the label's membrane pixels
# vs its cell pixels. Deformed together, the contrast is that of the original; deform the
# label with a *different* random field and the contrast collapses — that label would be
# teaching the network wrong answers.

# %%
def contrast(im, lb):
    return im[lb == 1].mean() - im[lb == 0].mean()      # cells are brighter than membranes

_, label_other, _, _ = elastic_deform(image, label, rng=np.random.default_rng(SEED + 1))
print(f"cell - membrane intensity: original {contrast(image, label):.3f}, "
      f"deformed together {contrast(image_d, label_d):.3f}, "
      f"label warped differently {contrast(image_d, label_other):.3f}")

# %% [markdown]
# ## The other augmentations
#
# Section 3.1 also asks for "shift and rotation invariance as well as robustness to
# deformations and gray value variations". `random_augment` composes a random flip, a
# rotation by an arbitrary angle, a shift and the elastic field into **one** coordinate
# map, so the image is interpolated (blurred) only once, then varies the gray values
# (gamma, contrast, brightness) of the image only. Asking for an `out_shape` smaller than
# the input takes the output from the centre, where the rotated and shifted source
# positions still fall on real data (the training sampler cuts a region large enough for
# that around every tile).

# %%
rng = np.random.default_rng(0)
fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
for ax in axes.flat:
    aug_image, aug_label, _ = random_augment(image, label, rng=rng, out_shape=(129, 129), max_shift=10)
    ax.imshow(aug_image, cmap="gray", vmin=0, vmax=1)
    ax.contour(aug_label, levels=[0.5], colors="red", linewidths=0.5)
    ax.axis("off")
fig.suptitle("4 draws of flip + rotation + shift + elastic + gray values (centre 129x129)")
plt.tight_layout(); plt.show()

# %% [markdown]
# Gray-value variation on its own: a random gamma, contrast around the mean, and a brightness
# offset. The label is untouched — what is a membrane does not depend on the exposure.

# %%
rng = np.random.default_rng(3)
variants = [gray_value_variation(image, rng) for _ in range(3)]
fig, axes = plt.subplots(1, 4, figsize=(7, 2.1))
for ax, im, title in zip(axes, [image] + variants, ["original", "variant 1", "variant 2", "variant 3"]):
    ax.imshow(im[:96, :96], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{title}: mean {im.mean():.2f}", fontsize=8); ax.axis("off")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## What to take away
#
# * Nine Gaussian vectors (std 10 px) on a 3x3 grid, interpolated bicubically, give a smooth
#   random deformation field; the spline passes through the nodes.
# * The warp pulls: output pixel $p$ reads the input at $p + d(p)$; outside the image it
#   reads a mirror image.
# * Image, label and weight map go through the same coordinate map (cubic, nearest,
#   linear) and stay aligned; a label warped differently would contradict its image.
# * Flips, rotation, shift and the elastic field are composed into one map (one
#   interpolation); gray values vary on the image only.
#
# In training (`minunet.data.TileSampler`, notebook 8) every tile is freshly deformed, so
# the network never sees the same example twice.
#
# Next: [07_overlap_tile.ipynb](07_overlap_tile.ipynb) — how a network whose output is
# smaller than its input segments an image of any size (Fig. 2).
