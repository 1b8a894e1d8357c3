"""Build the step-through notebooks: write each one from the cells below, run it top to bottom in a
fresh kernel, and save it *with* its outputs, so that a reader sees the figures on the web.

    python notebooks/build.py                    # every notebook defined here
    python notebooks/build.py 04_the_unet        # only those named (file names without .ipynb)

The cells are the notebooks' single source: edit them here, rebuild, commit the .ipynb files.
Outputs are reproducible (fixed seeds everywhere); cell ids are fixed and no timing metadata is
recorded, so a rebuild only changes what really changed. tests/test_notebooks.py executes the
committed notebooks (a copy in memory) and fails on any error.

Every notebook starts with the same setup cell: compact PNG figures (small files), NumPy printing
that fits a line.
"""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

SETUP = """\
%config InlineBackend.figure_formats = ['png']
import io
import numpy as np
import matplotlib.pyplot as plt
from PIL import Image
import minunet as mu
import minunet.functional as F

plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "font.size": 9, "image.interpolation": "nearest"})
np.set_printoptions(precision=4, suppress=True, linewidth=100)

def compact_png(fig):
    \"\"\"Figures as 256-colour PNGs: they look the same at a third of the bytes (small notebooks).\"\"\"
    raw, small = io.BytesIO(), io.BytesIO()
    fig.savefig(raw, format="png", bbox_inches="tight")
    Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(small, format="png", optimize=True)
    return small.getvalue()

plt.close(plt.figure())  # the inline backend installs its PNG formatter with the first figure: replace it after
get_ipython().display_formatter.formatters["image/png"].type_printers[plt.Figure] = compact_png"""


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


NOTEBOOKS: dict = {}


def notebook(name: str):
    """Register a function returning a notebook's cells under its file name (without .ipynb)."""
    def register(fn):
        NOTEBOOKS[name] = fn
        return fn
    return register


# =================================================================================================
# 01: tensors and autograd
# =================================================================================================
@notebook("01_tensors_and_autograd")
def tensors_and_autograd():
    return [
        md(r"""
        # 1. Tensors and autograd: where gradients come from

        Training a U-Net means minimising the paper's energy (eq. 1, a weighted cross-entropy) with
        stochastic gradient descent (Section 3). SGD needs the derivative of that one number with
        respect to each of the network's 31 million weights, at every step. Computing them one
        by one with finite differences would take 31 million forward passes per step. **Reverse-mode
        automatic differentiation** (backpropagation) gets all of them from one backward pass that
        costs about as much as two forward passes.

        This notebook builds a tiny graph out of a few operations, draws it, differentiates it by
        hand with the chain rule, and checks that `.backward()` gives the same numbers. Then it
        shows the two rules that surprise people (gradients *accumulate*; `no_grad` records
        nothing) and how the library checks every gradient against finite differences.

        Everything runs on the `"cpu"` device, whose operations are plain NumPy.
        """),
        code(SETUP),
        md(r"""
        ## A Tensor is an array plus three things

        `mu.Tensor` wraps an array (NumPy on `cpu`, CuPy on `cuda`) and adds what autograd needs:

        * `requires_grad` — do we want d(loss)/d(this tensor)?
        * `grad` — where `.backward()` puts that derivative;
        * `creator` — the operation that produced this tensor (`None` for a *leaf*, a tensor we
          made ourselves). Following `creator.inputs` from the loss back to the leaves walks
          the whole computation: that chain of links *is* the graph.

        Floating-point data becomes `float32`, the precision the CUDA kernels compute in.
        """),
        code("""
        x = mu.Tensor([1.0, -2.0, 3.0], requires_grad=True)
        w = mu.Tensor([0.5, 1.5, -0.5], requires_grad=True)
        print(x, x.numpy(), "creator:", x.creator)
        """),
        md(r"""
        ## A tiny graph

        $h = x \cdot w$ (elementwise), $s = h + x$, $r = \mathrm{relu}(s)$, $q = r \cdot r$,
        $L = \sum_i q_i$. Every operation runs its forward at once (the numbers exist right
        away) and, because an input requires a gradient, records itself as the result's
        `creator`.
        """),
        code("""
        h = x * w
        s = h + x
        r = F.relu(s)
        q = r * r
        loss = q.sum()
        for name, t in [("h", h), ("s", s), ("r", r), ("q", q), ("loss", loss)]:
            print(f"{name:5s} = {t.numpy()!s:22s} creator: {type(t.creator).__name__}")
        """),
        md(r"""
        ### Drawing the graph

        We walk from `loss` through `creator.inputs` down to the leaves. Tensors are boxes;
        the operation that made a tensor is written under its name. `x` is used twice (in
        `h` and in `s`) and `r` twice (both inputs of `r * r`): the graph is a DAG, not a tree.
        """),
        code("""
        def graph_of(root, names):
            \"\"\"Nodes {id: (label, depth from the root)} and edges (input id, output id).\"\"\"
            nodes, edges = {}, set()
            def visit(t, depth):
                if id(t) in nodes and nodes[id(t)][1] >= depth:
                    return
                op = "" if t.creator is None else "\\n= " + type(t.creator).__name__.strip("_")
                label = names.get(id(t), "const" if t.size == 1 else "?")
                nodes[id(t)] = (label + op, depth)
                for parent in (t.creator.inputs if t.creator else ()):
                    if isinstance(parent, mu.Tensor):
                        edges.add((id(parent), id(t)))
                        visit(parent, depth + 1)
            visit(root, 0)
            return nodes, edges

        names = {id(t): n for n, t in dict(x=x, w=w, h=h, s=s, r=r, q=q, loss=loss).items()}
        nodes, edges = graph_of(loss, names)
        print(len(nodes), "tensors,", len(edges), "edges")
        """),
        code("""
        def draw_graph(nodes, edges):
            by_depth = {}
            for key, (_, depth) in sorted(nodes.items(), key=lambda kv: kv[1][0]):
                by_depth.setdefault(depth, []).append(key)
            deepest = max(by_depth)
            pos = {key: (deepest - depth, (len(keys) - 1) / 2 - i)   # leaves left, loss right
                   for depth, keys in by_depth.items() for i, key in enumerate(keys)}
            fig, ax = plt.subplots(figsize=(7, 2.2))
            for a, b in edges:  # arrows point the way the forward pass goes; long ones bend
                bend = "arc3,rad=0.35" if pos[b][0] - pos[a][0] > 1 else "arc3"
                ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops=dict(
                    arrowstyle="->", color="gray", shrinkA=18, shrinkB=18, connectionstyle=bend))
            for key, (label, _) in nodes.items():
                leaf = "=" not in label
                ax.text(*pos[key], label, ha="center", va="center", fontsize=9,
                        bbox=dict(boxstyle="round", fc="#cde" if leaf else "#fed", ec="k"))
            ax.set_xlim(-0.5, deepest + 0.5); ax.set_ylim(-1, 1); ax.axis("off")
            ax.set_title("the forward pass runs left to right: leaves (blue) to the loss")
            plt.show()

        draw_graph(nodes, edges)
        """),
        md(r"""
        ## Backward by hand

        The chain rule, applied from the loss down, one operation at a time. Each operation only
        needs to know its own local derivative:

        | op | forward | backward (given $\bar y = \partial L/\partial y$) |
        |---|---|---|
        | sum | $L = \sum_i q_i$ | $\bar q_i = \bar L = 1$ |
        | mul | $q = r \cdot r$ | $\bar r = \bar q \cdot r + \bar q \cdot r$ (r is *both* inputs: the two contributions add) |
        | relu | $r = \max(s, 0)$ | $\bar s = \bar r \cdot [s > 0]$ |
        | add | $s = h + x$ | $\bar h = \bar s$, $\bar x \mathrel{+}= \bar s$ |
        | mul | $h = x \cdot w$ | $\bar x \mathrel{+}= \bar h \cdot w$, $\bar w = \bar h \cdot x$ |

        $x$ feeds two operations, so its gradient is the **sum** of both contributions:
        $\bar x = \bar s\,(1 + w)$.
        """),
        code("""
        xn, wn = x.numpy(), w.numpy()
        sn = xn * wn + xn
        grad_r = 2 * np.maximum(sn, 0)        # d(sum r^2)/dr
        grad_s = grad_r * (sn > 0)            # relu passes the gradient only where s > 0
        grad_x_hand = grad_s * (1 + wn)       # through h = x*w (times w) and s = h + x (times 1)
        grad_w_hand = grad_s * xn
        print("s      =", sn, " (s < 0 in the middle: relu blocks that element's gradient)")
        print("dL/dx by hand =", grad_x_hand)
        print("dL/dw by hand =", grad_w_hand)
        """),
        md(r"""
        ## ... and by `.backward()`

        `loss.backward()` visits the graph in reverse topological order — every consumer of a
        tensor before the tensor itself — so a tensor's gradient is complete (summed over all its
        uses) before it is passed further down. Leaves collect theirs in `.grad`.
        """),
        code("""
        loss.backward()
        print("dL/dx autograd =", x.grad.numpy())
        print("dL/dw autograd =", w.grad.numpy())
        print("max |hand - autograd| =",
              max(np.abs(x.grad.numpy() - grad_x_hand).max(), np.abs(w.grad.numpy() - grad_w_hand).max()))
        """),
        md(r"""
        After the backward pass the graph's saved values are freed (activations are the bulk of
        a U-Net's memory), so a second `.backward()` on the same loss is an error, not a silent
        wrong answer:
        """),
        code("""
        try:
            loss.backward()
        except RuntimeError as error:
            print("RuntimeError:", error)
        """),
        md(r"""
        ## Gradients accumulate

        A new forward pass and another backward **add** to `.grad` instead of overwriting it (the
        same rule as in PyTorch). This is what makes "a tensor used twice gets the sum of both
        gradients" work at the leaves too, and it lets you sum gradients over several tiles
        before one optimizer step. The price: reset the gradients between steps
        (`optimizer.zero_grad()`, or `x.grad = None`).
        """),
        code("""
        def forward(x, w):
            r = F.relu(x * w + x)
            return (r * r).sum()

        forward(x, w).backward()            # second time: x.grad now holds twice the gradient
        print("after 2 backward passes:", x.grad.numpy(), " = 2 x", grad_x_hand)
        x.grad = w.grad = None              # what optimizer.zero_grad() does
        forward(x, w).backward()
        print("after reset + 1 pass:  ", x.grad.numpy())
        """),
        md(r"""
        ## `no_grad`: inference records nothing

        When we only want predictions (validation, the overlap-tile prediction of Fig. 2), the
        graph is wasted memory. Inside `with mu.no_grad():` operations compute their values but
        record no creator, so every intermediate array can be freed as soon as it is used.
        """),
        code("""
        with mu.no_grad():
            y = forward(x, w)
        print(y, " creator:", y.creator, " value:", y.item())
        try:
            y.backward()
        except ValueError as error:
            print("ValueError:", error)
        """),
        md(r"""
        ## Checking every gradient: finite differences

        The hand derivation above does not scale to a 3x3 convolution. Instead the library checks
        every operation's backward against the definition of the derivative, the central
        difference $\frac{f(a + \varepsilon) - f(a - \varepsilon)}{2\varepsilon}$, one input
        element at a time. `minunet.gradcheck.gradcheck` reduces a tensor output to a scalar
        with a fixed random projection, $\sum_k f(a)_k\, p_k$, so that one scalar checks every
        output element's contribution at once.

        It must run in **float64**: in float32 the rounding error of $f(a \pm \varepsilon)$,
        divided by $2\varepsilon$, is as large as the quantity we want to check (shown below).

        Here is the valid 3x3 convolution of Fig. 1 (blue arrows), on a batch of 2 images with 3
        channels, 4 output channels:
        """),
        code("""
        from minunet.gradcheck import gradcheck, numerical_grad

        rng = np.random.default_rng(0)
        xa = rng.standard_normal((2, 3, 5, 6))      # float64
        wa = rng.standard_normal((4, 3, 3, 3))
        ba = rng.standard_normal(4)
        p = rng.standard_normal((2, 4, 3, 4))       # random projection of the (2, 4, 3, 4) output

        X, W, B = (mu.Tensor(a, dtype="float64", requires_grad=True) for a in (xa, wa, ba))
        (F.conv3x3(X, W, B) * mu.Tensor(p, dtype="float64")).sum().backward()

        def projected():                            # reads wa, which numerical_grad perturbs in place
            return float((F.conv3x3(mu.Tensor(xa, dtype="float64"), mu.Tensor(wa, dtype="float64"),
                                    mu.Tensor(ba, dtype="float64")).numpy() * p).sum())

        numeric = numerical_grad(projected, wa, eps=1e-6)
        print(" weight index      analytic        numeric     |difference|")
        for idx in [(0, 0, 0, 0), (1, 2, 1, 1), (3, 1, 2, 0), (2, 0, 0, 2)]:
            a, n = W.grad.numpy()[idx], numeric[idx]
            print(f"{str(idx):14s} {a:14.8f} {n:14.8f} {abs(a - n):12.2e}")
        print("max |analytic - numeric| over all", wa.size, "weights:", np.abs(W.grad.numpy() - numeric).max())
        """),
        md(r"""
        `gradcheck` does the same for every differentiable input and raises (naming the input
        and the worst element) if any element misses the tolerance $|\text{analytic} -
        \text{numeric}| \le 10^{-7} + 10^{-5}\,|\text{numeric}|$. It returns the largest error per input:
        """),
        code("""
        errors = gradcheck(F.conv3x3, [xa, wa, ba])
        print({["x", "w", "b"][i]: f"{e:.1e}" for i, e in errors.items()})
        errors = gradcheck(lambda t: F.relu(t), [rng.standard_normal((1, 2, 4, 4))])
        print("relu:", errors)
        """),
        md(r"""
        And why float64: the same finite difference computed in float32 (with the best step for
        float32, $\varepsilon = 10^{-3}$) is wrong in the third digit, so it could not tell a
        correct backward from a slightly wrong one.
        """),
        code("""
        wa32 = wa.astype(np.float32)
        def projected32():
            return float((F.conv3x3(mu.Tensor(xa), mu.Tensor(wa32), mu.Tensor(ba)).numpy() * p).sum(dtype=np.float32))
        numeric32 = numerical_grad(projected32, wa32, eps=1e-3)
        print("float32 finite differences: max error", np.abs(W.grad.numpy() - numeric32).max())
        print("float64 finite differences: max error", np.abs(W.grad.numpy() - numeric).max())
        """),
        md(r"""
        ## What to take away

        * A tensor remembers its `creator`; the chain of creators is the graph, built as the
          forward runs.
        * `.backward()` applies each operation's local derivative from the loss down, summing
          over every use of a tensor; the results land in the leaves' `.grad` and *accumulate*.
        * `mu.no_grad()` turns recording off for inference.
        * Every operation of the U-Net (`tests/test_gradcheck.py`) is checked this way in float64
          on the NumPy reference, and the CUDA kernels are then checked against that reference.

        Next: [04_the_unet.ipynb](04_the_unet.ipynb) assembles these operations into the network
        of Fig. 1.
        """),
    ]


# =================================================================================================
# 04: the U-Net of Fig. 1
# =================================================================================================
@notebook("04_the_unet")
def the_unet():
    return [
        md(r"""
        # 4. The U-Net: Fig. 1, layer by layer

        The paper's network (Section 2, Fig. 1) has two halves:

        * the **contracting path** (left side of the U): four times *two 3x3 convolutions, each
          followed by a ReLU, then a 2x2 max-pooling with stride 2*; every pooling halves the
          image and the next step doubles the number of feature channels (64, 128, 256, 512),
          and a bottom step reaches 1024 channels. This path sees more and more context with
          less and less spatial resolution: *what* is in the image.
        * the **expansive path** (right side): four times *a 2x2 "up-convolution" that doubles
          the image and halves the channels, a concatenation with the correspondingly cropped
          feature map from the contracting path, and two 3x3 convolutions with ReLU*. The
          concatenation hands the high-resolution features of the left side to the right side:
          *where* it is, precisely.
        * a final **1x1 convolution** maps the 64 features of every pixel to 2 class scores
          (cell / membrane).

        "In total the network has 23 convolutional layers." All 3x3 convolutions are **valid**
        (unpadded), which is why a 572x572 input tile gives a 388x388 segmentation. This notebook
        computes every layer's size, checks the arithmetic against a real forward pass, shows the
        crop offsets of the skip connections, explains which input sizes are allowed, and draws
        the U from the computed numbers.
        """),
        code(SETUP),
        md(r"""
        ## Valid convolutions shrink the map

        A valid 3x3 convolution only computes output pixels whose whole 3x3 window lies inside
        the input: an $H \times W$ map becomes $(H-2) \times (W-2)$. The paper chooses this so that
        "the segmentation map only contains the pixels, for which the full context is available
        in the input image" — no output pixel is computed from invented zeros, so a large image
        can later be segmented tile by tile without seams (Fig. 2, notebook 7).
        """),
        code("""
        x = mu.Tensor(np.arange(64.0).reshape(1, 1, 8, 8))
        w = mu.Tensor(np.full((1, 1, 3, 3), 1 / 9))           # a 3x3 mean filter
        y = F.conv3x3(x, w)
        print("input", x.shape, "-> output", y.shape)
        print("output[0, 0, 0, 0] =", y.numpy()[0, 0, 0, 0], "= mean of input rows 0-2, columns 0-2 =",
              x.numpy()[0, 0, :3, :3].mean())
        """),
        md(r"""
        ## Every layer's size, computed

        Four rules give every size: a 3x3 conv subtracts 2, a pooling halves (the size must be
        even, otherwise a row would be dropped), an up-convolution doubles, and crop-and-concatenate
        keeps the up-convolved size while adding the skip connection's channels. The function below
        applies them and also counts each layer's parameters: a convolution with a $k \times k$
        kernel from $c_{in}$ to $c_{out}$ channels has $k^2 c_{in} c_{out}$ weights and $c_{out}$
        biases.
        """),
        code("""
        def unet_layers(size, base=64, depth=4, in_channels=1, classes=2):
            \"\"\"One row per layer: level (0 = full resolution), op, output side length, channels,
            parameters, and for crop-and-concatenate the skip's size and crop offset.\"\"\"
            rows, skips = [], {}
            def add(level, op, size, channels, params=0, **extra):
                rows.append(dict(level=level, op=op, size=size, channels=channels, params=params, **extra))
            def conv3x3(level, s, cin, cout):
                add(level, "conv 3x3 + ReLU", s - 2, cout, 9 * cin * cout + cout)
                return s - 2
            add(0, "input", size, in_channels)
            s, c = size, in_channels
            for level in range(depth + 1):                       # contracting path + bottom
                width = base * 2 ** level
                s = conv3x3(level, conv3x3(level, s, c, width), width, width)
                c = width
                if level < depth:
                    assert s % 2 == 0, f"pooling an odd size {s} at level {level}"
                    skips[level] = s
                    s //= 2
                    add(level + 1, "max-pool 2x2", s, c)
            for level in reversed(range(depth)):                 # expansive path
                width = base * 2 ** level
                s *= 2
                add(level, "up-conv 2x2", s, width, 4 * c * width + width)
                add(level, "crop + concat", s, 2 * width, skip=skips[level],
                    offset=(skips[level] - s) // 2)
                s = conv3x3(level, conv3x3(level, s, 2 * width, width), width, width)
                c = width
            add(0, "conv 1x1", s, classes, c * classes + classes)
            return rows

        layers = unet_layers(572)
        print(f"{'level':>5}  {'layer':16s} {'output size':>15s} {'channels':>8s} {'parameters':>12s}")
        for r in layers:
            note = f"  (skip {r['skip']}, offset {r['offset']})" if "skip" in r else ""
            print(f"{r['level']:5d}  {r['op']:16s} {r['size']:>7d} x {r['size']:<5d} {r['channels']:8d}"
                  f" {r['params']:12,d}{note}")
        """),
        md(r"""
        18 convolutions 3x3, 4 up-convolutions and one 1x1 convolution: the paper's 23
        convolutional layers. Their parameters add up to the count of the real model,
        `mu.UNet()` (built here with the paper's defaults: 1 input channel, 2 classes, 64 base
        channels, depth 4):
        """),
        code("""
        model = mu.UNet()
        by_block = {}
        for name, p in model.named_parameters():
            block = name.split(".")[0]
            by_block[block] = by_block.get(block, 0) + p.size
        print("  ".join(f"{b}: {n:,}" for b, n in by_block.items()))
        n_model = sum(by_block.values())
        n_table = sum(r["params"] for r in layers)
        n_conv = sum(r["op"].startswith(("conv", "up-conv")) for r in layers)
        print(f"convolutional layers: {n_conv}")
        print(f"parameters: table {n_table:,}  model {n_model:,}  equal: {n_table == n_model}")
        """),
        md(r"""
        Most parameters sit at the bottom of the U (the 3x3 convolutions from 512 to 1024 channels
        and back), yet the *computation* is spread nearly evenly over the levels: one level down,
        the maps have 4 times fewer pixels and the convolutions 4 times more weights (twice the
        input channels times twice the output channels).

        ## Checking the table against a real forward pass

        The table is arithmetic; now we run a network and look at the shapes it really produces.
        Sizes do not depend on the channel counts, so a network of the same depth with
        `base_channels=2` (2, 4, ..., 32 channels: 32 times fewer than the paper) gives the same
        sizes in a fraction of a second. Below, `UNet.forward` is written out step by step to
        record every intermediate shape; the input is a synthetic EM-like image (notebook 8's
        data) so that the feature maps look like something. `eval()` turns dropout off, so the
        step-by-step forward must equal `model(x)` exactly.
        """),
        code("""
        from minunet.data import em_images

        def traced_forward(net, x):
            \"\"\"UNet.forward written out; returns (output, [(op, shape)], skip connections).\"\"\"
            shapes, skips = [("input", x.shape)], []
            def double_conv(block, x):
                for conv in (block.conv1, block.conv2):
                    x = F.relu(conv(x))
                    shapes.append(("conv 3x3 + ReLU", x.shape))
                return x
            for i in range(net.depth):
                x = double_conv(getattr(net, f"down{i + 1}"), x)
                skips.append(x)
                x = F.max_pool2x2(x); shapes.append(("max-pool 2x2", x.shape))
            x = double_conv(net.bottom, x)
            for i in reversed(range(net.depth)):
                block = getattr(net, f"up{i + 1}")
                x = block.up(x); shapes.append(("up-conv 2x2", x.shape))
                x = F.crop_concat(skips[i], x); shapes.append(("crop + concat", x.shape))
                x = double_conv(block.convs, x)
            x = net.classifier(x); shapes.append(("conv 1x1", x.shape))
            return x, shapes, skips

        small = mu.UNet(base_channels=2, depth=4, seed=0).eval()
        image = em_images(1, size=572, seed=0)[0][0]          # images (1, H, W), labels (1, H, W)
        x = mu.Tensor(image[None, None])
        with mu.no_grad():
            y_traced, shapes, skips = traced_forward(small, x)
            y = small(x)
        print("traced forward == model(x):", np.array_equal(y_traced.numpy(), y.numpy()), " output", y.shape)
        """),
        code("""
        expected = unet_layers(572, base=2)
        print(f"{'layer':16s} {'computed (base 2)':>18s}   {'real forward (N, C, H, W)':26s}")
        for r, (op, shape) in zip(expected, shapes):
            assert r["op"] == op and shape[1:] == (r["channels"], r["size"], r["size"]), (r, op, shape)
            print(f"{op:16s} {r['channels']:5d} x {r['size']:3d} x {r['size']:<3d}    {shape}")
        print(len(shapes), "layers: every computed size and channel count matches the real forward pass")
        """),
        md(r"""
        ## Crop and concatenate: the offsets

        Every valid convolution eats one pixel on each side, so a contracting-path feature map
        (the skip connection) is *larger* than the up-convolved map it is concatenated with:
        568 vs 392 pixels at the top level. "The cropping is necessary due to the loss of border
        pixels in every convolution" (Section 2): the skip map is cut to its centre, offset
        $\left(\frac{H_{skip} - H_{up}}{2}, \frac{W_{skip} - W_{up}}{2}\right)$, so that both
        maps show the same image region pixel for pixel; then their channels are stacked.
        """),
        code("""
        for r in layers:
            if "skip" in r:
                print(f"level {r['level']}: skip {r['skip']:3d} x {r['skip']:<3d} -> centre "
                      f"{r['size']:3d} x {r['size']:<3d} at offset ({r['offset']}, {r['offset']}); "
                      f"{r['channels'] // 2} + {r['channels'] // 2} = {r['channels']} channels")
        """),
        code("""
        fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
        for ax, level in zip(axes, (0, 2)):
            r = next(r for r in layers if r.get("skip") and r["level"] == level)
            maps = skips[level].numpy()[0]
            channel = int(maps.std(axis=(1, 2)).argmax())        # many ReLU maps of a random net are 0
            ax.imshow(maps[channel], cmap="gray")
            ax.add_patch(plt.Rectangle((r["offset"] - 0.5, r["offset"] - 0.5), r["size"], r["size"],
                                       fill=False, ec="yellow", lw=2))
            ax.set_title(f"level {level}: skip map {r['skip']}x{r['skip']} (channel {channel})\\n"
                         f"crop {r['size']}x{r['size']} at offset {r['offset']}", fontsize=8)
        for ax in axes: ax.axis("off")
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        ## Which input sizes are valid, and why 12 mod 16

        Two conditions (Section 2: "it is important to select the input tile size such that all
        2x2 max-pooling operations are applied to a layer with an even x- and y-size"):

        1. **Even before every pooling.** With $s$ the input size, the sizes before the four
           poolings are $s-4$, $\frac{s-4}{2}-4$, ... Requiring all of them even is the same as
           requiring the size after the fourth pooling, $\frac{s - 60}{16}$, to be an integer:
           $s \equiv 60 \equiv 12 \pmod{16}$.
        2. **Positive everywhere.** The convolutions remove a fixed border: 4 pixels per level
           (two convs) *at that level's scale*, i.e. $4 \cdot (1 + 2 + 4 + 8) = 60$ input pixels on
           the way down, $4 \cdot 16 = 64$ at the bottom, and $4 \cdot (8 + 4 + 2 + 1) = 60$ on the
           way up. So **output = input - 184** (92 pixels of context on each side), and the
           smallest valid input is 188 (output 4).

        `mu.UNet.output_size(s)` follows a size through the network (a `ValueError` naming the
        nearest valid sizes if it is not valid); `mu.UNet.valid_input_size(n)` gives the smallest
        valid size $\ge n$.
        """),
        code("""
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
        """),
        md(r"""
        The same reasoning for any depth $d$: input sizes $\equiv -4 \pmod{2^d}$ and output = input
        $- (12 \cdot 2^d - 8)$. The smaller networks of notebooks 7 and 8 use depth 3 (88 pixels of
        border, sizes $\equiv 4 \pmod 8$):
        """),
        code("""
        for depth in (2, 3, 4):
            s = mu.UNet.valid_input_size(120, depth)
            print(f"depth {depth}: valid sizes step by {2 ** depth}; smallest valid >= 120: {s} -> output "
                  f"{mu.UNet.output_size(s, depth)} (border {s - mu.UNet.output_size(s, depth)} = 12*2^{depth} - 8)")
        """),
        md(r"""
        ## The U, drawn from the computed sizes

        Each box is a feature map; its height grows with the image size (square-root scale, so
        the bottom stays visible) and its width with the number of channels (log scale). The
        colours of the arrows follow Fig. 1: blue = conv 3x3 + ReLU, red = max-pool, green =
        up-conv, gray = copy and crop (the white boxes are the cropped copies), teal = conv 1x1.
        """),
        code("""
        def draw_u(layers, base=64):
            fig, ax = plt.subplots(figsize=(11, 5.2))
            height = lambda s: 2.6 * np.sqrt(s / layers[0]["size"])
            width = lambda c: 0.12 + 0.09 * np.log2(c)
            y_of = lambda level: -2.3 * level
            x, previous, last_on_level = 0.0, None, {}
            colours = {"conv 3x3 + ReLU": "tab:blue", "max-pool 2x2": "tab:red",
                       "up-conv 2x2": "tab:green", "conv 1x1": "teal"}
            for r in layers:
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
                    x = px + pw + (0.45 if r["level"] == previous_level else 0.15)
                    if r["op"] == "up-conv 2x2":
                        x += width(channels)            # room for the white copy box
                    ax.annotate("", xy=(x, y), xytext=(px + pw, py),
                                arrowprops=dict(arrowstyle="->", color=colours[r["op"]], lw=1.2))
                ax.add_patch(plt.Rectangle((x, y - h / 2), w, h, fc="#9cf" if r["op"] != "input" else "#ddd",
                                           ec="k", lw=0.6))
                ax.text(x + w / 2, y + h / 2 + 0.08, str(r["channels"]), ha="center", va="bottom", fontsize=7)
                ax.text(x + w / 2, y - h / 2 - 0.08, str(r["size"]), ha="center", va="top", fontsize=6)
                previous, previous_level = (x, y, w), r["level"]
                if r["op"] != "up-conv 2x2":
                    last_on_level[r["level"]] = (x + w, y)
            ax.set_xlim(-0.5, x + 1); ax.set_ylim(y_of(4) - 1, 1.8); ax.set_aspect("equal"); ax.axis("off")
            ax.set_title(f"U-Net, input {layers[0]['size']} -> output {layers[-1]['size']} "
                         "(channels above each map, side length below)")
            plt.show()

        draw_u(layers)
        """),
        md(r"""
        ## What to take away

        * Valid 3x3 convolutions make the output 184 pixels smaller than the input (depth 4);
          those pixels are the context each output pixel needs.
        * Crop-and-concatenate aligns the larger skip map with the up-convolved map by a centre
          crop (offsets 4, 16, 40, 88 for a 572 tile) and stacks their channels.
        * Valid input sizes are $12 \bmod 16$ (depth 4) so that every pooling sees an even size;
          `UNet.output_size` and `UNet.valid_input_size` do this arithmetic.
        * 23 convolutional layers, 31,030,658 parameters for the paper's configuration.

        Next: [06_elastic_deformation.ipynb](06_elastic_deformation.ipynb) — how so few training
        images are made into many; [07_overlap_tile.ipynb](07_overlap_tile.ipynb) — how the
        shrinking output tiles cover an image of any size.
        """),
    ]


# =================================================================================================
# 06: elastic deformation
# =================================================================================================
@notebook("06_elastic_deformation")
def elastic_deformation():
    return [
        md(r"""
        # 6. Elastic deformation: many training images from few

        The ISBI 2012 training set has 30 images. The paper (Section 3.1) makes up for it with
        data augmentation, above all **elastic deformations**: "Especially random elastic
        deformations of the training samples seem to be the key concept to train a segmentation
        network with very few annotated images." The introduction (Section 1) says why: in
        biomedical segmentation "deformation used to be the most common variation in tissue and
        realistic deformations can be simulated efficiently", so the network can learn to be
        invariant to them without ever seeing them in the annotated data.

        The recipe: "We generate smooth deformations using random displacement vectors on a
        coarse 3 by 3 grid. The displacements are sampled from a Gaussian distribution with 10
        pixels standard deviation. Per-pixel displacements are then computed using bicubic
        interpolation." This notebook takes it apart step by step with
        `minunet.data.elastic`, then shows the other augmentations (shift, rotation, flips,
        gray values) and why image and label must go through the *same* warp.
        """),
        code(SETUP),
        code("""
        from minunet.data import em_images, elastic_deform, displacement_field, random_augment
        from minunet.data.elastic import gray_value_variation

        SIZE = 193                                   # nodes of the 3x3 grid fall on pixels 0, 96, 192
        images, labels = em_images(1, size=SIZE, seed=1)
        image, label = images[0], labels[0]          # float32 in [0, 1]; 1 = cell, 0 = membrane
        print(image.shape, image.dtype, label.dtype, "label values", np.unique(label))
        """),
        md(r"""
        ## Step 1: nine random vectors on a coarse grid

        A 3x3 lattice of nodes spans the image corner to corner. Each node gets a random
        displacement $(d_y, d_x)$, both components drawn from $\mathcal{N}(0, 10^2)$ pixels.
        `displacement_field` draws exactly these nine vectors first from the generator it is given,
        so drawing them again from a generator with the same seed shows us the nodes.
        """),
        code("""
        SEED = 7
        nodes = np.random.default_rng(SEED).normal(0.0, 10.0, size=(2, 3, 3))   # (dy/dx, row, col)
        field = displacement_field((SIZE, SIZE), np.random.default_rng(SEED))   # (2, H, W) float32
        node_px = np.linspace(0, SIZE - 1, 3).astype(int)                       # 0, 96, 192
        print("node displacements dy:\\n", nodes[0].round(1), "\\n dx:\\n", nodes[1].round(1))
        at_nodes = field[:, node_px[:, None], node_px[None, :]]
        print("per-pixel field at the nodes == node vectors:", np.abs(at_nodes - nodes).max() < 1e-4)
        """),
        md(r"""
        ## Step 2: bicubic interpolation to every pixel

        Between the nodes, a cubic spline through the nine vectors gives every pixel its own
        displacement. The spline passes exactly through the nodes (checked above) and is smooth —
        neighbouring pixels move almost together — so the image is *bent*, never torn or folded.
        On the left the nine node vectors, on the right the interpolated field (arrows every 16
        pixels, colour = length in pixels). All arrows are drawn 3 times longer than the
        displacement, so that they can be seen.
        """),
        code("""
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
        """),
        md(r"""
        ## Step 3: warp — every output pixel *pulls* its value

        The deformed image is $I'(p) = I(p + d(p))$: output pixel $p$ looks up the input at the
        displaced position, interpolating between input pixels (cubic for images). Pulling rather
        than pushing guarantees that every output pixel gets exactly one value — no holes, no
        collisions. Positions that fall outside the image read a mirrored copy of it (the same
        extrapolation as the overlap-tile strategy of Fig. 2). So an arrow drawn above at $p$
        points to where output pixel $p$ reads from: the image content moves the opposite way.

        A regular grid shows the deformation best. `elastic_deform` with the same seed draws the
        same field, and returns it too:
        """),
        code("""
        grid_image = np.ones((SIZE, SIZE), np.float32)
        lines = np.arange(SIZE) % 16 < 2                     # 2-pixel lines every 16 pixels
        grid_image[lines, :] = grid_image[:, lines] = 0.0
        warped_grid, _, _, d = elastic_deform(grid_image, rng=np.random.default_rng(SEED))
        print("elastic_deform used the same field:", np.array_equal(d, field))
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
        for ax, im, title in zip(axes, (grid_image, warped_grid), ("regular grid", "after the elastic warp")):
            ax.imshow(im, cmap="gray"); ax.set_title(title); ax.axis("off")
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        ## Image and label through the same warp

        The label must be deformed *identically*, or the network would learn to put membranes
        where there are none. `elastic_deform(image, label, weight, rng)` resamples all three
        through one coordinate map: the image with cubic interpolation, the label with
        nearest-neighbour (class ids must not be blended: 0.5 is not a class), the weight map
        (eq. 2) linearly. The red lines are the label's membrane/cell boundary drawn over the
        image, before and after: they still follow the dark membranes.
        """),
        code("""
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
        """),
        md(r"""
        A number for "they stay aligned": the mean intensity under the label's membrane pixels
        vs its cell pixels. Deformed together, the contrast is that of the original; deform the
        label with a *different* random field and the contrast collapses — that label would be
        teaching the network wrong answers.
        """),
        code("""
        def contrast(im, lb):
            return im[lb == 1].mean() - im[lb == 0].mean()      # cells are brighter than membranes

        _, label_other, _, _ = elastic_deform(image, label, rng=np.random.default_rng(SEED + 1))
        print(f"cell - membrane intensity: original {contrast(image, label):.3f}, "
              f"deformed together {contrast(image_d, label_d):.3f}, "
              f"label warped differently {contrast(image_d, label_other):.3f}")
        """),
        md(r"""
        ## The other augmentations

        Section 3.1 also asks for "shift and rotation invariance as well as robustness to
        deformations and gray value variations". `random_augment` composes a random flip, a
        rotation by an arbitrary angle, a shift and the elastic field into **one** coordinate
        map, so the image is interpolated (blurred) only once, then varies the gray values
        (gamma, contrast, brightness) of the image only. Asking for an `out_shape` smaller than
        the input takes the output from the centre, where the rotated and shifted source
        positions still fall on real data (the training sampler cuts a region large enough for
        that around every tile).
        """),
        code("""
        rng = np.random.default_rng(0)
        fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
        for ax in axes.flat:
            aug_image, aug_label, _ = random_augment(image, label, rng=rng, out_shape=(129, 129), max_shift=10)
            ax.imshow(aug_image, cmap="gray", vmin=0, vmax=1)
            ax.contour(aug_label, levels=[0.5], colors="red", linewidths=0.5)
            ax.axis("off")
        fig.suptitle("4 draws of flip + rotation + shift + elastic + gray values (centre 129x129)")
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        Gray-value variation on its own: a random gamma, contrast around the mean, and a brightness
        offset. The label is untouched — what is a membrane does not depend on the exposure.
        """),
        code("""
        rng = np.random.default_rng(3)
        variants = [gray_value_variation(image, rng) for _ in range(3)]
        fig, axes = plt.subplots(1, 4, figsize=(7, 2.1))
        for ax, im, title in zip(axes, [image] + variants, ["original", "variant 1", "variant 2", "variant 3"]):
            ax.imshow(im[:96, :96], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}: mean {im.mean():.2f}", fontsize=8); ax.axis("off")
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        ## What to take away

        * Nine Gaussian vectors (std 10 px) on a 3x3 grid, interpolated bicubically, give a smooth
          random deformation field; the spline passes through the nodes.
        * The warp pulls: output pixel $p$ reads the input at $p + d(p)$; outside the image it
          reads a mirror image.
        * Image, label and weight map go through the same coordinate map (cubic, nearest,
          linear) and stay aligned; a label warped differently would contradict its image.
        * Flips, rotation, shift and the elastic field are composed into one map (one
          interpolation); gray values vary on the image only.

        In training (`minunet.data.TileSampler`, notebook 8) every tile is freshly deformed, so
        the network never sees the same example twice.
        """),
    ]


# =================================================================================================
# 07: the overlap-tile strategy of Fig. 2
# =================================================================================================
@notebook("07_overlap_tile")
def overlap_tile():
    return [
        md(r"""
        # 7. Overlap-tile: segmenting an image of any size (Fig. 2)

        A U-Net with valid convolutions maps an input tile to the segmentation of a *smaller*
        square in its centre (572 -> 388 in the paper, notebook 4): the border it loses is the
        context every output pixel needs. Two consequences (Section 2, Fig. 2):

        1. **Tiling.** A large image is segmented square by square — "this tiling strategy is
           important to apply the network to large images, since otherwise the resolution would
           be limited by the GPU memory". The output squares sit side by side; their input tiles
           overlap by the context margin.
        2. **Mirroring.** "To predict the pixels in the border region of the image, the missing
           context is extrapolated by mirroring the input image."

        This notebook pads an image by mirroring, draws the blue input tile and the yellow output
        tile of Fig. 2 on it, stitches a prediction from tiles, and checks it against a single
        pass of the network over the whole padded image — which uncovers one more condition
        for the two to agree exactly. The network is a small *untrained* U-Net on the CPU: the
        geometry does not depend on the weights.
        """),
        code(SETUP),
        code("""
        from minunet.data import em_images, mirror_pad, predict_overlap_tile, tile_origins
        from minunet.data.tiling import mirror_crop

        model = mu.UNet(base_channels=4, depth=3, seed=0).eval()     # eval(): no dropout
        TILE = 164                                                    # a valid input size for depth 3
        OUT = model.output_size(TILE)
        MARGIN = (TILE - OUT) // 2
        image = em_images(1, size=264, seed=2)[0][0][:200]            # a 200 x 264 "large" image
        print(f"input tile {TILE} -> output tile {OUT}, context margin {MARGIN} px per side; image {image.shape}")
        """),
        md(r"""
        ## Mirror padding

        Beyond the image border we need `MARGIN` = 44 pixels of context. Mirroring reflects the
        image at its edge *without repeating the edge pixel* (`d c b | a b c d | c b a`), so the
        extrapolated image is as smooth as the image itself there: no artificial edge for the
        network to respond to. In one dimension:
        """),
        code("""
        row = np.arange(5)[None, :]                  # a b c d e = 0 1 2 3 4
        print("mirror_pad([0 1 2 3 4], 3) =", mirror_pad(row, ((0, 0), (3, 3)))[0])
        print("np.pad(..., mode='reflect') =", np.pad(row[0], 3, mode="reflect"))
        """),
        code("""
        padded = mirror_pad(image, MARGIN)
        fig, ax = plt.subplots(figsize=(5, 3.9))
        ax.imshow(padded, cmap="gray")
        ax.add_patch(plt.Rectangle((MARGIN - 0.5, MARGIN - 0.5), image.shape[1], image.shape[0],
                                   fill=False, ec="red", lw=1.5))
        ax.set_title(f"image {image.shape} mirror-padded by {MARGIN} px (red: the image)")
        ax.axis("off"); plt.show()
        """),
        md(r"""
        ## The tiles of Fig. 2

        The output squares (yellow) start every `OUT` = 76 pixels; where an axis is not a
        multiple of 76, the last square is moved back to end at the image edge
        (`tile_origins`). Each is predicted from the input tile (blue) that surrounds it by the
        margin — for squares at the border, that tile reaches into the mirrored part.
        """),
        code("""
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
        """),
        md(r"""
        ## Predicting tile by tile

        A prediction function maps a batch of input tiles to class probabilities of their output
        squares (softmax over the 2 classes); `mirror_crop` cuts a tile out of the infinitely
        mirrored image, so tiles that reach beyond the border need no padded copy. Tiles side by
        side every 76 pixels, written by hand:
        """),
        code("""
        def probabilities(batch):
            \"\"\"(B, 1, TILE, TILE) -> softmax (B, 2, OUT, OUT)\"\"\"
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
        """),
        md(r"""
        ## The same as one pass over the whole image?

        Every output pixel gets its full context either way, so one might expect the stitched
        result to equal one pass of the network over the whole mirror-padded image (which
        would need far more memory for a really large image). Let us check:
        """),
        code("""
        def whole_image(pad_before, crop):
            \"\"\"One pass over the image mirror-padded by pad_before (top, left), then up to a valid
            size; returns the probabilities of the image pixels (dropping `crop` leading pixels).\"\"\"
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
        """),
        md(r"""
        Not the same! Only the squares that start at a multiple of 8 in both directions agree
        (differences of ~1e-7 are float32 rounding). The reason is
        **max-pooling**. A 2x2 pooling with stride 2 pairs pixels (0,1), (2,3), ... counted from
        the start of *its input*. Shift the input by one pixel and different pixels are paired:
        the network is only equivariant to shifts by multiples of $2^{\text{depth}}$ = 8 here (16
        for the paper's depth 4). A tile starting 76 pixels further sees the image through a
        pooling grid shifted by $76 \bmod 8 = 4$ pixels relative to the whole-image pass.

        The same shows in the input pixels one output pixel depends on. The gradient of one
        output pixel with respect to the input tile (notebook 1) is non-zero on its receptive
        field: it is wider than the 89-pixel window of $\pm$44 pixels around the pixel, and
        where it starts and ends depends on the pixel's position modulo 8:
        """),
        code("""
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
        """),
        md(r"""
        So, for the tiles to reproduce the whole-image pass **exactly**, their output squares
        must start at multiples of $2^{\text{depth}}$. With a valid tile size the output side is
        never such a multiple ($76 \equiv 4 \pmod 8$; the paper's $388 \equiv 4 \pmod{16}$), so we
        step by the largest multiple of 8 that fits, 72, and keep the central 72x72 of each
        76x76 output (2 pixels cropped per side). `predict_overlap_tile` does the tiling; we only
        tell it the squares are 72 wide and crop in the prediction function. The whole-image pass
        must then use the same grid: pad by the tile's margin around a 72-square (46 pixels) and
        drop the 2 cropped pixels. (For the last square to start at a multiple of 8 as well, the
        image sides here are multiples of 8: 200 and 264.)
        """),
        code("""
        STEP = OUT // 8 * 8                        # 72: tiles start on the pooling grid
        CROP = (OUT - STEP) // 2                   # 2 pixels cut from each side of an output square
        print("square origins, rows:", tile_origins(image.shape[0], STEP), "columns:", tile_origins(image.shape[1], STEP))

        tiled = predict_overlap_tile(image, lambda b: probabilities(b)[:, :, CROP:CROP + STEP, CROP:CROP + STEP],
                                     TILE, STEP)
        whole_aligned = whole_image(MARGIN + CROP, CROP)
        print("max |aligned tiles - whole image| =", np.abs(tiled - whole_aligned).max())
        """),
        code("""
        fig, axes = plt.subplots(1, 3, figsize=(10, 2.9))
        panels = [(stitched[1], "tiles every 76 px: P(class 1)", "magma"),
                  (diff, f"|76-px tiles - whole|, max {diff.max():.2f}", "viridis"),
                  (np.abs(tiled - whole_aligned)[1], "|72-px-grid tiles - whole|", "viridis")]
        for ax, (im, title, cmap) in zip(axes, panels):
            shown = ax.imshow(im, cmap=cmap)
            fig.colorbar(shown, ax=ax, fraction=0.035)
            ax.set_title(title, fontsize=8); ax.axis("off")
        for y in ys:
            axes[1].axhline(y - 0.5, color="white", lw=0.5)
        for x in xs:
            axes[1].axvline(x - 0.5, color="white", lw=0.5)
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        The left map is what the untrained network predicts; the middle one shows the seams of
        the naive tiling square by square (white lines: square borders); the right one is zero
        up to float32 rounding.

        For a *trained* network the differences between pooling phases are much smaller — it has
        learned to give nearly the same answer for an image shifted by a few pixels; notebook 8
        measures it — which is why the paper's tiling looks seamless. But only tiles on the
        pooling grid reproduce the whole-image pass exactly.

        ## What to take away

        * Valid convolutions give output squares smaller than the input tiles; the difference is
          the context margin (44 pixels per side here, 92 in the paper).
        * At the image border the context is extrapolated by mirroring without repeating the
          edge pixel.
        * Tiles let a network of fixed memory segment an image of any size.
        * Because of max-pooling, a U-Net is equivariant only to shifts by multiples of
          $2^{\text{depth}}$: to reproduce one pass over the whole image exactly, output squares
          must start on that grid.

        Next: [08_train_and_evaluate.ipynb](08_train_and_evaluate.ipynb) trains a network and
        predicts with these tiles.
        """),
    ]


# =================================================================================================
# 08: train and evaluate
# =================================================================================================
@notebook("08_train_and_evaluate")
def train_and_evaluate():
    return [
        md(r"""
        # 8. Training a U-Net and measuring it

        Everything so far comes together here, at a size that trains in well under a minute on
        two CPU cores. The method is the paper's (Section 3):

        * **one large tile per step** (batch size 1): "we favor large input tiles over a large
          batch size";
        * **SGD with momentum 0.99**, "such that a large number of the previously seen training
          samples determine the update in the current optimization step";
        * the **weighted softmax cross-entropy** of eq. 1, $E = \sum_x w(x) \log p_{\ell(x)}(x)$
          (negated, averaged over pixels), whose weight map $w$ balances the classes (eq. 2's
          $w_c$; the border term of eq. 2 matters for touching cells, `--instances`);
        * **Gaussian initialisation** with standard deviation $\sqrt{2/N}$, $N$ = incoming nodes
          of a neuron (built into `mu.UNet`);
        * **augmentation** by elastic deformation, rotation, flips and gray values
          (Section 3.1, notebook 6);
        * **overlap-tile prediction** (Fig. 2, notebook 7) and the **ISBI 2012 metrics**
          (Section 4, Table 1): pixel, Rand and warping error.

        The data are minunet's synthetic EM-like images (cells separated by dark membranes, in the
        spirit of the ISBI 2012 challenge), generated from a seed — no download. The network is
        scaled down: 16 base channels instead of 64, 3 poolings instead of 4.
        """),
        code(SETUP),
        code("""
        import time
        from minunet.data import synthetic_samples, TileSampler
        from minunet.train import standardize, predict_probabilities

        train = synthetic_samples("em", n=16, size=192, seed=0)     # images in [0, 1]
        val = synthetic_samples("em", n=2, size=192, seed=10_000)     # other seeds: unseen images
        s = train[0]
        print(len(train), "training and", len(val), "validation images;", s.image.shape,
              "| target classes", np.unique(s.target), "| weights", np.unique(s.weight).round(2))
        """),
        md(r"""
        Each sample has an image, a target (1 = cell interior, 0 = membrane) and a weight map.
        Membranes are the minority class, so eq. 2's $w_c$ gives each membrane pixel the weight
        #cell pixels / #membrane pixels: both classes then pull equally on the loss, and the
        thin membranes — which decide whether two cells are separated — are not ignored.
        """),
        code("""
        fig, axes = plt.subplots(1, 3, figsize=(8, 2.9))
        for ax, (im, title, cmap) in zip(axes, [(s.image, "image", "gray"),
                                                (s.target, "target: 1 = cell", "gray"),
                                                (s.weight, "weight map w(x)", "viridis")]):
            shown = ax.imshow(im, cmap=cmap); ax.set_title(title); ax.axis("off")
        fig.colorbar(shown, ax=axes[2], fraction=0.046)
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        ## The network and the training tiles

        Depth 3 makes valid input sizes $\equiv 4 \pmod 8$ and output = input - 88 (notebook 4).
        `TileSampler` draws a random image and position, cuts the input tile (mirroring where it
        leaves the image), deforms it with the label and weights (notebook 6) and returns the
        label and weights of the central output square.
        """),
        code("""
        model = mu.UNet(base_channels=16, depth=3, seed=0)            # dropout 0.5, as in the paper
        TILE = model.valid_input_size(180)                            # for the model's own depth, 3
        OUT = model.output_size(TILE)
        print(f"{sum(p.size for p in model.parameters()):,} parameters; tile {TILE} -> {OUT}")
        sampler = TileSampler(train, TILE, OUT, np.random.default_rng(0), augment=True)
        x, target, weight = sampler.sample()
        print("one example:", x.shape, target.shape, weight.shape)
        """),
        code("""
        m = (TILE - OUT) // 2
        fig, axes = plt.subplots(1, 3, figsize=(8, 2.9))
        axes[0].imshow(x[0], cmap="gray")
        axes[0].add_patch(plt.Rectangle((m - 0.5, m - 0.5), OUT, OUT, fill=False, ec="yellow", lw=1.5))
        axes[0].set_title(f"input tile {TILE}x{TILE}")
        axes[1].imshow(target, cmap="gray"); axes[1].set_title(f"target {OUT}x{OUT}")
        axes[2].imshow(weight, cmap="viridis"); axes[2].set_title("weights")
        for ax in axes: ax.axis("off")
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        ## The training loop

        Each step: forward, the weighted loss of eq. 1, backward (notebook 1), one SGD update,
        reset the gradients: the loop of `minunet.train` without its checkpoints and logs,
        400 steps at about 0.1 s each. Each tile is **standardised** (zero mean, unit variance)
        after augmentation — the gray-value changes work on intensities in [0, 1] — and
        `predict_probabilities` below standardises each image the same way: with no
        normalisation layers in the network, a centred input keeps the first layers
        well-behaved, and training and prediction must see inputs on the same scale.
        """),
        code("""
        optimizer = mu.optim.SGD(model.parameters(), lr=0.003, momentum=0.99)
        losses, start = [], time.perf_counter()
        for step in range(1, 401):
            x, target, weight = sampler.batch(1)                      # (1, 1, 180, 180), (1, 92, 92) x 2
            x = standardize(x)
            logits = model(mu.Tensor(x))                              # (1, 2, 92, 92)
            loss = F.weighted_cross_entropy(logits, mu.Tensor(target), mu.Tensor(weight))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if step % 100 == 0:
                print(f"step {step}: mean loss of the last 100 steps {np.mean(losses[-100:]):.3f}, "
                      f"{time.perf_counter() - start:.0f} s")
        """),
        code("""
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.plot(losses, lw=0.6, alpha=0.4, label="loss of one tile")
        ax.plot(np.arange(19, len(losses)), np.convolve(losses, np.ones(20) / 20, "valid"), label="running mean of 20")
        ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("weighted cross-entropy (eq. 1)")
        ax.legend(); ax.grid(alpha=0.3, which="both")
        plt.show()
        """),
        md(r"""
        The loss of a single tile is noisy (each tile is a different random, deformed piece of a
        different image); the momentum of 0.99 averages the gradients of the last ~100 steps.

        ## Predicting the validation images

        `predict_probabilities` standardises an image, cuts it into tiles with mirrored context
        (`predict_overlap_tile`, notebook 7), runs the network in `no_grad` mode and returns the
        softmax probabilities. `model.eval()` switches dropout off.
        """),
        code("""
        model.eval()
        probs = [predict_probabilities(model, v.image, TILE, "cpu")[1] for v in val]   # P(cell)
        fig, axes = plt.subplots(len(val), 4, figsize=(9, 2.4 * len(val)))
        for row, (v, prob) in zip(axes, zip(val, probs)):
            for ax, (im, title, cmap) in zip(row, [(v.image, "image", "gray"), (v.target, "truth", "gray"),
                                                   (prob, "P(cell)", "magma"), (prob > 0.5, "P > 0.5", "gray")]):
                ax.imshow(im, cmap=cmap); ax.set_title(title, fontsize=8); ax.axis("off")
        plt.tight_layout(); plt.show()
        """),
        md(r"""
        The tiles of `predict_probabilities` start at 0, 92 and 100 — not multiples of 8 — so,
        as notebook 7 showed for an untrained network, they do not exactly reproduce one pass
        over the whole mirror-padded image. For the trained network the difference is small:
        """),
        code("""
        from minunet.data import mirror_pad
        image = standardize(val[0].image)
        m = (TILE - OUT) // 2
        side = model.valid_input_size(192 + 2 * m)
        padded = mirror_pad(image, ((m, side - 192 - m), (m, side - 192 - m)))[None, None]
        with mu.no_grad():
            logits = model(mu.Tensor(padded)).numpy()[0, :, :192, :192].astype(np.float64)
        whole = np.exp(logits[1]) / np.exp(logits).sum(axis=0)
        print("max |P(cell) from tiles - P(cell) from one pass| =", np.abs(probs[0] - whole).max())
        """),
        md(r"""
        ## How to measure a segmentation: pixel, Rand and warping error

        The ISBI 2012 challenge (Section 4) ranked submissions by three errors, each computed for
        the best of the thresholds 0.0, 0.1, ..., 0.9 of the probability map:

        * **pixel error** — 1 - F1 score of the cell pixels: how many pixels are wrong, no matter
          where.
        * **Rand error** — 1 - Rand F-score: take two pixels of the truth's cells; are they in
          the same cell in the truth? in the prediction? It counts pairs of pixels on which the
          two segmentations disagree, so it punishes what matters for neuron tracing — two cells
          **merged** through a gap in a membrane, or one cell **split** by a spurious membrane —
          much more than a membrane drawn one pixel too thick.
        * **warping error** (Jain et al. 2010) — the truth is deformed toward the prediction by
          flipping only pixels whose flip does not change the topology (no object split, merged,
          created or removed); the pixels that still disagree are topological errors.
        * **IoU** — intersection over union of the cell pixels (not an ISBI metric; a common
          summary).

        Three hand-made predictions for a truth of three cells show the difference: a membrane
        shifted by one pixel, a 4-pixel gap in a membrane (a merge), a spurious membrane (a split).
        """),
        code("""
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
        """),
        code("""
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
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
        plt.show()
        """),
        md(r"""
        The shifted membrane has the most wrong pixels but is topologically perfect: no
        warping error, and a small Rand error (a column of pixels changed cells). The merge has
        only 8 wrong pixels, the smallest pixel error — and by far the largest Rand error,
        because two whole cells are now one: every pair of pixels across them disagrees. The
        warping error marks exactly the pixels (red) that would have to change to undo the
        topological mistake. That is why the challenge ranked by Rand and warping error
        rather than by pixel error.

        ## The trained network's numbers

        `evaluate_all` applies the challenge's protocol (each error at its best threshold; IoU at
        0.5) to each validation image:
        """),
        code("""
        results = [evaluate_all(prob, v.target > 0) for prob, v in zip(probs, val)]
        for k, r in enumerate(results):
            print(f"validation image {k}: " + ", ".join(f"{key} {value:.4f}" for key, value in r.items()))
        print("mean:               " + ", ".join(f"{key} {np.mean([r[key] for r in results]):.4f}" for key in results[0]))
        """),
        md(r"""
        A network trained for under a minute already gets most pixels right; its Rand error shows
        that some membranes still have gaps, each merging two cells. Training longer, with a
        wider and deeper network, closes them.

        ## The full run: the command line

        `python -m minunet.train` does all of the above with a larger network (16 base channels,
        depth 4, 300 -> 116 tiles), checkpoints, a log and plots, on the GPU when CuPy sees one:

        ```bash
        python -m minunet.train --out runs/em                 # synthetic EM data, ~5 min on 2 CPU cores
        python -m minunet.train --synthetic cells --out runs/cells   # touching cells, eq. 2's border weights
        python -m minunet.train --data DIR --out runs/mine    # your images/ and labels/
        python -m minunet.predict --checkpoint runs/em/checkpoint.npz big_image.tif --out preds/
        python -m minunet.evaluate --pred preds/ --truth DIR/labels
        ```

        It writes `checkpoint.npz`, `log.csv`, `metrics.json` (these four metrics and the loss),
        `loss.png` and `prediction.png` into `--out`; `--base-channels 64` gives the paper's
        network.

        ## What to take away

        * The paper's recipe — one large tile per step, momentum 0.99, the weighted loss, He
          initialisation, heavy augmentation — is a short loop over library pieces.
        * Prediction is overlap-tile with mirrored context, in `no_grad` mode, dropout off.
        * Pixel error counts wrong pixels; Rand and warping error count wrong *topology* —
          merges and splits — which is what a segmentation of touching cells is for.
        """),
    ]


# =================================================================================================
def execute(nb, timeout: int = 600):
    """Run a notebook in a fresh python3 kernel with notebooks/ as the working directory."""
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            coalesce_streams=True,  # one stdout block per cell, however it was flushed
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return nb


def build(name: str) -> float:
    """Write, execute and save notebooks/<name>.ipynb; returns the execution time in seconds."""
    nb = nbformat.v4.new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    start = time.perf_counter()
    execute(nb)
    seconds = time.perf_counter() - start
    nb.metadata["language_info"] = {"name": "python"}  # drop the kernel's exact version
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    print(f"{path.name}: executed in {seconds:.1f} s, {path.stat().st_size / 1024:.0f} KB")
    return seconds


def main(argv: list[str]) -> int:
    names = argv or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        print(f"unknown notebook(s) {unknown}; known: {list(NOTEBOOKS)}", file=sys.stderr)
        return 2
    for name in names:
        build(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
