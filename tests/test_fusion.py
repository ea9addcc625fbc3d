"""fuse_dropout: Linear -> activation -> Dropout and x + Dropout(y) rewritten
into the fused op, off by default; the fused model drops the same elements
as the unfused one and agrees to rounding."""

import pytest
import torch
from torch import nn

import dropout_ext
from dropout_ext import schedules
from test_activations import ContractActivation


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


class Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(16, 32), act, nn.Dropout(0.3)
        self.fc2, self.drop2 = nn.Linear(32, 16), nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop1(self.act(self.fc1(x)))
        return x + self.drop2(self.fc2(h))


@pytest.mark.parametrize("act,name", [(nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                      (nn.SiLU(), "silu"), (nn.Identity(), None)])
def test_fused_block_matches_unfused(act, name):
    """The fused block computes what the unfused one does. The unfused model
    then runs the contract's activation in place of torch's (how close
    those two are is test_activations.py's), so what is left between them is
    fusion's own rounding: the bias added after the matmul instead of inside
    it (one rounding of the pre-activation, which the next layer's 32 terms
    carry) and the bias gradient summed in another order. 1e-6 is 8 float32
    ulps of 1; gelu in place of gelu_tanh moves the outputs by 1.4e-4, a
    lost bias or a wrong scale by more."""
    torch.manual_seed(0)
    model = Block(act)
    dropout_ext.replace_dropout(model)
    fused = dropout_ext.fuse_dropout(model)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("LinearDropout") == (2 if name else 1)
    assert _count(fused, dropout_ext.FusedDropout) == (2 if name else 1)
    assert _count(fused, nn.Dropout) == (0 if name else 1)  # Identity -> Dropout is left alone
    if name:
        model.act = ContractActivation(name)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(5)
    ref = model(x)
    torch.manual_seed(5)
    out = fused(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # the same elements are dropped: the residual branch is exactly x there
    assert torch.equal(out == x, ref == x)
    g = torch.randn_like(out)
    torch.manual_seed(5)
    gr = torch.autograd.grad(model(x), [x] + list(model.parameters()), g)
    torch.manual_seed(5)
    gf = torch.autograd.grad(fused(x), [x] + list(fused.parameters()), g)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fusion_is_off_by_default_and_leaves_the_model_alone():
    model = Block(nn.ReLU())
    before = [type(m) for m in model.modules()]
    dropout_ext.fuse_dropout(model)
    assert [type(m) for m in model.modules()] == before
    assert dropout_ext.replace_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout())) == 1  # no implicit fusion


def test_eval_mode_is_the_identity_on_dropout():
    model = Block(nn.GELU()).eval()
    fused = dropout_ext.fuse_dropout(model)
    x = torch.randn(4, 16)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_residual_without_linear_and_unfusable_patterns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.keep = nn.Dropout(0.5)

        def forward(self, x, y):
            z = x + self.drop(y)       # fusable: residual add
            w = self.keep(z) * 2       # not fusable: no linear, no add
            return w

    fused = dropout_ext.fuse_dropout(M())
    assert _count(fused, dropout_ext.FusedDropout) == 1
    assert _count(fused, nn.Dropout) == 1  # the unfusable one is left as it was
    x, y = torch.randn(64), torch.randn(64)
    torch.manual_seed(3)
    out = fused(x, y)
    assert out.shape == (64,)


def test_scheduler_reaches_fused_modules():
    """A DropoutScheduler on the fused model sets p on its fused modules, and
    the fused model then drops what the unfused one drops at that p."""
    torch.manual_seed(0)
    model = Block(nn.GELU())
    dropout_ext.replace_dropout(model)
    fused = dropout_ext.fuse_dropout(model)
    sched = schedules.DropoutScheduler(fused, schedules.linear(0.1, 0.7, steps=3))
    assert len(sched.modules) == 2 and all(isinstance(m, dropout_ext.FusedDropout) for m in sched.modules)
    x = torch.randn(64, 16)
    for _ in range(4):
        assert all(m.p == pytest.approx(sched.p) for m in sched.modules)
        model.drop1.p = model.drop2.p = sched.p
        torch.manual_seed(7)
        expected = model(x)
        torch.manual_seed(7)
        out = fused(x)
        assert torch.equal(out == x, expected == x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        sched.step()


class _LinearDrop(nn.Module):
    def __init__(self, residual):
        super().__init__()
        self.fc, self.drop, self.residual = nn.Linear(16, 16), nn.Dropout(0.1), residual

    def forward(self, x):
        y = self.drop(self.fc(x))
        return x + y if self.residual else y


@pytest.mark.parametrize("residual", [False, True], ids=["linear", "linear+residual"])
def test_compiled_fused_model_keeps_one_graph_while_p_changes(residual):
    """As for the other modules (test_schedules.py): the fused modules pass p
    as data under torch.compile, so six values of p from a schedule run one
    compiled graph, each at its own drop rate (5 sigma)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = dropout_ext.fuse_dropout(_LinearDrop(residual))
    assert _count(fused, dropout_ext.FusedDropout) == 1 and _count(fused, nn.Dropout) == 0
    compiled = torch.compile(fused, fullgraph=True, dynamic=False)
    sched = schedules.DropoutScheduler(fused, schedules.linear(0.1, 0.6, steps=5))
    x = torch.randn(4096, 16)
    counters.clear()
    seen = []
    for _ in range(6):
        with torch.no_grad():
            out = compiled(x)
        dropped = (out == x) if residual else (out == 0)
        rate, p, n = dropped.float().mean().item(), sched.p, x.numel()
        assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, (rate, p)
        seen.append(p)
        sched.step()
    assert len(set(seen)) == 6
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


class _NormBlock(nn.Module):
    def __init__(self, norm, drop_first):
        super().__init__()
        self.fc, self.drop, self.norm, self.drop_first = nn.Linear(16, 16), nn.Dropout(0.3), norm, drop_first

    def forward(self, x):
        y = self.drop(self.fc(x))
        return self.norm(y + x if self.drop_first else x + y)


NORM_CASES = {
    "layer": (lambda: nn.LayerNorm(16), dropout_ext.DropoutAddLayerNorm),
    "layer no bias": (lambda: nn.LayerNorm(16, bias=False), dropout_ext.DropoutAddLayerNorm),
    "layer no affine": (lambda: nn.LayerNorm(16, elementwise_affine=False), dropout_ext.DropoutAddLayerNorm),
    "rms": (lambda: nn.RMSNorm(16, eps=1e-6), dropout_ext.DropoutAddRMSNorm),
}


@pytest.mark.parametrize("drop_first", [False, True], ids=["x+drop", "drop+x"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_of_residual_add_is_fused(case, drop_first):
    """Norm(x + Dropout(y)) and Norm(Dropout(y) + x) become one fused norm
    module sharing the norm's parameters (the Linear stays); it drops the
    same elements for the same generator state, so outputs and gradients
    agree to rounding, in training and in eval mode."""
    make_norm, kind = NORM_CASES[case]
    torch.manual_seed(0)
    model = _NormBlock(make_norm(), drop_first)
    with torch.no_grad():
        for prm in model.norm.parameters():
            prm.normal_()
    dropout_ext.replace_dropout(model)
    fused = dropout_ext.fuse_dropout(model)
    (norm,) = [m for m in fused.modules() if isinstance(m, kind)]
    assert _count(fused, (nn.LayerNorm, nn.RMSNorm, nn.Dropout)) == 0 and _count(fused, nn.Linear) == 1
    assert norm.weight is model.norm.weight and norm.bias is getattr(model.norm, "bias", None)
    assert norm.p == 0.3 and norm.eps == model.norm.eps
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    out = fused(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [x] + list(model.parameters())
    for a, e in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    model.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_norms_left_alone():
    """No fusion where the pattern does not hold: an nn.RMSNorm without eps
    (its eps comes from the input's dtype), a norm over two dimensions, a
    sum used twice."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.d1, self.d2, self.d3 = nn.Dropout(0.1), nn.Dropout(0.1), nn.Dropout(0.1)
            self.rms, self.ln2d, self.ln = nn.RMSNorm(8), nn.LayerNorm((4, 8)), nn.LayerNorm(8)

        def forward(self, x):
            a = self.rms(x + self.d1(x))
            b = self.ln2d(x + self.d2(x))
            s = x + self.d3(x)
            return a + b + self.ln(s) + s

    fused = dropout_ext.fuse_dropout(M())
    assert _count(fused, (dropout_ext.DropoutAddLayerNorm, dropout_ext.DropoutAddRMSNorm)) == 0
    assert _count(fused, dropout_ext.FusedDropout) == 3  # each residual add alone
    assert _count(fused, (nn.RMSNorm, nn.LayerNorm)) == 3


class EveryPattern(nn.Module):
    """One of each fused module: Linear -> act -> Dropout, x + Dropout(y)
    without a Linear, LayerNorm(x + Dropout(Linear(y)))."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop1 = nn.Linear(16, 16), nn.Dropout(0.1)
        self.drop2 = nn.Dropout(0.2)
        self.fc3, self.drop3, self.norm = nn.Linear(16, 16), nn.Dropout(0.3), nn.LayerNorm(16)

    def forward(self, x):
        h = self.drop1(torch.relu(self.fc1(x)))
        h = h + self.drop2(torch.tanh(h))
        return self.norm(h + self.drop3(self.fc3(h)))


@pytest.mark.parametrize("dropout", ["nn", "dropout_ext"])
def test_fused_modules_live_where_the_model_does(dropout):
    """The fused modules are made on the device and in the dtype of the
    modules they replace (the model's device where those hold no tensor, as
    nn.Dropout): a p buffer left elsewhere would reach the kernels as a
    number under torch.compile, one graph per value of p. A model on the
    meta device stands for one on a GPU."""
    with torch.device("meta"):
        model = EveryPattern().double()
    if dropout == "dropout_ext":
        dropout_ext.replace_dropout(model)
    fused = dropout_ext.fuse_dropout(model)
    made = [m for m in fused.modules() if isinstance(m, (dropout_ext.FusedDropout, dropout_ext.DropoutAddLayerNorm))]
    assert sorted(type(m).__name__ for m in made) == ["DropoutAddLayerNorm", "FusedDropout", "LinearDropout"]
    for m in made:
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            assert t.device.type == "meta", (type(m).__name__, name, t.device)
            assert t.dtype == (torch.int64 if name.endswith("_p_bits") else torch.float64), (name, t.dtype)
