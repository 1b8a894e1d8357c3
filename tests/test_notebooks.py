"""The notebooks: each .ipynb has exactly the cells of its .py source, and runs top to bottom.

Each notebook is a pair, notebooks/NN_name.py (the source, jupytext's percent format) and
NN_name.ipynb (the same cells with their outputs, committed for reading on the web). A pair that
disagrees means an edit was not rebuilt (`python notebooks/sync.py NN_name`) or was made in
Jupyter without jupytext and is missing from the source.

Each committed .ipynb is read, executed in memory in a fresh "python3" kernel (ipykernel provides
it) with notebooks/ as the working directory, and never written back: the committed outputs stay
as they are. A cell that raises fails the test with the cell's source and traceback (nbclient's
CellExecutionError). The notebooks must run on a CPU without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' installs nbclient")
jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[dev]' installs jupytext")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell: generous, so that 08's training loop also finishes on a busy machine
MAX_SIZE_KB = 1024


EXPECTED = ["01_tensors_and_autograd", "02_conv3x3", "03_pooling_and_upconv", "04_the_unet",
            "05_weighted_loss", "06_elastic_deformation", "07_overlap_tile", "08_train_and_evaluate",
            "09_making_the_convolution_fast"]


def test_notebooks_exist():
    """The nine notebooks, each a .py source and its .ipynb, each linked from the README."""
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")) == EXPECTED
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


def cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


NEXT_LINK = re.compile(r"\[(\d\d_\w+)\.ipynb\]\(\1\.ipynb\)")


@pytest.mark.parametrize("name, following", list(zip(EXPECTED, EXPECTED[1:])))
def test_reading_path_links_each_notebook_to_the_next(name: str, following: str):
    """The reading path 01 -> 02 -> ...: a notebook's last cell says "Next:" and links the
    notebook that follows it (first), so a reader who finishes one never has to guess."""
    last = jupytext.read(NOTEBOOK_DIR / f"{name}.py", fmt="py:percent").cells[-1]
    assert last.cell_type == "markdown" and "Next:" in last.source, \
        f"{name}.py should end with a markdown cell 'Next: [...](...)'"
    after_next = last.source.split("Next:", 1)[1]
    links = NEXT_LINK.findall(after_next)
    assert links and links[0] == following, \
        f"{name}.py's last cell should link {following}.ipynb first after 'Next:', found {links}"


def test_readme_marks_the_paper_and_cuda_tracks():
    """The README names both reading tracks and every notebook on each exists."""
    readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
    for track in ("Paper track", "CUDA track"):
        line = next((ln for ln in readme.splitlines() if ln.startswith(f"**{track}")), None)
        assert line is not None, f"README's Notebooks section should have a line starting **{track}"
        numbers = re.findall(r"\b(\d\d)\b", line)
        assert numbers and all(any(n.startswith(k) for n in EXPECTED) for k in numbers), (track, numbers)


def test_nbsetup_ignores_a_folder_named_minunet_that_is_not_the_package(tmp_path):
    """A copied notebooks/ folder next to a directory called minunet (no __init__.py) must not
    put that directory first on sys.path: `import minunet` would find an empty namespace
    package. nbsetup adds the parent folder only when it holds minunet/__init__.py."""
    (tmp_path / "minunet").mkdir()                          # e.g. a clone's data folder
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "nbsetup.py").write_bytes((NOTEBOOK_DIR / "nbsetup.py").read_bytes())
    env = dict(os.environ, PYTHONPATH=str(NOTEBOOK_DIR.parent), MPLBACKEND="Agg")
    code = ("import sys, nbsetup; print(nbsetup.mu.UNet.__name__, "
            f"{str(tmp_path)!r} in sys.path, nbsetup.use_checkout())")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "notebooks", env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["UNet", "False", "False"]


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_agrees_with_its_source(name: str):
    """The committed .ipynb has the cells of its .py, in order: same types, same sources."""
    source = jupytext.read(NOTEBOOK_DIR / f"{name}.py", fmt="py:percent")
    committed = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    want, got = cells(source), cells(committed)
    differ = [k for k, (w, g) in enumerate(zip(want, got)) if w != g]
    assert len(want) == len(got) and not differ, (
        f"{name}.ipynb and {name}.py disagree ({len(got)} vs {len(want)} cells; first differing "
        f"cell {differ[:1]}): rebuild with `python notebooks/sync.py {name}`")
    assert sum(kind == "code" for kind, _ in want) > 3 and sum(kind == "markdown" for kind, _ in want) > 3
    assert want[1] == ("code", want[1][1]) and want[1][1].startswith("from nbsetup import"), \
        f"{name}.py: the first code cell should be the shared setup (from nbsetup import ...)"


def load_sync():
    spec = importlib.util.spec_from_file_location("notebook_sync", NOTEBOOK_DIR / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pair(tmp_path):
    """A copy of one notebook pair in a temporary folder: (folder, name), .ipynb older than .py."""
    name = "01_tensors_and_autograd"
    for suffix in (".py", ".ipynb"):
        (tmp_path / f"{name}{suffix}").write_bytes((NOTEBOOK_DIR / f"{name}{suffix}").read_bytes())
    os.utime(tmp_path / f"{name}.ipynb", (1_000_000_000, 1_000_000_000))
    return tmp_path, name


def edit_cell(path: Path, index: int, source: str) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.cells[index].source = source
    nbformat.write(nb, path)


def test_sync_check_reports_a_pair_that_disagrees(pair, capsys):
    """`sync.py --check` passes an agreeing pair and fails (exit 1, naming the notebook and the
    cell) once a cell of the .ipynb or of the .py changes."""
    sync = load_sync()
    folder, name = pair
    assert sync.main(["--check"], folder=folder) == 0
    edit_cell(folder / f"{name}.ipynb", 3, "x = 1  # edited in Jupyter")
    assert sync.main(["--check"], folder=folder) == 1
    assert f"{name}: cell 3 differs" in capsys.readouterr().out

    text = (NOTEBOOK_DIR / f"{name}.py").read_text()
    (folder / f"{name}.ipynb").write_bytes((NOTEBOOK_DIR / f"{name}.ipynb").read_bytes())
    (folder / f"{name}.py").write_text(text + "\n# %%\nprint('a new last cell')\n")
    assert sync.main(["--check", name], folder=folder) == 1
    assert "the .py has" in capsys.readouterr().out


def test_sync_refuses_to_overwrite_a_newer_edited_ipynb(pair, capsys):
    """A rebuild would lose an edit made to the .ipynb after its .py: refused with exit status 2
    and one line naming the fix, before anything runs; unknown names are refused too."""
    sync = load_sync()
    folder, name = pair
    edit_cell(folder / f"{name}.ipynb", 3, "x = 1  # edited in Jupyter")   # now newer than the .py
    before = (folder / f"{name}.ipynb").read_bytes()
    assert sync.main([name], folder=folder) == 2
    err = capsys.readouterr().err
    assert f"jupytext --sync notebooks/{name}.ipynb" in err and "--force" in err
    assert (folder / f"{name}.ipynb").read_bytes() == before
    assert sync.main(["no_such_notebook"], folder=folder) == 2
    assert "unknown notebook(s) no_such_notebook" in capsys.readouterr().err


def load_exercise_checks():
    spec = importlib.util.spec_from_file_location("exercise_check", NOTEBOOK_DIR / "exercises" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


EXERCISES = ["barrier", "tiled_conv1x1", "coalesced_pool", "scatter_gather", "bank_conflicts",
             "divergent_barrier"]


@pytest.mark.parametrize("exercise", EXERCISES)
def test_exercise_check_passes_the_solution_and_fails_the_starter(exercise: str):
    """Each CUDA exercise's check (run on the emulator) accepts its worked solution and rejects
    the starter the student begins from, saying why: so the check can fail, and it checks what
    the exercise is about (a race, redundant loads, uncoalesced loads, unwritten outputs, bank
    conflicts, a barrier some threads skip)."""
    checks = load_exercise_checks()
    solved = checks.check(exercise, checks.solution(exercise), quiet=True)
    assert solved.passed, str(solved)
    starter = checks.check(exercise, quiet=True)
    assert not starter.passed, f"the starter of {exercise} passes its own check:\n{starter}"
    why = {"barrier": "race", "tiled_conv1x1": "too many global loads",
           "coalesced_pool": "sectors per request", "scatter_gather": "never written",
           "bank_conflicts": "bank conflicts", "divergent_barrier": "waits at __syncthreads()"}
    assert why[exercise] in str(starter), str(starter)


def test_exercise_check_refuses_unknown_names():
    checks = load_exercise_checks()
    with pytest.raises(ValueError, match="unknown exercise 'nope'; the exercises are barrier"):
        checks.check("nope")


def test_every_exercise_has_a_starter_a_solution_and_a_check():
    checks = load_exercise_checks()
    assert sorted(checks.CHECKS) == sorted(EXERCISES)
    for name in EXERCISES:
        assert (NOTEBOOK_DIR / "exercises" / f"{name}.cu").is_file()
        assert checks.solution(name).is_file()
