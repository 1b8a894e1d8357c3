"""minunet's CUDA emulator: run the kernels of ``kernels/*.cu`` on the CPU (``device="emu"``).

``EmuModule(code, name, options)`` compiles a CUDA C source with the system C++ compiler against
``cuda_emu.h``; ``mod.get_function(name)(grid, block, args, shared_mem=0)`` launches a kernel the
way ``cupy.RawKernel`` does, with NumPy arrays as device buffers (updated in place).
"""
from .errors import CompilerNotFoundError, EmulatorError, KernelNotFoundError, LaunchError
from .launcher import EmuFunction, EmuModule

__all__ = ["EmuModule", "EmuFunction", "EmulatorError", "CompilerNotFoundError", "LaunchError",
           "KernelNotFoundError"]
