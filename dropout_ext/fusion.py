"""Optional fusion of ``Linear -> activation -> Dropout`` and
``x + Dropout(y)`` into the fused op, by rewriting a ``torch.fx`` trace of
the model. Off unless called: ``fused = dropout_ext.fuse_dropout(model)``.

- ``Linear -> act -> Dropout`` (act one of ReLU, GELU (erf or tanh), SiLU, as
  a module or a function, or no activation) becomes one ``LinearDropout``:
  the matmul without its bias, then bias + activation + dropout in one pass.
- ``x + Dropout(y)`` (either order) becomes ``residual + dropout(y)`` in one
  pass; when ``y`` is a bare ``Linear``, its bias joins the same pass.
- ``LayerNorm(x + Dropout(y))`` (either order; ``nn.LayerNorm`` over the last
  dimension) becomes one ``DropoutAddLayerNorm`` sharing the LayerNorm's
  parameters, and ``nn.RMSNorm`` (with its ``eps`` given) one
  ``DropoutAddRMSNorm``; ``y`` stays as it was (a Linear keeps its matmul
  and bias).

Each fused call draws its (seed, offset) exactly as the Dropout it replaces,
so for the same generator state the fused model drops the same elements as
the unfused one with dropout_ext's Dropout. Outputs agree to rounding only:
``nn.Linear`` adds its bias inside the matmul, the fused op after it, and
the fused norms compute their statistics in their own order.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .modules import Dropout, DropoutAddLayerNorm, DropoutAddRMSNorm, FusedDropout, _device_of

__all__ = ["LinearDropout", "fuse_dropout"]

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_NORMS = {nn.LayerNorm: DropoutAddLayerNorm, nn.RMSNorm: DropoutAddRMSNorm}
_ACT_FUNCTIONS = {torch.relu: "relu", nn.functional.relu: "relu", nn.functional.silu: "silu",
                  nn.functional.gelu: "gelu"}


class LinearDropout(FusedDropout):
    """``residual + dropout(act(x @ W.T + b))`` with the bias, activation,
    dropout and residual in one pass after the matmul. A FusedDropout, so
    its p is runtime data like every module's (schedules, one compiled
    graph for any p)."""

    def __init__(self, linear: nn.Linear, p: float, activation: str = "identity") -> None:
        super().__init__(p, activation)
        self.linear = linear

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = nn.functional.linear(x, self.linear.weight)
        return super().forward(y, self.linear.bias, residual)


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


@dataclass
class _Match:
    """One fusable pattern around a dropout node: [linear ->] [act ->]
    dropout [-> + residual], or dropout -> + residual -> norm."""

    dropout: fx.Node
    module: nn.Module
    src: fx.Node                        # the dropout's input
    activation: str = "identity"
    linear_node: Optional[fx.Node] = None
    add: Optional[fx.Node] = None       # the residual add that consumes the dropout
    residual: Optional[fx.Node] = None
    norm_node: Optional[fx.Node] = None  # the norm of the sum, the add's one user


def _only_user(node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _norm_of(gm, add) -> Optional[fx.Node]:
    """The LayerNorm/RMSNorm module call that is the residual add's one
    user and normalises over the last dimension only."""
    user = _only_user(add)
    norm = _module(gm, user, tuple(_NORMS)) if user is not None else None
    if norm is None or tuple(user.args) != (add,) or user.kwargs or len(norm.normalized_shape) != 1:
        return None
    if isinstance(norm, nn.RMSNorm) and norm.eps is None:  # eps from the input's dtype: not a module constant
        return None
    return user


def _match(gm, node) -> Optional[_Match]:
    drop = _module(gm, node, (nn.Dropout, Dropout))
    if drop is None or getattr(drop, "broadcast_dims", None) is not None or drop.inplace:
        return None
    m = _Match(node, drop, node.args[0])
    user = _only_user(node)
    if user is not None and user.op == "call_function" and user.target in (operator.add, torch.add) \
            and len(user.args) == 2 and not user.kwargs:
        m.add, m.residual = user, (user.args[1] if user.args[0] is node else user.args[0])
        m.norm_node = _norm_of(gm, user)
        if m.norm_node is not None:
            return m
    lin_node = m.src
    act = _activation(gm, m.src)
    if act is not None and len(m.src.users) == 1:
        m.activation, lin_node = act, m.src.args[0]
    if _module(gm, lin_node, (nn.Linear,)) is not None and len(lin_node.users) == 1:
        m.linear_node = lin_node
    if m.linear_node is None and (m.add is None or m.activation != "identity"):
        return None  # nothing to fuse, or act -> dropout with a residual but no linear
    return m


def _norm_module(norm: nn.Module, p: float) -> nn.Module:
    """The fused twin of ``norm`` (an nn.LayerNorm or nn.RMSNorm), holding
    the same parameter objects."""
    cls = _NORMS[type(norm)]
    kw = {"bias": norm.bias is not None} if cls is DropoutAddLayerNorm else {}
    if norm.weight is not None:  # the twin's own parameters, replaced below, made in the same dtype
        kw["dtype"] = norm.weight.dtype
    fused = cls(norm.normalized_shape[0], p, norm.eps, elementwise_affine=norm.elementwise_affine, **kw)
    for name in ("weight", "bias"):
        if getattr(fused, name) is not None:
            setattr(fused, name, getattr(norm, name))
    return fused


def _rewrite(gm, m: _Match, name: str) -> None:
    """Replace the matched nodes by one call of a fused module ``name``,
    made on the device of the modules it replaces: its p buffer must meet
    the input there, or p reaches the kernels as a number under
    torch.compile (modules._RuntimeP._rate), one graph per value."""
    norm = gm.get_submodule(m.norm_node.target) if m.norm_node is not None else None
    linear = gm.get_submodule(m.linear_node.target) if m.linear_node is not None else None
    device = _device_of([x for x in (norm, linear) if x is not None], gm)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if norm is not None:
            fused = _norm_module(norm, m.module.p)
            args = (m.src, m.residual)
        elif linear is not None:
            fused = LinearDropout(linear, m.module.p, m.activation)
            args = (m.linear_node.args[0],) + ((m.residual,) if m.residual is not None else ())
        else:
            fused = FusedDropout(m.module.p)
            args = (m.src, None, m.residual)
    fused.train(m.module.training)
    gm.add_submodule(name, fused)
    replaced = m.norm_node or m.add or m.dropout
    with gm.graph.inserting_before(replaced):
        new = gm.graph.call_module(name, args)
    replaced.replace_all_uses_with(new)
    act_node = m.src if m.activation != "identity" else None
    for dead in dict.fromkeys([replaced, m.add, m.dropout, act_node, m.linear_node]):  # users before producers
        if dead is not None and not dead.users and dead.op != "placeholder":
            gm.graph.erase_node(dead)


def fuse_dropout(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` with the patterns above fused into
    ``FusedDropout`` modules (``LinearDropout`` where a Linear joins,
    ``DropoutAddLayerNorm``/``DropoutAddRMSNorm`` where a norm follows the
    residual add); the model itself is left unchanged (the fused modules
    share its parameters and are made on its device). Dropout modules are
    nn.Dropout or dropout_ext.Dropout without broadcast_dims."""
    gm = fx.GraphModule(model, _Tracer().trace(model))
    count = 0
    for node in list(gm.graph.nodes):
        m = _match(gm, node)
        if m is not None:
            _rewrite(gm, m, f"fused_dropout_{count}")
            count += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
