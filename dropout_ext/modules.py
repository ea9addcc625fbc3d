"""Drop-in modules."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import functional as F
from ._state import p_bits
from .sharding import check_rule
from ._validate import (check_activation, check_fused_args, check_mask_mode, check_norm_args, check_norm_place, check_p,
                        check_tensor)

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
           "LockedDropout", "DropPath", "FusedDropout", "DropoutAddLayerNorm", "DropoutAddRMSNorm",
           "replace_dropout"]


class _Placed:
    """A module's ``place``: where its (plain, local) inputs sit in the global
    tensor (``sharding``: a Place, a Split or a tuple of Splits), or None.
    Set it by assignment, or for a whole model with
    ``sharding.data_parallel``."""

    place = None

    def __setattr__(self, name, value):
        if name == "place":
            value = check_rule(value)
        super().__setattr__(name, value)

    def _words(self, input) -> Optional[list]:
        """The ops' place words for this input (a DTensor says its own). The
        hot forwards test ``self.place is None`` inline: no call without one."""
        return F._words(self.place, input)


class _RuntimeP(_Placed):
    """p as the number users read and assign, and as the tensor of its
    binary64 bits that becomes the dropout state's third word (an int64
    buffer: ``.half()`` leaves it alone, ``state_dict`` omits it, ``.to()``
    moves it), updated on every assignment."""

    def _register_runtime_p(self) -> None:
        self.register_buffer("_p_bits", torch.tensor(p_bits(self.p), dtype=torch.int64), persistent=False)

    def __setattr__(self, name, value):
        if name == "p":
            value = check_p(value)
        super().__setattr__(name, value)
        if name == "p" and "_p_bits" in self.__dict__.get("_buffers", {}):
            self._buffers["_p_bits"].fill_(p_bits(value))

    def _rate(self, input: torch.Tensor):
        """p for the kernels. Under torch.compile the tensor, so p is data and
        a schedule that changes it keeps one graph; in eager mode the number,
        which skips all work at p == 0. A module left on another device than
        its input (nn.Dropout holds no tensor, so models often never move it)
        gives the number under compile too: a graph specialised on p beats a
        copy from the host on every call."""
        if torch.compiler.is_compiling() and self._p_bits.device == input.device:
            return self._p_bits
        return self.p


class Dropout(_RuntimeP, nn.Dropout):
    """Drop-in for ``torch.nn.Dropout``: same arguments, errors, ``repr``,
    train/eval behaviour and (empty) state dict; the mask follows the
    dropout_ext contract. It is an ``nn.Dropout``, so code that checks
    ``isinstance(m, nn.Dropout)`` keeps working.

    ``broadcast_dims`` (optional) shares one draw along those dimensions;
    ``mask_mode`` (optional) is what the backward reads, as in
    ``functional.fused_dropout``."""

    def __init__(self, p: float = 0.5, inplace: bool = False,
                 broadcast_dims: Optional[Sequence[int]] = None, mask_mode: Optional[str] = None) -> None:
        check_p(p)  # first: nn.Dropout lets NaN through and fails obscurely on a non-number
        super().__init__(p, inplace)
        self.broadcast_dims = tuple(broadcast_dims) if broadcast_dims is not None else None
        self.mask_mode = check_mask_mode(mask_mode)
        self._register_runtime_p()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_tensor(input, "input")
        place = None if self.place is None else self._words(input)
        return F._broadcast_dropout(input, self._rate(input), self.training, self.inplace, self.broadcast_dims,
                                    mask_mode=self.mask_mode, place=place)

    def extra_repr(self) -> str:
        extra = f", broadcast_dims={self.broadcast_dims}" if self.broadcast_dims is not None else ""
        extra += f", mask_mode={self.mask_mode!r}" if self.mask_mode is not None else ""
        return super().extra_repr() + extra


class _ChannelTwin(_RuntimeP):
    """Dropout1d/2d/3d: nn's twin's constructor with p checked first, and
    channel dropout under the twin's shape rule (``_batched``)."""

    _batched = None

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        check_p(p)
        super().__init__(p, inplace)
        self._register_runtime_p()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_tensor(input, "input")
        batched = type(self)._batched(input)
        return F._channel_dropout(batched, input, self._rate(input), self.training, self.inplace,
                                  place=None if self.place is None else self._words(input))


class Dropout1d(_ChannelTwin, nn.Dropout1d):
    """Drop-in for ``torch.nn.Dropout1d``: one draw per channel, broadcast over
    the length by the kernel (no full-size mask)."""

    _batched = staticmethod(F._batched_1d)


class Dropout2d(_ChannelTwin, nn.Dropout2d):
    """Drop-in for ``torch.nn.Dropout2d`` (same shape rules and warnings)."""

    _batched = staticmethod(F._batched_2d)


class Dropout3d(_ChannelTwin, nn.Dropout3d):
    """Drop-in for ``torch.nn.Dropout3d`` (same shape rules and warnings)."""

    _batched = staticmethod(F._batched_3d)


class _AlphaTwin(_Placed):
    """AlphaDropout/FeatureAlphaDropout: nn's twin's constructor with p
    checked first, and the matching functional (``_fn``). p stays a number:
    the affine constants are computed from it in Python."""

    _fn = None

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        check_p(p)
        super().__init__(p, inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(input, self.p, self.training, self.inplace, place=self.place)


class AlphaDropout(_AlphaTwin, nn.AlphaDropout):
    """Drop-in for ``torch.nn.AlphaDropout`` (SELU networks)."""

    _fn = staticmethod(F.alpha_dropout)


class FeatureAlphaDropout(_AlphaTwin, nn.FeatureAlphaDropout):
    """Drop-in for ``torch.nn.FeatureAlphaDropout``."""

    _fn = staticmethod(F.feature_alpha_dropout)


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
        self.p = check_p(p)
        self._register_runtime_p()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_tensor(input, "input")
        dims = tuple(range(1, input.dim()))
        return F._broadcast_dropout(input, self._rate(input), self.training, False, dims or None,
                                    place=None if self.place is None else self._words(input))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FusedDropout(_RuntimeP, nn.Module):
    """``residual + dropout(act(x + bias))`` as a module."""

    def __init__(self, p: float = 0.5, activation: str = "identity", mask_mode: Optional[str] = None) -> None:
        super().__init__()
        self.p = check_p(p)
        check_activation(activation)
        self.activation = activation
        self.mask_mode = check_mask_mode(mask_mode)
        self._register_runtime_p()

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        bias, residual = F._follow_autocast(x, bias, residual)
        words = None if self.place is None else self._words(x)
        mshape = check_fused_args(x, bias, residual, self.activation, None, words)
        return F._fused(x, self._rate(x), bias, residual, self.activation, mshape, self.training,
                        mask_mode=self.mask_mode, place=words)

    def extra_repr(self) -> str:
        extra = f", mask_mode={self.mask_mode!r}" if self.mask_mode is not None else ""
        return f"p={self.p}, activation={self.activation!r}" + extra


class _DropoutAddNorm(_RuntimeP, nn.Module):
    """``norm(residual + dropout(x)) * weight + bias`` over the last
    dimension (``functional.dropout_add_norm``), with ``weight``/``bias``
    named and initialised as nn.LayerNorm's and nn.RMSNorm's (ones, zeros),
    so state dicts load either way."""

    _norm = None

    def __init__(self, hidden_size: int, p: float, eps: float, prenorm: bool, residual_in_fp32: bool,
                 elementwise_affine: bool, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.p = check_p(p)
        for name, flag in (("prenorm", prenorm), ("residual_in_fp32", residual_in_fp32),
                           ("elementwise_affine", elementwise_affine), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        for name, present in (("weight", elementwise_affine), ("bias", elementwise_affine and bias)):
            self.register_parameter(name, nn.Parameter(torch.empty(hidden_size, **factory)) if present else None)
        self.reset_parameters()
        self._register_runtime_p()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """y, or (y, h) with prenorm (h = residual + dropout(x))."""
        residual, weight, bias = F._follow_autocast_norm(x, residual, self.weight, self.bias, self.residual_in_fp32)
        check_norm_args(x, residual, weight, bias, self._norm, self.eps, self.residual_in_fp32)
        words = None if self.place is None else self._words(x)
        check_norm_place(x.shape, words)
        return F._norm(x, self._rate(x), residual, weight, bias, self.eps, self._norm, self.prenorm,
                       self.residual_in_fp32, self.training, place=words)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, p={self.p}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (f", bias={self.bias is not None}" if self.elementwise_affine else "")
                + f", prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}")


class DropoutAddLayerNorm(_DropoutAddNorm):
    """``LayerNorm(residual + Dropout(x))`` in one pass; ``forward(x,
    residual=None)`` returns y, or (y, h) with ``prenorm=True``. Parameters
    as ``nn.LayerNorm(hidden_size, eps, elementwise_affine, bias)``'s (its
    state dict loads here and back); p is runtime data like every module's."""

    _norm = "layer"

    def __init__(self, hidden_size: int, p: float = 0.5, eps: float = 1e-5, prenorm: bool = False,
                 residual_in_fp32: bool = False, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(hidden_size, p, eps, prenorm, residual_in_fp32, elementwise_affine, bias, device, dtype)


class DropoutAddRMSNorm(_DropoutAddNorm):
    """``RMSNorm(residual + Dropout(x))`` in one pass, as DropoutAddLayerNorm;
    parameters as ``nn.RMSNorm(hidden_size, eps, elementwise_affine)``'s."""

    _norm = "rms"

    def __init__(self, hidden_size: int, p: float = 0.5, eps: float = 1e-6, prenorm: bool = False,
                 residual_in_fp32: bool = False, elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(hidden_size, p, eps, prenorm, residual_in_fp32, elementwise_affine, False, device, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", bias=False", "")


_SWAPS = {nn.Dropout: Dropout, nn.Dropout1d: Dropout1d, nn.Dropout2d: Dropout2d, nn.Dropout3d: Dropout3d,
          nn.AlphaDropout: AlphaDropout, nn.FeatureAlphaDropout: FeatureAlphaDropout}


def _device_of(modules, model: nn.Module) -> Optional[torch.device]:
    """Where a module made to replace others belongs: with the first
    parameter of ``modules``, else of the model, else its first buffer (nn.Dropout holds
    no tensor, and a dropout_ext Dropout's p buffer may have been left
    behind); None for a model without tensors."""
    for m in list(modules) + [model]:
        for t in m.parameters():
            return t.device
    for t in model.buffers():
        return t.device
    return None


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
                # Beside its neighbours: its p buffer meets the input there,
                # or under torch.compile p is a number, one graph per value.
                device = _device_of([parent], model)
                if device is not None:
                    new.to(device)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += 1
    return swapped
