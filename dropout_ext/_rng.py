"""Where (seed, offset) come from: one helper for every backend (docs/RNG.md)."""

from __future__ import annotations

from typing import Optional

import torch

from .reference import as_u64


def _signed(u: int) -> int:
    return u - 2**64 if u >= 2**63 else u


def draw_rng(device: torch.device, generator: Optional[torch.Generator] = None,
             seed: Optional[int] = None, offset: int = 0) -> torch.Tensor:
    """The int64 tensor [seed, offset] the ops take.

    With ``seed`` given: (seed, offset) on the CPU. Otherwise both words are
    drawn with ``torch.randint`` from the generator of the input's device, so
    ``torch.manual_seed`` reproduces runs, a restored RNG state (activation
    checkpointing) replays the same masks, the draw advances the generator like
    any PyTorch random op (no counter of PyTorch's own ops is reused), and on
    CUDA the draw is a device tensor: a captured CUDA graph redraws it on every
    replay and the kernels read it from device memory.
    """
    if seed is not None:
        return torch.tensor([_signed(as_u64(seed, "seed")), _signed(as_u64(offset, "offset"))],
                            dtype=torch.int64)
    if offset != 0:
        raise ValueError("offset is only meaningful together with seed=")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"generator is on {generator.device}, but the input is on {device}")
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device,
                         generator=generator)
