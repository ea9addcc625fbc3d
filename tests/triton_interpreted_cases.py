"""What only the Triton kernels have, under the Triton interpreter
(TRITON_INTERPRET=1) on the CPU: p read from the state on the device with the
contract's sanitising, no state compiling no Philox, keep-all and drop-all
drawing no words, and every launch with a fixed configuration under a device
guard. Masks, outputs and gradients against the reference are the
conformance suite's (tests/test_conformance.py, which runs its Triton cases
in the same child process).

Run by test_triton_interpreter.py in a child pytest that has TRITON_INTERPRET=1
set before Triton is imported (the file name keeps it out of the main run).
Under the interpreter the launch blocks are tiny (triton_kernels.flat_config),
so these tensors span several programs and take both the full-block
(unmasked) and the partial-block (masked) paths of every kernel."""

import math
import os
import struct

import pytest
import torch

from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, check_contract, make_inputs
from error_bounds import check_bias_grad, check_bounded, check_norm_param_grads, norm_bounds

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (3, 12) and (5, 40) take the bias-gradient row kernel (last dim % 4 == 0),
# with full and partial column blocks and a partial last block of rows.
SHAPES = [(1,), (7,), (5, 13), (2, 3, 9), (3, 12), (5, 40)]
SEED, OFFSET = 0xF123456789ABCDEF, 2**32 + 5  # a seed >= 2**63: the sign bit reaches the key


@pytest.fixture(scope="module")
def tk():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_interpreter.py"
    from dropout_ext import triton_kernels

    assert triton_kernels._INTERPRET
    return triton_kernels


def _signed(u):
    return u - 2**64 if u >= 2**63 else u


def _state(p, seed=SEED, offset=OFFSET):
    """The op's state tensor: [seed, offset, p's binary64 bits] as int64."""
    bits = struct.unpack("<q", struct.pack("<d", p))[0]
    return torch.tensor([_signed(seed), _signed(offset), bits], dtype=torch.int64)


def _sanitised(p):
    """p as the kernels read it from the state: NaN and negatives are 0, above 1 is 1."""
    return 0.0 if not p >= 0.0 else min(p, 1.0)


# Every p on one dtype, and each other dtype at one p: the kernels read p
# from the state's bits before any element is loaded, so the dtype does not
# change how.
P_CASES = [(p, torch.float32) for p in (0.0, -0.0, 0.3, 1.0, 1 - 2**-53, 2**-40, 1.5, -0.25, float("nan"),
                                        float("inf"))] + [(0.3, d) for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("p,dtype", P_CASES)
def test_p_from_state(tk, p, dtype):
    """The kernels derive t and the scale from p's bits in the state with the
    host's double arithmetic: the same bits as the reference, and a p out of
    [0, 1] (NaN included) read as the contract sanitises it."""
    pe = _sanitised(p)
    x, bias, res, grad = make_inputs((5, 12), dtype)
    assert_bitwise_equal(tk.fused_dropout(x, bias, res, _state(p), "gelu", [])[0],
                         ref.fused_dropout(x, bias, res, SEED, OFFSET, pe, "gelu"))
    dx, db = tk.fused_dropout_backward(grad, x, bias, _state(p), "silu", [], True)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, pe, "silu", (), True)
    assert_bitwise_equal(dx, dx_ref)
    assert torch.equal(tk.dropout_mask(_state(p), [3, 7]), ref.dropout_mask((3, 7), pe, SEED, OFFSET))
    y = tk.fused_dropout(x, None, None, _state(p), "identity", [5, 1])[0]
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, SEED, OFFSET, pe, "identity", (5, 1)))
    # the packed mask mode: the bits of the sanitised p, and read back
    keep = ref.dropout_mask((5, 12), pe, SEED, OFFSET)
    y, bits = tk.fused_dropout(x, bias, res, _state(p), "gelu", [], None, True)
    assert torch.equal(bits, ref.pack_bits(keep))
    dx, _ = tk.fused_dropout_backward(grad, x, bias, _state(p), "silu", [], True, bits)
    assert_bitwise_equal(dx, dx_ref)


# Every activation in float32 and the half dtypes with one: the no-state
# path is chosen on the host, the same for every dtype.
NO_STATE_CASES = [(torch.float32, a) for a in ref.ACTIVATIONS] + \
    [(d, "gelu") for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("dtype,activation", NO_STATE_CASES)
def test_no_state_keeps_everything(tk, dtype, activation):
    """state None (eval mode, p == 0 known on the host): every element kept,
    scale 1, whatever the mask shape; the same bits as p == 0."""
    x, bias, res, grad = make_inputs((3, 5, 8), dtype)
    for mask_shape in ([], [3, 1, 1]):
        y = tk.fused_dropout(x, bias, res, None, activation, mask_shape)[0]
        assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.0, activation))
        for bias_grad in (False, True):
            dx, db = tk.fused_dropout_backward(grad, x, bias, None, activation, mask_shape, bias_grad)
            dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.0, activation, (), bias_grad)
            assert_bitwise_equal(dx, dx_ref)
            if bias_grad:
                check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.0, activation)


def test_keep_all_and_drop_all_run_no_philox(tk, monkeypatch):
    """No state, p == 0 and p >= 1 decide every element without a random
    word: with Philox made to fail, those calls still succeed (and a call
    that does need it fails, so the patch is in effect)."""
    import triton

    @triton.jit
    def _no_philox(state_ptr, group0, thr, ROWS, R):
        raise AssertionError("Philox evaluated")

    monkeypatch.setattr(tk, "_philox_keep", _no_philox)
    x, bias, res, grad = make_inputs((3, 40), torch.float32)
    for state in (None, _state(0.0), _state(-0.0), _state(1.0), _state(float("nan"))):
        tk.fused_dropout(x, bias, res, state, "gelu", [])
        tk.fused_dropout_backward(grad, x, bias, state, "gelu", [], True)
        tk.fused_dropout_backward(grad, x, bias, state, "gelu", [], False)
        if state is not None:
            tk.dropout_mask(state, [3, 40])
    with pytest.raises(Exception):
        tk.dropout_mask(_state(0.5), [3, 40])


def test_reading_bits_runs_no_philox(tk, monkeypatch):
    """Given the packed keep bits, forward and backward (the flat kernel and
    the bias-gradient row kernel) draw no random word, and the bits alone
    decide: bits that are no Philox mask give the reference with that mask."""
    import triton

    @triton.jit
    def _no_philox(state_ptr, group0, thr, ROWS, R):
        raise AssertionError("Philox evaluated")

    monkeypatch.setattr(tk, "_philox_keep", _no_philox)
    for shape in ((3, 40), (5, 12), (4, 9)):  # row kernel, row kernel with half-byte rows, flat kernel
        x, bias, res, grad = make_inputs(shape, torch.float32)
        bits = torch.randint(0, 256, ((x.numel() + 7) // 8,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(1))
        keep = ref.unpack_bits(bits, shape)
        y, none = tk.fused_dropout(x, bias, res, _state(0.5), "gelu", [], bits)
        assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.5, "gelu", keep=keep))
        assert none.shape == (0,)
        for bias_grad in (True, False):
            dx, _ = tk.fused_dropout_backward(grad, x, bias, _state(0.5), "gelu", [], bias_grad, bits)
            dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.5, "gelu", (), True, keep=keep)
            assert_bitwise_equal(dx, dx_ref)
    with pytest.raises(Exception):
        tk.fused_dropout(x, bias, res, _state(0.5), "gelu", [], None, True)


def test_all_launches_are_fixed_and_guarded(tk, monkeypatch):
    """Every launch goes through _launch (the device guard) with a fixed
    BLOCK and num_warps from the config table: no autotuner to benchmark."""
    from triton.runtime.autotuner import Autotuner

    seen = []
    real = tk._launch

    def recording(kernel, grid, like, *args, **meta):
        seen.append((kernel, like.device, meta))
        return real(kernel, grid, like, *args, **meta)

    monkeypatch.setattr(tk, "_launch", recording)
    x, bias, res, grad = make_inputs((3, 5, 8), torch.bfloat16)
    tk.fused_dropout(x, bias, res, _state(0.5), "relu", [3, 1, 8])
    tk.fused_dropout_backward(grad, x, bias, _state(0.5), "relu", [], True)
    tk.fused_dropout_backward(grad[..., :7], x[..., :7], bias[:7], _state(0.5), "relu", [], True)
    tk.dropout_mask(_state(0.5), [9])
    _, bits = tk.fused_dropout(x, bias, res, _state(0.5), "relu", [], None, True)
    tk.fused_dropout_backward(grad, x, bias, _state(0.5), "relu", [], True, bits)
    y, h, mean, rstd = tk.dropout_add_norm(x, res, bias, None, _state(0.5), "layer", 1e-5, False)
    tk.dropout_add_norm_backward(grad, None, h, bias, mean, rstd, _state(0.5), "layer", [True, True, True, True])
    kernels = {k for k, _, _ in seen}
    assert kernels == {tk._flat_kernel, tk._rows_kernel, tk._sum_rows_kernel, tk._mask_kernel, tk._norm_kernel,
                       tk._norm_backward_kernel}
    for kernel, device, meta in seen:
        assert not isinstance(kernel, Autotuner)
        assert device == x.device
        assert isinstance(meta["BLOCK"], int) and isinstance(meta["num_warps"], int)
        assert math.log2(meta["BLOCK"]).is_integer()


def test_float64_refused_by_the_triton_ops(tk):
    """The Triton kernels compute in float32 and have no float64 path: a
    direct torch.ops call with float64 fails, naming the argument, rather
    than returning float32 arithmetic (the public API sends float64 to
    another backend)."""
    from dropout_ext import _backend, functional

    ops = torch.ops.dropout_ext
    x = torch.randn(3, 8, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    wording = "must be float16, bfloat16 or float32 for the triton backend, got torch.float64"
    with pytest.raises(TypeError, match="input " + wording):
        ops.triton_fused_dropout(x, bias, None, _state(0.5), "gelu", [])
    with pytest.raises(TypeError, match="grad " + wording):
        ops.triton_fused_dropout_backward(x, x, bias, _state(0.5), "gelu", [], True)
    with pytest.raises(TypeError, match="input " + wording):
        ops.triton_fused_dropout_backward(x.float(), x, bias, _state(0.5), "gelu", [], False)
    with pytest.raises(TypeError, match="input " + wording):
        ops.triton_dropout_add_norm(x, None, None, None, _state(0.5), "layer", 1e-5, False)
    rstd = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="grad " + wording):
        ops.triton_dropout_add_norm_backward(x, None, x, None, rstd, rstd, _state(0.5), "layer",
                                             [True, True, False, False])
    assert _backend.ops_for("triton", x.device, torch.float64).norm is not ops.triton_dropout_add_norm
    assert _backend.ops_for("triton", x.device, torch.float64).forward is not ops.triton_fused_dropout
    y = functional.fused_dropout(x, 0.5, bias=bias, activation="gelu", seed=SEED, backend="triton")
    check_contract(y, ref.fused_dropout(x, bias, None, SEED, 0, 0.5, "gelu"), torch.float64, "gelu")


# --- dropout_add_norm ------------------------------------------------------------------
# The conformance suite holds every backend's dropout_add_norm to the
# reference; here what is Triton's own: both the row-in-registers and the
# column-tile paths (NORM_MAX_BLOCK made small), rows that start inside a
# Philox group (H % 4 != 0), and h bit for bit equal to the Triton
# fused_dropout of the same state.

def _norm_case(tk, shape, dtype, norm, p=0.3, residual_in_fp32=False, param_dtype=None, with_bias=True,
               output_mask=(True, True, True, True), against_fused=True):
    h_dtype, _ = ref.norm_dtypes(dtype, residual_in_fp32)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    res = torch.randn(shape, generator=g).to(h_dtype)
    H = shape[-1]
    w = (1 + torch.randn(H, generator=g)).to(param_dtype or dtype)
    b = torch.randn(H, generator=g).to(param_dtype or dtype) if with_bias else None
    grad = torch.randn(shape, generator=g).to(dtype)
    grad_h = torch.randn(shape, generator=g).to(h_dtype)
    state = _state(p) if p is not None else None
    pe = _sanitised(p) if p is not None else 0.0
    y, h, mean, rstd = tk.dropout_add_norm(x, res, w, b, state, norm, 1e-5, residual_in_fp32)
    assert_bitwise_equal(h, ref.dropout_add_norm(x, res, w, b, SEED, OFFSET, pe, norm, 1e-5, residual_in_fp32)[1])
    if h_dtype == dtype and against_fused:
        assert_bitwise_equal(h, tk.fused_dropout(x, None, res, state, "identity", [])[0])
    # y, the statistics and the gradients: the float64 values of h as stored,
    # within their error bounds (error_bounds.norm_bounds, check_sum)
    stat = rstd.dtype
    fwd = norm_bounds(h, w, b, torch.zeros_like(h), None, norm, 1e-5, stat)
    for name, value in (("y", y), ("mean", mean), ("rstd", rstd)):
        check_bounded(value, *fwd[name], stat, name)
    grads = tk.dropout_add_norm_backward(grad, grad_h, h, w, mean, rstd, state, norm, list(output_mask))
    expected = ref.dropout_add_norm_backward(grad, grad_h, h, w, mean, rstd, SEED, OFFSET, pe, norm)
    keep = ref.dropout_mask(shape, pe, SEED, OFFSET)
    bwd = norm_bounds(h, w, None, grad, grad_h, norm, 1e-5, stat, keep, pe)
    for name, got, want, need in zip(("dx", "dh", "grad_weight", "grad_bias"), grads, expected, output_mask):
        if not need:
            assert got.shape == (0,), name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name in bwd:
            check_bounded(got, *bwd[name], stat, name)
    check_norm_param_grads(grads[2] if output_mask[2] else None, grads[3] if output_mask[3] else None, grad, h, mean,
                           rstd, norm)
    if output_mask[0]:
        # a dropped element: a zero with dh's sign, as the reference
        assert torch.equal(torch.signbit(grads[0][~keep]), torch.signbit(expected[0][~keep]))
        assert not grads[0][~keep].any()


@pytest.mark.parametrize("shape,dtype,norm", [
    ((3, 1), torch.float32, "layer"), ((3, 1), torch.bfloat16, "rms"),
    ((2, 3, 7), torch.float16, "layer"), ((2, 3, 7), torch.float32, "rms"),
    ((5, 77), torch.bfloat16, "layer"), ((5, 77), torch.float16, "rms"),
    ((4, 64), torch.float32, "layer"), ((4, 64), torch.bfloat16, "rms"),
    ((3, 24), torch.float32, "layer"), ((5, 40), torch.bfloat16, "rms"), ((2, 48), torch.float16, "layer"),
])
def test_norm_in_registers(tk, shape, dtype, norm):
    """A row in registers: one tile, masked (H below the tile) and even (H
    == BLOCK), H % 4 != 0 drawing element by element, or several whole
    tiles (24, 40 and 48: 3 or 5 tiles); several rows a program in the
    backward."""
    if shape[-1] in (24, 40, 48):
        assert tk.norm_config(shape[-1], dtype.itemsize)[4] > 1
        assert tk.norm_config(shape[-1], dtype.itemsize, True)[4] > 1
    _norm_case(tk, shape, dtype, norm)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(4, 77), (2, 128)])
def test_norm_column_tiles(tk, monkeypatch, shape, norm):
    """Rows longer than NORM_MAX_BLOCK (made 32 here): the column-tile loop,
    full tiles and a partial last one, the merged statistics, and the
    backward's partial sums kept in the partial buffer row by row."""
    monkeypatch.setattr(tk, "NORM_MAX_BLOCK", 32)
    assert tk.norm_config(shape[-1], 4)[3]
    _norm_case(tk, shape, torch.float32, norm)
    _norm_case(tk, shape, torch.bfloat16, norm, residual_in_fp32=True, param_dtype=torch.float32,
               output_mask=(True, False, True, True))


def test_norm_long_rows(tk, monkeypatch):
    """A long row, 20000 elements, over column tiles of 4096 (h against the
    reference's only: the interpreted fused_dropout's tiny blocks are slow)."""
    monkeypatch.setattr(tk, "NORM_MAX_BLOCK", 4096)
    _norm_case(tk, (2, 20000), torch.bfloat16, "layer", against_fused=False)


@pytest.mark.parametrize("p,output_mask", [
    (None, (True, True, True, True)), (0.0, (True, False, False, False)), (1.0, (True, True, True, True)),
    (float("nan"), (False, True, False, True)), (1.5, (False, False, True, False)), (0.3, (True, False, False, True)),
])
def test_norm_options(tk, p, output_mask):
    """No state, p == 0 and p >= 1 (and p read from the state as the
    contract sanitises it); every output_mask leaves the others empty; no
    bias, float32 parameters of a half input, h in float32."""
    _norm_case(tk, (3, 12), torch.float16, "layer", p, with_bias=False, param_dtype=torch.float32,
               residual_in_fp32=True, output_mask=output_mask)


def test_norm_no_philox_without_dropout(tk, monkeypatch):
    """No state, p == 0 and p >= 1 decide every element without a random
    word, in the forward and the backward (with Philox made to fail; a call
    with 0 < p < 1 does fail, so the patch is in effect)."""
    import triton

    @triton.jit
    def _no_philox(state_ptr, group):
        raise AssertionError("Philox evaluated")

    monkeypatch.setattr(tk, "_philox_words", _no_philox)
    x, bias, res, grad = make_inputs((3, 13), torch.float32)
    for state in (None, _state(0.0), _state(1.0)):
        y, h, mean, rstd = tk.dropout_add_norm(x, res, bias, bias, state, "layer", 1e-5, False)
        tk.dropout_add_norm_backward(grad, None, h, bias, mean, rstd, state, "layer", [True] * 4)
    with pytest.raises(Exception):
        tk.dropout_add_norm(x, res, bias, bias, _state(0.5), "layer", 1e-5, False)


# --- shards ------------------------------------------------------------------------------
# The conformance suite holds every backend's sharded calls to the blocks of
# the unsharded calls; here what is Triton's own: which draw a map takes (a
# group at a time where it keeps groups of four whole, else element by
# element), the bias-gradient row kernel and the norm's column tiles under a
# map, and a place whose map is the identity taking the unsharded kernels.

# (global shape, start, local shape, drawn a group at a time)
SHARD_CASES = {
    "rows": ((6, 5, 12), (2, 0, 0), (3, 5, 12), True),      # a shift by 120
    "cols": ((5, 3, 24), (0, 0, 8), (5, 3, 12), True),      # runs of 12 at 8 + 24k
    "two": ((4, 6, 16), (1, 2, 4), (2, 3, 8), True),        # two strided dimensions
    "cols_odd": ((5, 22), (0, 5), (5, 12), False),          # runs of 12 at odd starts
}


def _block(start, local):
    return tuple(slice(s, s + n) for s, n in zip(start, local))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_shard_draws(tk, case, dtype):
    """A shard's forward (packing its bits), its backward with the bias
    gradient (the row kernel: H % 4 == 0) and its mask are the blocks of
    the unsharded calls, a group at a time where the map keeps groups
    whole; the bias gradient is the one its packed bits give."""
    global_shape, start, local, groups = SHARD_CASES[case]
    place = [*global_shape, *start]
    assert tk._keeps_groups(*tk._index_map(local, place)) == groups
    x, bias, res, grad = make_inputs(global_shape, dtype)
    block = _block(start, local)
    xl, rl, gl = (t[block].contiguous() for t in (x, res, grad))
    bl = bias[block[-1]].contiguous()
    state = _state(0.5)
    keep = tk.dropout_mask(state, list(local), place)
    assert torch.equal(keep, tk.dropout_mask(state, list(global_shape))[block])
    yl, bits = tk.fused_dropout(xl, bl, rl, state, "gelu", [], None, True, place)
    assert_bitwise_equal(yl, tk.fused_dropout(x, bias, res, state, "gelu", [])[0][block])
    assert torch.equal(bits, ref.pack_bits(keep))
    dxl, dbl = tk.fused_dropout_backward(gl, xl, bl, state, "gelu", [], True, None, place)
    assert_bitwise_equal(dxl, tk.fused_dropout_backward(grad, x, bias, state, "gelu", [], False)[0][block])
    assert_bitwise_equal(dbl, tk.fused_dropout_backward(gl, xl, bl, state, "gelu", [], True, bits)[1])


@pytest.mark.parametrize("H", [13, 77, 64])
def test_shard_norm_rows(tk, monkeypatch, H):
    """A norm shard draws each row at its global start: rows in registers
    with H % 4 != 0 (element by element) and over column tiles (77, 64:
    NORM_MAX_BLOCK made 32) give the unsharded call's y, h and dx blocks."""
    monkeypatch.setattr(tk, "NORM_MAX_BLOCK", 32)
    global_shape, start, local = (4, 5, H), (1, 2, 0), (2, 3, H)
    place = [*global_shape, *start]
    x, w, res, grad = make_inputs(global_shape, torch.float32)
    block = _block(start, local)
    state = _state(0.3)
    full = tk.dropout_add_norm(x, res, w, None, state, "layer", 1e-5, False)
    part = tk.dropout_add_norm(x[block].contiguous(), res[block].contiguous(), w, None, state, "layer", 1e-5, False,
                               place)
    for got, want in zip(part[:2], full[:2]):
        assert_bitwise_equal(got, want[block])
    mask = [True, False, False, False]
    dx = tk.dropout_add_norm_backward(grad, None, full[1], w, full[2], full[3], state, "layer", mask)[0]
    dxl = tk.dropout_add_norm_backward(grad[block].contiguous(), None, part[1], w, part[2], part[3], state, "layer",
                                       mask, place)[0]
    assert_bitwise_equal(dxl, dx[block])


def test_identity_place_takes_unsharded_kernels(tk):
    """A place whose map is the identity (the shard starts the global tensor
    and is consecutive in it, or is all of it) launches the unsharded
    kernels; one further on is a shift."""
    assert tk._index_map((2, 5, 6), [4, 5, 6, 0, 0, 0]) == tk._IDENTITY
    assert tk._index_map((4, 5, 6), [4, 5, 6, 0, 0, 0]) == tk._IDENTITY
    assert tk._index_map((2, 5, 6), [4, 5, 6, 1, 0, 0])[1] == tk.SHIFT.value


# Structured masks read through broadcast strides: a collapsed dimension
# shorter than the tile (a 32-bit division per element) and one as long or
# longer (a compare and subtract), up to MAX_KEEP_DIMS dimensions, and past
# them the broadcast copy; the bias-gradient row kernel's tiles too.
STRUCTURED = [((5, 13), [5, 1]), ((4, 70), [1, 70]), ((3, 4, 40), [3, 1, 40]), ((2, 3, 5, 7), [2, 1, 5, 1]),
              ((2, 3, 5, 7, 3), [2, 1, 5, 1, 3]), ((6, 2, 33), [1, 2, 1]), ((2, 3, 4), [1, 1, 1])]


@pytest.mark.parametrize("shape,mask_shape", STRUCTURED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_structured_mask_through_strides(tk, shape, mask_shape, dtype):
    x, bias, res, grad = make_inputs(shape, dtype)
    view = tk._keep_view(shape, mask_shape)
    assert (view is None) == (len(shape) == 5)
    y = tk.fused_dropout(x, bias, res, _state(0.4), "gelu", mask_shape)[0]
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.4, "gelu", tuple(mask_shape)))
    dx, db = tk.fused_dropout_backward(grad, x, bias, _state(0.4), "gelu", mask_shape, True)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.4, "gelu", tuple(mask_shape), True)
    assert_bitwise_equal(dx, dx_ref)
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.4, "gelu", tuple(mask_shape))
