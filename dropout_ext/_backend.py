"""Backend choice: automatic per device, overridable per call (``backend=``)
and by the environment variable ``DROPOUT_EXT_BACKEND``."""

from __future__ import annotations

import functools
import os
import struct
from typing import List, Optional

import torch

from . import _autograd, _ops
from . import reference as ref

BACKENDS = ("cpu", "cuda", "triton", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        from . import _triton_ops
    except Exception:  # triton missing or unusable here
        return False
    return _triton_ops.AVAILABLE


def available_backends(device="cpu") -> List[str]:
    """The backends that can run on ``device`` here, fastest first."""
    dev = torch.device(device)
    names = []
    if dev.type == "cpu" and _ops.HAS_C:
        names.append("cpu")
    if dev.type == "cuda":
        if _ops.has_cuda_kernels():
            names.append("cuda")
        if triton_available():
            names.append("triton")
    names.append("reference")
    return names


def resolve(backend: Optional[str], device: torch.device) -> str:
    name = backend if backend is not None else os.environ.get("DROPOUT_EXT_BACKEND") or None
    if name is None:
        return available_backends(device)[0]
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in available_backends(device):
        why = {
            "cpu": "the compiled extension is not built" if device.type == "cpu" else "it runs on CPU tensors only",
            "cuda": "it needs a CUDA tensor and an extension built with the CUDA kernels",
            "triton": "it needs a CUDA tensor and a working Triton",
        }[name]
        raise ValueError(f"backend {name!r} is not available for a tensor on {device}: {why}; "
                         f"available: {available_backends(device)}")
    return name


def _rng_values(rng: torch.Tensor, p: float):
    """(seed, offset, p) from an rng tensor [seed, offset] or [seed, offset, p bits]."""
    values = rng.tolist()
    if len(values) == 3:
        p = struct.unpack("<d", struct.pack("<q", values[2]))[0]
        p = min(max(p, 0.0), 1.0) if p == p else 0.0
    return values[0], values[1], p


def _reference_backward(grad, input, bias, rng, p, activation, mask_shape, bias_grad):
    seed, offset, p = _rng_values(rng, p)
    return ref.fused_dropout_backward(grad, input, bias, seed, offset, p, activation, mask_shape, bias_grad)


class _ReferenceFn(torch.autograd.Function):
    """The reference as an autograd function, with the kernels' backward."""

    @staticmethod
    def forward(ctx, x, bias, residual, rng, p, activation, mask_shape):
        seed, offset, p_eff = _rng_values(rng, p)
        ctx.args = (p, activation, mask_shape, bias is not None)
        ctx.save_for_backward(rng, x if activation != "identity" else None, bias)
        out = ref.fused_dropout(x, bias, residual, seed, offset, p_eff, activation, mask_shape)
        if not x.is_contiguous():  # the input's memory format, as nn.Dropout keeps it
            out = torch.empty_like(x).copy_(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        p, activation, mask_shape, has_bias = ctx.args
        rng, x, bias = ctx.saved_tensors
        gx, gb, gr = _autograd.plan_backward(grad, rng, x, bias, p, activation, mask_shape, has_bias,
                                             ctx.needs_input_grad[:3], _ReferenceFn.apply, _reference_backward)
        return gx, gb, gr, None, None, None, None


def run(name: str, x, bias, residual, rng, p: float, activation: str, mask_shape):
    if name in ("cpu", "cuda"):
        return _ops.ops.fused_dropout(x, bias, residual, rng, p, activation, list(mask_shape))
    if name == "triton":
        from . import _triton_ops

        if x.dtype in _triton_ops.DTYPES:
            return _triton_ops.ops.triton_fused_dropout(x, bias, residual, rng, p, activation, list(mask_shape))
        # float64 has no Triton kernel: the CUDA kernel where built, else the reference.
        if _ops.has_cuda_kernels():
            return run("cuda", x, bias, residual, rng, p, activation, mask_shape)
    return _ReferenceFn.apply(x, bias, residual, rng, p, activation, tuple(mask_shape))


def mask(name: str, rng, shape, p: float, device: torch.device):
    if name in ("cpu", "cuda"):
        return _ops.ops.dropout_mask(rng.to(device), list(shape), p)
    if name == "triton":
        from . import _triton_ops

        return _triton_ops.ops.triton_dropout_mask(rng.to(device), list(shape), p)
    seed, offset, p = _rng_values(rng, p)
    return ref.dropout_mask(shape, p, seed, offset, device=device)
