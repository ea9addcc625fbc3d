"""What only a GPU can show (every test here skips, with the reason, on a
machine without one): a tensor over 2**31 elements, drop rates, CUDA-graph
replays, torch.compile, checkpoint recompute, no host synchronisation, a
compiled schedule, compute-sanitizer, the device operations per call. The
GPU backends' masks, outputs and gradients against the reference (large,
odd, misaligned, strided and channels_last tensors, structured masks,
special values, p from device memory, the generator's draws, opcheck) are
test_conformance.py's gpu_cuda and gpu_triton cases.

The tests marked ``gpu_quick`` are the first minutes on a new GPU
(tools/gpu_check.sh runs them before anything else): a few shapes and dtypes
against the reference, CUDA-graph replays, no host synchronisation, and the
device operations per call (recorded as figures for the fused ops, asserted
as one per direction for the eager Dropout)."""

import os
import re
import shutil
import sys

import pytest
import torch

import dropout_ext
from dropout_ext import _ops, _state
from dropout_ext import functional as F
from dropout_ext import reference as ref
import test_conformance as conformance
import test_norm as norm_suite
from conftest import ROOT, assert_bitwise_equal, requires_cuda, run_child

pytestmark = requires_cuda
quick = pytest.mark.gpu_quick

GPU_BACKENDS = ["cuda", "triton"]
PREFIXES = {"cuda": "", "triton": "triton_"}


def _need(backend):
    if backend not in dropout_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here: {dropout_ext.available_backends('cuda')}")


def _ops_of(backend) -> _ops.OpSet:
    return _ops.op_set(PREFIXES[backend])


def _state_on_gpu(p, seed, offset):
    return _state.make_state(torch.device("cuda"), p, seed, offset)


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_over_2_31_elements(backend):
    """bfloat16 ones past 2**32 elements: each slice around 2**31 and 2**32
    carries the reference's keep bits (kept ones are exactly 2 at p = 0.5)."""
    _need(backend)
    n = 2**32 + 4099
    # Memory the caching allocator holds for earlier tests counts as used:
    # release it, or the check below skips on a GPU with room to spare.
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 2 * n:
        pytest.skip(f"needs {3 * 2 * n / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    state = _state_on_gpu(0.5, 31, 7)
    y = _ops_of(backend).forward(x, None, None, state, "identity", [])[0]
    for centre in (2**31, 2**32):
        idx = torch.arange(centre - 4100, min(n, centre + 4100), device="cuda")
        keep = ref.keep_for_indices(idx, 0.5, 31, 7)
        assert torch.equal(y[idx] == 2, keep) and torch.all((y[idx] == 0) | keep)
    del y
    dx, _ = _ops_of(backend).backward(x, None, None, state, "identity", [], False)
    idx = torch.arange(2**32 - 64, 2**32 + 64, device="cuda")
    assert torch.equal(dx[idx] == 2, ref.keep_for_indices(idx, 0.5, 31, 7))
    del dx
    # The packed mask mode: the bits packed past 2**31 and 2**32 elements are
    # the contract's, and the backward reads them there (0.5 GiB of bits).
    y, bits, _ = _ops_of(backend).forward(x, None, None, state, "identity", [], None, True)
    del y
    for centre in (2**31, 2**32):
        idx = torch.arange(centre - 4096, min(n, centre + 4096), device="cuda")
        assert torch.equal(ref.unpack_bits(bits[idx[0] // 8:(idx[-1] + 8) // 8], (idx.numel(),)),
                           ref.keep_for_indices(idx, 0.5, 31, 7))
    other = torch.bitwise_not(bits)  # the complement: a backward that drew the mask would not match
    dx, _ = _ops_of(backend).backward(x, None, None, state, "identity", [], False, other)
    idx = torch.arange(2**32 - 64, 2**32 + 64, device="cuda")
    assert torch.equal(dx[idx] == 2, ~ref.keep_for_indices(idx, 0.5, 31, 7))


@quick
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype, shape", [(torch.float32, (513, 1024)), (torch.bfloat16, (3, 4099))],
                         ids=conformance._id)
def test_quick_equals_the_reference(backend, dtype, shape, monkeypatch):
    """A corner of the full suites' GPU rows, for the first minutes on a new
    GPU: the fused op with a bias, gelu and a residual (the conformance
    suite's test_forward_backward) and dropout_add_norm with h's gradient
    (test_norm.py's check), on an aligned and an odd row length (each a
    Triton compile of every kernel: the minutes are short)."""
    _need(backend)
    b = conformance.Backend(f"gpu_{backend}", PREFIXES[backend], "cuda", backend)
    conformance.test_forward_backward(b, dtype, (shape, "bias+res"), 0.3, "gelu")
    for norm in ("layer", "rms"):
        norm_suite._check(b, monkeypatch, shape, dtype, norm, prenorm=True)


# The op's own kernels among the profiler's device events: the CUDA kernels'
# one __global__ template, the Triton kernels by their function names.
_OWN_KERNEL = re.compile(r"kernel_entry|^_\w+_kernel$")


def _device_ops(call, reps):
    """The names of the device operations (kernels, copies, fills) the
    profiler records over ``call(k)`` for k in range(reps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(reps):
            call(k)
        torch.cuda.synchronize()
    ops = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not ops:
        pytest.skip("the profiler recorded no device activity here (no CUPTI?)")
    return ops


@quick
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_quick_device_ops_per_call(backend, request):
    """The device operations (kernels, fills, copies) of one eager forward,
    counted by the profiler and recorded as figures, not asserted: the
    target is the op's one kernel, and today a forward also builds its state
    [seed, offset, p bits] on the device with a few small ops (docs/DESIGN.md).
    Asserted: each call runs the op's own kernel exactly once."""
    _need(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(64, 1024, device="cuda", generator=g) for _ in range(2))
    w, b = (torch.randn(1024, device="cuda", generator=g) for _ in range(2))
    calls = {
        "fused_dropout forward": lambda: F.fused_dropout(x, 0.1, bias=b, activation="gelu", residual=r,
                                                         backend=backend),
        "fused_dropout forward, seed=": lambda: F.fused_dropout(x, 0.1, bias=b, activation="gelu", residual=r,
                                                                seed=1, backend=backend),
        "dropout_add_norm forward": lambda: F.dropout_add_norm(x, r, w, b, 0.1, backend=backend),
    }
    reps = 5
    for name, call in calls.items():
        call()  # Triton compiles on the first call
        device_ops = _device_ops(lambda k: call(), reps)
        own = [op for op in device_ops if _OWN_KERNEL.search(op)]
        assert len(own) == reps, f"{name}: {len(own)} own kernels in {reps} calls; device ops: {device_ops}"
        request.node.user_properties.append((f"device ops per call, {name} [{backend}]",
                                             f"{len(device_ops) / reps:g}"))


@quick
def test_eager_dropout_one_device_op_per_direction():
    """The eager path's target: dropout_ext.Dropout's forward on a CUDA
    tensor is one device operation, its kernel (no state built on the
    device beside it), and its backward one, as nn.Dropout's are
    (native_dropout, and its backward's masked scale). nn.Dropout is
    counted the same way first: the check of the count itself."""
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    g = torch.randn(64, 1024, device="cuda")
    reps = 5
    for module in (torch.nn.Dropout(0.1), dropout_ext.Dropout(0.1)):
        name = f"{type(module).__module__}.{type(module).__name__}"
        if isinstance(module, dropout_ext.Dropout):
            name += f" [{dropout_ext.available_backends('cuda')[0]}]"
        torch.autograd.grad(module(x), x, g)  # first call: lazy set-up, Triton compiles
        forward = _device_ops(lambda k: module(x), reps)
        outs = [module(x) for _ in range(reps)]
        backward = _device_ops(lambda k: torch.autograd.grad(outs[k], x, g), reps)
        for direction, ops in (("forward", forward), ("backward", backward)):
            assert len(ops) == reps, f"{name} {direction}: {len(ops) / reps:g} device ops per call, not 1: {ops}"


@quick
def test_cuda_draw_is_the_generators_philox_words():
    """The CUDA draw (docs/RNG.md, "Where (seed, offset) come from"): after
    torch.cuda.manual_seed(s) a state's seed and offset are Philox4x32-10 at
    counter (offset / 4, 0, 0, 0) under key s, the generator moves on by 4
    per draw, and an eager forward draws the words draw_state draws."""
    _need("cuda")
    seed = 0x1234_5678_9ABC_DEF0
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.cuda.manual_seed(seed)
    like = torch.empty(0, device="cuda")
    start = gen.get_offset()
    states = [torch.ops.dropout_ext.draw_state(like, 0.5) for _ in range(2)]
    assert gen.get_offset() == start + 8
    for k, state in enumerate(states):
        c = start // 4 + k
        w = [int(t) for t in ref.philox4x32_10(torch.tensor(c & 0xFFFFFFFF), torch.tensor(c >> 32), torch.tensor(0),
                                               torch.tensor(0), seed & 0xFFFFFFFF, seed >> 32)]
        expected = [_state._signed(w[0] | w[1] << 32), _state._signed(w[2] | w[3] << 32), _state.p_bits(0.5)]
        assert state.tolist() == expected, k
    x = torch.randn(100, device="cuda")
    torch.cuda.manual_seed(seed)
    drawn = torch.ops.dropout_ext.fused_dropout(x, None, None, None, "identity", [], None, False, 0.5, None)[2]
    assert torch.equal(drawn, states[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p", [0.001, 0.5, 0.999])
def test_drop_rate_within_5_sigma(backend, p):
    _need(backend)
    n = 1 << 24
    m = _ops_of(backend).mask(_state_on_gpu(p, int(p * 1e6), 0), [n])
    dropped = n - int(m.sum())
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 5 * sigma


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


@quick
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mask_mode", ["regenerate", "packed"])
def test_cuda_graph_replays_draw_fresh_masks(backend, mask_mode):
    """Each replay of a captured forward and backward draws a fresh mask, and
    the backward applies the forward's (in the packed mode, from the bits the
    captured forward packed)."""
    _need(backend)
    x = torch.ones(1 << 16, device="cuda", requires_grad=True)
    g_out = torch.ones(1 << 16, device="cuda")

    def step():
        y = F.dropout(x, 0.5, backend=backend, mask_mode=mask_mode)
        (gx,) = torch.autograd.grad(y, x, g_out)
        return y.detach(), gx

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()  # warm-up (Triton autotuning) before capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, gx = step()
    masks = []
    for _ in range(4):
        g.replay()
        torch.cuda.synchronize()
        masks.append((y != 0).clone())
        assert torch.equal(gx, y)  # the backward of ones is the forward of ones: the same mask
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


@quick
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_synchronisation(backend):
    """The state lives on the GPU and the kernels read p, seed and offset from
    it: drawing it, the forward, the backward and the mask never synchronise
    with the host (torch's sync debug mode turns a synchronising call into an
    error), with seed= or from the generator, with and without a bias."""
    _need(backend)
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    b = torch.randn(1000, device="cuda", requires_grad=True)
    g = torch.randn(64, 1000, device="cuda")

    def work():
        F.dropout(x, 0.3, backend=backend).backward(g)
        F.fused_dropout(x, 0.3, bias=b, activation="gelu", backend=backend, mask_mode="packed").backward(g)
        F.fused_dropout(x, 0.3, bias=b, activation="gelu", seed=5, offset=2**40, backend=backend).backward(g)
        F.fused_dropout(x, 0.3, residual=x, training=False, backend=backend).backward(g)
        F.dropout2d(x.view(8, 8, 10, 100), 0.3, backend=backend)
        w = torch.ones(1000, device="cuda", requires_grad=True)
        y, h = F.dropout_add_norm(x, x.detach(), w, b, 0.3, prenorm=True, backend=backend)
        torch.autograd.backward([y, h], [g, g])
        F.dropout_add_norm(x, None, w, None, 0.3, norm="rms", backend=backend).backward(g)
        dropout_ext.dropout_mask((64, 1000), 0.3, seed=1, device="cuda", backend=backend)

    work()  # first calls: Triton compiles and autotunes (which synchronises)
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
def test_compute_sanitizer_clean(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = os.path.join(ROOT, "tools", "sanitize_ops.py")
    proc = run_child([sanitizer, f"--tool={tool}", "--error-exitcode=1", sys.executable, script, "--quick"],
                     env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-10000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compiled_schedule_keeps_one_graph(backend, monkeypatch):
    _need(backend)
    from torch._dynamo.utils import counters

    from dropout_ext import schedules

    monkeypatch.setattr(dropout_ext._backend, "DEFAULT_BACKEND", backend)
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


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_bias_and_residual_follow_the_input(backend):
    """CUDA autocast: a bfloat16 matmul output with a float32 bias and
    residual runs, in bfloat16, as with the casts done by hand."""
    _need(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, 256, device="cuda", generator=g)
    w = torch.randn(256, 128, device="cuda", generator=g)
    bias = torch.randn(128, device="cuda", generator=g)
    res = torch.randn(64, 128, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = a @ w
        out = F.fused_dropout(y, 0.2, bias=bias, residual=res, activation="gelu", seed=5, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = F.fused_dropout(y, 0.2, bias=bias.bfloat16(), residual=res.bfloat16(), activation="gelu", seed=5,
                               backend=backend)
    assert torch.equal(out, expected)


@quick
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dropout_add_norm_cuda_graph_replays(backend):
    """A captured dropout_add_norm forward and backward: every replay draws
    a fresh mask, h is the residual plus the dropped input, and the
    parameter gradients are the ordered sums of the eager call."""
    _need(backend)
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    r = torch.randn(64, 1024, device="cuda")
    w = torch.randn(1024, device="cuda", requires_grad=True)
    b = torch.randn(1024, device="cuda", requires_grad=True)
    g = torch.randn(64, 1024, device="cuda")

    def step():
        y, h = F.dropout_add_norm(x, r, w, b, 0.5, prenorm=True, backend=backend)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
        return h.detach(), gx, gw, gb

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, gx, gw, gb = step()
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        kept = h != r
        masks.append(kept.clone())
        torch.testing.assert_close(h[kept], (r + 2 * x.detach())[kept])
        assert torch.equal(gx == 0, ~kept)
        torch.testing.assert_close(gb, g.sum(0), rtol=1e-5, atol=1e-4)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dropout_add_norm_over_2_31_elements(backend):
    """Rows past 2**31 and 2**32 elements: h carries the contract's keep bits
    there (ones at p = 0.5 become 2 or 0), and each row of y is normalised."""
    _need(backend)
    H = 4099
    rows = (2**32 + 2 * H) // H
    n = rows * H
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 2 * n:
        pytest.skip(f"needs {4 * 2 * n / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.ones(rows, H, dtype=torch.bfloat16, device="cuda")
    state = _state_on_gpu(0.5, 31, 7)
    y, h, mean, rstd, _ = _ops_of(backend).norm(x, None, None, None, state, "layer", 1e-5, False)
    flat = h.view(-1)
    for centre in (2**31, 2**32):
        idx = torch.arange(centre - 4100, centre + 4100, device="cuda")
        assert torch.equal(flat[idx] == 2, ref.keep_for_indices(idx, 0.5, 31, 7))
    for row in (2**31 // H, 2**32 // H, rows - 1):
        want = torch.nn.functional.layer_norm(h[row].float(), (H,), eps=1e-5)
        torch.testing.assert_close(y[row].float(), want, rtol=2e-2, atol=2e-2)
