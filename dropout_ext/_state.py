"""The dropout state: the one representation of (seed, offset, p) that every
kernel reads (docs/DESIGN.md), and how a call gets it.

An int64 tensor ``[seed, offset, p bits]``: the seed and offset of the RNG
contract as two's-complement words, and p's IEEE binary64 bits. On the
input's device the kernels read it in memory (no host sync); on the CPU they
take its words by value. An eager forward op given p instead draws it inside
its own launch and returns it; saved by the forward, it is all the backward
needs to draw the mask again.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple, Union

import torch

from ._validate import as_u64

Rate = Union[float, torch.Tensor]  # p, or a module's int64 tensor of p's bits


def p_bits(p: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(p)))[0]


def _signed(u: int) -> int:
    return u - 2**64 if u >= 2**63 else u


def _words(values, device: torch.device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device``, written there by fills
    that carry the values as kernel arguments: a copy from pageable host
    memory would synchronise, and cannot be captured in a CUDA graph."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int64)
    out = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)  # a scalar fill, where `out[i] = v` would copy from a host tensor
    return out


def host_state(seed: int, offset: int, p: float) -> torch.Tensor:
    """A state the host holds: a CPU tensor whose words the kernels of any
    device take by value (no copy, no launch)."""
    return torch.tensor([_signed(as_u64(seed, "seed")), _signed(as_u64(offset, "offset")), p_bits(p)],
                        dtype=torch.int64)


def call_state(device: torch.device, p: Rate, seed: Optional[int] = None, offset: int = 0,
               generator: Optional[torch.Generator] = None) -> Tuple[Optional[torch.Tensor], Optional[float]]:
    """What an op call takes for its randomness (arguments already
    validated): ``(state, None)``, or ``(None, p)`` for a forward op to draw
    its state itself.

    - eager, no ``seed``: the op draws (seed, offset) from ``generator`` or
      the default generator of ``device`` inside its own launch (on CUDA from
      the generator's Philox counters, fresh in every replay of a captured
      graph), so nothing else runs; ``torch.manual_seed`` and a restored RNG
      state (activation checkpointing) reproduce its masks;
    - eager, ``seed=``: the host's words in a CPU state, passed by value;
    - under torch.compile (or with p a module's tensor of its bits): the
      state is a value of the graph (``graph_state``), so p stays data and
      no op of the graph reads a generator behind the compiler's back.
    """
    if isinstance(p, torch.Tensor) or torch.compiler.is_compiling():
        return graph_state(device, p, seed, offset, generator), None
    if seed is None:
        return None, p
    return host_state(seed, offset, p), None


def make_state(device: torch.device, p: Rate, seed: Optional[int] = None, offset: int = 0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The state as a tensor on ``device``, for the ops that take one
    (``dropout_mask``, whose output takes the state's device): with ``seed``
    ``graph_state``'s words, since a host state would make the mask on the
    CPU; otherwise ``call_state``'s, or the state a forward op would draw,
    drawn alone."""
    if seed is not None:
        return graph_state(device, p, seed, offset)
    state, p_draw = call_state(device, p, seed, offset, generator)
    if state is not None:
        return state
    return torch.ops.dropout_ext.draw_state(torch.empty(0, device=device), p_draw, generator)


def graph_state(device: torch.device, p: Rate, seed: Optional[int] = None, offset: int = 0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The state built from ops a compiled graph holds. With ``seed``:
    (seed, offset) as given. Otherwise the words of the ``draw_state`` op,
    the very words an eager forward draws from the same generator state; the
    op is tagged random, so the compiler neither repeats nor reorders it, and
    under activation checkpointing replays it with the generator state it
    first saw."""
    if seed is not None:
        words = [_signed(as_u64(seed, "seed")), _signed(as_u64(offset, "offset"))]
        if isinstance(p, torch.Tensor):
            return torch.cat([_words(words, device), _p_word(p, device)])
        return _words(words + [p_bits(p)], device)
    like = torch.empty(0, device=device)
    if not isinstance(p, torch.Tensor):
        return torch.ops.dropout_ext.draw_state(like, p, generator)
    # p is data: the draw's seed and offset words, then p's bits from the graph.
    return torch.cat([torch.ops.dropout_ext.draw_state(like, 0.0, generator)[:2], _p_word(p, device)])


def _p_word(p: Rate, device: torch.device) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        return p.reshape(1).to(device)
    return _words([p_bits(p)], device)

