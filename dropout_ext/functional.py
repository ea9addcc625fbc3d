"""Functional API: drop-in ``dropout`` and its structured twins, the fused
``residual + dropout(act(input + bias))``, and ``dropout_add_norm``
(LayerNorm or RMSNorm of ``residual + dropout(x)``).

Each public function validates its arguments (``_validate``) and then takes
the one internal path, ``_fused``: backend lookup, the dropout state
(``_state``), the backend's op. The modules take the same path with p from
their own tensor (docs/DESIGN.md).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from . import _backend
from ._state import Rate, call_state, make_state
from .sharding import PlaceLike, is_dtensor, mask_place, on_shards, place_words, unbatched
from ._validate import (as_u64, check_fused_args, check_mask_mode, check_norm_args, check_norm_place, check_p,
                        check_seed, check_shape, check_tensor, global_shape, norm_dtypes)

__all__ = ["dropout", "fused_dropout", "dropout_add_norm", "dropout_mask", "dropout1d", "dropout2d", "dropout3d",
           "alpha_dropout", "feature_alpha_dropout", "shared_mask_shape"]


def _fused(input, p: Rate, bias, residual, activation, mask_shape, training, seed=None, offset=0, generator=None,
           backend=None, mask_mode=None, place=None):
    """The one path to a kernel, for arguments already validated. ``p`` is a
    float, or a module's tensor of p's bits (then a compiled graph does not
    depend on its value). Without dropout to do, no state is made and no
    random word is drawn. The forward packs its keep mask for the backward
    in the packed mask mode, and only when a backward will read it.
    ``place``: the ops' words (``sharding.place_words``), or None; a
    DTensor input runs here once more on its shard, at its place."""
    if type(input) is not torch.Tensor and is_dtensor(input):  # the test inline: no call on the hot path
        _no_place(place)
        linear = bias is None and residual is None and activation == "identity"
        return on_shards(lambda x, b, r, at: _fused(x, p, b, r, activation, mask_shape, training, seed, offset,
                                                    generator, backend, mask_mode, at),
                         input, (("last", bias), ("like", residual)), linear=linear)
    ops = _backend.ops_for(backend, input.device, input.dtype)
    if not training or (not isinstance(p, torch.Tensor) and p == 0.0):
        if bias is None and residual is None and activation == "identity":
            return input
        return ops.forward(input, bias, residual, None, activation, [])[0]
    state, p_draw = call_state(input.device, p, seed, offset, generator)
    pack = (torch.is_grad_enabled() and (input.requires_grad or (bias is not None and bias.requires_grad))
            and (mask_mode or _backend.default_mask_mode(input.device)) == "packed")
    return ops.forward(input, bias, residual, state, activation, mask_shape, None, pack, p_draw,
                       generator if p_draw is not None else None, place)[0]


def _no_place(place) -> None:
    if place is not None:
        raise ValueError("place is for plain local tensors: a DTensor input says where it sits itself")


def _dropout(input, p: Rate, training, inplace, mask_shape, seed=None, offset=0, generator=None, backend=None,
             mask_mode=None, place=None):
    out = _fused(input, p, None, None, "identity", mask_shape, training, seed, offset, generator, backend,
                 mask_mode, place)
    if out is input:
        return input
    return input.copy_(out) if inplace else out


def _autocasting(input) -> bool:
    return isinstance(input, torch.Tensor) and torch.is_autocast_enabled(input.device.type)


def _cast(t, dtype, keep=()):
    """A floating tensor companion cast to ``dtype``, unless its dtype is in ``keep``."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype and t.dtype not in keep:
        return t.to(dtype)
    return t


def _follow_autocast(input, bias, residual):
    """Under autocast a matmul's output is in the autocast dtype while the
    bias and the residual stream stay float32: they are cast to the input's
    dtype, as autocast casts nn.Linear's bias to its matmul's. Outside
    autocast a dtype mismatch stays an error."""
    if not _autocasting(input):
        return bias, residual
    return _cast(bias, input.dtype), _cast(residual, input.dtype)


def fused_dropout(input: torch.Tensor, p: float = 0.5, *, bias: Optional[torch.Tensor] = None,
                  activation: str = "identity", residual: Optional[torch.Tensor] = None,
                  training: bool = True, seed: Optional[int] = None, offset: int = 0,
                  generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                  mask_shape: Optional[Sequence[int]] = None, mask_mode: Optional[str] = None,
                  place: PlaceLike = None) -> torch.Tensor:
    """``residual + dropout(act(input + bias), p)`` in one pass.

    ``bias`` broadcasts over the last dimension; ``activation`` is one of
    identity, relu, gelu, gelu_tanh, silu; in eval mode (``training=False``)
    it is ``residual + act(input + bias)``. The mask follows docs/RNG.md: with
    ``seed=`` it is a pure function of (seed, offset, shape, p); otherwise
    (seed, offset) is drawn from ``generator`` or the default generator of
    the input's device. ``mask_shape`` (the input's shape with some sizes 1)
    shares one draw along the size-1 dimensions. ``mask_mode`` says what the
    backward reads: "regenerate" draws the mask again from the saved
    (seed, offset), "packed" reads the keep bits the forward saved (1 bit per
    element); None takes the device's default (README, "Mask modes").

    Sharded tensors (README, "Sharded training"): a DTensor input (and
    bias, residual) gives a DTensor with the input's placements, each
    shard drawing the single-device mask; ``place`` (a ``Place``, ``Split``
    or tuple of Splits) says where a plain local input sits in the global
    tensor, and ``mask_shape`` then speaks of the global shape.
    """
    p = check_p(p)
    check_mask_mode(mask_mode)
    bias, residual = _follow_autocast(input, bias, residual)
    words = place_words(place, input.shape) if place is not None else None
    mshape = check_fused_args(input, bias, residual, activation, mask_shape, words)
    check_seed(seed, offset, generator, input.device)
    return _fused(input, p, bias, residual, activation, mshape, training, seed, offset, generator, backend,
                  mask_mode, words)


def _norm(input, p: Rate, residual, weight, bias, eps, norm, prenorm, residual_in_fp32, training, seed=None,
          offset=0, generator=None, backend=None, place=None):
    """The one path of ``dropout_add_norm`` to a kernel, for arguments already
    validated; ``p`` and ``place`` as in ``_fused``. Without dropout to do,
    the op gets no state: it keeps every element and draws nothing."""
    if is_dtensor(input):
        _no_place(place)
        return on_shards(lambda x, r, w, b, at: _norm(x, p, r, w, b, eps, norm, prenorm, residual_in_fp32, training,
                                                      seed, offset, generator, backend, at),
                         input, (("like", residual), ("whole", weight), ("whole", bias)), whole_last=True)
    ops = _backend.ops_for(backend, input.device, input.dtype)
    state = p_draw = None
    if training and (isinstance(p, torch.Tensor) or p != 0.0):
        state, p_draw = call_state(input.device, p, seed, offset, generator)
    y, h, _, _, _ = ops.norm(input, residual, weight, bias, state, norm, float(eps), residual_in_fp32, p_draw,
                             generator if p_draw is not None else None, place)
    return (y, h) if prenorm else y


def _follow_autocast_norm(input, residual, weight, bias, residual_in_fp32):
    """``_follow_autocast`` for ``dropout_add_norm``: the residual stream is
    cast to h's dtype (the input's, or float32 with ``residual_in_fp32``);
    a weight or bias in neither the input's dtype nor float32 to the
    input's (float32 parameters stay: the kernels read them as they are)."""
    if not _autocasting(input) or not input.is_floating_point():
        return residual, weight, bias
    h_dtype = norm_dtypes(input.dtype, residual_in_fp32 is True)[0]
    keep = (torch.float32,)
    return _cast(residual, h_dtype), _cast(weight, input.dtype, keep), _cast(bias, input.dtype, keep)


def _check_prenorm(prenorm) -> None:
    if not isinstance(prenorm, bool):
        raise TypeError(f"prenorm must be a bool, got {type(prenorm).__name__}")


def dropout_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, p: float = 0.5, eps: float = 1e-5, *, norm: str = "layer",
                     prenorm: bool = False, residual_in_fp32: bool = False, training: bool = True,
                     seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
                     backend: Optional[str] = None, place: PlaceLike = None):
    """``h = residual + dropout(x, p)``, ``y = norm(h) * weight + bias`` in one
    pass over each row (the last dimension); returns ``y``, or ``(y, h)`` with
    ``prenorm=True`` (a pre-norm block carries h on as its residual stream).

    ``norm`` is "layer" (LayerNorm) or "rms" (RMSNorm); ``weight`` and
    ``bias`` (optional) are 1-D of the last dimension's size, in x's dtype or
    float32. h is stored in x's dtype, or in float32 with
    ``residual_in_fp32=True`` for float16/bfloat16 x (then ``residual`` is
    float32 too); the statistics are float32 (float64 for float64 x) and y
    is in x's dtype. With the same (seed, offset, p), h equals
    ``fused_dropout(x, p, residual=residual)`` bit for bit and the mask is
    ``dropout_mask(x.shape, p, seed, offset)``; ``training=False`` (or
    p == 0) is the plain norm of ``residual + x``. seed, offset, generator
    and backend: as in ``fused_dropout``; ``place`` too, for a shard that
    holds whole rows (a DTensor input must not shard the last dimension).
    """
    p = check_p(p)
    _check_prenorm(prenorm)
    residual, weight, bias = _follow_autocast_norm(x, residual, weight, bias, residual_in_fp32)
    check_norm_args(x, residual, weight, bias, norm, eps, residual_in_fp32)
    check_seed(seed, offset, generator, x.device)
    words = place_words(place, x.shape) if place is not None else None
    check_norm_place(x.shape, words)
    return _norm(x, p, residual, weight, bias, eps, norm, prenorm, residual_in_fp32, training, seed, offset,
                 generator, backend, words)


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


def _checked(input, p, seed, offset, generator) -> float:
    p = check_p(p)
    check_tensor(input, "input")
    check_seed(seed, offset, generator, input.device)
    return p


def _broadcast_dropout(input, p: Rate, training, inplace, broadcast_dims, seed=None, offset=0, generator=None,
                       backend=None, mask_mode=None, place=None):
    """``dropout`` of a validated input; ``place``: the ops' words. A mask
    shape speaks of the global tensor (a DTensor's shape is global)."""
    mshape = ()
    if broadcast_dims is not None:
        full = global_shape(input.shape, place)
        mshape = shared_mask_shape(full, broadcast_dims)
        mshape = () if mshape == full else mshape
    return _dropout(input, p, training, inplace, mshape, seed, offset, generator, backend, mask_mode, place)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
            backend: Optional[str] = None, broadcast_dims: Optional[Sequence[int]] = None,
            mask_mode: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout`` under the dropout_ext contract.

    ``broadcast_dims`` shares one draw along those dimensions (the mask is
    ``dropout_mask(shared_mask_shape(input.shape, broadcast_dims), ...)``
    broadcast to the input): the same mask for every time step of a sequence
    (variational/locked dropout), or one draw per sample (DropPath).
    ``mask_mode`` and ``place``: as in ``fused_dropout``.
    """
    p = _checked(input, p, seed, offset, generator)
    check_mask_mode(mask_mode)
    return _broadcast_dropout(input, p, training, inplace, broadcast_dims, seed, offset, generator, backend,
                              mask_mode, _words(place, input))


def _words(place, input) -> Optional[list]:
    """The ops' place words of a public call's ``place=`` (None: none)."""
    if place is None:
        return None
    if is_dtensor(input):
        _no_place(place)
    return place_words(place, input.shape)


def _feature_mask_shape(shape) -> tuple:
    if len(shape) < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return tuple(shape[:2]) + (1,) * (len(shape) - 2)


def _channel_dropout(batched, input, p: Rate, training, inplace, seed=None, offset=0, generator=None,
                     backend=None, place=None):
    """Feature dropout (one draw per channel, broadcast by the kernel) of an
    input that may lack its batch dimension (taken as a batch of one, as
    PyTorch's dropout1d/dropout3d do); ``place``: the ops' words."""
    x = input if batched else input.unsqueeze(0)
    at = place if batched else unbatched(place)
    out = _dropout(x, p, training, False, _feature_mask_shape(global_shape(x.shape, at)), seed, offset, generator,
                   backend, None, at)
    if out is x:  # eval mode or p == 0: the input itself
        return input
    out = out if batched else out.squeeze(0)
    return input.copy_(out) if inplace else out


def _batched_1d(input) -> bool:
    """nn's shape rule of dropout1d: (N, C, L) or (C, L)."""
    inp_dim = input.dim()
    if inp_dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {inp_dim}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs).")
    return inp_dim == 3


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout1d``: one draw per channel of
    an (N, C, L) or (C, L) input, broadcast over L by the kernel."""
    p = _checked(input, p, seed, offset, generator)
    return _channel_dropout(_batched_1d(input), input, p, training, inplace, seed, offset, generator, backend,
                            _words(place, input))


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _warn_rank(spatial: int, inp_dim: int) -> None:
    """nn's deprecation warning for dropout2d/3d on an input of another rank."""
    if inp_dim not in (spatial + 1, spatial + 2):
        _warn(f"dropout{spatial}d: Received a {inp_dim}-D input to dropout{spatial}d, which is deprecated "
              "and will result in an error in a future release. To retain the behavior "
              f"and silence this warning, please use dropout instead. Note that dropout{spatial}d "
              f"exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, "
              "a channel dimension, and an optional batch dimension "
              f"(i.e. {spatial + 1}D or {spatial + 2}D inputs).")


def _batched_2d(input) -> bool:
    """nn's shape rule of dropout2d, with its warnings: every input is taken
    as batched (a 3-D input as (N, C, L))."""
    _warn_rank(2, input.dim())
    if input.dim() == 3:
        _warn("dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
              "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
              "is the channel dim. This behavior will change in a future release to interpret the "
              "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
              "channel-wise dropout behavior, please switch to using dropout1d instead.")
    return True


def _batched_3d(input) -> bool:
    """nn's shape rule of dropout3d, with its warning: (N, C, D, H, W) or (C, D, H, W)."""
    _warn_rank(3, input.dim())
    return input.dim() == 5


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout2d``, with its shape rules and
    warnings (a 3-D input is taken as (N, C, L), as PyTorch does)."""
    p = _checked(input, p, seed, offset, generator)
    return _channel_dropout(_batched_2d(input), input, p, training, inplace, seed, offset, generator, backend,
                            _words(place, input))


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.dropout3d``: one draw per channel of
    an (N, C, D, H, W) or (C, D, H, W) input."""
    p = _checked(input, p, seed, offset, generator)
    return _channel_dropout(_batched_3d(input), input, p, training, inplace, seed, offset, generator, backend,
                            _words(place, input))


# SELU's negative saturation value, as in ATen's alpha dropout.
_ALPHA = 1.7580993408473766


def _alpha(input, p, training, inplace, feature, seed, offset, generator, backend, place=None):
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if is_dtensor(input):
        _no_place(place)
        out = on_shards(lambda x, at: _alpha(x, p, training, False, feature, seed, offset, generator, backend, at),
                        input)
        return input.copy_(out) if inplace else out
    full = global_shape(input.shape, place)
    if p == 1.0:
        out = input * torch.zeros((), dtype=input.dtype, device=input.device)
        return input.copy_(out) if inplace else out
    ops = _backend.ops_for(backend, input.device)
    mshape, at = mask_place(input.shape, _feature_mask_shape(full) if feature else full, place)
    # ATen's arithmetic on the contract's mask: keep * a, plus b where dropped,
    # so a dropped unit sits at SELU's saturation value after the affine fix.
    noise = ops.mask(make_state(input.device, p, seed, offset, generator), list(mshape), at).to(input.dtype)
    a = 1.0 / ((_ALPHA * _ALPHA * p + 1) * (1 - p)) ** 0.5
    b = noise.add(-1).mul_(_ALPHA * a).add_(_ALPHA * a * p)
    noise = noise.mul_(a)
    out = input * noise + b
    return input.copy_(out) if inplace else out


def alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False, *,
                  seed: Optional[int] = None, offset: int = 0, generator: Optional[torch.Generator] = None,
                  backend: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.alpha_dropout`` (for SELU networks):
    the contract's mask, ATen's affine correction."""
    p = _checked(input, p, seed, offset, generator)
    return _alpha(input, p, training, inplace, False, seed, offset, generator, backend, _words(place, input))


def feature_alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False,
                          *, seed: Optional[int] = None, offset: int = 0,
                          generator: Optional[torch.Generator] = None,
                          backend: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.feature_alpha_dropout``: one draw per channel."""
    p = _checked(input, p, seed, offset, generator)
    return _alpha(input, p, training, inplace, True, seed, offset, generator, backend, _words(place, input))


def dropout_mask(shape: Sequence[int], p: float, seed: int, offset: int = 0, *, device="cpu",
                 backend: Optional[str] = None, place: PlaceLike = None) -> torch.Tensor:
    """The contract's boolean keep mask (True = kept) for ``shape``; with
    ``place``, the block of the global tensor's mask that a local tensor of
    ``shape`` at that place draws."""
    p = check_p(p)
    as_u64(seed, "seed")
    as_u64(offset, "offset")
    shape = check_shape(shape)
    words = place_words(place, shape) if place is not None else None
    device = torch.device(device)
    ops = _backend.ops_for(backend, device)
    return ops.mask(make_state(device, p, seed, offset), list(shape), words)
