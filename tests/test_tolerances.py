"""The tests' error bounds (error_bounds.sum_bound, error_bounds.norm_bounds and the
checks built on them) accept what the kernels compute and reject what a
broken kernel would give: a bias gradient zeroed, negated, off by the
1/(1 - p) scale or missing a row of terms; norm statistics zeroed or of the
wrong variance; a LayerNorm backward missing a term."""

import pytest
import torch

from dropout_ext import _ops, _state
from dropout_ext import reference as ref
from conftest import make_inputs
from error_bounds import (bias_grad_terms, check_bias_grad, check_bounded, check_norm_param_grads, check_sum, gamma,
                          norm_bounds, sum_bound, unit_roundoff)

SEED, OFFSET = 0xF123456789ABCDEF, 2**32 + 5
# (shape, dtype, activation): one row of 4097 (the shape at which a bound of
# the largest entry times shape[0] let anything through), a single row of 67
# in bfloat16 (one row: a 2x error hid in the dtype's tolerance), and many
# rows in each math type.
CASES = [((4097,), torch.bfloat16, "gelu"), ((4097,), torch.float32, "silu"), ((67,), torch.bfloat16, "identity"),
         ((513, 64), torch.float32, "gelu_tanh"), ((513, 64), torch.float16, "relu"),
         ((300, 40), torch.float64, "gelu")]
BACKENDS = ["", "cuda_host_"] if _ops.HAS_CUDA_HOST_KERNELS else [""]


def _bias_grad(prefix, shape, dtype, activation, p=0.5):
    x, bias, _, grad = make_inputs(shape, dtype, seed=6)
    state = _state.make_state(torch.device("cpu"), p, SEED, OFFSET)
    db = _ops.op_set(prefix).backward(grad, x, bias, state, activation, [], True)[1]
    return db, (grad, x, bias, SEED, OFFSET, p, activation)


def _rejects(db, args):
    with pytest.raises(AssertionError, match="beyond the error bound"):
        check_bias_grad(db, *args)


@pytest.mark.parametrize("prefix", BACKENDS, ids=lambda p: p.rstrip("_") or "cpu")
@pytest.mark.parametrize("shape,dtype,activation", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_bias_grad_check_accepts_the_kernels_and_rejects_broken_ones(prefix, shape, dtype, activation):
    db, args = _bias_grad(prefix, shape, dtype, activation)
    check_bias_grad(db, *args)
    _rejects(torch.zeros_like(db), args)
    _rejects(-db, args)
    _rejects(db * 2, args)
    _rejects((db.to(torch.float64) * 0.5).to(dtype), args)  # the 1/(1 - p) of p = 0.5 lost
    terms = bias_grad_terms(*args)
    if terms.shape[0] > 1:  # a row of terms left out of the sum (a lost partial block)
        _rejects(terms[1:].to(torch.float64).sum(0).to(dtype), args)


def test_the_bound_is_the_sum_error_analysis():
    """Written out for one column: the float32 sum of n terms stored in
    bfloat16, against gamma and u by hand."""
    terms = torch.tensor([[1.0], [-3.0], [2.5], [0.25]], dtype=torch.float32)
    exact, bound = sum_bound(terms, torch.bfloat16)
    S, E = 6.75, 0.75
    u32, u16 = 2.0**-24, 2.0**-8
    assert unit_roundoff(torch.float32) == u32 and unit_roundoff(torch.bfloat16) == u16
    g3 = 3 * u32 / (1 - 3 * u32)
    assert gamma(3, torch.float32) == g3
    assert exact.item() == E
    want = (1 + u16) * (g3 + gamma(3, torch.float64)) * S + u16 * E + 2.0**-133 / 2
    assert bound.item() == pytest.approx(want, rel=1e-12)
    # in the math type itself: no store rounding, and an exact sum passes at 0 error
    assert sum_bound(terms, torch.float32)[1].item() == pytest.approx((g3 + gamma(3, torch.float64)) * S)
    check_sum(torch.tensor([E]), terms)
    with pytest.raises(AssertionError):
        check_sum(torch.tensor([E + 4 * g3 * S]), terms)
    # no rows: the sum is 0 exactly
    check_sum(torch.zeros(3), torch.zeros(0, 3))
    with pytest.raises(AssertionError):
        check_sum(torch.full((3,), 1e-30), torch.zeros(0, 3))


# --- dropout_add_norm ------------------------------------------------------------------

def _norm_backward(g, h, w, mean, rstd, keep, scale, broken=None):
    """(dx, dh, dw) of LayerNorm's backward in rstd's dtype, as the kernels
    compute it, or with one deliberate mistake: "mean term" leaves out
    mean(g w), "projection" leaves out xhat mean(g w xhat), "dw unnormalised"
    sums g (h - mean) for the weight gradient."""
    hf, gf = h.to(rstd.dtype), g.to(rstd.dtype)
    r, m = rstd[:, None], mean[:, None]
    xhat = (hf - m) * r
    gw = gf * w.to(rstd.dtype)
    proj = (gw * xhat).mean(-1, keepdim=True) if broken != "projection" else 0.0
    dh = gw - xhat * proj
    if broken != "mean term":
        dh = dh - gw.mean(-1, keepdim=True)
    dh = dh * r
    dx = torch.where(keep, dh * scale, torch.zeros_like(dh))
    terms = gf * ((hf - m) if broken == "dw unnormalised" else xhat)
    return dx.to(g.dtype), dh.to(h.dtype), terms.sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_bounds_accept_the_kernels_and_reject_broken_ones(dtype):
    """LayerNorm through the CPU kernels: y, the statistics and the
    gradients within error_bounds.norm_bounds and check_sum; the same checks
    fail for statistics zeroed or of the unbiased variance, and for a
    backward that drops mean(g w), the projection on xhat, or normalises
    nothing in the weight gradient (each caught also in bfloat16, where a
    tolerance of the dtype's size let the first through)."""
    shape, p, eps = (6, 77), 0.3, 1e-5
    x, _, res, g = make_inputs(shape, dtype, seed=2)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=torch.Generator().manual_seed(3))).to(dtype)
    ops = _ops.op_set("")
    state = _state.make_state(torch.device("cpu"), p, SEED, OFFSET)
    y, h, mean, rstd, _ = ops.norm(x, res, w, None, state, "layer", eps, False)
    stat = rstd.dtype
    fwd = norm_bounds(h, w, None, torch.zeros_like(h), None, "layer", eps, stat)
    for name, value in (("y", y), ("mean", mean), ("rstd", rstd)):
        check_bounded(value, *fwd[name], stat, name)
    with pytest.raises(AssertionError, match="rstd"):
        check_bounded(torch.zeros_like(rstd), *fwd["rstd"], stat, "rstd")
    unbiased = (h.to(stat).var(-1, unbiased=True) + eps).rsqrt()
    with pytest.raises(AssertionError, match="rstd"):
        check_bounded(unbiased, *fwd["rstd"], stat, "rstd")
    with pytest.raises(AssertionError, match="mean"):
        check_bounded(torch.zeros_like(mean), *fwd["mean"], stat, "mean")

    keep = ref.dropout_mask(shape, p, SEED, OFFSET)
    dx, dh, dw, _ = ops.norm_backward(g, None, h, w, mean, rstd, state, "layer", [True, True, True, False])
    bwd = norm_bounds(h, w, None, g, None, "layer", eps, stat, keep, p)
    check_bounded(dx, *bwd["dx"], stat, "dx")
    check_bounded(dh, *bwd["dh"], stat, "dh")
    check_norm_param_grads(dw, None, g, h, mean, rstd, "layer")
    scale = 1 / (1 - p)
    local = _norm_backward(g, h, w, mean, rstd, keep, scale)  # the local copy, unbroken, passes
    check_bounded(local[0], *bwd["dx"], stat, "dx")
    check_norm_param_grads(local[2], None, g, h, mean, rstd, "layer")
    for broken in ("mean term", "projection"):
        bad_dx, bad_dh, _ = _norm_backward(g, h, w, mean, rstd, keep, scale, broken)
        with pytest.raises(AssertionError, match="dx"):
            check_bounded(bad_dx, *bwd["dx"], stat, "dx")
        with pytest.raises(AssertionError, match="dh"):
            check_bounded(bad_dh, *bwd["dh"], stat, "dh")
    bad_dw = _norm_backward(g, h, w, mean, rstd, keep, scale, "dw unnormalised")[2]
    with pytest.raises(AssertionError, match="weight gradient"):
        check_norm_param_grads(bad_dw, None, g, h, mean, rstd, "layer")
