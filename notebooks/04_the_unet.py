# %% [markdown]
# # 4. The U-Net: Fig. 1, layer by layer
#
# The paper's network (Section 2, Fig. 1) has two halves:
#
# * the **contracting path** (left side of the U): four times *two 3x3 convolutions, each
#   followed by a ReLU, then a 2x2 max-pooling with stride 2*; every pooling halves the
#   image and the next step doubles the number of feature channels (64, 128, 256, 512),
#   and a bottom step reaches 1024 channels. This path sees more and more context with
#   less and less spatial resolution: *what* is in the image.
# * the **expansive path** (right side): four times *a 2x2 "up-convolution" that doubles
#   the image and halves the channels, a concatenation with the correspondingly cropped
#   feature map from the contracting path, and two 3x3 convolutions with ReLU*. The
#   concatenation hands the high-resolution features of the left side to the right side:
#   *where* it is, precisely.
# * a final **1x1 convolution** maps the 64 features of every pixel to 2 class scores
#   (cell / membrane).
#
# "In total the network has 23 convolutional layers." All 3x3 convolutions are **valid**
# (unpadded), which is why a 572x572 input tile gives a 388x388 segmentation. This notebook
# computes every layer's size, checks the arithmetic against a real forward pass, shows the
# crop offsets of the skip connections, explains which input sizes are allowed, and draws
# the U from the computed numbers.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %% [markdown]
# ## Valid convolutions shrink the map
#
# A valid 3x3 convolution only computes output pixels whose whole 3x3 window lies inside
# the input: an $H \times W$ map becomes $(H-2) \times (W-2)$. The paper chooses this so that
# "the segmentation map only contains the pixels, for which the full context is available
# in the input image" — no output pixel is computed from invented zeros, so a large image
# can later be segmented tile by tile without seams (Fig. 2, notebook 7).

# %%
x = mu.Tensor(np.arange(64.0).reshape(1, 1, 8, 8))
w = mu.Tensor(np.full((1, 1, 3, 3), 1 / 9))           # a 3x3 mean filter
y = F.conv3x3(x, w)
print("input", x.shape, "-> output", y.shape)
print("output[0, 0, 0, 0] =", y.numpy()[0, 0, 0, 0], "= mean of input rows 0-2, columns 0-2 =",
      x.numpy()[0, 0, :3, :3].mean())


# %% [markdown]
# ## Every layer's size, computed
#
# Four rules give every size: a 3x3 conv subtracts 2, a pooling halves (the size must be
# even, otherwise a row would be dropped), an up-convolution doubles, and crop-and-concatenate
# keeps the up-convolved size while adding the skip connection's channels. The model applies
# them itself: `UNet.layer_table(size)` walks its layers in the order of `forward` and returns
# one row per layer — its name, level (0 = full resolution), input and output channels and side
# lengths, and its parameters, read from the layer's weight arrays: a convolution with a
# $k \times k$ kernel from $c_{in}$ to $c_{out}$ channels has $k^2 c_{in} c_{out}$ weights and
# $c_{out}$ biases. Here is its code, then its table for the paper's network, `mu.UNet()` (1 input
# channel, 2 classes, 64 base channels, depth 4), on a 572 x 572 tile:

# %%
import inspect

print(inspect.getsource(mu.UNet.layer_table))

# %%
model = mu.UNet()
layers = model.layer_table(572)
print(f"{'level':>5}  {'layer':16s} {'name':16s} {'output size':>15s} {'channels':>8s} {'parameters':>12s}")
for r in layers:
    note = f"  (skip {r['skip_size']}, offset {r['crop_offset']})" if r["op"] == "crop + concat" else ""
    print(f"{r['level']:5d}  {r['op']:16s} {r['name']:16s} {r['out_size']:>7d} x {r['out_size']:<5d} "
          f"{r['out_channels']:8d} {r['parameters']:12,d}{note}")

# %% [markdown]
# 18 convolutions 3x3, 4 up-convolutions and one 1x1 convolution: the paper's 23
# convolutional layers (the two dropout layers, "at the end of the contracting path"
# (Section 3.1), change no size). The parameter column comes from the model's arrays; the
# formula $k^2 c_{in} c_{out} + c_{out}$, applied to the table's channel counts, gives the same
# total:

# %%
by_block = {}
for name, p in model.named_parameters():
    block = name.split(".")[0]
    by_block[block] = by_block.get(block, 0) + p.size
print("  ".join(f"{b}: {n:,}" for b, n in by_block.items()))
kernel_side = {"conv 3x3 + ReLU": 3, "up-conv 2x2": 2, "conv 1x1": 1}
n_formula = sum(kernel_side[r["op"]] ** 2 * r["in_channels"] * r["out_channels"] + r["out_channels"]
                for r in layers if r["op"] in kernel_side)
n_model = sum(by_block.values())
n_conv = sum(r["op"] in kernel_side for r in layers)
print(f"convolutional layers: {n_conv}")
print(f"parameters: formula {n_formula:,}  table {sum(r['parameters'] for r in layers):,}  "
      f"model {n_model:,}  equal: {n_formula == n_model}")

# %% [markdown]
# Most parameters sit at the bottom of the U (the 3x3 convolutions from 512 to 1024 channels
# and back), yet the *computation* is spread nearly evenly over the levels: one level down,
# the maps have 4 times fewer pixels and the convolutions 4 times more weights (twice the
# input channels times twice the output channels).
#
# ## Checking the table against a real forward pass
#
# The table is arithmetic; now we run a network and look at the shapes it really produces.
# Sizes do not depend on the channel counts, so a network of the same depth with
# `base_channels=2` (2, 4, ..., 32 channels: 32 times fewer than the paper) gives the same
# sizes with about 1,000 times less arithmetic. The layers of `mu.UNet` call the ops of
# `minunet.functional` (`F.conv3x3`, `F.max_pool2x2`, ...) when they run, so wrapping those
# functions for the duration of one call of `model(x)` records every op the real forward pass
# performs, with its arguments and result — a trace of `forward`, not a copy of it. The input
# is a synthetic EM-like image (notebook 8's data) so that the feature maps look like
# something; `eval()` turns dropout off (the dropout layers pass their input through).

# %%
import contextlib
from minunet.data import em_images

@contextlib.contextmanager
def recording_ops(names=("conv3x3", "relu", "max_pool2x2", "dropout", "conv_transpose2x2",
                         "crop_concat", "conv1x1")):
    """Inside the block every call of these minunet.functional ops is appended to the yielded
    list as (op name, arguments, result); afterwards the original functions are back."""
    calls, originals = [], {name: getattr(F, name) for name in names}
    def recorded(name, op):
        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            calls.append((name, args, out))
            return out
        return call
    for name, op in originals.items():
        setattr(F, name, recorded(name, op))
    try:
        yield calls
    finally:
        for name, op in originals.items():
            setattr(F, name, op)

small = mu.UNet(base_channels=2, depth=4, seed=0).eval()
image = em_images(1, size=572, seed=0)[0][0]          # images (1, H, W), labels (1, H, W)
x = mu.Tensor(image[None, None])
with mu.no_grad(), recording_ops() as calls:
    y = small(x)
traced = [(name, out.shape) for name, args, out in calls if name != "relu"]  # each ReLU follows a conv 3x3
skips = {args[0].shape[2]: args[0] for name, args, out in calls if name == "crop_concat"}  # crop_concat(skip, up)
print(len(calls), "op calls,", len(traced), "layers (ReLUs folded into their convolutions), output", y.shape)

# %%
table_op = {"conv3x3": "conv 3x3 + ReLU", "max_pool2x2": "max-pool 2x2", "dropout": "dropout",
            "conv_transpose2x2": "up-conv 2x2", "crop_concat": "crop + concat", "conv1x1": "conv 1x1"}
expected = small.layer_table(572)
assert len(expected) == len(traced)
print(f"{'layer':16s} {'table (base 2)':>15s}   {'real forward: F.<op>':22s} {'(N, C, H, W)'}")
for r, (name, shape) in zip(expected, traced):
    assert r["op"] == table_op[name], (r, name)
    assert shape[1:] == (r["out_channels"], r["out_size"], r["out_size"]), (r, shape)
    print(f"{r['op']:16s} {r['out_channels']:5d} x {r['out_size']:3d} x {r['out_size']:<3d}    "
          f"{name:22s} {shape}")
print(len(traced), "layers: every size and channel count of the table matches the real forward pass")

# %% [markdown]
# ## Crop and concatenate: the offsets
#
# Every valid convolution eats one pixel on each side, so a contracting-path feature map
# (the skip connection) is *larger* than the up-convolved map it is concatenated with:
# 568 vs 392 pixels at the top level. "The cropping is necessary due to the loss of border
# pixels in every convolution" (Section 2): the skip map is cut to its centre, offset
# $\left(\frac{H_{skip} - H_{up}}{2}, \frac{W_{skip} - W_{up}}{2}\right)$, so that both
# maps show the same image region pixel for pixel; then their channels are stacked.

# %%
for r in layers:
    if r["op"] == "crop + concat":
        print(f"level {r['level']}: skip {r['skip_size']:3d} x {r['skip_size']:<3d} -> centre "
              f"{r['out_size']:3d} x {r['out_size']:<3d} at offset ({r['crop_offset']}, {r['crop_offset']}); "
              f"{r['out_channels'] - r['in_channels']} + {r['in_channels']} = {r['out_channels']} channels")

# %%
fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
for ax, level in zip(axes, (0, 2)):
    r = next(r for r in layers if r["op"] == "crop + concat" and r["level"] == level)
    maps = skips[r["skip_size"]].numpy()[0]               # the skip map the real forward pass used
    channel = int(maps.std(axis=(1, 2)).argmax())        # many ReLU maps of a random net are 0
    ax.imshow(maps[channel], cmap="gray")
    ax.add_patch(plt.Rectangle((r["crop_offset"] - 0.5, r["crop_offset"] - 0.5), r["out_size"], r["out_size"],
                               fill=False, ec="yellow", lw=2))
    ax.set_title(f"level {level}: skip map {r['skip_size']}x{r['skip_size']} (channel {channel})\n"
                 f"crop {r['out_size']}x{r['out_size']} at offset {r['crop_offset']}", fontsize=8)
for ax in axes: ax.axis("off")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Which input sizes are valid, and why 12 mod 16
#
# Two conditions (Section 2: "it is important to select the input tile size such that all
# 2x2 max-pooling operations are applied to a layer with an even x- and y-size"):
#
# 1. **Even before every pooling.** With $s$ the input size, the sizes before the four
#    poolings are $s-4$, $\frac{s-4}{2}-4$, ... Requiring all of them even is the same as
#    requiring the size after the fourth pooling, $\frac{s - 60}{16}$, to be an integer:
#    $s \equiv 60 \equiv 12 \pmod{16}$.
# 2. **Positive everywhere.** The convolutions remove a fixed border: 4 pixels per level
#    (two convs) *at that level's scale*, i.e. $4 \cdot (1 + 2 + 4 + 8) = 60$ input pixels on
#    the way down, $4 \cdot 16 = 64$ at the bottom, and $4 \cdot (8 + 4 + 2 + 1) = 60$ on the
#    way up. So **output = input - 184** (92 pixels of context on each side), and the
#    smallest valid input is 188 (output 4).
#
# `mu.UNet.output_size(s)` follows a size through the network (a `ValueError` naming the
# nearest valid sizes if it is not valid); `mu.UNet.valid_input_size(n)` gives the smallest
# valid size $\ge n$.

# %%
valid = [s for s in range(150, 420) if mu.UNet.valid_input_size(s) == s]
print("valid input sizes in [150, 420):", valid)
print("all 12 mod 16:", all(s % 16 == 12 for s in valid),
      "| output = input - 184:", all(mu.UNet.output_size(s) == s - 184 for s in valid))
print("UNet.output_size(572) =", mu.UNet.output_size(572), "| valid_input_size(500) =",
      mu.UNet.valid_input_size(500))
margin_down = sum(4 * 2 ** l for l in range(4)); margin_bottom = 4 * 2 ** 4
print("border lost:", margin_down, "+", margin_bottom, "+", margin_down, "=", 2 * margin_down + margin_bottom)
try:
    mu.UNet.output_size(570)
except ValueError as error:
    print("ValueError:", error)

# %% [markdown]
# The same reasoning for any depth $d$: input sizes $\equiv -4 \pmod{2^d}$ and output = input
# $- (12 \cdot 2^d - 8)$. The smaller networks of notebooks 7 and 8 use depth 3 (88 pixels of
# border, sizes $\equiv 4 \pmod 8$):

# %%
for depth in (2, 3, 4):
    s = mu.UNet.valid_input_size(120, depth)
    print(f"depth {depth}: valid sizes step by {2 ** depth}; smallest valid >= 120: {s} -> output "
          f"{mu.UNet.output_size(s, depth)} (border {s - mu.UNet.output_size(s, depth)} = 12*2^{depth} - 8)")


# %% [markdown]
# ## The U, drawn from the computed sizes
#
# Each box is a feature map; its height grows with the image size (square-root scale, so
# the bottom stays visible) and its width with the number of channels (log scale). The
# colours of the arrows follow Fig. 1: blue = conv 3x3 + ReLU, red = max-pool, green =
# up-conv, gray = copy and crop (the white boxes are the cropped copies), teal = conv 1x1.

# %%
def draw_u(layers):
    maps = [dict(op="input", level=0, size=layers[0]["in_size"], channels=layers[0]["in_channels"])]
    maps += [dict(op=r["op"], level=r["level"], size=r["out_size"], channels=r["out_channels"])
             for r in layers if r["op"] != "dropout"]           # dropout changes no size: not drawn
    fig, ax = plt.subplots(figsize=(12, 5.2))
    height = lambda s: 2.6 * np.sqrt(s / maps[0]["size"])
    width = lambda c: 0.12 + 0.09 * np.log2(c)
    y_of = lambda level: -2.3 * level
    x, previous, last_on_level = 0.0, None, {}
    colours = {"conv 3x3 + ReLU": "tab:blue", "max-pool 2x2": "tab:red",
               "up-conv 2x2": "tab:green", "conv 1x1": "teal"}
    for r in maps:
        channels = r["channels"] // 2 if r["op"] == "crop + concat" else r["channels"]
        w, h, y = width(channels), height(r["size"]), y_of(r["level"])
        if r["op"] == "crop + concat":       # the white copy sits left of the up-conv output
            ux, uy, uw = previous
            ax.add_patch(plt.Rectangle((ux - w, y - h / 2), w, h, fc="white", ec="k", lw=0.6))
            sx, sy = last_on_level[r["level"]]
            ax.annotate("", xy=(ux - w, y), xytext=(sx, sy),
                        arrowprops=dict(arrowstyle="->", color="gray", lw=1.2))
            continue
        if previous is not None:
            px, py, pw = previous
            x = px + pw + (0.62 if r["level"] == previous_level else 0.15)   # room for 3-digit labels
            if r["op"] == "up-conv 2x2":
                x += width(channels)            # room for the white copy box
            ax.annotate("", xy=(x, y), xytext=(px + pw, py),
                        arrowprops=dict(arrowstyle="->", color=colours[r["op"]], lw=1.2))
        ax.add_patch(plt.Rectangle((x, y - h / 2), w, h, fc="#9cf" if r["op"] != "input" else "#ddd",
                                   ec="k", lw=0.6))
        ax.text(x + w / 2, y + h / 2 + 0.08, str(r["channels"]), ha="center", va="bottom", fontsize=8)
        ax.text(x + w / 2, y - h / 2 - 0.08, str(r["size"]), ha="center", va="top", fontsize=8)
        previous, previous_level = (x, y, w), r["level"]
        if r["op"] != "up-conv 2x2":
            last_on_level[r["level"]] = (x + w, y)
    ax.set_xlim(-0.5, x + 1); ax.set_ylim(y_of(4) - 1, 1.8); ax.set_aspect("equal"); ax.axis("off")
    ax.set_title(f"U-Net, input {maps[0]['size']} -> output {maps[-1]['size']} "
                 "(channels above each map, side length below)")
    plt.show()

draw_u(layers)

# %% [markdown]
# ## What to take away
#
# * Valid 3x3 convolutions make the output 184 pixels smaller than the input (depth 4);
#   those pixels are the context each output pixel needs.
# * Crop-and-concatenate aligns the larger skip map with the up-convolved map by a centre
#   crop (offsets 4, 16, 40, 88 for a 572 tile) and stacks their channels.
# * Valid input sizes are $12 \bmod 16$ (depth 4) so that every pooling sees an even size;
#   `UNet.output_size` and `UNet.valid_input_size` do this arithmetic.
# * 23 convolutional layers, 31,030,658 parameters for the paper's configuration;
#   `model.layer_table(size)` lists every layer's sizes, channels and parameters.
#
# Next: [05_weighted_loss.ipynb](05_weighted_loss.ipynb) — what the network is trained to
# minimise: the weighted cross-entropy of eq. 1 and the border weights of eq. 2. After it,
# [06_elastic_deformation.ipynb](06_elastic_deformation.ipynb) (how so few training images
# are made into many) and [07_overlap_tile.ipynb](07_overlap_tile.ipynb) (how the shrinking
# output tiles cover an image of any size).
