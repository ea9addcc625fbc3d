"""Without the compiled extension the package falls back to the reference,
with one clear warning."""

import subprocess
import sys
import textwrap

from conftest import ROOT


def test_fallback_without_compiled_extension():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["dropout_ext._C"] = None   # as in a tree where _C was never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import dropout_ext
            from dropout_ext import functional as F
        msgs = [str(w.message) for w in caught if "dropout_ext._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pure-PyTorch reference" in msgs[0]
        import torch
        assert dropout_ext.available_backends("cpu") == ["reference"]
        x = torch.randn(100)
        y = F.dropout(x, 0.5, seed=3)
        mask = dropout_ext.reference.dropout_mask((100,), 0.5, 3)
        assert torch.equal(y, torch.where(mask, x * 2.0, torch.copysign(torch.zeros(100), x)))
        # the fused op and its autograd too (the schemas live in Python, not in _C)
        xr = x.clone().requires_grad_()
        F.fused_dropout(xr, 0.5, activation="gelu", seed=3).sum().backward()
        dx, _ = dropout_ext.reference.fused_dropout_backward(torch.ones(100), x, None, 3, 0, 0.5, "gelu")
        assert torch.equal(xr.grad, dx)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
