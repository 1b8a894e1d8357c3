"""The NumPy reference implementation of every U-Net op: the oracle.

Every function here is plain, vectorized NumPy whose heavy lifting is one BLAS matrix multiply
(``@``), so it is both the definition the CUDA kernels are checked against and a usable CPU
backend. The reference is dtype-generic: give it float64 and it computes in float64, which is how
the finite-difference gradient checks (tests/test_gradcheck.py) verify it.

Shapes and weight layouts follow PyTorch: activations (N, C, H, W), conv weights (Co, Ci, kH, kW),
transposed-conv weights (Ci, Co, 2, 2). The interface is described in docs/backends.md.

The trick used by the 3x3 convolution ("full-width im2col")
----------------------------------------------------------
A valid 3x3 convolution reads, for output pixel (i, j), the input pixels (i+ky, j+kx). Flatten each
input channel to a row of length H*W: pixel (i+ky, j+kx) sits at flat index (i*W + j) + (ky*W + kx).
So if we compute outputs on the *full-width* grid p = i*W + j for j in [0, W) (instead of [0, W-2)),
the input needed by the tap (ky, kx) is one contiguous slice ``flat[ky*W+kx : ky*W+kx + Ho*W]``:
the convolution is nine GEMMs ``w[:, :, ky, kx] (Co, Ci) @ slice (Ci, Ho*W)`` summed, and BLAS
reads each slice in place (no im2col copy: copying dominated the time on a 2-core CPU). The two
extra columns per row (j = W-2, W-1) wrap around into the next row; they are computed and thrown
away (a 2/W overhead).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .allocator import keep_freed_memory

xp = np  # the array module of this backend
device = "cpu"
keep_freed_memory()  # reuse freed activation buffers instead of page-faulting fresh ones


# ----------------------------------------------------------------------------------------------
# 3x3 valid convolution
# ----------------------------------------------------------------------------------------------
def _flat_padded(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H*W + 2): each channel flattened, plus 2 zeros so the last tap's
    slice of the full-width grid (which reaches index Ho*W - 1 + 2*W + 2 = H*W + 1) stays in bounds."""
    n, c, h, w = x.shape
    flat = np.zeros((n, c, h * w + 2), dtype=x.dtype)
    flat[:, :, : h * w] = x.reshape(n, c, h * w)
    return flat


def _taps(w: np.ndarray) -> np.ndarray:
    """(Co, Ci, 3, 3) -> (3, 3, Co, Ci) contiguous: one (Co, Ci) matrix per tap, ready for BLAS."""
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _im2col3x3(x: np.ndarray) -> np.ndarray:
    """(N, Ci, H, W) -> cols (Ci*9, N*Ho*W), rows ordered (ci, ky, kx) like w.reshape(Co, Ci*9)."""
    n, ci, h, w = x.shape
    length = (h - 2) * w  # the full-width output grid of one image
    flat = _flat_padded(x)
    s_n, s_c, s_p = flat.strides
    # view[n, c, ky, kx, p] = flat[n, c, ky*W + kx + p]  -- no copy yet
    view = as_strided(flat, shape=(n, ci, 3, 3, length), strides=(s_n, s_c, w * s_p, s_p, s_p),
                      writeable=False)
    # the one copy: bring (ci, ky, kx) to the rows and (n, p) to the columns
    return view.transpose(1, 2, 3, 0, 4).reshape(ci * 9, n * length)


# When to build the im2col matrix (9*Ci, N*L) and do one GEMM with K = 9*Ci instead of tap-wise
# GEMMs: with few input channels (each tap's GEMM has K = Ci, too little work) or when the
# matrix is small (deep layers: small images, many channels; the copy is cheap and one big GEMM
# beats nine small ones). The byte limits were measured on a 2-core x86 VM (bench/results/).
_IM2COL_MAX_CHANNELS = 8
_IM2COL_FORWARD_BYTES = 8 << 20
_IM2COL_BACKWARD_BYTES = 3 << 20


def _cols_bytes(x: np.ndarray) -> int:
    n, ci, h, w = x.shape
    return 9 * ci * n * (h - 2) * w * x.itemsize


def conv3x3_forward(x, w, b=None):
    """y[n,co,i,j] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[n,ci,i+ky,j+kx]  (no padding).

    Nine GEMMs, one per tap (ky, kx): ``w[:, :, ky, kx] (Co, Ci) @ flat[:, off:off+L]`` where the
    right operand is a strided *view* of the flattened input (BLAS takes it without a copy),
    accumulated on the full-width grid. For few input channels: im2col + one GEMM."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    ho, wo = h - 2, wd - 2
    length = ho * wd
    if ci < _IM2COL_MAX_CHANNELS or _cols_bytes(x) <= _IM2COL_FORWARD_BYTES:
        y_full = (w.reshape(co, ci * 9) @ _im2col3x3(x)).reshape(co, n, ho, wd).transpose(1, 0, 2, 3)
    else:
        flat, taps = _flat_padded(x), _taps(w)
        y_full = np.zeros((n, co, length), dtype=x.dtype)
        tmp = np.empty_like(y_full)
        for ky in range(3):          # 9 taps, each a whole-image GEMM: no per-pixel loop
            for kx in range(3):
                off = ky * wd + kx
                np.matmul(taps[ky, kx], flat[:, :, off:off + length], out=tmp)
                y_full += tmp
        y_full = y_full.reshape(n, co, ho, wd)
    y = np.ascontiguousarray(y_full[:, :, :, :wo])
    if b is not None:
        y += b.reshape(1, co, 1, 1)
    return y


def conv3x3_backward(x, w, gy, with_bias=True):
    """Gradients of the valid 3x3 convolution, on the full-width grid, one kernel row at a time.

    With g = gy on the full-width grid (zeros in the 2 wrap columns, so they contribute nothing),
    the three taps (ky, 0..2) of one kernel row differ only by a shift of 1 pixel. So:

    - gw[:, :, ky, kx] = sum_p g[co, p] * flat[ci, p + ky*W + kx]. Stacking g shifted right by
      kx = 0, 1, 2 into G3 (3*Co, L+2) turns the three taps of row ky into ONE GEMM,
      ``G3 @ flat[:, ky*W : ky*W+L+2]^T`` with M = 3*Co - a better shape for BLAS than nine
      thin GEMMs (measured 1.1-2.6x faster for gw here).
    - gx is the transpose of the forward: ``w[:, :, ky, :]^T (3*Ci, Co) @ g`` gives the three
      taps' contributions, each added back into the flattened input at its offset ("col2im").
    """
    if _cols_bytes(x) <= _IM2COL_BACKWARD_BYTES:
        return _conv3x3_backward_im2col(x, w, gy, with_bias)
    n, ci, h, wd = x.shape
    co = w.shape[0]
    ho, wo = h - 2, wd - 2
    length = ho * wd
    flat = _flat_padded(x)
    g3 = np.zeros((n, 3, co, ho, wd + 1), dtype=gy.dtype)     # g shifted by kx, see above
    for kx in range(3):
        g3.reshape(n, 3, co, -1)[:, kx, :, kx:kx + length].reshape(n, co, ho, wd)[..., :wo] = gy
    g3 = g3.reshape(n, 3 * co, -1)[:, :, : length + 2]
    g = g3[:, :co, :length]                                   # the unshifted copy
    rows_t = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(3, 3 * ci, co)  # (ky, kx*Ci, Co)
    gw = np.zeros((3, co, ci, 3), dtype=x.dtype)              # (ky, co, ci, kx) while summing
    gflat = np.zeros((n, ci, h * wd + 2), dtype=x.dtype)
    for ky in range(3):
        window = flat[:, :, ky * wd: ky * wd + length + 2]     # (N, Ci, L+2), a view
        part = np.matmul(g3, window.transpose(0, 2, 1)).sum(axis=0)   # (3*Co, Ci)
        gw[ky] = part.reshape(3, co, ci).transpose(1, 2, 0)
        contrib = np.matmul(rows_t[ky], g)                    # (N, 3*Ci, L)
        for kx in range(3):
            off = ky * wd + kx
            gflat[:, :, off:off + length] += contrib[:, kx * ci:(kx + 1) * ci]
    gx = gflat[:, :, : h * wd].reshape(n, ci, h, wd)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, np.ascontiguousarray(gw.transpose(1, 2, 0, 3)), gb


def _conv3x3_backward_im2col(x, w, gy, with_bias):
    """The same gradients with an explicit im2col matrix: gw = g @ cols^T and
    gcols = W^T @ g, then each tap's rows of gcols added back at its offset (col2im)."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    ho, wo = h - 2, wd - 2
    length = ho * wd
    g = np.zeros((co, n, ho, wd), dtype=gy.dtype)
    g[:, :, :, :wo] = gy.transpose(1, 0, 2, 3)
    g = g.reshape(co, n * length)
    gw = (g @ _im2col3x3(x).T).reshape(w.shape)
    gcols = (w.reshape(co, ci * 9).T @ g).reshape(ci, 3, 3, n, length)
    gflat = np.zeros((n, ci, h * wd + 2), dtype=x.dtype)
    for ky in range(3):
        for kx in range(3):
            off = ky * wd + kx
            gflat[:, :, off:off + length] += gcols[:, ky, kx].transpose(1, 0, 2)
    gx = gflat[:, :, : h * wd].reshape(n, ci, h, wd)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, gw, gb


# ----------------------------------------------------------------------------------------------
# 2x2 max-pooling, stride 2 (floor: odd last row/column dropped, as PyTorch)
# ----------------------------------------------------------------------------------------------
def _corners(x: np.ndarray) -> list[np.ndarray]:
    """The four strided views x[..., dy::2, dx::2] in the order (0,0), (0,1), (1,0), (1,1),
    each cut to (H//2, W//2): pixel k of every 2x2 window, for all windows at once."""
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    return [x[:, :, dy: 2 * ho: 2, dx: 2 * wo: 2] for dy in (0, 1) for dx in (0, 1)]


def max_pool2x2_forward(x):
    """(y, argmax): y the window maxima, argmax = dy*2+dx of the first max, as uint8.

    A small tournament over the four window corners c0..c3 (all windows at once): the winner of
    (c0, c1), the winner of (c2, c3), then the final. Every comparison is a strict ``>``, so on
    ties the earlier corner in row-major order wins (the convention the kernel follows too).
    A NaN beats any number (as in PyTorch: a NaN in the input shows up in the output instead of
    vanishing) and the first NaN wins among NaNs: ``np.maximum`` already puts the NaN in y, and
    the rare windows whose maximum is NaN get their argmax fixed afterwards, which keeps the
    common case as fast as without NaN handling."""
    c0, c1, c2, c3 = _corners(x)
    top, top_idx = np.maximum(c0, c1), (c1 > c0).astype(np.uint8)
    bottom, bottom_idx = np.maximum(c2, c3), (c3 > c2).astype(np.uint8) + np.uint8(2)
    bottom_wins = bottom > top
    y = np.maximum(top, bottom)
    argmax = np.where(bottom_wins, bottom_idx, top_idx)
    nan = np.isnan(y)
    if nan.any():
        argmax[nan] = np.select([np.isnan(c[nan]) for c in (c0, c1, c2)], [0, 1, 2], 3)
    return y, argmax


def max_pool2x2_backward(gy, argmax, x_shape):
    """Route each output gradient to the input pixel that was the max; zero elsewhere (also in
    an odd last row/column, which the floor dropped)."""
    gx = np.zeros(x_shape, dtype=gy.dtype)
    for k, corner in enumerate(_corners(gx)):
        np.multiply(gy, argmax == k, out=corner)
    return gx


# ----------------------------------------------------------------------------------------------
# 2x2 stride-2 transposed convolution ("up-convolution", paper Section 2)
# ----------------------------------------------------------------------------------------------
def conv_transpose2x2_forward(x, w, b=None):
    """y[n,co,2i+a,2j+b] = bias[co] + sum_ci x[n,ci,i,j] * w[ci,co,a,b]: every input pixel paints
    its own 2x2 output block, so the op is one GEMM (Co*4, Ci) @ (Ci, N*H*W) and a reshuffle."""
    n, ci, h, wd = x.shape
    co = w.shape[1]
    x2 = x.transpose(1, 0, 2, 3).reshape(ci, n * h * wd)
    y = (w.reshape(ci, co * 4).T @ x2).reshape(co, 2, 2, n, h, wd)
    y = y.transpose(3, 0, 4, 1, 5, 2).reshape(n, co, 2 * h, 2 * wd)  # (n, co, i, a, j, b)
    if b is not None:
        y += b.reshape(1, co, 1, 1)
    return y


def conv_transpose2x2_backward(x, w, gy, with_bias=True):
    n, ci, h, wd = x.shape
    co = w.shape[1]
    g = gy.reshape(n, co, h, 2, wd, 2).transpose(1, 3, 5, 0, 2, 4).reshape(co * 4, n * h * wd)
    x2 = x.transpose(1, 0, 2, 3).reshape(ci, n * h * wd)
    w2 = w.reshape(ci, co * 4)
    gx = (w2 @ g).reshape(ci, n, h, wd).transpose(1, 0, 2, 3)
    gw = (x2 @ g.T).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return np.ascontiguousarray(gx), gw, gb


# ----------------------------------------------------------------------------------------------
# crop-and-concatenate (the skip connections of Fig. 1, grey arrows)
# ----------------------------------------------------------------------------------------------
def crop_offsets(skip_shape, up_shape) -> tuple[int, int]:
    """The center-crop offset (dH//2, dW//2) of the skip map relative to the upsampled map."""
    return (skip_shape[2] - up_shape[2]) // 2, (skip_shape[3] - up_shape[3]) // 2


def crop_concat_forward(skip, up):
    """[center crop of skip to up's H, W ; up] concatenated on the channel axis."""
    n, cs = skip.shape[:2]
    hu, wu = up.shape[2:]
    oy, ox = crop_offsets(skip.shape, up.shape)
    y = np.empty((n, cs + up.shape[1], hu, wu), dtype=up.dtype)
    y[:, :cs] = skip[:, :, oy:oy + hu, ox:ox + wu]
    y[:, cs:] = up
    return y


def crop_concat_backward(gy, skip_shape, up_shape):
    cs = skip_shape[1]
    hu, wu = up_shape[2:]
    oy, ox = crop_offsets(skip_shape, up_shape)
    gskip = np.zeros(skip_shape, dtype=gy.dtype)
    gskip[:, :, oy:oy + hu, ox:ox + wu] = gy[:, :cs]
    return gskip, np.ascontiguousarray(gy[:, cs:])


# ----------------------------------------------------------------------------------------------
# 1x1 convolution (the final classifier layer)
# ----------------------------------------------------------------------------------------------
def conv1x1_forward(x, w, b=None):
    n, ci, h, wd = x.shape
    co = w.shape[0]
    y = np.matmul(w.reshape(co, ci), x.reshape(n, ci, h * wd)).reshape(n, co, h, wd)
    if b is not None:
        y += b.reshape(1, co, 1, 1)
    return y


def conv1x1_backward(x, w, gy, with_bias=True):
    n, ci, h, wd = x.shape
    co = w.shape[0]
    g = gy.reshape(n, co, h * wd)
    gx = np.matmul(w.reshape(co, ci).T, g).reshape(x.shape)
    gw = np.einsum("nop,nip->oi", g, x.reshape(n, ci, h * wd), optimize=True).reshape(w.shape)
    gb = gy.sum(axis=(0, 2, 3)) if with_bias else None
    return gx, gw, gb


# ----------------------------------------------------------------------------------------------
# ReLU and dropout
# ----------------------------------------------------------------------------------------------
def relu_forward(x):
    return np.maximum(x, 0)


def relu_backward(y, gy):
    """gy where the output was positive, else 0. (A multiply by the boolean mask is ~6x faster
    here than np.where, which takes a slow path for mixed scalar/array arguments.)"""
    gx = np.empty_like(gy)
    np.multiply(gy, y > 0, out=gx)
    return gx


def dropout_uniform(size: int, seed: int) -> np.ndarray:
    """u in [0, 1) for flat indices 0..size-1: the counter-based lowbias32 hash of docs/backends.md,
    bit-identical to the CUDA kernel (all arithmetic is uint32, wrapping modulo 2^32)."""
    h = np.arange(size, dtype=np.uint32)
    h += np.uint32((int(seed) * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def dropout_forward(x, p, seed):
    """Inverted dropout: keep where u >= p, scale kept values by 1/(1-p) so E[y] = x."""
    mask = (dropout_uniform(x.size, seed) >= np.float32(p)).reshape(x.shape).astype(np.uint8)
    scale = x.dtype.type(1.0 / (1.0 - p))
    return x * mask * scale, mask


def dropout_backward(gy, mask, p):
    return gy * mask * gy.dtype.type(1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------
# weighted softmax cross-entropy (paper eq. 1), fused with its gradient
# ----------------------------------------------------------------------------------------------
def weighted_cross_entropy_forward(logits, target, weight=None):
    """loss = mean_x w(x) * -log softmax(logits)[target(x)], and d loss / d logits.

    Stable: subtracting the per-pixel channel max keeps exp() <= 1, so logits of magnitude 100
    neither overflow nor lose the answer (log-sum-exp)."""
    n, c, h, w = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    sum_e = e.sum(axis=1)                                     # (N, H, W), >= 1
    idx = target.astype(np.intp)[:, None]
    z_target = np.take_along_axis(z, idx, axis=1)[:, 0]
    nll = np.log(sum_e) - z_target                            # -log p_target(x)
    wmap = np.ones((n, h, w), logits.dtype) if weight is None else weight.astype(logits.dtype)
    npix = n * h * w
    loss = np.asarray((wmap * nll).sum() / npix, dtype=logits.dtype)
    grad = e / sum_e[:, None]                                 # softmax
    np.put_along_axis(grad, idx, np.take_along_axis(grad, idx, axis=1) - 1, axis=1)
    grad *= (wmap / npix)[:, None]
    return loss, grad


# ----------------------------------------------------------------------------------------------
# SGD with momentum (PyTorch's formulation), in place
# ----------------------------------------------------------------------------------------------
def sgd_step(param, grad, velocity, lr, momentum):
    velocity *= velocity.dtype.type(momentum)
    velocity += grad
    param -= param.dtype.type(lr) * velocity
