"""The bad-input matrix: every public function and module, and every op
family called directly, against each kind of bad argument. Each gets an
exception of the expected type whose message says what is wrong in the
library's one wording (dropout_ext/_validate.py, and csrc/op_common.h for the
C++ ops), and leaves its inputs unchanged (values and version counters).

The public functions check their arguments before they look up the backend
(dropout_ext/functional.py), so a bad argument meets the same check whatever
the backend: those cases run on one. The backends are an axis where they
are reached: an in-place call on a leaf (the kernel runs before the copy
fails), an unknown or unavailable backend, and the op families, which check
their own arguments."""

import math

import pytest
import torch

import dropout_ext
from dropout_ext import _backend, _ops, _state, _validate
from dropout_ext import functional as F
from conftest import Snapshot, requires_cuda

BACKENDS = dropout_ext.available_backends("cpu")
# The backend of the cases whose bad argument is refused before the backend
# is looked up.
CHECKED_FIRST = BACKENDS[0]

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
    "dropout_add_norm": (lambda x, p, b, **kw: F.dropout_add_norm(x, p=p, backend=b, **kw), False, False, 1),
}
MODULES = {
    "Dropout": dropout_ext.Dropout, "Dropout1d": dropout_ext.Dropout1d, "Dropout2d": dropout_ext.Dropout2d,
    "Dropout3d": dropout_ext.Dropout3d, "AlphaDropout": dropout_ext.AlphaDropout,
    "FeatureAlphaDropout": dropout_ext.FeatureAlphaDropout, "FusedDropout": dropout_ext.FusedDropout,
    "LockedDropout": dropout_ext.LockedDropout, "DropPath": dropout_ext.DropPath,
    # (the norms' first argument is the hidden size: the inputs' last dimension here)
    "DropoutAddLayerNorm": lambda p: dropout_ext.DropoutAddLayerNorm(4, p),
    "DropoutAddRMSNorm": lambda p: dropout_ext.DropoutAddRMSNorm(4, p),
}
MODULE_RANK = {"Dropout1d": 3, "Dropout2d": 4, "Dropout3d": 5, "FeatureAlphaDropout": 3}


def _x(rank, dtype=torch.float32, requires_grad=False):
    return torch.randn((3, 4, 5, 2, 3)[:rank], dtype=dtype).requires_grad_(requires_grad)


def _expect(exc_type, words, fn, *inputs):
    snap = Snapshot(*inputs)
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert any(w in message for w in words), f"{message!r} names none of {words}"
    snap.check()


P_CASES = [(-0.1, ValueError), (1.1, ValueError), (1.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
           ("0.5", TypeError), (None, TypeError), (torch.tensor(0.5), TypeError)]


def _p_words(p, exc):
    """nn.Dropout's wording for a number outside [0, 1] (the value included),
    ours for a p that is no number."""
    if exc is ValueError:
        return (f"dropout probability has to be between 0 and 1, but got {float(p)}",)
    return ("dropout probability p must be a real number",)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("p,exc", P_CASES, ids=lambda v: repr(v)[:12])
def test_functions_bad_p(name, p, exc):
    call, _, takes_inplace, rank = FUNCTIONS[name]
    x = _x(rank)
    _expect(exc, _p_words(p, exc), lambda: call(x, p, CHECKED_FIRST), x)
    if takes_inplace:
        _expect(exc, _p_words(p, exc), lambda: call(x, p, CHECKED_FIRST, inplace=True), x)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("p,exc", P_CASES, ids=lambda v: repr(v)[:12])
def test_modules_bad_p(name, p, exc):
    _expect(exc, _p_words(p, exc), lambda: MODULES[name](p))


@pytest.mark.parametrize("p,exc", P_CASES, ids=lambda v: repr(v)[:12])
def test_mask_bad_p(p, exc):
    _expect(exc, _p_words(p, exc), lambda: F.dropout_mask((3, 4), p, seed=1))


DTYPE_WORDS = "input must be float16, bfloat16, float32 or float64"


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_functions_bad_input_dtype(name, dtype):
    call, _, _, rank = FUNCTIONS[name]
    x = torch.zeros((3, 4, 5, 2, 3)[:rank], dtype=dtype)
    _expect(TypeError, (DTYPE_WORDS,), lambda: call(x, 0.5, CHECKED_FIRST), x)


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_modules_bad_input_dtype(name, dtype):
    x = torch.zeros((3, 4, 5, 2, 3)[:MODULE_RANK.get(name, 2)], dtype=dtype)
    module = MODULES[name](0.5)
    _expect(TypeError, (DTYPE_WORDS,), lambda: module(x), x)


SEED_CASES = [(dict(seed=2**64), ValueError, "seed must fit in 64 bits"),
              (dict(seed=-(2**63) - 1), ValueError, "seed must fit in 64 bits"),
              (dict(seed=1.5), TypeError, "seed must be an int"),
              (dict(seed="7"), TypeError, "seed must be an int"),
              (dict(seed=True), TypeError, "seed must be an int"),
              (dict(seed=1, offset=2**64), ValueError, "offset must fit in 64 bits"),
              (dict(seed=1, offset=0.5), TypeError, "offset must be an int")]


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("kw,exc,words", SEED_CASES, ids=lambda v: repr(v)[:24])
def test_functions_bad_seed(name, kw, exc, words):
    call, _, _, rank = FUNCTIONS[name]
    x = _x(rank)
    _expect(exc, (words,), lambda: call(x, 0.5, CHECKED_FIRST, **kw), x)


@pytest.mark.parametrize("kw,exc,words", SEED_CASES, ids=lambda v: repr(v)[:24])
def test_mask_bad_seed(kw, exc, words):
    _expect(exc, (words,), lambda: F.dropout_mask((3, 4), 0.5, **kw))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functions_unknown_backend(name):
    call, _, _, rank = FUNCTIONS[name]
    x = _x(rank)
    _expect(ValueError, ("backend must be one of",), lambda: call(x, 0.5, "tpu"), x)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("backend", [b for b in dropout_ext.BACKENDS if b not in BACKENDS])
def test_functions_unavailable_backend(name, backend):
    call, _, _, rank = FUNCTIONS[name]
    x = _x(rank)
    _expect(ValueError, (f"backend {backend!r} is not available",), lambda: call(x, 0.5, backend), x)


def test_unknown_default_backend(monkeypatch):
    # DROPOUT_EXT_BACKEND's value, or one assigned later
    monkeypatch.setattr(_backend, "DEFAULT_BACKEND", "nope")
    x = torch.randn(3)
    _expect(ValueError, ("backend must be one of",), lambda: F.dropout(x), x)


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


@pytest.mark.parametrize("case", ["bias size", "bias rank", "bias dtype", "bias device", "residual shape",
                                  "residual dtype", "residual device", "activation", "mask_shape"])
def test_fused_companions(case):
    x = _x(2)
    bias, residual, activation, mask_shape = None, None, "identity", None
    exc, words = ValueError, COMPANION_WORDS[case]
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
    _expect(exc, (words,), lambda: F.fused_dropout(x, 0.5, bias=bias, residual=residual, activation=activation,
                                                   mask_shape=mask_shape, backend=CHECKED_FIRST), x, bias, residual)
    module = dropout_ext.FusedDropout(0.5)
    if case.startswith(("bias", "residual")):
        _expect(exc, (words,), lambda: module(x, bias, residual), x, bias, residual)


COMPANION_WORDS = {
    "bias size": "bias must be 1-D with the size of input's last dimension (4), got shape (3,)",
    "bias rank": "bias must be 1-D with the size of input's last dimension (4), got shape (1, 4)",
    "bias dtype": "bias has dtype torch.float64, but input has torch.float32",
    "bias device": "bias is on meta, but input is on cpu",
    "residual shape": "residual must have input's shape (3, 4), got (4, 3)",
    "residual dtype": "residual has dtype torch.float16, but input has torch.float32",
    "residual device": "residual is on meta, but input is on cpu",
    "activation": "activation must be one of ('identity', 'relu', 'gelu', 'gelu_tanh', 'silu'), got 'tanh'",
    "mask_shape": "mask_shape must have input's rank with each size equal to input's (3, 4) or 1, got (3, 2)",
}


def test_fused_module_unknown_activation():
    _expect(ValueError, ("activation must be one of",), lambda: dropout_ext.FusedDropout(0.5, activation="swish"))


@pytest.mark.parametrize("bad", [lambda x: x.tolist(), lambda x: None, lambda x: x.numpy()])
def test_not_a_tensor(bad):
    x = torch.randn(4)
    for fn in (lambda v: F.dropout(v, 0.5), lambda v: F.fused_dropout(v, 0.5), lambda v: dropout_ext.Dropout(0.5)(v)):
        _expect(TypeError, ("input must be a torch.Tensor",), lambda: fn(bad(x)))


def test_replace_dropout_not_a_model():
    _expect(TypeError, ("model must be an nn.Module",), lambda: dropout_ext.replace_dropout("model"))


def test_generator_errors():
    x = torch.randn(4)
    _expect(TypeError, ("generator must be a torch.Generator",), lambda: F.dropout(x, 0.5, generator="g"), x)
    _expect(ValueError, ("pass either seed= or generator=, not both",),
            lambda: F.dropout(x, 0.5, seed=1, generator=torch.Generator()), x)
    _expect(ValueError, ("offset is only meaningful together with seed=",), lambda: F.dropout(x, 0.5, offset=3), x)


# --- the op families, called directly ----------------------------------------------

OP_FAMILIES = [
    pytest.param("", id="cpu"),
    pytest.param("reference_", id="reference"),
    pytest.param("cuda_host_", id="cuda_host", marks=pytest.mark.skipif(
        not _ops.HAS_CUDA_HOST_KERNELS,
        reason="the CUDA kernels executed on the host are not built here (_ops.HAS_CUDA_HOST_KERNELS is False)")),
]
STATE_WORDS = "state must be an int64 tensor [seed, offset, p bits]"
P_BITS_WORDS = "dropout probability has to be between 0 and 1"


def _state_with_p(p):
    return torch.tensor([1, 2, _state.p_bits(p)], dtype=torch.int64)


BAD_STATES = {
    "float": torch.zeros(3),
    "int32": torch.zeros(3, dtype=torch.int32),
    "[seed, offset]": torch.tensor([1, 2]),
    "4 words": torch.zeros(4, dtype=torch.int64),
    "3x1": torch.zeros(3, 1, dtype=torch.int64),
    "0-dim": torch.tensor(3),
}
BAD_P_STATES = {p: _state_with_p(p) for p in (-0.1, 1.5, math.nan, math.inf, -math.inf)}
GOOD_STATE = _state_with_p(0.5)


def _op_cases():
    """(name, exc, words, call(ops, x, bias, residual, grad)) for each kind of
    bad argument of each op."""
    good = GOOD_STATE
    cases = []
    for what, st in BAD_STATES.items():
        cases += [
            (f"forward state {what}", ValueError, STATE_WORDS,
             lambda o, x, b, r, g, st=st: o.forward(x, b, r, st, "gelu", [])[0]),
            (f"backward state {what}", ValueError, STATE_WORDS,
             lambda o, x, b, r, g, st=st: o.backward(g, x, b, st, "gelu", [], True)),
            (f"mask state {what}", ValueError, STATE_WORDS, lambda o, x, b, r, g, st=st: o.mask(st, [3, 4])),
        ]
    for p, st in BAD_P_STATES.items():
        cases += [
            (f"forward p bits {p}", ValueError, P_BITS_WORDS,
             lambda o, x, b, r, g, st=st: o.forward(x, b, r, st, "identity", [])[0]),
            (f"backward p bits {p}", ValueError, P_BITS_WORDS,
             lambda o, x, b, r, g, st=st: o.backward(g, x, b, st, "relu", [], False)),
            (f"mask p bits {p}", ValueError, P_BITS_WORDS, lambda o, x, b, r, g, st=st: o.mask(st, [3, 4])),
        ]
    for dtype in (torch.int64, torch.int32, torch.bool, torch.complex64):
        cases.append((f"forward input {dtype}", TypeError, DTYPE_WORDS,
                      lambda o, x, b, r, g, d=dtype: o.forward(torch.zeros(3, 4, dtype=d), None, None, good,
                                                               "identity", [])[0]))
    cases += [
        ("forward bias size", ValueError, "bias must be 1-D with the size of input's last dimension",
         lambda o, x, b, r, g: o.forward(x, b[:3], r, good, "identity", [])[0]),
        # (the C++ glue names dtypes and shapes in ATen's words, "Double", "[3, 4]": the prefix is common)
        ("forward bias dtype", TypeError, "bias has dtype",
         lambda o, x, b, r, g: o.forward(x, b.double(), r, good, "identity", [])[0]),
        ("forward residual shape", ValueError, "residual must have input's shape",
         lambda o, x, b, r, g: o.forward(x, b, r.t(), good, "identity", [])[0]),
        ("forward activation", ValueError, "activation must be one of",
         lambda o, x, b, r, g: o.forward(x, b, r, good, "tanh", [])[0]),
        ("forward mask_shape", ValueError, "mask_shape must have input's rank",
         lambda o, x, b, r, g: o.forward(x, b, r, good, "identity", [3, 2])[0]),
        ("backward grad int64", TypeError, "grad must be float16, bfloat16, float32 or float64",
         lambda o, x, b, r, g: o.backward(torch.zeros(3, 4, dtype=torch.int64), None, None, good, "identity", [],
                                          False)),
        ("backward without input", ValueError, "needs the saved input",
         lambda o, x, b, r, g: o.backward(g, None, b, good, "gelu", [], True)),
        ("backward activation", ValueError, "activation must be one of",
         lambda o, x, b, r, g: o.backward(g, x, b, good, "tanh", [], False)),
        ("backward bias size", ValueError, "bias must be 1-D with the size of input's last dimension",
         lambda o, x, b, r, g: o.backward(g, x, b[:3], good, "gelu", [], True)),
        ("mask negative shape", ValueError, "shape must be non-negative",
         lambda o, x, b, r, g: o.mask(good, [3, -1])),
    ]
    return cases


OP_CASES = _op_cases()


@pytest.mark.parametrize("prefix", OP_FAMILIES)
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_ops_bad_arguments(prefix, case):
    """Direct op calls, which bypass the public API's checks: the op refuses
    the bad argument itself (the C++ glue and the Python kernels alike)."""
    _, exc, words, call = case
    ops = _ops.op_set(prefix)
    x, r, g = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    b = torch.randn(4)
    states = [GOOD_STATE, *BAD_STATES.values(), *BAD_P_STATES.values()]
    _expect(exc, (words,), lambda: call(ops, x, b, r, g), x, b, r, g, *states)


def test_state_on_another_device():
    """The rule, checked by every Python kernel (the C++ glue words it the
    same); a direct op call can only mix devices with a GPU: below."""
    state = _state_with_p(0.5).to("meta")
    _expect(ValueError, ("state is on meta, but input is on cpu",), lambda: _validate.check_state(state, "cpu"))


@requires_cuda
@pytest.mark.parametrize("prefix", ["", "reference_", "triton_"])
def test_ops_state_on_another_device(prefix):
    if prefix == "" and not _ops.HAS_CUDA_KERNELS:
        pytest.skip("the extension has no CUDA kernels here")
    ops = _ops.op_set(prefix)
    x = torch.randn(3, 4, device="cuda")
    st = _state_with_p(0.5)  # on the host: the kernels read the state from device memory
    _expect(ValueError, ("state is on cpu, but input is on cuda",),
            lambda: ops.forward(x, None, None, st, "identity", [])[0], x)
    _expect(ValueError, ("state is on cpu, but input is on cuda",),
            lambda: ops.backward(x, x, None, st, "relu", [], False), x)
