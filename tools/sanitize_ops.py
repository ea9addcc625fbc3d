"""A small run of every dropout_ext op on the GPU, for compute-sanitizer
(memcheck, racecheck, initcheck): each GPU backend, every dtype, forward and
backward (with the bias gradient), the mask, structured masks, eval mode,
p = 0 and p = 1, and the layouts that take the kernels' edge paths (sizes
that are not a multiple of the vector width, a misaligned view, a strided
input, channels_last).

Only the public API is used, so it follows whatever path users take. Run it
under the sanitizer with PYTORCH_NO_CUDA_MEMORY_CACHING=1: the caching
allocator hands out blocks larger than asked for, which would hide an
out-of-bounds access from memcheck.

    compute-sanitizer --tool=memcheck --error-exitcode=1 python tools/sanitize_ops.py
"""

import sys

import torch

import dropout_ext
from dropout_ext import functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh", "silu"]


def _inputs(shape, dtype, gen):
    x = torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=gen, device="cuda").to(dtype).requires_grad_()
    res = torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    return x, bias, res


def run(backend: str) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = 0
    for dtype in DTYPES:
        # 1, 7 and 1000 + 3 elements per row: below, at odd offsets from, and
        # past the kernels' vector width and block size.
        for shape in [(1,), (7,), (5, 1003), (3, 4, 129)]:
            for act in ACTIVATIONS:
                for p in (0.0, 0.3, 1.0):
                    x, bias, res = _inputs(shape, dtype, gen)
                    y = F.fused_dropout(x, p, bias=bias, activation=act, residual=res, seed=123, backend=backend)
                    y.backward(torch.randn(y.shape, generator=gen, device="cuda").to(dtype))
                    calls += 1
            x, _, _ = _inputs(shape, dtype, gen)
            F.dropout(x, 0.5, seed=7, backend=backend).sum().backward()
            F.fused_dropout(x.detach(), 0.5, activation="gelu", training=False, backend=backend)
            dropout_ext.dropout_mask(shape, 0.5, seed=9, device="cuda", backend=backend)
            calls += 3
        base = torch.randn(4 * 64 * 9 * 9 + 1, generator=gen, device="cuda").to(dtype)
        misaligned = base[1:].view(4, 64, 9, 9)
        channels_last = misaligned.contiguous(memory_format=torch.channels_last)
        strided = misaligned.transpose(1, 3)
        for t in (misaligned, channels_last, strided):
            F.dropout(t, 0.25, seed=11, backend=backend)
            F.dropout2d(t, 0.25, seed=12, backend=backend)
            F.dropout(t, 0.25, seed=13, backend=backend, broadcast_dims=(0,))
            calls += 3
    return calls


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    backends = [b for b in ("cuda", "triton") if b in dropout_ext.available_backends("cuda")]
    print(f"GPU backends: {backends}", flush=True)
    if "cuda" not in backends:
        print("the CUDA kernels are not built (see the build log)", file=sys.stderr)
        return 2
    for backend in backends:
        calls = run(backend)
        torch.cuda.synchronize()
        print(f"{backend}: {calls} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
