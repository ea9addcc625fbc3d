"""Reliability of the CPU kernel beyond the contract's values (those are
test_conformance.py's): thread counts, the parallel split, Python threads,
leaks, and a tensor over 2**31 elements (slow; see README)."""

import gc
import os
import threading

import pytest
import torch

from dropout_ext import _ops, _state
from dropout_ext import functional as F
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, make_inputs

CPU = _ops.op_set("")


def test_thread_count_does_not_change_results():
    x, bias, res, grad = make_inputs((257, 1031), torch.float32, seed=5)
    state = _state.make_state(torch.device("cpu"), 0.5, 5, 5)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = CPU.forward(x, bias, res, state, "gelu", [])[0]
            gx, gb = CPU.backward(grad, x, bias, state, "gelu", [], True)
            results.append((y, gx, gb))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert_bitwise_equal(a, b)  # the bias reduction order is fixed by the shape


def test_tasks_of_the_parallel_split_equal_reference():
    """A size that ends mid-group and mid-byte, on 1 and 2 threads: on 2,
    at::parallel_for's split starts the second task mid-group (49159
    elements, 6145 bytes of packed bits each), which must pick up the
    Philox group and the byte where the first stopped, for the mask, the
    fused op and its packed bits."""
    n = 3 * (1 << 15) + 13
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    state = _state.make_state(torch.device("cpu"), 0.25, 31, 4)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, bits, _ = CPU.forward(x, None, None, state, "identity", [], None, True)
            assert_bitwise_equal(y, ref.fused_dropout(x, None, None, 31, 4, 0.25))
            keep = ref.dropout_mask((n,), 0.25, 31, 4)
            assert torch.equal(bits, ref.pack_bits(keep))
            assert torch.equal(CPU.mask(state, [n]), keep)
    finally:
        torch.set_num_threads(old)


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
