"""Dropout-rate schedules: values, the scheduler setting p on every dropout
module, and p as a runtime value (no recompilation, no new kernels)."""

import math

import pytest
import torch
from torch import nn

import dropout_ext
from dropout_ext import schedules


def test_schedule_values():
    assert schedules.constant(0.2)(123) == 0.2
    lin = schedules.linear(0.0, 0.4, steps=4)
    assert [lin(s) for s in (0, 1, 2, 4, 10)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    cos = schedules.cosine(0.5, 0.1, steps=10)
    assert cos(0) == pytest.approx(0.5) and cos(10) == pytest.approx(0.1) and cos(20) == pytest.approx(0.1)
    assert cos(5) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_schedule_errors():
    with pytest.raises(ValueError, match="p_end"):
        schedules.linear(0.0, 1.5, steps=3)
    with pytest.raises(ValueError, match="steps"):
        schedules.cosine(0.1, 0.2, steps=0)
    with pytest.raises(TypeError, match="model"):
        schedules.DropoutScheduler("not a model", schedules.constant(0.1))


def test_scheduler_sets_p_on_every_dropout_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), dropout_ext.Dropout2d(0.5),
                          dropout_ext.FusedDropout(0.5, "gelu"), dropout_ext.DropPath(0.5))
    sched = schedules.DropoutScheduler(model, schedules.linear(0.0, 0.3, steps=3))
    assert len(sched.modules) == 4 and all(m.p == 0.0 for m in sched.modules)
    for expected in (0.1, 0.2, 0.3, 0.3):
        assert sched.step() == pytest.approx(expected)
        assert all(m.p == pytest.approx(expected) for m in sched.modules)
    state = sched.state_dict()
    again = schedules.DropoutScheduler(model, schedules.linear(0.0, 0.3, steps=3))
    again.load_state_dict(state)
    assert again.p == pytest.approx(0.3)


def test_p_is_a_kernel_argument_no_new_kernels():
    """In eager mode a new p is a new argument to the same kernel: the CPU op
    takes p as a double, and the Triton kernels exclude t and the scale from
    specialisation (test_triton_interpreter.py checks that)."""
    x = torch.ones(1 << 16)
    model = nn.Sequential(dropout_ext.Dropout(0.1))
    sched = schedules.DropoutScheduler(model, schedules.linear(0.1, 0.7, steps=3))
    for _ in range(4):
        rate = (model(x) == 0).float().mean().item()
        n = x.numel()
        assert abs(rate - sched.p) < 5 * (sched.p * (1 - sched.p) / n) ** 0.5
        sched.step()


def test_changing_p_under_compile_takes_effect():
    """A compiled model follows the scheduler's p. Dynamo guards on module
    attributes, so each distinct p value compiles one graph (README, "Changing
    p"); the kernels themselves are the same."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), dropout_ext.Dropout(0.1))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(4096, 16)
    sched = schedules.DropoutScheduler(model, schedules.linear(0.1, 0.5, steps=4))
    from torch._dynamo.utils import counters

    counters.clear()
    seen = set()
    for _ in range(6):
        with torch.no_grad():
            rate = (compiled(x) == 0).float().mean().item()
        assert abs(rate - sched.p) < 5 * (sched.p * (1 - sched.p) / x.numel()) ** 0.5 + 1e-3
        seen.add(sched.p)
        sched.step()
    assert counters["stats"]["unique_graphs"] <= len(seen)
