"""The Triton kernels under the Triton interpreter (TRITON_INTERPRET=1) on the
CPU: masks, outputs and gradients equal the reference bit for bit on small,
odd-sized tensors, for every activation and dtype the kernels take; the
registered ops, their autograd and opcheck too.

Run by test_triton_interpreter.py in a child pytest that has TRITON_INTERPRET=1
set before Triton is imported (the file name keeps it out of the main run)."""

import os

import pytest
import torch

from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, make_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (5, 13), (2, 3, 9), (3, 12)]
SEED, OFFSET = 0xF123456789ABCDEF, 2**32 + 5  # a seed >= 2**63: the sign bit reaches the key


@pytest.fixture(scope="module")
def tk():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_interpreter.py"
    from dropout_ext import triton_kernels

    assert triton_kernels._INTERPRET
    return triton_kernels


def _rng():
    return torch.tensor([SEED - 2**64, OFFSET], dtype=torch.int64)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (67,), (130,), (3, 5, 7)])
def test_mask(tk, shape, p):
    assert torch.equal(tk.dropout_mask(_rng(), list(shape), p), ref.dropout_mask(shape, p, SEED, OFFSET))


def test_mask_counter_crosses_2_32_groups(tk):
    """Group numbers past 2**32 use the counter's second word: check a slice
    whose group index crosses that boundary, through the offset word."""
    for offset in (0, 2**32 - 1, 2**64 - 1):
        rng = torch.tensor([7, offset - 2**64 if offset >= 2**63 else offset])
        assert torch.equal(tk.dropout_mask(rng, [4, 33], 0.5), ref.dropout_mask((4, 33), 0.5, 7, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, False), (True, True), (False, True)])
def test_forward_backward(tk, dtype, shape, activation, with_bias, with_res):
    x, bias, res, grad = make_inputs(shape, dtype)
    b = bias if with_bias else None
    r = res if with_res else None
    p = 0.3
    y = tk.fused_dropout(x, b, r, _rng(), p, activation, [])
    assert_bitwise_equal(y, ref.fused_dropout(x, b, r, SEED, OFFSET, p, activation))
    dx, db = tk.fused_dropout_backward(grad, x, b, _rng(), p, activation, [], with_bias)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, b, SEED, OFFSET, p, activation, (), with_bias)
    assert_bitwise_equal(dx, dx_ref)
    if with_bias:
        # the bias gradient is a sum: equal to rounding (docs/RNG.md)
        torch.testing.assert_close(db, db_ref, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_p_and_special_values(tk, dtype, p):
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40, -3.0e38, 7.0, 65504.0],
                     dtype=torch.float32).to(dtype)
    for activation in ref.ACTIVATIONS:
        y = tk.fused_dropout(x, None, None, _rng(), p, activation, [])
        expected = ref.fused_dropout(x, None, None, SEED, OFFSET, p, activation)
        # Where act(x) is NaN a dropped element is a zero of unspecified sign
        # (docs/RNG.md); everywhere else the bits must match.
        nan_act = torch.isnan(ref.fused_dropout(x, None, None, SEED, OFFSET, 0.0, activation))
        assert_bitwise_equal(y[~nan_act], expected[~nan_act])
        torch.testing.assert_close(y[nan_act], expected[nan_act], equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("mask_shape", [(3, 1, 7), (1, 5, 1), (3, 5, 1)])
def test_structured_mask(tk, mask_shape):
    x, bias, res, grad = make_inputs((3, 5, 7), torch.float32)
    y = tk.fused_dropout(x, bias, res, _rng(), 0.4, "gelu", list(mask_shape))
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, 0.4, "gelu", mask_shape))
    dx, _ = tk.fused_dropout_backward(grad, x, bias, _rng(), 0.4, "gelu", list(mask_shape), False)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, 0.4, "gelu", mask_shape)
    assert_bitwise_equal(dx, dx_ref)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_strided_input_keeps_layout(tk, layout):
    base = torch.randn(2, 6, 5, 3)
    x = {"transposed": base.transpose(1, 3), "sliced": base[:, 1:5, ::2],
         "channels_last": base.contiguous(memory_format=torch.channels_last)}[layout]
    y = tk.fused_dropout(x, None, None, _rng(), 0.5, "silu", [])
    assert y.stride() == torch.empty_like(x).stride()
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(x.contiguous(), None, None, SEED, OFFSET, 0.5, "silu"))


def test_registered_ops_autograd_and_opcheck(tk):
    from dropout_ext import _triton_ops  # noqa: F401  (registers the ops)

    ops = torch.ops.dropout_ext
    rng = torch.tensor([99, 3])
    x = torch.randn(6, 20, dtype=torch.float32, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    r = torch.randn(6, 20, requires_grad=True)
    y = ops.triton_fused_dropout(x, b, r, rng, 0.25, "gelu_tanh", [])
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
    torch.library.opcheck(ops.triton_fused_dropout, (x.detach().requires_grad_(), b, None, rng, 0.5, "silu", []),
                          test_utils=utils)
    torch.library.opcheck(ops.triton_fused_dropout_backward, (g, xd, bd, rng, 0.5, "relu", [], True), test_utils=utils)
    torch.library.opcheck(ops.triton_dropout_mask, (rng, [3, 5], 0.5), test_utils=utils)
    assert torch.equal(ops.triton_dropout_mask(rng, [3, 5], 0.5), ref.dropout_mask((3, 5), 0.5, 99, 3))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_p_carried_in_rng(tk, p, dtype):
    """With rng = [seed, offset, p bits] the kernels derive t and the scale
    themselves, with the host's double arithmetic: the same bits."""
    import struct

    bits = struct.unpack("<q", struct.pack("<d", p))[0]
    rng3 = torch.cat([_rng(), torch.tensor([bits])])
    x, bias, res, grad = make_inputs((5, 12), dtype)
    assert_bitwise_equal(tk.fused_dropout(x, bias, res, rng3, 0.9, "gelu", []),
                         ref.fused_dropout(x, bias, res, SEED, OFFSET, p, "gelu"))
    dx, db = tk.fused_dropout_backward(grad, x, bias, rng3, 0.9, "silu", [], True)
    dx_ref, _ = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, p, "silu", (), True)
    assert_bitwise_equal(dx, dx_ref)
    assert torch.equal(tk.dropout_mask(rng3, [3, 7], 0.9), ref.dropout_mask((3, 7), p, SEED, OFFSET))
    y = tk.fused_dropout(x, None, None, rng3, 0.9, "identity", [5, 1])
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, SEED, OFFSET, p, "identity", (5, 1)))
