"""Reverse-mode automatic differentiation: the graph of Functions behind every Tensor.

Each op is a :class:`Function` subclass with a ``forward`` (arrays in, array out) and a
``backward`` (the gradient of the output in, one gradient per input out), side by side. Calling
``SomeOp.apply(tensor, ...)`` runs the forward and, if any input requires a gradient, records
the Function object as the output tensor's ``creator``: that is the graph.

``tensor.backward()`` walks the graph once in reverse topological order (every consumer of a
tensor before the tensor itself), so each gradient is complete - summed over all its uses -
before it is pushed further down. Leaf tensors with ``requires_grad=True`` accumulate into
``.grad``, as in PyTorch.
"""
from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Inside this block no graph is recorded (inference: less memory, no backward)."""
    previous = grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


class Function:
    """One node of the graph. Subclasses implement ``forward`` and ``backward`` on raw arrays.

    ``forward(self, *arrays, **params)`` may keep what the backward needs on ``self`` (the
    "context"). ``backward(self, grad_out)`` returns a tuple with one entry per positional input:
    an array, or ``None`` for an input that needs no gradient (or is not a tensor).
    """

    def __init__(self, device: str):
        self.device = device
        self.inputs: tuple = ()
        self.needs_input_grad: tuple[bool, ...] = ()

    @classmethod
    def apply(cls, *inputs, **params):
        from .tensor import Tensor

        tensors = [t for t in inputs if isinstance(t, Tensor)]
        device = tensors[0].device
        for t in tensors[1:]:
            if t.device != device:
                raise ValueError(
                    f"{cls.__name__}: inputs are on different devices ({device!r} and {t.device!r}); "
                    f"move them with .to(device) first")
        fn = cls(device)
        fn.needs_input_grad = tuple(isinstance(t, Tensor) and t.requires_grad for t in inputs)
        raw = [t.data if isinstance(t, Tensor) else t for t in inputs]
        out = fn.forward(*raw, **params)
        record = grad_enabled() and any(fn.needs_input_grad)
        result = Tensor._from_array(out, device, requires_grad=record)
        if record:
            fn.inputs = inputs
            result.creator = fn
        return result

    def forward(self, *arrays, **params):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def backward(self, grad_out):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement backward")


def _topological_order(root) -> list:
    """Tensors reachable from ``root`` through creators, each after all tensors that use it.

    Iterative depth-first search (a U-Net graph is deep enough to hit Python's recursion limit
    in a recursive version)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, children_done = stack.pop()
        if children_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor.creator is not None:
            for parent in tensor.creator.inputs:
                if getattr(parent, "requires_grad", False) and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()  # root first
    return order


def backward(root, grad=None) -> None:
    """Fill ``.grad`` of every leaf that requires a gradient, from d root / d leaf."""
    from .tensor import Tensor

    if not root.requires_grad:
        raise ValueError("backward() on a tensor that does not require grad: create the inputs or "
                         "parameters with requires_grad=True, and do not call it inside no_grad()")
    xp = root.xp
    if grad is None:
        if root.data.size != 1:
            raise ValueError(f"backward() without a gradient needs a scalar, got shape {root.shape}; "
                             f"pass grad= of that shape")
        grad_array = xp.ones_like(root.data)
    else:
        grad_array = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=root.data.dtype)
        if tuple(grad_array.shape) != root.shape:
            raise ValueError(f"backward(grad): grad has shape {tuple(grad_array.shape)} but the "
                             f"tensor has shape {root.shape}")
    grads = {id(root): grad_array}
    for tensor in _topological_order(root):
        g = grads.pop(id(tensor), None)
        if g is None:
            continue
        fn = tensor.creator
        if fn is None:  # a leaf: accumulate, as PyTorch does
            if tensor.grad is None:
                tensor.grad = Tensor._from_array(g, tensor.device)
            else:
                tensor.grad.data = _add_gradients(tensor.device, tensor.grad.data, g)
            continue
        if not fn.inputs:
            raise RuntimeError("backward through a graph that was already freed; run the forward again")
        input_grads = fn.backward(g)
        for parent, pg in zip(fn.inputs, input_grads):
            if pg is None or not getattr(parent, "requires_grad", False):
                continue
            if id(parent) in grads:
                grads[id(parent)] = _add_gradients(parent.device, grads[id(parent)], pg)
            else:
                grads[id(parent)] = pg
        # Free what the forward saved (activations, masks) as soon as it has been used, so the
        # memory of a training step peaks in the forward pass; a second backward then raises.
        fn.__dict__ = {"device": fn.device, "inputs": (), "needs_input_grad": ()}


def _add_gradients(device: str, a, b):
    """a + b, the two gradients of one tensor: the device's ``grad_add`` (a kernel on cuda and
    emu, so a training step is launches only and minunet.step_graph can replay it; NumPy's + on
    cpu). Float32 addition rounds the same everywhere, so the sum is the one ``a + b`` gives."""
    from .backends import get_backend

    if a.shape != b.shape or a.dtype != b.dtype:
        return a + b
    return get_backend(device).grad_add(a, b)
