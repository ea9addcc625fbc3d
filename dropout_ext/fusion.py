"""Optional fusion of ``Linear -> activation -> Dropout`` and
``x + Dropout(y)`` into the fused op, by rewriting a ``torch.fx`` trace of
the model. Off unless called: ``fused = dropout_ext.fuse_dropout(model)``.

- ``Linear -> act -> Dropout`` (act one of ReLU, GELU (erf or tanh), SiLU, as
  a module or a function, or no activation) becomes one ``LinearDropout``:
  the matmul without its bias, then bias + activation + dropout in one pass.
- ``x + Dropout(y)`` (either order) becomes ``residual + dropout(y)`` in one
  pass; when ``y`` is a bare ``Linear``, its bias joins the same pass.

Each fused call draws its (seed, offset) exactly as the Dropout it replaces,
so for the same generator state the fused model drops the same elements as
the unfused one with dropout_ext's Dropout. Outputs agree to rounding only:
``nn.Linear`` adds its bias inside the matmul, the fused op after it.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from . import functional as F

__all__ = ["LinearDropout", "fuse_dropout"]

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {torch.relu: "relu", nn.functional.relu: "relu", nn.functional.silu: "silu",
                  nn.functional.gelu: "gelu"}


class LinearDropout(nn.Module):
    """``residual + dropout(act(x @ W.T + b))`` with the bias, activation,
    dropout and residual in one pass after the matmul."""

    def __init__(self, linear: nn.Linear, p: float, activation: str = "identity") -> None:
        super().__init__()
        self.linear = linear
        self.p = F._check_p(p)
        F._check_activation(activation)
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = nn.functional.linear(x, self.linear.weight)
        return F.fused_dropout(y, self.p, bias=self.linear.bias, activation=self.activation, residual=residual,
                               training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, activation={self.activation!r}"


class _ResidualDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return F.fused_dropout(y, self.p, residual=residual, training=self.training)


class _Tracer(fx.Tracer):
    """Keeps dropout_ext's modules as leaves (their forward validates real
    tensors), like torch.nn's own."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("dropout_ext.") or super().is_leaf_module(m, qualname)


def _module(gm, node, kinds):
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if type(m) in kinds else None


def _activation(gm, node) -> Optional[str]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) in _ACT_MODULES:
            return _ACT_MODULES[type(m)]
        if type(m) is nn.GELU:
            return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
        if node.target is nn.functional.gelu:
            return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
        if not node.kwargs:
            return _ACT_FUNCTIONS[node.target]
    return None


def _single_user(node) -> bool:
    return len(node.users) == 1


def fuse_dropout(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` with the patterns above fused; the model
    itself is left unchanged. Dropout modules are nn.Dropout or
    dropout_ext.Dropout without broadcast_dims."""
    from .modules import Dropout

    dropout_kinds = (nn.Dropout, Dropout)
    gm = fx.GraphModule(model, _Tracer().trace(model))
    count = 0

    def plain_dropout(node):
        m = _module(gm, node, dropout_kinds)
        if m is None or getattr(m, "broadcast_dims", None) is not None or m.inplace:
            return None
        return m

    for node in list(gm.graph.nodes):
        drop = plain_dropout(node)
        if drop is None:
            continue
        src = node.args[0]
        act, lin_node = "identity", src
        a = _activation(gm, src)
        if a is not None and _single_user(src):
            act, lin_node = a, src.args[0]
        linear = _module(gm, lin_node, (nn.Linear,))
        if linear is None or not _single_user(lin_node):
            linear = None
        # x + dropout(y): the dropout's only user is an add with one other input
        residual = None
        (user,) = node.users if len(node.users) == 1 else (None,)
        if user is not None and user.op == "call_function" and user.target in (operator.add, torch.add) \
                and len(user.args) == 2 and not user.kwargs:
            residual = user.args[1] if user.args[0] is node else user.args[0]
        if linear is None and residual is None:
            continue
        if linear is None and act != "identity":
            continue  # act -> dropout with a residual but no linear: leave it
        name = f"fused_dropout_{count}"
        count += 1
        if linear is not None:
            fused = LinearDropout(linear, drop.p, act)
            fused.train(drop.training)
            gm.add_submodule(name, fused)
            args = (lin_node.args[0],) + ((residual,) if residual is not None else ())
        else:
            fused = _ResidualDropout(drop.p)
            fused.train(drop.training)
            gm.add_submodule(name, fused)
            args = (src, residual)
        replaced = user if residual is not None else node
        with gm.graph.inserting_before(replaced):
            new = gm.graph.call_module(name, args)
        replaced.replace_all_uses_with(new)
        chain = [replaced, node, src if act != "identity" else None, lin_node if linear is not None else None]
        seen = set()
        for dead in chain:  # users before producers
            if dead is None or dead in seen:
                continue
            seen.add(dead)
            if not dead.users and dead.op != "placeholder":
                gm.graph.erase_node(dead)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.fused_count = count
    return gm
