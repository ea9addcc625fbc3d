"""The CUDA code paths of the Python API, traced without a GPU.

With torch's CUDA build, FakeTensorMode makes tensors on device="cuda" that
carry only metadata; the ops' fake kernels run on them. For every public
function and module and each GPU backend (auto, cuda, triton):

- torch.compile(fullgraph=True) captures the call in one graph (fullgraph
  turns a graph break into an error): under torch.no_grad through
  AOTAutograd too (backend aot_eager: functionalization, the fake kernels),
  and with gradients on through Dynamo alone; every tensor of the graph is
  on the GPU;
- a make_fx trace of forward and backward, in training and eval mode, with
  and without seed=, holds no CPU tensor and no device-to-host read: either
  would be a host synchronisation (or a host copy) on every call, and breaks
  CUDA-graph capture. The one CPU tensor allowed is seed='s host state,
  which only our ops read: their kernels take its words by value;
- one eager call of each public entry point issues the device work of one
  kernel launch per direction (its ops counted by dropout_ext.launches, each
  of ours as the kernels of its CUDA launch plan).

Without a GPU, torch's autograd engine cannot run a backward over CUDA
tensors, fake or not: it asks the driver about the device's streams first
(GraphTask::stash_current_streams). That rules out .backward(),
torch.autograd.grad and AOTAutograd's joint graph here. The backward is
traced instead by calling each node of the autograd graph directly, in
topological order (_grads_without_engine): the same backward formulas, with
none of the engine's stream bookkeeping.

A CPU-only torch cannot make fake CUDA tensors, so the file skips there; CI
runs it in a venv with torch's CUDA wheel and the extension built with its
CUDA kernels, where nothing may skip.
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import dropout_ext
from dropout_ext import functional as F
from dropout_ext.launches import LaunchCounter

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None,
    reason="needs torch's CUDA build (no GPU): CI runs this file in a venv with torch's CUDA wheel")

BACKENDS = ["auto", "cuda", "triton"]
# What a trace holds depends on the activation only through what autograd
# saves: identity's backward needs neither the input nor the bias, the
# others' need both (csrc/autograd.cpp); the fake kernels take any.
ACTIVATIONS = ["identity", "gelu"]
SEED = 1234
aten = torch.ops.aten

# Ops that read a device tensor's value on the host (a synchronisation), or
# whose output size depends on values (so the host must wait for them).
HOST_READS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.allclose.default,
}


def _need(backend: str) -> None:
    """Skip (fail under CI) a backend this build cannot run on CUDA tensors."""
    if backend == "auto":
        return
    available = dropout_ext.available_backends("cuda")
    if backend not in available:
        why = f"backend {backend!r} is not available for CUDA tensors here (available: {available})"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run every GPU backend in the CUDA venv")
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    # Each case compiles its own callables: no cache or recompile limit
    # carried over from another case.
    torch._dynamo.reset()
    monkeypatch.setattr(dropout_ext._backend, "DEFAULT_BACKEND", None)
    yield
    torch._dynamo.reset()


def _fake_mode():
    return FakeTensorMode()


# --- the cases: each builds, inside the fake mode, a callable and its inputs ---

@dataclass
class Case:
    name: str
    # (backend or None for auto, seed or None, training) -> (callable, inputs)
    make: Callable[[Optional[str], Optional[int], bool], Tuple[Callable, tuple]]
    takes_seed: bool          # a function with seed=: traced with and without it
    needs_seed: bool = False  # dropout_mask: seed is required
    module: bool = False      # a module: the backend comes from _backend.DEFAULT_BACKEND


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)


def _function_cases():
    cases = []

    def add(name, fn, shape, extra=(), dtype=torch.float32, takes_seed=True, needs_seed=False):
        def make(backend, seed, training):
            inputs = (_x(*shape, dtype=dtype),) + tuple(_x(*s, dtype=dtype) for s in extra)
            return (lambda *t: fn(*t, backend=backend, seed=seed, training=training)), inputs
        cases.append(Case(name, make, takes_seed, needs_seed))

    add("dropout", lambda x, **kw: F.dropout(x, 0.1, **kw), (8, 64))
    add("dropout-bf16", lambda x, **kw: F.dropout(x, 0.1, **kw), (8, 64), dtype=torch.bfloat16)
    add("dropout-broadcast_dims", lambda x, **kw: F.dropout(x, 0.1, broadcast_dims=(1,), **kw), (4, 6, 32))
    add("fused_dropout-plain", lambda x, **kw: F.fused_dropout(x, 0.1, **kw), (8, 64))
    add("fused_dropout-bias-relu", lambda x, b, **kw: F.fused_dropout(x, 0.1, bias=b, activation="relu", **kw),
        (8, 64), extra=[(64,)])
    for act in ACTIVATIONS:
        add(f"fused_dropout-bias-residual-{act}",
            lambda x, b, r, act=act, **kw: F.fused_dropout(x, 0.1, bias=b, residual=r, activation=act, **kw),
            (8, 64), extra=[(64,), (8, 64)])
    add("fused_dropout-bf16-gelu", lambda x, b, r, **kw: F.fused_dropout(x, 0.1, bias=b, residual=r,
                                                                         activation="gelu", **kw),
        (8, 64), extra=[(64,), (8, 64)], dtype=torch.bfloat16)
    add("fused_dropout-mask_shape",
        lambda x, **kw: F.fused_dropout(x, 0.1, activation="silu", mask_shape=(4, 1, 32), **kw), (4, 6, 32))
    add("dropout1d", lambda x, **kw: F.dropout1d(x, 0.2, **kw), (2, 4, 16))
    add("dropout2d", lambda x, **kw: F.dropout2d(x, 0.2, **kw), (2, 4, 4, 8))
    add("dropout3d", lambda x, **kw: F.dropout3d(x, 0.2, **kw), (2, 4, 2, 2, 8))
    add("alpha_dropout", lambda x, **kw: F.alpha_dropout(x, 0.2, **kw), (8, 64))
    add("feature_alpha_dropout", lambda x, **kw: F.feature_alpha_dropout(x, 0.2, **kw), (2, 4, 16))

    def mask_fn(x, backend, seed, training):
        keep = dropout_ext.dropout_mask(x.shape, 0.3, seed=seed, device=x.device, backend=backend)
        return x * keep.to(x.dtype) if training else x
    add("dropout_mask", mask_fn, (8, 64), needs_seed=True)
    return cases


def _module_cases():
    cases = []

    def add(name, build, shape, extra=(), on_gpu=True):
        def make(backend, seed, training):
            if on_gpu:
                # Built on the GPU: moving fake parameters with .to() fails
                # (their tensors cannot be swapped).
                with torch.device("cuda"):
                    module = build()
            else:
                module = build()
            module.train(training)
            inputs = (_x(*shape),) + tuple(_x(*s) for s in extra)
            return module, inputs
        cases.append(Case(name, make, takes_seed=False, module=True))

    add("Dropout", lambda: dropout_ext.Dropout(0.1), (8, 64))
    # nn.Dropout holds no tensor, so a drop-in is often never moved to the GPU.
    add("Dropout-left-on-cpu", lambda: dropout_ext.Dropout(0.1), (8, 64), on_gpu=False)
    add("Dropout-broadcast_dims", lambda: dropout_ext.Dropout(0.1, broadcast_dims=(1,)), (4, 6, 32))
    for act in ACTIVATIONS:
        add(f"FusedDropout-{act}", lambda act=act: dropout_ext.FusedDropout(0.1, activation=act), (8, 64),
            extra=[(64,), (8, 64)])
    add("Dropout1d", lambda: dropout_ext.Dropout1d(0.2), (2, 4, 16))
    add("Dropout2d", lambda: dropout_ext.Dropout2d(0.2), (2, 4, 4, 8))
    add("Dropout3d", lambda: dropout_ext.Dropout3d(0.2), (2, 4, 2, 2, 8))
    add("AlphaDropout", lambda: dropout_ext.AlphaDropout(0.2), (8, 64))
    add("FeatureAlphaDropout", lambda: dropout_ext.FeatureAlphaDropout(0.2), (2, 4, 16))
    add("LockedDropout", lambda: dropout_ext.LockedDropout(0.3, batch_first=True), (4, 6, 32))
    add("DropPath", lambda: dropout_ext.DropPath(0.2), (4, 6, 32))

    def swapped():
        model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 64))
        dropout_ext.replace_dropout(model)
        return model
    add("replace_dropout(model)", swapped, (8, 64))
    add("fuse_dropout(model)",
        lambda: dropout_ext.fuse_dropout(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1))), (8, 64))
    return cases


CASES = _function_cases() + _module_cases()


def _seeds(case):
    if case.needs_seed:
        return [SEED]
    return [None, SEED] if case.takes_seed else [None]


def _params(with_training):
    params = []
    for case in CASES:
        for seed in _seeds(case):
            for training in ([True, False] if with_training else [True]):
                ident = case.name + ("-seed" if seed is not None else "") + \
                    ("" if not with_training else ("-train" if training else "-eval"))
                params.append(pytest.param(case, seed, training, id=ident))
    return params


def _build(case, backend, seed, training, monkeypatch):
    _need(backend)
    if case.module and backend != "auto":
        monkeypatch.setattr(dropout_ext._backend, "DEFAULT_BACKEND", backend)
    return case.make(None if backend == "auto" else backend, seed, training)


def _tensors(value):
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


# --- torch.compile ----------------------------------------------------------

def _off_gpu(graphs, key):
    return [f"{node.format_node()}  -> {t.device}"
            for gm in graphs for node in gm.graph.nodes
            for t in _tensors(node.meta.get(key)) if t.device.type != "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,seed,training", _params(with_training=False))
def test_compile_fullgraph(case, seed, training, backend, monkeypatch):
    # AOTAutograd, for the inference graph: its joint graph would need the
    # autograd engine (see the module docstring).
    aot = CompileCounterWithBackend("aot_eager")
    with _fake_mode():
        fn, inputs = _build(case, backend, seed, training, monkeypatch)
        with torch.no_grad():
            out = torch.compile(fn, fullgraph=True, backend=aot)(*inputs)
        assert out.device.type == "cuda", out.device
    assert aot.frame_count == 1, f"{aot.frame_count} graphs"
    off_gpu = _off_gpu(aot.graphs, "example_value")
    assert not off_gpu, "tensors off the GPU in the compiled graph:\n" + "\n".join(off_gpu)

    # Dynamo, with inputs that need gradients: the training path's Python.
    torch._dynamo.reset()
    dynamo = CompileCounterWithBackend("eager")
    with _fake_mode():
        fn, inputs = _build(case, backend, seed, training, monkeypatch)
        out = torch.compile(fn, fullgraph=True, backend=dynamo)(*inputs)
        assert out.device.type == "cuda", out.device
        assert out.requires_grad
    assert dynamo.frame_count == 1, f"{dynamo.frame_count} graphs"
    off_gpu = _off_gpu(dynamo.graphs, "example_value")
    assert not off_gpu, "tensors off the GPU in the compiled graph:\n" + "\n".join(off_gpu)


# --- make_fx ---------------------------------------------------------------------

def _grads_without_engine(out, inputs, grad=None):
    """The gradients of out.sum() (or of ``out`` given its gradient
    ``grad``) for ``inputs``, by calling each autograd node's backward
    directly, producers before consumers (see the module docstring for why
    not the engine)."""
    grad = torch.ones_like(out) if grad is None else grad
    if out.grad_fn is None:
        return [grad if t is out else None for t in inputs]
    order, seen, stack = [], set(), [(out.grad_fn, False)]
    while stack:  # reverse post-order of a depth-first walk: a topological order
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    pending = {out.grad_fn: {0: grad}}
    grads = [None] * len(inputs)
    for node in reversed(order):
        received = pending.pop(node, {})
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            for i, t in enumerate(inputs):
                if t is node.variable:
                    grads[i] = received.get(0)
            continue
        call = node if callable(node) else node.apply  # C++ nodes, Python autograd.Function nodes
        outs = call(*[received.get(i) for i in range(len(node._input_metadata))])
        for (nxt, slot), g in zip(node.next_functions, outs if isinstance(outs, tuple) else (outs,)):
            if nxt is not None and g is not None:
                into = pending.setdefault(nxt, {})
                into[slot] = g if slot not in into else into[slot] + g
    return grads


def _forward_backward(fn):
    def traced(*inputs):
        out = fn(*inputs)
        return out, _grads_without_engine(out, inputs)
    return traced


def _host_states(gm):
    """The nodes holding seed='s host state (dropout_ext._state.host_state):
    three int64 words on the CPU whose only readers are our ops (through
    make_fx's lift_fresh_copy of a constant), which take them by value into
    the launch: no copy, no sync, a graph replay's launch holds them."""
    def value(node):
        return getattr(gm, node.target) if node.op == "get_attr" else node.meta.get("val")

    def only_ours_read(node):
        return bool(node.users) and all(
            user.op == "call_function" and (getattr(user.target, "namespace", None) == "dropout_ext" or (
                user.target is aten.lift_fresh_copy.default and only_ours_read(user)))
            for user in node.users)

    return {node for node in gm.graph.nodes
            if isinstance(value(node), torch.Tensor) and value(node).device.type == "cpu"
            and value(node).dtype == torch.int64 and tuple(value(node).shape) == (3,) and only_ours_read(node)}


def _problems(gm):
    problems = []
    host_states = _host_states(gm)
    for node in gm.graph.nodes:
        if node in host_states:
            continue
        if node.op == "call_function" and node.target in HOST_READS:
            problems.append(f"device-to-host read: {node.format_node()}")
        values = _tensors(node.meta.get("val"))
        if node.op == "get_attr":
            values.append(getattr(gm, node.target))
        for t in values:
            if isinstance(t, torch.Tensor) and t.device.type != "cuda":
                problems.append(f"a {t.device} tensor: {node.format_node()}")
        if node.op == "call_function" and any(isinstance(a, torch.device) and a.type != "cuda"
                                              for a in pytree.tree_leaves((node.args, node.kwargs))):
            problems.append(f"an op placed on another device: {node.format_node()}")
    return problems


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,seed,training", _params(with_training=True))
def test_make_fx_trace_stays_on_gpu(case, seed, training, backend, monkeypatch):
    with _fake_mode():
        fn, inputs = _build(case, backend, seed, training, monkeypatch)
        try:
            gm = make_fx(_forward_backward(fn), tracing_mode="fake")(*inputs)
        except DataDependentOutputException as exc:
            # A fake tensor has no value to give: .item(), .tolist(), bool(t)...
            raise AssertionError(f"device-to-host read while tracing ({exc})") from exc
    problems = _problems(gm)
    assert not problems, "\n".join(problems) + "\n\n" + gm.print_readable(print_output=False)
    (_, grads), = [node.args[0] for node in gm.graph.nodes if node.op == "output"]
    assert grads[0] is not None, "the trace computes no gradient for the input"


# --- sharded calls -------------------------------------------------------------

def _sharded_calls(x, bias, res, grad, x4, w):
    """Every op given a place: x a (6, 5, 3) shard at (1, 0, 4) of (7, 5, 11)
    (its packed bits the shard's size), x4 a (4, 3, 5, 7) shard at
    (0, 2, 0, 0) of (4, 6, 5, 7) under a channel mask of the global shape,
    and x's rows normalised whole at (1, 0, 0) of (7, 5, 3)."""
    ops = torch.ops.dropout_ext
    place = [7, 5, 11, 1, 0, 4]
    y, bits, st = ops.fused_dropout(x, bias, res, None, "gelu", [], None, True, 0.1, None, place)
    assert bits.shape == ((x.numel() + 7) // 8,)
    dx, db = ops.fused_dropout_backward(grad, x, bias, st, "gelu", [], True, None, place)
    keep = ops.dropout_mask(st, list(x.shape), place)
    y4 = ops.fused_dropout(x4, None, None, None, "relu", [4, 6, 1, 1], None, False, 0.2, None,
                           [4, 6, 5, 7, 0, 2, 0, 0])[0]
    rows = [7, 5, 3, 1, 0, 0]
    out, h, mean, rstd, nst = ops.dropout_add_norm(x, res, w, None, None, "layer", 1e-5, False, 0.1, None, rows)
    gi = ops.dropout_add_norm_backward(grad, None, h, w, mean, rstd, nst, "layer", [True, False, True, False],
                                       rows)[0]
    return y + dx + keep + out + gi, db, y4


def test_sharded_ops_stay_on_gpu():
    """The ops given a place compile into one graph and trace with make_fx on
    the GPU alone: the place is a list of ints in the graph, checked and
    shaped by the fake kernels with no device value read."""
    def inputs():
        return (_x(6, 5, 3), _x(3), _x(6, 5, 3), _x(6, 5, 3), _x(4, 3, 5, 7), _x(3))

    aot = CompileCounterWithBackend("aot_eager")
    with _fake_mode():
        with torch.no_grad():
            outs = torch.compile(_sharded_calls, fullgraph=True, backend=aot)(*inputs())
        assert [tuple(o.shape) for o in outs] == [(6, 5, 3), (3,), (4, 3, 5, 7)]
    assert aot.frame_count == 1, f"{aot.frame_count} graphs"
    off_gpu = _off_gpu(aot.graphs, "example_value")
    assert not off_gpu, "tensors off the GPU in the compiled graph:\n" + "\n".join(off_gpu)
    with _fake_mode():
        gm = make_fx(_sharded_calls, tracing_mode="fake")(*inputs())
    problems = _problems(gm)
    assert not problems, "\n".join(problems) + "\n\n" + gm.print_readable(print_output=False)


# backend lookup and fused modules

def test_fused_modules_of_a_gpu_model_keep_p_as_data():
    """fuse_dropout of a model already on the GPU (called outside any device
    context) makes its fused modules there, p buffer included, so under
    torch.compile p meets the input on its device, reaches the kernels as
    data, and a schedule that changes p keeps one graph."""
    from test_fusion import EveryPattern

    from dropout_ext import schedules

    aot = CompileCounterWithBackend("aot_eager")
    with _fake_mode():
        with torch.device("cuda"):
            model = EveryPattern()
        fused = dropout_ext.fuse_dropout(model)
        kinds = (dropout_ext.FusedDropout, dropout_ext.DropoutAddLayerNorm)
        made = [m for m in fused.modules() if isinstance(m, kinds)]
        assert len(made) == 3
        off_gpu = [f"{type(m).__name__}.{name}: {t.device}" for m in made
                   for name, t in list(m.named_parameters()) + list(m.named_buffers()) if t.device.type != "cuda"]
        assert not off_gpu, off_gpu
        compiled = torch.compile(fused, fullgraph=True, backend=aot)
        sched = schedules.DropoutScheduler(fused, schedules.linear(0.1, 0.5, steps=2))
        x = _x(8, 16)
        with torch.no_grad():
            for _ in range(3):
                assert compiled(x).device.type == "cuda"
                sched.step()
    assert aot.frame_count == 1, f"{aot.frame_count} graphs for 3 values of p"


# --- launches per eager call --------------------------------------------------

def _launch_plan(op, t, activation="identity", bias_grad=False):
    """The number of launches in the CUDA launch plan of ``op`` over ``t``
    (as the host driver plans it; the SM count moves grids, not launches)."""
    plan = torch.ops.dropout_ext_testing.cuda_launch_plan(op, t.numel(), t.shape[-1] if t.dim() else 1, t.dtype,
                                                          activation, bias_grad, 132)
    return len(plan) // 3


def _cuda_kernels(func, args, kwargs, out) -> int:
    """How many kernels the CUDA implementation of one of our ops launches
    (csrc/cuda/ops_impl.h) for this call."""
    name = func._schema.name.split("::", 1)[1]
    a = dict(zip((arg.name for arg in func._schema.arguments), args), **kwargs)
    if name == "draw_state":
        return 1  # the one-thread store of the drawn state, outside any plan
    if name == "dropout_mask":
        return _launch_plan("mask", out) if out.numel() else 0
    # With no element to launch for, a forward that drew its state stores it alone.
    store_alone = int(a.get("p") is not None)
    if name in ("dropout_add_norm", "dropout_add_norm_backward"):
        if a.get("grad", a.get("input")).numel() == 0:
            return store_alone if name == "dropout_add_norm" else 0
        if name == "dropout_add_norm":
            return _launch_plan("norm_forward", a["input"])
        # The plan hook plans both parameter gradients' reductions or
        # neither; the launcher runs one reduction per gradient asked.
        kernel = _launch_plan("norm_backward", a["grad"])
        assert _launch_plan("norm_backward", a["grad"], bias_grad=True) == kernel + 2
        return kernel + int(a["output_mask"][2]) + int(a["output_mask"][3])
    forward = name == "fused_dropout"
    t = a["input"] if forward else a["grad"]
    if t.numel() == 0:
        return store_alone if forward else 0
    # A structured mask (structured_mask): the mask kernel draws the small
    # keep mask first, where there is dropout to do.
    drawn = a.get("state") is not None or a.get("p") is not None
    structured = drawn and list(a["mask_shape"]) not in ([], list(t.shape))
    mask = _launch_plan("mask", t) if structured else 0
    if forward:
        return mask + _launch_plan("forward_packed" if out[1].numel() else "forward", t, a["activation"])
    bits = a.get("mask_bits") is not None and a["mask_bits"].numel() > 0
    return mask + _launch_plan("backward_read" if bits else "backward", t, a["activation"], a["bias_grad"])


# The CUDA backend's ops (no prefix: csrc/cuda registers them).
CUDA_OPS = {"fused_dropout", "fused_dropout_backward", "dropout_mask", "dropout_add_norm",
            "dropout_add_norm_backward", "draw_state"}


class _KernelCounter(LaunchCounter):
    """A LaunchCounter of the CUDA device, each of our ops counted as the
    kernels its CUDA implementation launches: ``kernels``, an op's name per
    launch."""

    def __init__(self):
        super().__init__("cuda")
        self.kernels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.count
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func.namespace == "dropout_ext":
            assert func._schema.name.split("::", 1)[1] in CUDA_OPS, f"{func} is not the CUDA backend's op"
            self.kernels.extend([str(func)] * _cuda_kernels(func, args, kwargs or {}, out))
        elif self.count > before:
            self.kernels.append(str(func))
        return out


# A GPT-2-small hidden activation; fake tensors allocate nothing.
B, T, H = 8, 1024, 768


def _bf16(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)


# (name, build: () -> (callable, inputs), kernels per forward, per backward).
# One launch per direction, as nn.Dropout: the forward draws (seed, offset)
# from the generator's host-side Philox state and passes it by value; seed=
# passes the host's words the same way; the backward draws the mask again
# from the state the forward returned, or reads the keep bits it packed.
# nn.Dropout's count is the reference. More only where the math asks for it:
# - a bias gradient (FusedDropout with a bias) is a reduction over rows:
#   the backward kernel writes per-block partial sums, a second kernel sums
#   them in a fixed order (deterministic, no atomics);
# - dropout_add_norm's backward: its kernel, then one such reduction for
#   each of the weight and bias gradients (at most 3);
# - a 16-bit weight or bias: the op sums its gradient in float32 (the
#   statistics' dtype, on every backend) and the autograd casts it, one
#   launch per such gradient; a reduction that stored the parameter's dtype
#   would save it (float32 parameters, autocast's way, have no cast);
# - a structured (channel) mask: the mask kernel draws the small keep mask,
#   one draw per channel, before the kernel that streams the tensor reads it,
#   in both directions (the backward draws it again from the saved state).
LAUNCH_CASES = [
    ("nn.Dropout(0.1)", lambda: (nn.Dropout(0.1), (_bf16(B, T, H),)), 1, 1),
    ("Dropout(0.1)", lambda: (dropout_ext.Dropout(0.1), (_bf16(B, T, H),)), 1, 1),
    ("F.dropout(seed=5)", lambda: (lambda x: F.dropout(x, 0.1, seed=5), (_bf16(B, T, H),)), 1, 1),
    ("F.dropout(packed)", lambda: (lambda x: F.dropout(x, 0.1, mask_mode="packed"), (_bf16(B, T, H),)), 1, 1),
    ("FusedDropout(gelu)(x, b, r)", lambda: (dropout_ext.FusedDropout(0.1, activation="gelu"),
                                             (_bf16(B, T, H), _bf16(H), _bf16(B, T, H))), 1, 2),
    ("F.dropout_add_norm(x, r, w, None)", lambda: (lambda x, r, w: F.dropout_add_norm(x, r, w, None, p=0.1),
                                                   (_bf16(B, T, H), _bf16(B, T, H), _bf16(H))), 1, 3),
    ("F.dropout_add_norm(x, r, w, b)", lambda: (lambda x, r, w, b: F.dropout_add_norm(x, r, w, b, p=0.1),
                                                (_bf16(B, T, H), _bf16(B, T, H), _bf16(H), _bf16(H))), 1, 5),
    # float32 parameters beside bfloat16 activations (autocast's way)
    ("F.dropout_add_norm(x, r, w32, b32)", lambda: (lambda x, r, w, b: F.dropout_add_norm(x, r, w, b, p=0.1),
                                                    (_bf16(B, T, H), _bf16(B, T, H), _x(H), _x(H))), 1, 3),
    ("Dropout2d(0.1)", lambda: (dropout_ext.Dropout2d(0.1), (_bf16(B, 16, 32, 32),)), 2, 2),
]


@pytest.mark.parametrize("name,build,forward,backward", LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_launches_per_eager_call(name, build, forward, backward):
    """Over fake CUDA tensors: the device ops of one eager call (views and
    empty outputs not counted), each of ours as its CUDA kernels, forward
    and then backward (the autograd nodes called as the engine calls them:
    under no_grad, given the output's gradient)."""
    _need("cuda")
    with _fake_mode():
        fn, inputs = build()
        with _KernelCounter() as fwd:
            out = fn(*inputs)
        grad = torch.ones_like(out)
        with _KernelCounter() as bwd, torch.no_grad():
            grads = _grads_without_engine(out, inputs, grad)
    assert all(g is not None for g in grads), grads
    assert (len(fwd.kernels), len(bwd.kernels)) == (forward, backward), \
        f"forward: {fwd.kernels}\nbackward: {bwd.kernels}"
