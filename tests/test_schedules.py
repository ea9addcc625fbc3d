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
    """In eager mode a new p is new data for the same kernel: p reaches every
    op in the dropout state [seed, offset, p bits], and the Triton kernels
    exclude t and the scale from specialisation (test_triton_interpreter.py
    checks that). Each step drops at the scheduled rate (5 sigma)."""
    x = torch.ones(1 << 16)
    model = nn.Sequential(dropout_ext.Dropout(0.1))
    sched = schedules.DropoutScheduler(model, schedules.linear(0.1, 0.7, steps=3))
    for _ in range(4):
        rate = (model(x) == 0).float().mean().item()
        n = x.numel()
        assert abs(rate - sched.p) < 5 * (sched.p * (1 - sched.p) / n) ** 0.5
        sched.step()


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(16, 16), dropout_ext.Dropout(0.1)),
    lambda: nn.Sequential(dropout_ext.FusedDropout(0.1, "gelu")),
    lambda: nn.Sequential(dropout_ext.Dropout1d(0.1)),
    lambda: nn.Sequential(dropout_ext.DropPath(0.1)),
], ids=["Dropout", "FusedDropout", "Dropout1d", "DropPath"])
def test_p_is_a_runtime_value_under_compile(make):
    """A compiled model follows the scheduler's p with one graph: under
    torch.compile the modules pass p as data (an int64 buffer of its bits,
    the dropout state's third word), so nothing is recompiled for a new p.
    (The fused modules of fuse_dropout: test_fusion.py.)"""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = make()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(4096, 16)
    sched = schedules.DropoutScheduler(model, schedules.linear(0.1, 0.6, steps=5))
    counters.clear()
    for _ in range(6):
        with torch.no_grad():
            rate = (compiled(x) == 0).float().mean().item()
        expected = sched.p  # (gelu is 0 only where dropped)
        n = x.numel() if not isinstance(model[0], (dropout_ext.Dropout1d, dropout_ext.DropPath)) else x.shape[0]
        assert abs(rate - expected) < 5 * (expected * (1 - expected) / n) ** 0.5 + 1e-3
        sched.step()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_masks_equal_eager_masks_with_p_as_data():
    """The p-as-data path draws the same mask as the eager path for the same
    generator state (p is the same number, only its route differs)."""
    model = dropout_ext.Dropout(0.3)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1000)
    torch.manual_seed(4)
    eager = model(x)
    torch.manual_seed(4)
    assert torch.equal(compiled(x), eager)
