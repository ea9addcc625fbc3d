"""The benchmark suite runs end to end at a tiny size (no timing claims), so
it cannot rot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_suite_smoke():
    # The benchmarks start helper processes (benchmarks/transformer_block.py):
    # PYTHONPATH lets them import this checkout's dropout_ext, installed or not.
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""))
    env.pop("DROPOUT_EXT_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--bench-mode=smoke",
         "--bench-device=cpu", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "dropout_ext benchmark report" in out.stdout
    assert "dropout_ext[cpu/packed]" in out.stdout and "dropout_ext[cpu/regenerate]" in out.stdout
    assert "dropout_ext_fused" in out.stdout  # the transformer-block memory table
