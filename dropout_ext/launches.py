"""Counting the device operations (kernel launches) a call issues.

    from dropout_ext.launches import count_launches

    with count_launches() as launches:      # ops on any accelerator
        y = model(x)
    launches.count, launches.ops            # 1, [aten.native_dropout.default] for nn.Dropout on CUDA

A ``TorchDispatchMode``: it sees every op that reaches the dispatcher below
autograd (the forward's ops, and the backward's when the backward runs
inside the block) and records those that make the device work:

- an op counts when one of its outputs is a tensor of at least one element
  on the counted device (a write there: a kernel, a fill or a copy), or when
  it returns no tensor there but reads one of at least one element from
  there (``.item()``, ``.tolist()``, a copy to the host, ``torch.equal``: a
  read back to the host, a copy and a wait); an op whose outputs there are
  all empty launches nothing;
- a view, an alias or a metadata query counts for nothing: an op whose
  schema returns an input's alias without writing it (``view``, ``detach``,
  ``split``, ``lift_fresh``), one that only changes an input's metadata
  (the ``inplace_view`` tag: ``t_``, ``as_strided_``, ``resize_``,
  ``set_``), and the ``prim`` namespace's queries (``prim.device``, which
  fake tensors dispatch); an in-place or ``out=`` op writes its alias and
  counts;
- an allocation counts for nothing: the ``empty*`` and ``new_empty*``
  factories (the caching allocator, no kernel).

``device``: None counts the ops on any device but the CPU and ``meta``
(the GPU); a device (its type: ``"cpu"``, ``"cuda"``) counts the ops on
that one: ``"cpu"`` counts the ops a call runs on CPU tensors.

Counted over fake tensors too (``FakeTensorMode``, tensors on
``device="cuda"`` without a GPU): enter the counter inside the fake mode,
so that it sees each op first and the fake mode runs it. Without a GPU the
autograd engine cannot run a CUDA backward; calling the autograd node
(``y.grad_fn(g)``) stands in for it under ``torch.no_grad()``, as the engine
runs it (with grad mode on, nodes take their double-backward formulas:
``nn.Dropout``'s then shows three ops where it launches one). One op counts once,
as what the caller asks of the device: an op whose kernel runs a few
kernels of its own (a reduction in two passes) is still one here, where
the profiler's kernel events would show each. Under a dispatch mode
torch.compile does not run compiled code: a compiled function called
inside the counter runs eagerly, so its count is the eager ops', not its
compiled kernels'.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "count_launches"]

# Devices that a call without device= does not count: the host, and meta
# tensors (shapes only, nothing runs).
_NOT_ACCELERATORS = ("cpu", "meta")


def _is_metadata(func) -> bool:
    """A view, an alias or a metadata query: nothing runs on the device."""
    if func.namespace == "prim" or torch.Tag.inplace_view in func.tags:
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _is_allocation(func) -> bool:
    name = func._schema.name.split("::", 1)[-1].lstrip("_")
    return func.namespace == "aten" and name.startswith(("empty", "new_empty"))


class LaunchCounter(TorchDispatchMode):
    """The mode ``count_launches`` returns: ``ops``, the counted ops in
    call order (``torch._ops.OpOverload``, e.g. ``aten.add.Tensor``), and
    ``count``, their number."""

    def __init__(self, device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        if device is None:
            self.device_type = None
        else:
            try:
                self.device_type = torch.device(device).type
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"count_launches: device must be None, a device name such as 'cuda' or "
                                 f"a torch.device, got {device!r}") from exc
        self.ops: List[torch._ops.OpOverload] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def _on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        kind = t.device.type
        return kind == self.device_type if self.device_type is not None else kind not in _NOT_ACCELERATORS

    def _launches(self, func, args, kwargs, out) -> bool:
        if _is_metadata(func) or _is_allocation(func):
            return False
        written = [t for t in pytree.tree_leaves(out) if self._on_device(t)]
        if written:
            return any(t.numel() > 0 for t in written)
        return any(self._on_device(t) and t.numel() > 0 for t in pytree.tree_leaves((args, kwargs)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._launches(func, args, kwargs, out):
            self.ops.append(func)
        return out

    def __repr__(self) -> str:
        where = self.device_type or "accelerator"
        return f"LaunchCounter({self.count} on {where}: {', '.join(str(op) for op in self.ops)})"


def count_launches(device: Optional[Union[str, torch.device]] = None) -> LaunchCounter:
    """A context counting the device ops of the calls inside it (module
    docstring); ``with count_launches() as c:`` binds the counter."""
    return LaunchCounter(device)
