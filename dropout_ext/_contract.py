"""The activations of the contract and their numeric constants, defined once
(docs/RNG.md, "Activations").

Every backend must evaluate the float32 activations with exactly these
constants, or the backends stop agreeing bit for bit. So they live here and
nowhere else: ``reference.py`` and ``triton_kernels.py`` read this table, and
the C++ header ``csrc/activation_constants.h`` (the CPU and CUDA kernels) is
generated from it by ``tools/gen_activation_constants.py``; a test regenerates
the header and compares it with the checked-in one.

The values are hex strings so that they are exact: each float32 entry is
checked at import to be representable in float32 (a typo cannot silently
round). The module needs only the standard library, so the generator runs
without torch.
"""

from __future__ import annotations

import struct

# The activation strings of the ops; a position is the activation's id (the
# ``Act`` enum of the C++ kernels, the ``ACT`` constexpr of the Triton ones).
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")

# (name, float32 value in hex, what it is)
F32_TABLE = (
    # exp(x) for x <= 0: k = rint(x * log2 e), r = x - k ln 2 (Cody-Waite),
    # a degree-7 Taylor polynomial in r, times 2**k.
    ("EXP_MIN", "-0x1.5cp+6", "-87: smaller arguments give 0 (no subnormal results)"),
    ("LOG2E", "0x1.715476p+0", "log2(e)"),
    ("ROUND_MAGIC", "0x1.8p+23", "1.5 * 2**23: adding and subtracting it rounds to an integer, ties to even"),
    ("LN2_HI", "0x1.62e4p-1", "ln 2, leading bits (k * LN2_HI is exact)"),
    ("LN2_LO", "0x1.7f7d1cp-20", "ln 2 - LN2_HI"),
    ("EXP_C7", "0x1.a01a02p-13", "1/7!"),
    ("EXP_C6", "0x1.6c16c2p-10", "1/6!"),
    ("EXP_C5", "0x1.111112p-7", "1/5!"),
    ("EXP_C4", "0x1.555556p-5", "1/4!"),
    ("EXP_C3", "0x1.555556p-3", "1/3!"),
    ("EXP_C2", "0x1p-1", "1/2!"),
    ("EXP_C1", "0x1p+0", "1/1!"),
    ("EXP_C0", "0x1p+0", "1/0!"),
    # gelu: erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z*z),
    # t = 1 / (1 + p z), Abramowitz & Stegun 7.1.26.
    ("SQRT1_2", "0x1.6a09e6p-1", "1/sqrt(2)"),
    ("AS_P", "0x1.4f740ap-2", "A&S 7.1.26 p"),
    ("AS_A1", "0x1.0fb844p+0", "A&S 7.1.26 a5 (AS_A1..AS_A5 are a5..a1, Horner's order)"),
    ("AS_A2", "-0x1.7401c6p+0", "A&S 7.1.26 a4"),
    ("AS_A3", "0x1.6be1c6p+0", "A&S 7.1.26 a3"),
    ("AS_A4", "-0x1.23531cp-2", "A&S 7.1.26 a2"),
    ("AS_A5", "0x1.04f20cp-2", "A&S 7.1.26 a1"),
    ("INV_SQRT_2PI", "0x1.988454p-2", "1/sqrt(2 pi), the normal pdf at 0"),
    # gelu_tanh: u = sqrt(2/pi) (v + c v^3)
    ("SQRT_2_OVER_PI", "0x1.988454p-1", "sqrt(2/pi)"),
    ("GELU_TANH_C", "0x1.6e4e26p-5", "0.044715"),
    ("GELU_TANH_3C", "0x1.12ba9ep-3", "3 * 0.044715, the derivative's"),
)

# (name, float64 value in hex, what it is): the float64 activations, which use
# the C library (or torch) and agree across backends to an ulp or two.
F64_TABLE = (
    ("SQRT1_2_F64", "0x1.6a09e667f3bcdp-1", "1/sqrt(2)"),
    ("INV_SQRT_2PI_F64", "0x1.9884533d43651p-2", "1/sqrt(2 pi)"),
    ("SQRT_2_OVER_PI_F64", "0x1.9884533d43651p-1", "sqrt(2/pi)"),
    ("GELU_TANH_C_F64", "0x1.6e4e26d4801f7p-5", "0.044715"),
)


def _float32_exact(name: str, text: str) -> float:
    value = float.fromhex(text)
    if struct.unpack("<f", struct.pack("<f", value))[0] != value:
        raise ValueError(f"{name} = {text} is not a float32 value")
    return value


F32 = {name: _float32_exact(name, text) for name, text, _ in F32_TABLE}
F64 = {name: float.fromhex(text) for name, text, _ in F64_TABLE}
