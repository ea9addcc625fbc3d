"""dropout_add_norm on every backend: one suite, parametrised by backend as
the conformance suite is (tests/test_conformance.py: its rows, ids, skips,
the cpu_<isa> hook and the ``backend=`` routing are reused from there).

The kernels are held to a float64 composition (``F.layer_norm`` /
``F.rms_norm`` of ``residual + dropout(x)`` with the contract's mask), each
value within the bound of its error analysis (error_bounds.norm_bounds: the
statistics relative to their own scale, y and the gradients element by
element; the weight and bias gradients as sums, error_bounds.check_sum); h and
the mask to the contract bit for bit
(h equals the same backend's ``fused_dropout(x, residual)`` for the same
state, the mask ``dropout_mask``). Each backend is checked through its op
family directly and through ``functional.dropout_add_norm`` with its
``backend=`` name and autograd (csrc/autograd.cpp). Under TRITON_INTERPRET=1
only the Triton row runs (test_triton_interpreter.py runs it in a child);
the module, compile and fusion tests run once, on the default backend.
"""

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import dropout_ext
from dropout_ext import functional as F
from dropout_ext import reference as ref
from dropout_ext._validate import norm_dtypes
from conftest import Snapshot, assert_bitwise_equal, copies_made
from error_bounds import check_bounded, check_norm_param_grads, gamma, math_dtype, norm_bounds, unit_roundoff
from test_conformance import OFFSET, SEED, TRITON_MODE, cases, public
from test_conformance import _cpu_isa  # noqa: F401  (autouse: the cpu_<isa> rows' instruction set)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NORMS = ["layer", "rms"]
HIDDEN = [1, 7, 77, 1000, 4097]
EPS = 1e-5
P = 0.3


def _check_h(h, x, residual, keep, p):
    """h = residual + dropout(x): x * scale (the scale rounded to the math
    type, then the product: 2 roundings), + residual (1), stored in h's
    dtype; dropped elements are the residual exactly. The float64 h it is
    held to has 2 roundings of its own."""
    acc = math_dtype(x.dtype)
    d = torch.float64
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    xs = torch.where(keep, x.to(d) * scale, torch.zeros((), dtype=d, device=x.device))
    exact = xs if residual is None else xs + residual.to(d)
    g2 = gamma(2, acc) + gamma(2, d)
    bound = g2 * xs.abs()
    if residual is not None:
        bound = bound + (unit_roundoff(acc) + unit_roundoff(d)) * (exact.abs() + bound)
    check_bounded(h, exact, bound, acc, "h")


def _check_forward(y, mean, rstd, bounds, exp, stat_dtype):
    """y, mean and rstd against the composition's, within norm_bounds."""
    check_bounded(y, exp["y"], bounds["y"][1], stat_dtype, "y")
    check_bounded(mean, exp["mean"], bounds["mean"][1], stat_dtype, "mean")
    check_bounded(rstd, exp["rstd"], bounds["rstd"][1], stat_dtype, "rstd")


@functools.lru_cache(maxsize=32)
def _inputs(shape, dtype, device, rfp32=False, f32_params=False, seed=0):
    """(x, residual, weight, bias, grad_y, grad_h), seeded; residual and
    grad_h in h's dtype, weight and bias in x's dtype or float32. Cached:
    the tests only read them."""
    g = torch.Generator().manual_seed(seed)
    h_dtype = norm_dtypes(dtype, rfp32)[0]
    p_dtype = torch.float32 if f32_params else dtype
    H = shape[-1]
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    residual = torch.randn(shape, generator=g).to(h_dtype)
    weight = (1 + 0.5 * torch.randn(H, generator=g)).to(p_dtype)
    bias = (0.5 * torch.randn(H, generator=g)).to(p_dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    gh = torch.randn(shape, generator=g).to(h_dtype)
    return tuple(t.to(device) for t in (x, residual, weight, bias, gy, gh))


@functools.lru_cache(maxsize=16)
def _keep(shape, p, device):
    """The contract's keep mask for (SEED, OFFSET), from the reference."""
    return ref.dropout_mask(shape, p, SEED, OFFSET, device=device)


def _composition(x, residual, weight, bias, h, keep, p, norm, eps, gy, gh):
    """The float64 composition: h of ``residual + dropout(x)``; y, mean,
    rstd and the gradients from the norm of h as stored (the contract's
    statistics are of the stored h); grad_h joins h's gradient."""
    d = torch.float64
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    h64 = torch.where(keep, x.to(d) * scale, torch.zeros((), dtype=d, device=x.device))
    if residual is not None:
        h64 = h64 + residual.to(d)
    hs = h.detach().to(d).requires_grad_()
    params = {k: v.detach().to(d).requires_grad_() for k, v in (("weight", weight), ("bias", bias)) if v is not None}
    H = x.shape[-1]
    if norm == "layer":
        y = tF.layer_norm(hs, (H,), params.get("weight"), params.get("bias"), eps)
        mean = hs.detach().mean(-1)
        var = hs.detach().var(-1, unbiased=False)
    else:
        y = tF.rms_norm(hs, (H,), params.get("weight"), eps)
        if "bias" in params:
            y = y + params["bias"]
        mean = hs.new_empty((0,))
        var = hs.detach().pow(2).mean(-1)
    out = {"h": h64, "y": y.detach(), "mean": mean.reshape(-1), "rstd": (var + eps).rsqrt().reshape(-1)}
    loss = (y * gy.to(d)).sum()
    if gh is not None:
        loss = loss + (hs * gh.to(d)).sum()
    grads = torch.autograd.grad(loss, [hs, *params.values()])
    dh = grads[0]
    out["x"] = torch.where(keep, dh * scale, torch.zeros((), dtype=d, device=x.device))
    out["residual"] = dh
    out.update(zip(params, grads[1:]))
    return out


def _leaves(**tensors):
    return {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}


def _check(b, monkeypatch, shape, dtype, norm, res=True, weight=True, bias=True, f32_params=False, prenorm=False,
           rfp32=False, p=P, eps=EPS):
    """The op's y, h, mean and rstd against the float64 composition; the
    public API's outputs equal to the op's bit for bit and its gradients
    (through autograd, with h's gradient when prenorm) against the
    composition's; all within their error bounds."""
    x, r, w, bb, gy, gh = _inputs(shape, dtype, b.device, rfp32, f32_params)
    r, w, bb = (r if res else None), (w if weight else None), (bb if bias else None)
    h_dtype, stat_dtype = norm_dtypes(dtype, rfp32)
    rows = math.prod(shape[:-1])
    y, h, mean, rstd, _ = b.ops.norm(x, r, w, bb, b.state(p), norm, eps, rfp32)
    assert (y.dtype, h.dtype, mean.dtype, rstd.dtype) == (dtype, h_dtype, stat_dtype, stat_dtype)
    assert y.shape == h.shape == shape and rstd.shape == (rows,)
    assert mean.shape == ((rows,) if norm == "layer" else (0,))
    keep = _keep(shape, p, b.device)
    gh = gh if prenorm else None
    exp = _composition(x, r, w, bb, h, keep, p, norm, eps, gy, gh)
    bounds = norm_bounds(h, w, bb, gy, gh, norm, eps, stat_dtype, keep, p)
    _check_h(h, x, r, keep, p)
    _check_forward(y, mean, rstd, bounds, exp, stat_dtype)

    leaves = _leaves(x=x, residual=r, weight=w, bias=bb)
    out = F.dropout_add_norm(leaves["x"], leaves.get("residual"), leaves.get("weight"), leaves.get("bias"), p, eps,
                             norm=norm, prenorm=prenorm, residual_in_fp32=rfp32, seed=SEED, offset=OFFSET,
                             backend=public(b, monkeypatch, dtype))
    y2, h2 = out if prenorm else (out, None)
    assert_bitwise_equal(y2, y)
    outputs, grads = [y2], [gy]
    if prenorm:
        assert_bitwise_equal(h2, h)
        outputs, grads = [y2, h2], [gy, gh]
    got = dict(zip(leaves, torch.autograd.grad(outputs, list(leaves.values()), grads)))
    for name, g in got.items():
        assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, name
    check_bounded(got["x"], exp["x"], bounds["dx"][1], stat_dtype, "grad of x")
    if "residual" in got:
        check_bounded(got["residual"], exp["residual"], bounds["dh"][1], stat_dtype, "grad of residual")
    check_norm_param_grads(got.get("weight"), got.get("bias"), gy, h, mean, rstd, norm)


# --- against the float64 composition --------------------------------------------

@pytest.mark.parametrize(*cases(dtype=DTYPES, norm=NORMS, hidden=HIDDEN))
def test_hidden_sizes(b, dtype, norm, hidden, monkeypatch):
    """Every output and gradient, pre-norm (h's gradient joins), at odd and
    vector-unfriendly hidden sizes; H = 1 is a zero-variance row for
    LayerNorm."""
    shape = (2, 3, hidden) if hidden < 1000 else (3, hidden)
    _check(b, monkeypatch, shape, dtype, norm, prenorm=True)


# (norm, companions): every optional argument present and absent, pre-norm,
# float32 parameters (for float16/bfloat16 x), residual_in_fp32 (h and the
# residual in float32 for float16/bfloat16 x; the flag means nothing for
# float32 and float64).
VARIANTS = {
    "layer-affine": ("layer", dict()),
    "rms-affine": ("rms", dict()),
    "layer-bare": ("layer", dict(res=False, weight=False, bias=False)),
    "rms-bare-prenorm": ("rms", dict(res=False, weight=False, bias=False, prenorm=True)),
    "layer-weight-only": ("layer", dict(bias=False)),
    "rms-bias-only": ("rms", dict(res=False, weight=False)),
    "layer-f32-params": ("layer", dict(f32_params=True, prenorm=True)),
    "rms-f32-params": ("rms", dict(f32_params=True, bias=False)),
    "layer-residual-fp32": ("layer", dict(rfp32=True, prenorm=True)),
    "rms-residual-fp32-f32-params": ("rms", dict(rfp32=True, f32_params=True, prenorm=True)),
}


@pytest.mark.parametrize(*cases(dtype=DTYPES, variant=list(VARIANTS),
                                small=dict(dtype=[torch.float32, torch.bfloat16])))
def test_variants(b, dtype, variant, monkeypatch):
    norm, kw = VARIANTS[variant]
    _check(b, monkeypatch, (5, 77), dtype, norm, **kw)


@pytest.mark.parametrize(*cases(dtype=[torch.float32, torch.bfloat16], norm=NORMS,
                                small=dict(dtype=[torch.bfloat16], norm=["layer"])))
def test_huge_row(b, dtype, norm, monkeypatch):
    """A row of 65536 elements (past any row kept in registers or one
    block's shared memory: the two-pass path). The slow rows take the layer
    norm alone: its passes hold the RMS norm's (one sum each) and more."""
    _check(b, monkeypatch, (2, 65536), dtype, norm, prenorm=True)


@pytest.mark.parametrize(*cases(dtype=DTYPES, p=[0.0, 0.5, 1.0], rfp32=[False, True],
                                small=dict(p=[0.5])))
def test_h_is_fused_dropout_and_the_mask_is_dropout_mask(b, dtype, p, rfp32):
    """With the same state, h is the same backend's fused_dropout(x,
    residual) bit for bit (with residual_in_fp32, of x in float32, exact);
    on x = 1 without a residual, h != 0 is dropout_mask."""
    shape = (5, 77)
    x, r, w, bb, _, _ = _inputs(shape, dtype, b.device, rfp32)
    state = b.state(p)
    h = b.ops.norm(x, r, w, bb, state, "layer", EPS, rfp32)[1]
    xh = x.to(h.dtype)
    assert_bitwise_equal(h, b.ops.forward(xh, None, r, state, "identity", [])[0])
    ones = torch.ones(shape, dtype=dtype, device=b.device)
    h1 = b.ops.norm(ones, None, None, None, state, "rms", EPS, rfp32)[1]
    assert torch.equal(h1 != 0, F.dropout_mask(shape, p, SEED, OFFSET, device=b.device))
    assert torch.equal(h1 != 0, ref.dropout_mask(shape, p, SEED, OFFSET, device=b.device))


def _check_y(y, h, w, bb, norm, expected, eps=EPS):
    """y = norm(h) * w + bb against ``expected`` (float64), within its bound."""
    stat = math_dtype(y.dtype)
    bounds = norm_bounds(h, w, bb, torch.zeros_like(h), None, norm, eps, stat)
    check_bounded(y, expected, bounds["y"][1], stat, "y")


@pytest.mark.parametrize(*cases(dtype=DTYPES))
def test_zero_variance_rows(b, dtype, monkeypatch):
    """Constant rows (h = residual where x is 0): LayerNorm's mean is the
    constant and its variance 0 exactly, not negative or inflated by
    cancellation (the sum of H equal values and its division by H are exact
    here, then each deviation is 0), so rstd is 1 / sqrt(eps) with eps in the
    statistics' dtype, correctly rounded twice, and y = bias, bit for bit;
    RMSNorm's statistics within their bounds."""
    H = 77
    consts = torch.tensor([0.0, 3.5, -1000.0, 0.125], dtype=torch.float64)
    x = torch.zeros(4, H, dtype=dtype, device=b.device)
    r = consts[:, None].expand(4, H).to(dtype).to(b.device)
    _, _, w, bb, gy, _ = _inputs((4, H), dtype, b.device)
    state = b.state(0.5)
    y, h, mean, rstd, _ = b.ops.norm(x, r, w, bb, state, "layer", EPS, False)
    stat = norm_dtypes(dtype, False)[1]
    assert_bitwise_equal(mean, consts.to(stat).to(b.device))
    one = torch.ones(4, dtype=stat, device=b.device)
    assert_bitwise_equal(rstd, one / torch.full_like(one, EPS).sqrt())
    assert_bitwise_equal(y, bb.expand(4, H))
    keep = torch.ones(4, H, dtype=torch.bool, device=b.device)
    y, h, mean, rstd, _ = b.ops.norm(x, r, w, bb, state, "rms", EPS, False)
    exp = _composition(x, r, w, bb, h, keep, 0.0, "rms", EPS, gy, None)
    _check_forward(y, mean, rstd, norm_bounds(h, w, bb, gy, None, "rms", EPS, stat), exp, stat)
    # and through autograd: finite gradients
    leaves = _leaves(x=x, residual=r, weight=w, bias=bb)
    out = F.dropout_add_norm(*leaves.values(), 0.5, EPS, seed=SEED, offset=OFFSET,
                             backend=public(b, monkeypatch, dtype))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out, list(leaves.values()), gy))


@pytest.mark.parametrize(*cases(dtype=[torch.float32, torch.bfloat16]))
def test_rows_with_huge_means(b, dtype):
    """Rows whose mean squared overflows float32 (|mean| near 1e20): the
    statistics stay finite; a constant row's mean is exact and its variance
    0 (rstd 1 / sqrt(eps), y 0), a spread one's statistics and y are those
    of the float64 computation within their bounds (the spread is 1/130 of
    the mean: a one-pass variance, E[h^2] - mean^2, would be off by far
    more)."""
    H = 8
    rows = torch.stack([torch.full((H,), 1e20, dtype=torch.float64),
                        3e19 + torch.arange(H, dtype=torch.float64) * 1e17])
    x = rows.to(dtype).to(b.device)
    y, h, mean, rstd, _ = b.ops.norm(x, None, None, None, None, "layer", EPS, False)
    assert_bitwise_equal(h, x)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    eps = torch.tensor(EPS, dtype=torch.float32)
    assert mean[0].item() == x[0, 0].item() and rstd[0].item() == (1 / eps.sqrt()).item()
    assert bool((y[0] == 0).all())
    exp = norm_bounds(h[1:], None, None, torch.zeros_like(h[1:]), None, "layer", EPS, torch.float32)
    _check_forward(y[1:], mean[1:], rstd[1:], exp, {k: v[0] for k, v in exp.items()}, torch.float32)


@pytest.mark.parametrize(*cases(dtype=DTYPES, norm=NORMS, small=dict(dtype=[torch.float32, torch.bfloat16])))
def test_eval_is_the_plain_norm(b, dtype, norm, monkeypatch):
    """training=False, or p = 0: no dropout, no state; h is residual + x
    (the input itself without a residual) and y the plain norm of it."""
    shape = (5, 77)
    x, r, w, bb, gy, _ = _inputs(shape, dtype, b.device)
    name = public(b, monkeypatch, dtype)
    y, h = F.dropout_add_norm(x, r, w, bb, 0.5, norm=norm, prenorm=True, training=False, backend=name)
    assert_bitwise_equal(h, x + r)
    keep = torch.ones(shape, dtype=torch.bool, device=b.device)
    _check_y(y, h, w, bb, norm, _composition(x, r, w, bb, h, keep, 0.0, norm, EPS, gy, None)["y"])
    y0, h0 = F.dropout_add_norm(x, r, w, bb, 0.0, norm=norm, prenorm=True, backend=name)
    assert_bitwise_equal(y0, y)
    assert_bitwise_equal(h0, h)
    y, h, _, _, _ = b.ops.norm(x, None, None, None, None, norm, EPS, False)
    assert_bitwise_equal(h, x)
    plain = tF.layer_norm if norm == "layer" else tF.rms_norm
    _check_y(y, x, None, None, norm, plain(x.double(), (77,), eps=EPS))


if not TRITON_MODE:  # no float64 Triton kernel
    @pytest.mark.parametrize(*cases(norm=NORMS, prenorm=[False, True]))
    def test_gradcheck_float64(b, norm, prenorm, monkeypatch):
        name = public(b, monkeypatch, torch.float64)
        x, r, w, bb, _, _ = _inputs((3, 7), torch.float64, b.device)

        def fn(*args):
            return F.dropout_add_norm(*args, p=P, norm=norm, prenorm=prenorm, seed=SEED, offset=OFFSET,
                                      backend=name)

        assert torch.autograd.gradcheck(fn, tuple(_leaves(x=x, r=r, w=w, b=bb).values()))
        assert torch.autograd.gradcheck(fn, tuple(_leaves(x=x).values()))


# --- layouts and edge shapes --------------------------------------------------------

@pytest.mark.parametrize(*cases(norm=NORMS, layout=["transposed", "row_chunk"]))
def test_non_contiguous(b, norm, layout, monkeypatch):
    """Transposed x, residual and grads, or chunks of a wider last dimension
    (whose rows the GPU kernels read in place, without a copy), and a
    strided weight and bias: the same outputs and gradients, bit for bit, as
    their contiguous copies."""
    rows, H = 6, 77 if layout == "transposed" else 64
    g = torch.Generator().manual_seed(3)
    if layout == "transposed":
        x, r, gy, gh = (torch.randn(H, rows, generator=g).to(b.device).t() for _ in range(4))
    else:
        x, r, gy, gh = (torch.randn(rows, 3 * H, generator=g).to(b.device).chunk(3, -1)[1] for _ in range(4))
    w, bb = (torch.randn(2 * H, generator=g).to(b.device)[::2] for _ in range(2))
    assert not x.is_contiguous() and not w.is_contiguous()
    state = b.state(P)
    strided, copies = copies_made(lambda: b.ops.norm(x, r, w, bb, state, norm, EPS, False))
    xc, rc, wc, bc = (t.contiguous() for t in (x, r, w, bb))
    dense, dense_copies = copies_made(lambda: b.ops.norm(xc, rc, wc, bc, state, norm, EPS, False))
    for a, e in zip(strided, dense):
        assert_bitwise_equal(a, e)
    if b.public in ("cuda", "triton"):
        # the weight and bias copied, and x and the residual but where their rows lie apart
        assert copies - dense_copies == (2 if layout == "row_chunk" else 4)
    name = public(b, monkeypatch)

    def grads(*tensors):
        leaves = _leaves(x=tensors[0], residual=tensors[1], weight=tensors[2], bias=tensors[3])
        y, h = F.dropout_add_norm(*leaves.values(), P, norm=norm, prenorm=True, seed=SEED, offset=OFFSET,
                                  backend=name)
        return torch.autograd.grad([y, h], list(leaves.values()), [tensors[4], tensors[5]])

    for a, e in zip(grads(x, r, w, bb, gy, gh), grads(*(t.contiguous() for t in (x, r, w, bb, gy, gh)))):
        assert_bitwise_equal(a, e)
    # a grad of stride 0 (the backward of a sum)
    leaves = _leaves(x=x)
    F.dropout_add_norm(leaves["x"], p=P, norm=norm, seed=SEED, offset=OFFSET, backend=name).sum().backward()
    dense_x = _leaves(x=x.contiguous())["x"]
    y = F.dropout_add_norm(dense_x, p=P, norm=norm, seed=SEED, offset=OFFSET, backend=name)
    y.backward(torch.ones_like(y))
    assert_bitwise_equal(leaves["x"].grad, dense_x.grad)


@pytest.mark.parametrize(*cases())
def test_empty(b, monkeypatch):
    """No rows, or rows of no elements: outputs of the right shapes and
    dtypes, zero parameter gradients for no rows."""
    name = public(b, monkeypatch)
    for shape in [(0, 8), (2, 0, 8), (3, 0)]:
        H = shape[-1]
        rows = math.prod(shape[:-1])
        x, r = torch.randn(shape, device=b.device), torch.randn(shape, device=b.device)
        w, bb = torch.randn(H, device=b.device), torch.randn(H, device=b.device)
        for norm in NORMS:
            y, h, mean, rstd, _ = b.ops.norm(x, r, w, bb, b.state(0.5), norm, EPS, False)
            assert y.shape == h.shape == shape and rstd.shape == (rows,)
            assert mean.shape == ((rows,) if norm == "layer" else (0,))
            if rows:
                continue
            leaves = _leaves(x=x, residual=r, weight=w, bias=bb)
            y, h = F.dropout_add_norm(*leaves.values(), 0.5, norm=norm, prenorm=True, backend=name)
            gx, gr, gw, gb = torch.autograd.grad([y, h], list(leaves.values()),
                                                 [torch.ones_like(y), torch.ones_like(h)])
            assert gx.shape == gr.shape == shape
            assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(bb))


# --- autograd plumbing ----------------------------------------------------------------

NEEDS = ["x", "residual", "weight", "bias", "x+weight", "residual+bias"]


@pytest.mark.parametrize(*cases(needs=NEEDS, grads=["y", "h", "y+h"], small=dict(grads=["y+h"])))
def test_op_autograd_subsets(b, needs, grads):
    """Each subset of inputs requiring grad, with y's gradient, h's, or both:
    the gradients the backward op gives with that output mask, and none
    asked for the others."""
    shape = (4, 33)
    x, r, w, bb, gy, gh = _inputs(shape, torch.float32, b.device)
    wanted = needs.split("+")
    inputs = {k: v.detach().clone().requires_grad_(k in wanted)
              for k, v in (("x", x), ("residual", r), ("weight", w), ("bias", bb))}
    state = b.state(P)
    y, h, mean, rstd, _ = b.ops.norm(*inputs.values(), state, "layer", EPS, False)
    assert y.requires_grad and h.requires_grad and not mean.requires_grad and not rstd.requires_grad
    outs = {"y": (y, gy), "h": (h, gh)}
    used = [outs[k] for k in grads.split("+")]
    got = torch.autograd.grad([o for o, _ in used], [inputs[k] for k in wanted], [g for _, g in used])
    g_y = gy if "y" in grads else torch.zeros_like(gy)
    g_h = gh if "h" in grads else None
    mask = [k in wanted for k in inputs]
    expected = b.ops.norm_backward(g_y, g_h, h.detach(), w, mean, rstd, state, "layer", mask)
    expected = dict(zip(inputs, expected))
    for k, g in zip(wanted, got):
        assert_bitwise_equal(g, expected[k])
    for k, e in expected.items():
        if k not in wanted:
            assert e.shape == (0,), k


@pytest.mark.parametrize(*cases(use_reentrant=[False, True]))
def test_checkpoint_same_grads(b, use_reentrant, monkeypatch):
    """Activation checkpointing recomputes the forward with the restored RNG
    state: the same masks, so the same gradients, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    name = public(b, monkeypatch)
    lin = nn.Linear(16, 16).to(b.device)
    x, r, w, bb, gy, gh = _inputs((8, 16), torch.float32, b.device)

    def block(x, r, w, bb):
        return F.dropout_add_norm(lin(x), r, w, bb, 0.5, prenorm=True, backend=name)

    def run(ckpt):
        leaves = _leaves(x=x, residual=r, weight=w, bias=bb)
        lin.weight.grad = None
        torch.manual_seed(3)
        if b.device == "cuda":
            torch.cuda.manual_seed(3)
        y, h = checkpoint(block, *leaves.values(), use_reentrant=use_reentrant) if ckpt else block(*leaves.values())
        ((y * gy).sum() + (h * gh).sum()).backward()  # the reentrant checkpoint takes no autograd.grad
        return [t.grad for t in leaves.values()] + [lin.weight.grad]

    for a, e in zip(run(True), run(False)):
        assert_bitwise_equal(a, e)


@pytest.mark.parametrize(*cases())
def test_once_differentiable(b, monkeypatch):
    """Under create_graph=True the first-order gradients are the usual ones;
    differentiating them again raises, saying why."""
    x, r, w, bb, gy, _ = _inputs((3, 8), torch.float32, b.device)
    name = public(b, monkeypatch)

    def grads(create_graph):
        leaves = _leaves(x=x, weight=w)
        y = F.dropout_add_norm(leaves["x"], r, leaves["weight"], bb, P, seed=SEED, offset=OFFSET, backend=name)
        return leaves, torch.autograd.grad(y, list(leaves.values()), gy, create_graph=create_graph)

    leaves, got = grads(True)
    for a, e in zip(got, grads(False)[1]):
        assert_bitwise_equal(a.detach(), e)
    with pytest.raises(RuntimeError, match="dropout_add_norm has no double backward"):
        torch.autograd.grad(got[0].sum(), list(leaves.values()))


# opcheck's tests; under Triton's interpreter only the schema and the
# autograd registration (it runs kernels on real data; the fake and compile
# checks of the Triton ops run on a GPU).
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize(*cases(norm=NORMS))
def test_opcheck(b, norm):
    kw = {"test_utils": OPCHECKS[:2] if b.id == "triton" else OPCHECKS}
    x, r, w, bb, gy, gh = _inputs((3, 8), torch.float32, b.device)
    state = b.state(0.5)
    fwd, bwd = b.ops.norm, b.ops.norm_backward
    torch.library.opcheck(fwd, (x, r, w, bb, state, norm, EPS, False), **kw)
    torch.library.opcheck(fwd, tuple(_leaves(x=x, r=r, w=w, b=bb).values()) + (state, norm, EPS, False), **kw)
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), None, None, None, None, norm, EPS, False), **kw)
    xl, rl, wl, _, _, _ = _inputs((3, 8), torch.bfloat16, b.device, rfp32=True, f32_params=True)
    torch.library.opcheck(fwd, (xl.clone().requires_grad_(), rl, wl.clone().requires_grad_(), None, state, norm,
                                EPS, True), **kw)
    _, h, mean, rstd, _ = fwd(x, r, w, bb, state, norm, EPS, False)
    torch.library.opcheck(bwd, (gy, None, h, w, mean, rstd, state, norm, [True, True, True, True]), **kw)
    torch.library.opcheck(bwd, (gy, gh, h, None, mean, rstd, None, norm, [True, False, False, True]), **kw)


# --- bad input ------------------------------------------------------------------------

def _expect(exc_type, words, fn, *inputs):
    snap = Snapshot(*inputs)
    with pytest.raises(exc_type) as info:
        fn()
    assert words in str(info.value), f"{str(info.value)!r} does not say {words!r}"
    snap.check()


def _bad_op_cases():
    """id -> (exception, words, call(ops, x, r, w, b, g, state)): direct op
    calls, which bypass the public API's checks."""
    def bwd(change):
        def call(o, x, r, w, b, g, st):
            _, h, mean, rstd, _ = o.norm(x, r, w, b, st, "layer", EPS, False)
            args = dict(grad=g, grad_h=None, h=h, weight=w, mean=mean, rstd=rstd, state=st, norm="layer",
                        mask=[True, True, True, True])
            args.update(change(x, h, mean, rstd))
            return o.norm_backward(*args.values())
        return call

    cases = [
        ("input int64", TypeError, "input must be float16, bfloat16, float32 or float64",
         lambda o, x, r, w, b, g, st: o.norm(x.long(), None, None, None, st, "layer", EPS, False)),
        ("input 0-dim", ValueError, "input must have at least one dimension",
         lambda o, x, r, w, b, g, st: o.norm(x[0, 0], None, None, None, st, "layer", EPS, False)),
        ("norm", ValueError, "norm must be one of",
         lambda o, x, r, w, b, g, st: o.norm(x, r, w, b, st, "batch", EPS, False)),
        ("eps negative", ValueError, "eps must be a finite real number >= 0",
         lambda o, x, r, w, b, g, st: o.norm(x, r, w, b, st, "rms", -1.0, False)),
        ("eps nan", ValueError, "eps must be a finite real number >= 0",
         lambda o, x, r, w, b, g, st: o.norm(x, r, w, b, st, "rms", math.nan, False)),
        ("residual dtype", TypeError, "residual must have h's dtype",
         lambda o, x, r, w, b, g, st: o.norm(x.half(), r.half(), None, None, st, "layer", EPS, True)),
        ("residual shape", ValueError, "residual must have input's shape",
         lambda o, x, r, w, b, g, st: o.norm(x, r[:2], w, b, st, "layer", EPS, False)),
        ("weight size", ValueError, "weight must be 1-D with the size of input's last dimension",
         lambda o, x, r, w, b, g, st: o.norm(x, r, w[:3], b, st, "layer", EPS, False)),
        ("bias dtype", TypeError, "bias must have input's dtype",
         lambda o, x, r, w, b, g, st: o.norm(x, r, w, b.double(), st, "layer", EPS, False)),
        ("weight and bias dtypes", TypeError, "weight and bias must have one dtype",
         lambda o, x, r, w, b, g, st: o.norm(x.half(), r.half(), w.half(), b, st, "layer", EPS, False)),
        ("state", ValueError, "state must be an int64 tensor",
         lambda o, x, r, w, b, g, st: o.norm(x, r, w, b, st.int(), "layer", EPS, False)),
        ("backward mean dtype", ValueError, "mean must be torch.float32",
         bwd(lambda x, h, mean, rstd: dict(mean=mean.double()))),
        ("backward rstd shape", ValueError, "rstd must be torch.float32",
         bwd(lambda x, h, mean, rstd: dict(rstd=rstd[:2]))),
        ("backward h shape", ValueError, "h must have grad's shape", bwd(lambda x, h, mean, rstd: dict(h=h[:2]))),
        ("backward grad_h", ValueError, "grad_h must have h's shape", bwd(lambda x, h, mean, rstd: dict(grad_h=h[:2]))),
        ("backward weight's gradient", ValueError, "output_mask is [input, residual, weight, bias]",
         bwd(lambda x, h, mean, rstd: dict(weight=None))),
    ]
    return {c[0]: c[1:] for c in cases}


BAD_OP_CASES = _bad_op_cases()


@pytest.mark.parametrize(*cases(case=list(BAD_OP_CASES)))
def test_ops_bad_arguments(b, case):
    """The op refuses the bad argument itself (the C++ glue and the Python
    kernels alike, in the same words) and changes nothing."""
    exc, words, call = BAD_OP_CASES[case]
    x, r, w, bb, g, _ = _inputs((3, 4), torch.float32, b.device)
    st = b.state(0.5)
    _expect(exc, words, lambda: call(b.ops, x, r, w, bb, g, st), x, r, w, bb, g, st)


if not TRITON_MODE:
    def _bad_api_cases():
        x = torch.randn(3, 4)
        return [
            ("input int", TypeError, "input must be float16", dict(x=x.long())),
            ("p", ValueError, "dropout probability has to be between 0 and 1", dict(p=1.5)),
            ("p type", TypeError, "dropout probability p must be a real number", dict(p="0.5")),
            ("norm", ValueError, "norm must be one of ('layer', 'rms')", dict(norm="batch")),
            ("eps", ValueError, "eps must be a finite real number >= 0", dict(eps=-1e-5)),
            ("eps type", ValueError, "eps must be a finite real number >= 0", dict(eps="1e-5")),
            ("prenorm", TypeError, "prenorm must be a bool", dict(prenorm=1)),
            ("residual_in_fp32", TypeError, "residual_in_fp32 must be a bool", dict(residual_in_fp32="yes")),
            ("residual dtype", TypeError, "residual must have h's dtype torch.float32",
             dict(x=x.bfloat16(), residual=torch.randn(3, 4).bfloat16(), residual_in_fp32=True)),
            ("residual shape", ValueError, "residual must have input's shape (3, 4)", dict(residual=torch.randn(4))),
            ("weight size", ValueError, "weight must be 1-D with the size of input's last dimension (4)",
             dict(weight=torch.randn(5))),
            ("weight dtype", TypeError, "weight must have input's dtype (torch.float32) or float32",
             dict(weight=torch.randn(4).double())),
            ("bias rank", ValueError, "bias must be 1-D", dict(bias=torch.randn(1, 4))),
            ("seed and generator", ValueError, "pass either seed= or generator=",
             dict(seed=1, generator=torch.Generator())),
            ("backend", ValueError, "backend must be one of", dict(backend="nope")),
        ]

    BAD_API_CASES = _bad_api_cases()

    @pytest.mark.parametrize("case", BAD_API_CASES, ids=[c[0] for c in BAD_API_CASES])
    def test_api_bad_arguments(case):
        _, exc, words, change = case
        args = dict(x=torch.randn(3, 4), residual=None, weight=torch.randn(4), bias=torch.randn(4))
        args.update(change)
        tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
        _expect(exc, words, lambda: F.dropout_add_norm(**args), *tensors)

    def test_module_bad_arguments():
        _expect(ValueError, "hidden_size must be a positive int", lambda: dropout_ext.DropoutAddLayerNorm(0))
        _expect(ValueError, "dropout probability has to be between 0 and 1",
                lambda: dropout_ext.DropoutAddRMSNorm(8, p=1.5))
        _expect(TypeError, "prenorm must be a bool", lambda: dropout_ext.DropoutAddLayerNorm(8, prenorm=None))
        m = dropout_ext.DropoutAddLayerNorm(8)
        x = torch.randn(2, 9)
        _expect(ValueError, "weight must be 1-D with the size of input's last dimension (9)", lambda: m(x), x)
        _expect(ValueError, "dropout probability has to be between 0 and 1", lambda: setattr(m, "p", -0.1))
        _expect(ValueError, "residual must have input's shape", lambda: m(torch.randn(2, 8), torch.randn(8)))


# --- the modules (default backend) ------------------------------------------------------

if not TRITON_MODE:
    MODULE_TWINS = [
        ("layer", lambda H: dropout_ext.DropoutAddLayerNorm(H), lambda H: nn.LayerNorm(H)),
        ("layer no bias", lambda H: dropout_ext.DropoutAddLayerNorm(H, bias=False),
         lambda H: nn.LayerNorm(H, bias=False)),
        ("layer no affine", lambda H: dropout_ext.DropoutAddLayerNorm(H, elementwise_affine=False),
         lambda H: nn.LayerNorm(H, elementwise_affine=False)),
        ("rms", lambda H: dropout_ext.DropoutAddRMSNorm(H), lambda H: nn.RMSNorm(H, eps=1e-6)),
        ("rms no affine", lambda H: dropout_ext.DropoutAddRMSNorm(H, elementwise_affine=False),
         lambda H: nn.RMSNorm(H, eps=1e-6, elementwise_affine=False)),
    ]

    @pytest.mark.parametrize("case", MODULE_TWINS, ids=[c[0] for c in MODULE_TWINS])
    def test_module_state_dict_and_eval_match_torch(case):
        """State dicts load both ways with nn.LayerNorm / nn.RMSNorm (same
        names, shapes, initial values); in eval mode the module is the
        torch norm of residual + x."""
        _, make, make_twin = case
        H = 24
        ours, twin = make(H), make_twin(H)
        assert ours.state_dict().keys() == twin.state_dict().keys()
        for k, v in twin.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for prm in twin.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
        ours.load_state_dict(twin.state_dict())
        fresh = make_twin(H)
        fresh.load_state_dict(ours.state_dict())
        for k, v in twin.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
        x, r = torch.randn(5, H, generator=g), torch.randn(5, H, generator=g)
        ours.eval()
        twin64 = copy.deepcopy(twin).double()  # the oracle: torch's module in float64
        kind = "layer" if isinstance(twin, nn.LayerNorm) else "rms"
        with torch.no_grad():
            w, bb = getattr(ours, "weight", None), getattr(ours, "bias", None)
            for y, h in ((ours(x, r), x + r), (ours(x), x)):
                _check_y(y, h, w, bb, kind, twin64(h.double()), ours.eps)

    def test_module_forward_and_repr():
        m = dropout_ext.DropoutAddLayerNorm(16, p=0.25, eps=1e-6, prenorm=True)
        assert repr(m) == ("DropoutAddLayerNorm(16, p=0.25, eps=1e-06, elementwise_affine=True, bias=True, "
                           "prenorm=True, residual_in_fp32=False)")
        assert repr(dropout_ext.DropoutAddRMSNorm(8, residual_in_fp32=True)) == (
            "DropoutAddRMSNorm(8, p=0.5, eps=1e-06, elementwise_affine=True, prenorm=False, residual_in_fp32=True)")
        x, r = torch.randn(3, 16), torch.randn(3, 16)
        torch.manual_seed(7)
        y, h = m(x, r)
        torch.manual_seed(7)
        y2, h2 = F.dropout_add_norm(x, r, m.weight, m.bias, 0.25, 1e-6, prenorm=True)
        assert_bitwise_equal(y, y2)
        assert_bitwise_equal(h, h2)
        m.p = 0.0
        assert_bitwise_equal(m(x, r)[1], x + r)
        half = dropout_ext.DropoutAddRMSNorm(16, residual_in_fp32=True, prenorm=True, dtype=torch.bfloat16)
        assert half.weight.dtype == torch.bfloat16
        y, h = half(x.bfloat16(), r)
        assert y.dtype == torch.bfloat16 and h.dtype == torch.float32

    def test_autocast_casts_the_residual_to_h_dtype():
        """Under autocast the matmul's output is bfloat16 and the residual
        stream float32: the residual follows h's dtype (x's, or float32 with
        residual_in_fp32); float32 parameters stay float32."""
        lin = nn.Linear(16, 16)
        m = dropout_ext.DropoutAddLayerNorm(16, p=0.2, prenorm=True)
        x, r = torch.randn(4, 16), torch.randn(4, 16)
        for rfp32 in (False, True):
            m.residual_in_fp32 = rfp32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.manual_seed(2)
                a = lin(x)
                y, h = m(a, r)
            assert y.dtype == torch.bfloat16 and h.dtype == (torch.float32 if rfp32 else torch.bfloat16)
            torch.manual_seed(2)
            y2, h2 = F.dropout_add_norm(a, r if rfp32 else r.bfloat16(), m.weight, m.bias, 0.2, prenorm=True,
                                        residual_in_fp32=rfp32)
            assert_bitwise_equal(y, y2)
            assert_bitwise_equal(h, h2)

    @pytest.mark.parametrize("kind", ["layer", "rms"])
    def test_compile_fullgraph_module(kind):
        """torch.compile(fullgraph=True) of the module: the eager module's
        outputs and gradients for the same generator state, and p is data
        (a new p, one graph)."""
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        cls = dropout_ext.DropoutAddLayerNorm if kind == "layer" else dropout_ext.DropoutAddRMSNorm
        m = cls(64, p=0.3, prenorm=True)
        compiled = torch.compile(m, fullgraph=True)
        x, r, _, _, gy, gh = _inputs((8, 64), torch.float32, "cpu")
        results = []
        for fn in (compiled, m):
            leaves = _leaves(x=x, residual=r)
            torch.manual_seed(4)
            y, h = fn(*leaves.values())
            results.append((y, h, *torch.autograd.grad([y, h], [*leaves.values(), m.weight], [gy, gh])))
        for a, e in zip(*results):
            assert_bitwise_equal(a, e)
        counters.clear()
        for p in (0.1, 0.6):
            m.p = p
            with torch.no_grad():
                rate = (compiled(torch.ones(64, 64), torch.zeros(64, 64))[1] == 0).float().mean().item()
            assert abs(rate - p) < 0.05  # 6 standard deviations of 4096 draws' rate, sqrt(p (1 - p) / 4096)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
