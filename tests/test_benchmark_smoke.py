"""The benchmark suite runs end to end at a tiny size (no timing claims), so
it cannot rot."""

import os
import re
import sys

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
