"""Argument checks shared by the ops: every op checks its tensors before any backend sees them,
so a mistake raises one clear error naming both shapes instead of reaching a kernel."""
from __future__ import annotations

from ..tensor import Tensor


def check_tensor(name: str, value, ndim: int | None = None, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a minunet.Tensor, got {type(value).__name__}; "
                        f"wrap it with mu.Tensor(...)")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
    if floating and value.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    return value


def check_same(op: str, tensors: dict) -> None:
    """All given tensors (None entries skipped) on one device and of one dtype."""
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device!r}" for k, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}; use .to(device)")
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{k} {t.dtype}" for k, t in present.items())
        raise TypeError(f"{op}: all tensors must have one dtype, got {what}")


def check_conv(op: str, x, w, b, kernel: tuple[int, int], transposed: bool = False) -> None:
    """x (N,Ci,H,W), w (Co,Ci,kH,kW) or, transposed, (Ci,Co,kH,kW), b (Co,) or None."""
    check_tensor("x", x, 4)
    check_tensor("w", w, 4)
    if b is not None:
        check_tensor("b", b, 1)
    check_same(op, {"x": x, "w": w, "b": b})
    ci_w = w.shape[0] if transposed else w.shape[1]
    co = w.shape[1] if transposed else w.shape[0]
    layout = "(Ci, Co, 2, 2)" if transposed else f"(Co, Ci, {kernel[0]}, {kernel[1]})"
    if tuple(w.shape[2:]) != kernel:
        raise ValueError(f"{op}: w must have layout {layout}, got shape {w.shape}")
    if ci_w != x.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels (shape {x.shape}) but w expects "
                         f"{ci_w} (shape {w.shape})")
    if b is not None and b.shape != (co,):
        raise ValueError(f"{op}: b must have shape ({co},) for w of shape {w.shape}, got {b.shape}")
