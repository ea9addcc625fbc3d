"""Drop-in modules."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F

__all__ = ["Dropout", "FusedDropout", "replace_dropout"]


class Dropout(nn.Dropout):
    """Drop-in for ``torch.nn.Dropout``: same arguments, errors, ``repr``,
    train/eval behaviour and (empty) state dict; the mask follows the
    dropout_ext contract. It is an ``nn.Dropout``, so code that checks
    ``isinstance(m, nn.Dropout)`` keeps working."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        F._check_p(p)  # nn.Dropout lets NaN through

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class FusedDropout(nn.Module):
    """``residual + dropout(act(x + bias))`` as a module."""

    def __init__(self, p: float = 0.5, activation: str = "identity") -> None:
        super().__init__()
        self.p = F._check_p(p)
        F._check_activation(activation)
        self.activation = activation

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.fused_dropout(x, self.p, bias=bias, activation=self.activation, residual=residual,
                               training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, activation={self.activation!r}"


def replace_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` in ``model`` for ``dropout_ext.Dropout`` in place,
    keeping p, inplace and training mode; returns how many were swapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                new = Dropout(child.p, child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += 1
    return swapped
