"""Functional API: drop-in ``dropout`` and the fused
``residual + dropout(act(input + bias))``."""

from __future__ import annotations

import numbers
import warnings
from typing import Optional, Sequence

import torch

from . import _backend
from . import reference as ref
from ._rng import draw_rng

__all__ = ["dropout", "fused_dropout", "dropout_mask", "dropout1d", "dropout2d", "dropout3d",
           "alpha_dropout", "feature_alpha_dropout", "shared_mask_shape"]

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
                  mask_shape: Optional[Sequence[int]] = None, _p_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + dropout(act(input + bias), p)`` in one pass.

    ``bias`` broadcasts over the last dimension; ``activation`` is one of
    identity, relu, gelu, gelu_tanh, silu; in eval mode (``training=False``)
    it is ``residual + act(input + bias)``. The mask follows docs/RNG.md: with
    ``seed=`` it is a pure function of (seed, offset, shape, p); otherwise
    (seed, offset) is drawn from ``generator`` or the default generator of
    the input's device. ``mask_shape`` (the input's shape with some sizes 1)
    shares one draw along the size-1 dimensions. ``_p_bits`` is set by the
    modules under torch.compile (p as data; ``p`` is then not used).
    """
    p = _check_p(p)
    _check_tensor(input, "input")
    _check_companions(input, bias, residual)
    _check_activation(activation)
    mshape = _check_mask_shape(input, mask_shape)
    _check_seed(seed, offset, generator)
    name = _backend.resolve(backend, input.device)
    if not training or (_p_bits is None and p == 0.0):
        if bias is None and residual is None and activation == "identity":
            return input
        rng = torch.zeros(2, dtype=torch.int64)
        return _backend.run(name, input, bias, residual, rng, 0.0, activation, ())
    rng = _rng_with_p(input, generator, seed, offset, _p_bits)
    return _backend.run(name, input, bias, residual, rng, p, activation, mshape)


def shared_mask_shape(shape: Sequence[int], broadcast_dims: Optional[Sequence[int]]) -> tuple:
    """The mask shape that shares one draw along ``broadcast_dims``: ``shape``
    with those dimensions set to 1 (negative dimensions count from the end)."""
    shape = tuple(int(s) for s in shape)
    if broadcast_dims is None:
        return shape
    if isinstance(broadcast_dims, int):
        broadcast_dims = (broadcast_dims,)
    out = list(shape)
    for d in broadcast_dims:
        if isinstance(d, bool) or not isinstance(d, int) or not -len(shape) <= d < len(shape):
            raise ValueError(f"broadcast_dims must hold dimensions of a {len(shape)}-D input, got {broadcast_dims!r}")
        out[d] = 1
    return tuple(out)


def _rng_with_p(input, generator, seed, offset, p_bits):
    """The rng tensor; with ``p_bits`` (p's binary64 bits as an int64 tensor,
    kept by the modules) it also carries p, which the kernels then read as
    data: a compiled graph does not depend on p's value (docs/RNG.md)."""
    rng = draw_rng(input.device, generator, seed, offset)
    if p_bits is None:
        return rng
    return torch.cat([rng, p_bits.reshape(1).to(rng.device)])


def _apply(input, p, training, inplace, mask_shape, seed, offset, generator, backend, p_bits=None):
    name = _backend.resolve(backend, input.device)
    if not training or (p_bits is None and p == 0.0):
        return input
    rng = _rng_with_p(input, generator, seed, offset, p_bits)
    mshape = () if tuple(mask_shape) == tuple(input.shape) else tuple(mask_shape)
    out = _backend.run(name, input, None, None, rng, p, "identity", mshape)
    if inplace:
        return input.copy_(out)
    return out


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
            backend: Optional[str] = None, broadcast_dims: Optional[Sequence[int]] = None,
            _p_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout`` under the dropout_ext contract.

    ``broadcast_dims`` shares one draw along those dimensions (the mask is
    ``dropout_mask(shared_mask_shape(input.shape, broadcast_dims), ...)``
    broadcast to the input): the same mask for every time step of a sequence
    (variational/locked dropout), or one draw per sample (DropPath).
    """
    p = _check_p(p)
    _check_tensor(input, "input")
    _check_seed(seed, offset, generator)
    mshape = shared_mask_shape(input.shape, broadcast_dims)
    return _apply(input, p, training, inplace, mshape, seed, offset, generator, backend, _p_bits)


def _feature_mask_shape(input: torch.Tensor) -> tuple:
    if input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return tuple(input.shape[:2]) + (1,) * (input.dim() - 2)


def _feature_dropout(input, p, training, inplace, seed, offset, generator, backend, p_bits):
    mshape = _feature_mask_shape(input)
    return _apply(input, p, training, inplace, mshape, seed, offset, generator, backend, p_bits)


def _channel_dropout(input, batched, p, training, inplace, seed, offset, generator, backend, p_bits):
    """Feature dropout of an input that may lack its batch dimension (taken
    as a batch of one, as PyTorch's dropout1d/dropout3d do)."""
    x = input if batched else input.unsqueeze(0)
    out = _feature_dropout(x, p, training, False, seed, offset, generator, backend, p_bits)
    if out is x:  # eval mode or p == 0: the input itself
        return input
    out = out if batched else out.squeeze(0)
    return input.copy_(out) if inplace else out


def _checked(input, p, seed, offset, generator) -> float:
    p = _check_p(p)
    _check_tensor(input, "input")
    _check_seed(seed, offset, generator)
    return p


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None, _p_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout1d``: one draw per channel of
    an (N, C, L) or (C, L) input, broadcast over L by the kernel."""
    p = _checked(input, p, seed, offset, generator)
    inp_dim = input.dim()
    if inp_dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {inp_dim}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs).")
    return _channel_dropout(input, inp_dim == 3, p, training, inplace, seed, offset, generator, backend, _p_bits)


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None, _p_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout2d``, with its shape rules and
    warnings (a 3-D input is taken as (N, C, L), as PyTorch does)."""
    p = _checked(input, p, seed, offset, generator)
    inp_dim = input.dim()
    if inp_dim not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {inp_dim}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=2)
    if inp_dim == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2)
    return _feature_dropout(input, p, training, inplace, seed, offset, generator, backend, _p_bits)


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None, _p_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout3d``: one draw per channel of
    an (N, C, D, H, W) or (C, D, H, W) input."""
    p = _checked(input, p, seed, offset, generator)
    inp_dim = input.dim()
    if inp_dim not in (4, 5):
        warnings.warn(
            f"dropout3d: Received a {inp_dim}-D input to dropout3d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout3d "
            "exists to provide channel-wise dropout on inputs with 3 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs).",
            stacklevel=2)
    return _channel_dropout(input, inp_dim == 5, p, training, inplace, seed, offset, generator, backend, _p_bits)


# SELU's negative saturation value, as in ATen's alpha dropout.
_ALPHA = 1.7580993408473766


def _alpha(input, p, training, inplace, feature, seed, offset, generator, backend):
    if not training or p == 0.0 or input.numel() == 0:
        return input
    mshape = _feature_mask_shape(input) if feature else tuple(input.shape)
    if p == 1.0:
        out = input * torch.zeros((), dtype=input.dtype, device=input.device)
        return input.copy_(out) if inplace else out
    name = _backend.resolve(backend, input.device)
    rng = draw_rng(input.device, generator, seed, offset)
    # ATen's arithmetic on the contract's mask: keep * a, plus b where dropped,
    # so a dropped unit sits at SELU's saturation value after the affine fix.
    noise = _backend.mask(name, rng, mshape, p, input.device).to(input.dtype)
    a = 1.0 / ((_ALPHA * _ALPHA * p + 1) * (1 - p)) ** 0.5
    b = noise.add(-1).mul_(_ALPHA * a).add_(_ALPHA * a * p)
    noise = noise.mul_(a)
    out = input * noise + b
    return input.copy_(out) if inplace else out


def alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False, *,
                  seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.alpha_dropout`` (for SELU networks):
    the contract's mask, ATen's affine correction."""
    p = _checked(input, p, seed, offset, generator)
    return _alpha(input, p, training, inplace, False, seed, offset, generator, backend)


def feature_alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False,
                          *, seed: Optional[int] = None, offset: int = 0,
                          generator: Optional[torch.Generator] = None,
                          backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.feature_alpha_dropout``: one draw per channel."""
    p = _checked(input, p, seed, offset, generator)
    return _alpha(input, p, training, inplace, True, seed, offset, generator, backend)


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


