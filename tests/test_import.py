"""The package needs its compiled extension: without it, one clear error.
The tests' child processes import the package the run imported."""

import os
import sys
import textwrap

import dropout_ext
from conftest import run_child


def test_import_without_compiled_extension_says_how_to_build():
    code = textwrap.dedent("""
        import sys
        sys.modules["dropout_ext._C"] = None   # as in a tree where _C was never built
        try:
            import dropout_ext
        except ImportError as exc:
            assert "dropout_ext._C" in str(exc) and "pip install" in str(exc), exc
            print("ok")
    """)
    out = run_child([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_child_processes_import_this_package():
    """The tests' child processes (conftest.run_child) import the package
    this run imported, never a source tree on their path."""
    code = "import os, dropout_ext; print(os.path.realpath(os.path.dirname(dropout_ext.__file__)))"
    out = run_child([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.realpath(os.path.dirname(dropout_ext.__file__))
