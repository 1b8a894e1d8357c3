# %% [markdown]
# # 1. Tensors and autograd: where gradients come from
#
# Training a U-Net means minimising the paper's energy (eq. 1, a weighted cross-entropy) with
# stochastic gradient descent (Section 3). SGD needs the derivative of that one number with
# respect to each of the network's 31 million weights, at every step. Computing them one
# by one with finite differences would take 31 million forward passes per step. **Reverse-mode
# automatic differentiation** (backpropagation) gets all of them from one backward pass that
# costs about as much as two forward passes.
#
# This notebook builds a tiny graph out of a few operations, draws it, differentiates it by
# hand with the chain rule, and checks that `.backward()` gives the same numbers. Then it
# shows the two rules that surprise people (gradients *accumulate*; `no_grad` records
# nothing) and how the library checks every gradient against finite differences.
#
# Everything runs on the `"cpu"` device. Its operations are NumPy arrays in and out; inside,
# the convolutions, pooling and ReLU of float32 tensors run fast Numba kernels, and every other
# case (float64 tensors, operations without a kernel) runs the NumPy reference,
# `minunet.backends.reference`: the oracle the kernels are tested against.

# %%
from nbsetup import F, mu, np, plt  # the shared setup: imports, figures, printing, seeds

# %% [markdown]
# ## A Tensor is an array plus three things
#
# `mu.Tensor` wraps an array (NumPy on `cpu`, CuPy on `cuda`) and adds what autograd needs:
#
# * `requires_grad` — do we want d(loss)/d(this tensor)?
# * `grad` — where `.backward()` puts that derivative;
# * `creator` — the operation that produced this tensor (`None` for a *leaf*, a tensor we
#   made ourselves). Following `creator.inputs` from the loss back to the leaves walks
#   the whole computation: that chain of links *is* the graph.
#
# Floating-point data becomes `float32`, the precision the CUDA kernels compute in.

# %%
x = mu.Tensor([1.0, -2.0, 3.0], requires_grad=True)
w = mu.Tensor([0.5, 1.5, -0.5], requires_grad=True)
print(x, x.numpy(), "creator:", x.creator)

# %% [markdown]
# ## A tiny graph
#
# $h = x \cdot w$ (elementwise), $s = h + x$, $r = \mathrm{relu}(s)$, $q = r \cdot r$,
# $L = \sum_i q_i$. Every operation runs its forward at once (the numbers exist right
# away) and, because an input requires a gradient, records itself as the result's
# `creator`.

# %%
h = x * w
s = h + x
r = F.relu(s)
q = r * r
loss = q.sum()
for name, t in [("h", h), ("s", s), ("r", r), ("q", q), ("loss", loss)]:
    print(f"{name:5s} = {t.numpy()!s:22s} creator: {type(t.creator).__name__}")


# %% [markdown]
# ### Drawing the graph
#
# We walk from `loss` through `creator.inputs` down to the leaves. Tensors are boxes;
# the operation that made a tensor is written under its name. `x` is used twice (in
# `h` and in `s`) and `r` twice (both inputs of `r * r`): the graph is a DAG, not a tree.

# %%
def graph_of(root, names):
    """Nodes {id: (label, depth from the root)} and edges (input id, output id)."""
    nodes, edges = {}, set()
    def visit(t, depth):
        if id(t) in nodes and nodes[id(t)][1] >= depth:
            return
        op = "" if t.creator is None else "\n= " + type(t.creator).__name__.strip("_")
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


# %%
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

# %% [markdown]
# ## Backward by hand
#
# The chain rule, applied from the loss down, one operation at a time. Each operation only
# needs to know its own local derivative:
#
# | op | forward | backward (given $\bar y = \partial L/\partial y$) |
# |---|---|---|
# | sum | $L = \sum_i q_i$ | $\bar q_i = \bar L = 1$ |
# | mul | $q = r \cdot r$ | $\bar r = \bar q \cdot r + \bar q \cdot r$ (r is *both* inputs: the two contributions add) |
# | relu | $r = \max(s, 0)$ | $\bar s = \bar r \cdot [s > 0]$ |
# | add | $s = h + x$ | $\bar h = \bar s$, $\bar x \mathrel{+}= \bar s$ |
# | mul | $h = x \cdot w$ | $\bar x \mathrel{+}= \bar h \cdot w$, $\bar w = \bar h \cdot x$ |
#
# $x$ feeds two operations, so its gradient is the **sum** of both contributions:
# $\bar x = \bar s\,(1 + w)$.

# %%
xn, wn = x.numpy(), w.numpy()
sn = xn * wn + xn
grad_r = 2 * np.maximum(sn, 0)        # d(sum r^2)/dr
grad_s = grad_r * (sn > 0)            # relu passes the gradient only where s > 0
grad_x_hand = grad_s * (1 + wn)       # through h = x*w (times w) and s = h + x (times 1)
grad_w_hand = grad_s * xn
print("s      =", sn, " (s < 0 in the middle: relu blocks that element's gradient)")
print("dL/dx by hand =", grad_x_hand)
print("dL/dw by hand =", grad_w_hand)

# %% [markdown]
# ## ... and by `.backward()`
#
# `loss.backward()` visits the graph in reverse topological order — every consumer of a
# tensor before the tensor itself — so a tensor's gradient is complete (summed over all its
# uses) before it is passed further down. Leaves collect theirs in `.grad`.

# %%
loss.backward()
print("dL/dx autograd =", x.grad.numpy())
print("dL/dw autograd =", w.grad.numpy())
print("max |hand - autograd| =",
      max(np.abs(x.grad.numpy() - grad_x_hand).max(), np.abs(w.grad.numpy() - grad_w_hand).max()))

# %% [markdown]
# After the backward pass the graph's saved values are freed (activations are the bulk of
# a U-Net's memory), so a second `.backward()` on the same loss is an error, not a silent
# wrong answer:

# %%
try:
    loss.backward()
except RuntimeError as error:
    print("RuntimeError:", error)


# %% [markdown]
# ## Gradients accumulate
#
# A new forward pass and another backward **add** to `.grad` instead of overwriting it (the
# same rule as in PyTorch). This is what makes "a tensor used twice gets the sum of both
# gradients" work at the leaves too, and it lets you sum gradients over several tiles
# before one optimizer step. The price: reset the gradients between steps
# (`optimizer.zero_grad()`, or `x.grad = None`).

# %%
def forward(x, w):
    r = F.relu(x * w + x)
    return (r * r).sum()

forward(x, w).backward()            # second time: x.grad now holds twice the gradient
print("after 2 backward passes:", x.grad.numpy(), " = 2 x", grad_x_hand)
x.grad = w.grad = None              # what optimizer.zero_grad() does
forward(x, w).backward()
print("after reset + 1 pass:  ", x.grad.numpy())

# %% [markdown]
# ## `no_grad`: inference records nothing
#
# When we only want predictions (validation, the overlap-tile prediction of Fig. 2), the
# graph is wasted memory. Inside `with mu.no_grad():` operations compute their values but
# record no creator, so every intermediate array can be freed as soon as it is used.

# %%
with mu.no_grad():
    y = forward(x, w)
print(y, " creator:", y.creator, " value:", y.item())
try:
    y.backward()
except ValueError as error:
    print("ValueError:", error)

# %% [markdown]
# ## Checking every gradient: finite differences
#
# The hand derivation above does not scale to a 3x3 convolution. Instead the library checks
# every operation's backward against the definition of the derivative, the central
# difference $\frac{f(a + \varepsilon) - f(a - \varepsilon)}{2\varepsilon}$, one input
# element at a time. `minunet.gradcheck.gradcheck` reduces a tensor output to a scalar
# with a fixed random projection, $\sum_k f(a)_k\, p_k$, so that one scalar checks every
# output element's contribution at once.
#
# It must run in **float64**: in float32 the rounding error of $f(a \pm \varepsilon)$,
# divided by $2\varepsilon$, is as large as the quantity we want to check (shown below).
#
# Here is the valid 3x3 convolution of Fig. 1 (blue arrows), on a batch of 2 images with 3
# channels, 4 output channels:

# %%
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

# %% [markdown]
# `gradcheck` does the same for every differentiable input and raises (naming the input
# and the worst element) if any element misses the tolerance $|\text{analytic} -
# \text{numeric}| \le 10^{-7} + 10^{-5}\,|\text{numeric}|$. It returns the largest error per input:

# %%
errors = gradcheck(F.conv3x3, [xa, wa, ba])
print({["x", "w", "b"][i]: f"{e:.1e}" for i, e in errors.items()})
errors = gradcheck(lambda t: F.relu(t), [rng.standard_normal((1, 2, 4, 4))])
print("relu:", errors)

# %% [markdown]
# And why float64: the same finite difference computed in float32 (with the best step for
# float32, $\varepsilon = 10^{-3}$) is wrong in the third digit, so it could not tell a
# correct backward from a slightly wrong one.

# %%
wa32 = wa.astype(np.float32)
def projected32():
    return float((F.conv3x3(mu.Tensor(xa), mu.Tensor(wa32), mu.Tensor(ba)).numpy() * p).sum(dtype=np.float32))
numeric32 = numerical_grad(projected32, wa32, eps=1e-3)
print("float32 finite differences: max error", np.abs(W.grad.numpy() - numeric32).max())
print("float64 finite differences: max error", np.abs(W.grad.numpy() - numeric).max())

# %% [markdown]
# ## What to take away
#
# * A tensor remembers its `creator`; the chain of creators is the graph, built as the
#   forward runs.
# * `.backward()` applies each operation's local derivative from the loss down, summing
#   over every use of a tensor; the results land in the leaves' `.grad` and *accumulate*.
# * `mu.no_grad()` turns recording off for inference.
# * Every operation of the U-Net (`tests/test_gradcheck.py`) is checked this way in float64
#   on the NumPy reference, and the CUDA kernels are then checked against that reference.
#
# Next: [02_conv3x3.ipynb](02_conv3x3.ipynb) follows the network's main operation, the
# valid 3x3 convolution, from its definition to a CUDA kernel (the CUDA track: 02, 03, 05's
# kernel, 09). Reading for the paper only? Skip to
# [04_the_unet.ipynb](04_the_unet.ipynb), which assembles these operations into the
# network of Fig. 1 (the paper track: 04 to 08).
