"""The Triton kernels as torch.library ops (``torch.ops.dropout_ext.triton_*``):
``triton_op`` + ``wrap_triton`` let torch.compile trace into the launches
without a graph break, and the autograd is the shared one of ``_autograd``."""

from typing import List, Optional, Tuple

import torch
from torch.library import triton_op, wrap_triton

from . import _autograd
from . import triton_kernels as K

AVAILABLE = K.AVAILABLE
DTYPES = K.DTYPES


@triton_op("dropout_ext::triton_fused_dropout", mutates_args=())
def triton_fused_dropout(input: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                         rng: torch.Tensor, p: float, activation: str, mask_shape: List[int]) -> torch.Tensor:
    return K.fused_dropout(input, bias, residual, rng, p, activation, mask_shape, wrap=wrap_triton)


@triton_op("dropout_ext::triton_fused_dropout_backward", mutates_args=())
def triton_fused_dropout_backward(grad: torch.Tensor, input: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                  rng: torch.Tensor, p: float, activation: str, mask_shape: List[int],
                                  bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return K.fused_dropout_backward(grad, input, bias, rng, p, activation, mask_shape, bias_grad, wrap=wrap_triton)


@triton_op("dropout_ext::triton_dropout_mask", mutates_args=())
def triton_dropout_mask(rng: torch.Tensor, shape: List[int], p: float) -> torch.Tensor:
    return K.dropout_mask(rng, shape, p, wrap=wrap_triton)


ops = torch.ops.dropout_ext
_autograd.register("dropout_ext::triton_fused_dropout", ops.triton_fused_dropout,
                   ops.triton_fused_dropout_backward)
