"""Sharded tensors: every shard draws the single-device mask.

The mask is a function of each element's index in the global tensor
(docs/RNG.md, "Sharded tensors"), so a shard that knows where it sits draws
exactly the elements the unsharded call would give it, on any layout:
tensor-, sequence- and data-parallel, even or uneven splits, any mesh. Two
ways to say where a shard sits:

- a ``DTensor`` input says it itself: every public function and module runs
  the kernels on the local shard at its place and returns a ``DTensor`` with
  the input's placements (``on_shards``);
- a plain local tensor takes ``place=``: a ``Place`` (the global shape and the
  shard's start along each dimension), a ``Split`` (an even split of one
  dimension), or a tuple of ``Split``s. Modules take the same as their
  ``place`` attribute, and ``data_parallel`` gives it to every dropout of a
  model.

Without ``seed=`` the state comes from each rank's default generator: seed
every rank alike (``torch.manual_seed``), as DTensor's own random ops ask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._validate import check_place

__all__ = ["Place", "Split", "data_parallel"]


@dataclass(frozen=True)
class Place:
    """Where a local tensor sits in a global one: the global tensor's
    ``shape`` and the shard's ``start`` index along each dimension (the
    shard is the block ``[start, start + local size)`` of every dimension)."""

    shape: Tuple[int, ...]
    start: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "start", tuple(int(s) for s in self.start))


@dataclass(frozen=True)
class Split:
    """An even split: dimension ``dim`` of the global tensor cut into ``parts``
    pieces of the shard's size, of which the shard is piece ``index`` (a
    data-parallel batch, a tensor-parallel column block)."""

    dim: int
    index: int
    parts: int

    def __post_init__(self):
        for name in ("dim", "index", "parts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Split.{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.index < self.parts:
            raise ValueError(f"Split needs 0 <= index < parts, got index {self.index} of {self.parts} parts")


PlaceLike = Union[None, Place, Split, Sequence[Split]]


def check_rule(place) -> PlaceLike:
    """A place as functions and modules take it, checked for its type."""
    if place is None or isinstance(place, (Place, Split)):
        return place
    if isinstance(place, (tuple, list)) and place and all(isinstance(s, Split) for s in place):
        return tuple(place)
    raise TypeError(f"place must be a dropout_ext.Place, a Split or a tuple of Splits, got {place!r}")


def place_words(place: PlaceLike, shape: Sequence[int]) -> Optional[list]:
    """The ops' ``place`` argument for a local tensor of ``shape``:
    ``[global shape..., start...]``, checked, or None."""
    place = check_rule(place)
    if place is None:
        return None
    shape = tuple(shape)
    if isinstance(place, Place):
        return list(check_place(shape, place.shape + place.start))
    n = len(shape)
    global_shape, start = list(shape), [0] * n
    seen = set()
    for s in (place,) if isinstance(place, Split) else place:
        if not -n <= s.dim < n:
            raise ValueError(f"place: Split.dim {s.dim} is not a dimension of a {n}-D input")
        d = s.dim % n
        if d in seen:
            raise ValueError(f"place: two Splits of dimension {d}; give a Place for nested splits")
        seen.add(d)
        global_shape[d], start[d] = shape[d] * s.parts, shape[d] * s.index
    return list(check_place(shape, global_shape + start))


def unbatched(words: Optional[list]) -> Optional[list]:
    """The place of a tensor after ``unsqueeze(0)``: a new leading dimension of one."""
    if words is None:
        return None
    n = len(words) // 2
    return [1] + words[:n] + [0] + words[n:]


def mask_place(shape: Sequence[int], mask_shape: Sequence[int], words: Optional[list]):
    """(the local mask shape, its place) of a structured mask whose
    ``mask_shape`` speaks of the global shape (a broadcast dimension has
    size 1 at start 0); unsharded, the mask shape itself and no place."""
    if words is None:
        return tuple(mask_shape), None
    n = len(shape)
    whole = [m == g for m, g in zip(mask_shape, words[:n])]
    local = tuple(s if w else 1 for s, w in zip(shape, whole))
    return local, list(mask_shape) + [words[n + d] if whole[d] else 0 for d in range(n)]


# --- DTensor -----------------------------------------------------------------

@torch.compiler.assume_constant_result
def _dtensor_class():
    """DTensor's class once something imported it (no DTensor exists before),
    else None: importing it here would cost every user its import time."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    if type(t) is torch.Tensor:
        return False
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _local_companion(t, kind, input, placements, words):
    """A companion tensor's local piece: ``like`` the input (a residual),
    along its ``last`` dimension (a bias: sharded where the input's last
    dimension is), or ``whole`` (a norm's weight and bias). A plain tensor
    is taken as the global one (its gradient is this rank's part); a
    DTensor is redistributed to the layout, and its gradient is whole."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    if t is None:
        return None
    n = input.dim()
    if not is_dtensor(t):
        if kind == "whole":
            return t
        starts, local = words[n:], _local_shape(input)
        if kind == "last":
            return t[starts[-1]:starts[-1] + local[-1]]
        return t[tuple(slice(s, s + size) for s, size in zip(starts, local))]
    if kind == "like":
        return t.redistribute(input.device_mesh, placements).to_local()
    if kind == "last":
        layout = tuple(Shard(0) if p.is_shard() and p.dim % n == n - 1 else Replicate() for p in placements)
    else:
        layout = (Replicate(),) * len(placements)
    # A piece used by every shard of a mesh dimension that splits the input
    # gets a partial gradient there (its rows' sum): DTensor reduces it.
    grads = tuple(Partial() if p.is_shard() and q.is_replicate() else q for p, q in zip(placements, layout))
    return t.redistribute(input.device_mesh, layout).to_local(grad_placements=grads)


def _local_shape(input):
    return tuple(input.to_local().shape)


def on_shards(run, input, companions=(), linear=False, whole_last=False):
    """``run(local input, *local companions, place words)`` on this rank's
    shard of the DTensor ``input``, its outputs (a tensor or a tuple) as
    DTensors with the input's placements. ``companions``: (kind, tensor)
    pairs (``_local_companion``). A ``Partial`` input stays partial where the
    op is linear in it (the same mask on every rank), else it is reduced
    first; ``whole_last``: the op needs the last dimension whole."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = input.device_mesh, tuple(input.placements)
    n = input.dim()
    for p in placements:
        if type(p).__name__ == "_StridedShard":
            raise NotImplementedError(f"dropout_ext: a strided shard ({p}) is not one block of the global tensor")
        if whole_last and p.is_shard() and p.dim % n == n - 1:
            raise ValueError("dropout_add_norm normalises the last dimension, so each shard must hold it whole: "
                             f"the input's placements {placements} shard it (shard another dimension, as sequence "
                             "parallelism does, or redistribute)")
    if not linear and any(p.is_partial() for p in placements):
        placements = tuple(Replicate() if p.is_partial() else p for p in placements)
        input = input.redistribute(mesh, placements)
    _, offset = compute_local_shape_and_global_offset(input.shape, mesh, placements)
    words = list(input.shape) + list(offset)
    # A partial input's gradient is the whole output gradient on every rank.
    grads = tuple(Replicate() if p.is_partial() else p for p in placements)
    local = input.to_local(grad_placements=grads)
    pieces = [_local_companion(t, kind, input, placements, words) for kind, t in companions]
    out = run(local, *pieces, words)

    def wrap(t):
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=input.shape, stride=input.stride())

    return tuple(wrap(t) for t in out) if isinstance(out, tuple) else wrap(out)


# --- data parallelism ----------------------------------------------------------

def data_parallel(model: nn.Module, rank: Optional[int] = None, world_size: Optional[int] = None,
                  dim: int = 0) -> nn.Module:
    """Make ``model``'s dropouts draw, on each rank's slice of a global batch,
    the masks a single device draws for the whole batch: its ``nn.Dropout``
    family is swapped for dropout_ext's (``replace_dropout``), and every
    dropout_ext module takes ``place = Split(dim, rank, world_size)`` (rank
    ``r`` holds samples ``[r * b, (r + 1) * b)`` of the global batch along
    ``dim``). ``rank`` and ``world_size`` default to torch.distributed's.
    Seed every rank alike: the (seed, offset) of each call come from each
    rank's generator. Returns the model."""
    from .modules import _Placed, replace_dropout

    if rank is None or world_size is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("data_parallel needs rank and world_size, or an initialised torch.distributed")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    split = Split(dim, rank, world_size)
    replace_dropout(model)
    for m in model.modules():
        if isinstance(m, _Placed):
            m.place = split
    return model
