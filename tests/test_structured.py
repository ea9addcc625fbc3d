"""Structured dropout: Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout,
broadcast_dims (locked/variational dropout, DropPath). Drop-in surface
(shape rules, warnings, errors, repr) against the nn twins; bit equality with
the reference of the contract's structured mask; statistics."""

import warnings

import pytest
import torch
from torch import nn

import dropout_ext
from dropout_ext import functional as F
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal

PAIRS = [(nn.Dropout1d, dropout_ext.Dropout1d), (nn.Dropout2d, dropout_ext.Dropout2d),
         (nn.Dropout3d, dropout_ext.Dropout3d), (nn.AlphaDropout, dropout_ext.AlphaDropout),
         (nn.FeatureAlphaDropout, dropout_ext.FeatureAlphaDropout)]


def _record(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            out, err = fn(), None
        except Exception as exc:  # compared with the twin's, type and text
            out, err = None, exc
    return out, err, [str(x.message) for x in w]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("shape", [(5,), (3, 8), (2, 3, 8), (2, 3, 4, 5), (2, 3, 2, 4, 5), (1, 2, 1, 2, 1, 2)])
def test_shape_rules_warnings_and_errors_match_nn(pair, shape):
    theirs, ours = pair
    x = torch.randn(shape)
    o_n, e_n, w_n = _record(lambda: theirs(0.5)(x))
    o_o, e_o, w_o = _record(lambda: ours(0.5)(x))
    assert w_o == w_n
    assert type(e_o) is type(e_n) and str(e_o) == str(e_n)
    if o_n is not None:
        assert o_o.shape == o_n.shape and o_o.dtype == o_n.dtype


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_module_surface(pair):
    theirs, ours = pair
    a, b = theirs(0.3, inplace=True), ours(0.3, inplace=True)
    assert repr(a) == repr(b) and isinstance(b, theirs)
    assert a.state_dict().keys() == b.state_dict().keys()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError) as e_n:
            theirs(bad)
        with pytest.raises(ValueError) as e_o:
            ours(bad)
        assert str(e_o.value) == str(e_n.value)
    x = torch.randn((2, 3, 4, 5, 6)[:{nn.Dropout1d: 3, nn.Dropout3d: 5}.get(theirs, 4)])
    assert b.eval()(x) is x


@pytest.mark.parametrize("fn,mask_of", [
    (F.dropout1d, lambda s: (s[0], s[1], 1)),
    (F.dropout2d, lambda s: (s[0], s[1], 1, 1)),
    (F.dropout3d, lambda s: (s[0], s[1], 1, 1, 1)),
])
def test_feature_dropout_is_the_reference_with_the_channel_mask(fn, mask_of):
    """The channel mask of each rank; every dtype with structured masks:
    test_conformance.py."""
    rank = {F.dropout1d: 3, F.dropout2d: 4, F.dropout3d: 5}[fn]
    shape = (3, 7, 5, 4, 3)[:rank]
    x = torch.randn(shape)
    y = fn(x, 0.4, seed=21, offset=2)
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, 21, 2, 0.4, "identity", mask_of(shape)))
    m = F.dropout_mask(mask_of(shape), 0.4, 21, 2)
    # whole channels are kept or dropped
    assert torch.equal((y != 0) | (x == 0), m.expand(shape) | (x == 0))


def test_unbatched_dropout1d_and_3d():
    x = torch.randn(6, 9)
    y = F.dropout1d(x, 0.5, seed=4)
    assert_bitwise_equal(y, ref.fused_dropout(x[None], None, None, 4, 0, 0.5, "identity", (1, 6, 1))[0])
    x3 = torch.randn(4, 2, 3, 5)
    y3 = F.dropout3d(x3, 0.5, seed=4)
    assert_bitwise_equal(y3, ref.fused_dropout(x3[None], None, None, 4, 0, 0.5, "identity", (1, 4, 1, 1, 1))[0])


def test_feature_dropout_gradient_uses_the_same_channels():
    x = torch.randn(4, 6, 10, requires_grad=True)
    F.dropout1d(x, 0.5, seed=8).sum().backward()
    m = F.dropout_mask((4, 6, 1), 0.5, 8).expand(4, 6, 10)
    assert_bitwise_equal(x.grad, torch.where(m, torch.full_like(x, 2.0), torch.zeros_like(x)))


@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_is_atens_formula_on_the_contract_mask(feature):
    x, p = torch.randn(4, 5, 6), 0.2
    fn = F.feature_alpha_dropout if feature else F.alpha_dropout
    y = fn(x, p, training=True, seed=13)
    mshape = (4, 5, 1) if feature else (4, 5, 6)
    noise = F.dropout_mask(mshape, p, 13).to(x.dtype)
    alpha = 1.7580993408473766
    a = 1.0 / ((alpha * alpha * p + 1) * (1 - p)) ** 0.5
    b = noise.add(-1).mul_(alpha * a).add_(alpha * a * p)
    assert_bitwise_equal(y, x * noise.mul_(a) + b)


def test_alpha_dropout_keeps_mean_and_variance():
    """The point of alpha dropout: a standard-normal input keeps mean 0 and
    variance 1 (within 5 sigma of the sampling error at n = 2**20)."""
    n = 1 << 20
    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = F.alpha_dropout(x, 0.3, training=True, seed=5)
    assert abs(y.mean().item()) < 5 * (1.0 / n) ** 0.5
    assert abs(y.var().item() - 1.0) < 5 * (2.0 / n) ** 0.5 * 1.5


def test_alpha_dropout_eval_and_p1():
    x = torch.randn(8)
    assert dropout_ext.AlphaDropout(0.5).eval()(x) is x
    assert torch.equal(F.alpha_dropout(x, 1.0, training=True), x * 0)


@pytest.mark.parametrize("dims,mask_shape", [((0,), (1, 5, 6)), ((1,), (4, 1, 6)), ((1, 2), (4, 1, 1)), (-1, (4, 5, 1))])
def test_broadcast_dims_mask_is_dropout_mask_of_the_shared_shape(dims, mask_shape):
    x = torch.randn(4, 5, 6)
    y = F.dropout(x, 0.5, seed=3, broadcast_dims=dims)
    assert F.shared_mask_shape(x.shape, dims) == mask_shape
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, 3, 0, 0.5, "identity", mask_shape))


def test_locked_dropout_and_drop_path():
    x = torch.randn(7, 3, 16)  # (time, batch, features)
    torch.manual_seed(0)
    y = dropout_ext.LockedDropout(0.5)(x)
    kept = (y != 0)
    assert torch.equal(kept, kept[:1].expand_as(kept))  # the same mask at every time step
    xb = torch.randn(3, 7, 16)
    yb = dropout_ext.LockedDropout(0.5, batch_first=True)(xb)
    assert torch.equal(yb != 0, (yb != 0)[:, :1].expand_as(yb))
    xs = torch.randn(64, 4, 5)
    ys = dropout_ext.DropPath(0.5)(xs)
    per_sample = (ys != 0).flatten(1)
    assert torch.all(per_sample.all(1) | ~per_sample.any(1))  # whole samples kept or dropped
    assert 0 < per_sample.all(1).sum() < 64


def test_broadcast_dims_errors():
    x = torch.randn(2, 3)
    for bad in ((2,), (-3,), ("a",), (True,)):
        with pytest.raises(ValueError, match="broadcast_dims"):
            F.dropout(x, 0.5, broadcast_dims=bad)


def test_channel_drop_rate_within_5_sigma():
    """One p: the channel mask is dropout_mask's at the channels' shape,
    whose rates test_statistics.py checks."""
    p, n_channels = 0.3, 1 << 16
    x = torch.ones(1, n_channels, 24)
    y = F.dropout1d(x, p, seed=17)
    dropped = int((y[0, :, 0] == 0).sum())
    sigma = (n_channels * p * (1 - p)) ** 0.5
    assert abs(dropped - n_channels * p) < 5 * sigma


def test_replace_dropout_covers_structured_and_alpha():
    model = nn.Sequential(nn.Dropout(0.1), nn.Dropout1d(0.2), nn.Dropout2d(0.3, inplace=True), nn.Dropout3d(0.4),
                          nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.6), nn.Linear(2, 2))
    model[3].eval()
    assert dropout_ext.replace_dropout(model) == 6
    kinds = [type(m) for m in model[:6]]
    assert kinds == [dropout_ext.Dropout, dropout_ext.Dropout1d, dropout_ext.Dropout2d, dropout_ext.Dropout3d,
                     dropout_ext.AlphaDropout, dropout_ext.FeatureAlphaDropout]
    assert [m.p for m in model[:6]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert model[2].inplace and not model[3].training and model[1].training


def test_structured_modules_compile_without_graph_breaks():
    model = nn.Sequential(dropout_ext.Dropout2d(0.3), dropout_ext.FeatureAlphaDropout(0.2), dropout_ext.DropPath(0.1))
    x = torch.randn(2, 4, 5, 6)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert_bitwise_equal(compiled(x), expected)
