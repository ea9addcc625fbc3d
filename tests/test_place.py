"""``place=`` on plain local tensors, in one process: every public function
and module given a shard's place returns the block of the call on the
global tensor (values and the input's gradient, bit for bit), from a
``Place``, a ``Split`` or a tuple of Splits alike; bad places are refused by
name and change nothing. (The ops' map is test_conformance's ``place``
section; DTensor inputs on process meshes are test_sharding.py's.)"""

import pytest
import torch

import dropout_ext
from dropout_ext import Place, Split
from dropout_ext import functional as F
from conftest import assert_bitwise_equal

P = 0.4

# name: (global shape, call(x, residual, place) with the generator seeded alike)
CALLS = {
    "dropout": ((6, 4, 10), lambda x, r, at: F.dropout(x, P, place=at)),
    "dropout_shared": ((6, 4, 10), lambda x, r, at: F.dropout(x, P, broadcast_dims=(0,), place=at)),
    "fused_dropout": ((6, 4, 10), lambda x, r, at: F.fused_dropout(
        x, P, bias=torch.linspace(-1, 1, x.shape[-1]), activation="silu", residual=r, place=at)),
    "dropout1d": ((6, 4, 10), lambda x, r, at: F.dropout1d(x, P, place=at)),
    "dropout1d_unbatched": ((4, 10), lambda x, r, at: F.dropout1d(x, P, place=at)),
    "dropout2d": ((6, 4, 2, 10), lambda x, r, at: F.dropout2d(x, P, place=at)),
    "dropout3d": ((6, 4, 2, 1, 10), lambda x, r, at: F.dropout3d(x, P, place=at)),
    "alpha_dropout": ((6, 4, 10), lambda x, r, at: F.alpha_dropout(x, P, True, place=at)),
    "feature_alpha_dropout": ((6, 4, 2, 10), lambda x, r, at: F.feature_alpha_dropout(x, P, True, place=at)),
    "dropout_add_norm": ((6, 4, 10), lambda x, r, at: F.dropout_add_norm(x, r, None, None, P, place=at)),
}

MODULES = {
    "Dropout": ((6, 4, 10), lambda: dropout_ext.Dropout(P)),
    "Dropout2d": ((6, 4, 2, 10), lambda: dropout_ext.Dropout2d(P)),
    "FeatureAlphaDropout": ((6, 4, 2, 10), lambda: dropout_ext.FeatureAlphaDropout(P)),
    "LockedDropout": ((6, 4, 10), lambda: dropout_ext.LockedDropout(P)),
    "DropPath": ((6, 4, 10), lambda: dropout_ext.DropPath(P)),
    "FusedDropout": ((6, 4, 10), lambda: dropout_ext.FusedDropout(P, "gelu")),
    "DropoutAddRMSNorm": ((6, 4, 10), lambda: dropout_ext.DropoutAddRMSNorm(10, P)),
}


def _shard(shape, split_last):
    """(place as a Place, as Splits, the block's slices): the second half of
    dimension 0, and of the last dimension too unless a norm needs it whole."""
    n = len(shape)
    start = [shape[0] // 2] + [0] * (n - 1)
    local = [shape[0] - shape[0] // 2] + list(shape[1:])
    splits = [Split(0, 1, 2)]
    if split_last:
        start[-1], local[-1] = shape[-1] // 2, shape[-1] - shape[-1] // 2
        splits.append(Split(-1, 1, 2))
    block = tuple(slice(s, s + k) for s, k in zip(start, local))
    return Place(shape, start), tuple(splits), block


def _run(call, x, r, at):
    x = x.detach().requires_grad_()
    torch.manual_seed(7)
    out = call(x, r, at)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


@pytest.mark.parametrize("name", list(CALLS))
def test_functions_at_a_place(name):
    shape, call = CALLS[name]
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # (a split bias is the ops' case, test_conformance's and test_sharding's)
    place, splits, block = _shard(shape, name not in ("dropout_add_norm", "fused_dropout"))
    y, dx = _run(call, x, r, None)
    for at in (place, splits):
        yl, dxl = _run(call, x[block].contiguous(), r[block].contiguous(), at)
        assert_bitwise_equal(yl, y[block])
        assert_bitwise_equal(dxl, dx[block])
    # the place decides: the same shard without it draws another mask
    assert not torch.equal(_run(call, x[block].contiguous(), r[block].contiguous(), None)[0], y[block])


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_at_their_place(name):
    shape, make = MODULES[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    norm = name == "DropoutAddRMSNorm"
    place, splits, block = _shard(shape, not norm)
    whole, part = make(), make()
    if norm:
        call = lambda m: lambda t, r, at: m(t, r)  # noqa: E731
    elif name == "FusedDropout":
        call = lambda m: lambda t, r, at: m(t, residual=r)  # noqa: E731
    else:
        call = lambda m: lambda t, r, at: m(t)  # noqa: E731
    y, dx = _run(call(whole), x, x, None)
    part.place = splits
    yl, dxl = _run(call(part), x[block].contiguous(), x[block].contiguous(), None)
    assert_bitwise_equal(yl, y[block])
    assert_bitwise_equal(dxl, dx[block])


def test_data_parallel_sets_every_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.2), dropout_ext.DropPath(0.1),
                                torch.nn.Dropout2d(0.3))
    assert dropout_ext.data_parallel(model, rank=1, world_size=3) is model
    places = [m.place for m in model if not isinstance(m, torch.nn.Linear)]
    assert places == [Split(0, 1, 3)] * 3
    assert all(type(m).__module__ == "dropout_ext.modules" for m in list(model)[1:])
    with pytest.raises(ValueError, match="rank and world_size"):
        dropout_ext.data_parallel(torch.nn.Sequential(torch.nn.Dropout()))  # no process group here


@pytest.mark.parametrize("place, error, words", [
    (3, TypeError, "place must be a dropout_ext.Place"),
    ([Split(0, 0, 2), 1], TypeError, "place must be"),
    (Place((8, 5), (0, 0)), ValueError, "place must be"),              # rank mismatch (x is 3-D)
    (Place((8, 5, 6), (5, 0, 0)), ValueError, "must lie inside"),
    ((Split(0, 0, 2), Split(0, 1, 2)), ValueError, "two Splits of dimension 0"),
    (Split(3, 0, 2), ValueError, "not a dimension"),
])
def test_bad_places_are_refused_by_name(place, error, words):
    x = torch.randn(4, 5, 6)
    before = x.clone()
    with pytest.raises(error, match=words):
        F.dropout(x, 0.5, inplace=True, place=place)
    assert torch.equal(x, before)


def test_split_and_norm_place_rules():
    with pytest.raises(ValueError, match="0 <= index < parts"):
        Split(0, 2, 2)
    with pytest.raises(TypeError, match="Split.dim must be an int"):
        Split(0.5, 0, 2)
    with pytest.raises(ValueError, match="whole"):
        F.dropout_add_norm(torch.randn(4, 6), p=0.5, place=Split(-1, 0, 2))
    m = dropout_ext.Dropout(0.5)
    with pytest.raises(TypeError, match="place must be"):
        m.place = "rows"
    assert m.place is None
