"""The Triton kernels under the Triton interpreter (TRITON_INTERPRET=1) on the
CPU: masks, outputs and gradients equal the reference bit for bit on small,
odd-sized tensors, for every activation and dtype the kernels take; the
registered ops, their autograd and opcheck too.

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
from conftest import assert_bitwise_equal, make_inputs

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


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (67,), (130,), (3, 5, 7)])
def test_mask(tk, shape, p):
    assert torch.equal(tk.dropout_mask(_state(p), list(shape)), ref.dropout_mask(shape, p, SEED, OFFSET))


def test_mask_counter_crosses_2_32_groups(tk):
    """Group numbers past 2**32 use the counter's second word: check a slice
    whose group index crosses that boundary, through the offset word."""
    for offset in (0, 2**32 - 1, 2**64 - 1):
        state = _state(0.5, seed=7, offset=offset)
        assert torch.equal(tk.dropout_mask(state, [4, 33]), ref.dropout_mask((4, 33), 0.5, 7, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, False), (True, True), (False, True)])
def test_forward_backward(tk, dtype, shape, activation, with_bias, with_res):
    x, bias, res, grad = make_inputs(shape, dtype)
    b = bias if with_bias else None
    r = res if with_res else None
    p = 0.3
    y = tk.fused_dropout(x, b, r, _state(p), activation, [])
    assert_bitwise_equal(y, ref.fused_dropout(x, b, r, SEED, OFFSET, p, activation))
    dx, db = tk.fused_dropout_backward(grad, x, b, _state(p), activation, [], with_bias)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, b, SEED, OFFSET, p, activation, (), with_bias)
    assert_bitwise_equal(dx, dx_ref)
    if with_bias:
        # the bias gradient is a sum: equal to rounding (docs/RNG.md)
        torch.testing.assert_close(db, db_ref, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
    else:
        assert db.shape == (0,)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_p_and_special_values(tk, dtype, p):
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40, -3.0e38, 7.0, 65504.0],
                     dtype=torch.float32).to(dtype)
    for activation in ref.ACTIVATIONS:
        y = tk.fused_dropout(x, None, None, _state(p), activation, [])
        expected = ref.fused_dropout(x, None, None, SEED, OFFSET, p, activation)
        # Where act(x) is NaN a dropped element is a zero of unspecified sign
        # (docs/RNG.md); everywhere else the bits must match.
        nan_act = torch.isnan(ref.fused_dropout(x, None, None, SEED, OFFSET, 0.0, activation))
        assert_bitwise_equal(y[~nan_act], expected[~nan_act])
        torch.testing.assert_close(y[nan_act], expected[nan_act], equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("mask_shape", [(3, 1, 7), (1, 5, 1), (3, 5, 1)])
def test_structured_mask(tk, mask_shape):
    x, bias, res, grad = make_inputs((3, 5, 7), torch.float32)
    y = tk.fused_dropout(x, bias, res, _state(0.4), "gelu", list(mask_shape))
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.4, "gelu", mask_shape))
    dx, _ = tk.fused_dropout_backward(grad, x, bias, _state(0.4), "gelu", list(mask_shape), False)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.4, "gelu", mask_shape)
    assert_bitwise_equal(dx, dx_ref)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_strided_input_keeps_layout(tk, layout):
    base = torch.randn(2, 6, 5, 3)
    x = {"transposed": base.transpose(1, 3), "sliced": base[:, 1:5, ::2],
         "channels_last": base.contiguous(memory_format=torch.channels_last)}[layout]
    y = tk.fused_dropout(x, None, None, _state(0.5), "silu", [])
    assert y.stride() == torch.empty_like(x).stride()
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(x.contiguous(), None, None, SEED, OFFSET, 0.5, "silu"))


def test_registered_ops_autograd_and_opcheck(tk):
    import dropout_ext  # noqa: F401  (registers the ops; the triton_ ones take CPU tensors here)

    ops = torch.ops.dropout_ext
    state = _state(0.25, seed=99, offset=3)
    x = torch.randn(6, 20, dtype=torch.float32, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    r = torch.randn(6, 20, requires_grad=True)
    y = ops.triton_fused_dropout(x, b, r, state, "gelu_tanh", [])
    g = torch.randn_like(y)
    y.backward(g)
    xd, bd = x.detach(), b.detach()
    assert torch.equal(y, ref.fused_dropout(xd, bd, r.detach(), 99, 3, 0.25, "gelu_tanh"))
    dx, db = ref.fused_dropout_backward(g, xd, bd, 99, 3, 0.25, "gelu_tanh", (), True)
    assert torch.equal(x.grad, dx) and torch.equal(r.grad, g)
    torch.testing.assert_close(b.grad, db)
    # The interpreter runs kernels on real data, so the fake-tensor and
    # compile checks of opcheck run on the GPU (test_gpu.py) instead.
    utils = ("test_schema", "test_autograd_registration")
    state = _state(0.5, seed=99, offset=3)
    torch.library.opcheck(ops.triton_fused_dropout, (x.detach().requires_grad_(), b, None, state, "silu", []),
                          test_utils=utils)
    torch.library.opcheck(ops.triton_fused_dropout_backward, (g, xd, bd, state, "relu", [], True), test_utils=utils)
    torch.library.opcheck(ops.triton_dropout_mask, (state, [3, 5]), test_utils=utils)
    assert torch.equal(ops.triton_dropout_mask(state, [3, 5]), ref.dropout_mask((3, 5), 0.5, 99, 3))


@pytest.mark.parametrize("p", [0.0, -0.0, 0.3, 1.0, 1 - 2**-53, 2**-40, 1.5, -0.25, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_p_from_state(tk, p, dtype):
    """The kernels derive t and the scale from p's bits in the state with the
    host's double arithmetic: the same bits as the reference, and a p out of
    [0, 1] (NaN included) read as the contract sanitises it."""
    pe = _sanitised(p)
    x, bias, res, grad = make_inputs((5, 12), dtype)
    assert_bitwise_equal(tk.fused_dropout(x, bias, res, _state(p), "gelu", []),
                         ref.fused_dropout(x, bias, res, SEED, OFFSET, pe, "gelu"))
    dx, db = tk.fused_dropout_backward(grad, x, bias, _state(p), "silu", [], True)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, pe, "silu", (), True)
    assert_bitwise_equal(dx, dx_ref)
    assert torch.equal(tk.dropout_mask(_state(p), [3, 7]), ref.dropout_mask((3, 7), pe, SEED, OFFSET))
    y = tk.fused_dropout(x, None, None, _state(p), "identity", [5, 1])
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, SEED, OFFSET, pe, "identity", (5, 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_no_state_keeps_everything(tk, dtype, activation):
    """state None (eval mode, p == 0 known on the host): every element kept,
    scale 1, whatever the mask shape; the same bits as p == 0."""
    x, bias, res, grad = make_inputs((3, 5, 8), dtype)
    for mask_shape in ([], [3, 1, 1]):
        y = tk.fused_dropout(x, bias, res, None, activation, mask_shape)
        assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.0, activation))
        for bias_grad in (False, True):
            dx, db = tk.fused_dropout_backward(grad, x, bias, None, activation, mask_shape, bias_grad)
            dx_ref, db_ref = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.0, activation, (), bias_grad)
            assert_bitwise_equal(dx, dx_ref)
            if bias_grad:
                torch.testing.assert_close(db, db_ref, atol=2e-2, rtol=1e-2)


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
    kernels = {k for k, _, _ in seen}
    assert kernels == {tk._flat_kernel, tk._rows_kernel, tk._mask_kernel}
    for kernel, device, meta in seen:
        assert not isinstance(kernel, Autotuner)
        assert device == x.device
        assert isinstance(meta["BLOCK"], int) and isinstance(meta["num_warps"], int)
        assert math.log2(meta["BLOCK"]).is_integer()
