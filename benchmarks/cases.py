"""What the benchmark suite measures: ops, implementations, minimal byte
counts and the timers. Shared by the pytest-benchmark suite and its smoke
test."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as TF

import dropout_ext
from dropout_ext import functional as F

P = 0.1

# op -> (activation, bias?, residual?)
OPS: Dict[str, Tuple[str, bool, bool]] = {
    "dropout": ("identity", False, False),
    "bias_relu_dropout": ("relu", True, False),
    "bias_gelu_dropout": ("gelu", True, False),
    "bias_gelu_tanh_dropout": ("gelu_tanh", True, False),
    "bias_silu_dropout": ("silu", True, False),
    "dropout_residual": ("identity", False, True),
}
DEFAULT_OPS = ["dropout", "bias_gelu_dropout", "dropout_residual"]
DIRECTIONS = ("forward", "backward", "forward_backward")
HIDDEN = 1024  # last dimension: the bias length


def minimal_bytes(op: str, direction: str, numel: int, elem: int) -> int:
    """Bytes any implementation must move: each input read once, each output
    written once (the bias and the 16-byte (seed, offset) are negligible)."""
    act, bias, res = OPS[op]
    fwd = 2 + (1 if res else 0)            # read x (and residual), write y
    bwd = 2 + (1 if act != "identity" else 0)  # read dy (and x), write dx; dresidual is dy
    per = {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}[direction]
    return per * numel * elem


_ACT = {"identity": lambda v: v, "relu": torch.relu, "gelu": TF.gelu,
        "gelu_tanh": lambda v: TF.gelu(v, approximate="tanh"), "silu": TF.silu}


def eager_fn(op: str) -> Callable:
    act, _, _ = OPS[op]
    f = _ACT[act]

    def fn(x, b, r):
        v = x + b if b is not None else x
        y = TF.dropout(f(v), P, training=True)
        return r + y if r is not None else y

    return fn


def ext_fn(op: str, backend: str) -> Callable:
    act, _, _ = OPS[op]

    def fn(x, b, r):
        return F.fused_dropout(x, P, bias=b, activation=act, residual=r, backend=backend)

    return fn


def implementations(op: str, device: torch.device, kind: str) -> Dict[str, Callable]:
    """The implementations of one kind: every dropout_ext backend here, the
    eager composition, or torch.compile of it (built only when asked for)."""
    if kind == "dropout_ext":
        return {f"dropout_ext[{name}]": ext_fn(op, name)
                for name in dropout_ext.available_backends(device) if name != "reference"}
    if kind == "eager":
        return {"eager": eager_fn(op)}
    return {"torch.compile": torch.compile(eager_fn(op), dynamic=False)}


def make_inputs(op: str, numel: int, dtype, device, requires_grad: bool, copies: int):
    """`copies` independent input sets to rotate through, so a timed call
    does not find its data in the cache left by the previous one."""
    _, bias, res = OPS[op]
    rows = max(1, numel // HIDDEN)
    shape = (rows, HIDDEN) if numel >= HIDDEN else (numel,)
    sets = []
    for _ in range(copies):
        x = torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)
        b = torch.randn(shape[-1], dtype=dtype, device=device).requires_grad_(requires_grad) if bias else None
        r = torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad) if res else None
        sets.append((x, b, r))
    return sets


def make_call(fn: Callable, direction: str, sets) -> Callable[[int], None]:
    """A callable timing one direction on input set k."""
    if direction == "forward":
        return lambda k: fn(*sets[k])
    grads = [torch.randn_like(s[0]) for s in sets]
    if direction == "forward_backward":
        def call(k):
            x, b, r = sets[k]
            y = fn(x, b, r)
            torch.autograd.grad(y, [t for t in (x, b, r) if t is not None], grads[k])
        return call
    outs = [fn(*s) for s in sets]

    def call(k):
        x, b, r = sets[k]
        torch.autograd.grad(outs[k], [t for t in (x, b, r) if t is not None], grads[k], retain_graph=True)
    return call


def copy_call(numel: int, dtype, device, copies: int) -> Callable[[int], None]:
    srcs = [torch.randn(numel, device=device).to(dtype) for _ in range(copies)]
    return lambda k: srcs[k].clone()


def time_calls(calls: List[Callable[[int], None]], device: torch.device, copies: int, rounds: int,
               warmup: int) -> List[List[float]]:
    """Seconds per call for each callable, one sample per round, rotating the
    input sets. The callables alternate within each round, so a slow phase of
    the machine (page reclaim, another process) hits them alike and their
    ratio holds. On CUDA each sample is a CUDA-event interval after a
    synchronised warm-up."""
    for i in range(warmup):
        for call in calls:
            call(i % copies)
    samples: List[List[float]] = [[] for _ in calls]
    if device.type == "cuda":
        torch.cuda.synchronize()
    for i in range(rounds):
        for call, out in zip(calls, samples):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(i % copies)
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                call(i % copies)
                out.append(time.perf_counter() - t0)
    return samples


def saved_bytes_per_element(fn: Callable, op: str, dtype, device) -> float:
    """Bytes autograd keeps alive for backward, per element, measured with
    saved_tensors_hooks on a 2**16-element forward (each storage counted once;
    an input that is saved counts, since the graph keeps it alive)."""
    numel = 1 << 16
    (x, b, r), = make_inputs(op, numel, dtype, device, True, 1)
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, b, r)
    return sum(seen.values()) / numel


def median(samples: List[float]) -> float:
    return statistics.median(samples)


def sizes(device: torch.device, mode: str) -> List[int]:
    if mode == "smoke":
        return [1 << 12]
    top = 28 if device.type == "cuda" else 26
    if mode == "full":
        return [1 << k for k in range(16, top + 1, 2)]
    return [1 << 20, 1 << 24] if device.type == "cpu" else [1 << 20, 1 << 24, 1 << 28]


def dtypes(device: torch.device, mode: str):
    if mode == "smoke":
        return [torch.float32]
    out = [torch.float32, torch.bfloat16]
    if device.type == "cuda":
        out.append(torch.float16)
    return out


def rounds_for(numel: int, mode: str, device: torch.device) -> Tuple[int, int]:
    """(rounds, warm-up calls): enough rounds for a stable median, bounded so
    the slowest CPU case (nn.Dropout at 2**26) stays within seconds."""
    if mode == "smoke":
        return 1, 1
    if device.type == "cuda":
        return 100, 10
    if numel >= (1 << 26):
        return 7, 2
    return (15, 3) if numel >= (1 << 24) else (50, 5)


def log2(n: int) -> int:
    return int(math.log2(n))
