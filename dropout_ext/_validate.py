"""Every argument rule of dropout_ext, with its one wording.

The public functions, the modules, the schedules, fusion and the Python op
implementations (Triton, reference) all check through here before any
tensor is touched, so bad input changes nothing. The C++ glue
(csrc/op_common.h) repeats only the checks a direct ``torch.ops`` call could
slip past, with these same messages.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Optional, Sequence

import torch

from ._contract import ACTIVATIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_p(p) -> float:
    """p as a float in [0, 1]. A tensor is refused: p reaches the kernels as
    data only inside the dropout state (docs/DESIGN.md)."""
    if isinstance(p, torch.Tensor) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout probability p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_companion(input, t, name: str) -> None:
    check_tensor(t, name)
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device}, but input is on {input.device}")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, but input has {input.dtype}")


def check_bias(input, bias) -> None:
    if bias is None:
        return
    _check_companion(input, bias, "bias")
    if input.dim() == 0 or bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
        last = input.shape[-1] if input.dim() else "none (0-dim input)"
        raise ValueError(f"bias must be 1-D with the size of input's last dimension ({last}), "
                         f"got shape {tuple(bias.shape)}")


def check_residual(input, residual) -> None:
    if residual is None:
        return
    _check_companion(input, residual, "residual")
    if residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_place(shape, place) -> Optional[tuple]:
    """Where a local tensor of ``shape`` sits in a global one, as the ops take
    it: ``(global shape..., start...)``, or None for a whole tensor
    (docs/RNG.md, "Sharded tensors"). Worded as csrc/op_common.h's check."""
    if place is None:
        return None
    shape = tuple(shape)
    place = tuple(int(v) for v in place)
    n = len(shape)
    if len(place) != 2 * n:
        raise ValueError(f"place must be [global shape..., start...] with {2 * n} entries for a local tensor "
                         f"of shape {shape}, got {len(place)}")
    for d in range(n):
        g, s = place[d], place[n + d]
        if not (g >= 0 and 0 <= s <= g - shape[d]):
            raise ValueError(f"place puts dimension {d} (size {shape[d]}) at start {s} of a global size {g}: "
                             "it must lie inside")
    if math.prod(place[:n]) >= 2**63:
        raise ValueError("place: the global tensor must have fewer than 2**63 elements")
    return place


def global_shape(shape, place) -> tuple:
    """The shape of the global tensor a local one of ``shape`` sits in."""
    return tuple(shape) if place is None else tuple(place[:len(shape)])


def check_mask_shape(input, mask_shape, place=None) -> tuple:
    """The structured mask shape, () for one draw per element (also what an
    empty ``mask_shape`` means). With a place it speaks of the global shape."""
    if mask_shape is None or len(mask_shape) == 0:
        return ()
    shape = tuple(int(s) for s in mask_shape)
    full = global_shape(input.shape, place)
    if len(shape) != input.dim() or any(m not in (s, 1) for m, s in zip(shape, full)):
        whose = "the global shape's" if place is not None else "input's"
        raise ValueError(f"mask_shape must have input's rank with each size equal to {whose} "
                         f"{full} or 1, got {shape}")
    return () if shape == full else shape


def check_norm_place(shape, place) -> None:
    """A dropout_add_norm shard holds whole rows (csrc/op_common.h, norm_map)."""
    if place is not None and len(shape) >= 1 and place[len(shape) - 1] != shape[-1]:
        raise ValueError("dropout_add_norm normalises the last dimension, so each shard must hold it whole: "
                         f"global size {place[len(shape) - 1]}, this shard's {shape[-1]} (shard another "
                         "dimension, as sequence parallelism does)")


def check_shape(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    return shape


def as_u64(value, name: str) -> int:
    """A seed or offset as the unsigned 64-bit integer the contract keys on."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must fit in 64 bits (-2**63 <= {name} < 2**64), got {value}")
    return value & (2**64 - 1)


def check_seed(seed, offset, generator, device) -> None:
    if seed is not None:
        as_u64(seed, "seed")
        as_u64(offset, "offset")
        if generator is not None:
            raise ValueError("pass either seed= or generator=, not both")
        return
    if offset != 0:
        raise ValueError("offset is only meaningful together with seed=")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"generator is on {generator.device}, but the input is on {device}")


def check_state(state, device) -> None:
    """The dropout state an op takes: int64 [seed, offset, p bits] on the
    input's device or the CPU (docs/DESIGN.md), or None for no dropout. Where the host
    can read it for free (a CPU state) its p is checked too; a device
    state's p is data the kernels sanitise."""
    if state is None:
        return
    if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or tuple(state.shape) != (3,):
        got = f"{state.dtype} of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor) \
            else type(state).__name__
        raise ValueError(f"state must be an int64 tensor [seed, offset, p bits], got {got}")
    if state.device != torch.device(device) and state.device.type != "cpu":
        raise ValueError(f"state is on {state.device}, but input is on {device} "
                         "(a state lives on the input's device or the CPU)")
    if state.device.type == "cpu" and not isinstance(state, torch._subclasses.FakeTensor):
        p = struct.unpack("<d", struct.pack("<q", int(state[2])))[0]
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def check_fused_args(input, bias, residual, activation, mask_shape: Optional[Sequence[int]], place=None) -> tuple:
    """Everything the fused op takes besides p and the RNG; returns the mask shape."""
    check_tensor(input, "input")
    check_bias(input, bias)
    check_residual(input, residual)
    check_activation(activation)
    return check_mask_shape(input, mask_shape, check_place(input.shape, place))


MASK_MODES = ("regenerate", "packed")


def check_mask_mode(mask_mode) -> Optional[str]:
    """None (the device's default, ``_backend.default_mask_mode``) or one of MASK_MODES."""
    if mask_mode is not None and (not isinstance(mask_mode, str) or mask_mode not in MASK_MODES):
        raise ValueError(f"mask_mode must be one of {MASK_MODES} or None, got {mask_mode!r}")
    return mask_mode


def mask_bits_size(n: int) -> int:
    """Bytes of the packed keep mask of n elements (docs/RNG.md)."""
    return (n + 7) // 8


def packable(input, state, mask_shape, place=None) -> bool:
    """A full mask with a state can be packed (structured masks are small
    and drawn again; no state, no mask)."""
    return state is not None and (not mask_shape or tuple(mask_shape) == global_shape(input.shape, place))


def check_mask_bits(input, state, mask_shape, mask_bits, place=None) -> None:
    """The packed keep mask an op reads instead of drawing it again."""
    if mask_bits is None:
        return
    if not packable(input, state, mask_shape, place):
        raise ValueError("mask_bits needs a state (its p gives the scale) and a full mask (mask_shape [])")
    size = mask_bits_size(input.numel())
    if (not isinstance(mask_bits, torch.Tensor) or mask_bits.dtype != torch.uint8
            or tuple(mask_bits.shape) != (size,)):
        got = f"{mask_bits.dtype} of shape {tuple(mask_bits.shape)}" if isinstance(mask_bits, torch.Tensor) \
            else type(mask_bits).__name__
        raise ValueError(f"mask_bits must be a uint8 tensor of shape ({size},), got {got}")
    if mask_bits.device != input.device:
        raise ValueError(f"mask_bits is on {mask_bits.device}, but input is on {input.device}")


NORMS = ("layer", "rms")


def norm_dtypes(input_dtype: torch.dtype, residual_in_fp32: bool) -> tuple:
    """(h's dtype, the statistics' dtype) of ``dropout_add_norm``: h is
    float32 with ``residual_in_fp32`` for half and bfloat16 inputs, else the
    input's dtype; mean and rstd are float64 for float64, else float32."""
    low = input_dtype in (torch.float16, torch.bfloat16)
    h = torch.float32 if residual_in_fp32 and low else input_dtype
    return h, (torch.float64 if input_dtype == torch.float64 else torch.float32)


def _check_norm_param(input, t, name: str) -> None:
    if t is None:
        return
    check_tensor(t, name)
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device}, but input is on {input.device}")
    if t.dtype not in (input.dtype, torch.float32):
        raise TypeError(f"{name} must have input's dtype ({input.dtype}) or float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != input.shape[-1]:
        raise ValueError(f"{name} must be 1-D with the size of input's last dimension ({input.shape[-1]}), "
                         f"got shape {tuple(t.shape)}")


def check_norm_args(input, residual, weight, bias, norm, eps, residual_in_fp32) -> None:
    """Everything ``dropout_add_norm`` takes besides p and the RNG."""
    check_tensor(input, "input")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the normalised one)")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (float(eps) >= 0.0) \
            or math.isinf(float(eps)):
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"residual_in_fp32 must be a bool, got {type(residual_in_fp32).__name__}")
    if residual is not None:
        check_tensor(residual, "residual")
        h_dtype = norm_dtypes(input.dtype, residual_in_fp32)[0]
        if residual.device != input.device:
            raise ValueError(f"residual is on {residual.device}, but input is on {input.device}")
        if residual.dtype != h_dtype:
            raise TypeError(f"residual must have h's dtype {h_dtype} (input's, or float32 with "
                            f"residual_in_fp32), got {residual.dtype}")
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    _check_norm_param(input, weight, "weight")
    _check_norm_param(input, bias, "bias")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight and bias must have one dtype, got {weight.dtype} and {bias.dtype}")


def check_norm_backward_args(grad, grad_h, h, weight, mean, rstd, norm, output_mask) -> None:
    """What the backward of ``dropout_add_norm`` reads: the forward's h,
    mean and rstd (statistics' dtype, one per row; mean empty for rms)."""
    check_tensor(grad, "grad")
    check_tensor(h, "h")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if grad.dim() == 0 or h.shape != grad.shape or h.device != grad.device:
        raise ValueError(f"h must have grad's shape {tuple(grad.shape)} and device, got {tuple(h.shape)} on {h.device}")
    if h.dtype not in (norm_dtypes(grad.dtype, False)[0], norm_dtypes(grad.dtype, True)[0]):
        raise TypeError(f"h must have grad's dtype ({grad.dtype}), or float32 for a float16 or bfloat16 grad "
                        f"(residual_in_fp32), got {h.dtype}")
    if grad_h is not None and (grad_h.shape != h.shape or grad_h.dtype != h.dtype or grad_h.device != h.device):
        raise ValueError("grad_h must have h's shape, dtype and device")
    _check_norm_param(grad, weight, "weight")
    stat_dtype = norm_dtypes(grad.dtype, False)[1]
    rows = math.prod(grad.shape[:-1])
    for t, name, size in ((mean, "mean", rows if norm == "layer" else 0), (rstd, "rstd", rows)):
        if t.dtype != stat_dtype or tuple(t.shape) != (size,) or t.device != grad.device:
            raise ValueError(f"{name} must be {stat_dtype} of shape ({size},) on {grad.device}, "
                             f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    if len(output_mask) != 4 or (output_mask[2] and weight is None):
        raise ValueError("output_mask is [input, residual, weight, bias]; weight's needs the weight")
