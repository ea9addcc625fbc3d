"""The Triton kernels compile to GPU code without a GPU: ahead of time, for
sm_80 and sm_90, with Triton's bundled ptxas and Triton's DEFAULT options
(floating-point fusion on, as every launch path gets them, torch.compile's
included). The PTX then shows what the contract and the bandwidth target
need: no FMA contraction anywhere (the activations round as written because
the kernels emit explicitly rounded instructions), IEEE division only, and
128-bit global loads and stores when the pointers are 16-byte aligned, also
for an element count that is not a multiple of 16. Under the interpreter
(test_triton_interpreter.py) none of this is exercised."""

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dropout_ext import triton_kernels as K

ALIGNED = [["tt.divisibility", 16]]
DTYPES = [("fp32", 4), ("bf16", 2), ("fp16", 2)]


def _compile(fn, types, constexprs, arch, num_warps=8):
    """PTX of ``fn`` for ``sm_<arch>``: pointer arguments (``types`` maps each
    non-constexpr argument to its Triton type) 16-byte aligned, integers
    unspecialised (so ``n`` stands for any size, an odd one included)."""
    names = [p.name for p in fn.params]
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in names}
    attrs = {(i,): ALIGNED for i, name in enumerate(names) if signature[name].startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    # No options but the warps: Triton's defaults, FP fusion on.
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]


def _count(ptx, pattern):
    return len(re.findall(pattern, ptx))


def _flat_types(dtype, f32_out=False):
    p = f"*{dtype}"
    return {"src_ptr": p, "x_ptr": p, "bias_ptr": p, "res_ptr": p, "keep_ptr": "*i1", "out_ptr": p,
            "f32_ptr": "*fp32" if f32_out else p, "state_ptr": "*i64", "n": "i64", "H": "i32"}


def _no_contraction_ieee_division(ptx):
    assert _count(ptx, r"\bfma\.") == 0, "an FMA: the activations would not round as the contract says"
    assert _count(ptx, r"div\.full|div\.approx|rcp\.approx") == 0, "an approximate division"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,size", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "gelu_tanh", "silu"])
def test_forward_kernel(arch, dtype, size, activation):
    R = 16 // size
    consts = {"ACT": K.ACTS[activation], "HAS_BIAS": activation != "identity", "HAS_RES": True, "HAS_STATE": True,
              "MASK_FROM_PTR": False, "STORE_F32": False, "BWD": False, "R": R, "BLOCK": R * 32 * 8 * 2}
    ptx = _compile(K._flat_kernel, _flat_types(dtype), consts, arch)
    _no_contraction_ieee_division(ptx)
    if activation in ("gelu", "gelu_tanh", "silu"):
        assert _count(ptx, r"div\.rn\.f32") >= 1 and _count(ptx, r"mul\.rn\.f32") >= 1
    # p read from the state: t and the scale in IEEE double
    assert _count(ptx, r"div\.rn\.f64") >= 1
    # the full blocks of any n: x and residual in, y out, 16 bytes a thread
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1
    assert _count(ptx, r"mul\.hi\.u32") >= 1  # Philox


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,size", DTYPES)
def test_backward_kernel(arch, dtype, size):
    R = 16 // size
    consts = {"ACT": K.ACTS["gelu"], "HAS_BIAS": True, "HAS_RES": False, "HAS_STATE": True, "MASK_FROM_PTR": False,
              "STORE_F32": True, "BWD": True, "R": R, "BLOCK": R * 32 * 8 * 2}
    ptx = _compile(K._flat_kernel, _flat_types(dtype, f32_out=True), consts, arch)
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2  # dy and x
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 2  # dx and its float32 copy


@pytest.mark.parametrize("arch", [80, 90])
def test_no_state_compiles_no_philox(arch):
    """state None (eval mode): the kernel has no Philox and reads no p."""
    consts = {"ACT": K.ACTS["silu"], "HAS_BIAS": True, "HAS_RES": True, "HAS_STATE": False, "MASK_FROM_PTR": False,
              "STORE_F32": False, "BWD": False, "R": 8, "BLOCK": 4096}
    ptx = _compile(K._flat_kernel, _flat_types("bf16"), consts, arch)
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"mul\.hi\.u32") == 0 and _count(ptx, r"div\.rn\.f64") == 0
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2


@pytest.mark.parametrize("arch", [80, 90])
def test_bias_gradient_and_mask_kernels(arch):
    types = {"g_ptr": "*bf16", "x_ptr": "*bf16", "bias_ptr": "*bf16", "keep_ptr": "*i1", "dx_ptr": "*bf16",
             "part_ptr": "*fp32", "state_ptr": "*i64", "rows": "i64", "H": "i32"}
    consts = {"ACT": K.ACTS["gelu_tanh"], "HAS_BIAS": True, "HAS_STATE": True, "MASK_FROM_PTR": False,
              "ROWS_PER_PROGRAM": 16, "R": 8, "BLOCK": 1024}
    ptx = _compile(K._rows_kernel, types, consts, arch, num_warps=4)
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"atom\.") == 0  # no atomics: the bias gradient is deterministic

    ptx = _compile(K._mask_kernel, {"out_ptr": "*i1", "state_ptr": "*i64", "n": "i64"}, {"R": 16, "BLOCK": 4096},
                   arch)
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1  # 16 keep bytes a thread


def test_new_p_or_size_needs_no_new_binary():
    """p is data (the state tensor), and the element count is not
    specialised, so neither a new p nor a new size compiles another kernel."""
    for kernel in (K._flat_kernel, K._mask_kernel):
        params = {p.name: p for p in kernel.params}
        assert params["n"].do_not_specialize
        assert not any(name in params for name in ("p", "thr", "drop_all", "scale"))
