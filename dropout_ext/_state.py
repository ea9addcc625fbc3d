"""The dropout state: the one representation of (seed, offset, p) that every
kernel reads (docs/DESIGN.md).

An int64 tensor ``[seed, offset, p bits]`` on the input's device: the seed
and offset of the RNG contract as two's-complement words, and p's IEEE
binary64 bits. Being data, not constants of a call, it lets a captured CUDA
graph draw fresh (seed, offset) on every replay and a compiled graph take
any p; being on the input's device, kernels read it without a host sync;
saved by the forward, it is all the backward needs to draw the mask again.
"""

from __future__ import annotations

import struct
from array import array
from typing import Optional, Union

import torch

from ._validate import as_u64

Rate = Union[float, torch.Tensor]  # p, or a module's int64 tensor of p's bits


def p_bits(p: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(p)))[0]


def p_from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def _signed(u: int) -> int:
    return u - 2**64 if u >= 2**63 else u


def _words(values, device: torch.device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device``: built there by fills
    that carry the values as kernel arguments, since copying a host tensor
    over would block the host and cannot be captured in a CUDA graph."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int64)
    out = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)  # a scalar fill, where `out[i] = v` would copy from a host tensor
    return out


def make_state(device: torch.device, p: Rate, seed: Optional[int] = None, offset: int = 0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The state for a call on ``device`` (arguments already validated).

    With ``seed``: (seed, offset) as given. Otherwise both words are drawn
    with ``torch.randint`` from ``generator`` or the device's default
    generator, so ``torch.manual_seed`` reproduces runs, a restored RNG state
    (activation checkpointing) replays the same masks, and on CUDA the draw
    is a device op that a captured graph repeats on every replay.
    """
    if seed is not None:
        words = [_signed(as_u64(seed, "seed")), _signed(as_u64(offset, "offset"))]
    else:
        rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)
        if isinstance(p, torch.Tensor) or device.type != "cpu":
            return torch.cat([rng, _p_word(p, device)])
        words = rng.tolist()  # a host tensor: reading it is free, and one tensor beats a cat
        if not torch.compiler.is_compiling():
            # The cheapest CPU tensor of three host words: no list parsing.
            return torch.frombuffer(array("q", words + [p_bits(p)]), dtype=torch.int64)
    if isinstance(p, torch.Tensor):
        return torch.cat([_words(words, device), _p_word(p, device)])
    return _words(words + [p_bits(p)], device)


def _p_word(p: Rate, device: torch.device) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        return p.reshape(1).to(device)
    return _words([p_bits(p)], device)


def state_values(state: Optional[torch.Tensor]):
    """(seed, offset, p) of a state read on the host, p sanitised as the
    kernels do (NaN and negatives mean 0, 1 and above drop everything)."""
    if state is None:
        return 0, 0, 0.0
    seed, offset, bits = state.tolist()
    p = p_from_bits(bits)
    return seed, offset, (min(p, 1.0) if p >= 0.0 else 0.0)
