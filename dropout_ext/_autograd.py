"""The one backward of ``y = residual + dropout(act(x + bias))``, registered
for every backend's op family by ``_ops``."""

from __future__ import annotations

import torch


def plan_backward(grad, state, input, bias, activation, mask_shape, has_bias, needs, ops):
    """(grad_input, grad_bias, grad_residual) from what the forward saved: the
    dropout state (the mask is drawn again from it), and ``input`` and
    ``bias`` only where the activation's derivative needs them."""
    need_x, need_b, need_r = needs
    gx = gb = None
    if activation == "identity" and not (has_bias and need_b):
        # The backward of dropout is dropout with the same mask: calling the
        # forward op keeps double backward working.
        if need_x:
            gx = ops.forward(grad, None, None, state, "identity", mask_shape)
    elif need_x or need_b:
        gx, gb = ops.backward(grad, input, bias, state, activation, mask_shape, bool(need_b and has_bias))
        if not need_b:
            gb = None
    return gx, gb, (grad if need_r else None)


def register(prefix: str, ops) -> None:
    """Autograd of ``dropout_ext::{prefix}fused_dropout``; ``ops`` is the
    backend's OpSet (forward, backward, mask)."""

    def setup_context(ctx, inputs, output):
        input, bias, residual, state, activation, mask_shape = inputs
        ctx.activation, ctx.mask_shape = activation, mask_shape
        ctx.has_bias = bias is not None
        if activation == "identity":
            ctx.save_for_backward(state, None, None)
        else:
            ctx.save_for_backward(state, input, bias)

    def backward(ctx, grad):
        state, input, bias = ctx.saved_tensors
        gx, gb, gr = plan_backward(grad, state, input, bias, ctx.activation, ctx.mask_shape, ctx.has_bias,
                                   ctx.needs_input_grad[:3], ops)
        return gx, gb, gr, None, None, None

    torch.library.register_autograd(f"dropout_ext::{prefix}fused_dropout", backward, setup_context=setup_context)
