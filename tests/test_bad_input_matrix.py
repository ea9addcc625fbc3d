"""The bad-input matrix: every public function and module, on every backend
present, against each kind of bad argument. Each gets an exception of the
expected type whose message names the argument, and leaves its inputs
unchanged (values and version counters)."""

import math

import pytest
import torch

import dropout_ext
from dropout_ext import functional as F

BACKENDS = dropout_ext.available_backends("cpu")

# name -> (call(x, p, backend, **kw), takes bias/residual/activation, takes inplace, min rank)
FUNCTIONS = {
    "dropout": (lambda x, p, b, **kw: F.dropout(x, p, backend=b, **kw), False, True, 1),
    "fused_dropout": (lambda x, p, b, **kw: F.fused_dropout(x, p, backend=b, **kw), True, False, 1),
    "dropout1d": (lambda x, p, b, **kw: F.dropout1d(x, p, backend=b, **kw), False, True, 3),
    "dropout2d": (lambda x, p, b, **kw: F.dropout2d(x, p, backend=b, **kw), False, True, 4),
    "dropout3d": (lambda x, p, b, **kw: F.dropout3d(x, p, backend=b, **kw), False, True, 5),
    "alpha_dropout": (lambda x, p, b, **kw: F.alpha_dropout(x, p, True, backend=b, **kw), False, True, 1),
    "feature_alpha_dropout": (lambda x, p, b, **kw: F.feature_alpha_dropout(x, p, True, backend=b, **kw),
                              False, True, 3),
}
MODULES = {
    "Dropout": dropout_ext.Dropout, "Dropout1d": dropout_ext.Dropout1d, "Dropout2d": dropout_ext.Dropout2d,
    "Dropout3d": dropout_ext.Dropout3d, "AlphaDropout": dropout_ext.AlphaDropout,
    "FeatureAlphaDropout": dropout_ext.FeatureAlphaDropout, "FusedDropout": dropout_ext.FusedDropout,
    "LockedDropout": dropout_ext.LockedDropout, "DropPath": dropout_ext.DropPath,
}
MODULE_RANK = {"Dropout1d": 3, "Dropout2d": 4, "Dropout3d": 5, "FeatureAlphaDropout": 3}


def _x(rank, dtype=torch.float32, requires_grad=False):
    return torch.randn((3, 4, 5, 2, 3)[:rank], dtype=dtype).requires_grad_(requires_grad)


class Snapshot:
    def __init__(self, *tensors):
        self.items = [(t, t.detach().clone(), t._version) for t in tensors if isinstance(t, torch.Tensor)]

    def check(self):
        for t, copy, version in self.items:
            assert t._version == version, "an input's version counter moved"
            assert torch.equal(t.detach(), copy), "an input's values changed"


def _expect(exc_type, words, fn, *inputs):
    snap = Snapshot(*inputs)
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert any(w in message for w in words), f"{message!r} names none of {words}"
    snap.check()


P_CASES = [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError), ("0.5", TypeError), (None, TypeError),
           (torch.tensor(0.5), TypeError)]
P_WORDS = ("dropout probability", "p must")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("p,exc", P_CASES, ids=lambda v: repr(v)[:12])
def test_functions_bad_p(name, backend, p, exc):
    call, _, _, rank = FUNCTIONS[name]
    x = _x(rank)
    _expect(exc, P_WORDS, lambda: call(x, p, backend), x)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("p,exc", P_CASES, ids=lambda v: repr(v)[:12])
def test_modules_bad_p(name, p, exc):
    _expect(exc, P_WORDS, lambda: MODULES[name](p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_functions_bad_input_dtype(name, backend, dtype):
    call, _, _, rank = FUNCTIONS[name]
    x = torch.zeros((3, 4, 5, 2, 3)[:rank], dtype=dtype)
    _expect(TypeError, ("input must be",), lambda: call(x, 0.5, backend), x)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_modules_bad_input_dtype(name, dtype):
    x = torch.zeros((3, 4, 5, 2, 3)[:MODULE_RANK.get(name, 2)], dtype=dtype)
    module = MODULES[name](0.5)
    _expect(TypeError, ("input must be",), lambda: module(x), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "7"])
def test_functions_bad_seed(name, backend, seed):
    call, _, _, rank = FUNCTIONS[name]
    x = _x(rank)
    exc = ValueError if isinstance(seed, int) else TypeError
    _expect(exc, ("seed",), lambda: call(x, 0.5, backend, seed=seed), x)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functions_unknown_backend(name):
    call, _, _, rank = FUNCTIONS[name]
    x = _x(rank)
    _expect(ValueError, ("backend",), lambda: call(x, 0.5, "tpu"), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [n for n, v in FUNCTIONS.items() if v[2]])
@pytest.mark.parametrize("where", ["leaf", "view of a leaf"])
def test_inplace_on_leaf_requiring_grad_matches_nn(name, backend, where):
    """The same error as nn.Dropout's inplace path, and the input untouched."""
    call, _, _, rank = FUNCTIONS[name]
    theirs = {"dropout": torch.nn.functional.dropout, "dropout1d": torch.nn.functional.dropout1d,
              "dropout2d": torch.nn.functional.dropout2d, "dropout3d": torch.nn.functional.dropout3d,
              "alpha_dropout": lambda t, p, inplace: torch.nn.functional.alpha_dropout(t, p, True, inplace),
              "feature_alpha_dropout":
                  lambda t, p, inplace: torch.nn.functional.feature_alpha_dropout(t, p, True, inplace)}[name]
    leaf = _x(rank, requires_grad=True)
    target = leaf if where == "leaf" else leaf[:2]
    with pytest.raises(RuntimeError) as nn_err:
        theirs(target, 0.5, inplace=True)
    _expect(RuntimeError, (str(nn_err.value).split(".")[0],), lambda: call(target, 0.5, backend, inplace=True), leaf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["bias size", "bias rank", "bias dtype", "bias device", "residual shape",
                                  "residual dtype", "residual device", "activation", "mask_shape"])
def test_fused_companions(backend, case):
    x = _x(2)
    bias, residual, activation, mask_shape = None, None, "identity", None
    exc, words = ValueError, (case.split()[0],)
    if case == "bias size":
        bias = torch.randn(3)
    elif case == "bias rank":
        bias = torch.randn(1, 4)
    elif case == "bias dtype":
        bias, exc = torch.randn(4, dtype=torch.float64), TypeError
    elif case == "bias device":
        bias = torch.randn(4, device="meta")
    elif case == "residual shape":
        residual = torch.randn(4, 3)
    elif case == "residual dtype":
        residual, exc = torch.randn(3, 4, dtype=torch.float16), TypeError
    elif case == "residual device":
        residual = torch.randn(3, 4, device="meta")
    elif case == "activation":
        activation = "tanh"
    else:
        mask_shape = (3, 2)
    _expect(exc, words, lambda: F.fused_dropout(x, 0.5, bias=bias, residual=residual, activation=activation,
                                                mask_shape=mask_shape, backend=backend), x)
    module = dropout_ext.FusedDropout(0.5)
    if case.startswith(("bias", "residual")):
        _expect(exc, words, lambda: module(x, bias, residual), x)


def test_fused_module_unknown_activation():
    _expect(ValueError, ("activation",), lambda: dropout_ext.FusedDropout(0.5, activation="swish"))


@pytest.mark.parametrize("bad", [lambda x: x.tolist(), lambda x: None, lambda x: x.numpy()])
def test_not_a_tensor(bad):
    x = torch.randn(4)
    for fn in (lambda v: F.dropout(v, 0.5), lambda v: F.fused_dropout(v, 0.5), lambda v: dropout_ext.Dropout(0.5)(v)):
        _expect(TypeError, ("input must be",), lambda: fn(bad(x)))


def test_generator_errors():
    x = torch.randn(4)
    _expect(TypeError, ("generator",), lambda: F.dropout(x, 0.5, generator="g"), x)
    _expect(ValueError, ("seed=", "generator"), lambda: F.dropout(x, 0.5, seed=1, generator=torch.Generator()), x)
    _expect(ValueError, ("offset",), lambda: F.dropout(x, 0.5, offset=3), x)
