"""The package needs its compiled extension: without it, one clear error."""

import subprocess
import sys
import textwrap

from conftest import ROOT


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
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
