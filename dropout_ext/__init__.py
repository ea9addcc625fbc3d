"""dropout_ext: fused dropout kernels for PyTorch under one RNG contract.

``y = residual + dropout(act(x + bias))`` and ``norm(residual + dropout(x))``
(LayerNorm, RMSNorm) on CPU (C++), CUDA (C++) and Triton, with a pure-PyTorch
reference; the mask is a pure function of
(seed, offset, shape, p) on every backend (docs/RNG.md).
"""

from . import _ops
from . import functional, reference, schedules, sharding
from ._backend import BACKENDS, available_backends
from .functional import dropout_mask
from .fusion import LinearDropout, fuse_dropout
from .modules import (AlphaDropout, DropPath, Dropout, Dropout1d, Dropout2d, Dropout3d, DropoutAddLayerNorm,
                      DropoutAddRMSNorm, FeatureAlphaDropout, FusedDropout, LockedDropout, replace_dropout)
from .sharding import Place, Split, data_parallel

__all__ = [
    "BACKENDS",
    "AlphaDropout",
    "DropPath",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAddLayerNorm",
    "DropoutAddRMSNorm",
    "FeatureAlphaDropout",
    "FusedDropout",
    "LinearDropout",
    "LockedDropout",
    "Place",
    "Split",
    "available_backends",
    "data_parallel",
    "dropout_mask",
    "functional",
    "fuse_dropout",
    "reference",
    "replace_dropout",
    "schedules",
    "sharding",
]

__version__ = "0.1.0"
