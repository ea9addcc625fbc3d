"""Every backend against the reference: one suite, parametrised by backend.

Masks, outputs and gradients equal ``dropout_ext.reference`` bit for bit
(float64 gelu, gelu_tanh and silu to rounding: they use the C library on each
side; bias gradients, which backends sum in different orders, within the
error bound of a sum: error_bounds.check_bias_grad; see docs/RNG.md), for
every dtype, activation, bias/residual combination, odd
shapes, p = 0 (keep all), p = 1 (drop all), p in between and at the
threshold's edges, no state (eval mode), seeds and offsets up to 2**64 - 1,
the generator's draws, strided and misaligned layouts, structured masks,
special values, the packed mask mode (``test_packed_*``), and through the op
family's autograd. Each backend is checked twice: its op family
directly (``dropout_ext._ops.op_set(prefix)`` with a dropout state
``[seed, offset, p bits]``) and through the public API (``backend=``).

The backends (the first word of every test id, and no test name holds one,
so ``-k <id>`` selects a backend's cases; ``-k cpu`` selects the cpu row and
the cpu_<isa> rows, ``-k "cpu and not cpu_"`` the cpu row alone):

=========== ============== ======== =========== ======================================
id          op prefix      device   backend=    runs
=========== ============== ======== =========== ======================================
cpu         ``""``         cpu      "cpu"       always (the compiled extension), on the
                                                instruction set in force (the best the
                                                CPU has, or DROPOUT_EXT_CPU_ISA's)
cpu_<isa>   ``""``         cpu      "cpu"       cpu_baseline, cpu_avx2, cpu_avx512 but
                                                the one the cpu row runs: the CPU
                                                kernels built for that instruction
                                                set, set around each test through the
                                                test hook; skipped where the CPU lacks it
reference   ``reference_`` cpu      "reference" always, in the tests of its op plumbing
                                                (state handling, layouts, autograd,
                                                opcheck) and of values that are not
                                                the reference's (Random123's known
                                                answers, the input at p = 0)
cuda_host   ``cuda_host_`` cpu      "cuda"      the CUDA kernels executed on the host;
                                                skipped while
                                                ``_ops.HAS_CUDA_HOST_KERNELS`` is False
triton      ``triton_``    cpu      "triton"    only with TRITON_INTERPRET=1, and then
                                                alone (run by test_triton_interpreter.py)
gpu_cuda    ``""``         cuda     "cuda"      with a CUDA build of torch; skipped
gpu_triton  ``triton_``    cuda     "triton"    without a GPU or the backend
=========== ============== ======== =========== ======================================

cuda_host and triton are slow (a host driver walking every block and thread;
Triton's interpreter), so they take smaller sets (``small=``): a case for
each kernel path (each kernel and its specialisations, full and partial
blocks, the bias-gradient kernels); so do the reference backend (its op
family checks only the op plumbing) and the cpu_<isa> rows (the cpu row runs
the full sets on the build in force; test_cpu_isa.py compares the builds
over long ranges and group numbers past 2**32); the GPU backends add large
shapes (``gpu=``). The reference row leaves the tests of values
(``reference_row=False``), where its op family would be held to the
functions it calls: the reference to itself.
"""

import itertools
import os
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropout_ext import _backend, _ops, _state
from dropout_ext import functional as F
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, check_contract, copies_made, make_inputs, requires_cuda
from error_bounds import check_bias_grad, check_sum, math_dtype

TRITON_MODE = os.environ.get("TRITON_INTERPRET") == "1"

ACTIVATIONS = list(ref.ACTIVATIONS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PS = [0.0, 0.1, 0.5, 0.9, 1.0]
EXTRAS = ["plain", "bias", "res", "bias+res"]
# A seed >= 2**63 (its sign bit reaches the key) and an offset > 2**32 (both
# counter words), for every test that does not choose its own.
SEED, OFFSET = 0xF123456789ABCDEF, 2**32 + 5


@dataclass(frozen=True)
class Backend:
    id: str
    prefix: str
    device: str
    public: str                     # the public API's backend= name that reaches this op family
    small: bool = False             # slow: smaller parameter sets
    float64: bool = True            # the op family takes float64
    isa: Optional[str] = None       # the CPU kernels' instruction set for the test (cpu_<isa> rows)
    marks: tuple = field(default=(), compare=False)

    def __str__(self):
        return self.id

    @property
    def ops(self) -> _ops.OpSet:
        return _ops.op_set(self.prefix)

    @property
    def dtypes(self):
        return [d for d in DTYPES if d != torch.float64 or self.float64]

    def state(self, p, seed=SEED, offset=OFFSET) -> torch.Tensor:
        return _state.make_state(torch.device(self.device), p, seed, offset)


CPU_ISAS = ("baseline", "avx2", "avx512")


def _cpu_isa_rows():
    """One row per build of the CPU kernels but the one the cpu row runs
    (its cases would repeat the cpu row's), each with the small sets;
    skipped, with the reason, where this CPU or build lacks it."""
    have = list(torch.ops.dropout_ext_testing.cpu_isas())
    in_force = torch.ops.dropout_ext_testing.cpu_isa("")
    rows = []
    for isa in CPU_ISAS:
        if isa == in_force:
            continue
        lacks = pytest.mark.skipif(
            isa not in have,
            reason=f"no {isa} build of the CPU kernels runs here (dropout_ext_testing.cpu_isas() is {have})")
        rows.append(Backend(f"cpu_{isa}", "", "cpu", "cpu", small=True, isa=isa, marks=(lacks,)))
    return rows


def _backends():
    if TRITON_MODE:
        return [Backend("triton", "triton_", "cpu", "triton", small=True, float64=False)]
    no_host = pytest.mark.skipif(
        not _ops.HAS_CUDA_HOST_KERNELS,
        reason="the CUDA kernels executed on the host are not built here "
               "(dropout_ext._ops.HAS_CUDA_HOST_KERNELS is False: cuda_host_fused_dropout has no CPU kernel)")
    # The reference backend checks the reference's op family (state, layout and
    # autograd plumbing) against its own functions: the small sets suffice.
    found = [Backend("cpu", "", "cpu", "cpu"), *_cpu_isa_rows(),
             Backend("reference", "reference_", "cpu", "reference", small=True),
             Backend("cuda_host", "cuda_host_", "cpu", "cuda", small=True, marks=(no_host,))]
    if torch.version.cuda:  # a CUDA build of torch: GPU cases, skipped (with the reason) without a GPU
        no_cuda = pytest.mark.skipif(not _ops.HAS_CUDA_KERNELS, reason="the extension has no CUDA kernels here")
        no_triton = pytest.mark.skipif(not _backend._HAS_TRITON, reason="Triton is not installed")
        found += [Backend("gpu_cuda", "", "cuda", "cuda", marks=(requires_cuda, no_cuda)),
                  Backend("gpu_triton", "triton_", "cuda", "triton", float64=False,
                          marks=(requires_cuda, no_triton))]
    return found


BACKENDS = _backends()


@pytest.fixture(autouse=True)
def _cpu_isa(request):
    """A cpu_<isa> row's test runs on that build of the CPU kernels; the
    build in force before comes back afterwards."""
    callspec = getattr(request.node, "callspec", None)
    b = callspec.params.get("b") if callspec is not None else None
    if not isinstance(b, Backend) or b.isa is None:
        yield
        return
    hook = torch.ops.dropout_ext_testing.cpu_isa
    previous = hook(b.isa)
    try:
        assert hook("") == b.isa
        yield
    finally:
        hook(previous)


def _id(value) -> str:
    """A shape as 2x3 (a 0-dim one as "scalar"), a case of several values
    as their ids joined by '-'."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple):
        if all(isinstance(v, int) for v in value):
            return "x".join(str(v) for v in value) or "scalar"
        return "-".join(_id(v) for v in value)
    return str(value)


def cases(small=None, gpu=None, reference_row=True, **axes):
    """``parametrize`` arguments: every backend times the product of
    ``axes``. Slow backends take ``small``'s values for the axes it names;
    GPU backends add ``gpu``'s values. A ``dtype`` axis leaves out the
    dtypes a backend does not take. ``reference_row=False`` leaves out the
    reference row: a test of values would hold the reference's op family to
    the functions it calls. Ids start with the backend's id."""
    params = []
    for b in BACKENDS:
        if b.id == "reference" and not reference_row:
            continue
        values = dict(axes)
        if b.small and small:
            values.update(small)
        if b.device == "cuda" and gpu:
            values = {k: list(v) + list(gpu.get(k, ())) for k, v in values.items()}
        if "dtype" in values:
            values["dtype"] = [d for d in values["dtype"] if d in b.dtypes]
        for combo in itertools.product(*values.values()):
            params.append(pytest.param(b, *combo, marks=b.marks, id="-".join([b.id] + [_id(v) for v in combo])))
    return ",".join(["b", *axes]), params


def public(b: Backend, monkeypatch, dtype=torch.float32) -> str:
    """The ``backend=`` name that reaches ``b``'s op family from the public API
    on ``b``'s device, checked to reach it. cuda_host is routed as
    DROPOUT_EXT_CUDA_INTERPRET=1 routes it (CUDA kernels for CPU tensors)."""
    if b.id == "cuda_host":
        monkeypatch.setattr(_backend, "_FAMILIES", _backend._families(cuda_interpret=True))
    reached = _backend.ops_for(b.public, torch.device(b.device), dtype)
    assert [o.name() for o in reached] == [o.name() for o in b.ops]
    return b.public


def _with(extras, bias, res):
    return (bias if "bias" in extras else None), (res if "res" in extras else None)


# --- masks --------------------------------------------------------------------

MASK_SHAPES = [(1,), (3,), (4,), (5,), (67,), (130,), (1000, 3), (3, 5, 7), (2, 3, 5, 7)]
WORDS = [(0, 0), (123, 5), (2**64 - 1, 2**63 + 7), (-1, 3), (SEED, OFFSET), (7, 2**32 - 1), (7, 2**64 - 1)]
# (p, seed, offset): the seed and offset words at one p inside (0, 1), where
# the words decide (other such p only move the threshold); p = 0 (keep all)
# and p = 1 (drop all) once, as their masks are the same for every word.
MASK_DRAWS = [(0.5, seed, offset) for seed, offset in WORDS] + [(0.0, SEED, OFFSET), (1.0, SEED, OFFSET)]


@pytest.mark.parametrize(*cases(shape=MASK_SHAPES, draw=MASK_DRAWS, reference_row=False,
                                small=dict(shape=[(5,), (130,), (3, 5, 7)]),
                                gpu=dict(shape=[(4097, 3), (257, 1024), (3, 1000, 777), (1 << 22,)])))
def test_mask(b, shape, draw, monkeypatch):
    p, seed, offset = draw
    expected = ref.dropout_mask(shape, p, seed, offset, device=b.device)
    mask = b.ops.mask(b.state(p, seed, offset), list(shape))
    assert mask.dtype == torch.bool and mask.device.type == b.device
    assert torch.equal(mask, expected)
    name = public(b, monkeypatch)
    assert torch.equal(F.dropout_mask(shape, p, seed, offset, device=b.device, backend=name), expected)


@pytest.mark.parametrize(*cases(lane=[0, 1, 2, 3]))
def test_mask_philox_known_answer_through_threshold(b, lane):
    """Seed 0, offset 0: element ``lane`` takes word ``lane`` of Random123's
    all-zero known answer, so it is kept at t == word and dropped at t == word + 1."""
    word = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8][lane]
    assert bool(b.ops.mask(b.state(word / 2**32, 0, 0), [4])[lane])
    assert not bool(b.ops.mask(b.state((word + 1) / 2**32, 0, 0), [4])[lane])


if not TRITON_MODE:
    def test_philox_known_answers():
        # Random123 kat_vectors: counter and key all zero, and all ones.
        z = torch.zeros(1, dtype=torch.int64)
        assert [int(w) for w in ref.philox4x32_10(z, z, z, z, 0, 0)] == \
            [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
        f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
        assert [int(w) for w in ref.philox4x32_10(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == \
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


# --- forward and backward: the matrix ----------------------------------------

SHAPES = [(1,), (3,), (67,), (5, 7), (33, 65), (2, 3, 129), (4, 1, 1025)]
# (shape, extras): the cpu row takes every shape with every combination of
# companions (each a loop of its own, with the shape's tails and rows). The
# slow backends' kernel paths are those of a row length that is a multiple
# of 4 or not, with a bias or not: a bias gradient over rows of 40 takes the
# bias-gradient kernels with aligned rows (Triton's row kernel, with full and
# partial blocks of columns and rows; the CUDA kernels' vector path), over
# rows of 13 the others (Triton's flat kernel, whose bias index wraps within
# a block; the CUDA scalar path); without a bias the row length changes no
# path.
MATRIX_CASES = [(shape, extras) for shape in SHAPES for extras in EXTRAS]
SMALL_MATRIX_CASES = [((5, 13), "plain"), ((5, 40), "res"), ((5, 13), "bias"), ((5, 40), "bias+res")]


# One p inside (0, 1): others take the same path with another threshold and
# scale. p = 0 (keep all) and p = 1 (drop all), with every dtype, activation
# and companion: test_edge_p.
@pytest.mark.parametrize(*cases(dtype=DTYPES, case=MATRIX_CASES, p=[0.3], activation=ACTIVATIONS, reference_row=False,
                                small=dict(case=SMALL_MATRIX_CASES),
                                gpu=dict(case=[(shape, extras) for shape in [(513, 1024), (2, 3, 4099)]
                                               for extras in EXTRAS])))
def test_forward_backward(b, dtype, case, p, activation):
    """The matrix."""
    shape, extras = case
    x, bias, res, grad = make_inputs(shape, dtype, device=b.device)
    bias, res = _with(extras, bias, res)
    state = b.state(p)
    y = b.ops.forward(x, bias, res, state, activation, [])[0]
    check_contract(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, p, activation), dtype, activation)
    dx, db = b.ops.backward(grad, x, bias, state, activation, [], bias is not None)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, p, activation, (), bias is not None)
    check_contract(dx, dx_ref, dtype, activation)
    if bias is not None:
        check_bias_grad(db, grad, x, bias, SEED, OFFSET, p, activation)
    else:
        assert db.shape == (0,)


# The autograd plumbing has two paths: identity's backward needs neither the
# input nor the bias, the other activations' need both (csrc/autograd.cpp).
AUTOGRAD_ACTIVATIONS = ["identity", "gelu"]


# The slow backends: a 32-bit and a 16-bit dtype (every dtype's kernels:
# test_forward_backward).
@pytest.mark.parametrize(*cases(dtype=DTYPES, activation=AUTOGRAD_ACTIVATIONS, extras=EXTRAS,
                                small=dict(dtype=[torch.float32, torch.bfloat16])))
def test_public_api(b, dtype, activation, extras, monkeypatch):
    """F.fused_dropout / F.dropout with backend= and seed=: the reference's
    outputs, and its gradients through autograd."""
    shape = (6, 37)
    x, bias, res, grad = make_inputs(shape, dtype, seed=1, device=b.device)
    bias, res = _with(extras, bias, res)
    name = public(b, monkeypatch, dtype)
    xr = x.clone().requires_grad_()
    br = bias.clone().requires_grad_() if bias is not None else None
    rr = res.clone().requires_grad_() if res is not None else None
    y = F.fused_dropout(xr, 0.3, bias=br, activation=activation, residual=rr, seed=SEED, offset=OFFSET,
                        backend=name)
    check_contract(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.3, activation), dtype, activation)
    y.backward(grad)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.3, activation, (), bias is not None)
    check_contract(xr.grad, dx_ref, dtype, activation)
    if br is not None:
        check_bias_grad(br.grad, grad, x, bias, SEED, OFFSET, 0.3, activation)
    if rr is not None:
        assert_bitwise_equal(rr.grad, grad)
    if extras == "plain" and activation == "identity":
        assert_bitwise_equal(F.dropout(x, 0.3, seed=SEED, offset=OFFSET, backend=name),
                             ref.fused_dropout(x, None, None, SEED, OFFSET, 0.3))


@pytest.mark.parametrize(*cases(n=list(range(1, 68)), reference_row=False,
                                small=dict(n=list(range(1, 18)) + [31, 32, 33, 63, 64, 65, 67])))
def test_every_size_around_vector_widths(b, n, monkeypatch):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(b.device).requires_grad_()
    y = F.fused_dropout(x, 0.5, activation="silu", seed=n, backend=public(b, monkeypatch))
    xd = x.detach()
    assert_bitwise_equal(y, ref.fused_dropout(xd, None, None, n, 0, 0.5, "silu"))
    g = torch.randn(n, generator=torch.Generator().manual_seed(-n)).to(b.device)
    y.backward(g)
    assert_bitwise_equal(x.grad, ref.fused_dropout_backward(g, xd, None, n, 0, 0.5, "silu")[0])


# --- seeds, offsets and the generator -------------------------------------------

@pytest.mark.parametrize(*cases(words=[(0, 0), (2**63, 0), (2**64 - 1, 2**64 - 1), (-1, 2**63 + 7),
                                       (-(2**63), -1), (SEED, OFFSET)]))
def test_seed_and_offset_words(b, words, monkeypatch):
    """seed= and offset= anywhere in [-2**63, 2**64): negative values are
    taken modulo 2**64, as the contract keys on unsigned words."""
    seed, offset = words
    x = torch.randn(5, 67, generator=torch.Generator().manual_seed(2)).to(b.device)
    name = public(b, monkeypatch)
    useed, uoffset = seed % 2**64, offset % 2**64
    assert_bitwise_equal(F.dropout(x, 0.5, seed=seed, offset=offset, backend=name),
                         ref.fused_dropout(x, None, None, useed, uoffset, 0.5))
    assert torch.equal(F.dropout_mask(x.shape, 0.5, seed, offset, device=b.device, backend=name),
                       ref.dropout_mask(x.shape, 0.5, useed, uoffset, device=b.device))


def _manual_seed(device, seed):
    if device == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@pytest.mark.parametrize(*cases(reference_row=False))
def test_draws_from_the_generator(b, monkeypatch):
    """Without seed=, (seed, offset) comes from the device's generator: the
    same generator state gives the reference backend's masks and gradients."""
    name = public(b, monkeypatch)
    x = torch.randn(16, 65, generator=torch.Generator().manual_seed(3)).to(b.device)
    bias = torch.randn(65, generator=torch.Generator().manual_seed(4)).to(b.device)
    results = []
    for backend in (name, "reference"):
        _manual_seed(b.device, 1234)
        plain = F.dropout(x, 0.5, backend=backend)
        gen = torch.Generator(device=b.device).manual_seed(4)
        xr, br = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = F.fused_dropout(xr, 0.2, bias=br, activation="gelu", generator=gen, backend=backend)
        y.backward(torch.ones_like(y))
        results.append((plain, y.detach(), xr.grad, br.grad))
    (plain, y, dx, db), (plain_ref, y_ref, dx_ref, db_ref) = results
    assert_bitwise_equal(plain, plain_ref)
    assert_bitwise_equal(y, y_ref)
    assert_bitwise_equal(dx, dx_ref)
    check_sum(db, dx.reshape(-1, x.shape[-1]), "bias gradient")  # float32: dx is the unrounded terms
    assert 0.4 < (plain == 0).float().mean().item() < 0.6


@pytest.mark.parametrize(*cases())
def test_an_empty_forward_returns_the_state_it_drew(b):
    """A forward given p draws its state and returns it even with no element
    to launch for (the CUDA kernels store a drawn state from their first
    thread): the words of ``draw_state`` for the same generator state, and
    the generator moves on as for any call."""
    def drawn(call):
        gen = torch.Generator(device=b.device).manual_seed(11)
        state = call(gen)
        return state, torch.ops.dropout_ext.draw_state(torch.empty(0, device=b.device), 0.5, gen)

    def expected():
        gen = torch.Generator(device=b.device).manual_seed(11)
        like = torch.empty(0, device=b.device)
        return [torch.ops.dropout_ext.draw_state(like, 0.5, gen) for _ in range(2)]

    for shape in [(0,), (0, 8)]:
        x = torch.empty(shape, device=b.device)
        forward = drawn(lambda gen: b.ops.forward(x, None, None, None, "identity", [], None, False, 0.5, gen)[2])
        assert_bitwise_equal(torch.stack(forward), torch.stack(expected()))
    norm = drawn(lambda gen: b.ops.norm(torch.empty(0, 8, device=b.device), None, None, None, None, "layer", 1e-5,
                                        False, 0.5, gen)[4])
    assert_bitwise_equal(torch.stack(norm), torch.stack(expected()))


# --- p == 0 and no state ----------------------------------------------------------

def _special_values(dtype, device, repeat=16):
    info = torch.finfo(dtype)
    values = [float("nan"), float("inf"), -float("inf"), info.max, -info.max, info.tiny / 4, -info.tiny / 2,
              info.tiny, 0.0, -0.0, 1.0, -2.5, 7.0, 1e-40, -3.0e38, 65504.0]
    return torch.tensor(values * repeat, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize(*cases(dtype=DTYPES))
def test_p0_gives_the_input_bitwise(b, dtype, monkeypatch):
    """p == 0 through the op (a state with p = 0, or no state at all) keeps
    every element unscaled: the input's bits, -0.0, subnormals, Inf and NaN
    included; the public API returns the input itself."""
    x = _special_values(dtype, b.device)
    for state in (b.state(0.0), None):
        assert_bitwise_equal(b.ops.forward(x, None, None, state, "identity", [])[0], x)
        assert_bitwise_equal(b.ops.forward(x.view(16, 16), None, None, state, "identity", [16, 1])[0], x.view(16, 16))
        dx, db = b.ops.backward(x, None, None, state, "identity", [], False)
        assert_bitwise_equal(dx, x)
        assert db.shape == (0,)
    assert bool(b.ops.mask(b.state(0.0), [37]).all())
    name = public(b, monkeypatch, dtype)
    assert F.dropout(x, 0.0, backend=name) is x
    assert F.dropout(x, 0.5, training=False, backend=name) is x


@pytest.mark.parametrize(*cases(dtype=DTYPES, activation=ACTIVATIONS, extras=EXTRAS, reference_row=False,
                                small=dict(activation=["identity", "relu", "gelu"])))
def test_edge_p(b, dtype, activation, extras, monkeypatch):
    """No state (eval mode: residual + act(x + bias), the reference at p = 0),
    a state with p = 0 (every element kept, scale 1) and one with p = 1
    (every element dropped), forward and backward; the public API's eval
    mode takes the no-state path."""
    shape = (5, 13)
    x, bias, res, grad = make_inputs(shape, dtype, seed=2, device=b.device)
    bias, res = _with(extras, bias, res)
    for state, (seed, offset, p) in [(None, (0, 0, 0.0)), (b.state(0.0), (SEED, OFFSET, 0.0)),
                                     (b.state(1.0), (SEED, OFFSET, 1.0))]:
        expected = ref.fused_dropout(x, bias, res, seed, offset, p, activation)
        check_contract(b.ops.forward(x, bias, res, state, activation, [])[0], expected, dtype, activation)
        dx, db = b.ops.backward(grad, x, bias, state, activation, [], bias is not None)
        dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, seed, offset, p, activation, (),
                                                    bias is not None)
        check_contract(dx, dx_ref, dtype, activation)
        if bias is not None:
            check_bias_grad(db, grad, x, bias, seed, offset, p, activation)
    name = public(b, monkeypatch, dtype)
    y = F.fused_dropout(x, 0.5, bias=bias, residual=res, activation=activation, training=False, backend=name)
    check_contract(y, ref.fused_dropout(x, bias, res, 0, 0, 0.0, activation), dtype, activation)


@pytest.mark.parametrize(*cases(p=[-0.0, 2**-40, 2**-32, 3 * 2**-33, 0.5 + 2**-40, 1 - 2**-32, 1 - 2**-53]))
def test_extreme_p(b, p, monkeypatch):
    """p at the edges of the threshold's arithmetic (t = floor(p * 2**32) in
    double, scale = 1/(1 - p) rounded once): -0.0, p so small that t is 0 or 1,
    and so close to 1 that only the largest words are kept with a huge scale."""
    x, bias, res, grad = make_inputs((5, 40), torch.float32, seed=6, device=b.device)
    state = b.state(p)
    check = dict(dtype=torch.float32, activation="gelu")
    check_contract(b.ops.forward(x, bias, res, state, "gelu", [])[0],
                   ref.fused_dropout(x, bias, res, SEED, OFFSET, p, "gelu"), **check)
    dx, db = b.ops.backward(grad, x, bias, state, "gelu", [], True)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, p, "gelu", (), True)
    check_contract(dx, dx_ref, **check)
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, p, "gelu")
    assert torch.equal(b.ops.mask(state, [4096]), ref.dropout_mask((4096,), p, SEED, OFFSET, device=b.device))
    y = F.dropout(x, p, seed=SEED, offset=OFFSET, backend=public(b, monkeypatch))
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, SEED, OFFSET, p))


# --- special values -----------------------------------------------------------

def _replaced(x, p, activation, grad=None):
    """The value a dropped element replaces: act(x) * scale forward,
    grad * scale * act'(x) backward, in the math type (docs/RNG.md)."""
    acc = math_dtype(x.dtype)
    v, scale = x.to(acc), (1.0 / (1.0 - p) if p < 1.0 else 0.0)
    if grad is None:
        return ref.activation_forward(v, activation) * scale
    gs = grad.to(acc) * scale
    if activation == "identity":
        return gs
    if activation == "relu":
        return torch.where(v > 0, gs, torch.zeros_like(gs))
    return gs * ref.activation_grad(v, activation)


def check_special(actual, expected, replaced, dtype, activation):
    """The contract with NaN and Inf about: where the replaced value is NaN a
    kept element is NaN and a dropped one a zero of either sign (its sign is
    not part of the contract); everywhere else check_contract."""
    loose = torch.isnan(replaced)
    a, e = actual[loose], expected[loose]
    assert torch.equal(torch.isnan(a), torch.isnan(e))
    assert torch.equal(a == 0, e == 0)
    check_contract(actual[~loose], expected[~loose], dtype, activation)


@pytest.mark.parametrize(*cases(dtype=DTYPES, p=[0.0, 0.5, 1.0], activation=ACTIVATIONS, reference_row=False))
def test_special_values(b, dtype, p, activation):
    x = _special_values(dtype, b.device)
    grad = x.flip(0)
    state = b.state(p)
    y = b.ops.forward(x, None, None, state, activation, [])[0]
    expected = ref.fused_dropout(x, None, None, SEED, OFFSET, p, activation)
    check_special(y, expected, _replaced(x, p, activation), dtype, activation)
    dx, _ = b.ops.backward(grad, x, None, state, activation, [], False)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, None, SEED, OFFSET, p, activation)
    check_special(dx, dx_ref, _replaced(x, p, activation, grad), dtype, activation)
    if activation == "identity" and 0.0 < p < 1.0:
        # kept: nn.Dropout's arithmetic exactly (max * scale overflows to Inf
        # as it does there); dropped: a zero, also for NaN and Inf
        keep = ref.dropout_mask(x.shape, p, SEED, OFFSET, device=b.device)
        native = torch.ops.aten.native_dropout_backward(x, keep, 1.0 / (1.0 - p))
        assert_bitwise_equal(y[keep], native[keep])
        assert bool((y[~keep] == 0).all())
        big = keep & (x == torch.finfo(dtype).max)
        assert bool(big.any()) and bool(torch.isinf(y[big]).all())


# --- layouts ------------------------------------------------------------------

LAYOUTS = ["transposed", "sliced", "channels_last", "channels_last_3d", "expanded", "size1", "misaligned",
           "storage_offset", "inner_stride", "row_slice", "row_chunk", "row_unaligned", "row_stride_24", "row_wide"]
# The glue of every op family makes the inputs contiguous, or reads their rows
# where they lie (the GPU kernels, where the rows are evenly spaced whole
# units: op_common.h row_stride), and gives the output the input's memory
# format, in code shared with the cpu row (the C++ glue) or of a backend's
# own (Python): the slow backends take one layout that is not contiguous, one
# that is contiguous but misaligned (the kernels' vector paths ask for
# alignment), and three whose rows the GPU kernels read in place: rows
# shorter and longer than the interpreter's blocks, and rows that start off
# a 16-byte boundary in bfloat16 (the scalar paths).
SMALL_LAYOUTS = ["transposed", "misaligned", "row_slice", "row_chunk", "row_unaligned"]


def _layout(kind, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, 5, 7, generator=g).to(dtype).to(device)
    if kind == "transposed":
        return base.transpose(1, 3)
    if kind == "sliced":
        return base[:, ::2, 1:, ::3]
    if kind == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_3d":
        return base.view(2, 2, 6, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    if kind == "expanded":
        return base[:, :1].expand(4, 6, 5, 7)
    if kind == "size1":
        return base[:, :1]
    if kind == "misaligned":  # one element past an aligned start: no vector access is aligned
        flat = torch.randn(1 + 4 * 6 * 35, generator=g).to(dtype).to(device)
        return flat[1:].view(4, 6, 35)
    if kind == "storage_offset":
        return base.flatten()[3:][: 6 * 5 * 7].view(6, 5, 7)
    if kind == "inner_stride":
        return base[..., ::2]
    if kind == "row_slice":  # rows of 8, 16 apart
        return torch.randn(4, 6, 5, 16, generator=g).to(dtype).to(device)[..., 8:]
    if kind == "row_chunk":  # rows of 64, 192 apart (qkv.chunk(3, -1)[1])
        return torch.randn(3, 5, 192, generator=g).to(dtype).to(device).chunk(3, -1)[1]
    if kind == "row_unaligned":  # rows of 8, 16 apart, from element 4 (8 bytes in bfloat16)
        return torch.randn(4, 6, 5, 16, generator=g).to(dtype).to(device)[..., 4:12]
    if kind == "row_stride_24":  # a stride that a launch does not specialise as a multiple of 16
        return torch.randn(4, 6, 5, 24, generator=g).to(dtype).to(device)[..., 8:16]
    if kind == "row_wide":  # rows longer than a compiled program's block
        return torch.randn(3, 2, 2 * 8192, generator=g).to(dtype).to(device)[..., 8192:]
    raise AssertionError(kind)


@pytest.mark.parametrize(*cases(layout=LAYOUTS, dtype=[torch.float32, torch.bfloat16], activation=["gelu"],
                                small=dict(layout=SMALL_LAYOUTS)))
def test_layouts_through_the_op(b, layout, dtype, activation):
    """Strided input and residual, a gradient in yet another layout: the
    reference's values, in the input's (gradient's) memory format. (gelu's
    backward reads the input: identity's reads only the gradient.)"""
    x = _layout(layout, dtype, b.device, 1)
    res = _layout(layout, dtype, b.device, 2)
    bias = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(3)).to(dtype).to(b.device)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype).to(b.device)
    grad = grad.transpose(0, -1).contiguous().transpose(0, -1)
    xc, rc, gc = x.contiguous(), res.contiguous(), grad.contiguous()
    state = b.state(0.3)
    y = b.ops.forward(x, bias, res, state, activation, [])[0]
    assert y.stride() == torch.empty_like(x).stride()
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(xc, bias, rc, SEED, OFFSET, 0.3, activation))
    dx, db = b.ops.backward(grad, x, bias, state, activation, [], True)
    assert dx.stride() == torch.empty_like(grad).stride()
    dx_ref, db_ref = ref.fused_dropout_backward(gc, xc, bias, SEED, OFFSET, 0.3, activation, (), True)
    assert_bitwise_equal(dx.contiguous(), dx_ref)
    check_bias_grad(db, gc, xc, bias, SEED, OFFSET, 0.3, activation)


@pytest.mark.parametrize(*cases(layout=LAYOUTS, activation=AUTOGRAD_ACTIVATIONS,
                                small=dict(layout=SMALL_LAYOUTS, activation=["gelu"])))
def test_layouts_through_autograd(b, layout, activation, monkeypatch):
    x = _layout(layout, torch.float32, b.device, 5).requires_grad_()
    bias = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(6)).to(b.device).requires_grad_()
    y = F.fused_dropout(x, 0.3, bias=bias, activation=activation, seed=11, backend=public(b, monkeypatch))
    assert y.stride() == torch.empty_like(x).stride()
    xc, bd = x.detach().contiguous(), bias.detach()
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(xc, bd, None, 11, 0, 0.3, activation))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(b.device)
    y.backward(g)
    dx, db = ref.fused_dropout_backward(g, xc, bd, 11, 0, 0.3, activation, (), True)
    if layout != "expanded":  # an expanded leaf's gradient is summed over the broadcast
        assert_bitwise_equal(x.grad.contiguous(), dx)
    check_bias_grad(bias.grad, g, xc, bd, 11, 0, 0.3, activation)


@pytest.mark.parametrize("sizes,strides,expected", [
    ((6, 8), (8, 1), 8),                 # row-major
    ((6, 8), (24, 1), 24),               # a chunk of a 24-wide last dimension
    ((2, 3, 8), (72, 24, 1), 24),        # outer dimensions that continue one another
    ((2, 3, 8), (96, 24, 1), -1),        # ... and ones that do not
    ((2, 1, 3, 8), (72, 5, 24, 1), 24),  # a size-1 dimension's stride is never used
    ((6, 8), (0, 1), -1),                # expanded: one row read six times
    ((6, 8), (4, 1), -1),                # overlapping rows
    ((6, 6), (24, 1), -1),               # a row not a whole number of units
    ((6, 8), (26, 1), -1),               # rows not starting a unit
    ((6, 8), (24, 2), -1),               # a stride inside the row
    ((6, 1), (8, 3), -1),                # rows of one element, 8 apart
    ((1, 8), (99, 1), 8),                # one row
    ((8,), (1,), 8), ((8,), (2,), -1), ((), (), 1),
])
def test_row_stride_rule(sizes, strides, expected):
    """Which layouts the GPU kernels read in place (csrc/op_common.h,
    row_stride, 16-byte units of 4 elements here): the row stride, or -1
    for a tensor they copy row-major first."""
    assert torch.ops.dropout_ext.row_stride(list(sizes), list(strides), 4) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [pytest.param(b, marks=b.marks, id=b.id) for b in BACKENDS if b.public in
                               ("cuda", "triton")])
def test_gpu_kernels_read_rows_in_place(b, dtype):
    """A chunk of a wider last dimension costs the GPU kernels' glue no copy,
    in or out: input, residual and gradient so laid out copy what row-major
    ones copy, through the forward and both backward kernels, with the same
    bits out. A transposed tensor, whose rows are not contiguous, is copied
    (the probe sees it)."""
    state = b.state(0.3)

    def calls(kind, row_major=False):
        x, res, grad = (_layout(kind, dtype, b.device, seed) for seed in (1, 2, 4))
        if row_major:
            x, res, grad = x.contiguous(), res.contiguous(), grad.contiguous()
        bias = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(3)).to(dtype).to(b.device)
        return lambda: (b.ops.forward(x, bias, res, state, "gelu", [])[0],
                        *b.ops.backward(grad, x, bias, state, "gelu", [], True),
                        b.ops.backward(grad, x, bias, state, "gelu", [], False)[0])

    expected, row_major = copies_made(calls("row_chunk", row_major=True))
    outputs, copies = copies_made(calls("row_chunk"))
    assert copies == row_major
    for out, want in zip(outputs, expected):
        assert out.is_contiguous()
        assert_bitwise_equal(out, want)
    assert copies_made(calls("transposed"))[1] > copies_made(calls("transposed", row_major=True))[1]


# --- structured masks ---------------------------------------------------------

MASK_OF = [(4, 6, 1, 1), (1, 6, 5, 1), (4, 1, 5, 7), (1, 1, 1, 7), (1, 1, 1, 1), (4, 6, 5, 7)]
# (activation, dtype): where a structured mask's keep bits come from does not
# depend on either, so each dtype once, with an activation each.
STRUCTURED_VALUES = [("identity", torch.float32), ("silu", torch.bfloat16), ("gelu_tanh", torch.float16)]


# The slow backends: the mask broadcast along the rows' last dimension or
# along the others (its stride along a row 0 or 1).
@pytest.mark.parametrize(*cases(mask_shape=MASK_OF, case=STRUCTURED_VALUES, reference_row=False,
                                small=dict(mask_shape=[(4, 6, 1, 1), (1, 1, 1, 7)], case=STRUCTURED_VALUES[:2])))
def test_structured_masks(b, mask_shape, case, monkeypatch):
    """mask_shape: the reference's values, and the applied mask is exactly
    dropout_mask(mask_shape) broadcast to the input; 16-bit dtypes with their
    bias gradients too."""
    activation, dtype = case
    shape = (4, 6, 5, 7)
    x, bias, res, grad = make_inputs(shape, dtype, seed=3, device=b.device)
    state, ms = b.state(0.4), list(mask_shape)
    expected = ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.4, activation, mask_shape)
    assert_bitwise_equal(b.ops.forward(x, bias, res, state, activation, ms)[0], expected)
    keep = ref.dropout_mask(mask_shape, 0.4, SEED, OFFSET, device=b.device).expand(shape)
    plain = b.ops.forward(x, None, None, state, "identity", ms)[0]
    assert torch.equal(plain != 0, keep & (x != 0))
    dx, db = b.ops.backward(grad, x, bias, state, activation, ms, True)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.4, activation, mask_shape, True)
    assert_bitwise_equal(dx, dx_ref)
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.4, activation, mask_shape)
    name = public(b, monkeypatch)
    y = F.fused_dropout(x, 0.4, bias=bias, residual=res, activation=activation, seed=SEED, offset=OFFSET,
                        mask_shape=mask_shape, backend=name)
    assert_bitwise_equal(y, expected)
    if mask_shape == (4, 6, 1, 1):
        assert_bitwise_equal(F.dropout2d(x, 0.4, seed=SEED, offset=OFFSET, backend=name),
                             ref.fused_dropout(x, None, None, SEED, OFFSET, 0.4, "identity", mask_shape))


# --- edge shapes ----------------------------------------------------------------

@pytest.mark.parametrize(*cases())
def test_empty_and_zero_dim(b, monkeypatch):
    state = b.state(0.5)
    for shape in [(0,), (3, 0), (0, 5), (2, 0, 3)]:
        x = torch.randn(shape, device=b.device)
        y = b.ops.forward(x, None, None, state, "gelu", [])[0]
        assert y.shape == x.shape and y.dtype == x.dtype
        assert b.ops.mask(state, list(shape)).shape == shape
        if shape[-1]:
            bias = torch.randn(shape[-1], device=b.device)
            assert b.ops.forward(x, bias, x, state, "silu", [])[0].shape == shape
            dx, db = b.ops.backward(x, x, bias, state, "silu", [], True)
            assert dx.shape == shape and torch.equal(db, torch.zeros_like(bias))
    x = torch.tensor(2.5, device=b.device)
    assert_bitwise_equal(b.ops.forward(x, None, None, state, "identity", [])[0],
                         ref.fused_dropout(x, None, None, SEED, OFFSET, 0.5))
    assert_bitwise_equal(b.ops.backward(x, x, None, state, "relu", [], False)[0],
                         ref.fused_dropout_backward(x, x, None, SEED, OFFSET, 0.5, "relu")[0])
    assert b.ops.mask(state, []).shape == ()
    name = public(b, monkeypatch)
    for x in (torch.randn(0), torch.randn(2, 0, 3), torch.tensor(1.5)):
        x = x.to(b.device)
        assert_bitwise_equal(F.dropout(x, 0.5, seed=3, backend=name), ref.fused_dropout(x, None, None, 3, 0, 0.5))
    y = F.fused_dropout(torch.randn(0, 4, device=b.device), 0.5, bias=torch.randn(4, device=b.device),
                        activation="gelu", backend=name)
    assert y.shape == (0, 4)


# --- the op family's autograd ------------------------------------------------------

NEEDS = ["x", "bias", "res", "x+bias+res", "x,no bias"]


@pytest.mark.parametrize(*cases(activation=AUTOGRAD_ACTIVATIONS, needs=NEEDS, mask_shape=[(), (5, 1)],
                                small=dict(mask_shape=[(5, 1)])))
def test_op_autograd(b, activation, needs, mask_shape):
    """torch.autograd through the backend's op family gives the reference
    functions' output and gradients, for each subset of inputs that requires
    grad; double backward for plain dropout."""
    x, bias, res, g = make_inputs((5, 12), torch.float32, seed=4, device=b.device)
    if needs == "x,no bias":
        bias = None
    leaves = {"x": x, "bias": bias, "res": res}
    wanted = [k for k in ("x", "bias", "res") if k in needs.split(",")[0].split("+")]
    state = b.state(0.25)

    def grads(ops):
        inputs = {k: (v.clone().requires_grad_(k in wanted) if v is not None else None) for k, v in leaves.items()}
        y = ops.forward(inputs["x"], inputs["bias"], inputs["res"], state, activation, list(mask_shape))[0]
        return y, torch.autograd.grad(y, [inputs[k] for k in wanted], g)

    y, got = grads(b.ops)
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.25, activation, mask_shape))
    dx_ref, db_ref = ref.fused_dropout_backward(g, x, bias, SEED, OFFSET, 0.25, activation, mask_shape,
                                                bias is not None)
    for name, a in zip(wanted, got):
        if name == "bias":
            check_bias_grad(a, g, x, bias, SEED, OFFSET, 0.25, activation, mask_shape)
        else:
            assert_bitwise_equal(a, dx_ref if name == "x" else g)
    if needs == "x,no bias" and activation == "identity":
        xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
        (gx,) = torch.autograd.grad(b.ops.forward(xr, None, None, state, "identity", list(mask_shape))[0], xr, gr,
                                    create_graph=True)
        h = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(b.device)
        (ggrad,) = torch.autograd.grad(gx, gr, h)
        assert_bitwise_equal(ggrad, ref.fused_dropout(h, None, None, SEED, OFFSET, 0.25, "identity", mask_shape))


@pytest.mark.parametrize(*cases(activation=["identity", "gelu"]))
def test_opcheck(b, activation):
    """torch.library.opcheck on the op family: schema, fake kernel, autograd
    registration, AOT dispatch. Under Triton's interpreter only the schema and
    autograd registration are checked (it runs kernels on real data; the fake
    and compile checks of the Triton ops run on a GPU)."""
    utils = ("test_schema", "test_autograd_registration") if b.id == "triton" else None
    kw = {"test_utils": utils} if utils else {}
    x, bias, res, _ = make_inputs((3, 8), torch.float32, device=b.device)
    state = b.state(0.5)
    fwd, bwd, mask = b.ops.forward, b.ops.backward, b.ops.mask
    torch.library.opcheck(fwd, (x, bias, res, state, activation, []), **kw)
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), bias.clone().requires_grad_(), res, state,
                                activation, []), **kw)
    torch.library.opcheck(fwd, (x, bias, None, None, activation, []), **kw)
    torch.library.opcheck(fwd, (x, None, res, state, activation, [3, 1]), **kw)
    torch.library.opcheck(bwd, (res, x, bias, state, activation, [], True), **kw)
    torch.library.opcheck(bwd, (res, x, None, state, activation, [1, 8], False), **kw)
    torch.library.opcheck(mask, (state, [3, 5]), **kw)


# --- properties (hypothesis) ------------------------------------------------------

@st.composite
def _random_case(draw, dtypes):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(rank))
    return dict(shape=shape, dtype=draw(st.sampled_from(dtypes)), p=draw(st.sampled_from(PS)),
                activation=draw(st.sampled_from(ACTIVATIONS)), bias=draw(st.booleans()),
                residual=draw(st.booleans()), transpose=draw(st.booleans()) and rank >= 2,
                broadcast=[draw(st.booleans()) for _ in range(rank)] if draw(st.booleans()) else None,
                seed=draw(st.integers(-(2**63), 2**64 - 1)), offset=draw(st.integers(0, 2**64 - 1)))


@pytest.mark.parametrize(*cases(reference_row=False))
def test_property_equals_reference(b):
    """Random shapes (zero sizes included), dtypes, p, activations, companions,
    transposes, structured masks, seeds and offsets: forward and backward."""

    @settings(max_examples=40 if b.small else 300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_random_case(b.dtypes))
    def check(case):
        g = torch.Generator().manual_seed(0)
        dtype, p, act = case["dtype"], case["p"], case["activation"]
        x = (torch.randn(case["shape"], generator=g) * 3).to(dtype).to(b.device)
        if case["transpose"]:
            x = x.transpose(0, -1)
        bias = torch.randn(x.shape[-1], generator=g).to(dtype).to(b.device) if case["bias"] else None
        res = torch.randn(x.shape, generator=g).to(dtype).to(b.device) if case["residual"] else None
        grad = torch.randn(x.shape, generator=g).to(dtype).to(b.device)
        mshape = [1 if one else s for one, s in zip(case["broadcast"], x.shape)] if case["broadcast"] else []
        seed, offset = case["seed"] % 2**64, case["offset"]
        state = b.state(p, case["seed"], offset)
        xc = x.contiguous()
        y = b.ops.forward(x, bias, res, state, act, mshape)[0]
        check_contract(y.contiguous(), ref.fused_dropout(xc, bias, res, seed, offset, p, act, mshape), dtype, act)
        dx, db = b.ops.backward(grad, x, bias, state, act, mshape, bias is not None)
        dx_ref, db_ref = ref.fused_dropout_backward(grad, xc, bias, seed, offset, p, act, mshape, bias is not None)
        check_contract(dx.contiguous(), dx_ref, dtype, act)
        if bias is not None:
            check_bias_grad(db, grad, xc, bias, seed, offset, p, act, mshape)

    check()


# --- the packed mask mode ---------------------------------------------------------
# pack_mask=True also returns the keep mask, 8 elements per byte (element i at
# bit i % 8 of byte i // 8, zeros past the end: reference.pack_bits);
# mask_bits= is read instead of drawing the mask again (docs/RNG.md). Sizes
# around a byte (1, 7, 9), a partial last byte after many full ones (4097),
# and rows whose length is no multiple of 8 (13, 12, 20, 9), so rows start
# mid-byte for the bias gradient.
#
# The bits depend on the shape, p, seed and offset alone. What packs and
# reads them does not depend on the activation, nor on the companions but
# through the bias (the CPU kernel's chunks end at each row with a bias; the
# CUDA pack step finds each unit's bias column). So each shape takes one
# activation and companions. Every dtype takes every case, each activation
# packs with and without a bias and reads: every instance of the CPU and
# CUDA kernels (a dtype and an activation, with a bias or not) packs, and
# each reads. The slow backends' first five hold every activation and
# companion.

# (shape, activation, extras)
PACKED_CASES = [((1,), "identity", "plain"), ((7,), "relu", "res"), ((9,), "gelu", "bias"),
                ((3, 12), "silu", "bias+res"), ((5, 13), "gelu_tanh", "bias"),
                ((4097,), "gelu_tanh", "plain"), ((6, 20), "identity", "bias+res"), ((5, 40), "relu", "bias"),
                ((2, 3, 9), "silu", "res"), ((2, 3, 9), "gelu", "plain")]
# (shape, activation), with a bias and a residual: the last dimensions that
# are multiples of 4, (3, 12) and (5, 40), take Triton's bias-gradient row
# kernel, one with identity (whose backward reads neither input nor bias).
READ_BACK_CASES = [((7,), "gelu"), ((9,), "relu"), ((3, 12), "identity"), ((5, 13), "gelu_tanh"),
                   ((5, 40), "silu"), ((1,), "silu"), ((4097,), "identity"), ((6, 20), "gelu"), ((2, 3, 9), "relu")]


def _packed(shape, p, device, seed=SEED, offset=OFFSET):
    """The contract's keep mask of ``shape``, packed."""
    return ref.pack_bits(ref.dropout_mask(shape, p, seed, offset, device=device))


def _random_bits(shape, device, seed=0):
    """Packed bits that are no Philox mask, every bit of the last byte set at
    random too: what a kernel reads must come from them, and bits past the
    end must not matter."""
    n = (torch.Size(shape).numel() + 7) // 8
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize(*cases(p=[0.0, 1.0], reference_row=False))
def test_packed_bits_rule_at_p_0_and_1(b, p):
    """Given bits, the bits decide what is kept and p only gives the scale
    (1 at p == 0, 0 at p == 1): nothing is drawn or kept wholesale."""
    x, bias, res, grad = make_inputs((6, 21), torch.float32, seed=8, device=b.device)
    state, other = b.state(p), _random_bits(x.shape, b.device, seed=3)
    reference = _ops.op_set("reference_")
    assert_bitwise_equal(b.ops.forward(x, bias, res, state, "silu", [], other)[0],
                         reference.forward(x, bias, res, state, "silu", [], other)[0])
    dx, db = b.ops.backward(grad, x, bias, state, "silu", [], True, other)
    dx_ref, db_ref = reference.backward(grad, x, bias, state, "silu", [], True, other)
    assert_bitwise_equal(dx, dx_ref)
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, p, "silu", keep=ref.unpack_bits(other, x.shape))


# p: keep all, one p between (where the words decide), drop all.
@pytest.mark.parametrize(*cases(dtype=DTYPES, case=PACKED_CASES, p=[0.0, 0.5, 1.0], reference_row=False,
                                small=dict(case=PACKED_CASES[:5]),
                                gpu=dict(case=[((513, 1024), "gelu", "bias+res"), ((3, 1000, 777), "silu", "bias"),
                                               (((1 << 22) + 5,), "identity", "plain")])))
def test_packed_forward_packs_the_mask(b, dtype, case, p):
    """pack_mask=True: the output of pack_mask=False bit for bit, and the
    bits are pack_bits(dropout_mask) bit for bit."""
    shape, activation, extras = case
    x, bias, res, _ = make_inputs(shape, dtype, seed=5, device=b.device)
    bias, res = _with(extras, bias, res)
    state = b.state(p)
    y, none, _ = b.ops.forward(x, bias, res, state, activation, [])
    assert none.shape == (0,) and none.dtype == torch.uint8
    check_contract(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, p, activation), dtype, activation)
    y_packed, bits, _ = b.ops.forward(x, bias, res, state, activation, [], None, True)
    assert_bitwise_equal(y_packed, y)
    assert bits.dtype == torch.uint8 and bits.device.type == b.device
    assert bits.shape == ((x.numel() + 7) // 8,)
    assert torch.equal(bits, _packed(shape, p, b.device))


# The slow backends: Triton's interpreted blocks (32 and 64 elements) and the
# CUDA steps are passed by 65 elements, a CPU chunk (256) by 257; larger
# sizes repeat their paths.
@pytest.mark.parametrize(*cases(n=[1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 4095, 4096, 4097], dtype=DTYPES,
                                reference_row=False,
                                small=dict(n=[1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 257],
                                           dtype=[torch.float32, torch.bfloat16])))
def test_packed_every_size(b, n, dtype):
    """Sizes around bytes, vector widths and blocks: the tail's last byte
    holds zeros past n."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(b.device)
    y, bits, _ = b.ops.forward(x, None, None, b.state(0.5, n, 1), "identity", [], None, True)
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, n, 1, 0.5))
    assert torch.equal(bits, _packed((n,), 0.5, b.device, n, 1))


# One p: the bits, not p, say what is kept (p = 0 and p = 1 given bits:
# test_packed_bits_rule_at_p_0_and_1); p gives the scale as it does without
# bits.
@pytest.mark.parametrize(*cases(dtype=DTYPES, case=READ_BACK_CASES, p=[0.5], reference_row=False,
                                small=dict(case=READ_BACK_CASES[:5]),
                                gpu=dict(case=[((513, 1024), "gelu"), ((6, 1000, 772), "identity")])))
def test_packed_bits_read_back(b, dtype, case, p):
    """Forward and backward given the mask's bits: the regenerating results
    bit for bit (bias gradients to rounding); given other bits, the
    reference with those bits as the mask, so the bits are what is read."""
    shape, activation = case
    x, bias, res, grad = make_inputs(shape, dtype, seed=6, device=b.device)
    state = b.state(p)
    bits = _packed(shape, p, b.device)
    y, none, _ = b.ops.forward(x, bias, res, state, activation, [], bits)
    assert none.shape == (0,)
    assert_bitwise_equal(y, b.ops.forward(x, bias, res, state, activation, [])[0])
    for bias_grad in (False, True):
        dx, db = b.ops.backward(grad, x, bias, state, activation, [], bias_grad, bits)
        dx_regen, _ = b.ops.backward(grad, x, bias, state, activation, [], bias_grad)
        assert_bitwise_equal(dx, dx_regen)
        if bias_grad:
            check_bias_grad(db, grad, x, bias, SEED, OFFSET, p, activation)
        else:
            assert db.shape == (0,)
    # Plain dropout's backward as the API calls it: no saved input, the bits.
    dx_plain, _ = b.ops.backward(grad, None, None, state, "identity", [], False, bits)
    assert_bitwise_equal(dx_plain, b.ops.backward(grad, None, None, state, "identity", [], False)[0])
    other = _random_bits(shape, b.device, seed=len(shape))
    keep = ref.unpack_bits(other, shape)
    check_contract(b.ops.forward(x, bias, res, state, activation, [], other)[0],
                   ref.fused_dropout(x, bias, res, SEED, OFFSET, p, activation, keep=keep), dtype, activation)
    dx, db = b.ops.backward(grad, x, bias, state, activation, [], True, other)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, p, activation, (), True, keep=keep)
    check_contract(dx, dx_ref, dtype, activation)
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, p, activation, keep=keep)


@pytest.mark.parametrize(*cases())
def test_packed_nothing_to_pack(b):
    """No state, a structured mask or no elements: pack_mask=True returns an
    empty uint8 tensor and the same output."""
    x, bias, res, _ = make_inputs((4, 6), torch.float32, seed=7, device=b.device)
    for state, mask_shape in [(None, []), (b.state(0.5), [4, 1]), (b.state(0.5), [1, 6])]:
        y, bits, _ = b.ops.forward(x, bias, res, state, "gelu", mask_shape, None, True)
        assert bits.shape == (0,) and bits.dtype == torch.uint8 and bits.device.type == b.device
        assert_bitwise_equal(y, b.ops.forward(x, bias, res, state, "gelu", mask_shape)[0])
    for shape in [(0,), (3, 0)]:
        y, bits, _ = b.ops.forward(torch.randn(shape, device=b.device), None, None, b.state(0.5), "identity", [],
                                None, True)
        assert y.shape == shape and bits.shape == (0,) and bits.dtype == torch.uint8


# The slow backends' misaligned packed paths: test_cuda_host.py (the CUDA
# kernels' scalar path); elsewhere the glue's alone, as in the cpu row.
@pytest.mark.parametrize(*cases(layout=SMALL_LAYOUTS, small=dict(layout=["transposed"])))
def test_packed_layouts(b, layout):
    """Strided inputs: the bits of the row-major logical order, read back by
    a backward with a gradient in yet another layout."""
    x = _layout(layout, torch.float32, b.device, 8)
    bias = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(9)).to(b.device)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(10)).to(b.device)
    grad = grad.transpose(0, -1).contiguous().transpose(0, -1)
    state = b.state(0.3)
    y, bits, _ = b.ops.forward(x, bias, None, state, "silu", [], None, True)
    assert torch.equal(bits, _packed(x.shape, 0.3, b.device))
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(x.contiguous(), bias, None, SEED, OFFSET, 0.3, "silu"))
    dx, _ = b.ops.backward(grad, x, bias, state, "silu", [], True, bits)
    assert dx.stride() == torch.empty_like(grad).stride()
    assert_bitwise_equal(dx, b.ops.backward(grad, x, bias, state, "silu", [], True)[0])


class _OpCalls(TorchDispatchMode):
    """Records each dropout_ext op call below autograd: (name, arguments by
    schema name, outputs)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "dropout_ext":
            named = {}
            for i, a in enumerate(func._schema.arguments):
                named[a.name] = args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
            self.calls.append((func.__name__.split(".")[0], named, out))
        return out


# (activation, companions, shape) by name: plain dropout's backward is the
# forward op given the bits; the others the backward op, with the bias
# gradient's row kernel (Triton) where the last dimension is a multiple of 4.
MODE_CASES = {"identity": ("identity", "plain", (6, 20)), "identity_bias_res": ("identity", "bias+res", (5, 13)),
              "gelu_bias": ("gelu", "bias", (6, 20)), "relu_bias_res": ("relu", "bias+res", (3, 5, 8)),
              "silu_res": ("silu", "res", (37,))}


@pytest.mark.parametrize(*cases(case=list(MODE_CASES), dtype=[torch.float32, torch.bfloat16],
                                small=dict(dtype=[torch.float32])))
def test_packed_mask_mode_op_calls(b, case, dtype, monkeypatch):
    """F.fused_dropout and F.dropout with mask_mode="packed": the outputs and
    gradients of "regenerate" (bias gradients to rounding), the forward
    asked to pack and the backward (the forward op again, for plain
    dropout) given those very bits; "regenerate" packs and reads none."""
    activation, extras, shape = MODE_CASES[case]
    x, bias, res, grad = make_inputs(shape, dtype, seed=11, device=b.device)
    bias, res = _with(extras, bias, res)
    name = public(b, monkeypatch, dtype)
    results = {}
    for mode in ("packed", "regenerate"):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, bias, res)]
        saved = []
        with _OpCalls() as rec:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = F.fused_dropout(leaves[0], 0.4, bias=leaves[1], residual=leaves[2], activation=activation,
                                    seed=SEED, offset=OFFSET, backend=name, mask_mode=mode)
            y.backward(grad)
        # What the graph keeps per element: the keep bits, 1 bit each, only when packed.
        assert [t.shape for t in saved if t.dtype == torch.uint8] == \
            ([((x.numel() + 7) // 8,)] if mode == "packed" else [])
        (fwd, args, (_, bits, _)), (bwd, bargs, _) = rec.calls
        assert fwd.endswith("fused_dropout") and args["pack_mask"] == (mode == "packed")
        read = bargs["mask_bits"]
        if mode == "packed":
            assert torch.equal(bits, _packed(shape, 0.4, b.device))
            assert read is bits or torch.equal(read, bits)
        else:
            assert bits.shape == (0,) and read is None
        results[mode] = (y.detach(), *[t.grad if t is not None else None for t in leaves])
    (y, dx, db, dr), (y_r, dx_r, db_r, dr_r) = results["packed"], results["regenerate"]
    assert_bitwise_equal(y, y_r)
    check_contract(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.4, activation), dtype, activation)
    assert_bitwise_equal(dx, dx_r)
    if db is not None:
        check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.4, activation)
    if dr is not None:
        assert_bitwise_equal(dr, dr_r)

    plain = {}
    for mode in ("packed", "regenerate"):
        xr = x.clone().requires_grad_()
        with _OpCalls() as rec:
            y = F.dropout(xr, 0.4, seed=SEED, offset=OFFSET, backend=name, mask_mode=mode)
            (gx,) = torch.autograd.grad(y, xr, grad.clone().requires_grad_(), create_graph=True)
        assert [c[1]["mask_bits"] is not None for c in rec.calls] == [False, mode == "packed"]
        plain[mode] = (y.detach(), gx.detach())
    assert_bitwise_equal(plain["packed"][0], plain["regenerate"][0])
    assert_bitwise_equal(plain["packed"][1], plain["regenerate"][1])
    assert_bitwise_equal(plain["packed"][1], ref.fused_dropout(grad, None, None, SEED, OFFSET, 0.4))


@pytest.mark.parametrize(*cases())
def test_packed_mask_mode_structured_and_eval(b, monkeypatch):
    """mask_mode="packed" where there is nothing to pack (a structured mask,
    eval mode): the regenerating results, no bits read."""
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(12)).to(b.device)
    name = public(b, monkeypatch)
    for kw in (dict(broadcast_dims=[1]), dict(training=False)):
        xr = x.clone().requires_grad_()
        with _OpCalls() as rec:
            y = F.dropout(xr, 0.4, seed=SEED, backend=name, mask_mode="packed", **kw)
            y.backward(torch.ones_like(y))
        assert all(c[1].get("mask_bits") is None for c in rec.calls)
        expected = ref.fused_dropout(x, None, None, SEED, 0, 0.4, "identity", (4, 1, 5)) if kw.get("broadcast_dims") \
            else x
        assert_bitwise_equal(y.detach(), expected)


# opcheck's tests; under Triton's interpreter only the schema and the
# autograd registration (as test_opcheck).
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opchecks(b, *leave_out):
    return {"test_utils": tuple(u for u in OPCHECKS[:2 if b.id == "triton" else None] if u not in leave_out)}


@pytest.mark.parametrize(*cases(activation=["identity", "gelu"]))
def test_packed_opcheck(b, activation):
    """torch.library.opcheck with the packed mode's arguments. (The forward
    that packs, under AOT dispatch with dynamic shapes:
    test_packed_aot_dispatch_dynamic.)"""
    x, bias, res, _ = make_inputs((3, 12), torch.float32, device=b.device)
    state = b.state(0.5)
    fwd, bwd = b.ops.forward, b.ops.backward
    bits = _packed(x.shape, 0.5, b.device)
    pack = _opchecks(b, "test_aot_dispatch_dynamic")
    torch.library.opcheck(fwd, (x, bias, res, state, activation, [], None, True), **pack)
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), bias.clone().requires_grad_(), res, state, activation,
                                [], None, True), **pack)
    torch.library.opcheck(fwd, (x, bias, res, state, activation, [], bits, False), **_opchecks(b))
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), None, None, state, activation, [], bits, False),
                          **_opchecks(b))
    torch.library.opcheck(bwd, (res, x, bias, state, activation, [], True, bits), **_opchecks(b))


if not TRITON_MODE:
    @pytest.mark.parametrize(*cases())
    def test_packed_aot_dispatch_dynamic(b):
        """The forward that packs, traced with dynamic shapes (torch.compile's
        path with dynamic=True)."""
        x, bias, res, _ = make_inputs((3, 12), torch.float32, device=b.device)
        torch.library.opcheck(b.ops.forward, (x, bias, res, b.state(0.5), "gelu", [], None, True),
                              test_utils=("test_aot_dispatch_dynamic",))


# --- sharded calls (place) -------------------------------------------------------
# A shard given its place draws every element at its index in the global tensor
# (docs/RNG.md, "Sharded tensors"): its result is the block of the same
# backend's unsharded call, bit for bit, for any run structure of the map
# (csrc/index_map.h); the reference row too (its sharded call computes
# global indices its own way, not by slicing).

# (global shape, start, local shape)
PLACES = {
    "rows": ((7, 5, 6), (3, 0, 0), (2, 5, 6)),        # one run, base % 4 == 2
    "cols": ((7, 5, 13), (0, 0, 5), (7, 5, 4)),       # the last dimension split: runs of 4 at odd starts
    "short": ((6, 4, 11), (1, 0, 7), (4, 4, 3)),      # runs shorter than a vector unit
    "middle": ((4, 9, 6), (1, 3, 0), (2, 4, 6)),      # runs of whole rows, one strided dimension
    "two": ((4, 6, 10), (2, 1, 3), (2, 3, 5)),        # two strided dimensions above runs of 5
    "ones": ((5, 8, 3), (0, 4, 2), (5, 1, 1)),        # runs of one element
}
PLACE_IDS = list(PLACES)


def _block(t, start, local):
    return t[tuple(slice(s, s + n) for s, n in zip(start, local))]


def _place(global_shape, start):
    return list(global_shape) + list(start)


@pytest.mark.parametrize(*cases(case=PLACE_IDS + ["past_2_32"], small=dict(case=["cols", "two", "past_2_32"])))
def test_place_mask(b, case):
    """dropout_mask at a place is the global mask's block; past 2**32 the
    oracle's global indices decide (no such tensor is allocated)."""
    if case == "past_2_32":
        global_shape, start, local = (2**20, 2**13, 8), (2**19 + 3, 5, 0), (2, 3, 8)
    else:
        global_shape, start, local = PLACES[case]
    place = _place(global_shape, start)
    got = b.ops.mask(b.state(0.5), list(local), place)
    assert torch.equal(got, ref.dropout_mask(local, 0.5, SEED, OFFSET, device=b.device, place=place))
    if case != "past_2_32":
        assert torch.equal(got, _block(b.ops.mask(b.state(0.5), list(global_shape)), start, local))
    assert not torch.equal(got, b.ops.mask(b.state(0.5), list(local)))  # the place decides


@pytest.mark.parametrize(*cases(case=PLACE_IDS, dtype=[torch.float32, torch.bfloat16],
                                small=dict(case=["cols", "short", "two"], dtype=[torch.bfloat16])))
def test_place_forward_backward(b, case, dtype):
    """y and dx of a shard are the blocks of the unsharded call's; the packed
    bits are the shard's keep bits in its own element order; the bias
    gradient is the one the same keep bits give when read."""
    global_shape, start, local = PLACES[case]
    place = _place(global_shape, start)
    x, bias, res, grad = make_inputs(global_shape, dtype, seed=11, device=b.device)
    cols = slice(start[-1], start[-1] + local[-1])
    xl, rl, gl = (_block(t, start, local).contiguous() for t in (x, res, grad))
    bl = bias[cols].contiguous()
    state = b.state(0.5)
    y = b.ops.forward(x, bias, res, state, "gelu", [])[0]
    yl, bits, _ = b.ops.forward(xl, bl, rl, state, "gelu", [], None, True, None, None, place)
    assert_bitwise_equal(yl, _block(y, start, local))
    keep = ref.dropout_mask(local, 0.5, SEED, OFFSET, device=b.device, place=place)
    assert torch.equal(bits, ref.pack_bits(keep))
    dx = b.ops.backward(grad, x, bias, state, "gelu", [], False)[0]
    dxl, dbl = b.ops.backward(gl, xl, bl, state, "gelu", [], True, None, place)
    assert_bitwise_equal(dxl, _block(dx, start, local))
    dx_read, db_read = b.ops.backward(gl, xl, bl, state, "gelu", [], True, bits)
    assert_bitwise_equal(dbl, db_read)
    assert_bitwise_equal(b.ops.forward(xl, bl, rl, state, "gelu", [], bits)[0], yl)


# (global shape, start, local shape, global mask shape): a channel mask with the
# channels split, and a mask shared over rows with the columns split.
STRUCTURED_PLACES = {
    "channels": ((4, 6, 5, 7), (1, 2, 0, 3), (2, 3, 5, 4), (4, 6, 1, 1)),
    "one_channel": ((4, 6, 5, 7), (0, 5, 2, 0), (4, 1, 3, 7), (4, 6, 1, 1)),
    "shared_rows": ((4, 6, 5, 7), (2, 1, 1, 2), (2, 5, 4, 5), (1, 1, 5, 7)),
}


@pytest.mark.parametrize(*cases(case=list(STRUCTURED_PLACES),
                                small=dict(case=["channels", "one_channel"])))
def test_place_structured(b, case):
    """A structured mask speaks of the global shape: the shard applies the
    block of the global small mask (a channel split down to one channel is
    still a channel, not a broadcast dimension)."""
    global_shape, start, local, mask_shape = STRUCTURED_PLACES[case]
    place = _place(global_shape, start)
    x, _, _, grad = make_inputs(global_shape, torch.float32, seed=12, device=b.device)
    state = b.state(0.4)
    y = b.ops.forward(x, None, None, state, "relu", list(mask_shape))[0]
    yl = b.ops.forward(_block(x, start, local).contiguous(), None, None, state, "relu", list(mask_shape), None,
                       False, None, None, place)[0]
    assert_bitwise_equal(yl, _block(y, start, local))
    dx = b.ops.backward(grad, x, None, state, "relu", list(mask_shape), False)[0]
    dxl = b.ops.backward(_block(grad, start, local).contiguous(), _block(x, start, local).contiguous(), None,
                         state, "relu", list(mask_shape), False, None, place)[0]
    assert_bitwise_equal(dxl, _block(dx, start, local))


@pytest.mark.parametrize(*cases(norm=["layer", "rms"], small=dict(norm=["layer"])))
def test_place_norm(b, norm):
    """dropout_add_norm of a shard of whole rows: y, h and dx are the
    unsharded call's blocks (every row's statistics are its own)."""
    global_shape, start, local = (5, 7, 40), (1, 2, 0), (3, 4, 40)
    place = _place(global_shape, start)
    x, _, res, grad = make_inputs(global_shape, torch.float32, seed=13, device=b.device)
    w = torch.randn(40, device=b.device)
    state = b.state(0.3)
    full = b.ops.norm(x, res, w, None, state, norm, 1e-5, False)
    xl, rl, gl = (_block(t, start, local).contiguous() for t in (x, res, grad))
    part = b.ops.norm(xl, rl, w, None, state, norm, 1e-5, False, None, None, place)
    for got, want in zip(part[:2], full[:2]):
        assert_bitwise_equal(got, _block(want, start, local))
    mask = [True, True, False, False]
    dx = b.ops.norm_backward(grad, None, full[1], w, full[2], full[3], state, norm, mask)[0]
    dxl = b.ops.norm_backward(gl, None, part[1], w, part[2], part[3], state, norm, mask, place)[0]
    assert_bitwise_equal(dxl, _block(dx, start, local))


@pytest.mark.parametrize(*cases())
def test_place_refusals(b):
    """A place that does not fit, a mask shape of the local instead of the
    global shape, and a norm shard that splits rows are refused, by name."""
    x = torch.randn(4, 6, device=b.device)
    state = b.state(0.5)
    with pytest.raises(ValueError, match="place must be"):
        b.ops.forward(x, None, None, state, "identity", [], None, False, None, None, [8, 6])
    with pytest.raises(ValueError, match="must lie inside"):
        b.ops.forward(x, None, None, state, "identity", [], None, False, None, None, [8, 6, 5, 0])
    with pytest.raises(ValueError, match="global shape"):
        b.ops.forward(x, None, None, state, "identity", [4, 1], None, False, None, None, [8, 6, 4, 0])
    with pytest.raises(ValueError, match="whole"):
        b.ops.norm(x, None, None, None, state, "layer", 1e-5, False, None, None, [4, 12, 0, 6])
    # five strided dimensions: more than any kernel takes, refused alike by every backend
    y = torch.randn(2, 2, 2, 2, 2, 2, device=b.device)
    with pytest.raises(ValueError, match="at most 4"):
        b.ops.forward(y, None, None, state, "identity", [], None, False, None, None, [3] * 6 + [0] * 6)
