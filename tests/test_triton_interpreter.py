"""The Triton kernels checked against the reference under the Triton
interpreter, on the CPU, in the default run (the cases live in
triton_interpreted_cases.py).

Triton decides when it is first imported whether kernels are interpreted, so
the cases run in a child pytest with TRITON_INTERPRET=1 set from its start;
this test fails with the child's report if any case fails."""

import os
import subprocess
import sys

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_interpreted_cases.py")


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", CASES, "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::DeprecationWarning"],
                          env=env, capture_output=True, text=True, timeout=1800,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    summary = proc.stdout.strip().splitlines()[-1:] or [""]
    print(f"interpreted Triton tests: {summary[0]}")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]


def test_new_p_needs_no_new_specialisation():
    """t and the scale are runtime arguments: the kernel parameters that carry
    them are excluded from Triton's value specialisation, so a new p reuses
    the compiled kernel (checked on the kernel objects; no GPU needed)."""
    from dropout_ext import triton_kernels as tk

    for kernel in (tk._fwd_kernel, tk._bwd_kernel, tk._bwd_rows_kernel, tk._mask_kernel):
        params = {p.name: p for p in kernel.params}
        assert params["thr"].do_not_specialize and params["drop_all"].do_not_specialize
        assert params["thr"].annotation_type == "u32"
        if "scale" in params:
            assert params["scale"].do_not_specialize and params["scale"].annotation_type == "fp32"
