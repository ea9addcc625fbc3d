"""Functional API: drop-in ``dropout`` and the fused
``residual + dropout(act(input + bias))``."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from . import _backend
from . import reference as ref
from ._rng import draw_rng

__all__ = ["dropout", "fused_dropout", "dropout_mask"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_p(p) -> float:
    if isinstance(p, torch.Tensor) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout probability p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_companions(input, bias, residual) -> None:
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.device != input.device:
            raise ValueError(f"bias is on {bias.device}, but input is on {input.device}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}, but input has {input.dtype}")
        if input.dim() == 0 or bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
            last = input.shape[-1] if input.dim() else "none (0-dim input)"
            raise ValueError(f"bias must be 1-D with the size of input's last dimension ({last}), "
                             f"got shape {tuple(bias.shape)}")
    if residual is not None:
        _check_tensor(residual, "residual")
        if residual.device != input.device:
            raise ValueError(f"residual is on {residual.device}, but input is on {input.device}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual has dtype {residual.dtype}, but input has {input.dtype}")
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, "
                             f"got {tuple(residual.shape)}")


def _check_activation(activation) -> None:
    if activation not in ref.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")


def _check_mask_shape(input, mask_shape) -> tuple:
    if mask_shape is None:
        return ()
    shape = tuple(int(s) for s in mask_shape)
    if len(shape) != input.dim() or any(m not in (s, 1) for m, s in zip(shape, input.shape)):
        raise ValueError(f"mask_shape must have input's rank with each size equal to input's "
                         f"{tuple(input.shape)} or 1, got {shape}")
    return () if shape == tuple(input.shape) else shape


def _check_seed(seed, offset, generator) -> None:
    if seed is not None:
        ref.as_u64(seed, "seed")
        ref.as_u64(offset, "offset")
        if generator is not None:
            raise ValueError("pass either seed= or generator=, not both")


def fused_dropout(input: torch.Tensor, p: float = 0.5, *, bias: Optional[torch.Tensor] = None,
                  activation: str = "identity", residual: Optional[torch.Tensor] = None,
                  training: bool = True, seed: Optional[int] = None, offset: int = 0,
                  generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                  mask_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``residual + dropout(act(input + bias), p)`` in one pass.

    ``bias`` broadcasts over the last dimension; ``activation`` is one of
    identity, relu, gelu, gelu_tanh, silu; in eval mode (``training=False``)
    it is ``residual + act(input + bias)``. The mask follows docs/RNG.md: with
    ``seed=`` it is a pure function of (seed, offset, shape, p); otherwise
    (seed, offset) is drawn from ``generator`` or the default generator of
    the input's device. ``mask_shape`` (the input's shape with some sizes 1)
    shares one draw along the size-1 dimensions.
    """
    p = _check_p(p)
    _check_tensor(input, "input")
    _check_companions(input, bias, residual)
    _check_activation(activation)
    mshape = _check_mask_shape(input, mask_shape)
    _check_seed(seed, offset, generator)
    name = _backend.resolve(backend, input.device)
    if not training or p == 0.0:
        if bias is None and residual is None and activation == "identity":
            return input
        rng = torch.zeros(2, dtype=torch.int64)
        return _backend.run(name, input, bias, residual, rng, 0.0, activation, ())
    rng = draw_rng(input.device, generator, seed, offset)
    return _backend.run(name, input, bias, residual, rng, p, activation, mshape)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
            backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout`` under the dropout_ext contract."""
    p = _check_p(p)
    _check_tensor(input, "input")
    _check_seed(seed, offset, generator)
    name = _backend.resolve(backend, input.device)
    if not training or p == 0.0:
        return input
    rng = draw_rng(input.device, generator, seed, offset)
    out = _backend.run(name, input, None, None, rng, p, "identity", ())
    if inplace:
        return input.copy_(out)
    return out


def dropout_mask(shape: Sequence[int], p: float, seed: int, offset: int = 0, *, device="cpu",
                 backend: Optional[str] = None) -> torch.Tensor:
    """The contract's boolean keep mask (True = kept) for ``shape``."""
    p = _check_p(p)
    ref.as_u64(seed, "seed")
    ref.as_u64(offset, "offset")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    device = torch.device(device)
    name = _backend.resolve(backend, device)
    rng = draw_rng(device, None, seed, offset)
    return _backend.mask(name, rng, shape, p, device)


