"""Find and read the CUDA C sources in the top-level ``kernels/`` folder.

The same ``.cu`` text is compiled by CuPy/NVRTC on a GPU (``device="cuda"``) and by the system C++
compiler against minunet's emulation header (``device="emu"``). In a source checkout the files sit
in ``<repo>/kernels``; an installed minunet carries them as the data package ``minunet.kernels``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def kernels_dir() -> Path:
    """The folder that holds ``*.cu``: the checkout's ``kernels/`` first, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "kernels"
    if checkout.is_dir() and any(checkout.glob("*.cu")):
        return checkout
    try:
        installed = Path(str(resources.files("minunet.kernels")))
    except ModuleNotFoundError:  # pragma: no cover - only in a broken install
        installed = None
    if installed is not None and installed.is_dir():
        return installed
    raise FileNotFoundError(
        "minunet cannot find its CUDA sources (kernels/*.cu); reinstall with `pip install -e .`"
    )


def kernel_files() -> list[Path]:
    """Every ``.cu`` file, sorted by name."""
    return sorted(kernels_dir().glob("*.cu"))


def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>.cu`` (``name`` with or without the suffix)."""
    stem = name[:-3] if name.endswith(".cu") else name
    path = kernels_dir() / f"{stem}.cu"
    if not path.is_file():
        known = ", ".join(p.stem for p in kernel_files())
        raise FileNotFoundError(f"no kernel file {path.name} in {path.parent}; known: {known}")
    return path.read_text()
