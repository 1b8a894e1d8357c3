"""minunet: U-Net (Ronneberger, Fischer, Brox, 2015) from scratch, on a small autograd engine.

    import minunet as mu
    import minunet.functional as F
    model = mu.UNet()                       # the paper's network: 572x572 -> 388x388
    x = mu.Tensor(image, device="cpu")      # "cpu" (NumPy), "cuda" (our CUDA kernels), "emu"

See README.md and docs/ for the design; notebooks/ steps through every piece.
"""
from . import functional, optim
from .autograd import no_grad
from .backends.kernels import PRECISIONS, set_precision
from .devices import cuda_available
from .nn import Module, Parameter, UNet
from .tensor import Tensor

__version__ = "0.1.0"
__all__ = ["Tensor", "UNet", "Module", "Parameter", "no_grad", "functional", "optim",
           "cuda_available", "set_precision", "PRECISIONS"]
