"""Reliability: layouts and odd sizes (with hypothesis), special values,
threads, leaks, and a tensor over 2**31 elements (slow; see README)."""

import gc
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dropout_ext
from dropout_ext import functional as F
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal

ops = torch.ops.dropout_ext
BACKENDS = [b for b in dropout_ext.available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", list(range(1, 68)))
def test_every_size_around_vector_widths(backend, n):
    x = torch.randn(n)
    y = F.fused_dropout(x, 0.5, activation="silu", seed=n, backend=backend)
    assert_bitwise_equal(y, ref.fused_dropout(x, None, None, n, 0, 0.5, "silu"))


def _layout(kind, base):
    if kind == "misaligned":
        flat = torch.randn(base.numel() + 3)
        return flat[3:].view(base.shape)
    if kind == "transposed":
        return base.transpose(0, -1)
    if kind == "expanded":
        return base[:1].expand(base.shape)
    if kind == "sliced":
        return base[::2, 1:]
    if kind == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if kind == "size1":
        return base[:, :1]
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["misaligned", "transposed", "expanded", "sliced", "channels_last", "size1"])
@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_layouts_forward_and_backward(backend, kind, activation):
    x = _layout(kind, torch.randn(5, 6, 7, 3)).requires_grad_()
    b = torch.randn(x.shape[-1], requires_grad=True)
    y = F.fused_dropout(x, 0.3, bias=b, activation=activation, seed=11, backend=backend)
    assert y.stride() == torch.empty_like(x).stride()
    xc = x.detach().contiguous()
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(xc, b.detach(), None, 11, 0, 0.3, activation))
    g = torch.randn(y.shape)
    y.backward(g)
    dx, db = ref.fused_dropout_backward(g, xc, b.detach(), 11, 0, 0.3, activation, (), True)
    if kind != "expanded":  # an expanded leaf's gradient is summed over the broadcast
        assert_bitwise_equal(x.grad.contiguous(), dx)
    torch.testing.assert_close(b.grad, db, atol=1e-4, rtol=1e-4)


def test_channels_last_3d():
    x = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    y = F.dropout(x, 0.5, seed=2)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(x.contiguous(), None, None, 2, 0, 0.5))


@st.composite
def _cases(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(rank))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    return dict(shape=shape, dtype=dtype, p=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
                activation=draw(st.sampled_from(["identity", "relu", "gelu", "gelu_tanh", "silu"])),
                bias=draw(st.booleans()), residual=draw(st.booleans()),
                transpose=draw(st.booleans()) and rank >= 2, seed=draw(st.integers(-(2**63), 2**64 - 1)),
                offset=draw(st.integers(0, 2**64 - 1)))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_cpu_kernel_equals_reference(case):
    g = torch.Generator().manual_seed(0)
    shape = case["shape"]
    x = (torch.randn(shape, generator=g) * 3).to(case["dtype"])
    if case["transpose"]:
        x = x.transpose(0, -1)
    b = torch.randn(x.shape[-1], generator=g).to(case["dtype"]) if case["bias"] and x.dim() else None
    r = torch.randn(x.shape, generator=g).to(case["dtype"]) if case["residual"] else None
    rng = torch.tensor([case["seed"] - 2**64 if case["seed"] >= 2**63 else case["seed"],
                        case["offset"] - 2**64 if case["offset"] >= 2**63 else case["offset"]])
    y = ops.fused_dropout(x, b, r, rng, case["p"], case["activation"], [])
    expected = ref.fused_dropout(x.contiguous(), b, r, case["seed"], case["offset"], case["p"], case["activation"])
    if case["dtype"] == torch.float64 and case["activation"] not in ("identity", "relu"):
        torch.testing.assert_close(y.contiguous(), expected, atol=1e-12, rtol=1e-12)
    else:
        assert_bitwise_equal(y.contiguous(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_special_values_follow_the_contract(dtype):
    info = torch.finfo(dtype)
    values = [float("nan"), float("inf"), -float("inf"), info.max, -info.max, info.tiny / 4, -info.tiny / 2,
              info.tiny, 0.0, -0.0, 1.0]
    x = torch.tensor(values * 200, dtype=torch.float32).to(dtype)
    p = 0.25
    y = F.dropout(x, p, seed=5)
    mask = F.dropout_mask(x.shape, p, 5)
    native = torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))
    # kept: nn.Dropout's arithmetic exactly (max * scale overflows to Inf when it does there)
    assert_bitwise_equal(y[mask], native[mask])
    # dropped: a zero, also for NaN and Inf (docs/RNG.md)
    assert torch.all(y[~mask] == 0)
    assert torch.isinf(native[mask & (x == info.max)]).all()  # the overflow case is exercised


def test_many_threads_at_once():
    """Python threads calling the CPU kernel at once: every output is a valid
    dropout of its input, explicit seeds give the reference's masks, and the
    default generator still reproduces its stream afterwards."""
    x = torch.randn(1 << 14)
    errors = []

    def work(k):
        try:
            for j in range(20):
                y = F.dropout(x, 0.5)  # draws from the default generator
                assert torch.all((y == 0) | (y == 2 * x))
                s = k * 100 + j
                assert torch.equal(F.dropout(x, 0.5, seed=s) != 0, ref.dropout_mask(x.shape, 0.5, s) | (x == 0))
        except Exception as exc:  # reported on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    torch.manual_seed(42)
    a = torch.randint(0, 1000, (5,))
    torch.manual_seed(42)
    assert torch.equal(a, torch.randint(0, 1000, (5,)))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_over_10000_forward_backward_calls():
    x = torch.randn(64, 256, requires_grad=True)
    b = torch.randn(256, requires_grad=True)

    def burst(n):
        for _ in range(n):
            F.fused_dropout(x, 0.3, bias=b, activation="gelu").sum().backward()
            F.dropout(x, 0.5).sum().backward()
        x.grad = b.grad = None
        gc.collect()

    burst(1000)
    before = _rss()
    burst(10_000)
    grown = _rss() - before
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 calls"


@pytest.mark.slow
def test_huge_tensor_over_2_31_and_2_32_elements():
    """64-bit indexing on the CPU: the mask at indices just below and above
    2**31 and 2**32 is the reference's. A bfloat16 tensor of 2**31 + 4096
    elements (4 GiB, and its output) through the fused op, then a keep mask
    of 2**32 + 4096 elements (4 GiB of bool)."""
    n = 2**31 + 4096
    x = torch.ones(n, dtype=torch.bfloat16)
    y = F.dropout(x, 0.5, seed=123, offset=9)
    idx = torch.arange(2**31 - 2048, n)
    assert torch.equal(y[idx] == 2, ref.keep_for_indices(idx, 0.5, 123, 9))
    assert torch.all((y[idx] == 0) | (y[idx] == 2))
    del x, y
    n = 2**32 + 4096
    m = F.dropout_mask((n,), 0.5, 123, 9)
    for centre in (2**31, 2**32):
        idx = torch.arange(centre - 2048, min(n, centre + 2048))
        assert torch.equal(m[idx], ref.keep_for_indices(idx, 0.5, 123, 9))
