"""Loads the compiled ops and gives them fake (meta) kernels and autograd.

The schemas live in csrc/ops.cpp. Importing ``_C`` registers them with the
dispatcher as ``torch.ops.dropout_ext.*``; without it the package falls back
to the reference (see ``HAS_C``).
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.dropout_ext)

    HAS_C = True
    _C_ERROR = None
except ImportError as exc:  # a source tree where the extension was never built
    HAS_C = False
    _C_ERROR = exc
    warnings.warn(
        "dropout_ext: the compiled extension dropout_ext._C is not available "
        f"({exc}); every call falls back to the pure-PyTorch reference, which is "
        "slow. Build it with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda_kernels() -> bool:
    """Whether _C was built with the CUDA kernels."""
    if not HAS_C:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dropout_ext::fused_dropout", "CUDA")


if HAS_C:
    ops = torch.ops.dropout_ext

    @torch.library.register_fake("dropout_ext::fused_dropout")
    def _fused_dropout_fake(input, bias, residual, rng, p, activation, mask_shape):
        return torch.empty_like(input)

    @torch.library.register_fake("dropout_ext::fused_dropout_backward")
    def _fused_dropout_backward_fake(grad, input, bias, rng, p, activation, mask_shape, bias_grad):
        db = grad.new_empty((grad.shape[-1],) if bias_grad else (0,))
        return torch.empty_like(grad), db

    @torch.library.register_fake("dropout_ext::dropout_mask")
    def _dropout_mask_fake(rng, shape, p):
        return rng.new_empty(shape, dtype=torch.bool)

    def _setup_context(ctx, inputs, output):
        input, bias, residual, rng, p, activation, mask_shape = inputs
        ctx.p, ctx.activation, ctx.mask_shape = p, activation, mask_shape
        ctx.has_bias = bias is not None
        # Only (seed, offset) is kept for the mask; the input only where the
        # activation's derivative needs it.
        if activation == "identity":
            ctx.save_for_backward(rng, None, None)
        else:
            ctx.save_for_backward(rng, input, bias)

    def _backward(ctx, grad):
        rng, input, bias = ctx.saved_tensors
        need_x, need_b, need_r = ctx.needs_input_grad[:3]
        gx = gb = None
        if ctx.activation == "identity" and not (ctx.has_bias and need_b):
            # The backward of dropout is dropout with the same mask: calling
            # the forward op keeps double backward working.
            if need_x:
                gx = ops.fused_dropout(grad, None, None, rng, ctx.p, "identity", ctx.mask_shape)
        elif need_x or need_b:
            gx, gb = ops.fused_dropout_backward(grad, input, bias, rng, ctx.p, ctx.activation,
                                                ctx.mask_shape, bool(need_b and ctx.has_bias))
            if not need_b:
                gb = None
        gr = grad if need_r else None
        return gx, gb, gr, None, None, None, None

    torch.library.register_autograd("dropout_ext::fused_dropout", _backward, setup_context=_setup_context)
