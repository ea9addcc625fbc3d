"""Dropout-rate schedules: set p on every dropout module of a model as
training goes ("adjust the dropout rate during training").

p is a runtime argument of every kernel, so changing it launches the same
kernels with a new value: nothing is rebuilt or re-specialised.

    sched = DropoutScheduler(model, linear(0.0, 0.3, steps=10_000))
    for batch in loader:
        ...
        sched.step()
"""

from __future__ import annotations

import math
from typing import Callable, List

from torch import nn

from ._validate import check_p
from .modules import DropoutAddLayerNorm, DropoutAddRMSNorm, DropPath, FusedDropout

__all__ = ["constant", "linear", "cosine", "DropoutScheduler"]

Schedule = Callable[[int], float]


def _p(value, name) -> float:
    try:
        return check_p(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None


def _steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return steps


def constant(p: float) -> Schedule:
    """p at every step."""
    p = _p(p, "p")
    return lambda step: p


def linear(p_start: float, p_end: float, steps: int) -> Schedule:
    """From p_start at step 0 to p_end at ``steps``, then p_end."""
    a, b, n = _p(p_start, "p_start"), _p(p_end, "p_end"), _steps(steps)
    return lambda step: a + (b - a) * min(max(step, 0), n) / n


def cosine(p_start: float, p_end: float, steps: int) -> Schedule:
    """Half a cosine from p_start at step 0 to p_end at ``steps``, then p_end."""
    a, b, n = _p(p_start, "p_start"), _p(p_end, "p_end"), _steps(steps)
    return lambda step: b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), n) / n))


_SCHEDULED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
              FusedDropout, DropPath, DropoutAddLayerNorm, DropoutAddRMSNorm)


class DropoutScheduler:
    """Sets ``p`` on every dropout module of ``model`` (nn.Dropout and its
    structured twins, dropout_ext's modules) from ``schedule(step)``; the
    first value is applied at construction, then one step per ``step()``."""

    def __init__(self, model: nn.Module, schedule: Schedule) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(schedule):
            raise TypeError(f"schedule must be callable step -> p, got {type(schedule).__name__}")
        self.modules: List[nn.Module] = [m for m in model.modules() if isinstance(m, _SCHEDULED)]
        self.schedule = schedule
        self.step_count = 0
        self.p = self._apply()

    def _apply(self) -> float:
        p = _p(self.schedule(self.step_count), "schedule")
        for m in self.modules:
            m.p = p
        return p

    def step(self) -> float:
        """Advance one step; returns the p now set."""
        self.step_count += 1
        self.p = self._apply()
        return self.p

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.p = self._apply()
