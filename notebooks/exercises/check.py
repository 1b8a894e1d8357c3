"""Checks for the CUDA exercises of notebooks 02, 03 and 05: one call runs an exercise's kernel on
minunet's CUDA emulator (no GPU needed) and says what is still wrong.

    from exercises.check import check     # in a notebook (working directory notebooks/)
    check("barrier")                      # runs notebooks/exercises/barrier.cu
    check("barrier", "my_copy.cu")        # or any other file

Each exercise is a ``.cu`` file in this folder (the starter, which the student edits) with its
solution in ``solutions/``. A check compiles the file in the emulator's *checked* mode (every
shared-memory access race-checked, every index bounds-checked), runs it on several shapes that
cross tile and warp boundaries, compares the results with NumPy, and, where the exercise is
about speed, counts what a GPU profiler would (``minunet.emulator.profile``): sectors per global
load, wavefronts per shared load. It returns a ``Result`` (true when passed) and prints it.

tests/test_notebooks.py runs every check against its solution (it must pass) and its starter
(it must fail), so the exercises cannot rot.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minunet import emulator
from minunet.emulator import EmuModule
from minunet.emulator.errors import EmulatorError

HERE = Path(__file__).resolve().parent
SOLUTIONS = HERE / "solutions"


@dataclass
class Result:
    """What a check found: ``passed``, and one line per finding (problems or measurements)."""
    exercise: str
    passed: bool = True
    lines: list[str] = field(default_factory=list)

    def fail(self, line: str) -> None:
        self.passed = False
        self.lines.append(line)

    def note(self, line: str) -> None:
        self.lines.append(line)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = f"{self.exercise}: " + ("PASSED" if self.passed else "NOT YET")
        return "\n".join([head] + ["  " + line for line in self.lines])


def _compile(path: Path, kernel: str, result: Result, shuffle_seed: int = 0):
    try:
        module = EmuModule(path.read_text(), name=path.name, mode="checked", shuffle_seed=shuffle_seed)
        return module.get_function(kernel)
    except EmulatorError as error:
        result.fail(f"{path.name} does not compile or has no kernel {kernel}: {_short(error)}")
        return None


def _short(error: Exception, lines: int = 6) -> str:
    """The first lines of an emulator error: what, where, which threads."""
    text = str(error).strip().splitlines()
    return "\n    ".join(text[:lines]) + (" ..." if len(text) > lines else "")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ---- exercise 02.1: barrier ----------------------------------------------------------------------

def _channel_conv3x3_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, c, h, wd = x.shape
    y = np.zeros((n, h - 2, wd - 2))
    for ky in range(3):
        for kx in range(3):
            y += np.einsum("nchw,c->nhw", x[:, :, ky:ky + h - 2, kx:kx + wd - 2].astype(np.float64), w[:, ky, kx])
    return y


def check_barrier(path: Path, result: Result) -> None:
    rng = np.random.default_rng(19)
    for seed in (0, 1):                              # two thread orders
        fn = _compile(path, "channel_conv3x3", result, shuffle_seed=seed)
        if fn is None:
            return
        for n, c, h, wd in ((2, 3, 37, 21), (1, 1, 18, 18), (1, 5, 20, 35)):
            x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
            w = rng.standard_normal((c, 3, 3)).astype(np.float32)
            y = np.zeros((n, h - 2, wd - 2), np.float32)
            try:
                fn((_ceil(wd - 2, 16), _ceil(h - 2, 16), n), (16, 16, 1),
                   (x, w, y, np.int32(c), np.int32(h), np.int32(wd)))
            except EmulatorError as error:
                result.fail(f"x {x.shape}: the emulator stopped the launch:\n    {_short(error)}")
                result.note("hint: between two barriers, which threads write the shared tile and "
                            "which read it? A __syncthreads() orders them.")
                return
            want = _channel_conv3x3_reference(x, w)
            err = float(np.abs(y - want).max()) if np.isfinite(y).all() else float("inf")
            if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
                bad = int((~np.isclose(y, want, rtol=1e-4, atol=1e-4)).sum())
                result.fail(f"x {x.shape}: {bad} of {y.size} outputs wrong (max error {err:.3g}, "
                            f"{int(np.isnan(y).sum())} NaN: a read of shared memory nobody had written)")
                return
    result.note("no race under two thread orders; outputs equal NumPy's on 3 shapes "
                "(odd sizes, partial tiles, 1-5 channels)")


# ---- exercise 03.1: coalesced_pool ---------------------------------------------------------------

def _threads_per_output(source: str) -> int:
    found = re.search(r"^#define\s+THREADS_PER_OUTPUT\s+(\d+)", source, re.MULTILINE)
    return int(found.group(1)) if found else 1


def _launch_pool(fn, x: np.ndarray, per_output: int) -> np.ndarray:
    nc, h, wd = x.shape
    y = np.full((nc, h // 2, wd // 2), np.nan, np.float32)
    threads = nc * (h // 2) * (wd // 2) * per_output
    fn((_ceil(threads, 256), 1, 1), (256, 1, 1), (x, y, np.int32(nc), np.int32(h), np.int32(wd)))
    return y


def check_coalesced_pool(path: Path, result: Result) -> None:
    fn = _compile(path, "pool_max", result)
    if fn is None:
        return
    per_output = _threads_per_output(path.read_text())
    rng = np.random.default_rng(3)
    try:
        for shape in ((6, 9, 70), (3, 16, 64), (2, 7, 33), (1, 2, 2)):
            x = rng.standard_normal(shape).astype(np.float32)
            y = _launch_pool(fn, x, per_output)
            h, wd = shape[1] // 2 * 2, shape[2] // 2 * 2
            want = x[:, :h, :wd].reshape(shape[0], h // 2, 2, wd // 2, 2).max(axis=(2, 4))
            if not np.array_equal(y, want):
                bad = int((y != want).sum())
                result.fail(f"x {shape}: {bad} of {y.size} outputs differ from NumPy's 2x2 max "
                            f"(THREADS_PER_OUTPUT = {per_output}; NaN = never written)")
                return
        x = rng.standard_normal((4, 32, 128)).astype(np.float32)
        with emulator.profile(gpu="sm_90", sample_blocks=8) as report:
            _launch_pool(fn, x, per_output)
    except EmulatorError as error:
        result.fail(f"the emulator stopped the launch:\n    {_short(error)}")
        return
    sectors = report.rows[0].sectors_per_load
    result.note(f"outputs equal NumPy's on 4 shapes; global loads: {sectors:.2f} sectors per request "
                f"(32 lanes reading 32 consecutive floats need 4)")
    if sectors > 5.0:
        result.fail(f"loads are not coalesced: {sectors:.2f} sectors per request means the lanes of a "
                    "warp read floats that lie apart (every other float is 8)")


# ---- exercises 05.1 and 05.2: bank_conflicts, divergent_barrier (one tree, two checks) ------------

def _check_block_sum(path: Path, result: Result, count_conflicts: bool) -> None:
    fn = _compile(path, "block_sum", result)
    if fn is None:
        return
    rng = np.random.default_rng(5)
    try:
        for n in (1, 1000, 512 * 3 + 17, 4096):
            x = rng.standard_normal(n).astype(np.float32)
            blocks = _ceil(n, 512)
            partial = np.full(blocks, np.nan, np.float32)
            if n == 4096 and count_conflicts:
                with emulator.profile(gpu="sm_90", sample_blocks=8) as report:
                    fn((blocks, 1, 1), (256, 1, 1), (x, partial, np.int32(n)))
            else:
                fn((blocks, 1, 1), (256, 1, 1), (x, partial, np.int32(n)))
            want = np.add.reduceat(np.pad(x, (0, blocks * 512 - n)).astype(np.float64), np.arange(0, blocks * 512, 512))
            if not np.allclose(partial, want, rtol=1e-5, atol=1e-4):
                result.fail(f"n = {n}: block sums differ from NumPy's (max error "
                            f"{np.nanmax(np.abs(partial - want)):.3g}; NaN = never written)")
                return
    except EmulatorError as error:
        result.fail(f"the emulator stopped the launch:\n    {_short(error)}")
        if "barrier" in str(error) or "__syncthreads" in str(error):
            result.note("hint: __syncthreads() waits for every thread of the block; is there a "
                        "thread that never gets to it?")
        return
    if not count_conflicts:
        result.note("sums equal NumPy's for 4 lengths; every thread reaches every barrier")
        return
    row = report.rows[0]
    wavefronts = row.wavefronts_per_shared_load
    result.note(f"sums equal NumPy's for 4 lengths; shared loads: {wavefronts:.2f} wavefronts per "
                f"request, {row.bank_conflicts:.0f} extra wavefronts in all (1 per request = no bank conflicts)")
    if wavefronts > 1.05:
        result.fail(f"bank conflicts: the lanes of a warp ask a bank for several different words "
                    f"({wavefronts:.2f} wavefronts per shared load instead of 1)")


def check_bank_conflicts(path: Path, result: Result) -> None:
    _check_block_sum(path, result, count_conflicts=True)


def check_divergent_barrier(path: Path, result: Result) -> None:
    _check_block_sum(path, result, count_conflicts=False)


# ---- exercise 03.2: scatter_gather ---------------------------------------------------------------

def check_scatter_gather(path: Path, result: Result) -> None:
    fn = _compile(path, "pool_backward", result)
    if fn is None:
        return
    found = re.search(r"^#define\s+ONE_THREAD_PER_INPUT\s+(\d+)", path.read_text(), re.MULTILINE)
    per_input = bool(found and int(found.group(1)))
    rng = np.random.default_rng(7)
    try:
        for nc, h, w in ((3, 7, 9), (2, 16, 40), (1, 2, 3), (4, 33, 70)):
            ho, wo = h // 2, w // 2
            gy = rng.standard_normal((nc, ho, wo)).astype(np.float32)
            argmax = rng.integers(0, 4, (nc, ho, wo)).astype(np.uint8)
            gx = np.full((nc, h, w), np.nan, np.float32)           # "whatever the memory held"
            threads = nc * (h * w if per_input else ho * wo)
            fn((_ceil(threads, 256), 1, 1), (256, 1, 1), (gy, argmax, gx, np.int32(nc), np.int32(h), np.int32(w)))
            want = np.zeros((nc, h, w), np.float32)
            ii, jj = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
            for c in range(nc):
                want[c, 2 * ii + argmax[c] // 2, 2 * jj + argmax[c] % 2] = gy[c]
            if not np.array_equal(gx, want):
                unwritten = int(np.isnan(gx).sum())
                result.fail(f"gx {gx.shape}: {int((gx != want).sum())} of {gx.size} elements wrong, "
                            f"{unwritten} never written (still NaN)"
                            + (": a scatter writes only the argmax pixels; the others need their 0"
                               if unwritten else ""))
                return
    except EmulatorError as error:
        result.fail(f"the emulator stopped the launch:\n    {_short(error)}")
        return
    result.note("gx equals NumPy's on 4 shapes (odd sizes included), every element written")


# ---- exercise 02.2: tiled_conv1x1 ----------------------------------------------------------------

def _co_per_block(source: str) -> int:
    found = re.search(r"^#define\s+CO_PER_BLOCK\s+(\d+)", source, re.MULTILINE)
    return int(found.group(1)) if found else 1


def check_tiled_conv1x1(path: Path, result: Result) -> None:
    fn = _compile(path, "conv1x1", result)
    if fn is None:
        return
    per_block = _co_per_block(path.read_text())
    rng = np.random.default_rng(11)

    def launch(n, ci, co, p):
        x = rng.standard_normal((n, ci, p)).astype(np.float32)
        w = (rng.standard_normal((co, ci)) / np.sqrt(ci)).astype(np.float32)
        b = rng.standard_normal(co).astype(np.float32)
        y = np.full((n, co, p), np.nan, np.float32)
        fn((_ceil(p, 256), _ceil(co, per_block), n), (256, 1, 1),
           (x, w, b, y, np.int32(ci), np.int32(co), np.int32(p)))
        want = np.einsum("oc,ncp->nop", w.astype(np.float64), x.astype(np.float64)) + b[None, :, None]
        return y, want

    try:
        for shape in ((2, 35, 11, 300), (1, 1, 2, 1), (1, 64, 8, 513), (3, 5, 17, 40)):
            y, want = launch(*shape)
            if not np.allclose(y, want, rtol=1e-5, atol=1e-5):
                bad = int((~np.isclose(y, want, rtol=1e-5, atol=1e-5)).sum())
                result.fail(f"(N, Ci, Co, P) = {shape}: {bad} of {y.size} outputs wrong "
                            f"(CO_PER_BLOCK = {per_block}; NaN = never written)")
                return
        n, ci, co, p = 1, 64, 16, 1024
        with emulator.profile(gpu="sm_90", sample_blocks=8) as report:
            launch(n, ci, co, p)
    except EmulatorError as error:
        result.fail(f"the emulator stopped the launch:\n    {_short(error)}")
        return
    row = report.rows[0]
    per_warp = row.counts["global_load_requests"] / (n * co * p / 32)
    result.note(f"outputs equal NumPy's on 4 shapes; {per_warp:.1f} global load requests per warp of "
                f"outputs for Ci = {ci} (the naive kernel: 2 * Ci = {2 * ci}; wanted: at most Ci / 2 = {ci // 2})")
    if per_warp > ci / 2:
        result.fail("too many global loads: each x value should serve several output channels "
                    "(registers), and the block's weights should be loaded once into shared memory")


CHECKS = {"barrier": check_barrier, "tiled_conv1x1": check_tiled_conv1x1,                  # notebook 02
          "coalesced_pool": check_coalesced_pool, "scatter_gather": check_scatter_gather,  # notebook 03
          "bank_conflicts": check_bank_conflicts, "divergent_barrier": check_divergent_barrier}  # 05


def check(exercise: str, path: str | Path | None = None, quiet: bool = False) -> Result:
    """Check one exercise: its starter in this folder (which you edit), or the file ``path``."""
    if exercise not in CHECKS:
        raise ValueError(f"unknown exercise {exercise!r}; the exercises are {', '.join(CHECKS)}")
    path = Path(path) if path is not None else HERE / f"{exercise}.cu"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; the starter is {HERE / (exercise + '.cu')}")
    result = Result(exercise)
    CHECKS[exercise](path, result)
    if not quiet:
        print(result)
    return result


def solution(exercise: str) -> Path:
    """The path of an exercise's solution (read it after trying)."""
    if exercise not in CHECKS:
        raise ValueError(f"unknown exercise {exercise!r}; the exercises are {', '.join(CHECKS)}")
    return SOLUTIONS / f"{exercise}.cu"
