"""Pure-PyTorch implementation of the dropout_ext contract (docs/RNG.md).

This is the oracle the kernels are tested against and the fallback when the
compiled extension is missing. It favours being obviously the contract over
speed: Philox runs on int64 tensors (32-bit words, products split so nothing
overflows), and the activations are the same IEEE operation sequences as
``csrc/activations.h``, one float32 tensor op per step.

The seed, offset and p may be host numbers or 0-dim tensors: the op kernels
take them from the dropout state by tensor ops alone, never reading it on the
host (on a GPU that read would be a synchronisation, and would break graph
capture). A state on the CPU serves an input on any device as it is: its
0-dim views enter the input's kernels as scalar arguments, where copying it
over would be a transfer per call and make every key and threshold step a
launch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._contract import F32, F64
from ._validate import ACTIVATIONS, as_u64, norm_dtypes  # noqa: F401  (the reference's names)

M32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


# The activations' constants, from the one table every backend uses (float32
# values; the *_F64 ones are the float64 activations').
EXP_MIN = F32["EXP_MIN"]
LOG2E = F32["LOG2E"]
ROUND_MAGIC = F32["ROUND_MAGIC"]
LN2_HI = F32["LN2_HI"]
LN2_LO = F32["LN2_LO"]
EXP_TAYLOR = [F32[f"EXP_C{i}"] for i in range(7, -1, -1)]  # Horner order: 1/7! first
SQRT1_2 = F32["SQRT1_2"]
AS_P = F32["AS_P"]
AS_A = [F32[f"AS_A{i}"] for i in range(1, 6)]  # Horner order: a1 first
INV_SQRT_2PI = F32["INV_SQRT_2PI"]
SQRT_2_OVER_PI = F32["SQRT_2_OVER_PI"]
GELU_TANH_C = F32["GELU_TANH_C"]
GELU_TANH_3C = F32["GELU_TANH_3C"]
SQRT1_2_F64 = F64["SQRT1_2_F64"]
INV_SQRT_2PI_F64 = F64["INV_SQRT_2PI_F64"]
SQRT_2_OVER_PI_F64 = F64["SQRT_2_OVER_PI_F64"]
GELU_TANH_C_F64 = F64["GELU_TANH_C_F64"]


# --- Philox4x32-10 -----------------------------------------------------------

def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) words of the 64-bit product a * m, with a < 2**32 in int64."""
    t_lo = a * (m & 0xFFFF)          # < 2**48
    t_hi = a * (m >> 16)             # < 2**48
    s = t_hi + (t_lo >> 16)          # < 2**49
    return s >> 16, ((s & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """The four output words (int64 tensors holding uint32) for counters c0..c3
    (tensors that broadcast together) under key words k0, k1 (ints or 0-dim
    int64 tensors, < 2**32)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & M32
        k1 = (k1 + PHILOX_W1) & M32
    return c0, c1, c2, c3


# A seed or offset: a host integer (any 64-bit value, as the API takes it) or
# a 0-dim int64 tensor holding its two's-complement word (a state's).
Word = Union[int, torch.Tensor]
# p: a host number or a 0-dim float64 tensor (a state's p bits, viewed).
Rate = Union[float, torch.Tensor]


def sanitised_p(p: Rate) -> torch.Tensor:
    """p as every kernel takes it (make_mask_params in csrc/philox.h): NaN and
    negatives mean 0, 1 and above drop everything; float64, p's device."""
    return torch.as_tensor(p, dtype=torch.float64).nan_to_num(0.0).clamp(0.0, 1.0)


def threshold(p: Rate) -> torch.Tensor:
    """floor(p * 2**32) in double, a 0-dim int64 tensor: words are below
    2**32, so t == 2**32 (p == 1) drops everything and t == 0 keeps all,
    with no branch on p."""
    return torch.floor(sanitised_p(p) * 4294967296.0).to(torch.int64)


def scale(p: Rate, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p) in double, rounded once to the math type ``dtype``; 0 when
    everything is dropped. A 0-dim tensor on p's device."""
    p = sanitised_p(p)
    return torch.where(p < 1.0, _div(1.0, 1.0 - p), 0.0).to(dtype)


def _u64(word: Word, name: str) -> Word:
    return word if isinstance(word, torch.Tensor) else as_u64(word, name)


def philox_words(indices: torch.Tensor, seed: Word, offset: Word) -> torch.Tensor:
    """The Philox word each logical element index takes (int64 holding uint32)."""
    seed, offset = _u64(seed, "seed"), _u64(offset, "offset")
    idx = indices.to(torch.int64)
    group = idx >> 2
    # `& M32` after `>> 32`: the shift of an int64 word keeps its sign.
    words = philox4x32_10(group & M32, (group >> 32) & M32, offset & M32, (offset >> 32) & M32,
                          seed & M32, (seed >> 32) & M32)
    stacked = torch.stack(words, dim=-1)
    return stacked.gather(-1, (idx & 3).unsqueeze(-1)).squeeze(-1)


def keep_for_indices(indices: torch.Tensor, p: Rate, seed: Word, offset: Word = 0) -> torch.Tensor:
    """Keep bits of the given logical indices, for checking slices of huge tensors."""
    return philox_words(indices, seed, offset) >= threshold(p)


def global_indices(shape: Sequence[int], place: Optional[Sequence[int]] = None, device="cpu") -> torch.Tensor:
    """The contract's index of each element of a tensor of ``shape``: its
    row-major index, or with ``place`` (global shape..., start...) its
    row-major index in the global tensor (docs/RNG.md, "Sharded tensors")."""
    shape = tuple(int(s) for s in shape)
    if place is None:
        return torch.arange(math.prod(shape), dtype=torch.int64, device=device).reshape(shape)
    n = len(shape)
    idx = torch.zeros((1,) * n, dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(n)):
        coord = torch.arange(shape[d], dtype=torch.int64, device=device) + int(place[n + d])
        idx = idx + (coord * stride).reshape((1,) * d + (-1,) + (1,) * (n - 1 - d))
        stride *= int(place[d])
    return idx.expand(shape).contiguous()


def dropout_mask(shape: Sequence[int], p: Rate, seed: Word, offset: Word = 0, device="cpu",
                 place: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The contract's boolean keep mask of ``shape``: element i (row-major,
    or its global index under ``place``) is kept iff Philox word i & 3 of
    counter (i >> 2, offset) under key seed is >= t."""
    return keep_for_indices(global_indices(shape, place, device), p, seed, offset)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A keep mask as the packed mask mode stores it: 8 elements per byte in
    row-major order, element i at bit i % 8 of byte i // 8, zeros past the end."""
    flat = keep.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=keep.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The boolean keep mask of ``shape`` that ``pack_bits`` packed into ``bits``."""
    shape = tuple(int(s) for s in shape)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    return flat[:math.prod(shape)].bool().reshape(shape)


# --- activations (float32 sequences of csrc/activations.h) --------------------

def _div(num, den: torch.Tensor) -> torch.Tensor:
    # One IEEE division; ``2.0 / t`` would be reciprocal-then-multiply.
    if not isinstance(num, torch.Tensor):
        num = torch.full_like(den, num)
    return torch.div(num, den)


def exp_nonpos(x: torch.Tensor) -> torch.Tensor:
    in_range = x >= EXP_MIN
    xc = torch.where(in_range, x, torch.zeros_like(x))
    t = xc * LOG2E
    k = (t + ROUND_MAGIC) - ROUND_MAGIC
    r = (xc - k * LN2_HI) - k * LN2_LO
    poly = torch.full_like(r, EXP_TAYLOR[0])
    for c in EXP_TAYLOR[1:]:
        poly = c + r * poly
    scale = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    e = poly * scale
    return torch.where(in_range, e, torch.where(torch.isnan(x), x, torch.zeros_like(x)))


def _abs(v):
    return torch.where(v < 0, -v, v)


def _gelu_parts(v):
    z = _abs(v) * SQRT1_2
    t = _div(1.0, 1.0 + AS_P * z)
    poly = torch.full_like(t, AS_A[0])
    for c in AS_A[1:]:
        poly = c + t * poly
    poly = t * poly
    e = exp_nonpos(-(z * z))
    q = poly * e
    return torch.where(v >= 0, 2.0 - q, q), e


def _gelu_tanh_parts(v):
    u = SQRT_2_OVER_PI * (v + GELU_TANH_C * ((v * v) * v))
    e = exp_nonpos(-(2.0 * _abs(u)))
    d = 1.0 + e
    big = _div(2.0, d)
    small = _div(2.0 * e, d)
    pos = u >= 0
    return torch.where(pos, big, small), torch.where(pos, small, big)


def _sigmoid(v):
    e = exp_nonpos(torch.where(v < 0, v, -v))
    d = 1.0 + e
    return torch.where(v >= 0, _div(1.0, d), _div(e, d))


def activation_forward(v: torch.Tensor, activation: str) -> torch.Tensor:
    """act(v) for v in float32 (the contract's formulas) or float64 (libm-grade)."""
    if activation == "identity":
        return v
    if activation == "relu":
        return torch.where(v < 0, torch.zeros_like(v), v)
    if v.dtype == torch.float64:
        if activation == "gelu":
            return 0.5 * v * (1.0 + torch.erf(v * SQRT1_2_F64))
        if activation == "gelu_tanh":
            return 0.5 * v * (1.0 + torch.tanh(SQRT_2_OVER_PI_F64 * (v + GELU_TANH_C_F64 * v * v * v)))
        return v * (1.0 / (1.0 + torch.exp(-v)))
    if activation == "gelu":
        return (0.5 * v) * _gelu_parts(v)[0]
    if activation == "gelu_tanh":
        return (0.5 * v) * _gelu_tanh_parts(v)[0]
    if activation == "silu":
        return v * _sigmoid(v)
    raise ValueError(f"unknown activation {activation!r}")


def activation_grad(v: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(v) for the smooth activations."""
    if v.dtype == torch.float64:
        if activation == "gelu":
            return 0.5 * (1.0 + torch.erf(v * SQRT1_2_F64)) + \
                v * torch.exp(-0.5 * v * v) * INV_SQRT_2PI_F64
        if activation == "gelu_tanh":
            t = torch.tanh(SQRT_2_OVER_PI_F64 * (v + GELU_TANH_C_F64 * v * v * v))
            return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI_F64 * \
                (1.0 + 3.0 * GELU_TANH_C_F64 * v * v)
        s = 1.0 / (1.0 + torch.exp(-v))
        return s * (1.0 + v * (1.0 - s))
    if activation == "gelu":
        cdf2, e = _gelu_parts(v)
        return 0.5 * cdf2 + v * (e * INV_SQRT_2PI)
    if activation == "gelu_tanh":
        opt, omt = _gelu_tanh_parts(v)
        du = SQRT_2_OVER_PI * (1.0 + GELU_TANH_3C * (v * v))
        return 0.5 * opt + ((0.5 * v) * (opt * omt)) * du
    if activation == "silu":
        s = _sigmoid(v)
        return s * (1.0 + v * (1.0 - s))
    raise ValueError(f"unknown activation {activation!r}")


# --- the fused op -------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(v: torch.Tensor, p: Rate) -> torch.Tensor:
    return v * scale(p, v.dtype)


def _drop(keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Kept values pass; a dropped one becomes a zero with its sign bit, as
    x * 0 is for finite x in nn.Dropout (and a zero for NaN and Inf too)."""
    return torch.where(keep, value, torch.copysign(torch.zeros_like(value), value))


def _keep(shape, p, seed, offset, mask_shape, device, keep=None, place=None):
    """The mask applied: the full one, or the structured one of ``mask_shape``
    (the global tensor's shape with broadcast sizes 1) broadcast to ``shape``."""
    if keep is not None:
        return keep
    shape = tuple(shape)
    n = len(shape)
    full = shape if place is None else tuple(place[:n])
    if not mask_shape or tuple(mask_shape) == full:
        return dropout_mask(shape, p, seed, offset, device=device, place=place)
    local = tuple(s if m == g else 1 for s, m, g in zip(shape, mask_shape, full))
    mplace = None if place is None else \
        tuple(mask_shape) + tuple(place[n + d] if mask_shape[d] == full[d] else 0 for d in range(n))
    return dropout_mask(local, p, seed, offset, device=device, place=mplace).expand(shape)


def fused_dropout(x: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  seed: Word, offset: Word, p: Rate, activation: str = "identity",
                  mask_shape: Sequence[int] = (), *, keep: Optional[torch.Tensor] = None,
                  place: Optional[Sequence[int]] = None) -> torch.Tensor:
    """residual + dropout(act(x + bias)), computed in float32 (float64 for
    float64) and rounded once to x's dtype; ``keep`` (x's shape) replaces
    the contract's mask, as in the packed mask mode's backward; ``place``:
    x is a shard of a global tensor."""
    acc = _acc_dtype(x.dtype)
    v = x.to(acc)
    if bias is not None:
        v = v + bias.to(acc)
    kept = _scaled(activation_forward(v, activation), p)
    keep = _keep(x.shape, p, seed, offset, mask_shape, x.device, keep, place)
    out = _drop(keep, kept)
    if residual is not None:
        out = residual.to(acc) + out
    return out.to(x.dtype)


def fused_dropout_backward(grad: torch.Tensor, x: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           seed: Word, offset: Word, p: Rate, activation: str = "identity",
                           mask_shape: Sequence[int] = (), bias_grad: bool = False, *,
                           keep: Optional[torch.Tensor] = None, place: Optional[Sequence[int]] = None):
    """(grad_input, grad_bias or None): dx = grad * keep * scale * act'(x + bias).
    The bias gradient sums the unrounded dx (float64 here; kernels use their
    accumulation type in a fixed order, so it matches to rounding, not bits)."""
    acc = _acc_dtype(grad.dtype)
    gs = _scaled(grad.to(acc), p)
    if activation == "identity":
        d = gs
    else:
        v = x.to(acc)
        if bias is not None:
            v = v + bias.to(acc)
        if activation == "relu":
            d = torch.where(v > 0, gs, torch.zeros_like(gs))
        else:
            d = gs * activation_grad(v, activation)
    keep = _keep(grad.shape, p, seed, offset, mask_shape, grad.device, keep, place)
    dx = _drop(keep, d)
    db = None
    if bias_grad:
        db = dx.to(torch.float64).reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0).to(grad.dtype)
    return dx.to(grad.dtype), db


# --- the reference's op kernels (the ``reference_`` ops of _ops) ---------------

def _like_input(input: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The result in the input's memory format, as every backend returns it."""
    if input.is_contiguous():
        return result
    return torch.empty_like(input).copy_(result)


def state_params(state: Optional[torch.Tensor]):
    """(seed, offset, p) of a dropout state as 0-dim views of it, on its
    device, read by no host access; no state: keep everything."""
    if state is None:
        return 0, 0, 0.0
    return state[0], state[1], state[2:3].view(torch.float64)[0]


def _op_forward(input, bias, residual, state, activation, mask_shape, mask_bits=None, pack_mask=False,
                place=None):
    from ._ops import mask_bits_like

    seed, offset, p = state_params(state)
    bits = mask_bits_like(input, state, mask_shape, pack_mask, place)
    if mask_bits is not None:
        keep = unpack_bits(mask_bits, input.shape)
    elif bits.numel() > 0:  # packable: one draw per element, so the mask to pack is the one applied
        keep = dropout_mask(input.shape, p, seed, offset, device=input.device, place=place)
        bits.copy_(pack_bits(keep))
    else:
        keep = None
    out = fused_dropout(input, bias, residual, seed, offset, p, activation, mask_shape, keep=keep, place=place)
    return _like_input(input, out), bits


def _op_backward(grad, input, bias, state, activation, mask_shape, bias_grad, mask_bits=None, place=None):
    seed, offset, p = state_params(state)
    keep = unpack_bits(mask_bits, grad.shape) if mask_bits is not None else None
    dx, db = fused_dropout_backward(grad, input, bias, seed, offset, p, activation, mask_shape, bias_grad,
                                    keep=keep, place=place)
    return _like_input(grad, dx), (db if bias_grad else grad.new_empty((0,)))


def _op_mask(state, shape, place=None):
    seed, offset, p = state_params(state)
    return dropout_mask(shape, p, seed, offset, device=state.device, place=place)


# --- dropout + residual + LayerNorm / RMSNorm ----------------------------------

def dropout_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], seed: Word, offset: Word, p: Rate, norm: str = "layer",
                     eps: float = 1e-5, residual_in_fp32: bool = False, place: Optional[Sequence[int]] = None):
    """(y, h, mean, rstd): h = residual + dropout(x), rounded once to h's
    dtype; y = norm(h) * weight + bias over the last dimension, from h as
    stored, rounded once to x's dtype. mean (empty for ``"rms"``) and rstd
    are per row, in the statistics' dtype. ``place``: x is a shard of whole rows."""
    h_dtype, acc = norm_dtypes(x.dtype, residual_in_fp32)
    keep = dropout_mask(x.shape, p, seed, offset, device=x.device, place=place)
    v = _drop(keep, _scaled(x.to(acc), p))
    if residual is not None:
        v = residual.to(acc) + v
    h = v.to(h_dtype)
    hf = h.to(acc)
    if norm == "layer":
        mean = hf.mean(-1, keepdim=True)
        centred = hf - mean
    else:
        mean = hf.new_zeros(hf.shape[:-1] + (1,))
        centred = hf
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    y = centred * rstd
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    rows = math.prod(x.shape[:-1])
    mean = mean.reshape(rows) if norm == "layer" else hf.new_empty((0,))
    return y.to(x.dtype), h, mean, rstd.reshape(rows)


def dropout_add_norm_backward(grad: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor,
                              weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                              seed: Word, offset: Word, p: Rate, norm: str = "layer",
                              place: Optional[Sequence[int]] = None):
    """(grad_input, grad_residual, grad_weight, grad_bias) of
    ``dropout_add_norm``: the norm's backward from h, mean and rstd, plus
    ``grad_h``, is dh = grad_residual (h's dtype); grad_input = dropout of
    dh with the forward's mask (grad's dtype); grad_weight = sum over rows
    of grad * xhat and grad_bias = sum of grad, in the statistics' dtype."""
    acc = rstd.dtype
    H = h.shape[-1]
    rows = math.prod(h.shape[:-1])  # explicit: with H == 0, -1 would be ambiguous
    hf = h.to(acc).reshape(rows, H)
    g = grad.to(acc).reshape(rows, H)
    r = rstd.reshape(rows, 1)
    xhat = (hf - mean.reshape(rows, 1)) * r if norm == "layer" else hf * r
    gw = g * weight.to(acc) if weight is not None else g
    proj = (gw * xhat).mean(-1, keepdim=True)
    dh = gw - xhat * proj
    if norm == "layer":
        dh = dh - gw.mean(-1, keepdim=True)
    dh = dh * r
    if grad_h is not None:
        dh = dh + grad_h.to(acc).reshape(rows, H)
    dh = dh.reshape(h.shape)
    keep = dropout_mask(h.shape, p, seed, offset, device=h.device, place=place)
    dx = _drop(keep, _scaled(dh, p))
    return dx.to(grad.dtype), dh.to(h.dtype), (g * xhat).sum(0), g.sum(0)


def _op_norm(input, residual, weight, bias, state, norm, eps, residual_in_fp32, place=None):
    seed, offset, p = state_params(state)
    # Every backend returns y and h row-major, and the same bits whatever
    # the inputs' strides (a row's sums in one order).
    input, residual = _dense(input), _dense(residual)
    outs = dropout_add_norm(input, residual, weight, bias, seed, offset, p, norm, eps, residual_in_fp32, place)
    return tuple(t.contiguous() for t in outs)


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


def _op_norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, output_mask, place=None):
    seed, offset, p = state_params(state)
    grad, grad_h, h = _dense(grad), _dense(grad_h), _dense(h)
    grads = dropout_add_norm_backward(grad, grad_h, h, weight, mean, rstd, seed, offset, p, norm, place)
    return tuple(g.contiguous() if need else g.new_empty((0,)) for g, need in zip(grads, output_mask))


KERNELS = {"fused_dropout": _op_forward, "fused_dropout_backward": _op_backward, "dropout_mask": _op_mask,
           "dropout_add_norm": _op_norm, "dropout_add_norm_backward": _op_norm_backward}
