"""Shared helpers for the test suite."""

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The static GPU model (tools/gpu_model.py) holds the one reading of ptxas's
# report, a cubin's resources and the occupancy rules, which the model's and
# the compile checks' tests import.
sys.path.insert(0, os.path.join(ROOT, "tools"))


@functools.lru_cache(maxsize=None)
def _package_folder() -> str:
    """A folder whose one entry, dropout_ext, links to the package this
    process imported: an installed copy, or a checkout with its extension
    built in place."""
    import dropout_ext

    folder = tempfile.mkdtemp(prefix="dropout_ext-child-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.symlink(os.path.dirname(os.path.abspath(dropout_ext.__file__)), os.path.join(folder, "dropout_ext"))
    return folder


def run_child(argv, env=None, timeout=300):
    """``argv`` (Python, or a tool that starts it) in a child process that
    imports the dropout_ext this process imported; its output as text, in
    the CompletedProcess. ``env``: variables to set, or to unset with None.

    The child's working directory and the front of its PYTHONPATH are a
    folder holding only that package: the checkout's root must not be on the
    child's path (a Python started in it puts it there), because the source
    tree's dropout_ext, which has no built extension when the package was
    installed non-editable, would shadow the installed one. A venv of
    another Triton then needs no dropout_ext of its own, only the Python and
    torch that the extension was built for."""
    folder = _package_folder()
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    for name, value in (env or {}).items():
        if value is None:
            child_env.pop(name, None)
        else:
            child_env[name] = value
    return subprocess.run(list(argv), cwd=folder, env=child_env, capture_output=True, text=True, timeout=timeout)


def leave_process_group(rank: int, world: int, folder: str) -> None:
    """Ends a spawned gloo rank that finished its work, without tearing its
    process group down: a rank that closes its connections while a peer's
    gloo threads still use theirs can abort the peer (std::terminate in
    gloo's threads, a SIGABRT the test would report). Every rank passes a
    barrier, then waits until all have passed it (files in ``folder``), and
    leaves with os._exit: no collective is in flight and no destructor runs.
    Never returns."""
    import time

    import torch.distributed as dist

    dist.barrier()
    open(os.path.join(folder, f"left-rank{rank}"), "w").close()
    deadline = time.monotonic() + 120
    while not all(os.path.exists(os.path.join(folder, f"left-rank{r}")) for r in range(world)):
        if time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.01)
    os._exit(0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for exact (sign-of-zero-aware) equality.
    Every NaN maps to one pattern: NaN payloads and signs differ between
    hardware and are not part of the contract (docs/RNG.md)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    t = t.contiguous()
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.view(view)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        idx = tuple(diff[0].tolist())
        raise AssertionError(f"{diff.shape[0]} of {a.numel()} elements differ; first at {idx}: "
                             f"{actual[idx].item()!r} vs {expected[idx].item()!r}")


# (dtype, atol, rtol) for comparisons that are not bitwise by contract.
TOLERANCES = {
    torch.float16: (torch.float16, 1e-3, 1e-3),
    torch.bfloat16: (torch.bfloat16, 1e-2, 1e-2),
    torch.float32: (torch.float32, 1e-5, 1e-5),
    torch.float64: (torch.float64, 1e-12, 1e-12),
}


def check_contract(actual, expected, dtype, activation):
    """Bit equality, except float64 gelu/gelu_tanh/silu, which use the C
    library on each side and agree to rounding (docs/RNG.md)."""
    if dtype != torch.float64 or activation in ("identity", "relu"):
        assert_bitwise_equal(actual, expected)
    else:
        _, atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def copies_made(run):
    """(run(), the aten::copy_ calls it made, those inside an op's
    implementation included: a C++ or Python kernel's contiguous() and copies)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run()
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")


def make_inputs(shape, dtype, seed=0, device="cpu"):
    """(x, bias, residual, grad) for a fused-op test, from a seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=device) * 3).to(dtype)
    bias = torch.randn(shape[-1], generator=g, device=device).to(dtype)
    res = torch.randn(shape, generator=g, device=device).to(dtype)
    grad = torch.randn(shape, generator=g, device=device).to(dtype)
    return x, bias, res, grad


class Snapshot:
    """The values and version counters of some tensors, to check that a call
    that failed changed none of them (``check()``). Non-tensors are ignored;
    meta tensors have no values, only their version counter."""

    def __init__(self, *tensors):
        self.items = [(t, t.detach().clone(), t._version) for t in tensors if isinstance(t, torch.Tensor)]

    def check(self):
        for t, copy, version in self.items:
            assert t._version == version, "an input's version counter moved"
            if t.device.type != "meta":
                assert torch.equal(t.detach(), copy), "an input's values changed"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (the huge-tensor one); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu_quick: the GPU tests of the first minutes on a new GPU "
                                       "(tools/gpu_check.sh runs them first); select with -m gpu_quick")


def pytest_terminal_summary(terminalreporter):
    """The figures tests record (``request.node.user_properties``, also in
    the JUnit XML): measured values reported, not asserted, such as the
    device operations per call that tests/test_gpu.py counts. One line
    each, ``figure: <name> = <value>``, for tools/gpu_check.sh to collect."""
    reports = [r for r in terminalreporter.stats.get("passed", []) if getattr(r, "user_properties", None)]
    if reports:
        terminalreporter.write_sep("-", "figures recorded by the tests")
        for report in reports:
            for name, value in report.user_properties:
                terminalreporter.write_line(f"figure: {name} = {value}  ({report.nodeid})")


# The one place GPU tests are marked. The condition is a string, evaluated
# when a test runs, so collecting the suite never queries CUDA.
requires_cuda = pytest.mark.skipif("not torch.cuda.is_available()",
                                   reason="needs a CUDA GPU; this machine has none")
