# %% [markdown]
# # 7. Overlap-tile: segmenting an image of any size (Fig. 2)
#
# A U-Net with valid convolutions maps an input tile to the segmentation of a *smaller*
# square in its centre (572 -> 388 in the paper, notebook 4): the border it loses is the
# context every output pixel needs. Two consequences (Section 2, Fig. 2):
#
# 1. **Tiling.** A large image is segmented square by square — "this tiling strategy is
#    important to apply the network to large images, since otherwise the resolution would
#    be limited by the GPU memory". The output squares sit side by side; their input tiles
#    overlap by the context margin.
# 2. **Mirroring.** "To predict the pixels in the border region of the image, the missing
#    context is extrapolated by mirroring the input image."
#
# This notebook pads an image by mirroring, draws the blue input tile and the yellow output
# tile of Fig. 2 on it, stitches a prediction from tiles, and checks it against a single
# pass of the network over the whole padded image — which uncovers one more condition
# for the two to agree exactly. The network is a small *untrained* U-Net on the CPU: the
# geometry does not depend on the weights.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %%
from minunet.data import em_images, mirror_pad, predict_overlap_tile, tile_origins
from minunet.data.tiling import mirror_crop

model = mu.UNet(base_channels=4, depth=3, seed=0).eval()     # eval(): no dropout
TILE = 164                                                    # a valid input size for depth 3
OUT = model.output_size(TILE)
MARGIN = (TILE - OUT) // 2
image = em_images(1, size=264, seed=2)[0][0][:200]            # a 200 x 264 "large" image
print(f"input tile {TILE} -> output tile {OUT}, context margin {MARGIN} px per side; image {image.shape}")

# %% [markdown]
# ## Mirror padding
#
# Beyond the image border we need `MARGIN` = 44 pixels of context. Mirroring reflects the
# image at its edge *without repeating the edge pixel* (`d c b | a b c d | c b a`), so the
# extrapolated image is as smooth as the image itself there: no artificial edge for the
# network to respond to. In one dimension:

# %%
row = np.arange(5)[None, :]                  # a b c d e = 0 1 2 3 4
print("mirror_pad([0 1 2 3 4], 3) =", mirror_pad(row, ((0, 0), (3, 3)))[0])
print("np.pad(..., mode='reflect') =", np.pad(row[0], 3, mode="reflect"))

# %%
padded = mirror_pad(image, MARGIN)
fig, ax = plt.subplots(figsize=(5, 3.9))
ax.imshow(padded, cmap="gray")
ax.add_patch(plt.Rectangle((MARGIN - 0.5, MARGIN - 0.5), image.shape[1], image.shape[0],
                           fill=False, ec="red", lw=1.5))
ax.set_title(f"image {image.shape} mirror-padded by {MARGIN} px (red: the image)")
ax.axis("off"); plt.show()

# %% [markdown]
# ## The tiles of Fig. 2
#
# The output squares (yellow) start every `OUT` = 76 pixels; where an axis is not a
# multiple of 76, the last square is moved back to end at the image edge
# (`tile_origins` with its default `grid=1`; the end of this notebook shows why minunet's
# prediction passes `grid=2**depth` instead). Each is predicted from the input tile (blue) that surrounds it by the
# margin — for squares at the border, that tile reaches into the mirrored part.

# %%
ys, xs = tile_origins(image.shape[0], OUT), tile_origins(image.shape[1], OUT)
print("output squares start at rows", ys, "and columns", xs)
fig, ax = plt.subplots(figsize=(5, 3.9))
ax.imshow(padded, cmap="gray")
for y in ys:
    for x in xs:
        ax.add_patch(plt.Rectangle((x + MARGIN - 0.5, y + MARGIN - 0.5), OUT, OUT, fill=False,
                                   ec="yellow", lw=0.6, ls="--"))
y, x = ys[-1], xs[-1]                         # the bottom-right tile, as in Fig. 2
ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), TILE, TILE, fill=False, ec="deepskyblue", lw=2))
ax.add_patch(plt.Rectangle((x + MARGIN - 0.5, y + MARGIN - 0.5), OUT, OUT, fill=False, ec="yellow", lw=2))
ax.set_title("blue: input tile, yellow: its output square")
ax.axis("off"); plt.show()


# %% [markdown]
# ## Predicting tile by tile
#
# A prediction function maps a batch of input tiles to class probabilities of their output
# squares (softmax over the 2 classes); `mirror_crop` cuts a tile out of the infinitely
# mirrored image, so tiles that reach beyond the border need no padded copy. Tiles side by
# side every 76 pixels, written by hand:

# %%
def probabilities(batch):
    """(B, 1, TILE, TILE) -> softmax (B, 2, OUT, OUT)"""
    with mu.no_grad():
        logits = model(mu.Tensor(batch)).numpy()
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

squares, stitched = {}, np.zeros((2,) + image.shape, np.float32)
for y in ys:
    for x in xs:
        tile = mirror_crop(image, y - MARGIN, x - MARGIN, TILE, TILE)
        squares[y, x] = probabilities(tile[None, None])[0]
        stitched[:, y:y + OUT, x:x + OUT] = squares[y, x]     # later squares overwrite overlaps


# %% [markdown]
# ## The same as one pass over the whole image?
#
# Every output pixel gets its full context either way, so one might expect the stitched
# result to equal one pass of the network over the whole mirror-padded image (which
# would need far more memory for a really large image). Let us check:

# %%
def whole_image(pad_before, crop):
    """One pass over the image mirror-padded by pad_before (top, left), then up to a valid
    size; returns the probabilities of the image pixels (dropping `crop` leading pixels)."""
    h, w = image.shape
    sh, sw = (model.valid_input_size(n + 2 * pad_before) for n in (h, w))
    big = mirror_pad(image, ((pad_before, sh - h - pad_before), (pad_before, sw - w - pad_before)))
    return probabilities(big[None, None].astype(np.float32))[0][:, crop:crop + h, crop:crop + w]

whole = whole_image(MARGIN, 0)
diff = np.abs(stitched - whole)[1]
print("max |tiles every 76 px - whole image| =", diff.max())
print("max difference of each output square, (start row, start column) mod 8 in brackets:")
for y in ys:
    print("  ".join(f"{np.abs(squares[y, x] - whole[:, y:y + OUT, x:x + OUT]).max():8.2g} "
                    f"{(y % 8, x % 8)}" for x in xs))

# %% [markdown]
# Not the same! Only the squares that start at a multiple of 8 in both directions agree
# (differences of ~1e-7 are float32 rounding). The reason is
# **max-pooling**. A 2x2 pooling with stride 2 pairs pixels (0,1), (2,3), ... counted from
# the start of *its input*. Shift the input by one pixel and different pixels are paired:
# the network is only equivariant to shifts by multiples of $2^{\text{depth}}$ = 8 here (16
# for the paper's depth 4). A tile starting 76 pixels further sees the image through a
# pooling grid shifted by $76 \bmod 8 = 4$ pixels relative to the whole-image pass.
#
# The same shows in the input pixels one output pixel depends on. The gradient of one
# output pixel with respect to the input tile (notebook 1) is non-zero on its receptive
# field: it is wider than the 89-pixel window of $\pm$44 pixels around the pixel, and
# where it starts and ends depends on the pixel's position modulo 8:

# %%
x = mu.Tensor(mirror_crop(image, 0, 0, TILE, TILE)[None, None], requires_grad=True)
for row in range(30, 38):
    x.grad = None
    y = model(x)
    seed = np.zeros(y.shape, np.float32); seed[0, 1, row, 40] = 1.0
    y.backward(seed)                    # d output[row, 40] / d input
    rows = np.flatnonzero(np.abs(x.grad.numpy()[0, 0]).sum(axis=1))
    print(f"output row {row} (row {row} mod 8 = {row % 8}): depends on input rows "
          f"{rows.min()}..{rows.max()} ({rows.max() - rows.min() + 1} rows); margin window "
          f"{row}..{row + 2 * MARGIN}")

# %% [markdown]
# So, for the tiles to reproduce the whole-image pass **exactly**, their output squares
# must start at multiples of $2^{\text{depth}}$. With a valid tile size the output side is
# never such a multiple ($76 \equiv 4 \pmod 8$; the paper's $388 \equiv 4 \pmod{16}$), so we
# step by the largest multiple of 8 that fits, 72, and keep the central 72x72 of each
# 76x76 output (2 pixels cropped per side). `predict_overlap_tile` does the tiling; we only
# tell it the squares are 72 wide and crop in the prediction function. The whole-image pass
# must then use the same grid: pad by the tile's margin around a 72-square (46 pixels) and
# drop the 2 cropped pixels. (For the last square to start at a multiple of 8 as well, the
# image sides here are multiples of 8: 200 and 264.)

# %%
STEP = OUT // 8 * 8                        # 72: tiles start on the pooling grid
CROP = (OUT - STEP) // 2                   # 2 pixels cut from each side of an output square
print("square origins, rows:", tile_origins(image.shape[0], STEP), "columns:", tile_origins(image.shape[1], STEP))

tiled = predict_overlap_tile(image, lambda b: probabilities(b)[:, :, CROP:CROP + STEP, CROP:CROP + STEP],
                             TILE, STEP)
whole_aligned = whole_image(MARGIN + CROP, CROP)
print("max |aligned tiles - whole image| =", np.abs(tiled - whole_aligned).max())

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 2.9))
aligned_diff = np.abs(tiled - whole_aligned)[1]
# the two difference maps share one colour scale, so that "zero" looks like zero: an
# autoscaled colour bar would stretch float32 rounding (or nothing at all) over the full range
panels = [(stitched[1], "tiles every 76 px: P(class 1)", "magma", None),
          (diff, f"|76-px tiles - whole|, max {diff.max():.2f}", "viridis", diff.max()),
          (aligned_diff, f"|72-px-grid tiles - whole|, max {aligned_diff.max():.2g}\n(same scale)",
           "viridis", diff.max())]
for ax, (im, title, cmap, top) in zip(axes, panels):
    shown = ax.imshow(im, cmap=cmap, vmin=None if top is None else 0, vmax=top)
    fig.colorbar(shown, ax=ax, fraction=0.035)
    ax.set_title(title, fontsize=8); ax.axis("off")
for y in ys:
    axes[1].axhline(y - 0.5, color="white", lw=0.5)
for x in xs:
    axes[1].axvline(x - 0.5, color="white", lw=0.5)
plt.tight_layout(); plt.show()

# %% [markdown]
# The left map is what the untrained network predicts; the middle one shows the seams of
# the naive tiling square by square (white lines: square borders); the right one, on the
# same colour scale, is zero up to float32 rounding (its maximum is in the title).
#
# For a *trained* network the differences between pooling phases are much smaller — it has
# learned to give nearly the same answer for an image shifted by a few pixels, which is why
# the paper's tiling looks seamless. But only tiles on the pooling grid reproduce the
# whole-image pass exactly. Notebook 8 measures both for a trained network: tiles off the
# grid differ from one pass a little, minunet's on-grid tiles only by float32 rounding.

# %% [markdown]
# Cropping 2 pixels per side wastes a little of every tile. `predict_overlap_tile(...,
# grid=8)` (and `tile_origins(..., grid=8)`) keeps the whole 76x76 output instead: squares
# still start at multiples of 8 and step by 72, so neighbours overlap by 4 pixels, where
# both compute the same values; the last square may end a few pixels past the border (its
# overhang reads mirrored context and is cropped away), so any image size works. This is
# what `minunet.inference.predict_probabilities` and `python -m minunet.predict` do, with
# `grid = 2**depth` of the model; the result equals the plain whole-image pass:

# %%
print("grid-8 square origins, rows:", tile_origins(image.shape[0], OUT, grid=8),
      "columns:", tile_origins(image.shape[1], OUT, grid=8))
on_grid = predict_overlap_tile(image, probabilities, TILE, OUT, grid=8)
print("max |grid-8 tiles - whole image| =", np.abs(on_grid - whole_image(MARGIN, 0)).max())

# %% [markdown]
# ## Why not a sliding window? (Ciresan et al.)
#
# The best entry of the ISBI 2012 challenge before U-Net (Ciresan et al., 2012) "trained a
# network in a sliding-window setup to predict the class label of each pixel by providing a
# local region (patch) around that pixel as input" (Section 1). The paper names the catch:
# "it is quite slow because the network must be run separately for each patch, and there is
# a lot of redundancy due to overlapping patches". Overlap-tile computes each output pixel's
# features once, shared by its neighbours.
#
# The cost on one 512 x 512 image (the size of an ISBI slice), with this notebook's network:
# a patch classifier of the same receptive field is the same network run on the smallest
# valid input, 92 x 92 pixels (for depth 3 it gives a 4 x 4 output; a patch classifier would
# use its centre pixel), once per pixel of the image. We count the FLOPs of both (the
# convolutions' multiply-adds, `minunet.bench.unet_flops`) and time a batch of patches and
# one overlap-tile pass:

# %%
import time
from minunet.bench import unet_flops
from nbsetup import machine

big = em_images(1, size=512, seed=3)[0][0]
PATCH = model.valid_input_size(89)                     # the smallest valid input: 92 -> 4 x 4 output
pixels = big.size
patch_flops = unet_flops(model, PATCH, 1)
n_tiles = len(tile_origins(512, OUT, grid=8)) ** 2
tile_flops = unet_flops(model, TILE, 1)
print(f"sliding window: {pixels:,} patches of {PATCH}x{PATCH} x {patch_flops / 1e6:.1f} MFLOP = "
      f"{pixels * patch_flops / 1e9:,.0f} GFLOP")
print(f"overlap-tile:   {n_tiles} tiles of {TILE}x{TILE} x {tile_flops / 1e6:.1f} MFLOP = "
      f"{n_tiles * tile_flops / 1e9:,.1f} GFLOP  -> {pixels * patch_flops / (n_tiles * tile_flops):,.0f}x fewer FLOPs")

patches = np.stack([mirror_crop(big, y - 44, x - 44, PATCH, PATCH) for y, x in
                    zip(range(0, 512, 16), range(0, 512, 16))])[:, None].astype(np.float32)   # 32 patches
probabilities(patches)                                 # warm-up
start = time.perf_counter(); probabilities(patches); per_patch = (time.perf_counter() - start) / len(patches)
start = time.perf_counter()
predict_overlap_tile(big, probabilities, TILE, OUT, grid=8)
per_image = time.perf_counter() - start
print(f"measured: one patch {1e3 * per_patch:.2f} ms (in batches of 32) -> {pixels * per_patch / 60:.0f} min "
      f"for the image; one overlap-tile pass {per_image:.2f} s: {pixels * per_patch / per_image:,.0f}x faster")
print(f"(measured when this notebook was built on: {machine()})")

# %% [markdown]
# Several hundred times fewer FLOPs, and a similar measured ratio. Even a patch classifier
# that kept all 16 pixels of its 4 x 4 output would need 16 times fewer passes, still about
# 40 times the work; and larger tiles make overlap-tile cheaper still (less overlap per
# output pixel). (Ciresan et al.'s network was a different architecture, and it averaged
# several networks; the ratio here is for the same network computed both ways, which is the
# redundancy the paper means.)
#
# ## What to take away
#
# * Valid convolutions give output squares smaller than the input tiles; the difference is
#   the context margin (44 pixels per side here, 92 in the paper).
# * At the image border the context is extrapolated by mirroring without repeating the
#   edge pixel.
# * Tiles let a network of fixed memory segment an image of any size, computing every
#   pixel's features once; a sliding window of patches recomputes them for every pixel,
#   several hundred times the work on a 512 x 512 image.
# * Because of max-pooling, a U-Net is equivariant only to shifts by multiples of
#   $2^{\text{depth}}$: to reproduce one pass over the whole image exactly, output squares
#   must start on that grid (`grid=2**depth`, what minunet's prediction uses).
#
# Next: [08_train_and_evaluate.ipynb](08_train_and_evaluate.ipynb) trains a network and
# predicts with these tiles.
