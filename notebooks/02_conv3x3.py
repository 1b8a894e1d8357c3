# %% [markdown]
# # 2. The 3x3 valid convolution: from the definition to a tiled CUDA kernel
#
# The U-Net's contracting path "consists of the repeated application of two 3x3
# convolutions (unpadded convolutions), each followed by a rectified linear unit (ReLU)"
# (Section 2), and so does its expansive path: 18 of the network's 23 convolutional layers
# are 3x3 convolutions, and they do nearly all of its arithmetic. This notebook follows that
# one operation from its definition to the hand-written CUDA kernels of
# [`kernels/conv3x3.cu`](../kernels/conv3x3.cu):
#
# 1. why a *valid* (unpadded) convolution shrinks an $H \times W$ map to $(H-2) \times (W-2)$,
#    and why the paper wants exactly that;
# 2. how a CUDA kernel splits the work into threads and blocks, drawn for both kernels;
# 3. the **naive** kernel (one thread per output pixel) and the **tiled** kernel (shared
#    memory and register blocking), and how much memory traffic tiling saves;
# 4. the three gradients — input, weight, bias — and why the input gradient is itself a 3x3
#    convolution.
#
# Every kernel is **run**, here on a machine without a GPU, on the device `"emu"`: minunet's
# CUDA emulator compiles the very same `.cu` text for the CPU. Every result is compared with
# the NumPy reference, `minunet.backends.reference` (the *oracle*), which is itself checked by
# finite differences at the end. (Device `"cpu"` is not the oracle: for float32 it runs fast
# Numba kernels, a second implementation checked against the same reference.) No CUDA
# knowledge is assumed; NumPy is.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %% [markdown]
# ## Valid: $H \times W \to (H-2) \times (W-2)$
#
# With input $x$ of shape $(N, C_i, H, W)$, weights $w$ of shape $(C_o, C_i, 3, 3)$ and a bias
# $b$ of shape $(C_o,)$ (PyTorch's layouts), the valid 3x3 convolution is
#
# $$y[n, c_o, i, j] = b[c_o] + \sum_{c_i=0}^{C_i-1} \sum_{k_y=0}^{2} \sum_{k_x=0}^{2}
#   w[c_o, c_i, k_y, k_x]\; x[n, c_i, i + k_y, j + k_x].$$
#
# Output pixel $(i, j)$ reads the 3x3 window whose top-left corner is input pixel $(i, j)$.
# "Valid" means: only windows that lie entirely inside the input are computed, so
# $i + 2 \le H - 1$, i.e. $0 \le i \le H - 3$: **$H - 2$ rows and $W - 2$ columns**. (Deep
# learning libraries call this operation a convolution although, without flipping $w$, it is
# a cross-correlation; the name stuck.) Every output value is a dot product of length
# $9 C_i$ — the paper's initialisation (Section 3) uses the same count, "$N = 9 \cdot 64 =
# 576$" inputs per neuron for a 3x3 convolution over 64 channels.

# %%
x = mu.Tensor(np.arange(63.0).reshape(1, 1, 7, 9))
w = mu.Tensor(np.arange(9.0).reshape(1, 1, 3, 3) / 10)
y = F.conv3x3(x, w)
print("input", x.shape, "-> output", y.shape, "  (7-2, 9-2)")
by_hand = (w.numpy()[0, 0] * x.numpy()[0, 0, 2:5, 4:7]).sum()
print(f"y[0, 0, 2, 4] = {y.numpy()[0, 0, 2, 4]:.2f}; the window x[2:5, 4:7] times w, summed: {by_hand:.2f}")


# %%
def draw_valid(ax_in, ax_out, H=7, W=7):
    for ax, (h, wd), title in ((ax_in, (H, W), f"input {H}x{W}"), (ax_out, (H - 2, W - 2), f"output {H - 2}x{W - 2}")):
        ax.imshow(np.zeros((h, wd)), cmap="gray_r", vmin=0, vmax=4)
        ax.set_xticks(np.arange(-0.5, wd), minor=True); ax.set_yticks(np.arange(-0.5, h), minor=True)
        ax.grid(which="minor", color="0.6", lw=0.6); ax.tick_params(which="both", length=0)
        ax.set_xticks([]); ax.set_yticks([]); ax.set_title(title)
    for (i, j), colour in (((0, 0), "tab:blue"), ((2, 3), "tab:green"), ((H - 3, W - 3), "tab:red")):
        ax_in.add_patch(plt.Rectangle((j - 0.4, i - 0.4), 2.8, 2.8, fc=colour, alpha=0.25))
        ax_in.add_patch(plt.Rectangle((j - 0.4, i - 0.4), 2.8, 2.8, fill=False, ec=colour, lw=2))
        ax_out.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color=colour))

fig, (a, b) = plt.subplots(1, 2, figsize=(5, 2.4), gridspec_kw=dict(width_ratios=[7, 5]))
draw_valid(a, b)
plt.tight_layout(); plt.show()

# %% [markdown]
# Each coloured 3x3 window on the left gives the output pixel of the same colour on the
# right. The red window is the last one that fits: a 3x3 window has a "centre" one pixel in
# from each edge, so one pixel is lost on every side.
#
# ### Why the paper wants unpadded convolutions
#
# The network "only uses the valid part of each convolution, i.e., the segmentation map only
# contains the pixels, for which the full context is available in the input image. This
# strategy allows the seamless segmentation of arbitrarily large images by an overlap-tile
# strategy" (Section 1, Fig. 2). With zero padding ("same" convolution, output size = input
# size) the pixels near a tile's border would be computed from invented zeros, so the result
# would depend on where the tile was cut. The price of valid convolutions: "the output image
# is smaller than the input by a constant border width" (Section 3), and the skip connections
# must be cropped, "necessary due to the loss of border pixels in every convolution"
# (Section 2; notebook 4 follows the sizes through the whole network).
#
# The check below cuts a 21-row image into two tiles that overlap by 2 rows — exactly the
# context one 3x3 convolution needs — and convolves each tile on its own. With valid
# convolutions the stitched tiles equal the convolution of the whole image exactly; with
# zero padding the rows at the cut are wrong.

# %%
rng = np.random.default_rng(0)
image = rng.standard_normal((1, 2, 21, 16))
wt = mu.Tensor(rng.standard_normal((3, 2, 3, 3)))

def valid(a):
    return F.conv3x3(mu.Tensor(a), wt).numpy()

def same(a):                                          # zero padding: output size = input size
    return valid(np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1))))

whole_valid, whole_same = valid(image), same(image)   # (1, 3, 19, 14) and (1, 3, 21, 16)
# valid: tile rows 0..11 -> outputs 0..9; tile rows 10..20 -> outputs 10..18 (2 rows overlap)
stitched_valid = np.concatenate([valid(image[:, :, :12]), valid(image[:, :, 10:])], axis=2)
# same: tiles without overlap, each padded with zeros
stitched_same = np.concatenate([same(image[:, :, :11]), same(image[:, :, 11:])], axis=2)
print("valid conv, 2 tiles vs whole image: max |difference| =", np.abs(stitched_valid - whole_valid).max())
diff = np.abs(stitched_same - whole_same).max(axis=(0, 1, 3))
print("same  conv, 2 tiles vs whole image: max |difference| =", diff.max().round(3),
      " in output rows", np.flatnonzero(diff > 1e-6))

# %% [markdown]
# ## CUDA in five paragraphs
#
# A GPU runs one function, the **kernel**, in many **threads** at once. Threads are grouped
# into **blocks** of up to 1024 threads, and the blocks form the **grid**. Both are up to
# three-dimensional. When the host *launches* a kernel it chooses the grid and block sizes;
# inside the kernel every thread reads four built-in variables to find out who it is:
# `threadIdx` (its position inside its block), `blockIdx` (its block's position in the
# grid), `blockDim` (the block size) and `gridDim` (the grid size), each with `.x`, `.y`,
# `.z`. Nothing else distinguishes the threads: each turns these numbers into "which
# output element(s) am I responsible for?".
#
# The hardware runs a block on one streaming multiprocessor, 32 threads (a **warp**) in lock
# step. Blocks are independent: they may run in any order, and threads of *different*
# blocks cannot wait for each other.
#
# **Global memory** (the GPU's DRAM, where `x`, `w` and `y` live) is large but slow: a load
# costs hundreds of clock cycles. When the 32 threads of a warp load 32 neighbouring floats,
# the hardware combines them into a few wide transactions (**coalescing**). Whether DRAM
# bandwidth or arithmetic limits a kernel is a matter of arithmetic (the next section):
# U-Net's convolutions do so much work per byte they *must* move that a GPU could run them at
# its arithmetic peak. What makes a convolution kernel slow is the traffic it adds on top of
# that minimum, reading the same inputs and weights again and again, which is what the tiled
# kernel below avoids.
#
# **Shared memory** is a small (48 KiB per block here), fast on-chip memory that all threads
# of one block see; the kernel declares it with `__shared__`. Threads use it to share data
# they loaded from global memory once. Because thread A may read what thread B wrote, they
# need a **barrier**: `__syncthreads()` makes every thread of the block wait until all of them
# have reached it, so everything written before it is visible to everybody after it.
#
# **Registers** are the fastest storage of all, private to one thread. A thread that keeps
# several results in registers and reuses every value it loads for all of them is doing
# **register blocking**. In this project the Python side does the bookkeeping: the op's
# launcher (`kernels_forward` and `kernels_backward` in `minunet/ops/conv3x3.py`) checks shapes
# and chooses grid and block sizes, and the shared machinery of `minunet/backends/kernels.py`
# compiles, allocates the outputs and launches; the kernels do all the arithmetic.

# %% [markdown]
# ### Bandwidth or arithmetic? The napkin math for one U-Net layer
#
# The paper's second layer maps 64 channels of $570 \times 570$ to 64 channels of
# $568 \times 568$. Its **FLOPs**: 2 (a multiply and an add) per weight tap per output value.
# Its **minimum bytes**: every input, output and weight value read or written once. Their
# ratio, the *arithmetic intensity*, is compared with the GPU's peak FLOP/s divided by its DRAM
# bandwidth (the *ridge point*), from the published figures of the H100 SXM (which the
# emulator's model uses) and of the H200 (the GPU this project was measured on: the H100's
# arithmetic with more bandwidth).

# %%
def conv_napkin(ci, co, h_in):
    """FLOPs and the minimum bytes (float32 x, y, w, b each moved once) of one valid 3x3 layer."""
    flops = 2 * 9 * ci * co * (h_in - 2) ** 2
    return flops, 4 * (ci * h_in ** 2 + co * (h_in - 2) ** 2 + co * ci * 9 + co)

for ci_, co_, h_ in ((64, 64, 570), (256, 256, 138), (1, 64, 572)):
    flops, min_bytes = conv_napkin(ci_, co_, h_)
    print(f"{ci_:3d} -> {co_:3d} channels at {h_ - 2}^2: {flops / 1e9:5.2f} GFLOP, at least "
          f"{min_bytes / 1e6:5.1f} MB moved: {flops / min_bytes:3.0f} FLOP per byte")
flops, min_bytes = conv_napkin(64, 64, 570)
for gpu, peak, bandwidth in (("H100 SXM", 67e12, 3.35e12), ("H200", 67e12, 4.8e12)):
    print(f"{gpu:8s}: {peak / 1e12:.0f} TFLOP/s FP32 / {bandwidth / 1e12:.2f} TB/s = ridge at "
          f"{peak / bandwidth:2.0f} FLOP per byte; the 64 -> 64 layer: DRAM {min_bytes / bandwidth * 1e3:.3f} ms, "
          f"arithmetic {flops / peak * 1e3:.2f} ms")
print(f"a kernel that loads x and w for every multiply-add asks for 8 bytes per 2 FLOP: "
      f"{2 / 8:.2f} FLOP per byte requested")

# %% [markdown]
# At ~140 FLOP per byte the layer is **compute-bound** by a factor of ten or more: at full
# arithmetic speed the FLOPs take ten times longer than the minimum traffic. (The H200
# measured this layer's forward pass, with the tiled kernel below, at 1.35 ms, 17.6 TFLOP/s,
# a quarter of the FP32 peak: `bench/results/h200-2026-12-04/bench_ops.txt`.) The deep layers
# have even more work per byte (more channels, each pixel used by more filters). Only the
# first layer (1 input channel: ~4 FLOP per byte) and the element-wise kernels (ReLU,
# pooling: a FLOP or less per 8 bytes) are bandwidth-bound. But a kernel that *asks* for 8 bytes per multiply-add, as
# the naive one below does, lives or dies by the caches catching those requests.

# %% [markdown]
# ## v1: the naive kernel — one thread per output element
#
# The kernels are read straight from `kernels/conv3x3.cu`:
# `minunet.backends.sources.function_source` cuts one function out of the file by its name
# (with the comment above it), so what you read is exactly the code that runs.

# %%
from minunet.backends.sources import function_source, kernel_source

SRC = kernel_source("conv3x3")        # the text of kernels/conv3x3.cu
print(function_source("conv3x3", "conv3x3_forward_naive"))

# %% [markdown]
# Read it as the NumPy-free version of the formula above:
#
# * `t = blockIdx.x * blockDim.x + threadIdx.x` is the thread's global number, a flat index
#   into `y` (C order). The launcher starts $\lceil N C_o H_o W_o / 256 \rceil$ blocks of 256
#   threads, so the last block has threads with nothing to do: `if (t >= ...) return;`.
# * `t` is decomposed into $(n, c_o, i, j)$ innermost axis first, exactly like
#   `np.unravel_index(t, y.shape)`.
# * Then the triple sum, with pointer arithmetic in place of indexing: `xp` points at the
#   window's top-left pixel $x[n, c_i, i, j]$, and `xp[ky * W + kx]` is $x[n, c_i, i+k_y, j+k_x]$.
#
# Every multiply-add loads one `x` and one `w` value from global memory: **2 global loads per
# multiply-add**. Neighbouring threads have neighbouring $j$, so a warp's loads of `x` are
# coalesced and its loads of `w` are mostly the same address (a broadcast); the caches absorb
# much of the rest, but the kernel relies on them entirely.
#
# ### Which thread computes which output
#
# Here is the mapping for the shape used throughout this notebook: $N = 2$ images, $C_o = 5$
# output channels of $15 \times 17$ pixels (input $17 \times 19$). The picture is computed with
# the kernel's own index arithmetic; each of the ten panels is one $(n, c_o)$ plane, coloured
# by the block that computes it, with a black dot where a block starts (`threadIdx.x == 0`).

# %%
from minunet.backends.kernels import THREADS, KernelBackend, ceil_div

N, Ci, Co, H, W = 2, 3, 5, 17, 19
Ho, Wo = H - 2, W - 2
total = N * Co * Ho * Wo
blockDim_x, gridDim_x = THREADS, ceil_div(total, THREADS)     # what the launcher chooses
t = np.arange(total)                                          # one thread per output...
blockIdx_x, threadIdx_x = t // blockDim_x, t % blockDim_x     # ...and who it is
j, i = t % Wo, (t // Wo) % Ho                                 # the kernel's decomposition
co, n = (t // (Wo * Ho)) % Co, t // (Wo * Ho * Co)
print(f"{total} outputs: gridDim.x = {gridDim_x} blocks x blockDim.x = {blockDim_x} threads = "
      f"{gridDim_x * blockDim_x} threads, the last {gridDim_x * blockDim_x - total} return at once")
for tt in (0, 255, 256, 805, total - 1):
    print(f"  blockIdx.x = {blockIdx_x[tt]}, threadIdx.x = {threadIdx_x[tt]:3d} -> t = {tt:4d} -> "
          f"y[n={n[tt]}, co={co[tt]}, i={i[tt]:2d}, j={j[tt]:2d}]")

# %%
block_of = blockIdx_x.reshape(N, Co, Ho, Wo)
colours = plt.get_cmap("tab10")(block_of % 10)[..., :3]          # hue = blockIdx.x
shade = (threadIdx_x / (blockDim_x - 1)).reshape(N, Co, Ho, Wo)[..., None]
colours = colours * (0.45 + 0.55 * shade)                        # darker = smaller threadIdx.x
fig, axes = plt.subplots(N, Co, figsize=(7, 3.1))
for (nn, cc), ax in np.ndenumerate(np.array(axes, dtype=object)):
    ax.imshow(colours[nn, cc])
    yy, xx = np.nonzero((threadIdx_x == 0).reshape(N, Co, Ho, Wo)[nn, cc])
    ax.scatter(xx, yy, c="w", edgecolors="k", s=14, zorder=3)     # a block starts here
    for blk in np.unique(block_of[nn, cc]):
        where = np.argwhere(block_of[nn, cc] == blk)
        if len(where) > 40:                                       # label the big pieces only
            ax.text(*where.mean(axis=0)[::-1], f"block {blk}", ha="center", va="center", fontsize=8, color="w")
    ax.set_title(f"y[{nn}, {cc}]", fontsize=8, pad=4); ax.axis("off")
fig.suptitle("naive kernel: colour = blockIdx.x, dark to light = threadIdx.x 0..255, dot = threadIdx.x 0", fontsize=8)
plt.tight_layout(h_pad=1.0); plt.show()

# %% [markdown]
# A block is simply the next 256 outputs in memory order: about one plane of 255 pixels here,
# with the boundaries running through the middle of a row and across channels and images.
# That is fine for this kernel because no thread ever needs another thread's data.
#
# ### Running it on `"emu"`
#
# `KernelBackend("emu", conv3x3="naive")` is the `"emu"` device's backend with the naive
# kernel selected (the default, also for `mu.Tensor(..., device="emu")`, is `"auto"`: the tiled
# kernel where the output fills at least one 16 x 32 tile, the naive one on smaller planes).
# `reduction="tree"` keeps the block-per-weight-group gradient kernels described below (the
# default, `"auto"`, runs one thread per weight in U-Net's deep layers, where weights far
# outnumber pixels; here it would pick the same tree kernels).
# Its `conv3x3_forward` (the launcher `kernels_forward` of `minunet/ops/conv3x3.py`, attached to
# the backend as a method) computes the launch configuration just shown, and the emulator runs
# every thread of every block on the CPU — checking each load and store against the bounds of
# its array. The NumPy reference (`minunet.backends.reference.conv3x3_forward`, i.e.
# `reference_forward` in `minunet/ops/conv3x3.py`) is the oracle. We report
# the **max abs error** $\max|y_{emu} - y_{cpu}|$ and the **relative error**
# $\max|y_{emu} - y_{cpu}| / \max|y_{cpu}|$; float32 sums of $9 C_i$ products in a different
# order agree to about $10^{-7}$ relative.

# %%
from minunet.backends import reference

rng = np.random.default_rng(2)
xs = rng.standard_normal((N, Ci, H, W)).astype(np.float32)      # (2, 3, 17, 19)
ws = (rng.standard_normal((Co, Ci, 3, 3)) / np.sqrt(9 * Ci)).astype(np.float32)
bs = rng.standard_normal(Co).astype(np.float32)

results = []                                                    # (what, max abs, relative)
def compare(what, got, ref, tol=1e-5):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    rel = err / float(np.abs(ref).max())
    results.append((what, err, rel))
    print(f"{what:52s} max abs error {err:.2e}   relative {rel:.2e}   {'OK' if rel < tol else 'MISMATCH'}")

naive = KernelBackend("emu", conv3x3="naive", reduction="tree")
y_ref = reference.conv3x3_forward(xs, ws, bs)
y_naive = naive.conv3x3_forward(xs, ws, bs)
print(naive, "->", y_naive.shape, type(y_naive).__name__, y_naive.dtype)
compare("forward, naive (emu) vs reference", y_naive, y_ref)

# %% [markdown]
# ## v2: the tiled kernel — shared memory and register blocking
#
# Each input value $x[n, c_i, p, q]$ is used by up to 9 output pixels (the windows that
# cover it) in each of the $C_o$ output channels; each weight by all $H_o W_o$ pixels of
# every image. The naive kernel fetches them again for every use. The tiled kernel lets a
# **block** of threads fetch a piece of the input once, into shared memory, and do all the
# work that piece allows before fetching the next one:
#
# * A block has $32 \times 8$ threads (`blockDim = (32, 8, 1)`) and computes an output
#   **tile of $16 \times 32$ pixels for 8 output channels** of one image. The grid is
#   `(output tiles per image, ceil(Co / 8), N)`: `blockIdx.x` picks the tile, `blockIdx.y`
#   the group of 8 output channels, `blockIdx.z` the image.
# * Thread (`threadIdx.x`, `threadIdx.y`) = $(t_x, t_y)$ owns output column $t_x$ of the tile,
#   **rows $2t_y$ and $2t_y + 1$, in all 8 channels**: 16 sums, kept in registers
#   (`acc[8][2]`).
# * The input channels are processed 8 at a time (a *chunk*). For each chunk, all 256 threads
#   together copy the input tile — the $16 \times 32$ output tile plus the 2-pixel halo a 3x3
#   window needs: $18 \times 34$ pixels, 8 channels — and the $8 \times 8 \times 9$ matching
#   weights into shared memory; then `__syncthreads()`; then every thread computes from shared
#   memory; then `__syncthreads()` again, so nobody overwrites the tile while others still
#   read it.
# * In the compute step a thread copies the $4 \times 3$ input values its two output rows
#   need (rows $2t_y \ldots 2t_y+3$, columns $t_x \ldots t_x+2$) into registers and uses each
#   one for up to 8 channels $\times$ 2 rows — register blocking.
#
# The sizes are `#define`s at the top of the tiled code. `minunet.backends.sources.cu_defines`
# evaluates them from the file, and the launcher in `minunet/ops/conv3x3.py` takes its block
# (`TILED_BLOCK`) and grid (`tiled_grid`) from those numbers, so kernel and launch cannot
# disagree; we use the same numbers for the pictures and the napkin math below, then print the
# kernel itself. The same template serves the forward pass (`GRAD_INPUT = false`) and the input
# gradient (`true`, see below).

# %%
from minunet.backends.sources import cu_defines
from minunet.ops.conv3x3 import CO_PER_BLOCK, TILE_H, TILE_W, TILED_BLOCK, tiled_grid

defines = cu_defines("conv3x3")                  # {name: value} of every #define, in file order
for line in SRC.splitlines():
    if line.startswith("#define") and line.split()[1] in defines:   # (a header guard has no value)
        print(f"{line.split('//')[0].strip():48s} = {defines[line.split()[1]]}")
BLOCK_ROWS, ROWS_PER_THREAD, CI_CHUNK, IN_TILE_H, IN_TILE_W = (
    defines[k] for k in ("BLOCK_ROWS", "ROWS_PER_THREAD", "CI_CHUNK", "IN_TILE_H", "IN_TILE_W"))
print(f"launcher (minunet/ops/conv3x3.py): block = TILED_BLOCK = {TILED_BLOCK}, grid = "
      f"tiled_grid(N, Co, Ho, Wo) = {tiled_grid(N, Co, Ho, Wo)} for this notebook's shape")


# %%
print(function_source("conv3x3", "conv3x3_tiled", comment=False))
print()
print(function_source("conv3x3", "conv3x3_forward_tiled", comment=False))

# %% [markdown]
# Things to notice in the source:
#
# * **Loading cooperatively, by rows.** The input tile of a chunk has up to
#   $8 \cdot 18 = 144$ rows of 34 pixels but the block only 8 warps, so warp $t_y$ loads rows
#   $t_y, t_y + 8, t_y + 16, \ldots$ (a *block-strided loop* over rows): lane $t_x$ loads
#   column $t_x$ of the row, and lanes 0 and 1 also load the two halo columns 32 and 33.
#   Neighbouring lanes read neighbouring pixels (coalesced), and no thread divides an element
#   index by the row length. Only the chunk's **real** channels are loaded: U-Net's first layer
#   has 1 input channel, not 8, so it loads 18 rows, not 144, and the compute loop stops at
#   the chunk's channel count. Pixels outside the image are stored as 0, and so are the weights
#   of channels beyond $C_i$ or $C_o$, so the compute loop needs no bounds checks.
# * **The barriers.** The first `__syncthreads()` guarantees the tile is complete before
#   anyone reads it; the second that nobody starts loading the next chunk into the same
#   shared arrays while a slower thread still computes with the current one.
# * **The compute loop** does $2 \times 8 \times 9 = 144$ multiply-adds per input channel and
#   thread, all from registers and shared memory.
# * **The store** checks that the pixel and channel exist (a tile may hang over the edge of
#   the image), and adds the bias.
#
# ### Which thread computes which output
#
# The picture: on the left, 20 output channels split into groups of 8 (`blockIdx.y`; the last
# group is partly empty); in the middle, one output channel plane of $40 \times 70$ pixels cut
# into 3 x 3 tiles (`blockIdx.x`; the last row and column of tiles hang over the edge of the
# image); on the right, the inside of one block: colour = `threadIdx.y`; thread
# $(t_x, t_y) = (5, 3)$ owns the two black pixels (in each of the block's 8 channels), reads the red $4 \times 3$
# window of inputs, and the dashed rectangle is the $18 \times 34$ input tile in shared memory.

# %%
Ho_big, Wo_big, Co_big = 40, 70, 20
tiles_y, tiles_x = ceil_div(Ho_big, TILE_H), ceil_div(Wo_big, TILE_W)
ii, jj = np.mgrid[:Ho_big, :Wo_big]
block_x = (ii // TILE_H) * tiles_x + jj // TILE_W               # blockIdx.x, as in the kernel
fig, (c, a, b) = plt.subplots(1, 3, figsize=(7, 2.3), gridspec_kw=dict(width_ratios=[7, 55, 55]))
# channels: blockIdx.y picks a group of CO_PER_BLOCK output channels
c.imshow((np.arange(Co_big) // CO_PER_BLOCK)[:, None], cmap="Set2", vmin=-0.5, vmax=7.5, aspect="auto")
for g in range(ceil_div(Co_big, CO_PER_BLOCK)):
    c.text(0, min(g * CO_PER_BLOCK + CO_PER_BLOCK / 2, (g * CO_PER_BLOCK + Co_big) / 2) - 0.5, f"y={g}",
           ha="center", va="center", fontsize=8)
c.set_yticks([0, Co_big - 1]); c.set_xticks([]); c.tick_params(labelsize=8)
c.set_title(f"{Co_big} channels:\nblockIdx.y", fontsize=8)
# one channel plane: blockIdx.x picks a TILE_H x TILE_W output tile
a.imshow(block_x, cmap="tab10", vmin=-0.5, vmax=9.5)
for k in range(tiles_y * tiles_x):
    r, col = divmod(k, tiles_x)
    a.add_patch(plt.Rectangle((col * TILE_W - 0.5, r * TILE_H - 0.5), TILE_W, TILE_H, fill=False, ec="k", lw=1))
    a.text(min(col * TILE_W + TILE_W / 2, (col * TILE_W + Wo_big) / 2) - 0.5,
           min(r * TILE_H + TILE_H / 2, (r * TILE_H + Ho_big) / 2) - 0.5, str(k),
           ha="center", va="center", color="w", weight="bold", fontsize=8)
a.set_xlim(-0.5, tiles_x * TILE_W - 0.5); a.set_ylim(tiles_y * TILE_H - 0.5, -0.5)
a.set_xticks([]); a.set_yticks([])
a.set_title(f"{Ho_big}x{Wo_big} output plane: blockIdx.x", fontsize=8)
# inside one block: thread (tx, ty) owns rows 2ty, 2ty+1 of column tx
b.imshow(np.repeat(np.arange(BLOCK_ROWS), ROWS_PER_THREAD)[:, None] * np.ones(TILE_W), cmap="Pastel2",
         vmin=-0.5, vmax=7.5)
tx, ty = 5, 3
b.add_patch(plt.Rectangle((tx - 0.5, ROWS_PER_THREAD * ty - 0.5), 1, ROWS_PER_THREAD, color="k"))
b.add_patch(plt.Rectangle((tx - 0.5, ROWS_PER_THREAD * ty - 0.5), 3, ROWS_PER_THREAD + 2, fill=False, ec="red", lw=1.5))
b.add_patch(plt.Rectangle((-0.5, -0.5), IN_TILE_W, IN_TILE_H, fill=False, ec="k", ls="--", lw=1, clip_on=False))
b.set_xlim(-1, IN_TILE_W); b.set_ylim(IN_TILE_H, -1)
b.set_yticks(np.arange(BLOCK_ROWS) * ROWS_PER_THREAD + 0.5, [f"ty={r}" for r in range(BLOCK_ROWS)], fontsize=8)
b.set_xticks([0, TILE_W - 1], ["tx=0", f"tx={TILE_W - 1}"], fontsize=8); b.tick_params(length=0)
b.set_title(f"one block: {TILE_H}x{TILE_W} tile, colour = threadIdx.y", fontsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# ### Napkin math: global loads per multiply-add
#
# All numbers below are computed from the `#define`s just read.
#
# * **Naive:** every multiply-add loads one input and one weight: 2 loads.
# * **Tiled**, per block and chunk of `CI_CHUNK` input channels: it loads the input tile
#   (`CI_CHUNK` $\times$ `IN_TILE_H` $\times$ `IN_TILE_W`) and the weights
#   (`CO_PER_BLOCK` $\times$ `CI_CHUNK` $\times 9$) once, and performs
#   `TILE_H` $\times$ `TILE_W` $\times$ `CO_PER_BLOCK` $\times$ `CI_CHUNK` $\times 9$
#   multiply-adds with them.
# * **Inside the block**, per input channel, a thread reads $(2 + 2) \times 3$ inputs and
#   $8 \times 9$ weights from shared memory for $2 \times 8 \times 9$ multiply-adds.

# %%
macs_per_chunk = TILE_H * TILE_W * CO_PER_BLOCK * CI_CHUNK * 9
in_loads, w_loads = CI_CHUNK * IN_TILE_H * IN_TILE_W, CO_PER_BLOCK * CI_CHUNK * 9
tiled_ratio = (in_loads + w_loads) / macs_per_chunk
print(f"naive: 2 global loads per multiply-add")
print(f"tiled: ({in_loads} input + {w_loads} weight loads) / {macs_per_chunk:,} multiply-adds "
      f"= {tiled_ratio:.4f} global loads per multiply-add: {2 / tiled_ratio:.0f}x fewer")
print(f"       the halo costs {IN_TILE_H * IN_TILE_W / (TILE_H * TILE_W) - 1:.0%} extra input loads; "
      f"each loaded input serves up to 9 taps x {CO_PER_BLOCK} channels = {9 * CO_PER_BLOCK} multiply-adds")
sh_reads = (ROWS_PER_THREAD + 2) * 3 + CO_PER_BLOCK * 9
thread_macs = ROWS_PER_THREAD * CO_PER_BLOCK * 9
print(f"per thread and input channel: {sh_reads} shared-memory reads for {thread_macs} multiply-adds "
      f"({sh_reads / thread_macs:.2f} per multiply-add); weight reads are one address per warp (a broadcast)")
print(f"shared memory per block: {4 * (in_loads + w_loads):,} bytes of the 48 KiB")

def utilisation(h_out, w_out, co):      # useful / computed outputs: partial tiles and channel groups waste work
    tiles, groups, _ = tiled_grid(1, co, h_out, w_out)
    return h_out * w_out * co / (tiles * TILE_H * TILE_W * groups * CO_PER_BLOCK), tiles, groups
for what, (h_out, w_out, co) in {"this notebook's test shape": (Ho, Wo, Co),
                                 "U-Net's 2nd layer (570 -> 568, 64 -> 64 channels)": (568, 568, 64)}.items():
    u, tiles, groups = utilisation(h_out, w_out, co)
    print(f"{what:48s}: {tiles:4d} tiles x {groups} channel groups per image, "
          f"{u:.0%} of the computed outputs are real")

# %% [markdown]
# Tiling cuts global memory traffic by two orders of magnitude in exchange for cheap
# shared-memory reads, and it pays off when the image is large compared with a tile — as in
# the U-Net, whose 572 x 572 input tiles the paper chose because "we favor large input tiles
# over a large batch size" (Section 3). On the tiny test images of this notebook most of
# each tile lies outside the image. (How fast either kernel really is can only be measured on
# a GPU: `MINUNET_CONV3X3=naive python -m minunet.bench --device cuda` against
# `MINUNET_CONV3X3=tiled`. Notebook 9 shows what an H200 measured, next to what the emulator
# counts and predicts.)
#
# ### Running the tiled kernel on `"emu"`
#
# Two shapes: the small one from above (one tile, one chunk, one channel group), and one that
# crosses every boundary of the tiled kernel — output $19 \times 35$ (2 x 2 tiles, both
# partial), $C_i = 11$ (two chunks, the second with 3 channels), $C_o = 9$ (two channel groups,
# the second with one channel).

# %%
tiled = KernelBackend("emu", conv3x3="tiled", reduction="tree")
compare("forward, tiled (emu) vs reference", tiled.conv3x3_forward(xs, ws, bs), y_ref)
compare("forward, tiled vs naive (both emu)", tiled.conv3x3_forward(xs, ws, bs), y_naive)

xb = rng.standard_normal((1, 11, 21, 37)).astype(np.float32)
wb = (rng.standard_normal((9, 11, 3, 3)) / np.sqrt(99)).astype(np.float32)
bb = rng.standard_normal(9).astype(np.float32)
print("boundary-crossing shape: x", xb.shape, "w", wb.shape, "-> y", (1, 9, 19, 35),
      "| tiled grid", tiled_grid(1, 9, 19, 35), "blocks of", TILED_BLOCK)
yb_ref = reference.conv3x3_forward(xb, wb, bb)
compare("forward, naive (emu), 2 tiles x 2 chunks x 2 groups", naive.conv3x3_forward(xb, wb, bb), yb_ref)
compare("forward, tiled (emu), 2 tiles x 2 chunks x 2 groups", tiled.conv3x3_forward(xb, wb, bb), yb_ref)

# %% [markdown]
# ### What if a barrier is missing?
#
# On a GPU a missing `__syncthreads()` often goes unnoticed: the threads of a block happen to
# run in a friendly order, and a thread that reads the shared tile too early reads whatever the
# previous block left there — often a plausible number, and a wrong answer nobody notices. The
# emulator makes the bug show, in one of two ways:
#
# * it runs the threads of a block one at a time between barriers, in a **shuffled** order,
#   and fills shared memory with NaN before every block, so a thread that reads the tile
#   before the others have stored their parts of it reads NaN, and the NaN spreads through
#   its sums: the launch "succeeds" with NaN and wrong outputs;
# * or it notices the race itself — a thread reading shared memory that another thread wrote,
#   or has not written yet, with no barrier in between — and fails the launch with an
#   `EmulatorError` (`minunet.emulator.errors`) naming the kernel, thread and block.
#
# Which of the two happens depends on how much the emulator checks; the cell below prints
# whichever it is. Below, the first barrier is deleted from the source text, the result is
# compiled with `minunet.emulator.EmuModule` (what `KernelBackend("emu")` uses internally) and
# launched with the tiled kernel's own grid and block — the call has the shape of CuPy's:
# `function(grid, block, args)`.

# %%
from minunet.emulator import EmuModule

broken_src = SRC.replace("__syncthreads();  // 2.", "/* barrier deleted */  // 2.", 1)
assert broken_src != SRC
from minunet.emulator.errors import EmulatorError

broken = EmuModule(broken_src, name="conv3x3_no_first_barrier.cu").get_function("conv3x3_forward_tiled")
y_broken = np.zeros((N, Co, Ho, Wo), np.float32)
try:
    broken(tiled_grid(N, Co, Ho, Wo), TILED_BLOCK, (xs, ws, bs, y_broken, *(np.int32(v) for v in (N, Ci, H, W, Co))))
except EmulatorError as error:
    print(f"without the first __syncthreads(): the emulator refuses the launch\n{type(error).__name__}: {error}")
else:
    good = np.isclose(y_broken, y_ref, rtol=1e-4, atol=1e-4)
    print(f"without the first __syncthreads(): {good.sum()} of {good.size} outputs correct, "
          f"{np.isnan(y_broken).sum()} NaN (read from shared memory before any thread wrote it)")

# %% [markdown]
# ## The three gradients
#
# Given $g_y = \partial L / \partial y$ (same shape as $y$), the chain rule through the
# definition of $y$ gives, term by term:
#
# * **bias** — $b[c_o]$ is added to every pixel of channel $c_o$ in every image:
#   $$g_b[c_o] = \sum_{n, i, j} g_y[n, c_o, i, j].$$
# * **weight** — $w[c_o, c_i, k_y, k_x]$ multiplies $x[n, c_i, i+k_y, j+k_x]$ for every output
#   pixel: a correlation of the input with the output gradient, $N H_o W_o$ terms per weight:
#   $$g_w[c_o, c_i, k_y, k_x] = \sum_{n, i, j} g_y[n, c_o, i, j]\; x[n, c_i, i + k_y, j + k_x].$$
# * **input** — $x[n, c_i, p, q]$ is read by the output pixels $(p - k_y, q - k_x)$ of every
#   channel, for the taps where that pixel exists:
#   $$g_x[n, c_i, p, q] = \sum_{c_o, k_y, k_x} g_y[n, c_o, p - k_y, q - k_x]\; w[c_o, c_i, k_y, k_x]$$
#   with $g_y$ taken as 0 outside its $H_o \times W_o$ range. Substituting $k_y' = 2 - k_y$,
#   $k_x' = 2 - k_x$ and padding $g_y$ with 2 zeros on every side ($\tilde g_y$,
#   $(H+2) \times (W+2)$ pixels) turns this into
#   $$g_x[n, c_i, p, q] = \sum_{c_o, k_y', k_x'} \tilde g_y[n, c_o, p + k_y', q + k_x']\;
#     w[c_o, c_i, 2 - k_y', 2 - k_x'],$$
#   **a valid 3x3 convolution of the padded $g_y$** (a *full* correlation: every position
#   where the window overlaps $g_y$ at all), with the weights' channel axes **swapped**
#   ($C_o$ is now the input side) and both spatial axes **flipped**. Its output has
#   $(H + 2) - 2 = H$ rows: exactly the input's size.
#
# The last identity, checked with the reference on the test shape:

# %%
gy = rng.standard_normal((N, Co, Ho, Wo)).astype(np.float32)
gx_ref, gw_ref, gb_ref = reference.conv3x3_backward(xs, ws, gy, with_bias=True)
w_swapped_flipped = np.ascontiguousarray(ws.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])   # (Ci, Co, 3, 3)
gy_padded = np.pad(gy, ((0, 0), (0, 0), (2, 2), (2, 2)))                              # (N, Co, H+2, W+2)
gx_as_conv = reference.conv3x3_forward(gy_padded, w_swapped_flipped)
print("gy", gy.shape, "padded", gy_padded.shape, "conv with w", w_swapped_flipped.shape, "->", gx_as_conv.shape)
print("max |gx(reference backward) - valid conv of padded gy| =", np.abs(gx_ref - gx_as_conv).max())
print("gb == gy summed over n, i, j:", np.allclose(gb_ref, gy.sum(axis=(0, 2, 3)), atol=1e-5))

# %% [markdown]
# ### The gradient kernels
#
# * **Input gradient, naive** (`conv3x3_grad_input_naive`): one thread per input pixel
#   $(n, c_i, p, q)$, a *gather* of the formula above — each thread sums its own terms and
#   writes only its own element, so no two threads write the same address (no atomics).
# * **Input gradient, tiled** (`conv3x3_grad_input_tiled`): the *same* template
#   `conv3x3_tiled<true>` as the forward pass, with source $g_y$ instead of $x$, a 2-pixel
#   offset (`PAD = 2`: reads outside $g_y$ give 0 — the padding, never materialised) and the
#   weight read as `w[(s * C_dst + dd) * 9 + (8 - k)]`, i.e. $w[c_o{=}s, c_i{=}d, 2 - k_y, 2 - k_x]$:
#   swapped and flipped.
# * **Weight gradient** (`conv3x3_grad_weight`): a sum over all $N H_o W_o$ pixels for each
#   weight. One block per (output channel, group of 4 input channels); each of its 128
#   threads adds up a strided subset of the pixels into $4 \times 9$ register sums, then the
#   block adds the 128 partial sums with a **tree reduction** in shared memory: in step
#   $s = 64, 32, \ldots, 1$ thread $t < s$ adds the value of thread $t + s$, with a barrier
#   after each step — 7 steps instead of 127 serial additions. (For large images the pixels
#   are also split over several blocks, whose partial results `reduce.cu` adds in a fixed
#   order, so the result is deterministic.) In the deep layers, where weights outnumber pixels
#   (the bottom of the base-8, depth-4 network on a 188 tile that
#   `python -m minunet.bench --kernels` profiles: 128 x 128 x 9 weights, 4 x 4 output pixels;
#   the paper's network has 1024 x 1024 x 9 weights on 28 x 28 pixels there), the default `reduction="auto"` runs
#   `conv3x3_grad_weight_serial` instead: one thread per weight, a loop over the pixels.
# * **Bias gradient**: $g_b[c_o]$ is the sum of the same $g_y$ values the weight gradient
#   reads, so both weight-gradient kernels compute it on the way (a *fused* kernel): each
#   thread also adds up its $g$'s, and the tree adds those partial sums with the weights'
#   (one more row of `s_sum`; the blocks of the first channel group write it). One pass over
#   $g_y$ and one launch instead of two.

# %%
print(function_source("conv3x3", "conv3x3_grad_input_naive"))
print()
print(function_source("conv3x3", "conv3x3_grad_weight", comment=False))

# %% [markdown]
# ### Running the backward kernels on `"emu"`
#
# `conv3x3_backward(x, w, gy, with_bias)` returns $(g_x, g_w, g_b)$; both versions share the
# weight- and bias-gradient kernels and differ in the input gradient. For the larger shape
# we also lower the backend's `min_pixels_per_slice` so that the weight gradient is split
# over several blocks per weight (the path large U-Net layers take).

# %%
for backend in (naive, tiled):
    for name, got, ref in zip(("gx", "gw", "gb"), backend.conv3x3_backward(xs, ws, gy, True),
                              (gx_ref, gw_ref, gb_ref)):
        compare(f"backward {name}, {backend.conv3x3_version} (emu) vs reference", got, ref)

gyb = rng.standard_normal((1, 9, 19, 35)).astype(np.float32)
refs = reference.conv3x3_backward(xb, wb, gyb, True)
tiled_split = KernelBackend("emu", conv3x3="tiled", reduction="tree")
tiled_split.min_pixels_per_slice = 128          # 665 pixels -> 6 slices of the weight-gradient sum
for name, got, ref in zip(("gx", "gw", "gb"), tiled_split.conv3x3_backward(xb, wb, gyb, True), refs):
    compare(f"backward {name}, tiled, big shape, split gw", got, ref)

# %% [markdown]
# ### The same through autograd: tensors on `"emu"`
#
# Ordinary code never calls a backend: it makes tensors on a device and calls `F.conv3x3`;
# `.backward()` then runs the backward kernels of that device (on `"emu"` those the
# `"auto"` defaults pick for each shape). Here a loss $L = \sum y \cdot p$ with a fixed random
# $p$ (so $g_y = p$) is differentiated three times: on `"emu"` in float32 (the CUDA kernels),
# on `"cpu"` in float32 (the Numba kernels: a second fast implementation, not the oracle) and
# on `"cpu"` in float64, which runs the NumPy reference (the Numba kernels take float32 only;
# other dtypes go to the reference). The last one is the oracle:

# %%
p = rng.standard_normal((N, Co, Ho, Wo))
grads = {}
for device, dtype in (("emu", "float32"), ("cpu", "float32"), ("cpu", "float64")):
    X, Wt, B = (mu.Tensor(a, device=device, dtype=dtype, requires_grad=True) for a in (xs, ws, bs))
    out = F.conv3x3(X, Wt, B)
    (out * mu.Tensor(p, device=device, dtype=dtype)).sum().backward()
    grads[device, dtype] = [out.numpy()] + [t.grad.numpy() for t in (X, Wt, B)]
    print(f"{device} {dtype}: y {out.shape}, grads of x {X.grad.shape}, w {Wt.grad.shape}, b {B.grad.shape}")
for name, e, c, o in zip(("y", "gx", "gw", "gb"), grads["emu", "float32"], grads["cpu", "float32"],
                         grads["cpu", "float64"]):
    compare(f"autograd {name}: emu (CUDA kernels) vs reference", e, o)
    compare(f"autograd {name}: cpu (Numba kernels) vs reference", c, o)

# %% [markdown]
# ## On a real GPU
#
# With CuPy and a GPU, `KernelBackend("cuda", ...)` compiles the same file with NVRTC and runs
# the same comparisons on the device `"cuda"` (the test suite does this for every kernel).
# Without a GPU the cell says so and skips.

# %%
from minunet.devices import cuda_status

available, reason = cuda_status()
if available:
    import cupy
    for version in ("naive", "tiled"):
        gpu = KernelBackend("cuda", conv3x3=version)
        compare(f"forward, {version} (cuda) vs reference", cupy.asnumpy(gpu.conv3x3_forward(xs, ws, bs)), y_ref)
        for name, got, ref in zip(("gx", "gw", "gb"), gpu.conv3x3_backward(xs, ws, gy, True),
                                  (gx_ref, gw_ref, gb_ref)):
            compare(f"backward {name}, {version} (cuda) vs reference", cupy.asnumpy(got), ref)
else:
    print("cuda: skipped -", reason)

# %% [markdown]
# ## The oracle itself: a finite-difference check in float64
#
# Every comparison above trusts the NumPy reference. Its backward is checked against the
# definition of the derivative (notebook 1 explains `minunet.gradcheck`): central
# differences of $\sum_k f(x)_k\, r_k$ for a fixed random $r$, one input element at a time,
# in float64 — in float32 the finite differences themselves would be wrong in the third
# digit. `gradcheck` raises if any element of $g_x$, $g_w$ or $g_b$ misses
# $|\text{analytic} - \text{numeric}| \le 10^{-7} + 10^{-5} |\text{numeric}|$, and returns the
# largest error per input:

# %%
from minunet.gradcheck import gradcheck

r64 = np.random.default_rng(3)
x64, w64, b64 = r64.standard_normal((2, 3, 6, 7)), r64.standard_normal((4, 3, 3, 3)), r64.standard_normal(4)
errors = gradcheck(F.conv3x3, [x64, w64, b64])
print("float64 finite differences vs reference backward, max |error|:",
      {name: f"{errors[k]:.1e}" for k, name in enumerate(("gx", "gw", "gb"))})
errors = gradcheck(lambda x, w: F.conv3x3(x, w), [x64, w64])
print("without a bias:", {name: f"{errors[k]:.1e}" for k, name in enumerate(("gx", "gw"))})

# %% [markdown]
# ## Summary of the comparisons

# %%
print(f"{'comparison':52s} {'max abs error':>13s} {'relative':>9s}")
for what, err, rel in results:
    print(f"{what:52s} {err:13.2e} {rel:9.2e}")
worst = max(rel for _, _, rel in results)
print(f"{len(results)} comparisons, worst relative error {worst:.1e}: "
      f"{'all agree to float32 rounding' if worst < 1e-5 else 'MISMATCH'}")

# %% [markdown]
# ## What to take away
#
# * A valid 3x3 convolution maps $H \times W$ to $(H-2) \times (W-2)$: only windows with full
#   context are computed, which is what makes the paper's overlap-tile segmentation seamless
#   (Sections 1-3, Fig. 2).
# * A CUDA kernel is one function run by many threads; `blockIdx`, `blockDim` and `threadIdx`
#   tell each thread which outputs are its own. The naive kernel takes one output per thread
#   and 2 global loads per multiply-add.
# * The tiled kernel stages an $18 \times 34$ input tile and the weights in shared memory
#   (with `__syncthreads()` around it) and keeps $2 \times 8$ outputs per thread in registers:
#   about 0.019 global loads per multiply-add, ~100x fewer.
# * The weight and bias gradients are sums over pixels (tree reductions); the input gradient
#   is a 3x3 convolution of $g_y$ padded by 2, with swapped and flipped weights — the tiled
#   kernel computes it with the same code as the forward pass.
# * Every kernel runs on the CPU under the emulator and agrees with the NumPy reference to
#   float32 rounding; the reference agrees with finite differences in float64.

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
# **Exercise 02.1: restore the barriers.** [`exercises/barrier.cu`](exercises/barrier.cu) is a
# small tiled convolution (one output channel, a 16 x 16 tile, a loop over input channels)
# from which both `__syncthreads()` were deleted. The check below runs the starter as it is:
# the emulator reports the race, naming the two threads and the two source lines. Put the
# barriers back and run the cell again.

# %%
from exercises.check import check, solution

check("barrier");

# %% [markdown]
# **Exercise 02.2: write a tiled 1x1 convolution.** U-Net's last layer (Fig. 1, teal) is a 1x1
# convolution: per pixel, the feature vector times a $C_o \times C_i$ matrix.
# [`exercises/tiled_conv1x1.cu`](exercises/tiled_conv1x1.cu) starts from the naive kernel,
# which loads an input and a weight from global memory for every multiply-add. Apply the two
# ideas of the tiled 3x3 kernel: 8 output channels per thread in registers, and the block's
# weights staged in shared memory (with barriers, and without an early `return` before them).
# The check counts global load requests per warp of outputs: $2 C_i + 1$ for the starter, at
# most $C_i / 2$ wanted.

# %%
check("tiled_conv1x1");

# %% [markdown]
# Next: [03_pooling_and_upconv.ipynb](03_pooling_and_upconv.ipynb) — the other two
# operations of Fig. 1 (red and green arrows), their kernels and their gradients. Then
# [04_the_unet.ipynb](04_the_unet.ipynb) stacks 18 of these convolutions into the network.
