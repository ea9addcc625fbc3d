"""Python API: drop-in behaviour, numerical equivalence with nn.Dropout,
autograd (gradcheck, double backward), torch.compile, RNG sourcing, backend
choice. (Every backend against the reference, opcheck included: test_conformance.py.)"""

import sys

import pytest
import torch
from torch import nn

import dropout_ext
from dropout_ext import functional as F
from dropout_ext import _backend
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, run_child



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7,), (33, 65)])
def test_given_mask_equals_native_dropout_backward(dtype, p, shape):
    # The kept value is x * scale with nn.Dropout's arithmetic: given the same
    # mask, aten's own dropout formula produces the same bits.
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    y = F.dropout(x, p, seed=77)
    mask = F.dropout_mask(shape, p, 77)
    assert_bitwise_equal(y, torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p)))
    g = torch.randn(shape).to(dtype)
    xr = x.clone().requires_grad_()
    F.dropout(xr, p, seed=77).backward(g)
    assert_bitwise_equal(xr.grad, torch.ops.aten.native_dropout_backward(g, mask, 1.0 / (1.0 - p)))


def test_eval_is_identity_and_p0_returns_input():
    x = torch.randn(10)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    m = dropout_ext.Dropout(0.3).eval()
    assert m(x) is x
    y = F.fused_dropout(x.view(2, 5), 0.5, bias=torch.ones(5), activation="relu", training=False)
    assert_bitwise_equal(y, torch.relu(x.view(2, 5) + 1))


def test_p1_drops_everything_even_nan_and_inf():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    y = F.dropout(x, 1.0)
    assert torch.all(y == 0)  # zeros (of either sign), never NaN


def test_dropped_nan_is_zero_kept_nan_propagates():
    x = torch.full((4096,), float("nan"))
    y = F.dropout(x, 0.5, seed=3)
    mask = F.dropout_mask((4096,), 0.5, 3)
    assert torch.all(y[~mask] == 0) and torch.all(torch.isnan(y[mask]))


def test_module_matches_nn_dropout_surface():
    ours, theirs = dropout_ext.Dropout(0.2, inplace=True), nn.Dropout(0.2, inplace=True)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, nn.Dropout)
    assert ours.state_dict() == theirs.state_dict() == {}
    ours.load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 1.5"):
        dropout_ext.Dropout(1.5)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got nan"):
        dropout_ext.Dropout(float("nan"))
    f = dropout_ext.FusedDropout(0.1, "gelu")
    assert "activation='gelu'" in repr(f)


def test_fused_module_forward():
    m = dropout_ext.FusedDropout(0.5, "silu")
    x, b, r = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    torch.manual_seed(5)
    y = m(x, b, r)
    torch.manual_seed(5)
    assert_bitwise_equal(y, F.fused_dropout(x, 0.5, bias=b, residual=r, activation="silu"))


def test_replace_dropout_counts_and_keeps_settings():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.7, inplace=True)))
    model.eval()
    assert dropout_ext.replace_dropout(model) == 2
    assert type(model[1]) is dropout_ext.Dropout and model[1].p == 0.1 and not model[1].training
    assert model[2][0].inplace and model[2][0].p == 0.7
    assert dropout_ext.replace_dropout(model) == 0


def test_replace_dropout_makes_twins_beside_the_model():
    """A twin's p buffer on the model's device: on another, torch.compile
    gets p as a number (one graph per value). The meta device stands for a
    GPU."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout1d(0.2)))
    assert dropout_ext.replace_dropout(model) == 2
    assert model[1]._p_bits.device.type == "meta" and model[2][0]._p_bits.device.type == "meta"


def test_inplace_modifies_input_like_nn_dropout():
    x = torch.randn(100)
    expected = F.dropout(x.clone(), 0.5, seed=9)
    out = F.dropout(x, 0.5, inplace=True, seed=9)
    assert out is x
    assert_bitwise_equal(x, expected)
    leaf = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(leaf, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        nn.functional.dropout(leaf, 0.5, inplace=True)


MASK_MODES = ["regenerate", "packed"]


@pytest.mark.parametrize("mask_mode", MASK_MODES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_gradcheck_float64(activation, mask_mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    if activation == "relu":  # keep away from the kink
        x = (x.detach() + torch.where(x.detach() >= 0, 0.1, -0.1)).requires_grad_()
    fn = lambda x, b, r: F.fused_dropout(x, 0.4, bias=b, residual=r, activation=activation, seed=5,
                                         mask_mode=mask_mode)
    assert torch.autograd.gradcheck(fn, (x, b, r))


@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_double_backward_identity(mask_mode):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda x: F.dropout(x, 0.3, seed=1, mask_mode=mask_mode) ** 2
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_mask_mode_is_checked_and_shown():
    x = torch.randn(4)
    for bad in ("bits", 1, True):
        with pytest.raises(ValueError, match="mask_mode must be one of"):
            F.dropout(x, 0.5, mask_mode=bad)
        with pytest.raises(ValueError, match="mask_mode must be one of"):
            dropout_ext.Dropout(0.5, mask_mode=bad)
    assert "mask_mode='packed'" in repr(dropout_ext.Dropout(0.1, mask_mode="packed"))
    assert "mask_mode" not in repr(dropout_ext.Dropout(0.1))
    assert "mask_mode='regenerate'" in repr(dropout_ext.FusedDropout(0.1, mask_mode="regenerate"))


@pytest.mark.parametrize("module", [False, True])
def test_mask_modes_give_the_same_values_and_gradients(module):
    x = torch.randn(33, 17, requires_grad=True)
    b = torch.randn(17, requires_grad=True)
    g = torch.randn(33, 17)
    results = []
    for mode in MASK_MODES:
        if module:
            torch.manual_seed(4)
            y = dropout_ext.FusedDropout(0.3, "silu", mask_mode=mode)(x, b)
        else:
            y = F.fused_dropout(x, 0.3, bias=b, activation="silu", seed=4, mask_mode=mode)
        results.append((y, *torch.autograd.grad(y, (x, b), g)))
    for got, want in zip(*results):
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("mask_mode, per_element", [("regenerate", 0), ("packed", 1 / 8)])
def test_saved_bytes_per_mask_mode(mask_mode, per_element):
    """regenerate saves the dropout state alone; packed adds 1 bit per element."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.dropout(x, 0.5, mask_mode=mask_mode).sum().backward()
    assert sum(saved) == 24 + 1000 * per_element  # the state [seed, offset, p bits] (+ the keep bits)


@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_compile_fullgraph_matches_eager(mask_mode):
    def f(x, b, r):
        return F.fused_dropout(x, 0.3, bias=b, residual=r, activation="gelu", seed=11, mask_mode=mask_mode)

    x = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    r = torch.randn(16, 32)
    compiled = torch.compile(f, fullgraph=True)
    y_c = compiled(x, b, r)
    y_e = f(x, b, r)
    assert_bitwise_equal(y_c, y_e)
    g = torch.randn(16, 32)
    gx_c, gb_c = torch.autograd.grad(y_c, (x, b), g)
    gx_e, gb_e = torch.autograd.grad(y_e, (x, b), g)
    assert_bitwise_equal(gx_c, gx_e)
    assert_bitwise_equal(gb_c, gb_e)


def test_compile_module_draws_from_generator_without_graph_break():
    model = nn.Sequential(nn.Linear(8, 8), dropout_ext.Dropout(0.5))
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(torch.randn(4, 8))
    assert y.shape == (4, 8)


_FIRST_CALLS = """
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
import dropout_ext

model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.5))
if {fused}:
    model = dropout_ext.fuse_dropout(model)
else:
    dropout_ext.replace_dropout(model)
counter = CompileCounter()
compiled = torch.compile(model, backend=counter, fullgraph=True)
x = torch.randn(4, 8)
compiled(x)
compiled(x)
print(counter.frame_count)
"""


@pytest.mark.parametrize("fused", [False, True], ids=["replace_dropout", "fuse_dropout"])
def test_first_compiled_calls_make_one_graph(fused):
    """The first compiled call of a model finds nothing that a call fills
    (the backend lookup is complete at import), so the second call runs the
    first one's graph. In a fresh process: any earlier call here would have
    filled what a first call fills."""
    proc = run_child([sys.executable, "-c", _FIRST_CALLS.format(fused=fused)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "1", f"graphs compiled by the first two calls: {proc.stdout}"


def test_manual_seed_reproducibility_and_fresh_masks():
    x = torch.randn(1000)
    torch.manual_seed(0)
    a = F.dropout(x, 0.5)
    b = F.dropout(x, 0.5)
    torch.manual_seed(0)
    assert_bitwise_equal(F.dropout(x, 0.5), a)
    assert not torch.equal(a, b)
    gen = torch.Generator().manual_seed(4)
    c = F.dropout(x, 0.5, generator=gen)
    gen.manual_seed(4)
    assert_bitwise_equal(F.dropout(x, 0.5, generator=gen), c)


def test_seed_and_offset_select_the_mask():
    x = torch.randn(4096)
    assert_bitwise_equal(F.dropout(x, 0.5, seed=1), F.dropout(x, 0.5, seed=1))
    assert not torch.equal(F.dropout(x, 0.5, seed=1), F.dropout(x, 0.5, seed=2))
    assert not torch.equal(F.dropout(x, 0.5, seed=1, offset=1), F.dropout(x, 0.5, seed=1))
    assert not torch.equal(F.dropout_mask((4096,), 0.5, 2**32), F.dropout_mask((4096,), 0.5, 0))


def test_draw_does_not_reuse_pytorch_counters():
    # Our draw advances the generator like any random op, so the next torch op
    # sees a fresh state.
    torch.manual_seed(0)
    F.dropout(torch.randn(10), 0.5)
    after = torch.rand(4)
    torch.manual_seed(0)
    torch.randn(10)
    assert not torch.equal(after, torch.rand(4))


@pytest.mark.parametrize("mask_mode", MASK_MODES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_replays_the_same_masks(use_reentrant, mask_mode):
    from torch.utils.checkpoint import checkpoint

    lin = nn.Linear(16, 16)
    block = lambda x: F.fused_dropout(lin(x), 0.5, activation="gelu", mask_mode=mask_mode)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(3)
    block(x).sum().backward()
    expected = (x.grad.clone(), lin.weight.grad.clone())
    x.grad = None
    lin.weight.grad = None
    torch.manual_seed(3)
    checkpoint(block, x, use_reentrant=use_reentrant).sum().backward()
    assert_bitwise_equal(x.grad, expected[0])
    assert_bitwise_equal(lin.weight.grad, expected[1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_backends_agree(backend, monkeypatch):
    """backend= and the default backend (DROPOUT_EXT_BACKEND) pick the same
    op family, and each backend gives the other's bits."""
    x, b = torch.randn(5, 9), torch.randn(9)
    y = F.fused_dropout(x, 0.5, bias=b, activation="gelu_tanh", seed=8, backend=backend)
    other = {"cpu": "reference", "reference": "cpu"}[backend]
    assert_bitwise_equal(y, F.fused_dropout(x, 0.5, bias=b, activation="gelu_tanh", seed=8, backend=other))
    chosen = _backend.ops_for(backend, x.device)
    assert chosen is not _backend.ops_for(other, x.device)
    monkeypatch.setattr(_backend, "DEFAULT_BACKEND", backend)
    assert _backend.ops_for(None, x.device) is chosen
    assert_bitwise_equal(F.fused_dropout(x, 0.5, bias=b, activation="gelu_tanh", seed=8), y)


def test_environment_sets_the_default_backend():
    """DROPOUT_EXT_BACKEND is read once, at import: calls without backend=
    then run it, and a later change of the environment changes nothing."""
    code = ("import os, torch; from dropout_ext import _backend; "
            "os.environ['DROPOUT_EXT_BACKEND'] = 'cpu'; "
            "print(_backend.DEFAULT_BACKEND, _backend.ops_for(None, torch.device('cpu')).forward.name())")
    proc = run_child([sys.executable, "-c", code], env={"DROPOUT_EXT_BACKEND": "reference"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["reference", "dropout_ext::reference_fused_dropout"], proc.stdout


def test_available_backends_on_cpu():
    assert dropout_ext.available_backends("cpu") == ["cpu", "reference"]


def test_autocast_bias_and_residual_follow_the_input():
    """Under autocast a matmul's output is bfloat16 while the bias and the
    residual stream stay float32: they follow the input's dtype, as autocast
    casts nn.Linear's bias, and the result is the same bits as with the
    casts done by hand. Outside autocast the mismatch is an error."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(8, 32, generator=g), torch.randn(32, 16, generator=g)
    bias, res = torch.randn(16, generator=g), torch.randn(8, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a @ w
        assert y.dtype == torch.bfloat16
        out = F.fused_dropout(y, 0.2, bias=bias, residual=res, activation="gelu", seed=5)
        fused = dropout_ext.FusedDropout(0.2, "gelu")
        torch.manual_seed(1)
        out_module = fused(y, bias, res)
    assert out.dtype == torch.bfloat16
    assert_bitwise_equal(out, F.fused_dropout(y, 0.2, bias=bias.bfloat16(), residual=res.bfloat16(),
                                              activation="gelu", seed=5))
    torch.manual_seed(1)
    assert_bitwise_equal(out_module, fused(y, bias.bfloat16(), res.bfloat16()))
    with pytest.raises(TypeError, match="bias has dtype torch.float32, but input has torch.bfloat16"):
        F.fused_dropout(y, 0.2, bias=bias)


def test_fused_model_runs_under_autocast():
    """fuse_dropout of Linear -> GELU -> Dropout under CPU autocast: it runs
    where the unfused model runs, in the same dtype, dropping the same
    elements, equal to bfloat16 rounding: the fused matmul rounds x W to
    bfloat16 before the bias is added (nn.Linear adds it inside), one
    bfloat16 rounding of the pre-activation that the last layer carries
    into outputs below 1: 2**-6, two bfloat16 ulps of 1 (2**-8 measured).
    torch's gelu and the contract's differ by float32 ulps, far below that
    (test_activations.py holds them to it on every bfloat16 value)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16))
    dropout_ext.replace_dropout(model)
    fused = dropout_ext.fuse_dropout(model)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        ref_out = model(x)
        torch.manual_seed(3)
        out = fused(x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2 ** -6, rtol=2 ** -6)
