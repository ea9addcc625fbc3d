"""The Triton kernels checked against the reference under the Triton
interpreter, on the CPU, in the default run: the conformance suites' Triton
cases (tests/test_conformance.py and tests/test_norm.py, which have only
those under the interpreter) and the Triton-only ones
(triton_interpreted_cases.py).

Triton decides when it is first imported whether kernels are interpreted, so
the cases run in a child pytest with TRITON_INTERPRET=1 set from its start;
this test fails with the child's report if any case fails.

The child runs under this interpreter, or under each Python named in
DROPOUT_EXT_TRITON_PYTHON (paths separated by os.pathsep), e.g. venvs holding
other Triton releases: the child imports the dropout_ext this process
imported (conftest.run_child), so such a venv needs only torch, triton,
pytest and numpy.

    DROPOUT_EXT_TRITON_PYTHON=/venvs/triton-3.7.1/bin/python pytest tests/test_triton_interpreter.py
"""

import os
import sys

import pytest

from conftest import run_child

TESTS = os.path.dirname(os.path.abspath(__file__))
CASES = [os.path.join(TESTS, name) for name in ("test_conformance.py", "test_norm.py", "triton_interpreted_cases.py")]
PYTHONS = [p for p in os.environ.get("DROPOUT_EXT_TRITON_PYTHON", "").split(os.pathsep) if p] or [sys.executable]


def run_cases(python, extra_args=(), timeout=1800):
    """The interpreted cases under ``python``; the CompletedProcess."""
    cmd = [python, "-m", "pytest", *CASES, "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           *extra_args]
    return run_child(cmd, env={"TRITON_INTERPRET": "1", "DROPOUT_EXT_BACKEND": None}, timeout=timeout)


@pytest.mark.parametrize("python", PYTHONS)
def test_triton_kernels_under_interpreter(python):
    version = run_child([python, "-c", "import triton; print(triton.__version__)"])
    assert version.returncode == 0, f"{python} cannot import triton: {version.stderr[-2000:]}"
    proc = run_cases(python)
    summary = proc.stdout.strip().splitlines()[-1:] or [""]
    print(f"interpreted Triton {version.stdout.strip()} tests: {summary[0]}")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]
