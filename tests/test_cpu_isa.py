"""The instruction sets of the CPU kernels.

csrc/cpu builds every loop for the baseline x86-64, AVX2 and AVX-512 (one
file per kernel family and ISA; csrc/cpu/isa.h) and runs the best one the CPU
has, unless DROPOUT_EXT_CPU_ISA or the test hook
``dropout_ext_testing.cpu_isa`` says otherwise. Here: that choice,
and the same bits from every build over long ranges, at group numbers past
2**32 (up to 2**61, through the test op ``cpu_mask_range``) and from starts at
any element of a group, and every output of dropout_add_norm and its
backward. (The conformance suite runs its cases on each build too: its cpu
row on the build in force, its cpu_<isa> rows on the others.)
"""

import os
import sys
import textwrap

import pytest
import torch

from dropout_ext import _ops, _state
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, make_inputs, run_child
from error_bounds import check_bounded, check_norm_param_grads, norm_bounds


ISAS = ("baseline", "avx2", "avx512")
VAR = "DROPOUT_EXT_CPU_ISA"
# What each build needs from the CPU, as /proc/cpuinfo names it.
NEEDS = {"avx2": {"avx2"}, "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}}


def _testing():
    return torch.ops.dropout_ext_testing


def _have():
    return list(_testing().cpu_isas())


@pytest.fixture
def restore_isa():
    previous = _testing().cpu_isa("")
    yield
    _testing().cpu_isa(previous)


def _on_each_isa(fn):
    """{isa: fn()} with each build of the kernels in force in turn."""
    results = {}
    for isa in _have():
        previous = _testing().cpu_isa(isa)
        try:
            results[isa] = fn()
        finally:
            _testing().cpu_isa(previous)
    return results


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# --- the choice -------------------------------------------------------------------

def test_the_builds_listed_are_the_ones_the_cpu_runs():
    """cpu_isas() lists, in order, baseline and every build the CPU supports,
    so no cpu_<isa> row is skipped on a CPU that could run it."""
    have = _have()
    assert have[0] == "baseline" and have == [isa for isa in ISAS if isa in have]
    flags = _cpu_flags()
    if flags is None or not {"sse2", "lm"} <= flags:
        pytest.skip("not an x86-64 Linux machine: /proc/cpuinfo names no x86-64 flags")
    for isa, needs in NEEDS.items():
        assert (isa in have) == (needs <= flags), (isa, have, sorted(needs - flags))


def test_default_is_the_best_build():
    expected = os.environ.get(VAR) or _have()[-1]
    assert _testing().cpu_isa("") == expected


def test_hook_sets_and_returns_the_previous(restore_isa):
    start = _testing().cpu_isa("")
    for isa in _have():
        before = _testing().cpu_isa(isa)
        assert _testing().cpu_isa("") == isa
        assert _testing().cpu_isa(before) == isa
        assert _testing().cpu_isa("") == before
    assert _testing().cpu_isa("") == start


def test_hook_refuses_unknown_and_unsupported(restore_isa):
    start = _testing().cpu_isa("")
    with pytest.raises(ValueError, match="cpu_isa must be one of 'baseline', 'avx2', 'avx512', got 'AVX2'"):
        _testing().cpu_isa("AVX2")
    for isa in [i for i in ISAS if i not in _have()]:
        with pytest.raises(RuntimeError, match=f"cpu_isa={isa}: this CPU does not support {isa}"):
            _testing().cpu_isa(isa)
    assert _testing().cpu_isa("") == start


_CHILD = textwrap.dedent("""
    import torch
    import dropout_ext
    from dropout_ext import functional as F, reference as ref
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    y = F.dropout(x, 0.5, seed=7, backend="cpu")
    assert torch.equal(y, ref.fused_dropout(x, None, None, 7, 0, 0.5))
    print(torch.ops.dropout_ext_testing.cpu_isa(""))
""")


def _child(value):
    return run_child([sys.executable, "-c", _CHILD], env={VAR: value})


def test_environment_chooses_the_build():
    """The variable names a build (baseline, which every CPU runs); the
    names are read by the parser of the test hook, which
    test_hook_sets_and_returns_the_previous runs on each."""
    out = _child("baseline")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "baseline"


def test_environment_empty_means_the_best_build():
    out = _child("")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == _have()[-1]


def test_environment_bad_value_is_a_clear_error():
    out = _child("avx1024")
    assert out.returncode != 0
    assert "DROPOUT_EXT_CPU_ISA must be one of 'baseline', 'avx2', 'avx512', got 'avx1024'" in out.stderr


# --- the same bits from every build -------------------------------------------------

SEED = 0xF123456789ABCDEF
N = 10**6
# Starts of 10**6-element ranges: aligned and not; group numbers crossing
# 2**32 and 2**33 (the counter's high word), near 2**60 and at the very end of
# the 64-bit element space.
STARTS = [0, 3, 4 * 2**32 - N // 2 + 1, 4 * 2**33 - 2, 2**62 + 1, 2**63 - 1 - N]


def _expected_words(start, n, seed, offset):
    """The reference's Philox words of elements [start, start + n): one
    reference call per group, not per element, so 10**6 elements stay cheap."""
    m32 = 0xFFFFFFFF
    g0 = start >> 2
    groups = torch.arange(((start + n - 1) >> 2) - g0 + 1, dtype=torch.int64) + g0
    words = ref.philox4x32_10(groups & m32, groups >> 32, torch.full_like(groups, offset & m32),
                              torch.full_like(groups, offset >> 32), seed & m32, seed >> 32)
    out = torch.stack(words, dim=-1).view(-1)[start & 3:(start & 3) + n]
    head = torch.arange(min(n, 64), dtype=torch.int64) + start
    assert torch.equal(out[:64], ref.philox_words(head, seed, offset))  # the contract's layout
    return out


def _keep(words, p):
    t = ref.threshold(p)
    return torch.zeros(words.shape, dtype=torch.bool) if t is None else words >= t


PS = [2**-32, 0.1, 0.5, 1 - 2**-32, 1.0]


@pytest.mark.parametrize("start", STARTS)
def test_mask_ranges_equal_across_builds_and_the_reference(start):
    words = _expected_words(start, N, SEED, 2**32 + 5)
    for p in PS:
        state = _state.make_state(torch.device("cpu"), p, SEED, 2**32 + 5)
        for isa, mask in _on_each_isa(lambda: _testing().cpu_mask_range(state, start, N)).items():
            assert torch.equal(mask, _keep(words, p)), (isa, p)


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4 * 2**32 - 6, 4 * 2**32 - 7])
def test_short_mask_ranges_at_every_alignment(start):
    """Ranges shorter than one step of the vector generators, starting at
    every element of a group, at group numbers on both sides of 2**32."""
    state = _state.make_state(torch.device("cpu"), 0.5, 11, 3)
    words = _expected_words(start, 1030, 11, 3)
    for length in [1, 2, 5, 31, 33, 129, 257, 1030]:
        for isa, mask in _on_each_isa(lambda: _testing().cpu_mask_range(state, start, length)).items():
            assert torch.equal(mask, _keep(words[:length], 0.5)), (isa, length)


@pytest.mark.parametrize("words", [(SEED, 2**32 - 1), (7, 2**32), (2**64 - 1, 2**62 + 3), (0, 2**64 - 1)])
def test_dropout_mask_equal_across_builds(words):
    seed, offset = words
    expected = _expected_words(0, N + 3, seed, offset)
    ops = _ops.op_set("")
    for p in PS:
        state = _state.make_state(torch.device("cpu"), p, seed, offset)
        for isa, mask in _on_each_isa(lambda: ops.mask(state, [N + 3])).items():
            assert torch.equal(mask, _keep(expected, p)), (isa, p)


SPECIAL_EVERY = 97


def _with_specials(x):
    """NaN, Inf and the largest values at every 97th element of x."""
    info = torch.finfo(x.dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), info.max, -info.max, -0.0, 0.0],
                            dtype=torch.float64).to(x.dtype)
    x = x.clone()
    flat = x.view(-1)
    idx = torch.arange(0, flat.numel(), SPECIAL_EVERY)
    flat[idx] = specials[torch.arange(idx.numel()) % specials.numel()]
    return x


def _assert_same(actual, expected):
    """Bit equality, except that where the special values are a dropped NaN
    may become a zero of either sign: which NaN an operation returns, and so
    its sign, is not part of the contract (docs/RNG.md), and the builds order
    the operands of their float operations differently."""
    special = (torch.arange(actual.numel()) % SPECIAL_EVERY == 0).view(actual.shape)

    def canonical(t):
        return torch.where(special & (t == 0), torch.zeros_like(t), t)

    assert_bitwise_equal(canonical(actual), canonical(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("extras", ["plain", "bias+res"])
def test_forward_backward_equal_across_builds(dtype, activation, extras):
    """About 84000 elements (three grains of the parallel loop) in rows of an odd length (chunks start at every
    element of a group), special values included: every build gives the same
    bits, and a bfloat16 NaN is 0x7FC0 on each."""
    x, bias, res, grad = make_inputs((41, 2053), dtype, seed=5)
    x, grad = _with_specials(x), _with_specials(grad)
    if extras == "plain":
        bias = res = None
    state = _state.make_state(torch.device("cpu"), 0.3, SEED, 2**32 + 5)
    ops = _ops.op_set("")

    def run():
        y = ops.forward(x, bias, res, state, activation, [])[0]
        dx, db = ops.backward(grad, x, bias, state, activation, [], bias is not None)
        return y, dx, db

    results = _on_each_isa(run)
    y0, dx0, db0 = results["baseline"]
    for isa, (y, dx, db) in results.items():
        _assert_same(y, y0)
        _assert_same(dx, dx0)
        assert_bitwise_equal(db, db0)  # the same blocks summed in the same order by every build
        if dtype == torch.bfloat16:
            assert bool(torch.isnan(y).any())
            for t in (y, dx):
                assert bool((t.view(torch.int16)[torch.isnan(t)] == 0x7FC0).all()), isa


def test_long_forward_backward_equal_the_reference():
    """The builds agree with each other above; here with the contract, over
    rows of an odd length and several grains of the parallel loop."""
    x, bias, res, grad = make_inputs((41, 2053), torch.float32, seed=6)
    state = _state.make_state(torch.device("cpu"), 0.3, SEED, 2**32 + 5)
    ops = _ops.op_set("")
    expected = ref.fused_dropout(x, bias, res, SEED, 2**32 + 5, 0.3, "gelu")
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, 2**32 + 5, 0.3, "gelu", (), True)
    for isa, (y, dx) in _on_each_isa(lambda: (ops.forward(x, bias, res, state, "gelu", [])[0],
                                              ops.backward(grad, x, bias, state, "gelu", [], True)[0])).items():
        assert_bitwise_equal(y, expected)
        assert_bitwise_equal(dx, dx_ref)


# --- dropout_add_norm ---------------------------------------------------------------

NORM_EXTRAS = ("plain", "all", "fp32")


def _norm_inputs(dtype, H, extras):
    """(x, residual, weight, bias, grad, grad_h) for 23 rows of H: "plain" has
    no residual, weight, bias or grad_h; "all" has them in x's dtype; "fp32"
    has a float32 weight and bias and, for 16-bit x, residual_in_fp32."""
    rfp32 = extras == "fp32"
    h_dtype = torch.float32 if rfp32 and dtype in (torch.float16, torch.bfloat16) else dtype
    x, _, res, grad = make_inputs((23, H), dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    p_dtype = torch.float32 if rfp32 else dtype
    weight = (1 + torch.randn(H, generator=g) / 2).to(p_dtype)
    bias = torch.randn(H, generator=g).to(p_dtype)
    grad_h = torch.randn((23, H), generator=g).to(h_dtype)
    if extras == "plain":
        return x, None, None, None, grad, None, rfp32
    return x, res.to(h_dtype), weight, bias, grad, grad_h, rfp32


# (dtype, extras): "fp32" changes the kernels' types (a float32 h) for 16-bit
# inputs only; for float32 and float64 it is "all" with float32 parameters,
# which the glue converts before the kernels.
NORM_BUILD_CASES = [(dtype, extras) for dtype in (torch.float32, torch.float64) for extras in NORM_EXTRAS[:2]] + \
    [(dtype, extras) for dtype in (torch.bfloat16, torch.float16) for extras in NORM_EXTRAS]


# (norm, H): a row in one chunk and in many; the chunks' lane sums of a
# layer norm (the mean and the variance forward, two means backward) hold
# those of an RMS norm (one each).
NORM_ROWS = [("layer", 77), ("rms", 77), ("layer", 4097)]


@pytest.mark.parametrize("dtype,extras", NORM_BUILD_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("norm,H", NORM_ROWS)
def test_norm_forward_backward_equal_across_builds(dtype, norm, H, extras):
    """Rows of an odd length (rows and chunks start at every element of a
    Philox group): every build gives the same bits for every output of
    dropout_add_norm and its backward, row statistics and parameter
    gradients included (their sums use fixed lanes and blocks, not the
    vector width); h is fused_dropout's output bit for bit and the rest
    agrees with the reference."""
    x, res, weight, bias, grad, grad_h, rfp32 = _norm_inputs(dtype, H, extras)
    state = _state.make_state(torch.device("cpu"), 0.3, SEED, 2**32 + 5)
    ops = _ops.op_set("")
    mask = [True, True, weight is not None, True]

    def run():
        y, h, mean, rstd, _ = ops.norm(x, res, weight, bias, state, norm, 1e-5, rfp32)
        return (y, h, mean, rstd) + tuple(ops.norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, mask))

    results = _on_each_isa(run)
    base = results["baseline"]
    for isa, outs in results.items():
        for a, b in zip(outs, base):
            assert_bitwise_equal(a, b)
    y, h, mean, rstd, dx, dres, dw, db = base
    if res is None or res.dtype == x.dtype:
        assert_bitwise_equal(h, ops.forward(x, None, res, state, "identity", [])[0])
    ref_fwd = ref.dropout_add_norm(x, res, weight, bias, SEED, 2**32 + 5, 0.3, norm, 1e-5, rfp32)
    assert_bitwise_equal(h, ref_fwd[1])
    # The rest within the bounds of its error analysis (error_bounds.norm_bounds),
    # against the float64 values from h as stored.
    keep = ref.dropout_mask(x.shape, 0.3, SEED, 2**32 + 5)
    bounds = norm_bounds(h, weight, bias, grad, grad_h, norm, 1e-5, rstd.dtype, keep, 0.3)
    for name, actual in (("mean", mean), ("rstd", rstd), ("y", y), ("dh", dres), ("dx", dx)):
        check_bounded(actual, *bounds[name], rstd.dtype, name)
    check_norm_param_grads(dw if weight is not None else None, db if bias is not None else None, grad, h, mean,
                           rstd, norm)


def test_norm_parameter_gradients_same_for_any_thread_count():
    """The weight and bias gradients sum row blocks fixed by the shape, then
    the blocks in order: the same bits on one thread as on several."""
    x, res, weight, bias, grad, grad_h, _ = _norm_inputs(torch.float32, 77, "all")
    x, res, grad = (t.repeat(200, 1) for t in (x, res, grad))
    state = _state.make_state(torch.device("cpu"), 0.3, SEED, 0)
    ops = _ops.op_set("")
    y, h, mean, rstd, _ = ops.norm(x, res, weight, bias, state, "layer", 1e-5, False)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads.append(ops.norm_backward(grad, None, h, weight, mean, rstd, state, "layer", [False, False, True, True]))
    finally:
        torch.set_num_threads(before)
    for dw, db in (g[2:] for g in grads[1:]):
        assert_bitwise_equal(dw, grads[0][2])
        assert_bitwise_equal(db, grads[0][3])
