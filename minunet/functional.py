"""The differentiable ops of the U-Net, on any device: ``import minunet.functional as F``.

Each op lives in its own module of ``minunet/ops/`` (argument checks, autograd Function, NumPy
reference, CUDA launcher), next to its kernel file ``kernels/<op>.cu``; this module is the public
name list. ``F.conv3x3`` is ``minunet.ops.conv3x3.conv3x3``, and so on.
"""
from __future__ import annotations

from .ops.conv1x1 import conv1x1
from .ops.conv3x3 import conv3x3
from .ops.conv_transpose2x2 import conv_transpose2x2
from .ops.crop_concat import crop_concat
from .ops.cross_entropy import weighted_cross_entropy
from .ops.elementwise import dropout, relu
from .ops.maxpool2x2 import max_pool2x2

__all__ = ["conv3x3", "max_pool2x2", "conv_transpose2x2", "crop_concat", "conv1x1", "relu",
           "dropout", "weighted_cross_entropy"]
