"""The benchmark suite runs end to end at a tiny size (no timing claims), so
it cannot rot."""

import os
import re
import sys

import pytest
import torch

import dropout_ext
from conftest import ROOT, run_child


def test_benchmark_suite_smoke():
    out = run_child([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks"), "--benchmark-only",
                     "--bench-mode=smoke", "--bench-device=cpu", "-q", "-p", "no:cacheprovider"],
                    env={"DROPOUT_EXT_BACKEND": None}, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "dropout_ext benchmark report" in out.stdout
    assert "dropout_ext[cpu/packed]" in out.stdout and "dropout_ext[cpu/regenerate]" in out.stdout
    assert "dropout_ext_fused" in out.stdout  # the transformer-block memory table
    # dropout + residual + LayerNorm / RMSNorm: every direction of each has a
    # report row per implementation, with its saved bytes per element
    # (the table's last column) measured, not "-".
    for op in ("dropout_add_norm", "dropout_add_rmsnorm"):
        for direction in ("forward", "backward", "forward_backward"):
            for impl in ("dropout_ext[cpu]", "eager", "torch.compile"):
                row = re.search(rf"^{op} +{direction} +float32 .* {re.escape(impl)} .* (\S+)$", out.stdout, re.M)
                assert row is not None, f"no report row for {op} {direction} {impl}:\n{out.stdout[-4000:]}"
                assert row.group(1) != "-", f"no saved bytes for {op} {impl}:\n{row.group(0)}"
            assert re.search(rf"^{op} +{direction} +float32 .* copy ", out.stdout, re.M)
    # The modules a model calls, against nn.Dropout's: a speedup over it and
    # the device ops of a call (the columns before the saved bytes).
    for direction in ("forward", "forward_backward"):
        for impl in ("dropout_ext.Dropout", "nn.Dropout"):
            row = re.search(rf"^dropout +{direction} +float32 .* {re.escape(impl)} .* (\S+) +(\S+) +\S+$",
                            out.stdout, re.M)
            assert row is not None, f"no report row for dropout {direction} {impl}:\n{out.stdout[-4000:]}"
            assert re.fullmatch(r"\d+\.\d+x", row.group(1)) and row.group(2).isdigit(), row.group(0)
    # The GPT-2 training step: nn.Dropout and replace_dropout timed, and a
    # row for fuse_dropout, timed or with the reason it did not run.
    for variant in ("nn.Dropout", "replace_dropout"):
        assert re.search(rf"^{re.escape(variant)} +\d+\.\dms +\d+\.\d\dx +\d+ ", out.stdout, re.M), out.stdout[-4000:]
    assert re.search(r"^fuse_dropout +(\d+\.\dms|not run: )", out.stdout, re.M), out.stdout[-4000:]


def _bench_cases():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cases
    finally:
        sys.path.pop(0)
    return cases


@pytest.mark.parametrize("op", ["bias_gelu_dropout", "dropout_add_norm"])
@pytest.mark.parametrize("wrong", ["another p", "no scale", "another mask"])
def test_benchmark_check_rejects_a_wrong_result(op, wrong, monkeypatch):
    """The check the suite runs before timing an implementation passes
    dropout_ext and fails a dropout with another p, without the 1/(1 - p)
    scale, or with another mask."""
    cases = _bench_cases()
    inputs = cases.make_inputs(op, 4096, torch.bfloat16, torch.device("cpu"), False, 1)[0]
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    name = "dropout_ext[cpu]" if op in cases.NORM_OPS else "dropout_ext[cpu/regenerate]"
    cases.check_against_eager(op, name, inputs, grad)
    right = cases.ext_fn

    def broken(o, backend, mode, seed=None):
        if wrong == "another mask":
            return right(o, backend, mode, seed + 1)
        fn = right(o, backend, mode, seed)
        if wrong == "no scale":  # the dropout branch without its 1/(1 - p)
            if o in cases.NORM_OPS:
                return lambda x, *rest: fn(x * (1 - cases.P), *rest)
            return lambda *a: fn(*a) * (1 - cases.P)

        def another_p(*a):  # ext_fn's function reads P when called
            with monkeypatch.context() as m:
                m.setattr(cases, "P", 0.2)
                return fn(*a)
        return another_p

    monkeypatch.setattr(cases, "ext_fn", broken)
    with pytest.raises(AssertionError, match="does not compute"):
        cases.check_against_eager(op, name, inputs, grad)


@pytest.mark.parametrize("wrong", ["another p", "no scale", "drops nothing"])
def test_benchmark_check_rejects_a_wrong_module(wrong, monkeypatch):
    """dropout_ext's Dropout module, which draws its own mask, passes the
    check; a module dropping at another p, one without the 1/(1 - p)
    scale, and one that scales but drops nothing fail it."""
    cases = _bench_cases()
    inputs = cases.make_inputs("dropout", 4096, torch.float32, torch.device("cpu"), False, 1)[0]
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(0))
    cases.check_against_eager("dropout", "dropout_ext.Dropout", inputs, grad)

    def broken(p):
        if wrong == "another p":
            return dropout_ext.Dropout(2 * p)
        if wrong == "drops nothing":
            return lambda x: x / (1 - p)
        module = dropout_ext.Dropout(p)
        return lambda x: module(x) * (1 - p)

    monkeypatch.setitem(cases.MODULES, "dropout_ext.Dropout", broken)
    with pytest.raises(AssertionError, match="does not compute"):
        cases.check_against_eager("dropout", "dropout_ext.Dropout", inputs, grad)
