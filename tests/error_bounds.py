"""Error bounds for the values the backends may round differently from the
oracle (sums, norm statistics, the norms' outputs and gradients), from the
error analysis of floating-point arithmetic, and the checks that hold a
result to them."""

import math

import torch

from conftest import TOLERANCES


# --- sums against their error bound --------------------------------------------
# Reductions (bias and parameter gradients, norm statistics) are the one
# place backends round differently: each sums in an order of its own. They
# are held to the float64 value with the bound of the error analysis of a
# floating-point sum (Higham, Accuracy and Stability of Numerical
# Algorithms, 2nd ed., section 4.2): summed in any order in a type of unit
# roundoff u, n terms t_i give a computed s with
#     |s - sum t_i| <= gamma(n - 1) * sum |t_i|,  gamma(k) = k u / (1 - k u),
# as each term passes through at most n - 1 additions. The bound scales with
# the terms' magnitudes, never with a shape times the largest result.


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2**-p of a binary float type with p significand bits: the largest
    relative error of one rounding to nearest (half the spacing at 1)."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype) -> float:
    """gamma(k) = k u / (1 - k u): the bound on |prod (1 + d_i) - 1| over k
    roundings of unit roundoff u (Higham, lemma 3.1)."""
    ku = k * unit_roundoff(dtype)
    assert ku < 1, f"gamma({k}) for {dtype} does not exist"
    return ku / (1 - ku)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the kernels compute in (docs/RNG.md): float32 for the 16- and
    32-bit dtypes, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def store_bound(exact, bound, math_type, stored):
    """``bound`` on |v - exact| for a value v in the math type, widened by its
    one rounding to ``stored`` (u |v| + eta / 2, with v within bound of
    exact); nothing when it is stored in the math type."""
    if stored == math_type:
        return bound
    u_d = unit_roundoff(stored)
    eta_d = torch.finfo(stored).smallest_normal * torch.finfo(stored).eps
    return (1 + u_d) * bound + u_d * exact.abs() + eta_d / 2


def sum_bound(terms: torch.Tensor, out_dtype: torch.dtype, term_error=0.0):
    """(exact, bound) for the column sums of ``terms`` [rows, cols], the
    values a kernel sums in terms.dtype (its math type) and stores in
    ``out_dtype``; float64 tensors of shape [cols].

    With n = rows, S = sum |t_i| and E = sum t_i of each column:
      the sum in the math type (unit roundoff u_a), any order:
        |s - E| <= gamma_a(n - 1) S;
      stored in out_dtype (unit roundoff u_d, smallest subnormal eta_d;
      nothing when out_dtype is the math type): r = s (1 + d) + e with
      |d| <= u_d, |e| <= eta_d / 2 (only one of them nonzero), so
        |r - E| <= (1 + u_d) gamma_a(n - 1) S + u_d |E| + eta_d / 2;
      ``exact`` is E summed in float64, itself off by at most
      gamma_64(n - 1) S, which the bound adds;
      ``term_error`` (a scalar or [rows, cols]): where the terms the kernel
      summed may differ from ``terms`` (the float64 activations, from the C
      library there and torch here), the bound on each difference, summed
      over the column. Addition never underflows (a subnormal sum is exact),
      so no other term enters."""
    rows = terms.shape[0]
    t = terms.to(torch.float64)
    exact = t.sum(0)
    S = t.abs().sum(0)
    k = max(rows - 1, 0)
    if isinstance(term_error, torch.Tensor):
        term_error = term_error.to(torch.float64).sum(0)
    else:
        term_error = term_error * rows
    bound = gamma(k, terms.dtype) * S + gamma(k, torch.float64) * S + term_error
    return exact, store_bound(exact, bound, terms.dtype, out_dtype)


def check_sum(actual: torch.Tensor, terms: torch.Tensor, what="sum", term_error=0.0):
    """``actual`` (the column sums of ``terms`` [rows, cols] a kernel computed
    in terms.dtype and stored in actual.dtype) within sum_bound of the
    float64 sum."""
    assert actual.shape == terms.shape[1:], (what, actual.shape, terms.shape)
    exact, bound = sum_bound(terms, actual.dtype, term_error)
    err = (actual.to(torch.float64) - exact).abs()
    bad = ~(err <= bound)  # NaN fails too
    if bool(bad.any()):
        i = int((err - bound).nan_to_num(float("inf")).argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} columns beyond the error bound of "
                             f"a sum of {terms.shape[0]} terms; worst at {i}: got {actual[i].item()!r}, "
                             f"exact {exact[i].item()!r}, |error| {err[i].item():.3g} > bound "
                             f"{bound[i].item():.3g}")


def bias_grad_terms(grad, x, bias, seed, offset, p, activation="identity", mask_shape=(), keep=None):
    """The terms a backend sums for the bias gradient, [rows, H] in the math
    type: dx before its rounding to the dtype, which is the reference's dx
    (bit for bit the kernels', docs/RNG.md) given the inputs widened, exactly,
    to the math type."""
    from dropout_ext import reference as ref

    acc = math_dtype(grad.dtype)
    wide = [t.to(acc) if t is not None else None for t in (grad, x, bias)]
    dx = ref.fused_dropout_backward(*wide, seed, offset, p, activation, mask_shape, False, keep=keep)[0]
    return dx.reshape(math.prod(grad.shape[:-1]), grad.shape[-1])  # explicit rows: H may be 0


def check_bias_grad(actual, grad, x, bias, seed, offset, p, activation="identity", mask_shape=(), keep=None):
    """A fused op's bias gradient (the arguments are those of
    reference.fused_dropout_backward) within sum_bound of the float64 sum of
    its terms. Float64 gelu, gelu_tanh and silu take their terms from the C
    library on the kernel's side and torch on the reference's: they agree
    within check_contract's float64 tolerance, atol + rtol |t| a term (what
    the tests assert of dx itself), which the bound adds."""
    terms = bias_grad_terms(grad, x, bias, seed, offset, p, activation, mask_shape, keep)
    term_error = 0.0
    if grad.dtype == torch.float64 and activation not in ("identity", "relu"):
        _, atol, rtol = TOLERANCES[torch.float64]
        term_error = atol + rtol * terms.abs()
    check_sum(actual, terms, "bias gradient", term_error)


def check_bounded(actual, exact, bound, math_type, what):
    """|actual - exact| <= bound elementwise, ``bound`` that of the value in
    the math type, widened by store_bound for actual's dtype."""
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    exact = exact.to(torch.float64)
    bound = torch.broadcast_to(store_bound(exact, bound, math_type, actual.dtype), exact.shape)
    err = (actual.to(torch.float64) - exact).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond their error bound; "
                             f"first at {i}: got {actual[i].item()!r}, exact {exact[i].item()!r}, "
                             f"|error| {err[i].item():.3g} > bound {bound[i].item():.3g}")


def _norm_error(dtype, H, layer, eps, A, V, hm, w, b, gw, xh, proj, mg, inner, dh, has_gh):
    """Bounds on the errors of dropout_add_norm's kernels computing in
    ``dtype`` (unit roundoff u), from h as stored, against the exact values
    (norm_bounds); g(k) is gamma(k). Row quantities: A = mean |h|, V the
    exact variance (rms: mean h^2), W = V + eps, r = W^(-1/2).

    mean: a sum of H terms and a division, gamma(H) A for any order; the
      Triton kernel merges column tiles (mean += (tile mean - mean) * c / n,
      3 roundings a tile of 32 or more columns, on tile means of the row's
      scale, as in rows of like elements), within gamma(2H) A:
        dm = g(2H) A.
    variance: the two passes give mean((h - m')^2) (1 + theta(H + 3)) with
      mean((h - m')^2) = V + (m' - m)^2; a merge adds 5 roundings a tile and
      the tile means' errors through delta^2 c (n - c) / n, at most
      2 dm sqrt(V) over the row:
        |v' - V| <= dm^2 + g(2H + 3) (V + dm^2) + 2 dm sqrt(V);
      v' + eps (eps rounded to the type, one add):
        eW = |v' - V| / W (1 + u) + u + u eps / W;
      rstd = 1 / sqrt (2 roundings), (1 + eW)^(-1/2) within eW / (2 (1 - eW)):
        rho = eW / (2 (1 - eW)) (1 + g(2)) + g(2), the relative bound on rstd.
    y = ((h - m') r') w + b: the statistics' errors, |w| r (dm (1 + rho) +
      |h - m| rho), and 4 roundings on |w| r (1 + rho) (|h - m| + dm) and
      one on |b|.
    backward: xhat = (h - m') r' (the statistics' errors and 2 roundings),
      gw = g w (1), proj = mean(gw xhat) (H + 1), mean(gw) (H), dh = ((gw -
      xhat proj) - mean(gw)) r' (4), + grad_h (1): each error carried
      through with the magnitudes of the exact values."""
    g = lambda k: gamma(k, dtype)  # noqa: E731
    u = unit_roundoff(dtype)
    W = V + eps
    r = W.rsqrt()
    dm = g(2 * H) * A if layer else torch.zeros_like(A)
    dV = dm * dm + g(2 * H + 3) * (V + dm * dm) + 2 * dm * V.sqrt()
    eW = dV / W * (1 + u) + u + u * eps / W
    assert bool((eW < 0.5).all()), "the statistics' error bound is uninformative for these rows"
    rho = eW / (2 * (1 - eW)) * (1 + g(2)) + g(2)
    ahm = hm.abs()
    stat_err = r * (dm * (1 + rho) + ahm * rho)
    out = {"mean": dm.flatten(), "rstd": (rho * r).flatten()}
    out["y"] = w.abs() * (stat_err + g(4) * (1 + rho) * r * (ahm + dm)) + u * b.abs()
    e_xh = stat_err + g(2) * (1 + rho) * r * (ahm + dm)
    G = gw.abs()
    e_gw, Gb, Xb = u * G, G * (1 + u), xh.abs() + e_xh
    e_proj = (Gb * e_xh + e_gw * xh.abs()).mean(-1, keepdim=True) + g(H + 1) * (Gb * Xb).mean(-1, keepdim=True)
    e_mg = (e_gw.mean(-1, keepdim=True) + g(H) * Gb.mean(-1, keepdim=True)) if layer else torch.zeros_like(A)
    Pb, Mb = proj.abs() + e_proj, mg.abs() + e_mg
    e_inner = e_gw + e_xh * Pb + xh.abs() * e_proj + e_mg + g(3) * (Gb + Xb * Pb + Mb)
    e_dh = r * (1 + rho) * e_inner + inner.abs() * r * rho + u * r * (1 + rho) * (inner.abs() + e_inner)
    if has_gh:
        e_dh = e_dh + u * (dh.abs() + e_dh)
    out["dh"] = e_dh
    return out


def norm_bounds(h, weight, bias, gy, gh, norm, eps, stat_dtype, keep=None, p=0.0):
    """{name: (exact, bound)} for dropout_add_norm's mean, rstd (per row), y,
    dh (grad_residual) and dx (grad_input): the exact values in float64 from
    h as stored (the contract's statistics are of the stored h), and the
    bound on a kernel's error computing in ``stat_dtype`` before the value
    is stored (check_bounded adds the store). The bound is _norm_error's in
    stat_dtype plus the same in float64, for the float64 evaluation of the
    exact values (an oracle of float64 arithmetic too, as torch's layer
    norm). dx = keep * dh * scale: the scale rounded to the math type and
    the product, 2 roundings more."""
    d = torch.float64
    H = h.shape[-1]
    rows = math.prod(h.shape[:-1])
    hf = h.to(d).reshape(rows, H)
    w = weight.to(d) if weight is not None else torch.ones(H, dtype=d, device=h.device)
    b = bias.to(d) if bias is not None else torch.zeros(H, dtype=d, device=h.device)
    layer = norm == "layer"
    m = hf.mean(-1, keepdim=True) if layer else torch.zeros(rows, 1, dtype=d, device=h.device)
    hm = hf - m
    V = (hm * hm).mean(-1, keepdim=True)
    r = (V + eps).rsqrt()
    A = hf.abs().mean(-1, keepdim=True)
    xh = hm * r
    gw = gy.to(d).reshape(rows, H) * w
    proj = (gw * xh).mean(-1, keepdim=True)
    mg = gw.mean(-1, keepdim=True) if layer else torch.zeros_like(proj)
    inner = gw - xh * proj - mg
    dh = inner * r
    if gh is not None:
        dh = dh + gh.to(d).reshape(rows, H)
    args = (H, layer, eps, A, V, hm, w, b, gw, xh, proj, mg, inner, dh, gh is not None)
    low, high = _norm_error(stat_dtype, *args), _norm_error(d, *args)
    bound = {k: low[k] + high[k] for k in low}
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    kept = torch.ones_like(hf, dtype=torch.bool) if keep is None else keep.reshape(rows, H)
    g2 = gamma(2, stat_dtype) + gamma(2, d)
    dx = torch.where(kept, dh * scale, torch.zeros_like(dh))
    e_dx = torch.where(kept, scale * (bound["dh"] * (1 + g2) + g2 * dh.abs()), torch.zeros_like(dh))
    exact = {"mean": m.flatten() if layer else hf.new_empty((0,)), "rstd": r.flatten(),
             "y": xh * w + b, "dh": dh, "dx": dx}
    bound["dx"] = e_dx
    if not layer:
        bound["mean"] = hf.new_empty((0,))
    shaped = {k: v.reshape(h.shape) for k, v in exact.items() if k in ("y", "dh", "dx")}
    exact.update(shaped)
    bound.update({k: bound[k].reshape(h.shape) for k in ("y", "dh", "dx")})
    return {k: (exact[k], bound[k]) for k in exact}


def check_norm_param_grads(dw, db, grad, h, mean, rstd, norm):
    """dropout_add_norm's weight and bias gradients (None where not asked
    for), column sums of dy * xhat and dy, against the float64 sums of the
    terms the kernels add: xhat from h and the saved statistics, in their
    dtype, as the kernels compute it (check_sum)."""
    acc = rstd.dtype
    H = h.shape[-1]
    rows = math.prod(h.shape[:-1])
    g = grad.to(acc).reshape(rows, H)
    hf = h.to(acc).reshape(rows, H)
    r = rstd.reshape(rows, 1)
    xhat = (hf - mean.reshape(rows, 1)) * r if norm == "layer" else hf * r
    if dw is not None:
        check_sum(dw, g * xhat, "weight gradient")
    if db is not None:
        check_sum(db, g, "bias gradient")
