"""What the benchmark suite measures: the cases (op, direction, dtype, size),
the implementations of each, minimal byte counts, input sets and the clocks.
Shared by the pytest-benchmark suite and its conftest.

Two op families: the fused dropout (``OPS``: residual + dropout(act(x +
bias)), input sets (x, bias, residual)) and dropout + residual + norm
(``NORM_OPS``: norm(residual + dropout(x)) * weight + bias, input sets
(x, residual, weight, bias)). An input set is a tuple of the op's arguments,
None where the op takes none; gradients are taken for every tensor in it."""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as TF

import dropout_ext
from dropout_ext import functional as F

P = 0.1
# Input sets a case rotates through, so a timed call does not find its data in
# the cache the previous call left warm (that would flatter the small sizes).
COPIES = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# op -> (activation, bias?, residual?)
OPS: Dict[str, Tuple[str, bool, bool]] = {
    "dropout": ("identity", False, False),
    "bias_relu_dropout": ("relu", True, False),
    "bias_gelu_dropout": ("gelu", True, False),
    "bias_gelu_tanh_dropout": ("gelu_tanh", True, False),
    "bias_silu_dropout": ("silu", True, False),
    "dropout_residual": ("identity", False, True),
}
# op -> the norm of y = norm(residual + dropout(x)) * weight + bias (RMSNorm has no bias)
NORM_OPS: Dict[str, str] = {
    "dropout_add_norm": "layer",
    "dropout_add_rmsnorm": "rms",
}
EPS = 1e-5
DEFAULT_OPS = ["dropout", "bias_gelu_dropout", "dropout_residual", "dropout_add_norm"]
# The smoke run adds the RMSNorm twin: its composition and kernel path are
# not LayerNorm's, and a tiny run of them costs little.
SMOKE_OPS = DEFAULT_OPS + ["dropout_add_rmsnorm"]
# The lease run (tools/gpu_check.sh on a GPU lent for minutes): the ops with
# a stated GPU target (BENCHMARKS.md), a training step's forward+backward
# only, in bfloat16: every torch.compile in a case costs seconds of a
# minutes-long budget.
LEASE_OPS = ["dropout", "bias_gelu_dropout", "dropout_add_norm"]
# The small run is the per-call cost a model pays: plain dropout against
# nn.Dropout, in the directions of a training step.
SMALL_OPS = ["dropout"]
DIRECTIONS = ("forward", "backward", "forward_backward")
# The modules a model calls, timed where the per-call cost is the question
# (the small run; the smoke run covers every path): a module call adds
# nn.Module's dispatch and the module's own checks to the function's.
MODULES = {"dropout_ext.Dropout": dropout_ext.Dropout, "nn.Dropout": torch.nn.Dropout}
MODULE_MODES = ("small", "smoke")
HIDDEN = 1024  # last dimension: the bias length, the normalized row


def minimal_bytes(op: str, direction: str, numel: int, elem: int) -> int:
    """Bytes any implementation must move: each input read once, each output
    written once (the bias and the 16-byte (seed, offset) are negligible).

    dropout + residual + norm (weight, bias and the per-row statistics are
    negligible too): forward reads x and residual and writes y; backward
    reads dy and h (the one tensor it cannot do without: without h it would
    read x and residual) and writes dx and dresidual (dh, no longer dy);
    forward+backward also writes h in the forward, for the backward to read."""
    if op in NORM_OPS:
        fwd, bwd = 3, 4
        per = {"forward": fwd, "backward": bwd, "forward_backward": fwd + 1 + bwd}[direction]
        return per * numel * elem
    act, bias, res = OPS[op]
    fwd = 2 + (1 if res else 0)            # read x (and residual), write y
    bwd = 2 + (1 if act != "identity" else 0)  # read dy (and x), write dx; dresidual is dy
    per = {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}[direction]
    return per * numel * elem


def impl_bytes(op: str, direction: str, impl: str, numel: int, elem: int) -> int:
    """The bytes an implementation's GB/s is computed from: the op's minimal
    bytes, or for clone() its own read and write."""
    return 2 * numel * elem if impl == "copy" else minimal_bytes(op, direction, numel, elem)


_ACT = {"identity": lambda v: v, "relu": torch.relu, "gelu": TF.gelu,
        "gelu_tanh": lambda v: TF.gelu(v, approximate="tanh"), "silu": TF.silu}


def eager_fn(op: str) -> Callable:
    """The eager composition of `op` (what torch.compile compiles too)."""
    if op in NORM_OPS:
        norm = NORM_OPS[op]

        def norm_fn(x, r, w, b):
            h = r + TF.dropout(x, P, training=True)
            if norm == "layer":
                return TF.layer_norm(h, h.shape[-1:], w, b, EPS)
            return TF.rms_norm(h, h.shape[-1:], w, EPS)

        return norm_fn
    act, _, _ = OPS[op]
    f = _ACT[act]

    def fn(x, b, r):
        v = x + b if b is not None else x
        y = TF.dropout(f(v), P, training=True)
        return r + y if r is not None else y

    return fn


MASK_MODES = ("packed", "regenerate")


def ext_fn(op: str, backend: str, mask_mode: Optional[str], seed: Optional[int] = None) -> Callable:
    """dropout_ext's `op` on `backend`; (seed, offset) drawn from the
    generator, or (`seed`, 0) when given (the check against eager)."""
    if op in NORM_OPS:
        norm = NORM_OPS[op]

        def norm_fn(x, r, w, b):
            return F.dropout_add_norm(x, r, w, b, P, EPS, norm=norm, seed=seed, backend=backend)

        return norm_fn
    act, _, _ = OPS[op]

    def fn(x, b, r):
        return F.fused_dropout(x, P, bias=b, activation=act, residual=r, seed=seed, backend=backend,
                               mask_mode=mask_mode)

    return fn


def masked_eager_fn(op: str, keep: torch.Tensor) -> Callable:
    """The eager composition of `op` with a given keep mask instead of a draw
    (nn.Dropout's arithmetic: kept elements times 1/(1 - p))."""
    scale = 1.0 / (1.0 - P)
    if op in NORM_OPS:
        norm = NORM_OPS[op]

        def norm_fn(x, r, w, b):
            h = r + x * keep * scale
            if norm == "layer":
                return TF.layer_norm(h, h.shape[-1:], w, b, EPS)
            return TF.rms_norm(h, h.shape[-1:], w, EPS)

        return norm_fn
    f = _ACT[OPS[op][0]]

    def fn(x, b, r):
        y = f(x + b if b is not None else x) * keep * scale
        return r + y if r is not None else y

    return fn


# The check's tolerance, norm-wise (||actual - expected|| <= RTOL * ||expected||
# over a whole output or gradient): each element is off by at most a few units
# of the dtype's rounding (one rounding on store of float32 math, or eager's
# roundings per op), and a gradient summed over rows by float32 rounding
# errors that add up like a random walk. A wrong mask, a wrong scale (1/(1-p)
# at p = 0.1 is 11%) or a dropped term of the norm's backward is off by
# percents to 100%.
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CHECK_SEED = 20261207


def _outputs_and_grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return [y.detach(), *torch.autograd.grad(y, wrt, grad)]


def check_against_eager(op: str, name: str, inputs, grad) -> None:
    """Raises AssertionError unless implementation `name` computes `op`: its
    output and every gradient against the eager composition, given the same
    mask. dropout_ext's backends run with an explicit seed, against eager in
    float64 with the contract's mask for that seed; torch.compile is compiled
    once more with Inductor's fallback_random, which draws the mask as eager
    does, and compared with eager from the same generator state (the timed
    compile draws from Inductor's own generator: only its mask differs);
    dropout_ext's module, which takes no seed, against eager with the mask
    read off its output, its dropped fraction within 6 sigma of p."""
    if name in ("eager", "copy", "nn.Dropout"):
        return
    x = inputs[0]
    wide = [t.double() if t is not None else None for t in inputs]
    if name in MODULES:
        actual = _outputs_and_grads(build_impl(op, name), inputs, grad)
        keep = actual[0] != 0  # the module draws its own mask: a zero is a dropped element (x has no zeros)
        n, dropped = keep.numel(), int((~keep).sum())
        assert abs(dropped / n - P) <= 6 * math.sqrt(P * (1 - P) / n), \
            f"{name} does not compute {op}: it dropped {dropped} of {n} elements at p = {P}"
        expected = _outputs_and_grads(masked_eager_fn(op, keep.double()), wide, grad.double())
    elif name.startswith("dropout_ext["):
        backend, _, mode = name[len("dropout_ext["):-1].partition("/")
        actual = _outputs_and_grads(ext_fn(op, backend, mode or None, seed=CHECK_SEED), inputs, grad)
        keep = F.dropout_mask(x.shape, P, CHECK_SEED, 0, device=x.device).double()
        expected = _outputs_and_grads(masked_eager_fn(op, keep), wide, grad.double())
    elif name == "torch.compile":
        with torch._inductor.config.patch(fallback_random=True):
            compiled = torch.compile(eager_fn(op), dynamic=False)
            torch.manual_seed(CHECK_SEED)
            actual = _outputs_and_grads(compiled, inputs, grad)
        torch._dynamo.reset()
        torch.manual_seed(CHECK_SEED)
        expected = _outputs_and_grads(eager_fn(op), inputs, grad)
    else:
        raise ValueError(f"unknown implementation {name!r}")
    rtol = CHECK_RTOL[x.dtype]
    what = ["output"] + [f"gradient {k}" for k in range(len(actual) - 1)]
    for label, a, e in zip(what, actual, expected):
        err = torch.linalg.vector_norm((a.double() - e.double()).flatten())
        size = torch.linalg.vector_norm(e.double().flatten())
        assert bool(err <= rtol * size), \
            f"{name} does not compute {op} ({x.dtype}): {label} off by {float(err / size):.3g} of its norm (> {rtol})"


def impl_names(op: str, device: torch.device, mode: str = "default") -> List[str]:
    """Every implementation of a case, in the order a paired round runs them:
    for plain dropout in the small and smoke runs dropout_ext's Dropout
    module first (its default backend and mask mode); each dropout_ext
    backend here (the reference is the oracle, not a contender), for the
    fused dropout in each mask mode ("dropout_ext[cpu/packed]"; the norm op
    has one, the mask regenerated: "dropout_ext[cpu]"); then nn.Dropout
    where the modules are timed, the eager composition (nn.Dropout's
    functional form for plain dropout), torch.compile of it, and clone() of
    the input, the copy ceiling of an op that reads and writes each element
    once."""
    backends = [name for name in dropout_ext.available_backends(device) if name != "reference"]
    if op in NORM_OPS:
        ext = [f"dropout_ext[{name}]" for name in backends]
    else:
        ext = [f"dropout_ext[{name}/{mask}]" for name in backends for mask in MASK_MODES]
    ours, theirs = (list(MODULES)[:1], list(MODULES)[1:]) if op == "dropout" and mode in MODULE_MODES else ([], [])
    return ours + ext + theirs + ["eager", "torch.compile", "copy"]


def build_impl(op: str, name: str) -> Callable:
    """The function of a named implementation ("copy" has none: see copy_call)."""
    if name in MODULES:
        module = MODULES[name](P)  # in training mode

        def call_module(x, b, r):
            return module(x)

        return call_module
    if name.startswith("dropout_ext[") and name.endswith("]"):
        backend, _, mode = name[len("dropout_ext["):-1].partition("/")
        return ext_fn(op, backend, mode or None)
    if name == "eager":
        return eager_fn(op)
    if name == "torch.compile":
        return torch.compile(eager_fn(op), dynamic=False)
    raise ValueError(f"unknown implementation {name!r}")


def make_inputs(op: str, numel: int, dtype, device, requires_grad: bool, copies: int):
    """`copies` independent input sets to rotate through."""
    rows = max(1, numel // HIDDEN)
    shape = (rows, HIDDEN) if numel >= HIDDEN else (numel,)
    sets = []
    if op in NORM_OPS:
        for _ in range(copies):
            x, r, w = (torch.randn(s, dtype=dtype, device=device).requires_grad_(requires_grad)
                       for s in (shape, shape, shape[-1:]))
            b = (torch.randn(shape[-1], dtype=dtype, device=device).requires_grad_(requires_grad)
                 if NORM_OPS[op] == "layer" else None)
            sets.append((x, r, w, b))
        return sets
    _, bias, res = OPS[op]
    for _ in range(copies):
        x = torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)
        b = torch.randn(shape[-1], dtype=dtype, device=device).requires_grad_(requires_grad) if bias else None
        r = torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad) if res else None
        sets.append((x, b, r))
    return sets


def make_grads(sets):
    return [torch.randn_like(s[0]) for s in sets]


def make_call(fn: Callable, direction: str, sets, grads) -> Callable[[int], None]:
    """A callable running one direction of `fn` on input set k. It returns
    nothing, so the output is freed inside the timed call, as in a training
    step, not kept alive across the next one."""
    if direction == "forward":
        def forward(k):
            fn(*sets[k])
        return forward
    wrt = [[t for t in s if t is not None] for s in sets]
    if direction == "forward_backward":
        def forward_backward(k):
            y = fn(*sets[k])
            torch.autograd.grad(y, wrt[k], grads[k])
        return forward_backward
    # Timing the backward alone replays each graph (retain_graph), which a
    # compiled backward that donates its saved buffers refuses; the graphs
    # are compiled here, on their first call, so only this direction's are
    # built without donation.
    with torch._functorch.config.patch(donated_buffer=False):
        outs = [fn(*s) for s in sets]

    def backward(k):
        torch.autograd.grad(outs[k], wrt[k], grads[k], retain_graph=True)
    return backward


def copy_call(sets) -> Callable[[int], None]:
    """clone() of the case's own input tensors, rotated like the op's."""
    srcs = [s[0].detach() for s in sets]

    def copy(k):
        srcs[k].clone()
    return copy


_cuda_last_event = None
_cuda_elapsed_s = 0.0


def cuda_event_timer() -> float:
    """A clock in seconds read from CUDA events, for pytest-benchmark's
    `timer` option. A reading records an event on the current stream and
    waits for it, so the difference of two readings is the GPU time between
    them, launch gaps included, and work queued before the first reading (a
    round's setup) is not counted. Intervals between readings are summed in
    float64: elapsed_time is a float32 count of milliseconds, too coarse to
    measure from one fixed origin over a whole run."""
    global _cuda_last_event, _cuda_elapsed_s
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _cuda_last_event is not None:
        _cuda_elapsed_s += _cuda_last_event.elapsed_time(event) / 1e3
    _cuda_last_event = event
    return _cuda_elapsed_s


def timer_for(device: torch.device) -> Callable[[], float]:
    return cuda_event_timer if device.type == "cuda" else time.perf_counter


def paired_round(calls: List[Callable[[int], None]], timer: Callable[[], float], k: int,
                 samples: List[List[float]], order: Optional[List[int]] = None) -> None:
    """One round of a paired measurement: each callable once on input set k,
    each timed alone, one after the other, in ``order`` (indices into
    ``calls``; default: as given), each time into its own list of
    ``samples``. Alternating within the round makes a slow phase of the
    machine (page reclaim, another process) hit every implementation alike,
    so their ratios hold."""
    for i in order if order is not None else range(len(calls)):
        t0 = timer()
        calls[i](k)
        samples[i].append(timer() - t0)


def round_orders(n: int, seed: int = 0) -> Iterator[List[int]]:
    """Orders for successive paired rounds of n callables, shuffled from a
    fixed seed: at a few microseconds a call, a call's time depends on what
    ran just before it (the caches and branch history the previous call, or
    the harness between rounds, left), so no implementation keeps one place
    or one predecessor in every round."""
    rng = random.Random(seed)
    order = list(range(n))
    while True:
        rng.shuffle(order)
        yield list(order)


def saved_bytes_per_element(fn: Callable, op: str, dtype, device) -> float:
    """Bytes autograd keeps alive for backward, per element, measured with
    saved_tensors_hooks on a 2**16-element forward (each storage counted once;
    an input that is saved counts, since the graph keeps it alive)."""
    numel = 1 << 16
    inputs, = make_inputs(op, numel, dtype, device, True, 1)
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values()) / numel


def median(samples: List[float]) -> float:
    return statistics.median(samples)


def tiny(device: torch.device, mode: str) -> bool:
    """Whether a run only shows that the suite works, with no timing claims:
    the smoke run, and the lease run off the GPU (a GPU mode, run on the CPU
    at smoke size so that it can be checked anywhere)."""
    return mode == "smoke" or (mode == "lease" and device.type != "cuda")


def sizes(device: torch.device, mode: str) -> List[int]:
    if tiny(device, mode):
        return [1 << 12]
    if mode == "lease":
        # One transformer layer's activations (8 x 2048 tokens x 1024) and a
        # size far past the L2 cache, both sizes of the default run.
        return [1 << 24, 1 << 28]
    if mode == "small":  # per-call overhead
        return [1 << 8, 1 << 10, 1 << 12, 1 << 14]
    top = 28 if device.type == "cuda" else 26
    if mode == "full":
        return [1 << k for k in range(16, top + 1, 2)]
    return [1 << 20, 1 << 24] if device.type == "cpu" else [1 << 20, 1 << 24, 1 << 28]


def dtypes(device: torch.device, mode: str) -> List[str]:
    if mode == "lease":
        return ["bfloat16"]
    if mode in ("smoke", "small"):
        return ["float32"]
    out = ["float32", "bfloat16"]
    if device.type == "cuda":
        out.append("float16")
    return out


def bench_cases(device: torch.device, mode: str) -> List[Tuple[str, str, str, int]]:
    """(op, direction, dtype, numel) of every case of a run, in run order."""
    ops = {"full": list(OPS) + list(NORM_OPS), "smoke": SMOKE_OPS, "lease": LEASE_OPS,
           "small": SMALL_OPS}.get(mode, DEFAULT_OPS)
    directions = {"lease": ("forward_backward",), "small": ("forward", "forward_backward")}.get(mode, DIRECTIONS)
    return [(op, d, dt, n) for op in ops for d in directions for dt in dtypes(device, mode)
            for n in sizes(device, mode)]


def size_id(numel: int) -> str:
    """2**24 -> "16Mi": test ids are matched by `pytest -k`, which rejects "^"."""
    for unit, shift in (("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if numel >= 1 << shift and numel % (1 << shift) == 0:
            return f"{numel >> shift}{unit}"
    return str(numel)


def case_id(op: str, direction: str, dtype: str, numel: int) -> str:
    return f"{op}-{direction}-{dtype}-{size_id(numel)}"


def rounds_for(numel: int, mode: str, device: torch.device) -> Tuple[int, int]:
    """(rounds, warm-up rounds): enough rounds for a stable median, bounded so
    the slowest CPU case (nn.Dropout at 2**26) stays within seconds."""
    if tiny(device, mode):
        return 1, 1
    if mode == "small":
        return 2000, 200
    if device.type == "cuda":
        return 100, 10
    if numel >= (1 << 26):
        return 7, 2
    return (15, 3) if numel >= (1 << 24) else (50, 5)


def log2(n: int) -> int:
    return int(math.log2(n))
