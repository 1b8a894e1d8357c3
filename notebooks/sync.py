"""Rebuild the step-through notebooks from their sources, or check that they agree.

    python notebooks/sync.py                   # every notebook
    python notebooks/sync.py 02_conv3x3        # only those named (file names without extension)
    python notebooks/sync.py --check           # list the .ipynb whose cells differ from their .py

Each notebook is a pair: ``NN_name.py``, the source (jupytext's percent format: ``# %%`` starts a
code cell, ``# %% [markdown]`` a markdown cell; edit it in any editor, or in JupyterLab, which saves
both files when jupytext is installed), and ``NN_name.ipynb``, the same cells with their outputs,
committed so that readers see the figures on the web. A rebuild turns the ``.py`` into cells with
jupytext, runs them top to bottom in a fresh ``python3`` kernel (nbclient) with ``notebooks/`` as
the working directory, and writes the ``.ipynb``. Outputs are reproducible: fixed seeds (the
notebooks' own and nbsetup.py's), cell ids ``cell-00``, ``cell-01``, ..., no timing or kernel
version in the metadata, so a rebuild only changes what really changed.

A rebuild refuses to overwrite an ``.ipynb`` that is newer than its ``.py`` and has other cells: that
is an edit made in Jupyter without jupytext, which the rebuild would silently lose. Copy it into the
source first with ``jupytext --sync notebooks/NAME.ipynb`` (or pass ``--force`` to discard it).

Exit status: 0 on success (``--check``: every pair agrees), 1 when ``--check`` finds a pair that
disagrees, 2 for bad arguments or a refused rebuild.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from jupytext.config import load_jupytext_config

HERE = Path(__file__).resolve().parent
CONFIG = load_jupytext_config(str(HERE / "notebook.ipynb"))  # notebooks/jupytext.toml
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
CELL_TIMEOUT_S = 600


def names(folder: Path = HERE) -> list[str]:
    """The notebooks of a folder: every ``NN_name.py`` source (nbsetup.py and this file are not)."""
    return sorted(p.stem for p in folder.glob("[0-9][0-9]_*.py"))


def source_notebook(py: Path):
    """The notebook a ``.py`` source describes: its cells, no outputs."""
    return jupytext.read(py, fmt="py:percent", config=CONFIG)


def cells(nb) -> list[tuple[str, str]]:
    """What must agree between a pair: each cell's type and source, in order."""
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def disagreement(py: Path, ipynb: Path) -> str | None:
    """None when the ``.ipynb`` has exactly the cells of its ``.py``; else where they first differ."""
    if not ipynb.exists():
        return f"{ipynb.name} does not exist"
    want, got = cells(source_notebook(py)), cells(nbformat.read(ipynb, as_version=4))
    for k, (w, g) in enumerate(zip(want, got)):
        if w != g:
            first = next((line for line in w[1].splitlines() if line.strip()), "")
            return f"cell {k} differs (the .py has a {w[0]} cell starting {first[:60]!r})"
    if len(want) != len(got):
        return f"the .py has {len(want)} cells, the .ipynb {len(got)}"
    return None


def execute(nb, timeout: int = CELL_TIMEOUT_S):
    """Run a notebook in a fresh python3 kernel with notebooks/ as the working directory."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   coalesce_streams=True,  # one stdout block per cell, however it was flushed
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def build(name: str, folder: Path = HERE) -> None:
    """Write ``<name>.ipynb`` from ``<name>.py`` and execute it in place."""
    py, ipynb = folder / f"{name}.py", folder / f"{name}.ipynb"
    nb = source_notebook(py)
    nb.metadata = nbformat.from_dict(METADATA)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
        cell.metadata = nbformat.NotebookNode()
    start = time.perf_counter()
    execute(nb)
    seconds = time.perf_counter() - start
    nb.metadata = nbformat.from_dict(METADATA)  # drop what the kernel added (its exact version)
    nbformat.write(nb, ipynb)
    print(f"{ipynb.name}: executed in {seconds:.1f} s, {ipynb.stat().st_size / 1024:.0f} KB")


def edited_in_jupyter(name: str, folder: Path = HERE) -> str | None:
    """Why rebuilding ``name`` would lose an edit of its .ipynb; None when it would not."""
    py, ipynb = folder / f"{name}.py", folder / f"{name}.ipynb"
    if not ipynb.exists() or ipynb.stat().st_mtime <= py.stat().st_mtime:
        return None
    differs = disagreement(py, ipynb)
    return None if differs is None else f"{ipynb.name} is newer than {py.name} and {differs}"


def main(argv: list[str] | None = None, folder: Path = HERE) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to rebuild or check (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="only report the notebooks whose .ipynb cells differ from their .py")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even an .ipynb edited after its .py (the edit is lost)")
    args = parser.parse_args(argv)
    known = names(folder)
    chosen = [n.removesuffix(".ipynb").removesuffix(".py") for n in args.names] or known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        print(f"sync.py: unknown notebook(s) {', '.join(unknown)}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    if args.check:
        bad = {n: disagreement(folder / f"{n}.py", folder / f"{n}.ipynb") for n in chosen}
        bad = {n: why for n, why in bad.items() if why}
        for n, why in bad.items():
            print(f"{n}: {why}; rebuild it with `python notebooks/sync.py {n}`")
        if not bad:
            print(f"{len(chosen)} notebook(s): every .ipynb has the cells of its .py")
        return 1 if bad else 0
    if not args.force:
        for n in chosen:
            why = edited_in_jupyter(n, folder)
            if why:
                print(f"sync.py: {why}: an edit made in Jupyter without jupytext? Keep it with "
                      f"`jupytext --sync notebooks/{n}.ipynb` (it updates the .py), or discard it "
                      "with --force", file=sys.stderr)
                return 2
    for n in chosen:
        build(n, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
