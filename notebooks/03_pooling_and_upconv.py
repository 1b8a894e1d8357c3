# %% [markdown]
# # 3. Max-pooling and the up-convolution: how the U goes down and comes back up
#
# Two operations change the *resolution* of a U-Net's feature maps (paper Section 2, Fig. 1):
#
# * on the contracting path, "a 2x2 max pooling operation with stride 2 for downsampling"
#   (red arrows): every 2x2 window of a feature map becomes one pixel, its maximum;
# * on the expansive path, "an upsampling of the feature map followed by a 2x2 convolution
#   ('up-convolution') that halves the number of feature channels" (green arrows): every
#   pixel becomes a 2x2 block again, this time with *learned* weights.
#
# The introduction (Section 1) names the idea behind the right half of the U: in the
# fully convolutional network the paper builds on, "pooling operators are replaced by
# upsampling operators. Hence, these layers increase the resolution of the output."
#
# This notebook draws what each operation does to a small integer image, forward and
# backward, then reads the CUDA kernels that compute them (`kernels/maxpool2x2.cu`,
# `kernels/conv_transpose2x2.cu`), explains in NumPy terms which thread computes which
# number, runs those kernels on the CPU through minunet's CUDA emulator (device `"emu"`)
# and compares every result with the NumPy reference, `minunet.backends.reference` (the
# oracle; device `"cpu"` runs fast Numba kernels for float32, a second implementation checked
# against the same reference). A short section at
# the end covers the third resolution-related piece, the centre crop of the skip connections.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %%
import re
from minunet.backends import get_backend, reference
from minunet.backends.kernels import KernelBackend
from minunet.backends.sources import kernel_source, kernels_dir
from minunet.devices import to_host

def show_ints(ax, a, title, cmap="Blues", block=2, fmt=None, lim=None):
    # A small 2-D array drawn cell by cell with its values written in; thick lines every
    # `block` pixels (the 2x2 windows / blocks), thin ones between pixels.
    a = np.asarray(a, dtype=float)
    lo, hi = lim if lim else (min(a.min(), 0.0), max(a.max(), 1.0))
    ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi + 0.7 * (hi - lo))  # light colours: text stays legible
    fmt = fmt or (lambda v: f"{v:g}")
    for (r, c), v in np.ndenumerate(a):
        ax.text(c, r, fmt(v), ha="center", va="center", fontsize=8)
    h, w = a.shape
    ax.hlines(np.arange(h + 1) - 0.5, -0.5, w - 0.5, color="0.75", lw=0.5)
    ax.vlines(np.arange(w + 1) - 0.5, -0.5, h - 0.5, color="0.75", lw=0.5)
    if block:
        hb, wb = h // block * block, w // block * block      # complete blocks only
        ax.hlines(np.arange(0, hb + 1, block) - 0.5, -0.5, wb - 0.5, color="k", lw=1.2)
        ax.vlines(np.arange(0, wb + 1, block) - 0.5, -0.5, hb - 0.5, color="k", lw=1.2)
    ax.set_xticks([]); ax.set_yticks([]); ax.set_title(title, fontsize=8)

def outline(ax, cells, color="red", size=1, lw=1.8):
    # Square outlines of `size` pixels around the (row, column) cells given.
    for r, c in cells:
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), size, size, fill=False, ec=color, lw=lw))

def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# %% [markdown]
# ## Part 1: 2x2 max-pooling with stride 2
#
# For an input $x$ of shape $(N, C, H, W)$ the output has shape
# $(N, C, \lfloor H/2 \rfloor, \lfloor W/2 \rfloor)$ and
#
# $$y_{n,c,i,j} = \max_{a, b \in \{0, 1\}} x_{n,c,2i+a,2j+b}.$$
#
# Each channel is pooled on its own; the windows do not overlap (stride 2 = window size).
# Besides $y$, the forward pass records **where** each maximum was: `argmax` $= 2a + b \in
# \{0, 1, 2, 3\}$, the position inside the window, one byte per output pixel. The
# backward pass needs it.
#
# Below, an 8x8 integer image. Two windows are made to tie on purpose (more on ties below).

# %%
rng = np.random.default_rng(7)
img = rng.integers(0, 10, (8, 8)).astype(np.float32)
img[0:2, 6:8] = 5                     # all four pixels of window (0, 3) are equal
img[2:4, 2:4] = [[3, 8], [8, 1]]      # window (1, 1) has two maxima

x = mu.Tensor(img[None, None], requires_grad=True)        # (N, C, H, W) = (1, 1, 8, 8), on "cpu"
y = F.max_pool2x2(x)
_, argmax = get_backend("cpu").max_pool2x2_forward(x.data)  # the same call F.max_pool2x2 makes
argmax = argmax[0, 0]
print("y =\n", y.numpy()[0, 0])
print("argmax (2*a + b inside each window) =\n", argmax)
winners = [(2 * i + k // 2, 2 * j + k % 2) for (i, j), k in np.ndenumerate(argmax)]

# %%
fig, axes = plt.subplots(1, 3, figsize=(7, 2.6), gridspec_kw=dict(width_ratios=[8, 4, 4]))
show_ints(axes[0], img, "x (8x8): the max of each window outlined")
outline(axes[0], winners)
show_ints(axes[1], y.numpy()[0, 0], "y = max_pool2x2(x) (4x4)", block=1)
show_ints(axes[2], argmax, "argmax = 2a + b", cmap="Greys", block=1, lim=(0, 6))
plt.tight_layout(); plt.show()

# %% [markdown]
# ### Backward: the gradient goes to the winner
#
# Inside one window, $y = \max(x_0, x_1, x_2, x_3)$ changes only if the winning pixel
# changes (the others can move a little without affecting the max). So
#
# $$\frac{\partial L}{\partial x_{n,c,2i+a,2j+b}} =
#   \begin{cases} \dfrac{\partial L}{\partial y_{n,c,i,j}} & \text{if } 2a + b = \mathrm{argmax}_{n,c,i,j} \\
#                 0 & \text{otherwise.} \end{cases}$$
#
# Each output gradient is *routed* to exactly one input pixel; three of every four input
# pixels get zero. Below, the output gradient is $1, 2, \dots, 16$ so that you can follow
# each number to its place.

# %%
gy = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
y.backward(gy)                                   # a non-scalar output: pass dL/dy explicitly
gx = x.grad.numpy()[0, 0]

fig, axes = plt.subplots(1, 2, figsize=(5.4, 2.6), gridspec_kw=dict(width_ratios=[4, 8]))
show_ints(axes[0], gy[0, 0], "dL/dy (4x4)", cmap="Oranges", block=1)
show_ints(axes[1], gx, "dL/dx: dL/dy at each argmax, 0 elsewhere", cmap="Oranges",
          fmt=lambda v: f"{v:g}" if v else "·")
outline(axes[1], winners)
plt.tight_layout(); plt.show()
print("non-zero input gradients:", np.count_nonzero(gx), "of", gx.size,
      "| sum of dL/dx == sum of dL/dy:", gx.sum() == gy.sum())

# %% [markdown]
# ### Ties: the first maximum in row-major order wins
#
# When two or more pixels of a window share the maximum, the max is not differentiable
# there, and an implementation has to pick one pixel to receive the gradient. minunet fixes
# the rule (`docs/backends.md`), for the NumPy reference and the CUDA kernel alike: the
# window is scanned in the order (0,0), (0,1), (1,0), (1,1) with a strict `>`, so a later
# pixel only wins if it is *larger*. In the image above, window (0, 3) (four 5s) gave its
# gradient to the top-left pixel (argmax 0) and window (1, 1) ([[3, 8], [8, 1]]) to the
# top-right one (argmax 1), not the bottom-left 8. Every tie pattern, checked on both
# devices:

# %%
patterns = {"all equal": [[5, 5], [5, 5]], "(0,1) = (1,0)": [[3, 8], [8, 1]],
            "(1,0) = (1,1)": [[1, 2], [7, 7]], "(0,0) = (1,1)": [[9, 0], [0, 9]],
            "no tie": [[1, 2], [3, 4]]}
windows = np.array(list(patterns.values()), np.float32)[:, None]     # (5, 1, 2, 2)
for name, backend in (("reference", reference), ("cpu (Numba)", get_backend("cpu")), ("emu", get_backend("emu"))):
    _, am = backend.max_pool2x2_forward(windows)
    print(f"{name:11s}: argmax", dict(zip(patterns, to_host(am).ravel().tolist())))

# %% [markdown]
# ### Odd sizes: the floor drops the last row or column
#
# With an odd $H$ or $W$ the last row (column) has no partner; like PyTorch's default
# (`ceil_mode=False`) the output size is rounded *down* and that row or column is simply
# ignored: it never influences $y$, so its gradient is 0. The paper avoids this case on
# purpose: "it is important to select the input tile size such that all 2x2 max-pooling
# operations are applied to a layer with an even x- and y-size" (Section 2) — a dropped row
# would shift the later feature maps against the skip connections. Notebook 4 shows which
# tile sizes satisfy this; here is what happens when it is violated, on a 5x7 image:

# %%
odd = np.random.default_rng(3).integers(0, 10, (5, 7)).astype(np.float32)
xo = mu.Tensor(odd[None, None], requires_grad=True)
yo = F.max_pool2x2(xo)
yo.backward(np.ones(yo.shape, np.float32))
gxo = xo.grad.numpy()[0, 0]
print("input", xo.shape, "-> output", yo.shape, "(5 // 2 = 2, 7 // 2 = 3)")
print("gradient in the dropped last row:", gxo[-1], " last column:", gxo[:, -1])

fig, axes = plt.subplots(1, 3, figsize=(7, 2.1), gridspec_kw=dict(width_ratios=[7, 3, 7]))
show_ints(axes[0], odd, "x (5x7): row 4, column 6 dropped")
axes[0].add_patch(plt.Rectangle((-0.5, 3.5), 7, 1, fc="0.5", alpha=0.45))
axes[0].add_patch(plt.Rectangle((5.5, -0.5), 1, 4, fc="0.5", alpha=0.45))
show_ints(axes[1], yo.numpy()[0, 0], "y (2x3)", block=1)
show_ints(axes[2], gxo, "dL/dx for dL/dy = 1", cmap="Oranges", fmt=lambda v: f"{v:g}" if v else "·")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## The pooling kernels, read for a NumPy programmer
#
# A CUDA kernel is a function that runs once **per thread**, for many thousands of threads
# at once. Threads come in blocks: a launch with `grid = (B,)` and `block = (T,)` runs
# $B \cdot T$ threads, and inside the function each one learns who it is from
# `blockIdx.x` (which block, 0..B-1) and `threadIdx.x` (which thread of the block, 0..T-1).
# The usual first line turns that into one global number,
# `t = blockIdx.x * blockDim.x + threadIdx.x`, and the rest of the kernel decides which
# array element(s) thread `t` is responsible for. That choice — the **thread-to-data
# mapping** — is the main design decision of every kernel below.
#
# `minunet.backends.sources.function_source` cuts one kernel out of its `.cu` file by name
# (from `extern "C" __global__` to the matching closing brace), so what you read here is
# exactly the code that runs:

# %%
from minunet.backends.sources import function_source

print(function_source("maxpool2x2", "maxpool2x2_forward", comment=False))


# %% [markdown]
# **Forward: one thread per output pixel.** Thread `t` owns `y.flat[t]` (and `argmax.flat[t]`).
# The three lines computing `j`, `i`, `nc` are `np.unravel_index(t, (N*C, Ho, Wo))`: because
# the arrays are C-contiguous, the last index varies fastest. `win` points at the window's
# top-left pixel in the flattened `x`; its right neighbour is `win[1]`, the pixel below it is
# one row, i.e. `W` floats, further: `win[W]`. The thread reads 4 numbers, writes 2, and no
# two threads ever write the same place, so no coordination between threads is needed. The
# `if (t >= ...) return;` line is there because the launcher rounds the number of threads
# up to whole blocks of 256: the spare threads of the last block must do nothing.
#
# The same thing in Python, line for line — a "thread" is just a loop iteration:

# %%
def maxpool2x2_forward_thread(t, x, y, argmax, N, C, H, W):
    Ho, Wo = H // 2, W // 2
    if t >= N * C * Ho * Wo:
        return
    j, i, nc = t % Wo, (t // Wo) % Ho, t // (Wo * Ho)   # == np.unravel_index(t, (N*C, Ho, Wo))
    xf = x.reshape(-1)
    top = (nc * H + 2 * i) * W + 2 * j                   # index of the window's top-left pixel
    best, arg = xf[top], 0
    for k, v in enumerate([xf[top + 1], xf[top + W], xf[top + W + 1]]):
        if v > best:                                     # strict: ties keep the earlier pixel
            best, arg = v, k + 1
    y.reshape(-1)[t], argmax.reshape(-1)[t] = best, arg

x4 = img[None, None]                                     # (1, 1, 8, 8)
y_py, am_py = np.empty((1, 1, 4, 4), np.float32), np.empty((1, 1, 4, 4), np.uint8)
grid, block = 2, 8                                       # 2 blocks of 8 threads = 16 outputs
for block_idx in range(grid):                            # on a GPU: all at the same time
    for thread_idx in range(block):
        maxpool2x2_forward_thread(block_idx * block + thread_idx, x4, y_py, am_py, 1, 1, 8, 8)
print("Python threads == reference:", np.array_equal(y_py, y.numpy()), np.array_equal(am_py[0, 0], argmax))

# %% [markdown]
# Now the real kernel. `EmuModule` compiles the `.cu` text for the CPU and is called exactly
# like CuPy's `RawModule` on a GPU: `function(grid, block, arguments)`, with arrays standing
# in for device memory (updated in place) and every integer passed as an `np.int32`, the
# C type of the parameter. This is what the op's launcher does for you (`kernels_forward` in
# `minunet/ops/maxpool2x2.py`, with blocks of 256 threads, through `KernelBackend`); here with
# the same 2 blocks of 8 threads as the Python loop. The emulator runs
# the threads in a *shuffled* order, which would expose a kernel whose result depended on
# the order.

# %%
from minunet.emulator import EmuModule

module = EmuModule(kernel_source("maxpool2x2"), name=str(kernels_dir() / "maxpool2x2.cu"))
forward = module.get_function("maxpool2x2_forward")
y_emu, am_emu = np.empty((1, 1, 4, 4), np.float32), np.empty((1, 1, 4, 4), np.uint8)
forward((grid,), (block,), (x4, y_emu, am_emu, np.int32(1), np.int32(1), np.int32(8), np.int32(8)))
print("y from the kernel on emu =\n", y_emu[0, 0])
print("kernel == reference:  y", np.array_equal(y_emu, y.numpy()), "| argmax", np.array_equal(am_emu[0, 0], argmax))

# %% [markdown]
# **Backward: one thread per *input* pixel, a gather.** One could also give the backward one
# thread per output pixel that writes `gy` into the argmax position of its window ("scatter").
# But then the other three pixels of every window would need a separate pass writing zeros.
# Instead thread `t` owns `gx.flat[t]`: it finds its window `(yy/2, xx/2)`, asks "am I that
# window's argmax?" and writes either `gy` or 0. Every element of `gx` is written exactly
# once, by one thread, zeros included; pixels in a row or column dropped by the floor
# (`i >= Ho` or `j >= Wo`) get 0.

# %%
print(function_source("maxpool2x2", "maxpool2x2_backward", comment=False))


# %% [markdown]
# ### Pooling on `emu` vs the NumPy reference
#
# The same `F.max_pool2x2` and `.backward()` on device `"emu"` run the two kernels above
# (launched by `kernels_forward` and `kernels_backward` of `minunet/ops/maxpool2x2.py`). The
# oracle is the NumPy reference, `reference.max_pool2x2_forward` and `_backward`
# (`reference_forward` and `reference_backward` of the same module, which compare four
# strided views of all windows at once). Odd sizes, 2 images, 3 channels; once with small integers, where many windows
# contain ties, and once with random floats. Pooling only *selects* numbers, so the
# two devices must agree exactly: error 0, and the same argmax everywhere.

# %%
def pool_on(device, x, gy):
    X = mu.Tensor(x, device=device, requires_grad=True)
    Y = F.max_pool2x2(X)
    Y.backward(mu.Tensor(gy, device=device))
    _, am = get_backend(device).max_pool2x2_forward(X.data)
    return {"y": Y.numpy(), "argmax": to_host(am), "dL/dx": X.grad.numpy()}

def pool_reference(x, gy):
    y, am = reference.max_pool2x2_forward(x)
    return {"y": y, "argmax": am, "dL/dx": reference.max_pool2x2_backward(gy, am, x.shape)}

def compare_pool(device):
    rng = np.random.default_rng(1)
    shape = (2, 3, 7, 9)                                    # odd H and W, N > 1, C > 1
    gy = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    for name, x in [("integers 0..3", rng.integers(0, 4, shape).astype(np.float32)),
                    ("standard normal", rng.standard_normal(shape).astype(np.float32))]:
        got, ref = pool_on(device, x, gy), pool_reference(x, gy)
        win = x[:, :, :6, :8].reshape(2, 3, 3, 2, 4, 2)        # the 72 windows, floor applied
        ties = int(((win == win.max(axis=(3, 5), keepdims=True)).sum(axis=(3, 5)) > 1).sum())
        print(f"{device} vs reference, x {shape} {name:15s} ({ties:2d} windows with ties): "
              f"max|y err| = {max_err(got['y'], ref['y']):.1e}, "
              f"argmax differs at {int((got['argmax'] != ref['argmax']).sum())} of {ref['argmax'].size}, "
              f"max|dL/dx err| = {max_err(got['dL/dx'], ref['dL/dx']):.1e}")

compare_pool("emu")

# %% [markdown]
# ## Part 2: the up-convolution, a 2x2 transposed convolution with stride 2
#
# The expansive path has to undo the poolings: double the height and width. minunet
# implements the paper's up-convolution like PyTorch's `ConvTranspose2d(Ci, Co,
# kernel_size=2, stride=2)`: weights $w$ of shape $(C_i, C_o, 2, 2)$, bias $b$ of shape
# $(C_o)$, and
#
# $$y_{n,o,2i+a,2j+c} = b_o + \sum_{k=0}^{C_i-1} x_{n,k,i,j}\, w_{k,o,a,c}, \qquad a, c \in \{0, 1\},$$
#
# from $(N, C_i, H, W)$ to $(N, C_o, 2H, 2W)$. Read it per input pixel: pixel $(i, j)$
# **stamps a 2x2 copy of the kernel, scaled by its value**, onto the output block
# $[2i{:}2i{+}2,\ 2j{:}2j{+}2]$. Because the stride equals the kernel size, the stamps of
# neighbouring pixels never overlap: every output pixel comes from exactly one input pixel
# (per input channel). In the U-Net $C_o = C_i / 2$ ("halves the number of feature
# channels"); with several channels each output channel sums the stamps of all input
# channels. One channel first:

# %%
xu = np.array([[1, 0, 2, 1], [0, 3, 1, 0], [2, 1, 0, 1], [1, 0, 1, 2]], np.float32)
wu = np.array([[1, 2], [3, 4]], np.float32)
yu = F.conv_transpose2x2(mu.Tensor(xu[None, None]), mu.Tensor(wu[None, None])).numpy()[0, 0]

fig, axes = plt.subplots(1, 3, figsize=(7, 2.6), gridspec_kw=dict(width_ratios=[4, 2, 8]))
show_ints(axes[0], xu, "x (4x4)", block=1)
show_ints(axes[1], wu, "w (2x2)", cmap="Greens", block=0)
show_ints(axes[2], yu, "y: each pixel stamps x[i, j] * w", cmap="Purples")
outline(axes[0], [(1, 1)]); outline(axes[2], [(2, 2)], size=2)
plt.tight_layout(); plt.show()
print("x[1, 1] = 3 stamps 3 * w =", (3 * wu).tolist(), "onto y[2:4, 2:4] =", yu[2:4, 2:4].tolist())

# %% [markdown]
# ### All-ones weights: the up-convolution *is* nearest-neighbour upsampling
#
# Nearest-neighbour upsampling copies every pixel into a 2x2 block, `x.repeat(2, axis=-2)
# .repeat(2, axis=-1)` in NumPy. That is exactly the stamp of an all-ones kernel. The
# up-convolution generalises it in two ways the network can learn: the four positions of a
# block may get *different* weights (sub-pixel detail), and the channels are mixed while
# upsampling — with $w_{k,o,a,c} = M_{k,o}$ for all $a, c$ it is nearest upsampling followed
# by a 1x1 convolution with matrix $M$; in general it is four different 1x1 convolutions,
# one per position in the block (which is how the NumPy reference computes it: one matrix
# product $(4 C_o \times C_i)\,(C_i \times NHW)$, then a reshuffle).

# %%
ones = np.ones((1, 1, 2, 2), np.float32)
y_ones = F.conv_transpose2x2(mu.Tensor(xu[None, None]), mu.Tensor(ones)).numpy()[0, 0]
nearest = xu.repeat(2, axis=0).repeat(2, axis=1)
print("up-conv with w = 1  ==  nearest upsampling:", np.array_equal(y_ones, nearest))

rng = np.random.default_rng(0)                         # several channels, N = 2
xc = rng.standard_normal((2, 6, 3, 5)).astype(np.float32)
identity = np.eye(6, dtype=np.float32)[:, :, None, None] * np.ones((2, 2), np.float32)
print("6 -> 6 channels, w[k, o] = (k == o) * ones  ==  nearest, channel by channel:",
      np.array_equal(F.conv_transpose2x2(mu.Tensor(xc), mu.Tensor(identity)).numpy(),
                     xc.repeat(2, axis=2).repeat(2, axis=3)))
M = rng.standard_normal((6, 3)).astype(np.float32)      # 6 -> 3 channels: the U-Net's halving
y_m = F.conv_transpose2x2(mu.Tensor(xc), mu.Tensor(M[:, :, None, None] * np.ones((2, 2), np.float32))).numpy()
y_ref = np.einsum("ko,nkhw->nohw", M, xc.repeat(2, axis=2).repeat(2, axis=3))
print("6 -> 3 channels, w[k, o] = M[k, o] * ones  ==  nearest, then 1x1 conv with M: max err",
      f"{max_err(y_m, y_ref):.1e}")

fig, axes = plt.subplots(1, 3, figsize=(7, 2.5), gridspec_kw=dict(width_ratios=[4, 8, 8]))
show_ints(axes[0], xu, "x", block=1)
show_ints(axes[1], y_ones, "up-conv, w = ones\n= nearest upsampling", cmap="Purples")
show_ints(axes[2], yu, "up-conv, w = [[1, 2], [3, 4]]\n(learned detail)", cmap="Purples")
plt.tight_layout(); plt.show()

# %% [markdown]
# ### "An upsampling followed by a 2x2 convolution"
#
# The paper's wording describes the same operation in two steps. Upsample by *inserting
# zeros*: $u_{2i, 2j} = x_{i,j}$ and 0 at the other three positions of each block. Then
# convolve with the 2x2 kernel (a true convolution, $z_{p,q} = \sum_{a,c} w_{a,c}\,
# u_{p-a,q-c}$): at output $(2i+a, 2j+c)$ only the tap $(a, c)$ lands on a non-zero, so
# $z_{2i+a,2j+c} = w_{a,c}\,x_{i,j}$ — the stamp. The one-step form is cheaper: it never
# multiplies by the 3 zeros of each block.

# %%
u = np.zeros((8, 8), np.float32); u[::2, ::2] = xu          # upsampling by zero insertion
up = np.pad(u, ((1, 0), (1, 0)))                              # u[-1] = 0 for the taps a = 1
z = sum(wu[a, c] * up[1 - a: 9 - a, 1 - c: 9 - c] for a in (0, 1) for c in (0, 1))
print("zero insertion + 2x2 convolution == up-conv:", np.array_equal(z, yu))

# %% [markdown]
# ### Gradients of the up-convolution
#
# Differentiate the forward formula; each output pixel depends on one input pixel per
# channel, so every sum is short:
#
# * **input**: $\displaystyle \frac{\partial L}{\partial x_{n,k,i,j}} = \sum_{o}\sum_{a,c}
#   \frac{\partial L}{\partial y_{n,o,2i+a,2j+c}}\, w_{k,o,a,c}$ — take the 2x2 block of
#   $\partial L/\partial y$ that pixel $(i, j)$ stamped, and dot it with the kernel. That is
#   a **2x2 convolution with stride 2** (a correlation, over non-overlapping windows, like
#   the pooling windows of Part 1): the backward of an upsampling is a downsampling. This is
#   why the op is called *transposed* convolution: its forward is the transpose (adjoint)
#   of a stride-2 convolution, and its input gradient is that convolution.
# * **weight**: $\displaystyle \frac{\partial L}{\partial w_{k,o,a,c}} = \sum_{n,i,j}
#   x_{n,k,i,j}\, \frac{\partial L}{\partial y_{n,o,2i+a,2j+c}}$ — a sum over all input
#   pixels (and images) of "input value times the gradient at the position it stamped with
#   tap $(a, c)$".
# * **bias**: $\displaystyle \frac{\partial L}{\partial b_o} = \sum_{n,p,q}
#   \frac{\partial L}{\partial y_{n,o,p,q}}$.
#
# In NumPy, splitting $\partial L/\partial y$ into its 2x2 blocks with a reshape turns all
# three into one `einsum` each; they match the library's backward (float64 here, so the
# comparison is exact up to rounding):

# %%
rng = np.random.default_rng(2)
N, Ci, Co, H, W = 2, 3, 5, 3, 4
x64, w64, b64 = rng.standard_normal((N, Ci, H, W)), rng.standard_normal((Ci, Co, 2, 2)), rng.standard_normal(Co)
gy64 = rng.standard_normal((N, Co, 2 * H, 2 * W))
X, Wt, B = (mu.Tensor(a, dtype="float64", requires_grad=True) for a in (x64, w64, b64))
F.conv_transpose2x2(X, Wt, B).backward(gy64)

blocks = gy64.reshape(N, Co, H, 2, W, 2)                  # blocks[n, o, i, a, j, c] = gy[n, o, 2i+a, 2j+c]
gx_formula = np.einsum("noiajc,koac->nkij", blocks, w64)  # stride-2 2x2 correlation of gy with w
gw_formula = np.einsum("nkij,noiajc->koac", x64, blocks)  # sum over images and pixels
gb_formula = gy64.sum(axis=(0, 2, 3))
for name, t, f in [("dL/dx", X, gx_formula), ("dL/dw", Wt, gw_formula), ("dL/db", B, gb_formula)]:
    print(f"{name}: max |backward - formula| = {max_err(t.grad.numpy(), f):.1e}")

# %% [markdown]
# ### A finite-difference check of the reference, in float64
#
# The formulas and the reference backward agree with each other; `minunet.gradcheck`
# checks the reference against the *definition* of the derivative, central differences
# $\frac{f(a+\varepsilon) - f(a-\varepsilon)}{2\varepsilon}$ for every input, weight and bias
# element (notebook 1 explains the method and why float64). Max-pooling too: with random
# floats no window has a tie, so the max is differentiable at the point checked.

# %%
from minunet.gradcheck import gradcheck

rng = np.random.default_rng(4)
errors = gradcheck(F.conv_transpose2x2, [rng.standard_normal((2, 3, 3, 5)),
                                         rng.standard_normal((3, 2, 2, 2)), rng.standard_normal(2)])
print("conv_transpose2x2, max |analytic - numeric|:", {k: f"{e:.1e}" for k, e in zip(["x", "w", "b"], errors.values())})
errors = gradcheck(F.max_pool2x2, [rng.standard_normal((2, 2, 5, 7))])
print("max_pool2x2 (odd 5x7), max |analytic - numeric|:", {"x": f"{errors[0]:.1e}"})

# %% [markdown]
# ## The up-convolution kernels
#
# **Forward: one thread per (image, output channel, input pixel).** Thread `t` is unravelled
# into `(n, co, i, j)` over the shape $(N, C_o, H, W)$ — the *input's* pixel grid, not the
# output's. It walks over the input channels, reads $x_{n,ci,i,j}$ once and uses it for all
# four taps of `w[ci, co]`, accumulating the 2x2 block in four registers `acc[0..3]`; at the
# end it writes its block: `yp[0]`, `yp[1]` on output row $2i$ and `yp[2W]`, `yp[2W+1]` one
# output row (of width $2W$) further down. In NumPy terms, thread `(n, co, i, j)` computes
# `y[n, co, 2i:2i+2, 2j:2j+2] = b[co] + np.einsum("k,kac->ac", x[n, :, i, j], w[:, co])`.
# Blocks of different threads never overlap, so again nothing is shared.

# %%
print(function_source("conv_transpose2x2", "conv_transpose2x2_forward", comment=False))

# %% [markdown]
# **Grad input: one thread per element of $\partial L/\partial x$**, the same gather pattern
# as the pooling backward. Thread `(n, ci, i, j)` reads the 2x2 block of `gy` at $(2i, 2j)$
# in every output channel and dots it with `w[ci, co]`: in NumPy,
# `gx[n, ci, i, j] = (gy[n, :, 2i:2i+2, 2j:2j+2] * w[ci]).sum()`. No two threads write the
# same element, so no atomic additions are needed.

# %%
print(function_source("conv_transpose2x2", "conv_transpose2x2_grad_input", comment=False))

# %% [markdown]
# **Grad weight: a reduction.** There are only $C_i \cdot C_o \cdot 4$ weights, but each is a
# sum over all $N H W$ input pixels — one thread per weight would leave a GPU almost idle
# and make each thread add up $NHW$ products alone. So the work is split the other way:
#
# * one **block** of 128 threads per (input channel `ci`, group of 8 output channels),
#   `blockIdx.x`; optionally also per *slice* of the pixels, `blockIdx.y` (below);
# * each **thread** strides through the pixels, `p = start + t, start + t + 128, ...`
#   (neighbouring threads read neighbouring pixels), reads $x$ once per pixel and adds
#   its products into $8 \times 4$ running sums in registers, `acc[d][k]`;
# * then the block's 128 partial sums of each of the 32 weights are added in **shared
#   memory** (`__shared__`: a small scratch array all threads of one block can see) by a
#   **tree**: at step `stride` = 64, 32, ..., 1 thread `t < stride` adds `s_sum[q][t + stride]`
#   to its own slot — 7 steps instead of 127 serial additions. `__syncthreads()` is a barrier:
#   no thread starts the next step before every thread has finished the current one;
# * threads 0..31 write the 32 results.

# %%
print(function_source("conv_transpose2x2", "conv_transpose2x2_grad_weight", comment=False))

# %% [markdown]
# The tree in NumPy: each step is one vectorised addition of the upper half of the live
# slots onto the lower half (what the `t < stride` threads do simultaneously):

# %%
partial = np.random.default_rng(5).standard_normal(128)   # one weight's 128 per-thread sums
s, stride, steps = partial.copy(), 64, 0
while stride > 0:
    s[:stride] += s[stride: 2 * stride]                    # threads t < stride, all at once
    stride //= 2; steps += 1
print(f"{steps} steps; tree sum {s[0]:.12f} vs np.sum {partial.sum():.12f}")


# %% [markdown]
# When $C_i \cdot \lceil C_o/8 \rceil$ blocks are too few to fill a GPU (a GPU wants
# thousands), the launcher (`kernels_backward` in `minunet/ops/conv_transpose2x2.py`, through
# the shared `KernelBackend.grad_weight`) also splits the pixels into *slices*, `blockIdx.y`;
# every slice writes its own partial weights and a second kernel, `sum_partials` in
# `kernels/reduce.cu`, adds the slices in a fixed order. Fixed order means the result is
# deterministic, unlike `atomicAdd`. The bias gradient comes from the same kernel: each thread
# also adds the 4 $g_y$ values it loads for a channel to that channel's bias sum (`bias[d]`),
# and the blocks of $c_i = 0$ write it, so $g_y$ is read once for both gradients. (Small deep
# layers are different. The deepest up-convolution of the base-8, depth-4 network on a 188
# tile, which `python -m minunet.bench --kernels` profiles, has 128 x 64 x 4 weights but only
# 4 x 4 input pixels (the paper's network: 1024 x 512 x 4 weights on 28 x 28 pixels). A block
# of 128 threads would find almost no pixels to add: there the default `reduction="auto"` runs
# `conv_transpose2x2_grad_weight_serial`, one thread per weight and per bias. `reduction="tree"`
# below keeps the tree kernel.)
#
# ### Up-convolution on `emu` vs the NumPy reference
#
# Forward and all three gradients, with odd sizes $H = 5$, $W = 7$, $N = 2$, $C_i = 3$, and
# $C_o = 5$ (fewer than a full group of 8, so the `co0 + d >= Co` guards matter). The
# kernels compute in float32 and add in a different order than the reference's matrix
# products, so they agree to rounding, not bit for bit; the last two columns compare each
# with the reference run in float64, to show that both are equally close to the exact result.
# A second `emu` run uses a `KernelBackend` whose `min_pixels_per_slice` is lowered from
# 4096 to 8, so that the 70 pixels are split into 9 slices and `sum_partials` runs too.

# %%
def upconv_on(device, x, w, b, gy):
    X, Wt, B = (mu.Tensor(a, device=device, requires_grad=True) for a in (x, w, b))
    Y = F.conv_transpose2x2(X, Wt, B)
    Y.backward(mu.Tensor(gy, device=device))
    return {"y": Y.numpy(), "dL/dx": X.grad.numpy(), "dL/dw": Wt.grad.numpy(), "dL/db": B.grad.numpy()}

rng = np.random.default_rng(6)
N, Ci, Co, H, W = 2, 3, 5, 5, 7
args32 = [rng.standard_normal(s).astype(np.float32)
          for s in [(N, Ci, H, W), (Ci, Co, 2, 2), (Co,), (N, Co, 2 * H, 2 * W)]]
X64, W64, B64 = (mu.Tensor(a, dtype="float64", requires_grad=True) for a in args32[:3])
Y64 = F.conv_transpose2x2(X64, W64, B64); Y64.backward(args32[3].astype(np.float64))
exact = {"y": Y64.numpy(), "dL/dx": X64.grad.numpy(), "dL/dw": W64.grad.numpy(), "dL/db": B64.grad.numpy()}

def upconv_reference(x, w, b, gy):
    gx, gw, gb = reference.conv_transpose2x2_backward(x, w, gy, True)
    return {"y": reference.conv_transpose2x2_forward(x, w, b), "dL/dx": gx, "dL/dw": gw, "dL/db": gb}

def compare_upconv(device):
    got, ref = upconv_on(device, *args32), upconv_reference(*args32)
    print(f"{'':6s} {'shape':>14s}  {device + ' vs ref':>12s}  {'ref vs f64':>10s}  {device + ' vs f64':>11s}")
    for k in got:
        print(f"{k:6s} {str(got[k].shape):>14s}  {max_err(got[k], ref[k]):12.1e}  "
              f"{max_err(ref[k], exact[k]):10.1e}  {max_err(got[k], exact[k]):11.1e}")

compare_upconv("emu")

class LoggedBackend(KernelBackend):                      # prints every kernel launch
    def launch(self, file, kernel, grid, block, args):
        print(f"  launch {kernel:30s} grid={grid}, block={block}")
        return super().launch(file, kernel, grid, block, args)

sliced = LoggedBackend("emu", reduction="tree")
sliced.min_pixels_per_slice = 8
print(f"backward with {N * H * W} pixels in slices of at least {sliced.min_pixels_per_slice}:")
_, gw_sliced, _ = sliced.conv_transpose2x2_backward(*args32[:2], args32[3])
print(f"dL/dw from 9 slices (emu): max err vs reference {max_err(gw_sliced, upconv_reference(*args32)['dL/dw']):.1e}")

# %% [markdown]
# ## The same kernels on a GPU
#
# On a machine where CuPy sees a GPU, device `"cuda"` compiles the very same `.cu` files
# with NVRTC and runs them on the GPU; the comparisons above are repeated there.
# Otherwise this cell says why it was skipped (the committed notebook was built without a GPU).

# %%
from minunet.devices import cuda_status

available, reason = cuda_status()
if available:
    compare_pool("cuda")
    compare_upconv("cuda")
else:
    print("cuda: skipped -", reason)

# %% [markdown]
# ## Briefly: crop-and-concatenate, the skip connection
#
# The third op of the expansive path sits right after the up-convolution: "a concatenation
# with the correspondingly cropped feature map from the contracting path. The cropping is
# necessary due to the loss of border pixels in every convolution" (Section 2). The skip map
# $(N, C_s, H_s, W_s)$ is cut to the up-convolved map's $H_u \times W_u$ around its centre,
# offset $(\lfloor (H_s - H_u)/2 \rfloor, \lfloor (W_s - W_u)/2 \rfloor)$, and its
# channels are put first. The backward puts the first $C_s$ channels of the gradient back
# into a zero array at the same offset (the cropped-away border had no effect on the output)
# and passes the rest to the up-convolution. The kernels are pure copies, one thread per
# element written; the forward:

# %%
from minunet.ops.crop_concat import crop_offsets
print(function_source("crop_concat", "crop_concat_forward", comment=False))

rng = np.random.default_rng(8)
skip, upm = rng.standard_normal((2, 2, 9, 8)).astype(np.float32), rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
gyc = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
oy, ox = crop_offsets(skip.shape, upm.shape)  # minunet/ops/crop_concat.py
outside = np.ones((9, 8), bool); outside[oy:oy + 4, ox:ox + 4] = False
out = {}
for device in ("cpu", "emu"):
    S, U = mu.Tensor(skip, device=device, requires_grad=True), mu.Tensor(upm, device=device, requires_grad=True)
    Yc = F.crop_concat(S, U); Yc.backward(mu.Tensor(gyc, device=device))
    out[device] = (Yc.numpy(), S.grad.numpy(), U.grad.numpy())
print("skip", skip.shape, "+ up", upm.shape, "->", out["cpu"][0].shape, f"| crop offset ({oy}, {ox})")
print("emu vs cpu (which runs the NumPy reference for this op: it has no Numba kernel): "
      "max errors y %.1e, dL/dskip %.1e, dL/dup %.1e" % tuple(max_err(a, b) for a, b in zip(out["emu"], out["cpu"])))
print(f"y[:, :2] is skip[:, :, {oy}:{oy + 4}, {ox}:{ox + 4}]:", np.array_equal(out["cpu"][0][:, :2], skip[:, :, oy:oy + 4, ox:ox + 4]),
      f"| dL/dskip is 0 outside it: {not out['cpu'][1][..., outside].any()}")

# %% [markdown]
# Here the heights differ by 5, an odd number: the floor makes the offset 2, so 2 rows are
# cut at the top and 3 at the bottom. In the U-Net the differences are always even (8, 32,
# 80, 176 pixels for a 572 tile: offsets 4, 16, 40, 88, notebook 4), so the crop is exactly
# centred.
#
# ## What to take away
#
# * **Max-pooling** (Fig. 1, red) keeps the largest of each 2x2 window and remembers where
#   it was (`argmax`, one byte); its backward routes each gradient to that one pixel. Ties go
#   to the first pixel in row-major order; odd sizes are floored and the dropped row/column
#   gets zero gradient — which is why the paper chooses tile sizes that are even before every
#   pooling (Section 2).
# * The **up-convolution** (Fig. 1, green) stamps a learned 2x2 kernel per input pixel; with
#   all-ones weights it is nearest-neighbour upsampling, and it is the same as zero insertion
#   followed by a 2x2 convolution. Its input gradient is a 2x2 stride-2 convolution (the
#   transpose), its weight gradient a sum over all pixels.
# * In the **kernels**, elementwise-like work gets one thread per element *written*
#   (gathers, no atomics); the weight gradient is a reduction: per-thread partial sums,
#   a tree in shared memory, slices combined in a fixed order.
# * On `emu` the kernels give exactly the reference's pooling results and agree with the
#   reference up-convolution to float32 rounding (about $10^{-6}$).

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
# **Exercise 03.1: make max-pooling's loads coalesced.**
# [`exercises/coalesced_pool.cu`](exercises/coalesced_pool.cu) is the pooling forward pass
# above without the argmax: one thread per output pixel, so the lanes of a warp read every
# other float and each load instruction touches 8 sectors of 32 bytes. Rewrite it with one
# thread per input column and a warp shuffle (`__shfl_xor_sync`) to pair neighbouring lanes,
# and watch the profiler's *sectors per request* fall from 8 to 4. (The H200 measured 8.00
# sectors per request for minunet's pooling kernel, exactly what the emulator counts:
# `bench/results/h200-2026-12-04/README.md`.)

# %%
from exercises.check import check, solution

check("coalesced_pool");

# %% [markdown]
# **Exercise 03.2: the backward pass as a gather.**
# [`exercises/scatter_gather.cu`](exercises/scatter_gather.cu) computes max-pooling's input
# gradient the "obvious" way: one thread per window *scatters* its gradient to the argmax
# pixel. It writes only a quarter of $g_x$; the rest keeps whatever the memory held (the
# check fills it with NaN first). Rewrite it as the gather that minunet's kernel uses: one
# thread per input pixel, writing $g_y$ or 0, so every element is written once, by one
# thread, with no atomics and no separate zero-fill.

# %%
check("scatter_gather");

# %% [markdown]
# Next: [04_the_unet.ipynb](04_the_unet.ipynb) puts these pieces together into the network of Fig. 1.
