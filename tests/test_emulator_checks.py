"""The emulator's second edition, part 1: bugs the first emulator let pass (issue 10). Every
kernel of tests/emu_kernels/misses.cu ran silently there; each is now stopped with a message that
names the kernel, the thread, the array or argument and the source line -- or, for the correct
variants (atomics, same-value writes), runs and gives the right answer."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_close, source_line
from minunet import emulator
from minunet.emulator import EmuModule, EmulatorError

KERNELS = Path(__file__).parent / "emu_kernels"
SOURCE = (KERNELS / "misses.cu").read_text()


def line_of(marker: str) -> int:
    """The 1-based line of misses.cu that contains ``marker`` (so the tests follow edits)."""
    return source_line(SOURCE, marker)


@pytest.fixture(scope="module")
def misses() -> EmuModule:
    return EmuModule(SOURCE, name="misses.cu", mode="checked")


@pytest.fixture(scope="module")
def ordered() -> EmuModule:
    """Threads and blocks in index order, so the thread named first in a race is known."""
    return EmuModule(SOURCE, name="misses.cu", mode="checked", shuffle_seed=-1)


# ---- an index into another argument's buffer ----------------------------------------------------

def test_far_index_is_reported_against_its_own_argument(misses, rng):
    """a[i] far past an 8-element a: reported as `a`, element i, line 8 -- never read from b (which
    lies right after a in the caller's memory, and held 7s), whatever the distance."""
    fn = misses.get_function("read_far_past_end")
    a, b = np.arange(8, dtype=np.float32), np.full(40_000, 7.0, np.float32)
    for i in [8, 2000, 5000, *rng.integers(9, 2**31 - 1, 3).tolist(), -1, -3000, *rng.integers(-2**31, -1, 2).tolist()]:
        out = np.zeros(4, np.float32)
        past = f"{i - 7} past the last" if i >= 8 else f"{-i} before the first"
        with pytest.raises(EmulatorError, match=rf"'read_far_past_end' \(module misses.cu\): out-of-bounds read of 4 "
                                                rf"bytes by thread \(0,0,0\) of block \(0,0,0\) at misses.cu:{line_of('a[i] + b[0]')}: "
                                                rf"argument 0 `a` \(float32 array of 8 elements\) at element {i} \({past}"):
            fn(1, 1, (a, b, out, np.int32(i)))
        assert not out.any()
    out = np.zeros(4, np.float32)
    fn(1, 4, (a, b, out, np.int32(5)))  # in bounds: fine
    assert_close(out, np.full(4, 12.0), rtol=0, atol=0, what="a[5] + b[0]")


# ---- per-dimension bounds of static shared arrays -------------------------------------------------

def test_shared_array_index_is_checked_per_dimension(misses, rng):
    """t[r][8] of a float t[8][8] lands inside row r+1 (the flattened array has that element); the
    check on each index catches it, for the first thread in any order that does it."""
    x = rng.standard_normal(64).astype(np.float32)
    with pytest.raises(EmulatorError, match=rf"'halo_row_overrun'.*out-of-bounds index by thread \(7,[0-6],0\) of block "
                                            rf"\(0,0,0\) on line {line_of('t[r][c + 1]')}: index 2 of 2 of __shared__ `t` "
                                            r"\(float t\[8\]\[8\]\) is 8, valid 0..7 \(each index must stay inside its own "
                                            r"dimension"):
        misses.get_function("halo_row_overrun")(1, (8, 8), (x, np.zeros(64, np.float32)))


# ---- races inside one barrier interval -----------------------------------------------------------

def test_lost_update_is_a_read_after_write_hazard(ordered, rng):
    x = rng.standard_normal(64).astype(np.float32)
    line = line_of("s += x[threadIdx.x]")
    with pytest.raises(EmulatorError, match=rf"'lost_update'.*race \(read-after-write hazard\) on __shared__ `s` \(float s; "
                                            rf"1 elements, flattened\) at element 0: thread \(1,0,0\) of block \(0,0,0\) "
                                            rf"reads it at misses.cu:{line}, but thread \(0,0,0\) wrote it at misses.cu:{line} "
                                            r"with no barrier"):
        ordered.get_function("lost_update")(1, 64, (x, np.zeros(1, np.float32)))


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_atomics_are_not_hazards(seed, rng):
    x = rng.standard_normal(96).astype(np.float32)
    out = np.zeros(1, np.float32)
    EmuModule(SOURCE, name="misses.cu", shuffle_seed=seed).get_function("atomic_update")(1, 96, (x, out))
    assert_close(out[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-5, what="atomicAdd sum")


def test_write_after_read_names_both_threads_and_lines(ordered, rng):
    """Thread 0 reads tile[1]; thread 1 then overwrites it in the same interval."""
    with pytest.raises(EmulatorError, match=rf"'shift_in_place'.*race \(write-after-read hazard\) on __shared__ `tile` "
                                            rf"\(float tile\[64\]; 64 elements, flattened\) at element 1: thread \(1,0,0\) "
                                            rf"of block \(0,0,0\) writes it at misses.cu:{line_of('tile[t] = right')}, but "
                                            rf"thread \(0,0,0\) read it at misses.cu:{line_of('const float right = t < 63')}"):
        ordered.get_function("shift_in_place")(1, 64, (rng.random(64, np.float32), np.zeros(64, np.float32)))


@pytest.mark.parametrize("seed", [None, 3])
def test_any_thread_order_exposes_the_shift_race(seed, rng):
    with pytest.raises(EmulatorError, match=r"race \((write-after-read|read-after-write) hazard\) on __shared__ `tile`"):
        EmuModule(SOURCE, name="misses.cu", shuffle_seed=seed).get_function("shift_in_place")(
            1, 64, (rng.random(64, np.float32), np.zeros(64, np.float32)))


def test_two_writes_of_different_values_are_a_hazard(ordered):
    line = line_of("winner = (int)threadIdx.x")
    with pytest.raises(EmulatorError, match=rf"'last_writer_wins'.*race \(write-after-write hazard\) on __shared__ "
                                            rf"`winner`.*thread \(1,0,0\) of block \(0,0,0\) writes it at misses.cu:{line}, "
                                            rf"but thread \(0,0,0\) wrote it at misses.cu:{line} .*stored different values"):
        ordered.get_function("last_writer_wins")(1, 32, (np.zeros(1, np.int32),))


@pytest.mark.parametrize("seed", [None, 5, -1])
def test_two_writes_of_the_same_value_are_not_a_hazard(seed, rng):
    """Many threads set a flag to 1 in one interval: the result cannot depend on their order."""
    fn = EmuModule(SOURCE, name="misses.cu", shuffle_seed=seed).get_function("same_value_flag")
    for negatives in (0, 1, 17):
        x = rng.random(64, np.float32)
        x[rng.choice(64, negatives, replace=False)] *= -1
        out = np.full(1, -5, np.int32)
        fn(1, 64, (x, out))
        assert out[0] == int(negatives > 0)


def test_global_write_after_write_between_blocks(ordered):
    """Threads of one block write the same value (fine); blocks write different ones."""
    line = line_of("out[0] = (int)blockIdx.x")
    with pytest.raises(EmulatorError, match=rf"'global_last_writer'.*race \(write-after-write hazard\) on argument 0 `out` "
                                            rf"\(int32 array of 1 elements\) at element 0: thread \(0,0,0\) of block \(1,0,0\) "
                                            rf"writes it at misses.cu:{line}, but thread \(31,0,0\) of block \(0,0,0\) "
                                            rf"wrote it at misses.cu:{line} in the same launch \(blocks never synchronise"):
        ordered.get_function("global_last_writer")(4, 32, (np.zeros(1, np.int32),))


def test_buffers_over_16_mib_are_not_race_checked(ordered):
    """The documented limit: the shadow of a global buffer costs 32 bytes per byte, so buffers
    over 16 MiB are left out of the race checker (bounds are still checked)."""
    out = np.zeros(4 * 2**20 + 1, np.int32)  # 16 MiB + 4 bytes
    ordered.get_function("global_last_writer")(4, 32, (out,))
    assert out[0] == 3  # the last block in index order wrote last


@pytest.mark.parametrize("seed", [None, 1, 2, 3, -1])
def test_global_read_of_another_blocks_output(seed):
    """Caught whichever block runs first: read-after-write if the writer ran first, else
    write-after-read."""
    x = np.ones(128, np.float32)
    with pytest.raises(EmulatorError, match=r"'read_other_blocks_output'.*race \((read-after-write|write-after-read) "
                                            r"hazard\) on argument 1 `y`.*of block \(\d,0,0\).*of block \(\d,0,0\).*in the "
                                            r"same launch"):
        EmuModule(SOURCE, name="misses.cu", shuffle_seed=seed).get_function("read_other_blocks_output")(
            4, 32, (x, np.zeros(128, np.float32), np.zeros(128, np.float32)))


def test_race_checker_can_be_switched_off_for_long_runs(rng):
    x = rng.standard_normal(64).astype(np.float32)
    out = np.zeros(1, np.float32)
    EmuModule(SOURCE, name="misses.cu", racecheck=False, shuffle_seed=-1).get_function("lost_update")(1, 64, (x, out))
    assert_close(out[0], x.astype(np.float64).sum(), rtol=1e-5, atol=1e-5, what="one thread at a time")
    previous = emulator.racecheck()
    try:
        emulator.set_racecheck(False)
        EmuModule(SOURCE, name="misses.cu").get_function("lost_update")(1, 64, (x, out))
    finally:
        emulator.set_racecheck(previous)
    with pytest.raises(ValueError, match="racecheck must be True or False"):
        emulator.set_racecheck("no")


# ---- misaligned vector accesses --------------------------------------------------------------------

def test_misaligned_float4_load_from_global_memory(misses, rng):
    fn = misses.get_function("misaligned_float4")
    x = rng.standard_normal(40).astype(np.float32)
    y = np.zeros(4, np.float32)
    fn(1, 4, (x, y, np.int32(4)))  # x + 4: 16-byte aligned (buffers start 256-byte aligned)
    assert_close(y, x[4:20].reshape(4, 4).sum(axis=1), rtol=1e-6, atol=1e-6, what="aligned float4 loads")
    for offset in (1, 2, 3, 5):
        with pytest.raises(EmulatorError, match=rf"'misaligned_float4'.*misaligned read of 16 bytes by thread \((\d),0,0\) "
                                                rf"of block \(0,0,0\) at misses.cu:{line_of('reinterpret_cast<const float4*>')}: "
                                                r"address 0x[0-9a-f]+ is not a multiple of 16 \(argument 0 `x` \(float32 array "
                                                r"of 40 elements\) at element (\d+)\)") as caught:
            fn(1, 4, (x, y, np.int32(offset)))
        thread, element = re.search(r"thread \((\d),0,0\).* at element (\d+)\)", str(caught.value)).groups()
        assert int(element) == offset + 4 * int(thread)  # the float4 of that thread


def test_misaligned_float2_store_to_shared_memory(misses):
    with pytest.raises(EmulatorError, match=rf"'misaligned_shared_float2'.*misaligned write of 8 bytes by thread "
                                            rf"\(\d+,0,0\) of block \(0,0,0\) at misses.cu:"
                                            rf"{line_of('reinterpret_cast<float2*>')}: .*not a multiple of 8 \(__shared__ "
                                            r"`buffer` \(float buffer\[66\]"):
        misses.get_function("misaligned_shared_float2")(1, 32, (np.zeros(32, np.float32),))


# ---- more than 48 KiB of shared memory ----------------------------------------------------------------

def test_static_shared_memory_over_48_kib_is_refused(misses):
    with pytest.raises(EmulatorError, match=r"'too_much_static_shared'.*uses 52000 bytes of static __shared__ memory per "
                                            r"block: more than the 49152 bytes.*float big\[13000\] \(52000 bytes\)"):
        misses.get_function("too_much_static_shared")(1, 64, (np.zeros(64, np.float32),))


def test_static_plus_dynamic_shared_memory_over_48_kib_is_refused(misses):
    fn = misses.get_function("static_plus_dynamic_shared")
    y = np.zeros(64, np.float32)
    fn(1, 64, (y,), shared_mem=48 * 1024 - 40_000)  # exactly the limit: fine
    assert (y == 3).all()
    with pytest.raises(EmulatorError, match=r"uses 40000 bytes of static __shared__ memory plus 9156 bytes of dynamic"):
        fn(1, 64, (y,), shared_mem=48 * 1024 - 40_000 + 4)


# ---- seeds and modes: the process-wide defaults ------------------------------------------------------

def test_process_wide_shuffle_seed_reaches_cached_modules():
    code = (KERNELS / "grid_index.cu").read_text()

    def arrival(module):
        order, counter = np.full(4 * 64, -1, np.int32), np.zeros(1, np.int32)
        module.get_function("arrival_order")(4, 64, (order, counter))
        return order

    follower = EmuModule(code, "grid_index.cu")  # shuffle_seed=None: follows the default
    previous = emulator.shuffle_seed()
    try:
        emulator.set_shuffle_seed(5)
        assert np.array_equal(arrival(follower), arrival(EmuModule(code, "grid_index.cu", shuffle_seed=5)))
        emulator.set_shuffle_seed(-1)
        assert np.array_equal(arrival(follower), np.arange(4 * 64))
    finally:
        emulator.set_shuffle_seed(previous)
    with pytest.raises(ValueError, match="shuffle seed must be an int"):
        emulator.set_shuffle_seed("7")


def test_mode_is_validated_with_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"^emulator mode 'quick' is not one of checked, fast; use 'checked' or 'fast'$"):
        emulator.set_emu_mode("quick")
    with pytest.raises(ValueError, match=r"emulator mode 'quick' is not one of checked, fast"):
        EmuModule("", name="x.cu", mode="quick")
    monkeypatch.setattr(emulator.modes, "_state", {})
    monkeypatch.setenv("MINUNET_EMU_MODE", "fastest")
    with pytest.raises(ValueError, match=r"MINUNET_EMU_MODE='fastest' is not an emulator mode"):
        emulator.emu_mode()
    monkeypatch.setenv("MINUNET_EMU_MODE", "FAST")
    assert emulator.emu_mode() == "fast"
    monkeypatch.delenv("MINUNET_EMU_MODE")
    monkeypatch.setattr(emulator.modes, "_state", {})
    assert emulator.emu_mode() == "checked"
    assert re.search(r"checked", EmuModule("", name="y.cu").mode)
