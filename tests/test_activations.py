"""The reference's float32 activations and their derivatives against float64
PyTorch: an oracle that shares nothing with the code. The conformance suite
holds every backend bit for bit to the reference, so a wrong formula or
constant there would move the backends and their oracle together; here the
reference meets the functions themselves, evaluated in float64 with
constants taken from their definitions (the math module, the coefficients
Abramowitz & Stegun publish), never from dropout_ext/_contract.py (but for
where exp flushes to zero, a choice of the contract, not a constant of a
function).

Inputs: every bfloat16 and every float16 value, every 8192nd float32 bit
pattern (each binade of both signs, subnormals, +-0, +-inf, NaN), random
bit patterns and a dense uniform sample of [-20, 20], where the functions
bend. The error of a float32 result r against the float64 value f is held to

    |r - f| <= N ulp(sum of |terms|) + M 2**-24 |w df/dw| + |f - f_flushed| (+ A)

- N ulp(sum of |terms|): the rounding of the operations, in float32 ulps
  (2**-149 below 2**-126) of the sum of the absolute values of the terms the
  formula adds. Relative to the result where nothing cancels; where the terms
  cancel (a derivative's zero, gelu' at -0.75, silu' at -1.28) relative
  error means nothing and the bound is relative to the terms;
- M 2**-24 |w df/dw|: the exponential's argument is built from a float32
  intermediate w, itself off by up to M units of roundoff (counted from the
  operations that form it), and the result moves by |w df/dw| per unit of
  relative change of w: the conditioning of the function, which no float32
  sequence escapes and which grows in the tails (at v = -9 one roundoff of
  u moves gelu_tanh by 66 roundoffs);
- |f - f_flushed|: exp results below exp(-87) are flushed to zero (docs/RNG.md,
  "Activations"), so where the exponential falls that low the result may lose
  that part (f_flushed: f with those exponentials zero);
- A: for gelu against erf itself, the error of the Abramowitz & Stegun
  approximation (7.1.26: |error| <= 1.5e-7 on erf), which the contract chose.

N and M are stated per function beside its truth, with the error analysis
behind them and the largest error measured. A check that fails names the
worst input. Special values (+-0, +-inf, NaN) and the one range where a
result is NaN for a finite input are checked apart.
"""

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import assert_bitwise_equal
from error_bounds import unit_roundoff
from dropout_ext import _contract
from dropout_ext import reference as ref

F32, F64 = _contract.F32, _contract.F64
ROUNDOFF = unit_roundoff(torch.float32)

# --- the constants, from their definitions -----------------------------------

# Abramowitz & Stegun 7.1.26: erfc(z) ~ t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2),
# t = 1 / (1 + p z), |error| <= 1.5e-7 for z >= 0.
AS_P = "0.3275911"
AS_COEFFS = ("0.254829592", "-0.284496736", "1.421413741", "-1.453152027", "1.061405429")  # a1 .. a5
AS_ERROR = 1.5e-7
GELU_TANH_C = "0.044715"

# What each float32 constant of the table is, exactly (Fractions) or to
# float64 precision (irrationals: a float64 is within 2**-29 float32 ulps of
# them, which moves none of these roundings). The table lists the A&S
# coefficients in Horner order, innermost first: AS_A1 is a5.
DEFINITIONS = {
    "LOG2E": 1.0 / math.log(2.0),
    "EXP_C0": Fraction(1), "EXP_C1": Fraction(1),
    **{f"EXP_C{k}": Fraction(1, math.factorial(k)) for k in range(2, 8)},
    "SQRT1_2": math.sqrt(0.5),
    "AS_P": Fraction(AS_P),
    **{f"AS_A{i}": Fraction(AS_COEFFS[5 - i]) for i in range(1, 6)},
    "INV_SQRT_2PI": 1.0 / math.sqrt(2.0 * math.pi),
    "SQRT_2_OVER_PI": math.sqrt(2.0 / math.pi),
    "GELU_TANH_C": Fraction(GELU_TANH_C),
    "GELU_TANH_3C": 3 * Fraction(GELU_TANH_C),
}
DEFINITIONS_F64 = {
    "SQRT1_2_F64": math.sqrt(0.5),
    "INV_SQRT_2PI_F64": 1.0 / math.sqrt(2.0 * math.pi),
    "SQRT_2_OVER_PI_F64": math.sqrt(2.0 / math.pi),
    "GELU_TANH_C_F64": float(Fraction(GELU_TANH_C)),
}


def _to_float32(x) -> float:
    """The float32 nearest to x (ties to even), exactly: rounding x to
    float64 first could land on a float32 midpoint."""
    x = Fraction(x)
    near = np.float32(float(x))
    candidates = [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.uint32)) & 1)))


def test_each_constant_is_its_definition_rounded_once():
    """Every float32 constant is the float32 nearest to what it names, every
    float64 one the float64 nearest: a constant nudged by one ulp fails here
    whether or not the results show it (a 1-ulp change of 1/7! moves exp by
    less than 1e-14, far under half an ulp of any result)."""
    wrong = [f"{name} = {F32[name].hex()}, the float32 nearest {float(exact)!r} is {_to_float32(exact).hex()}"
             for name, exact in DEFINITIONS.items() if F32[name] != _to_float32(exact)]
    wrong += [f"{name} = {F64[name].hex()}, expected {exact.hex()}"
              for name, exact in DEFINITIONS_F64.items() if F64[name] != exact]
    assert not wrong, "\n".join(wrong)
    # The range reduction of exp: k * LN2_HI is exact for every k the
    # arguments reach (|k| <= 126, 7 bits), so LN2_HI has at most 24 - 7
    # significant bits; LN2_LO is the rest of ln 2, rounded once.
    ln2 = Fraction(math.log(2.0))
    hi = Fraction(F32["LN2_HI"])
    assert (hi * 2 ** 17).denominator == 1 and hi * 2 ** 17 < 2 ** 17 and abs(ln2 - hi) < Fraction(1, 2 ** 16)
    assert F32["LN2_LO"] == _to_float32(ln2 - hi)
    assert F32["ROUND_MAGIC"] == 1.5 * 2 ** 23  # x + 1.5 * 2**23 rounds x (|x| < 2**22) to an integer
    # The flush: no argument kept gives a 2**k below the normal range.
    assert round(F32["EXP_MIN"] * F32["LOG2E"]) >= -126 and math.exp(F32["EXP_MIN"]) >= 2.0 ** -126
    assert set(DEFINITIONS) | {"LN2_HI", "LN2_LO", "ROUND_MAGIC", "EXP_MIN"} == set(F32)
    assert set(DEFINITIONS_F64) == set(F64)


# --- the inputs --------------------------------------------------------------

def _every(dtype) -> torch.Tensor:
    """Every value of a 16-bit float type, in float32 (exactly)."""
    return torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).float()


@functools.lru_cache(maxsize=None)
def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(2024)
    lattice = (torch.arange(2 ** 19, dtype=torch.int64) << 13).to(torch.int32).view(torch.float32)
    patterns = torch.randint(-2 ** 31, 2 ** 31, (2 ** 17,), generator=g, dtype=torch.int64).to(torch.int32)
    uniform = (torch.rand(2 ** 19, generator=g, dtype=torch.float64) * 40 - 20).float()
    v = torch.cat([_every(torch.bfloat16), _every(torch.float16), lattice, patterns.view(torch.float32), uniform])
    return v


def test_the_inputs_reach_every_kind_of_value():
    v = _inputs()
    b = v.view(torch.int32)
    exponent = (b >> 23) & 0xFF
    assert set(exponent.unique().tolist()) == set(range(256))  # every binade, subnormals, inf/NaN
    assert bool((b == 0).any() and (b == -2 ** 31).any() and torch.isinf(v).any() and torch.isnan(v).any())
    assert int(((v.abs() > 3) & (v.abs() < 20)).sum()) > 400_000 and int((v.abs() > 1e30).sum()) > 50_000


# --- the functions, in float64 ------------------------------------------------

SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
C = float(Fraction(GELU_TANH_C))
P = float(Fraction(AS_P))
A = [float(Fraction(a)) for a in AS_COEFFS]
FLUSH_ABOVE = 86.5  # exp(-a) may be flushed past a = 87 (the float32 argument can be a little larger)


def _exp_neg(a, flush):
    """exp(-a); zero where the reference may flush it, when flush."""
    e = torch.exp(-a)
    return torch.where(a > FLUSH_ABOVE, torch.zeros_like(e), e) if flush else e


def _erfc_as(z, flush=False):
    t = 1.0 / (1.0 + P * z)
    poly = torch.full_like(t, A[4])
    for a in reversed(A[:4]):
        poly = a + t * poly
    return t * poly * _exp_neg(z * z, flush)


def _cdf2(v, z, flush, exact):
    """2 Phi(v), from erfc of z = |v| / sqrt 2: exactly, or by A&S 7.1.26."""
    q = torch.special.erfc(z) if exact else _erfc_as(z, flush)
    return torch.where(v >= 0, 2.0 - q, q)


def _gelu(v, d, flush, exact=False):
    z = v.abs() * SQRT_HALF * (1 + d)
    return [0.5 * v * _cdf2(v, z, flush, exact)]


def _gelu_grad(v, d, flush, exact=False):
    z = v.abs() * SQRT_HALF * (1 + d)
    return [0.5 * _cdf2(v, z, flush, exact), v * _exp_neg(z * z, flush) * INV_SQRT_2PI]


def _sigmoids(w, a, flush):
    """(sigmoid(w), sigmoid(-w)) from e = exp(-a), a = |w|, without cancellation."""
    e = _exp_neg(a, flush)
    big, small = 1.0 / (1.0 + e), e / (1.0 + e)
    pos = w >= 0
    return torch.where(pos, big, small), torch.where(pos, small, big)


def _gelu_tanh_u(v, d):
    return SQRT_2_OVER_PI * (v + C * v * v * v) * (1 + d)


def _gelu_tanh(v, d, flush):
    u = _gelu_tanh_u(v, d)
    s, _ = _sigmoids(u, 2 * u.abs(), flush)  # (1 + tanh u) / 2 = sigmoid(2u)
    return [v * s]


def _gelu_tanh_grad(v, d, flush):
    u = _gelu_tanh_u(v, d)
    s, s_neg = _sigmoids(u, 2 * u.abs(), flush)
    return [s, 2 * v * s * s_neg * SQRT_2_OVER_PI * (1 + 3 * C * v * v)]


def _silu(v, d, flush):
    s, _ = _sigmoids(v, v.abs(), flush)
    return [v * s]


def _silu_grad(v, d, flush):
    s, s_neg = _sigmoids(v, v.abs(), flush)
    # s (1 + v (1 - s)) with s perturbed: 1 - s moves by -s d
    return [s * (1 + d), s * (1 + d) * v * (s_neg - s * d)]


def _exp(v, d, flush):
    return [torch.exp(v)]  # on -87 <= v <= 0, where nothing is flushed


# name: (reference (float32), terms (float64: relative perturbation d of w,
# flush), N, M, A(v)). N and M are the error analysis's counts, set against
# the largest errors the inputs give ("needs": the smallest N that passes
# with that M; the float32 steps are IEEE operations, so every machine
# measures the same).
#
# exp (-87 <= x <= 0; below, 0 exactly): the argument is exact and so is
#   2**k; the degree-7 Taylor polynomial on |r| <= ln2/2 truncates at
#   r^8/8! < 0.1 ulp and its Horner steps round about 1 ulp more.
#   N = 1.5 (needs 1.16).
# gelu, gelu': z = |v| SQRT1_2 and z * z take 2 roundings and the constant
#   one more half: M = 3 (2 passes, 1 needs N = 89). The A&S polynomial
#   alternates in sign
#   (|a1| + .. + |a5| = 4.5 against erfc(0) = 1), so near v = 0 its Horner
#   steps lose several ulps of erfc, which 2 - q and 0.5 v carry: N = 10
#   (needs 7.6 against A&S evaluated in float64, 6.5 against erf with
#   A = 0.5 |v| 1.5e-7 for gelu and 0.5 x 1.5e-7 for gelu').
# gelu_tanh, gelu_tanh': u = sqrt(2/pi) (v + c v^3) takes 5 roundings and
#   its 2 constants a half each, but they partly cancel: M = 4 (3 passes, 2
#   needs N = 57); exp, 1 + e, the division, 0.5 v and the products: N = 3
#   (needs 1.96 and 2.24).
# silu: the argument -|v| is exact; exp, 1 + e, the division and v *: N = 4
#   (needs 2.9).
# silu': s is off by ~2 roundings and v (1 - s) multiplies its absolute
#   error by |v| (past v ~ 17, s rounds to 1 and 1 - s to 0): M = 3 on w = s
#   (without it N needs 8.2, at v = 16.6); 1 - s, v *, 1 +, s *: N = 2
#   (needs 1.12).
FUNCTIONS = {
    "exp": (ref.exp_nonpos, _exp, 1.5, 0, None),
    "gelu": (lambda v: ref.activation_forward(v, "gelu"), _gelu, 10, 3, None),
    "gelu'": (lambda v: ref.activation_grad(v, "gelu"), _gelu_grad, 10, 3, None),
    "gelu vs erf": (lambda v: ref.activation_forward(v, "gelu"),
                    functools.partial(_gelu, exact=True), 10, 3, lambda v: 0.5 * v.abs() * AS_ERROR),
    "gelu' vs erf": (lambda v: ref.activation_grad(v, "gelu"),
                     functools.partial(_gelu_grad, exact=True), 10, 3, lambda v: torch.full_like(v, 0.5 * AS_ERROR)),
    "gelu_tanh": (lambda v: ref.activation_forward(v, "gelu_tanh"), _gelu_tanh, 3, 4, None),
    "gelu_tanh'": (lambda v: ref.activation_grad(v, "gelu_tanh"), _gelu_tanh_grad, 3, 4, None),
    "silu": (lambda v: ref.activation_forward(v, "silu"), _silu, 4, 0, None),
    "silu'": (lambda v: ref.activation_grad(v, "silu"), _silu_grad, 2, 3, None),
}


def _domain(name, v):
    """The finite inputs each function is held to its bound on."""
    keep = torch.isfinite(v)
    if name == "exp":
        keep &= (v <= 0) & (v >= F32["EXP_MIN"])
    if name == "gelu_tanh'":
        keep &= v.abs() < 2.0 ** 64  # from there v * v overflows: test_special_values_as_pytorch
    return v[keep]


def _ulp32(x):
    """The float32 ulp of |x| (float64): 2**(e - 23) for x in [2**e, 2**(e+1)), 2**-149 below 2**-126."""
    _, e = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), (e - 24).clamp(min=-149))


def _errors(name):
    """(inputs, error, bound) of one function over the inputs."""
    reference, terms, n_ulps, m_roundoffs, allowance = FUNCTIONS[name]
    v = _domain(name, _inputs())
    got = reference(v).double()
    x = v.double()
    parts = terms(x, 0.0, False)
    truth = sum(parts)
    bound = n_ulps * _ulp32(sum(p.abs() for p in parts))
    if m_roundoffs:
        h = 2.0 ** -20
        slope = (sum(terms(x, h, False)) - sum(terms(x, -h, False))) / (2 * h)
        bound = bound + m_roundoffs * ROUNDOFF * slope.abs()
    bound = bound + (truth - sum(terms(x, 0.0, True))).abs()
    if allowance is not None:
        bound = bound + allowance(x)
    return v, (got - truth).abs(), bound


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_within_the_error_bound(name):
    """Every input of the function's domain within its bound (see FUNCTIONS)."""
    v, err, bound = _errors(name)
    over = err > bound
    assert not torch.isnan(err).any(), f"{name}: NaN at v = {v[torch.isnan(err)][:5].tolist()}"
    if over.any():
        i = int(torch.argmax(torch.where(over, err / bound, torch.zeros_like(err))))
        pytest.fail(f"{name}: {int(over.sum())} of {v.numel()} inputs past the bound; worst at "
                    f"v = {v[i].item()!r}: error {err[i].item():.3g}, bound {bound[i].item():.3g}")


def test_exp_below_the_flush_is_zero():
    """Arguments below exp's flush (and -inf) give 0, NaN gives NaN."""
    v = _inputs()
    x = v[(v < F32["EXP_MIN"]) | torch.isnan(v)]
    e = ref.exp_nonpos(x)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(e), nan) and bool((e[~nan] == 0).all()) and bool((~nan).sum() > 100_000)


TORCH_ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 2.0 ** -149, -2.0 ** -149, 2.0 ** 64, -2.0 ** 64]


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
def test_special_values_as_pytorch(activation):
    """+-0, +-inf, NaN, the smallest subnormals and +-2**64, where v * v
    overflows: the values and derivatives of PyTorch's float32 functions
    and their autograd, bit for bit, NaN where they give NaN (gelu(-inf) is
    -inf * 0; every derivative at +-inf, and gelu_tanh' from 2**64 on, where
    its v * v is inf, meet 0 * inf), but gelu(+inf) = +inf, which PyTorch's
    order of operations makes NaN. relu: every input."""
    v = _inputs() if activation == "relu" else torch.tensor(SPECIAL)
    x = v.clone().requires_grad_()
    expected = TORCH_ACTIVATIONS[activation](x)
    expected.backward(torch.ones_like(expected))
    expected = expected.detach()
    if activation == "gelu":
        expected[v == math.inf] = math.inf
    assert_bitwise_equal(ref.activation_forward(v, activation), expected)
    if activation != "relu":  # relu's derivative is a select in the kernels, not a function
        assert_bitwise_equal(ref.activation_grad(v, activation), x.grad)


class _ContractActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation):
        ctx.save_for_backward(x)
        ctx.activation = activation
        return ref.activation_forward(x.float(), activation).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.activation == "relu":
            return torch.where(x > 0, grad, torch.zeros_like(grad)), None
        return (grad.float() * ref.activation_grad(x.float(), ctx.activation)).to(grad.dtype), None


class ContractActivation(torch.nn.Module):
    """The contract's float32 activation and derivative (the reference's,
    held to the functions above), math in float32 and one rounding to the
    input's dtype as the fused op does: an unfused model with this in place
    of torch's activation differs from its fused form only by what fusion
    changes, not by how torch evaluates gelu."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ContractActivation.apply(x, self.activation)
