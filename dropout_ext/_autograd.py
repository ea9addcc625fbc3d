"""The one backward of the fused op, shared by every backend's registration
(compiled ops, Triton ops, the reference)."""

from __future__ import annotations

from typing import Callable

import torch


def plan_backward(grad, rng, input, bias, p, activation, mask_shape, has_bias, needs,
                  forward: Callable, backward: Callable):
    """(grad_input, grad_bias, grad_residual) of y = residual + dropout(act(x + bias)).

    ``forward`` and ``backward`` are a backend's fused_dropout and
    fused_dropout_backward with the op schemas' arguments. Only (seed, offset)
    is needed for the mask; ``input`` (and ``bias``) only where the
    activation's derivative needs them.
    """
    need_x, need_b, need_r = needs
    gx = gb = None
    if activation == "identity" and not (has_bias and need_b):
        # The backward of dropout is dropout with the same mask: calling the
        # forward op keeps double backward working.
        if need_x:
            gx = forward(grad, None, None, rng, p, "identity", mask_shape)
    elif need_x or need_b:
        gx, gb = backward(grad, input, bias, rng, p, activation, mask_shape, bool(need_b and has_bias))
        if not need_b:
            gb = None
    return gx, gb, (grad if need_r else None)


def register(op_name: str, forward: Callable, backward: Callable) -> None:
    """torch.library autograd for a fused_dropout op whose schema is
    (input, bias, residual, rng, p, activation, mask_shape)."""

    def setup_context(ctx, inputs, output):
        input, bias, residual, rng, p, activation, mask_shape = inputs
        ctx.p, ctx.activation, ctx.mask_shape = p, activation, mask_shape
        ctx.has_bias = bias is not None
        if activation == "identity":
            ctx.save_for_backward(rng, None, None)
        else:
            ctx.save_for_backward(rng, input, bias)

    def _backward(ctx, grad):
        rng, input, bias = ctx.saved_tensors
        gx, gb, gr = plan_backward(grad, rng, input, bias, ctx.p, ctx.activation, ctx.mask_shape,
                                   ctx.has_bias, ctx.needs_input_grad[:3], forward, backward)
        return gx, gb, gr, None, None, None, None

    torch.library.register_autograd(op_name, _backward, setup_context=setup_context)
