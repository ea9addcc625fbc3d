"""The reference backend's op kernels read the dropout state by tensor ops
alone, as the device kernels do (their values: test_conformance.py).

A host read of a state on a GPU is a synchronisation per call, and breaks
CUDA-graph capture. On the meta device every host read raises, so kernels
run on meta tensors prove there is none, in the CPU suite. A state on the
CPU serves an input on another device (its words are host values then):
meta inputs stand for CUDA ones, since ATen takes a 0-dim CPU tensor as a
scalar argument of either.
"""

import math

import pytest
import torch

from dropout_ext import _ops
from dropout_ext import reference as ref
from dropout_ext._state import p_bits
from dropout_ext._validate import mask_bits_size

SHAPE = (6, 40)


def _make_state(p, device, seed=1234, offset=5):
    return torch.tensor([seed, offset, p_bits(p)], dtype=torch.int64, device=device)


def _calls(device):
    """(name, args) of every reference kernel, its tensors on ``device``:
    each op, with the packed mask written and read, structured, and the norms."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32):
        return (torch.rand(shape, generator=g) + 0.5).to(dtype=dtype, device=device)

    x, b = t(*SHAPE), t(SHAPE[-1])
    bits = torch.randint(0, 256, (mask_bits_size(x.numel()),), dtype=torch.uint8,
                         generator=g).to(device)
    rows = math.prod(SHAPE[:-1])
    return [
        ("fused_dropout", (x, b, x, "gelu", [], None, False)),
        ("fused_dropout", (x, b, None, "relu", [], None, True)),
        ("fused_dropout", (x, None, x, "identity", [SHAPE[0], 1], None, False)),
        ("fused_dropout", (x, None, None, "identity", [], bits, False)),
        ("fused_dropout_backward", (x, x, b, "gelu", [], True)),
        ("fused_dropout_backward", (x, None, None, "identity", [1, SHAPE[1]], False)),
        ("fused_dropout_backward", (x, x, b, "silu", [], True, bits)),
        ("dropout_mask", (list(SHAPE),)),
        ("dropout_add_norm", (x, x, b, b, "layer", 1e-5, False)),
        ("dropout_add_norm", (t(*SHAPE, dtype=torch.bfloat16), None, None, None, "rms", 1e-5, True)),
        ("dropout_add_norm_backward", (x, x, x, b, t(rows), t(rows), "layer", [True, True, True, True])),
        ("dropout_add_norm_backward", (x, None, x, None, t(0), t(rows), "rms", [True, False, True, False])),
    ]


# Where each op's schema takes the state.
STATE_AT = {"fused_dropout": 3, "fused_dropout_backward": 3, "dropout_mask": 0, "dropout_add_norm": 4,
            "dropout_add_norm_backward": 6}


def _run(kernels, name, args, state):
    at = STATE_AT[name]
    out = kernels[name](*args[:at], state, *args[at:])
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("state_device", ["meta", "cpu"])
@pytest.mark.parametrize("case", range(len(_calls("cpu"))))
def test_kernels_read_no_state_on_the_host(case, state_device):
    """Every kernel on meta inputs, with a meta state (any host read raises)
    and with a CPU state: outputs as the op's fake kernel gives them."""
    name, args = _calls("meta")[case]
    state = _make_state(0.3, state_device)
    out, fake = _run(ref.KERNELS, name, args, state), _run(_ops._FAKES, name, args, state)
    # The kernels return no drawn state: the op adds it (_ops._python_kernel).
    fake = fake[:-1] if name in _ops._DRAWING else fake
    assert [(o.shape, o.dtype, o.device) for o in out] == [(f.shape, f.dtype, f.device) for f in fake]


@pytest.mark.parametrize("p, same_as", [(float("nan"), 0.0), (-0.5, 0.0), (-math.inf, 0.0), (-0.0, 0.0),
                                        (1.5, 1.0), (math.inf, 1.0)])
@pytest.mark.parametrize("case", range(len(_calls("cpu"))))
def test_p_is_sanitised_as_the_device_kernels_do(case, p, same_as):
    """A device state's p is data no check has seen: NaN and negatives mean
    0, 1 and above drop everything (make_mask_params, csrc/philox.h)."""
    name, args = _calls("cpu")[case]
    for out, expected in zip(_run(ref.KERNELS, name, args, _make_state(p, "cpu")),
                             _run(ref.KERNELS, name, args, _make_state(same_as, "cpu")), strict=True):
        assert torch.equal(out, expected)
