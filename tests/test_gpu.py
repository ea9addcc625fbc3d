"""GPU backends (CUDA C++ and Triton) against the reference and each other,
on a GPU; every test here skips, with the reason, on a machine without one.

Bit equality with the reference on large and odd-sized tensors for every
dtype and activation; CUDA == Triton; misaligned, strided and channels_last
inputs; structured masks; a tensor over 2**31 elements; statistics;
torch.compile; CUDA-graph replays; checkpoint recompute; opcheck; the same
(seed, offset) draw for both backends; compute-sanitizer on a small run."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import dropout_ext
from dropout_ext import functional as F
from dropout_ext import reference as ref
from conftest import TOLERANCES, assert_bitwise_equal, check_contract, make_inputs, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GPU_BACKENDS = ["cuda", "triton"]


def _need(backend):
    if backend not in dropout_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here: {dropout_ext.available_backends('cuda')}")


def _op(backend):
    ops = torch.ops.dropout_ext
    if backend == "cuda":
        return ops.fused_dropout, ops.fused_dropout_backward, ops.dropout_mask
    from dropout_ext import _triton_ops  # noqa: F401

    return ops.triton_fused_dropout, ops.triton_fused_dropout_backward, ops.triton_dropout_mask


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (67,), (4097, 3), (257, 1024), (3, 1000, 777), (1 << 22,)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_mask_equals_reference(backend, shape, p):
    _need(backend)
    mask_op = _op(backend)[2]
    rng = torch.tensor([2**63 + 12345 - 2**64, 2**40 + 3], device="cuda")
    assert torch.equal(mask_op(rng, list(shape), p), ref.dropout_mask(shape, p, 2**63 + 12345, 2**40 + 3, device="cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (33, 65), (513, 1024), (2, 3, 4099)])
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("with_bias,with_res", [(False, False), (True, False), (True, True)])
def test_forward_backward_equal_reference(backend, dtype, shape, activation, with_bias, with_res):
    _need(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 is routed from the Triton backend to the CUDA kernel or the reference")
    fwd, bwd, _ = _op(backend)
    x, bias, res, grad = make_inputs(shape, dtype, device="cuda")
    b = bias if with_bias else None
    r = res if with_res else None
    rng = torch.tensor([2024, 11], device="cuda")
    y = fwd(x, b, r, rng, 0.3, activation, [])
    check_contract(y, ref.fused_dropout(x, b, r, 2024, 11, 0.3, activation), dtype, activation)
    dx, db = bwd(grad, x, b, rng, 0.3, activation, [], with_bias)
    dx_ref, db_ref = ref.fused_dropout_backward(grad, x, b, 2024, 11, 0.3, activation, (), with_bias)
    check_contract(dx, dx_ref, dtype, activation)
    if with_bias:
        _, atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(db, db_ref, atol=max(atol, 1e-4) * shape[0], rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_cuda_equals_triton(dtype, activation):
    _need("cuda")
    _need("triton")
    x, bias, res, grad = make_inputs((1031, 1024), dtype, device="cuda")
    rng = torch.tensor([5, 6], device="cuda")
    (f1, b1, _), (f2, b2, _) = _op("cuda"), _op("triton")
    assert_bitwise_equal(f1(x, bias, res, rng, 0.2, activation, []), f2(x, bias, res, rng, 0.2, activation, []))
    assert_bitwise_equal(b1(grad, x, bias, rng, 0.2, activation, [], False)[0],
                         b2(grad, x, bias, rng, 0.2, activation, [], False)[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["misaligned", "transposed", "sliced", "channels_last", "channels_last_3d"])
def test_layouts(backend, layout):
    _need(backend)
    fwd = _op(backend)[0]
    base = torch.randn(4, 6, 5, 7, 3, device="cuda")
    x = {"misaligned": base.flatten()[1:1 + 4 * 6 * 35].view(4, 6, 35),
         "transposed": base.transpose(1, 4), "sliced": base[:, 1:5, ::2],
         "channels_last": base[..., 0].contiguous(memory_format=torch.channels_last),
         "channels_last_3d": base.contiguous(memory_format=torch.channels_last_3d)}[layout]
    rng = torch.tensor([1, 2], device="cuda")
    y = fwd(x, None, None, rng, 0.5, "gelu", [])
    assert y.stride() == torch.empty_like(x).stride()
    assert_bitwise_equal(y.contiguous(), ref.fused_dropout(x.contiguous(), None, None, 1, 2, 0.5, "gelu"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mask_shape", [(8, 16, 1, 1), (8, 1, 9, 1), (1, 16, 1, 33)])
def test_structured_masks(backend, mask_shape):
    _need(backend)
    fwd, bwd, _ = _op(backend)
    x, bias, res, grad = make_inputs((8, 16, 9, 33), torch.float32, device="cuda")
    rng = torch.tensor([9, 0], device="cuda")
    y = fwd(x, bias, res, rng, 0.4, "silu", list(mask_shape))
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, 9, 0, 0.4, "silu", mask_shape))
    dx, _ = bwd(grad, x, bias, rng, 0.4, "silu", list(mask_shape), False)
    assert_bitwise_equal(dx, ref.fused_dropout_backward(grad, x, bias, 9, 0, 0.4, "silu", mask_shape)[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_over_2_31_elements(backend):
    """bfloat16 ones past 2**32 elements: each slice around 2**31 and 2**32
    carries the reference's keep bits (kept ones are exactly 2 at p = 0.5)."""
    _need(backend)
    n = 2**32 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 2 * n:
        pytest.skip(f"needs {3 * 2 * n / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    rng = torch.tensor([31, 7], device="cuda")
    y = _op(backend)[0](x, None, None, rng, 0.5, "identity", [])
    for centre in (2**31, 2**32):
        idx = torch.arange(centre - 4100, min(n, centre + 4100), device="cuda")
        keep = ref.keep_for_indices(idx, 0.5, 31, 7)
        assert torch.equal(y[idx] == 2, keep) and torch.all((y[idx] == 0) | keep)
    del y
    dx, _ = _op(backend)[1](x, None, None, rng, 0.5, "identity", [], False)
    idx = torch.arange(2**32 - 64, 2**32 + 64, device="cuda")
    assert torch.equal(dx[idx] == 2, ref.keep_for_indices(idx, 0.5, 31, 7))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_drop_rate_within_5_sigma(backend, p):
    _need(backend)
    n = 1 << 24
    m = _op(backend)[2](torch.tensor([int(p * 1e6), 0], device="cuda"), [n], p)
    dropped = n - int(m.sum())
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 5 * sigma


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_same_generator_state_same_mask_for_both_backends(backend):
    _need(backend)
    x = torch.randn(4096, device="cuda")
    torch.cuda.manual_seed(1234)
    a = F.dropout(x, 0.5, backend=backend)
    torch.cuda.manual_seed(1234)
    b = F.dropout(x, 0.5, backend="reference")
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_forward_backward(backend):
    _need(backend)
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    bias = torch.randn(1024, device="cuda", requires_grad=True)

    def f(x, b):
        return F.fused_dropout(x, 0.3, bias=b, activation="gelu", seed=42, backend=backend).sum()

    compiled = torch.compile(f, fullgraph=True)
    ge = torch.autograd.grad(f(x, bias), (x, bias))
    gc = torch.autograd.grad(compiled(x, bias), (x, bias))
    assert_bitwise_equal(gc[0], ge[0])
    torch.testing.assert_close(gc[1], ge[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_replays_draw_fresh_masks(backend):
    _need(backend)
    x = torch.ones(1 << 16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            F.dropout(x, 0.5, backend=backend)  # warm-up (Triton autotuning) before capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = F.dropout(x, 0.5, backend=backend)
    masks = []
    for _ in range(4):
        g.replay()
        torch.cuda.synchronize()
        masks.append((y != 0).clone())
    for i in range(len(masks)):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j])
        assert abs(masks[i].float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_reduce_overhead_fresh_masks(backend):
    _need(backend)
    x = torch.ones(1 << 16, device="cuda")
    f = torch.compile(lambda t: F.dropout(t, 0.5, backend=backend), mode="reduce-overhead", fullgraph=True)
    outs = [f(x).clone() for _ in range(5)]
    assert all(not torch.equal(outs[i], outs[i - 1]) for i in range(1, 5))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recompute_equal(backend, use_reentrant):
    _need(backend)
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(32, 256, device="cuda", requires_grad=True)
    w = torch.randn(256, 256, device="cuda", requires_grad=True)

    def block(t):
        return F.fused_dropout(t @ w, 0.3, activation="gelu", backend=backend) @ w

    torch.manual_seed(0)
    block(x).sum().backward()
    ref_grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    torch.manual_seed(0)
    checkpoint(block, x, use_reentrant=use_reentrant).sum().backward()
    assert_bitwise_equal(x.grad, ref_grads[0])
    assert_bitwise_equal(w.grad, ref_grads[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    _need(backend)
    fwd, bwd, mask = _op(backend)
    x, bias, res, grad = make_inputs((8, 40), torch.float32, device="cuda")
    rng = torch.tensor([3, 4], device="cuda")
    torch.library.opcheck(fwd, (x.requires_grad_(), bias, res, rng, 0.5, "gelu", []))
    torch.library.opcheck(bwd, (grad, x.detach(), bias, rng, 0.5, "gelu", [], True))
    torch.library.opcheck(mask, (rng, [5, 7], 0.5))


_SANITIZED = textwrap.dedent("""
    import torch
    from dropout_ext import functional as F
    for backend in {backends!r}:
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((7,), (33, 65), (3, 5, 1028)):
                x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                b = torch.randn(shape[-1], device="cuda", dtype=dtype, requires_grad=True)
                y = F.fused_dropout(x[..., 1:] if shape[-1] > 1 else x, 0.3, activation="gelu", backend=backend)
                y.sum().backward()
                F.fused_dropout(x, 0.3, bias=b, activation="silu", backend=backend).sum().backward()
    torch.cuda.synchronize()
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
def test_compute_sanitizer_clean(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    backends = [b for b in GPU_BACKENDS if b in dropout_ext.available_backends("cuda")]
    script = _SANITIZED.format(backends=backends)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    proc = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=1", sys.executable, "-c", script],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-10000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999, 1.0])
def test_p_carried_on_device_equals_host_p(backend, p):
    """rng = [seed, offset, p bits] on the GPU: the kernels derive t and the
    scale from p in device memory with the host's arithmetic."""
    import struct

    _need(backend)
    fwd, bwd, mask = _op(backend)
    x, bias, res, grad = make_inputs((33, 1024), torch.float32, device="cuda")
    bits = struct.unpack("<q", struct.pack("<d", p))[0]
    rng3, rng2 = torch.tensor([5, 6, bits], device="cuda"), torch.tensor([5, 6], device="cuda")
    assert_bitwise_equal(fwd(x, bias, res, rng3, 0.77, "gelu", []), fwd(x, bias, res, rng2, p, "gelu", []))
    assert_bitwise_equal(bwd(grad, x, bias, rng3, 0.77, "gelu", [], False)[0],
                         bwd(grad, x, bias, rng2, p, "gelu", [], False)[0])
    assert torch.equal(mask(rng3, [7, 9], 0.77), mask(rng2, [7, 9], p))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compiled_schedule_keeps_one_graph(backend, monkeypatch):
    _need(backend)
    from torch._dynamo.utils import counters

    from dropout_ext import schedules

    monkeypatch.setenv("DROPOUT_EXT_BACKEND", backend)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), dropout_ext.Dropout(0.1)).cuda()
    compiled = torch.compile(model, fullgraph=True)
    sched = schedules.DropoutScheduler(model, schedules.linear(0.1, 0.6, steps=5))
    x = torch.randn(4096, 64, device="cuda")
    counters.clear()
    for _ in range(6):
        with torch.no_grad():
            rate = (compiled(x) == 0).float().mean().item()
        assert abs(rate - sched.p) < 0.01
        sched.step()
    assert counters["stats"]["unique_graphs"] == 1
