"""The Triton kernels compile to GPU code without a GPU: ahead of time, for
sm_80 and sm_90, with Triton's bundled ptxas. The PTX then shows what the
contract and the bandwidth target need: no FMA contraction (the activations
must round as written), IEEE division, and 128-bit global loads and stores
when the pointers are 16-byte aligned and a thread holds 16 bytes. Under the
interpreter (test_triton_interpreter.py) none of this is exercised."""

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dropout_ext import triton_kernels as K

ALIGNED = [["tt.divisibility", 16]]


def _compile(fn, signature, constexprs, aligned_args, arch, num_warps=8):
    attrs = {(i,): ALIGNED for i in aligned_args}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})


def _count(ptx, pattern):
    return len(re.findall(pattern, ptx))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,R", [("fp32", 4), ("bf16", 8), ("fp16", 8)])
@pytest.mark.parametrize("act", [0, 2, 3, 4])
def test_forward_kernel(arch, dtype, R, act):
    p = f"*{dtype}"
    sig = {"x_ptr": p, "bias_ptr": p, "res_ptr": p, "keep_ptr": p, "out_ptr": p, "rng_ptr": "*i64", "n": "i64",
           "H": "i32", "thr": "u32", "drop_all": "i32", "scale": "fp32", "ACT": "constexpr", "HAS_BIAS": "constexpr",
           "HAS_RES": "constexpr", "MASK_FROM_PTR": "constexpr", "SIZE_CLASS": "constexpr",
           "P_FROM_RNG": "constexpr", "R": "constexpr", "BLOCK": "constexpr"}
    consts = {"ACT": act, "HAS_BIAS": act != 0, "HAS_RES": True, "MASK_FROM_PTR": False, "SIZE_CLASS": 1,
              "P_FROM_RNG": act == 2, "R": R, "BLOCK": 2048}
    ptx = _compile(K._fwd_kernel, sig, consts, range(7), arch).asm["ptx"]
    assert _count(ptx, r"\bfma\.") == 0
    assert _count(ptx, r"div\.full|div\.approx") == 0
    if act in (2, 3, 4):
        assert _count(ptx, r"div\.rn\.f32") >= 1
    if act == 2:  # p read from the rng tensor: t and the scale in IEEE double
        assert _count(ptx, r"div\.rn\.f64") >= 1
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2  # x and residual, 16 bytes a thread
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1


@pytest.mark.parametrize("arch", [80, 90])
def test_backward_and_mask_kernels(arch):
    p = "*bf16"
    sig = {"g_ptr": p, "x_ptr": p, "bias_ptr": p, "keep_ptr": p, "dx_ptr": p, "d32_ptr": "*fp32", "rng_ptr": "*i64",
           "n": "i64", "H": "i32", "thr": "u32", "drop_all": "i32", "scale": "fp32", "ACT": "constexpr",
           "HAS_BIAS": "constexpr", "MASK_FROM_PTR": "constexpr", "STORE_F32": "constexpr", "SIZE_CLASS": "constexpr",
           "P_FROM_RNG": "constexpr", "R": "constexpr", "BLOCK": "constexpr"}
    consts = {"ACT": 2, "HAS_BIAS": True, "MASK_FROM_PTR": False, "STORE_F32": False, "SIZE_CLASS": 1,
              "P_FROM_RNG": False, "R": 8, "BLOCK": 2048}
    ptx = _compile(K._bwd_kernel, sig, consts, range(8), arch).asm["ptx"]
    assert _count(ptx, r"\bfma\.") == 0 and _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2

    sig = {"g_ptr": p, "x_ptr": p, "bias_ptr": p, "keep_ptr": p, "dx_ptr": p, "part_ptr": "*fp32", "rng_ptr": "*i64",
           "rows": "i64", "H": "i32", "thr": "u32", "drop_all": "i32", "scale": "fp32", "ACT": "constexpr",
           "HAS_BIAS": "constexpr", "MASK_FROM_PTR": "constexpr", "ROWS": "constexpr", "P_FROM_RNG": "constexpr",
           "R": "constexpr", "BLOCK": "constexpr"}
    consts = {"ACT": 4, "HAS_BIAS": True, "MASK_FROM_PTR": False, "ROWS": 16, "P_FROM_RNG": True, "R": 8,
              "BLOCK": 1024}
    ptx = _compile(K._bwd_rows_kernel, sig, consts, range(7), arch, num_warps=4).asm["ptx"]
    assert _count(ptx, r"\bfma\.") == 0 and _count(ptx, r"atom\.") == 0  # no atomics: deterministic

    sig = {"out_ptr": "*i1", "rng_ptr": "*i64", "n": "i64", "thr": "u32", "drop_all": "i32",
           "SIZE_CLASS": "constexpr", "P_FROM_RNG": "constexpr", "R": "constexpr", "BLOCK": "constexpr"}
    kernel = _compile(K._mask_kernel, sig, {"SIZE_CLASS": 1, "P_FROM_RNG": True, "R": 16, "BLOCK": 4096}, (0, 1),
                      arch)
    assert kernel.asm["cubin"]
