"""Launch emulated kernels from Python: ``EmuModule`` / ``EmuFunction``, shaped like CuPy's
``RawModule`` / ``RawKernel``.

A launch checks the configuration and every argument against the kernel's own parameter types
(read from the compiled module), packs the arguments as the CUDA driver API does (an array of
``void*``, each pointing at one argument's value), calls ``emu_launch`` in the module (see
``emu_runtime.h``) and turns a failure report into an ``EmulatorError`` that names the kernel,
the argument and the CUDA thread.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from . import compiler, modes, profiler
from .errors import EmulatorError, KernelNotFoundError, LaunchError
from .reports import describe_failure

MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
MAX_SHARED_BYTES = 48 * 1024  # per block without the opt-in cudaFuncSetAttribute call
DEFAULT_SEED = modes.DEFAULT_SEED

_launch_lock = threading.Lock()  # the runtime's state and the signal handlers are per process
_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)

# Parameter type code (see emu::type_code in emu_runtime.h) -> the NumPy dtypes that may be passed.
_SCALAR_DTYPES = {
    "f32": (np.float32,), "f64": (np.float64,),
    "i8": (np.int8,), "u8": (np.uint8,), "i16": (np.int16,), "u16": (np.uint16,),
    "i32": (np.int32,), "u32": (np.uint32,), "i64": (np.int64,), "u64": (np.uint64,),
    "b8": (np.bool_,), "c8": (np.int8, np.uint8),
}
_ELEMENT_DTYPES = {**_SCALAR_DTYPES, "b8": (np.bool_, np.uint8), "c8": (np.int8, np.uint8, np.bool_)}


class _Region(ctypes.Structure):
    _fields_ = [("host", ctypes.c_void_p), ("nbytes", ctypes.c_uint64), ("writable", ctypes.c_int32),
                ("reserved", ctypes.c_int32), ("device", ctypes.c_void_p)]


class _Binding(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int32), ("region", ctypes.c_int32), ("offset", ctypes.c_uint64)]


class _Report(ctypes.Structure):  # emu::Report (emu_state.h)
    _fields_ = [("failure", ctypes.c_int32), ("region", ctypes.c_int32), ("offset", ctypes.c_int64),
                ("size", ctypes.c_int32), ("is_write", ctypes.c_int32),
                ("block", ctypes.c_uint32 * 3), ("thread", ctypes.c_uint32 * 3),
                ("address", ctypes.c_uint64), ("line", ctypes.c_int32), ("other_line", ctypes.c_int32),
                ("other_thread", ctypes.c_uint32 * 3), ("other_block", ctypes.c_uint32 * 3),
                ("used_fibers", ctypes.c_int32), ("element_bytes", ctypes.c_int32),
                ("array_bytes", ctypes.c_uint64), ("pc", ctypes.c_uint64), ("other_pc", ctypes.c_uint64),
                ("detail", ctypes.c_int32), ("space", ctypes.c_int32), ("other_is_write", ctypes.c_int32),
                ("other_region", ctypes.c_int32), ("value", ctypes.c_int64), ("other_value", ctypes.c_int64),
                ("text", ctypes.c_char * 256), ("text2", ctypes.c_char * 256)]


class _Profile(ctypes.Structure):  # emu::Profile (emu_profile.h)
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "sampled_blocks", "total_blocks", "global_load_requests", "global_load_sectors", "global_load_bytes",
        "global_store_requests", "global_store_sectors", "global_store_bytes", "shared_load_requests",
        "shared_load_wavefronts", "shared_load_bytes", "shared_store_requests", "shared_store_wavefronts",
        "shared_store_bytes", "dram_read_sectors", "dram_write_sectors", "tensor_flops", "thread_global_loads",
        "thread_global_stores", "thread_shared_loads", "thread_shared_stores", "busy_l1_hits", "busy_l1_misses",
        "global_lines")]


class _Options(ctypes.Structure):  # emu::Options (emu_state.h)
    _fields_ = [("seed", ctypes.c_uint64), ("shuffled", ctypes.c_int32), ("fiber_mode", ctypes.c_int32),
                ("racecheck", ctypes.c_int32), ("workers", ctypes.c_int32), ("direct", ctypes.c_int32),
                ("profile", ctypes.c_int32), ("sample_every", ctypes.c_uint64)]


def _mix(seed: int, launch: int) -> int:
    """A 64-bit launch seed from the module's seed and the kernel's launch count."""
    value = (seed * 0x9E3779B97F4A7C15 + launch * 0xBF58476D1CE4E5B9 + 1) % 2**64
    return value ^ (value >> 29)


class EmuModule:
    """A CUDA C source compiled for the CPU, like ``cupy.RawModule(code=..., options=...)``.

    ``name`` (use the ``.cu`` file's name) appears in error messages; if it is a path to an
    existing file, that file's folder is on the include path. ``options`` are extra compiler
    options: ``-DNAME=VALUE``, ``-UNAME``, ``-I<dir>``.

    ``mode``: "checked" or "fast" (see ``minunet.emulator.emu_mode``); ``None`` takes the
    process-wide default when the module is created.

    ``shuffle_seed``: the order of blocks, and of the threads of a block between barriers, is
    shuffled from this seed (mixed with each kernel's launch count, so the n-th launch of a kernel
    is reproducible). ``None`` (default) follows the process-wide default at every launch
    (``MINUNET_EMU_SEED`` or ``set_shuffle_seed``, else 0); a negative value turns shuffling off
    (blocks and threads in index order). ``mod.shuffle_seed`` may be changed between launches.

    ``racecheck``: record accesses to report races (checked mode); ``None`` follows
    ``MINUNET_EMU_RACECHECK`` / ``set_racecheck`` (default on)."""

    def __init__(self, code: str, name: str = "module", options: tuple[str, ...] = (),
                 shuffle_seed: int | None = None, mode: str | None = None, racecheck: bool | None = None):
        if not isinstance(code, str):
            raise TypeError(f"EmuModule code must be the CUDA source text (str), got {type(code).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"EmuModule name must be a str (the .cu file name), got {type(name).__name__}")
        if mode is None:
            mode = modes.emu_mode()
        if mode not in modes.MODES:
            raise ValueError(f"emulator mode {mode!r} is not one of {', '.join(modes.MODES)}; "
                             "use 'checked' or 'fast'")
        if isinstance(options, str):
            options = (options,)
        self.name = name
        self.code = code
        self.options = tuple(options)
        self.mode = mode
        self._shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.racecheck = racecheck
        self._build = compiler.build(code, name, self.options, mode)
        self._builds = {mode: self._build}
        self._functions: dict[str, EmuFunction] = {}

    @property
    def shuffle_seed(self) -> int:
        """The seed launches use now: the module's own, else the process-wide default."""
        return modes.shuffle_seed() if self._shuffle_seed is None else self._shuffle_seed

    @shuffle_seed.setter
    def shuffle_seed(self, seed: int | None) -> None:
        self._shuffle_seed = None if seed is None else int(seed)

    def build_for(self, mode: str) -> "compiler.Build":
        """The library of this source in ``mode`` (the profiler runs fast-mode modules checked)."""
        if mode not in self._builds:
            self._builds[mode] = compiler.build(self.code, self.name, self.options, mode)
        return self._builds[mode]

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """The ``__global__`` functions this module defines, in source order."""
        return tuple(self._build.kernels)

    def get_function(self, name: str) -> "EmuFunction":
        """The kernel ``name``, ready to launch (like ``RawModule.get_function``)."""
        if name not in self._build.kernels:
            known = ", ".join(self.kernel_names) or "none"
            raise KernelNotFoundError(f"module {self.name!r} has no __global__ function {name!r}; "
                                      f"it defines: {known}")
        if name not in self._functions:
            self._functions[name] = EmuFunction(self, name)
        return self._functions[name]

    def __repr__(self) -> str:
        return f"EmuModule({self.name!r}, kernels={list(self.kernel_names)})"


class EmuFunction:
    """One kernel of an ``EmuModule``: call it as ``fn(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: EmuModule, name: str):
        library = module._build.library
        self.module = module
        self.name = name
        self.info = module._build.kernels[name]
        signature = getattr(library, f"emu_signature__{name}")
        signature.restype = ctypes.c_char_p
        self.param_types: tuple[str, ...] = tuple(signature().decode().split())
        self._pointer = tuple(code.startswith("*") for code in self.param_types)
        self._const = tuple(code.startswith("*c") for code in self.param_types)
        self.launch_bound = None  # __launch_bounds__ as the compiler evaluated it (macros resolved)
        if self.info.launch_bound and self.info.body_end > 0:
            self.launch_bound = int(getattr(library, f"emu_launch_bound__{name}")())
        self.launch_count = 0
        # Learnt at the first launch: whether the kernel reaches a __syncthreads() or a warp
        # collective (then its threads run as fibers). None until a launch has succeeded.
        self._uses_barriers: bool | None = None
        self._handles: dict[str, tuple] = {}

    @property
    def uses_barriers(self) -> bool:
        """Whether a launch found a __syncthreads() or warp collective (so threads run as fibers)."""
        return bool(self._uses_barriers)

    def _handle(self, mode: str):
        """(thread entry, block entry, emu_launch, library path, one OS thread only) in ``mode``."""
        if mode not in self._handles:
            build = self.module.build_for(mode)
            library = build.library
            launch = library.emu_launch
            launch.restype = ctypes.c_int
            entry = ctypes.cast(getattr(library, f"emu_entry__{self.name}"), ctypes.c_void_p)
            block_entry = ctypes.cast(getattr(library, f"emu_block__{self.name}"), ctypes.c_void_p)
            serial = bool(library.emu_file_scope_shared())
            self._handles[mode] = (entry, block_entry, launch, str(build.path), serial)
        return self._handles[mode]

    # ---- checks ---------------------------------------------------------------------------
    def _where(self) -> str:
        return f"kernel {self.name!r} (module {self.module.name})"

    def _param(self, i: int) -> str:
        names = self.info.param_names
        label = f" `{names[i]}`" if i < len(names) and len(names) == len(self.param_types) else ""
        return f"argument {i}{label}"

    def _dims(self, value, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
        dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
        if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
            raise LaunchError(f"{self._where()}: {what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
        dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
        for axis, (d, limit) in enumerate(zip(dims, limits)):
            if not 1 <= d <= limit:
                raise LaunchError(f"{self._where()}: {what} {dims} has {'xyz'[axis]} = {d}; "
                                  f"each must be in 1..{limit}")
        return dims

    def _check_config(self, grid, block, shared_mem) -> tuple[tuple, tuple, int]:
        grid = self._dims(grid, "grid", MAX_GRID_DIM)
        block = self._dims(block, "block", MAX_BLOCK_DIM)
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise LaunchError(f"{self._where()}: block {block} has {threads} threads; a block "
                              f"holds at most {MAX_THREADS_PER_BLOCK}")
        bound = self.launch_bound
        if bound is not None and threads > bound:
            raise LaunchError(f"{self._where()}: block {block} has {threads} threads but the kernel "
                              f"declares __launch_bounds__({bound}); a GPU refuses this launch")
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise LaunchError(f"{self._where()}: shared_mem must be a byte count >= 0, got {shared_mem!r}")
        shared_mem = int(shared_mem)
        if shared_mem > MAX_SHARED_BYTES:  # (static sizes are per kernel, which the module can't tell)
            raise LaunchError(f"{self._where()}: shared_mem={shared_mem} bytes of dynamic shared memory "
                              f"per block; a GPU allows {MAX_SHARED_BYTES} without opting in")
        return grid, block, shared_mem

    def _check_arg(self, i: int, code: str, arg):
        if code.startswith("*"):
            pointee = code[1:].lstrip("c")
            if pointee.startswith("*"):
                raise LaunchError(f"{self._where()}: {self._param(i)} is a pointer to a pointer; "
                                  "the emulator passes only arrays and scalars")
            if not isinstance(arg, np.ndarray):
                raise LaunchError(f"{self._where()}: {self._param(i)} is a pointer parameter; pass a "
                                  f"NumPy array (the emulated device buffer), got {type(arg).__name__}")
            if not arg.flags.c_contiguous:
                raise LaunchError(f"{self._where()}: {self._param(i)} must be C-contiguous; "
                                  "pass np.ascontiguousarray(a)")
            allowed = _ELEMENT_DTYPES.get(pointee)
            if allowed is not None and arg.dtype.type not in allowed:
                want = " or ".join(np.dtype(t).name for t in allowed)
                raise LaunchError(f"{self._where()}: {self._param(i)} points to {want} "
                                  f"(parameter type {code}), got a {arg.dtype} array")
            return arg
        if isinstance(arg, np.ndarray) and arg.ndim == 0:
            arg = arg[()]
        allowed = _SCALAR_DTYPES.get(code)
        if allowed is None:
            raise LaunchError(f"{self._where()}: {self._param(i)} has a parameter type ({code}) the "
                              "emulator cannot pass; use pointers and plain numeric scalars")
        want = " or ".join(f"np.{np.dtype(t).name}" for t in allowed)
        if not isinstance(arg, np.generic):
            raise LaunchError(f"{self._where()}: {self._param(i)} is a {type(arg).__name__}; pass a NumPy "
                              f"scalar of the parameter's type, {want}(...), as for cupy.RawKernel")
        if arg.dtype.type not in allowed:
            raise LaunchError(f"{self._where()}: {self._param(i)} must be {want}, got np.{arg.dtype.name} "
                              "(on a GPU the wrong size would silently garble it)")
        return np.array(arg)  # its bytes, addressable

    # ---- the launch -------------------------------------------------------------------------
    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        grid, block, shared_mem = self._check_config(grid, block, shared_mem)
        if not isinstance(args, (tuple, list)):
            raise LaunchError(f"{self._where()}: args must be a tuple of arrays and NumPy scalars")
        if len(args) != len(self.param_types):
            names = ", ".join(self.info.param_names) if len(self.info.param_names) == len(self.param_types) else ""
            raise LaunchError(f"{self._where()}: takes {len(self.param_types)} arguments ({names}), "
                              f"got {len(args)}")
        values = [self._check_arg(i, code, a) for i, code in enumerate(self.param_types)
                  for a in (args[i],)]
        addresses = [v.ctypes.data for v in values]  # (of a scalar: its bytes)
        regions, bindings, owners = self._regions(values, addresses)

        n = len(values)
        pointer_slots = (ctypes.c_void_p * max(n, 1))()
        argv = (ctypes.c_void_p * max(n, 1))()
        slots = ctypes.addressof(pointer_slots)
        for i, address in enumerate(addresses):
            argv[i] = slots + _POINTER_BYTES * i if self._pointer[i] else address
        region_array = (_Region * max(len(regions), 1))(*regions)
        binding_array = (_Binding * max(len(bindings), 1))(*bindings)
        report = _Report()
        counting = profiler.active()
        mode = "checked" if counting else self.module.mode  # the profiler counts in the checked build
        entry, block_entry, launch, library_path, serial = self._handle(mode)
        seed = self.module.shuffle_seed
        racecheck = self.module.racecheck
        if counting:
            racecheck = counting.racecheck
        nblocks = grid[0] * grid[1] * grid[2]
        options = _Options(seed=_mix(seed, self.launch_count) if seed >= 0 else 0, shuffled=int(seed >= 0),
                           fiber_mode=int(bool(self._uses_barriers)),
                           racecheck=int(modes.racecheck() if racecheck is None else racecheck),
                           workers=1 if serial else modes.workers(),
                           direct=int(mode == "fast" and self._uses_barriers is not None),
                           profile=int(counting is not None),
                           sample_every=max(1, nblocks // counting.sample_blocks) if counting else 1)
        counts = _Profile()
        self.launch_count += 1
        with _launch_lock:
            failure = launch(entry, block_entry, argv, region_array, ctypes.c_int(len(regions)), binding_array,
                             ctypes.c_int(len(bindings)), (ctypes.c_uint32 * 3)(*grid),
                             (ctypes.c_uint32 * 3)(*block), ctypes.c_uint64(shared_mem),
                             ctypes.byref(options), ctypes.byref(report), ctypes.byref(counts))
        if failure:
            self._uses_barriers = self._uses_barriers or bool(report.used_fibers) or None
            raise EmulatorError(describe_failure(self, report, values, owners, len(regions), shared_mem,
                                                 seed, self.launch_count - 1, library_path, mode))
        self._uses_barriers = bool(self._uses_barriers) or bool(report.used_fibers)
        if counting:
            counting.add_launch(self, grid, block, shared_mem, counts)

    def _regions(self, values, addresses):
        """Group the array arguments into regions of host memory: arrays that overlap (the same
        array passed twice, or overlapping views) share one region, so a write through one
        argument is seen through the other, as on a GPU."""
        arrays = [(addresses[i], addresses[i] + v.nbytes, i) for i, v in enumerate(values) if self._pointer[i]]
        arrays.sort()
        groups: list[list] = []  # [start, end, [arg indices]]
        for start, end, i in arrays:
            if groups and start < groups[-1][1] and end > start:
                groups[-1][1] = max(groups[-1][1], end)
                groups[-1][2].append(i)
            else:
                groups.append([start, end, [i]])
        regions, bindings, owners = [], [], []
        for r, (start, end, members) in enumerate(groups):
            writable = any(not self._const[i] for i in members)
            if writable:
                for i in members:
                    if not values[i].flags.writeable:
                        raise LaunchError(f"{self._where()}: {self._param(i)} is a read-only array but "
                                          "the kernel may write through it (a non-const pointer)")
            regions.append(_Region(start, end - start, int(writable), 0, None))
            for i in members:
                bindings.append(_Binding(i, r, addresses[i] - start))
            owners.append([(i, addresses[i] - start) for i in members])
        return regions, bindings, owners

    def __repr__(self) -> str:
        return f"EmuFunction({self.name!r}, params=[{', '.join(self.param_types)}])"
