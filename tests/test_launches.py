"""dropout_ext.launches.count_launches on CPU tensors (count_launches("cpu"))
and on fake ones: what counts as a device op and what does not. (The
launch counts of dropout_ext's own calls over fake CUDA tensors are
test_fake_cuda.py's.)"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dropout_ext.launches import count_launches

aten = torch.ops.aten


def _ops(fn, device="cpu"):
    with count_launches(device) as launches:
        fn()
    assert launches.count == len(launches.ops)
    return launches.ops


def test_one_op_one_launch():
    x = torch.randn(8, 8)
    assert _ops(lambda: torch.add(x, 1)) == [aten.add.Tensor]
    assert _ops(lambda: x.clone().mul_(2)) == [aten.clone.default, aten.mul_.Tensor]  # in place: a write
    out = torch.empty(8, 8)
    assert _ops(lambda: torch.add(x, 1, out=out)) == [aten.add.out]


@pytest.mark.parametrize("view", [
    lambda x: x.view(-1), lambda x: x.t(), lambda x: x[1:], lambda x: x.detach(), lambda x: x.expand(2, 8, 8),
    lambda x: x.split(4), lambda x: x.t_(), lambda x: x.resize_(4),
], ids=["view", "t", "slice", "detach", "expand", "split", "t_", "resize_"])
def test_views_launch_nothing(view):
    x = torch.randn(8, 8)
    assert _ops(lambda: view(x)) == []


def test_allocations_launch_nothing_and_fills_do():
    x = torch.randn(8, 8)
    assert _ops(lambda: (torch.empty(5), torch.empty_like(x), x.new_empty(3), torch.empty_strided((2,), (1,)))) == []
    assert _ops(lambda: torch.zeros(5)) == [aten.zeros.default]


def test_empty_outputs_launch_nothing():
    nothing = torch.randn(0, 8)
    assert _ops(lambda: torch.add(nothing, 1)) == []


def test_reads_back_to_the_host_count():
    x = torch.randn(8)
    assert _ops(lambda: x.sum().item()) == [aten.sum.default, aten._local_scalar_dense.default]
    assert _ops(lambda: torch.equal(x, x)) == [aten.equal.default]


def test_counts_the_device_asked_for():
    """Without device=, the accelerators' ops only: CPU and meta tensors run
    nothing on a GPU."""
    x = torch.randn(8)
    assert _ops(lambda: x + 1, device=None) == []
    assert _ops(lambda: x + 1, device=torch.device("cpu")) == [aten.add.Tensor]
    m = torch.empty(8, device="meta")
    assert _ops(lambda: m + 1, device=None) == []
    assert _ops(lambda: m + 1, device="meta") == [aten.add.Tensor]


def test_nn_dropout_counts_what_it_dispatches():
    """nn.Dropout on the CPU: ATen's CPU dropout draws a Bernoulli noise
    tensor, scales it and multiplies (three ops, where CUDA has one fused
    native_dropout); its backward is one multiplication by the noise."""
    x = torch.randn(16, 16, requires_grad=True)
    g = torch.randn(16, 16)
    forward = [aten.bernoulli_.float, aten.div_.Scalar, aten.mul.Tensor]
    assert _ops(lambda: nn.Dropout(0.1)(x)) == forward
    assert _ops(lambda: torch.autograd.grad(nn.Dropout(0.1)(x), x, g)) == forward + [aten.mul.Tensor]
    assert _ops(lambda: torch.native_dropout(x, 0.1, True)) == [aten.native_dropout.default]
    with torch.no_grad():  # no dropout to do
        assert _ops(lambda: nn.Dropout(0.1).eval()(x)) == []


def test_under_fake_tensor_mode():
    """Entered inside FakeTensorMode, the counter sees the ops on fake
    tensors, and not the device queries fake tensors dispatch (prim.device)."""
    with FakeTensorMode():
        x = torch.empty(8, 8, requires_grad=True)
        assert _ops(lambda: (torch.add(x, 1), x.view(-1))) == [aten.add.Tensor]


@pytest.mark.parametrize("device", ["gpu0", 3.5])
def test_bad_device_is_named(device):
    with pytest.raises(ValueError, match="count_launches: device must be"):
        count_launches(device)
