"""Drop-in modules."""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
from torch import nn

from . import functional as F

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
           "LockedDropout", "DropPath", "FusedDropout", "replace_dropout"]


def _bits(p: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(p)))[0]


class _RuntimeP:
    """Keeps p also as a tensor (its binary64 bits, an int64 buffer that
    ``.half()`` leaves alone and ``state_dict`` omits), updated whenever p is
    assigned. Under torch.compile the forward passes that buffer instead of
    the float, so the kernels read p as data and a new p (a schedule) reuses
    the compiled graph instead of recompiling it."""

    def _register_runtime_p(self) -> None:
        self.register_buffer("_p_bits", torch.tensor(_bits(self.p), dtype=torch.int64), persistent=False)

    def __setattr__(self, name, value):
        if name == "p":
            value = F._check_p(value)
        super().__setattr__(name, value)
        if name == "p" and "_p_bits" in self.__dict__.get("_buffers", {}):
            self._buffers["_p_bits"].fill_(_bits(value))

    def _p_args(self):
        """(p, p bits) for the functional call: the float in eager mode; under
        torch.compile the buffer, and the float (a guarded constant) unread."""
        if torch.compiler.is_compiling():
            return 0.0, self._p_bits
        return self.p, None


class Dropout(_RuntimeP, nn.Dropout):
    """Drop-in for ``torch.nn.Dropout``: same arguments, errors, ``repr``,
    train/eval behaviour and (empty) state dict; the mask follows the
    dropout_ext contract. It is an ``nn.Dropout``, so code that checks
    ``isinstance(m, nn.Dropout)`` keeps working.

    ``broadcast_dims`` (optional) shares one draw along those dimensions."""

    def __init__(self, p: float = 0.5, inplace: bool = False,
                 broadcast_dims: Optional[Sequence[int]] = None) -> None:
        F._check_p(p)  # first: nn.Dropout lets NaN through and fails obscurely on a non-number
        super().__init__(p, inplace)
        self.broadcast_dims = tuple(broadcast_dims) if broadcast_dims is not None else None
        self._register_runtime_p()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        p, bits = self._p_args()
        return F.dropout(input, p, self.training, self.inplace, broadcast_dims=self.broadcast_dims, _p_bits=bits)

    def extra_repr(self) -> str:
        extra = f", broadcast_dims={self.broadcast_dims}" if self.broadcast_dims is not None else ""
        return super().extra_repr() + extra


class _ChannelTwin(_RuntimeP):
    """Dropout1d/2d/3d: nn's twin's constructor with p checked first, and the
    forward of the matching functional (``_fn``)."""

    _fn = None

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        F._check_p(p)
        super().__init__(p, inplace)
        self._register_runtime_p()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        p, bits = self._p_args()
        return type(self)._fn(input, p, self.training, self.inplace, _p_bits=bits)


class Dropout1d(_ChannelTwin, nn.Dropout1d):
    """Drop-in for ``torch.nn.Dropout1d``: one draw per channel, broadcast over
    the length by the kernel (no full-size mask)."""

    _fn = staticmethod(F.dropout1d)


class Dropout2d(_ChannelTwin, nn.Dropout2d):
    """Drop-in for ``torch.nn.Dropout2d`` (same shape rules and warnings)."""

    _fn = staticmethod(F.dropout2d)


class Dropout3d(_ChannelTwin, nn.Dropout3d):
    """Drop-in for ``torch.nn.Dropout3d`` (same shape rules and warnings)."""

    _fn = staticmethod(F.dropout3d)


class AlphaDropout(nn.AlphaDropout):
    """Drop-in for ``torch.nn.AlphaDropout`` (SELU networks)."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        F._check_p(p)
        super().__init__(p, inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.alpha_dropout(input, self.p, self.training, self.inplace)


class FeatureAlphaDropout(nn.FeatureAlphaDropout):
    """Drop-in for ``torch.nn.FeatureAlphaDropout``."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        F._check_p(p)
        super().__init__(p, inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.feature_alpha_dropout(input, self.p, self.training, self.inplace)


class LockedDropout(Dropout):
    """Variational ("locked") dropout for sequences: one mask for every time
    step. The time dimension is 0, or 1 with ``batch_first=True``."""

    def __init__(self, p: float = 0.5, batch_first: bool = False) -> None:
        super().__init__(p, False, broadcast_dims=(1 if batch_first else 0,))
        self.batch_first = batch_first

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"


class DropPath(_RuntimeP, nn.Module):
    """Stochastic depth: drops a whole sample's branch (one draw per index of
    dimension 0), scaling kept samples by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = F._check_p(p)
        self._register_runtime_p()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, input.dim()))
        p, bits = self._p_args()
        return F.dropout(input, p, self.training, broadcast_dims=dims or None, _p_bits=bits)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FusedDropout(_RuntimeP, nn.Module):
    """``residual + dropout(act(x + bias))`` as a module."""

    def __init__(self, p: float = 0.5, activation: str = "identity") -> None:
        super().__init__()
        self.p = F._check_p(p)
        F._check_activation(activation)
        self.activation = activation
        self._register_runtime_p()

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        p, bits = self._p_args()
        return F.fused_dropout(x, p, bias=bias, activation=self.activation, residual=residual,
                               training=self.training, _p_bits=bits)

    def extra_repr(self) -> str:
        return f"p={self.p}, activation={self.activation!r}"


_SWAPS = {nn.Dropout: Dropout, nn.Dropout1d: Dropout1d, nn.Dropout2d: Dropout2d, nn.Dropout3d: Dropout3d,
          nn.AlphaDropout: AlphaDropout, nn.FeatureAlphaDropout: FeatureAlphaDropout}


def replace_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout`` and
    ``FeatureAlphaDropout`` in ``model`` for its dropout_ext twin in place,
    keeping p, inplace and training mode; returns how many were swapped.
    Subclasses of those modules are left alone (their forward may differ)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = _SWAPS.get(type(child))
            if twin is not None:
                new = twin(child.p, child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += 1
    return swapped
