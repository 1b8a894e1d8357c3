"""Every notebook in notebooks/ runs top to bottom without an error.

Each committed .ipynb is read, executed in memory in a fresh "python3" kernel (ipykernel provides
it) with notebooks/ as the working directory, and never written back: the committed outputs stay
as they are. A cell that raises fails the test with the cell's source and traceback (nbclient's
CellExecutionError). The notebooks must run on a CPU without a GPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' installs nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
MAX_SIZE_KB = 1024


EXPECTED = ["01_tensors_and_autograd", "02_conv3x3", "03_pooling_and_upconv", "04_the_unet",
            "05_weighted_loss", "06_elastic_deformation", "07_overlap_tile", "08_train_and_evaluate"]


def test_notebooks_exist():
    """The eight notebooks, each linked from the README."""
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
    missing = [name for name in EXPECTED if f"(notebooks/{name}.ipynb)" not in readme]
    assert not missing, f"README does not link {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_with_outputs(path: Path):
    """Readers on the web see the committed outputs: every code cell was executed, in order,
    and the file stays small (compressed PNG figures, no huge printed arrays)."""
    nb = nbformat.read(path, as_version=4)
    counts = [cell.get("execution_count") for cell in nb.cells if cell.cell_type == "code"]
    assert counts and None not in counts, f"{path.name} has unexecuted code cells; run it and save"
    assert counts == sorted(counts), f"{path.name} was not run top to bottom (counts {counts})"
    size_kb = path.stat().st_size / 1024
    assert size_kb < MAX_SIZE_KB, f"{path.name} is {size_kb:.0f} KB; shrink its figures"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    committed = path.read_bytes()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for cell in nb.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: a cell produced an error output: {errors[0].get('ename')}"
    assert path.read_bytes() == committed, f"{path.name} was modified by the test"
