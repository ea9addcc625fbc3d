"""Loads the compiled ops and gives them fake (meta) kernels and autograd.

The schemas live in csrc/ops.cpp. Importing ``_C`` registers them with the
dispatcher as ``torch.ops.dropout_ext.*``; without it the package falls back
to the reference (see ``HAS_C``).
"""

from __future__ import annotations

import warnings

import torch

from . import _autograd

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

    _autograd.register("dropout_ext::fused_dropout", ops.fused_dropout, ops.fused_dropout_backward)
