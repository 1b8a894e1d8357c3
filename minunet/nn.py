"""Modules: parameters grouped with the forward that uses them, and the U-Net of the paper.

A :class:`Module` registers every :class:`Parameter` and sub-module assigned to it, in
assignment order, so ``named_parameters()`` lists them in forward order (for each conv ``weight``
then ``bias``; down blocks, bottom block, up blocks, classifier), which is also the order of the
``state_dict`` and of a checkpoint.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np

from . import functional as F
from .devices import resolve_device, to_device_array, to_host
from .ops.elementwise import DeviceSeed
from .tensor import Tensor


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates (``requires_grad=True``)."""

    def __init__(self, data, device: str = "cpu"):
        super().__init__(data, device=device, requires_grad=True)


class Module:
    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, p in self._params.items():
            yield prefix + name, p
        for name, m in self._modules.items():
            yield from m.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for m in self._modules.values():
            yield from m.modules()

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, device: str) -> "Module":
        """Move every parameter (in place: optimizers keep their references) to ``device``."""
        device = resolve_device(device)
        for _, p in self.named_parameters():
            if p.device != device:
                p.data = to_device_array(p.data, device)
                p.device = device
                p.grad = None
        return self

    @property
    def device(self) -> str:
        params = self.parameters()
        return params[0].device if params else "cpu"

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameter name -> host (NumPy) copy, in forward order: saves with ``np.savez``."""
        return {name: np.array(to_host(p.data), copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the parameters; names and shapes must match exactly."""
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit this {type(self).__name__}: missing "
                             f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                             f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; was it saved from "
                             f"a model with other base_channels/depth/classes?")
        for name, p in own.items():
            value = np.asarray(state[name])
            if tuple(value.shape) != p.shape:
                raise ValueError(f"state dict entry {name!r} has shape {tuple(value.shape)} but the "
                                 f"model expects {p.shape}; it comes from another architecture")
            p.data = to_device_array(value.astype(p.dtype), p.device)


def _gaussian(rng: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    """The paper's initialisation (Section 3): Gaussian with std sqrt(2/N), N = incoming nodes."""
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


class Conv3x3(Module):
    def __init__(self, cin: int, cout: int, rng: np.random.Generator):
        super().__init__()
        self.weight = Parameter(_gaussian(rng, (cout, cin, 3, 3), cin * 9))
        self.bias = Parameter(np.zeros(cout, np.float32))

    def forward(self, x, relu: bool = False):
        """The convolution, and with ``relu`` the ReLU after it fused into the same op."""
        return F.conv3x3(x, self.weight, self.bias, relu=relu)


class UpConv2x2(Module):
    """The "up-convolution": a 2x2 stride-2 transposed conv that halves the channels."""

    def __init__(self, cin: int, cout: int, rng: np.random.Generator):
        super().__init__()
        # each output pixel receives exactly one tap from each of the cin input channels
        self.weight = Parameter(_gaussian(rng, (cin, cout, 2, 2), cin))
        self.bias = Parameter(np.zeros(cout, np.float32))

    def forward(self, x):
        return F.conv_transpose2x2(x, self.weight, self.bias)


class Conv1x1(Module):
    def __init__(self, cin: int, cout: int, rng: np.random.Generator):
        super().__init__()
        self.weight = Parameter(_gaussian(rng, (cout, cin, 1, 1), cin))
        self.bias = Parameter(np.zeros(cout, np.float32))

    def forward(self, x):
        return F.conv1x1(x, self.weight, self.bias)


# DoubleConv runs each "3x3 conv, ReLU" pair of the paper as one fused op (F.conv3x3(..., relu=True)):
# the same numbers as conv then F.relu, with one pass less over the activations each way.
# Set False to run them as two ops (tests compare the two).
FUSE_RELU = True


class DoubleConv(Module):
    """Two 3x3 valid convolutions, each followed by a ReLU: one step of either path."""

    def __init__(self, cin: int, cout: int, rng: np.random.Generator):
        super().__init__()
        self.conv1 = Conv3x3(cin, cout, rng)
        self.conv2 = Conv3x3(cout, cout, rng)

    def forward(self, x):
        if FUSE_RELU:   # conv + ReLU as one op: the ReLU in the conv's store, its mask in the backward's load
            return self.conv2(self.conv1(x, relu=True), relu=True)
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class UpBlock(Module):
    """Up-conv, crop-and-concatenate with the skip connection, then two 3x3 convs."""

    def __init__(self, cin: int, cout: int, rng: np.random.Generator):
        super().__init__()
        self.up = UpConv2x2(cin, cout, rng)
        self.convs = DoubleConv(2 * cout, cout, rng)

    def forward(self, x, skip):
        return self.convs(F.crop_concat(skip, self.up(x)))


class _SizeMethod:
    """Lets ``UNet.output_size(572)`` (depth 4, the paper) and ``model.output_size(572)`` (the
    model's own depth) both work."""

    def __init__(self, func):
        self.func = func

    def __get__(self, instance, owner):
        depth = instance.depth if instance is not None else None

        def bound(size: int, depth_: int | None = None):
            return self.func(size, depth_ if depth_ is not None else (depth or 4))

        bound.__doc__ = self.func.__doc__
        return bound


def _trace_size(size: int, depth: int) -> int | None:
    """Follow one spatial size through the network; None where it stops being valid."""
    s = size
    for _ in range(depth):           # contracting path: two convs (-4), then pool (must be even)
        s -= 4
        if s < 2 or s % 2:
            return None
        s //= 2
    s -= 4                           # bottom block
    if s < 1:
        return None
    for _ in range(depth):           # expansive path: up-conv (x2), two convs (-4)
        s = 2 * s - 4
        if s < 1:
            return None
    return s


class UNet(Module):
    """The U-Net of Ronneberger et al. (2015), Fig. 1.

    Contracting path: ``depth`` steps of two unpadded 3x3 convs + ReLU, then 2x2 max-pooling,
    doubling the channels from ``base_channels`` (64 in the paper); a bottom block; the expansive
    path: 2x2 up-conv halving the channels, concatenation with the center-cropped feature map of
    the contracting path, two 3x3 convs + ReLU; a final 1x1 conv to ``num_classes``. Dropout
    ("at the end of the contracting path", Section 3.1) follows the last down block and the bottom
    block, as in the authors' released Caffe model. With the defaults: 572x572 in, 388x388 out,
    31,030,658 parameters.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64,
                 depth: int = 4, dropout: float = 0.5, seed: int = 0, device: str = "cpu"):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                                 ("base_channels", base_channels, 1), ("depth", depth, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"UNet: {name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
        object.__setattr__(self, "config", dict(in_channels=in_channels, num_classes=num_classes,
                                                base_channels=base_channels, depth=depth,
                                                dropout=dropout))
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "dropout_p", dropout)
        object.__setattr__(self, "dropout_seed", seed & 0xFFFFFFFF)
        object.__setattr__(self, "forward_count", 0)  # advances the dropout masks each step
        rng = np.random.default_rng(seed)
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        cin = in_channels
        for i in range(depth):
            setattr(self, f"down{i + 1}", DoubleConv(cin, widths[i], rng))
            cin = widths[i]
        self.bottom = DoubleConv(widths[depth - 1], widths[depth], rng)
        for i in reversed(range(depth)):
            setattr(self, f"up{i + 1}", UpBlock(widths[i + 1], widths[i], rng))
        self.classifier = Conv1x1(widths[0], num_classes, rng)
        if device != "cpu":
            self.to(device)

    @_SizeMethod
    def output_size(input_size: int, depth: int = 4) -> int:
        """Output side length for an input side length (raises ValueError if not valid)."""
        out = _trace_size(int(input_size), depth)
        if out is None:
            raise ValueError(_invalid_size_message(int(input_size), depth))
        return out

    @_SizeMethod
    def valid_input_size(n: int, depth: int = 4) -> int:
        """The smallest valid input side length >= n."""
        s = max(int(n), 1)
        while _trace_size(s, depth) is None:
            s += 1
        return s

    def layer_table(self, input_size: int) -> list[dict]:
        """Fig. 1 as a table: one dict per layer of ``forward``, in order, for a square input tile
        of side ``input_size`` (a ValueError naming the nearest valid sizes if it is not valid).

        Keys: ``name`` (the module's parameter prefix, such as ``"down1.conv1"`` or
        ``"up2.up"``; ``"down1.pool"``, ``"down4.dropout"``, ``"up1.concat"`` for the steps without
        parameters), ``op`` (``"conv 3x3 + ReLU"``, ``"max-pool 2x2"``, ``"dropout"``,
        ``"up-conv 2x2"``, ``"crop + concat"``, ``"conv 1x1"``), ``level`` (of the layer's output:
        0 = full resolution, ``depth`` = the bottom of the U), ``in_channels``, ``out_channels``,
        ``in_size`` and ``out_size`` (side lengths), ``parameters`` (the layer's weights and
        biases), and ``skip_size`` and ``crop_offset`` for crop + concat (the skip connection's
        side length and the offset of its centre crop; None for the other layers).

        The sizes follow Section 2's rules: a valid 3x3 convolution loses 2 pixels, a pooling
        halves, an up-convolution doubles, the skip map is centre-cropped to the up-convolved map;
        channels and parameter counts are read from the model's own weights. With the defaults and
        572: 23 convolutional layers, output 388, 31,030,658 parameters.
        """
        from .ops.crop_concat import crop_offsets

        size = int(input_size)
        self.output_size(size)  # raises a ValueError naming the nearest valid sizes
        rows: list[dict] = []

        def add(name, op, level, cin, cout, s_in, s_out, module=None, skip_size=None, crop_offset=None):
            params = sum(p.size for p in module.parameters()) if module is not None else 0
            rows.append(dict(name=name, op=op, level=level, in_channels=int(cin),
                             out_channels=int(cout), in_size=s_in, out_size=s_out,
                             parameters=int(params), skip_size=skip_size, crop_offset=crop_offset))

        def double_conv(prefix, block, level, s):
            for conv_name in ("conv1", "conv2"):
                conv = getattr(block, conv_name)
                cout, cin = conv.weight.shape[:2]
                add(f"{prefix}.{conv_name}", "conv 3x3 + ReLU", level, cin, cout, s, s - 2, conv)
                s -= 2
            return s, cout

        s, skips = size, []
        for i in range(self.depth):                          # contracting path
            s, c = double_conv(f"down{i + 1}", getattr(self, f"down{i + 1}"), i, s)
            if i == self.depth - 1 and self.dropout_p > 0:
                add(f"down{i + 1}.dropout", "dropout", i, c, c, s, s)
            skips.append((s, c))
            add(f"down{i + 1}.pool", "max-pool 2x2", i + 1, c, c, s, s // 2)
            s //= 2
        s, c = double_conv("bottom", self.bottom, self.depth, s)
        if self.dropout_p > 0:
            add("bottom.dropout", "dropout", self.depth, c, c, s, s)
        for i in reversed(range(self.depth)):                # expansive path
            block = getattr(self, f"up{i + 1}")
            cin, cout = block.up.weight.shape[:2]            # (Ci, Co, 2, 2)
            add(f"up{i + 1}.up", "up-conv 2x2", i, cin, cout, s, 2 * s, block.up)
            s *= 2
            skip_size, skip_channels = skips[i]
            offset = crop_offsets((0, 0, skip_size, skip_size), (0, 0, s, s))[0]
            add(f"up{i + 1}.concat", "crop + concat", i, cout, skip_channels + cout, s, s,
                skip_size=skip_size, crop_offset=offset)
            s, c = double_conv(f"up{i + 1}.convs", block.convs, i, s)
        cout, cin = self.classifier.weight.shape[:2]
        add("classifier", "conv 1x1", 0, cin, cout, s, s, self.classifier)
        return rows

    DROPOUT_LAYERS = 2      # dropout after the last down block (layer 0) and the bottom block (1)

    def layer_dropout_seed(self, layer: int, forward_count: int | None = None) -> int:
        """The dropout seed of ``layer`` in the training forward number ``forward_count`` (default:
        the next one): one seed per (forward call, layer), so masks differ between steps but are
        reproducible."""
        count = self.forward_count if forward_count is None else forward_count
        return (self.dropout_seed * 1_000_003 + count * 16 + layer) & 0xFFFFFFFF

    def write_dropout_seeds(self, seeds) -> None:
        """Write the next forward's seed of each dropout layer into ``seeds`` (a uint32 array of
        DROPOUT_LAYERS on the model's device; one host-to-device copy)."""
        values = np.array([self.layer_dropout_seed(layer) for layer in range(self.DROPOUT_LAYERS)],
                          dtype=np.uint32)
        if isinstance(seeds, np.ndarray):
            seeds[:] = values
        else:
            seeds.set(values)

    @contextlib.contextmanager
    def dropout_seeds_from(self, seeds):
        """Inside this block the dropout kernels read layer l's seed from the device array
        ``seeds[l]`` when they run (``write_dropout_seeds`` fills it), instead of receiving it as a
        launch argument: what a captured, replayed step needs (minunet.step_graph). The masks
        are the same as with the seeds passed directly."""
        object.__setattr__(self, "_seed_buffer", seeds)
        try:
            yield
        finally:
            object.__setattr__(self, "_seed_buffer", None)

    def _dropout(self, x, layer: int):
        seeds = getattr(self, "_seed_buffer", None)
        seed = self.layer_dropout_seed(layer) if seeds is None else DeviceSeed(seeds, layer)
        return F.dropout(x, self.dropout_p, self.training, seed=seed)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = getattr(x, "shape", None)
            raise ValueError(f"UNet expects a Tensor of shape (N, C, H, W), got {shape}")
        if x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"UNet was built for {self.config['in_channels']} input channel(s), "
                             f"got input of shape {x.shape}")
        for side in x.shape[2:]:
            if _trace_size(side, self.depth) is None:
                raise ValueError(_invalid_size_message(side, self.depth))
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"down{i + 1}")(x)
            if i == self.depth - 1 and self.dropout_p > 0:
                x = self._dropout(x, 0)
            skips.append(x)
            x = F.max_pool2x2(x)
        x = self.bottom(x)
        if self.dropout_p > 0:
            x = self._dropout(x, 1)
        for i in reversed(range(self.depth)):
            x = getattr(self, f"up{i + 1}")(x, skips[i])
        if self.training:
            object.__setattr__(self, "forward_count", self.forward_count + 1)
        return self.classifier(x)


def _invalid_size_message(size: int, depth: int) -> str:
    below = size - 1
    while below > 0 and _trace_size(below, depth) is None:
        below -= 1
    above = UNet.valid_input_size(size, depth)
    near = f"{below} or {above}" if below > 0 else f"{above}"
    step = 2 ** depth
    return (f"input size {size} is not valid for a depth-{depth} U-Net (every pooled size must be "
            f"even and every size positive); the nearest valid sizes are {near} (valid sizes step "
            f"by {step}); mirror-pad or crop the input, or use UNet.valid_input_size({size})")
