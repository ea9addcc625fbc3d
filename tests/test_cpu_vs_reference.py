"""The fused CPU kernel equals the reference bit for bit: masks, outputs and
input gradients, for every dtype, odd shapes, p, activation, bias/residual and
layout. Float64 activations other than identity/relu use the C library on
both sides, so they are compared to rounding instead (docs/RNG.md)."""

import pytest
import torch

from dropout_ext import functional as F
from dropout_ext import reference as ref
from conftest import TOLERANCES, assert_bitwise_equal, check_contract, make_inputs

ops = torch.ops.dropout_ext
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1,), (3,), (67,), (5, 7), (33, 65), (2, 3, 129), (4, 1, 1025)]
PS = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (67,), (1000, 3), (2, 3, 5, 7)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (123, 5), (2**64 - 1, 2**63 + 7), (-1, 3)])
def test_mask_equals_reference(shape, p, seed, offset):
    assert torch.equal(F.dropout_mask(shape, p, seed, offset),
                       ref.dropout_mask(shape, p, seed, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, False), (True, True), (False, True)])
def test_forward_backward_equal_reference(dtype, shape, p, activation, with_bias, with_res):
    x, bias, res, grad = make_inputs(shape, dtype)
    b = bias if with_bias else None
    r = res if with_res else None
    seed, offset = 2024, 11
    rng = torch.tensor([seed, offset])
    y = ops.fused_dropout(x, b, r, rng, p, activation, [])
    check_contract(y, ref.fused_dropout(x, b, r, seed, offset, p, activation), dtype, activation)
    gx, gb = ops.fused_dropout_backward(grad, x, b, rng, p, activation, [], with_bias)
    gx_ref, gb_ref = ref.fused_dropout_backward(grad, x, b, seed, offset, p, activation, (), with_bias)
    check_contract(gx, gx_ref, dtype, activation)
    if with_bias:
        _, atol, rtol = TOLERANCES[dtype]
        scale = max(1.0, gb_ref.abs().max().item())
        torch.testing.assert_close(gb, gb_ref, atol=atol * scale * shape[0], rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded", "offset"])
@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_strided_inputs(dtype, layout, activation):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, 5, 7, generator=g).to(dtype)
    if layout == "transposed":
        x = base.transpose(1, 3)
    elif layout == "sliced":
        x = base[:, ::2, 1:, ::3]
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":
        x = base[:, :1].expand(4, 6, 5, 7)
    else:
        x = base.flatten()[3:].view(-1)[: 6 * 5 * 7].view(6, 5, 7)
    rng = torch.tensor([7, 0])
    y = ops.fused_dropout(x, None, None, rng, 0.3, activation, [])
    assert_bitwise_equal(y, ref.fused_dropout(x.contiguous(), None, None, 7, 0, 0.3, activation))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=g).to(dtype).transpose(0, -1).contiguous().transpose(0, -1)
    gx, _ = ops.fused_dropout_backward(grad, x, None, rng, 0.3, activation, [], False)
    gx_ref, _ = ref.fused_dropout_backward(grad.contiguous(), x.contiguous(), None, 7, 0, 0.3, activation)
    assert_bitwise_equal(gx, gx_ref)


@pytest.mark.parametrize("mask_shape", [(4, 6, 1, 1), (1, 6, 5, 1), (4, 1, 5, 7), (1, 1, 1, 7)])
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_structured_mask_equals_reference(mask_shape, activation):
    x, bias, res, grad = make_inputs((4, 6, 5, 7), torch.float32, seed=3)
    rng = torch.tensor([99, 1])
    y = ops.fused_dropout(x, bias, res, rng, 0.4, activation, list(mask_shape))
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, 99, 1, 0.4, activation, mask_shape))
    keep = ref.dropout_mask(mask_shape, 0.4, 99, 1).expand(x.shape)
    # the applied mask is exactly dropout_mask(mask_shape, ...) broadcast
    plain = ops.fused_dropout(x, None, None, rng, 0.4, "identity", list(mask_shape))
    assert torch.equal(plain != 0, keep & (x != 0))
    gx, gb = ops.fused_dropout_backward(grad, x, bias, rng, 0.4, activation, list(mask_shape), True)
    gx_ref, gb_ref = ref.fused_dropout_backward(grad, x, bias, 99, 1, 0.4, activation, mask_shape, True)
    assert_bitwise_equal(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref, atol=1e-4, rtol=1e-5)


def test_thread_count_does_not_change_results():
    x, bias, res, grad = make_inputs((257, 1031), torch.float32, seed=5)
    rng = torch.tensor([5, 5])
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = ops.fused_dropout(x, bias, res, rng, 0.5, "gelu", [])
            gx, gb = ops.fused_dropout_backward(grad, x, bias, rng, 0.5, "gelu", [], True)
            results.append((y, gx, gb))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert_bitwise_equal(a, b)  # the bias reduction order is fixed by the shape


def test_large_streaming_path_equals_reference():
    # Above 16 MiB the AVX2 path writes with non-temporal stores.
    n = (1 << 22) + 13
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    rng = torch.tensor([31, 4])
    y = ops.fused_dropout(x, None, None, rng, 0.25, "identity", [])
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, 31, 4, 0.25))


def test_philox_known_answers():
    # Random123 kat_vectors: counter and key all zero, and all ones.
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in ref.philox4x32_10(z, z, z, z, 0, 0)] == \
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(w) for w in ref.philox4x32_10(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == \
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("lane,word", enumerate([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]))
def test_kernel_philox_known_answer_through_threshold(lane, word):
    # With seed 0 and offset 0, element `lane` takes the all-zero vector's
    # word `lane`: it is kept at t == word and dropped at t == word + 1.
    keep_at = F.dropout_mask((4,), word / 2**32, 0, 0)
    drop_at = F.dropout_mask((4,), (word + 1) / 2**32, 0, 0)
    assert bool(keep_at[lane]) and not bool(drop_at[lane])


def test_empty_and_zero_dim():
    for shape in [(0,), (3, 0), (0, 5)]:
        x = torch.randn(shape)
        y = ops.fused_dropout(x, None, None, torch.tensor([1, 0]), 0.5, "gelu", [])
        assert y.shape == x.shape
    x = torch.tensor(2.5)
    y = ops.fused_dropout(x, None, None, torch.tensor([1, 0]), 0.5, "identity", [])
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, 1, 0, 0.5))


def _rng3(seed, offset, p):
    import struct

    bits = struct.unpack("<q", struct.pack("<d", p))[0]
    return torch.tensor([seed, offset, bits])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_p_carried_in_rng_equals_p_argument(p, activation):
    """rng = [seed, offset, p bits] gives what [seed, offset] with p gives
    (the float argument is then ignored), for masks, outputs and gradients."""
    x, bias, res, grad = make_inputs((7, 33), torch.float32)
    rng2, rng3 = torch.tensor([5, 6]), _rng3(5, 6, p)
    assert_bitwise_equal(ops.fused_dropout(x, bias, res, rng3, 0.77, activation, []),
                         ops.fused_dropout(x, bias, res, rng2, p, activation, []))
    a = ops.fused_dropout_backward(grad, x, bias, rng3, 0.77, activation, [], True)
    b = ops.fused_dropout_backward(grad, x, bias, rng2, p, activation, [], True)
    assert_bitwise_equal(a[0], b[0])
    assert_bitwise_equal(a[1], b[1])
    assert torch.equal(ops.dropout_mask(rng3, [5, 9], 0.3), ops.dropout_mask(rng2, [5, 9], p))


@pytest.mark.parametrize("bad", [float("nan"), -0.5, 1.5])
def test_p_carried_in_rng_is_validated(bad):
    x = torch.randn(8)
    with pytest.raises(ValueError, match="dropout probability"):
        ops.fused_dropout(x, None, None, _rng3(1, 2, bad), 0.5, "identity", [])
