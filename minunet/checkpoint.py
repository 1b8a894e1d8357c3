"""Checkpoints: everything needed to rebuild a model, or to resume training exactly.

A checkpoint is one ``.npz`` file: the parameters (``param/<name>``), the optimizer's momentum
buffers (``opt/velocity.<i>``), and a JSON ``meta`` record (the UNet configuration, the iteration,
the random-number states, the training arguments). It is written *atomically*: to a temporary
file in the same folder, flushed to disk, then renamed over the old one, so a crash or Ctrl-C in
the middle of a save never leaves a half-written checkpoint behind - the last good one survives.
Only a process killed outright (``kill -9``, power loss) in the middle of a save can leave its
temporary file ``NAME.XXXXXXXX.tmp`` behind; :func:`remove_stale_temporary_files` clears those.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .nn import UNet
from .optim import SGD

FORMAT = "minunet-checkpoint-1"


def atomic_write(path, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporary_files(path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` of ``path`` left when its process was
    killed mid-write (``NAME.<random>.tmp`` beside it); returns what was removed. Call it when
    no other process writes ``path``, i.e. at the start of the run that owns it."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f"{glob.escape(path.name)}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def save_checkpoint(path, model: UNet, optimizer: SGD | None = None, meta: dict | None = None) -> Path:
    """Write ``model`` (and ``optimizer``, ``meta``) to ``path`` atomically; returns the path."""
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    record = {"format": FORMAT, "config": model.config, "dropout_seed": model.dropout_seed,
              "forward_count": model.forward_count, **(meta or {})}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        record["optimizer"] = {"lr": opt_state.pop("lr"), "momentum": opt_state.pop("momentum")}
        arrays.update({f"opt/{k}": v for k, v in opt_state.items()})
    arrays["meta"] = np.array(json.dumps(record))
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> dict:
    """Read a checkpoint: {"meta": dict, "params": {name: array}, "optimizer": dict or None}.

    Raises ValueError with one line naming the file when it is missing, corrupt, or not a
    minunet checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; pass the checkpoint.npz that "
                         f"minunet.train wrote into its --out folder")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        meta = json.loads(str(data.pop("meta")))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not a minunet checkpoint "
                         f"({type(exc).__name__}); use a checkpoint.npz written by minunet.train") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"checkpoint {path} is not a minunet checkpoint (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}); use a "
                         f"checkpoint.npz written by minunet.train")
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    optimizer = None
    if "optimizer" in meta:
        optimizer = dict(meta["optimizer"])
        optimizer.update({k[len("opt/"):]: v for k, v in data.items() if k.startswith("opt/")})
    return {"meta": meta, "params": params, "optimizer": optimizer}


def model_from_checkpoint(ckpt: dict, device: str = "cpu") -> UNet:
    """Rebuild the UNet a checkpoint describes and load its parameters onto ``device``."""
    cfg = ckpt["meta"]["config"]
    try:
        model = UNet(**cfg, seed=0)
    except TypeError as exc:
        raise ValueError(f"checkpoint describes an unknown model configuration {cfg}: {exc}") from None
    model.load_state_dict(ckpt["params"])
    object.__setattr__(model, "dropout_seed", int(ckpt["meta"].get("dropout_seed", 0)))
    object.__setattr__(model, "forward_count", int(ckpt["meta"].get("forward_count", 0)))
    return model.to(device)
