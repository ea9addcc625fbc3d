"""A small run of every dropout_ext op on the GPU, for compute-sanitizer
(memcheck, racecheck, initcheck): each GPU backend, forward and backward
(with the bias gradient) in both mask modes, the mask, structured masks,
eval mode, states given by seed= and drawn by the forward (its first thread
stores them; under graph capture a one-thread kernel draws), a captured
replay, dropout_add_norm (LayerNorm and RMSNorm, with h's gradient), and
the layouts that take the kernels' edge paths (sizes that are not a
multiple of the vector width, a misaligned view, a strided input,
channels_last). The full run takes every dtype and activation and p = 0,
0.3 and 1; ``--quick`` takes float32 and bfloat16, three activations and
p = 0.3, every kernel family still, in seconds under the sanitizer (what
tools/gpu_check.sh and tests/test_gpu.py run).

Only the public API is used, so it follows whatever path users take. Run it
under the sanitizer with PYTORCH_NO_CUDA_MEMORY_CACHING=1: the caching
allocator hands out blocks larger than asked for, which would hide an
out-of-bounds access from memcheck.

    compute-sanitizer --tool=memcheck --error-exitcode=1 python tools/sanitize_ops.py [--quick]
"""

import argparse
import sys
from typing import NamedTuple, Sequence, Tuple

import torch

import dropout_ext
from dropout_ext import functional as F


class Plan(NamedTuple):
    dtypes: Sequence[torch.dtype]
    # 1, 7 and 1000 + 3 elements per row: below, at odd offsets from, and
    # past the kernels' vector width and block size.
    shapes: Sequence[Tuple[int, ...]]
    activations: Sequence[str]
    ps: Sequence[float]


FULL = Plan(dtypes=[torch.float32, torch.float16, torch.bfloat16, torch.float64],
            shapes=[(1,), (7,), (5, 1003), (3, 4, 129)],
            activations=["identity", "relu", "gelu", "gelu_tanh", "silu"], ps=(0.0, 0.3, 1.0))
QUICK = Plan(dtypes=[torch.float32, torch.bfloat16], shapes=[(7,), (33, 65), (3, 5, 1028)],
             activations=["identity", "gelu", "silu"], ps=(0.3,))
MASK_MODES = ("regenerate", "packed")


def _randn(shape, dtype, gen, grad=True):
    return torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_(grad)


def run(backend: str, plan: Plan) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = 0
    for dtype in plan.dtypes:
        for shape in plan.shapes:
            for act in plan.activations:
                for p in plan.ps:
                    for mode in MASK_MODES:
                        x, res = _randn(shape, dtype, gen), _randn(shape, dtype, gen)
                        bias = _randn(shape[-1], dtype, gen)
                        # The packed mode's call draws its state, the other's takes seed=.
                        seed = 123 if mode == "regenerate" else None
                        y = F.fused_dropout(x, p, bias=bias, activation=act, residual=res, seed=seed, backend=backend,
                                            mask_mode=mode)
                        y.backward(_randn(shape, dtype, gen, grad=False))
                        calls += 1
            x = _randn(shape, dtype, gen)
            F.dropout(x, 0.5, seed=7, backend=backend).sum().backward()
            F.dropout(x, 0.5, backend=backend).sum().backward()
            F.fused_dropout(x.detach(), 0.5, activation="gelu", training=False, backend=backend)
            dropout_ext.dropout_mask(shape, 0.5, seed=9, device="cuda", backend=backend)
            calls += 4
            for norm, seed in (("layer", 5), ("rms", None)):
                x, res = _randn(shape, dtype, gen), _randn(shape, dtype, gen)
                w, b = _randn(shape[-1], dtype, gen), _randn(shape[-1], dtype, gen)
                y, h = F.dropout_add_norm(x, res, w, b, 0.3, norm=norm, prenorm=True, seed=seed, backend=backend)
                torch.autograd.backward([y, h], [_randn(shape, dtype, gen, grad=False)] * 2)
                calls += 1
        base = torch.randn(4 * 64 * 9 * 9 + 1, generator=gen, device="cuda").to(dtype)
        misaligned = base[1:].view(4, 64, 9, 9)
        channels_last = misaligned.contiguous(memory_format=torch.channels_last)
        strided = misaligned.transpose(1, 3)
        for t in (misaligned, channels_last, strided):
            F.dropout(t, 0.25, seed=11, backend=backend)
            F.dropout2d(t, 0.25, seed=12, backend=backend)
            F.dropout2d(t, 0.25, backend=backend)
            F.dropout(t, 0.25, seed=13, backend=backend, broadcast_dims=(0,))
            calls += 4
    return calls + _captured(backend, gen)


def _captured(backend: str, gen) -> int:
    """A drawing forward and its backward captured in a CUDA graph, replayed
    twice: the draw kernel reads the generator's replayed counters."""
    x = _randn((33, 65), torch.float32, gen)
    g = _randn((33, 65), torch.float32, gen, grad=False)

    def step():
        return torch.autograd.grad(F.dropout(x, 0.3, backend=backend), x, g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up before capture (Triton compiles)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        graph.replay()
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the reduced run (see above)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    backends = [b for b in ("cuda", "triton") if b in dropout_ext.available_backends("cuda")]
    print(f"GPU backends: {backends}", flush=True)
    if not backends:
        # Otherwise the run would sanitize nothing and pass.
        print("no GPU backend to run (see the build log)", file=sys.stderr)
        return 2
    if "cuda" not in backends:
        print("the CUDA kernels are not built: only the Triton kernels are run", flush=True)
    for backend in backends:
        calls = run(backend, QUICK if args.quick else FULL)
        torch.cuda.synchronize()
        print(f"{backend}: {calls} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
