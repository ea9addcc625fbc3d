"""The Triton kernels compile to GPU code without a GPU: ahead of time, for
sm_80 and sm_90, with Triton's bundled ptxas and Triton's default options,
floating-point fusion on: the default of every supported Triton, so what
every launch path gets (torch.compile's included), and asked for by name, so
that a release whose default is off cannot make the check weaker. The PTX
then shows what the contract and the bandwidth target need: no FMA
contraction anywhere (the activations round as written because the kernels
emit explicitly rounded instructions), IEEE division only, and 128-bit
global loads and stores when the pointers are 16-byte aligned, also for an
element count that is not a multiple of 16; the compiled binary shows the
registers a thread takes. Under the interpreter
(test_triton_interpreter.py) none of this is exercised."""

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dropout_ext import triton_kernels as K

from gpu_model import cubin_resource_usage

ALIGNED = [["tt.divisibility", 16]]
DTYPES = [("fp32", 4), ("bf16", 2), ("fp16", 2)]
# An unsharded call's map arguments (triton_kernels._index_map), which every
# build gets unless it names a shard's: no map, its tuple never read; and
# row-major tensors (the row strides, never read).
UNSHARDED = {"ALIGNED": True, "MAP_DIMS": K.NO_MAP.value, "KEEP_DIMS": 0, "STRIDED": False}
MAP_TYPES = {"imap": ("i64",) * len(K._IDENTITY[0]), "kmap": ("i64",) * len(K._NO_KEEP[0])}


def _build(fn, types, constexprs, arch, num_warps=8, divisible=()):
    """``fn`` compiled for ``sm_<arch>``: pointer arguments (``types`` maps
    each non-constexpr argument to its Triton type) 16-byte aligned, integers
    unspecialised (so ``n`` and ``H`` stand for any size, an odd one
    included) but those named in ``divisible``, known to be multiples of 16
    as Triton specialises such a launch argument."""
    names = [p.name for p in fn.params]
    constexprs = {**{k: v for k, v in UNSHARDED.items() if k in names}, **constexprs}
    types = {**MAP_TYPES, **types}
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in names}
    attrs = {(i,): ALIGNED for i, name in enumerate(names)
             if signature[name][0] == "*" or name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    # Triton's defaults but the warps and FP fusion (see the module's doc).
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": True})


def _compile(fn, types, constexprs, arch, num_warps=8, divisible=()):
    """PTX of ``fn`` for ``sm_<arch>`` (see _build)."""
    return _build(fn, types, constexprs, arch, num_warps, divisible).asm["ptx"]


def _resource_usage(kernel):
    """{"REG": ..., "STACK": ..., "LOCAL": ...} of a compiled kernel (the
    static GPU model's reading of its cubin)."""
    return cubin_resource_usage(kernel.asm["cubin"])


# The flat kernels' configuration for a large tensor, where the bandwidth is.
LARGE_N = 1 << 26


def _large_config(size):
    """(R, BLOCK, num_warps) of the flat kernels for a large tensor."""
    return K.flat_config(LARGE_N, size)


def _count(ptx, pattern):
    return len(re.findall(pattern, ptx))


def _flat_types(dtype):
    p = f"*{dtype}"
    return {"src_ptr": p, "x_ptr": p, "bias_ptr": p, "res_ptr": p, "keep_ptr": "*i1", "out_ptr": p,
            "state_ptr": "*i64", "bits_ptr": "*u8", "n": "i64", "H": "i32", "src_stride": "i32", "x_stride": "i32",
            "res_stride": "i32"}


def _no_contraction_ieee_division(ptx):
    assert _count(ptx, r"\bfma\.") == 0, "an FMA: the activations would not round as the contract says"
    assert _count(ptx, r"div\.full|div\.approx|rcp\.approx") == 0, "an approximate division"


def _bias_index_in_32_bits(ptx):
    """The bias column of each element: a 64-bit remainder is a long emulated
    sequence, so there is none per element. The H >= BLOCK path keeps one per
    program (the block's first column, as the element index and H may exceed
    32 bits), then a compare and subtract per element: one in the full-block
    and one in the partial-block branch."""
    assert _count(ptx, r"(rem|div)\.[su]64") <= 2, "64-bit division per element for the bias column"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,size", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "gelu_tanh", "silu"])
def test_forward_kernel(arch, dtype, size, activation):
    R, block, warps = _large_config(size)
    consts = {"ACT": K.ACTS[activation], "HAS_BIAS": activation != "identity", "HAS_RES": True, "HAS_STATE": True,
              "MASK_FROM_PTR": False, "BITS_IN": False, "BITS_OUT": False, "BWD": False, "R": R,
              "BLOCK": block}
    ptx = _compile(K._flat_kernel, _flat_types(dtype), consts, arch, warps)
    _no_contraction_ieee_division(ptx)
    _bias_index_in_32_bits(ptx)
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
    R, block, warps = _large_config(size)
    consts = {"ACT": K.ACTS["gelu"], "HAS_BIAS": True, "HAS_RES": False, "HAS_STATE": True, "MASK_FROM_PTR": False,
              "BITS_IN": False, "BITS_OUT": False, "BWD": True, "R": R, "BLOCK": block}
    ptx = _compile(K._flat_kernel, _flat_types(dtype), consts, arch, warps)
    _no_contraction_ieee_division(ptx)
    _bias_index_in_32_bits(ptx)
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2  # dy and x
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1  # dx


# Registers per thread, at most: 128 leaves room for two 8-warp blocks on an
# SM; a thread taking more than 128 holds one block, too few warps in flight
# to hide the memory latency of a bandwidth-bound kernel.
MAX_REGISTERS = 128


@pytest.mark.parametrize("dtype,size", DTYPES)
@pytest.mark.parametrize("direction", ["forward", "backward", "forward_pack", "backward_bits"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_large_tensor_registers(dtype, size, direction, activation):
    """The configuration of a large tensor, with the heaviest bodies (a smooth
    activation with bias and residual, or its backward with the float32
    copy for the bias gradient; the forward that packs its keep bits, the
    backward that reads them), compiles to at most MAX_REGISTERS registers a
    thread and no local memory on sm_90."""
    R, block, warps = _large_config(size)
    bwd = direction.startswith("backward")
    consts = {"ACT": K.ACTS[activation], "HAS_BIAS": True, "HAS_RES": not bwd, "HAS_STATE": True,
              "MASK_FROM_PTR": False, "BITS_IN": direction == "backward_bits", "BITS_OUT": direction == "forward_pack",
              "BWD": bwd, "R": R, "BLOCK": block}
    usage = _resource_usage(_build(K._flat_kernel, _flat_types(dtype), consts, 90, warps))
    assert usage["REG"] <= MAX_REGISTERS, (usage, (R, block, warps))
    assert usage.get("STACK", 0) == 0 and usage.get("LOCAL", 0) == 0, usage


@pytest.mark.parametrize("arch", [80, 90])
def test_no_state_compiles_no_philox(arch):
    """state None (eval mode): the kernel has no Philox and reads no p."""
    consts = {"ACT": K.ACTS["silu"], "HAS_BIAS": True, "HAS_RES": True, "HAS_STATE": False, "MASK_FROM_PTR": False,
              "BITS_IN": False, "BITS_OUT": False, "BWD": False, "R": 8, "BLOCK": 4096}
    ptx = _compile(K._flat_kernel, _flat_types("bf16"), consts, arch)
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"mul\.hi\.u32") == 0 and _count(ptx, r"div\.rn\.f64") == 0
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2


ROWS_TYPES = {"g_ptr": "*bf16", "x_ptr": "*bf16", "bias_ptr": "*bf16", "keep_ptr": "*i1", "dx_ptr": "*bf16",
              "part_ptr": "*fp32", "state_ptr": "*i64", "bits_ptr": "*u8", "rows": "i64", "H": "i32", "per": "i32",
              "g_stride": "i32", "x_stride": "i32"}


@pytest.mark.parametrize("arch", [80, 90])
def test_bias_gradient_and_mask_kernels(arch):
    consts = {"ACT": K.ACTS["gelu_tanh"], "HAS_BIAS": True, "HAS_STATE": True, "MASK_FROM_PTR": False,
              "BITS_IN": False, "R": 8, "BLOCK": 1024, "RB": 1}
    ptx = _compile(K._rows_kernel, ROWS_TYPES, consts, arch, num_warps=4)
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"atom\.") == 0  # no atomics: the bias gradient is deterministic
    # A row length that is not a multiple of 4: element by element.
    ptx = _compile(K._rows_kernel, ROWS_TYPES, dict(consts, ALIGNED=False), arch, num_warps=4)
    _no_contraction_ieee_division(ptx)
    # Four rows a step over a column tile of 256 (H = 768, a multiple of 16,
    # which a launch specialises): 16 bytes a thread a load, no spills.
    kernel = _build(K._rows_kernel, ROWS_TYPES, dict(consts, BLOCK=256, RB=4), arch, num_warps=4,
                    divisible=("H",))
    assert _count(kernel.asm["ptx"], r"ld\.global[^\n]*\.v4\.b32") >= 2
    usage = _resource_usage(kernel)
    assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage

    ptx = _compile(K._mask_kernel, {"out_ptr": "*i1", "state_ptr": "*i64", "n": "i64"}, {"R": 16, "BLOCK": 4096},
                   arch)
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1  # 16 keep bytes a thread


@pytest.mark.parametrize("keep_dims", [2, K.MAX_KEEP_DIMS.value])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_structured_mask_through_strides(keep_dims, direction):
    """A structured mask is read from its small keep tensor through
    broadcast strides: the 64-bit divisions are per program (one a
    collapsed dimension but the outermost, besides the bias column's),
    per element only 32-bit ones; the tensors still move 16 bytes a
    thread, without spills (the 16-bit gelu body, sm_90)."""
    R, block, warps = _large_config(2)
    consts = _flat_consts(R, block, "gelu", MASK_FROM_PTR=True, KEEP_DIMS=keep_dims, BWD=direction == "backward",
                          HAS_RES=direction == "forward")
    kernel = _build(K._flat_kernel, _flat_types("bf16"), consts, 90, warps)
    ptx = kernel.asm["ptx"]
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"(rem|div)\.[su]64") <= (keep_dims - 1) + 2
    assert _count(ptx, _PHILOX) == 0
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 1 and _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1
    usage = _resource_usage(kernel)
    assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage
    # Channel dropout (the identity): two 16-byte rows a thread, no spills.
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        R, block, warps = K.flat_config(LARGE_N, size, light=True)
        assert block == 2 * R * 32 * warps
        consts = _flat_consts(R, block, "identity", MASK_FROM_PTR=True, KEEP_DIMS=keep_dims,
                              BWD=direction == "backward", HAS_RES=False)
        usage = _resource_usage(_build(K._flat_kernel, _flat_types(dtype), consts, 90, warps))
        assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage
    types = dict(ROWS_TYPES, **{k: "*bf16" for k in ("g_ptr", "x_ptr", "bias_ptr", "dx_ptr")})
    rows = _build(K._rows_kernel, types, {"ACT": K.ACTS["gelu"], "HAS_BIAS": True, "HAS_STATE": True,
                                          "MASK_FROM_PTR": True, "BITS_IN": False, "KEEP_DIMS": keep_dims, "R": 8,
                                          "BLOCK": 1024, "RB": 1}, 90, 4)
    _no_contraction_ieee_division(rows.asm["ptx"])
    assert _count(rows.asm["ptx"], _PHILOX) == 0
    usage = _resource_usage(rows)
    assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage


@pytest.mark.parametrize("dtype,size", DTYPES[:2])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_rows_read_in_place(dtype, size, direction):
    """Tensors whose rows lie apart (STRIDED, a chunk of a wider last
    dimension) still move 16 bytes a thread a load (multiple_of: each tile
    row starts a unit), with one 64-bit division a program for the tile
    rows' row and column besides the bias column's, and no spills: the
    flat kernels (gelu with a bias), the bias gradient's with row strides a
    launch specialises as multiples of 16, and the norm forward (sm_90)."""
    R, block, warps = _large_config(size)
    bwd = direction == "backward"
    v4 = r"ld\.global[^\n]*\.v4\.b32"

    def flat(strided):
        return _build(K._flat_kernel, _flat_types(dtype), _flat_consts(R, block, "gelu", STRIDED=strided, BWD=bwd,
                                                                        HAS_RES=not bwd), 90, warps)

    kernel = flat(True)
    ptx = kernel.asm["ptx"]
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"(rem|div)\.[su]64") <= 3
    assert _count(ptx, v4) == _count(flat(False).asm["ptx"], v4) >= 2
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1
    usage = _resource_usage(kernel)
    assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage
    if bwd:
        types = dict(ROWS_TYPES, **{k: f"*{dtype}" for k in ("g_ptr", "x_ptr", "bias_ptr", "dx_ptr")})

        def rows(strided):
            return _build(K._rows_kernel, types, {"ACT": K.ACTS["gelu"], "HAS_BIAS": True, "HAS_STATE": True,
                                                  "MASK_FROM_PTR": False, "BITS_IN": False, "STRIDED": strided,
                                                  "R": R, "BLOCK": R * 32, "RB": 4}, 90, 4,
                          divisible=("H", "g_stride", "x_stride"))

        kernel = rows(True)
        assert _count(kernel.asm["ptx"], v4) == _count(rows(False).asm["ptx"], v4) >= 2
        usage = _resource_usage(kernel)
        assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage
    else:
        # The norm forward's x and residual, a row's base moved: as many
        # 16-byte loads as from row-major ones, no spills.
        kernel = _norm_build(1024, dtype, size, 90, False, strided=True)
        row_major = _norm_build(1024, dtype, size, 90, False).asm["ptx"]
        assert _count(kernel.asm["ptx"], v4) == _count(row_major, v4) >= 2
        usage = _resource_usage(kernel)
        assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, usage


def test_new_p_or_size_needs_no_new_binary():
    """p is data (the state tensor), and the element count, the row count
    and the rows a program walks are not specialised, so neither a new p
    nor a new size compiles another kernel."""
    counts = {K._flat_kernel: ("n",), K._mask_kernel: ("n",), K._rows_kernel: ("rows", "per"),
              K._sum_rows_kernel: ("parts",), K._norm_kernel: ("rows",), K._norm_backward_kernel: ("rows", "per")}
    for kernel, names in counts.items():
        params = {p.name: p for p in kernel.params}
        assert all(params[name].do_not_specialize for name in names)
        assert not any(name in params for name in ("p", "thr", "drop_all", "scale"))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("out", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("parts", [1, 264, 1056])
def test_sum_rows_kernel(arch, out, parts):
    """The second stage of the parameter gradients: 128-bit loads of the
    partial rows, no atomics, no spills at each tile height it takes."""
    C, block, warps = K.sum_config(parts, 4096)
    kernel = _build(K._sum_rows_kernel, {"part_ptr": "*fp32", "out_ptr": f"*{out}", "parts": "i32", "H": "i32"},
                    {"C": C, "BLOCK": block}, arch, warps, divisible=("H",))
    ptx = kernel.asm["ptx"]
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 1 and _count(ptx, r"atom\.") == 0
    usage = _resource_usage(kernel)
    assert usage.get("STACK", 0) == 0 and usage.get("LOCAL", 0) == 0, usage


# --- the packed mask mode ------------------------------------------------------------

_PHILOX = r"mul\.hi\.u32"
_BYTE_STORE = r"st\.global[^\n]*\.[bu]8\b"
_BYTE_LOAD = r"ld\.global[^\n]*\.[bu]8\b"


def _flat_consts(R, block, activation, **flags):
    consts = {"ACT": K.ACTS[activation], "HAS_BIAS": activation != "identity", "HAS_RES": True, "HAS_STATE": True,
              "MASK_FROM_PTR": False, "BITS_IN": False, "BITS_OUT": False, "BWD": False,
              "R": R, "BLOCK": block}
    consts.update(flags)
    return consts


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,size", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_pack_kernel(arch, dtype, size, activation):
    """The forward that packs its keep bits (BITS_OUT): the contract's
    arithmetic (no FMA, IEEE division), its x, residual and y still moved 16
    bytes a thread, the bits stored as bytes, and the Philox words drawn once
    (no more mul.hi than without packing: packing must not have the compiler
    draw them again in another layout, which doubles them)."""
    R, block, warps = _large_config(size)
    ptx = _compile(K._flat_kernel, _flat_types(dtype), _flat_consts(R, block, activation, BITS_OUT=True), arch,
                   warps)
    plain = _compile(K._flat_kernel, _flat_types(dtype), _flat_consts(R, block, activation), arch, warps)
    _no_contraction_ieee_division(ptx)
    _bias_index_in_32_bits(ptx)
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1
    assert _count(ptx, _BYTE_STORE) >= 1
    assert _count(ptx, r"st\.global") == _count(plain, r"st\.global") + _count(ptx, _BYTE_STORE)
    # (LLVM may fold one or two of them differently in either kernel)
    assert 0 < _count(ptx, _PHILOX) <= _count(plain, _PHILOX) + 2
    assert _count(plain, _BYTE_STORE) == 0 and _count(plain, _BYTE_LOAD) == 0


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,size", DTYPES)
def test_bits_reading_kernels_draw_no_words(arch, dtype, size):
    """Given the keep bits (BITS_IN): no Philox at all in the forward, the
    backward and the bias-gradient row kernel; the bits loaded as bytes, the
    tensors still 16 bytes a thread."""
    R, block, warps = _large_config(size)
    fwd = _compile(K._flat_kernel, _flat_types(dtype), _flat_consts(R, block, "gelu", BITS_IN=True), arch, warps)
    bwd = _compile(K._flat_kernel, _flat_types(dtype),
                   _flat_consts(R, block, "gelu", BITS_IN=True, HAS_RES=False, BWD=True), arch, warps)
    for ptx in (fwd, bwd):
        _no_contraction_ieee_division(ptx)
        assert _count(ptx, _PHILOX) == 0
        assert _count(ptx, _BYTE_LOAD) >= 1 and _count(ptx, _BYTE_STORE) == 0
        assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2
        assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1
    types = dict(ROWS_TYPES, **{k: f"*{dtype}" for k in ("g_ptr", "x_ptr", "bias_ptr", "dx_ptr")})
    consts = {"ACT": K.ACTS["gelu"], "HAS_BIAS": True, "HAS_STATE": True, "MASK_FROM_PTR": False, "BITS_IN": True,
              "R": R, "BLOCK": R * 32 * 4, "RB": 1}
    rows = _compile(K._rows_kernel, types, consts, arch, num_warps=4)
    _no_contraction_ieee_division(rows)
    assert _count(rows, _PHILOX) == 0 and _count(rows, _BYTE_LOAD) >= 1



# --- shards ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,size", DTYPES)
@pytest.mark.parametrize("map_dims", [K.SHIFT.value, 1, K.MAX_MAP_DIMS.value])
@pytest.mark.parametrize("aligned", [True, False], ids=["groups", "elements"])
@pytest.mark.parametrize("direction", ["forward_pack", "backward"])
def test_shard_kernels(dtype, size, map_dims, aligned, direction):
    """A shard's flat kernels on sm_90 (the heaviest bodies, as in
    test_large_tensor_registers), drawing at the global indices of a map
    with map_dims strided dimensions, a group at a time (aligned) or element
    by element: the contract's arithmetic still; the tensors still moved 16
    bytes a thread, as the map moves only the draws; the unsharded kernel's
    Philox calls a group at a time, four times as many element by element;
    a shift (SHIFT) costs no 64-bit division
    beyond the bias column's, as unsharded. Registers within the unsharded
    kernels' bound, and no spill up to one strided dimension; past it the
    64-bit divisions of the index walk (a subroutine of ptxas) may keep a
    value or two on the stack, by ptxas release."""
    R, block, warps = _large_config(size)
    bwd = direction == "backward"
    consts = _flat_consts(R, block, "gelu", HAS_RES=not bwd, BWD=bwd, BITS_OUT=not bwd,
                          ALIGNED=aligned, MAP_DIMS=map_dims)
    kernel = _build(K._flat_kernel, _flat_types(dtype), consts, 90, warps)
    ptx = kernel.asm["ptx"]
    _no_contraction_ieee_division(ptx)
    assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2
    assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1
    unsharded = _build(K._flat_kernel, _flat_types(dtype), dict(consts, **UNSHARDED), 90, warps)
    philox, plain = _count(ptx, _PHILOX), _count(unsharded.asm["ptx"], _PHILOX)
    # (LLVM may fold one or two of them differently in either kernel)
    assert abs(philox - plain) <= 2 if aligned else philox >= 3 * plain
    if map_dims == K.SHIFT.value:
        _bias_index_in_32_bits(ptx)
    usage = _resource_usage(kernel)
    assert usage["REG"] <= MAX_REGISTERS and usage.get("LOCAL", 0) == 0, (usage, (R, block, warps))
    if map_dims < 2:
        assert usage.get("STACK", 0) == 0, usage


# --- dropout_add_norm ----------------------------------------------------------------

# a short row, rows in registers (even, in three tiles, and odd), the column-tile loop
NORM_H = [7, 1024, 768, 4097, 65536]


def _norm_types(dtype, h_dtype):
    p, ph = f"*{dtype}", f"*{h_dtype}"
    fwd = {"x_ptr": p, "res_ptr": ph, "w_ptr": p, "b_ptr": p, "y_ptr": p, "h_ptr": ph, "mean_ptr": "*fp32",
           "rstd_ptr": "*fp32", "state_ptr": "*i64", "rows": "i32", "H": "i32", "x_stride": "i32", "res_stride": "i32",
           "eps": "fp32"}
    bwd = {"g_ptr": p, "gh_ptr": ph, "h_ptr": ph, "w_ptr": p, "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
           "state_ptr": "*i64", "dx_ptr": p, "dres_ptr": ph, "dw_ptr": "*fp32", "db_ptr": "*fp32", "rows": "i32",
           "H": "i32", "per": "i32"}
    return fwd, bwd


def _norm_build(H, dtype, size, arch, backward, norm="layer", h_dtype=None, map_dims=K.NO_MAP.value,
                strided=False):
    """The norm kernel a launch with rows of H elements compiles, with every
    input and output present, H specialised as a launch would (a multiple
    of 16 or not); a shard's with map_dims strided dimensions; strided: the
    forward's x and residual rows lying apart, their strides multiples of 16."""
    R, block, warps, loop, tiles = K.norm_config(H, size, backward)
    flags = {"RMS": norm == "rms", "HAS_STATE": True, "ALIGNED": H % 4 == 0, "MAP_DIMS": map_dims, "LOOP": loop,
             "EVEN": not loop and block * tiles == H, "NT": tiles, "R": R, "BLOCK": block}
    fwd, bwd = _norm_types(dtype, h_dtype or dtype)
    if backward:
        fn, types = K._norm_backward_kernel, bwd
        # the rows a step and the warps that hold them
        rb, sub, warps = K.norm_backward_rows(H, size, {"fp32": 4, "bf16": 2, "fp16": 2}[h_dtype or dtype])
        flags.update(HAS_GH=True, HAS_W=True, NEED_DX=True, NEED_DRES=True, NEED_DW=True, NEED_DB=True, RB=rb,
                     SUB=sub)
    else:
        fn, types = K._norm_kernel, fwd
        flags.update(HAS_RES=True, HAS_W=True, HAS_B=True, ROUNDS=False, STRIDED=strided)
    divisible = (("H",) if H % 16 == 0 else ()) + (("x_stride", "res_stride") if strided else ())
    return _build(fn, types, flags, arch, warps, divisible=divisible)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,size", DTYPES)
@pytest.mark.parametrize("H", NORM_H)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_norm_kernels(arch, dtype, size, H, backward):
    """IEEE division and square root only, the square root in the forward
    alone (the backward reads the saved rstd); 64-bit element offsets (row * H
    as a 64-bit product); the dropout of h (forward) and of dh (backward)
    drawn with Philox; no atomics (the parameter gradients are per-program
    partial sums); rows of a multiple of 16 elements moved 16 bytes a
    thread, as fused_dropout does."""
    kernel = _norm_build(H, dtype, size, arch, backward)
    ptx = kernel.asm["ptx"]
    assert _count(ptx, r"div\.full|div\.approx|rcp\.approx|sqrt\.approx|rsqrt") == 0
    sqrt = _count(ptx, r"sqrt\.rn\.f32")
    assert _count(ptx, r"div\.rn\.f32") >= 1 and (sqrt == 0 if backward else sqrt >= 1)
    # The row tensors are addressed with 64-bit offsets (row * H + column);
    # only weight and bias, indexed by the column, take 32-bit ones.
    addptr = re.findall(r"tt\.addptr [^\n]*tensor<\d+x\d+xi(32|64)>", kernel.asm["ttir"])
    assert addptr.count("64") >= 4 and addptr.count("32") <= 2 * addptr.count("64"), addptr
    assert _count(ptx, r"mul\.hi\.u32") >= 1
    assert _count(ptx, r"atom\.") == 0
    if not backward:
        # h = residual + dropout(x) is fused_dropout's body: explicitly rounded, no FMA there
        assert _count(ptx, r"mul\.rn\.f32") >= 1 and _count(ptx, r"add\.rn\.f32") >= 1
    if H % 16 == 0:
        assert _count(ptx, r"ld\.global[^\n]*\.v4\.b32") >= 2
        assert _count(ptx, r"st\.global[^\n]*\.v4\.b32") >= 1


@pytest.mark.parametrize("dtype,size,h_dtype", [("fp32", 4, "fp32"), ("bf16", 2, "bf16"), ("bf16", 2, "fp32")])
@pytest.mark.parametrize("H", [768, 1024, 2047, 4096, 4097, 6144, 8192, 12288, K.NORM_MAX_BLOCK, 65536])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_norm_registers(dtype, size, h_dtype, H, backward):
    """The widest rows held in registers (each direction's and alignment's
    limit, see triton_kernels.norm_config) and the column-tile path compile
    without register spills on sm_90 (an h in float32 from 16-bit inputs
    included, residual_in_fp32). The allocation is ptxas's, which changes
    with the Triton release (Triton 3.9 compiles sm_90 with a CUDA 13
    ptxas): the check is meant to hold under every Triton that
    requirements-test.txt allows."""
    usage = _resource_usage(_norm_build(H, dtype, size, 90, backward, h_dtype=h_dtype))
    assert usage.get("STACK", 0) == 0 and usage.get("LOCAL", 0) == 0, (usage, K.norm_config(H, size, backward))


@pytest.mark.parametrize("dtype,size", [("fp32", 4), ("bf16", 2)])
@pytest.mark.parametrize("H", [2047, 4096, 65536])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_norm_shard_kernels(dtype, size, H, backward):
    """A shard's norm kernels (a strided map of the most dimensions) draw
    each row at its global start, one 64-bit index walk a row: the same
    Philox calls as unsharded, and no spills (rows in registers, aligned
    and not, and column tiles; the backward's unaligned column tiles sit at
    the register cap unsharded already, see test_norm_registers, where a
    shard's shift spills a few bytes under some ptxas releases)."""
    kernel = _norm_build(H, dtype, size, 90, backward, map_dims=K.MAX_MAP_DIMS.value)
    plain = _norm_build(H, dtype, size, 90, backward)
    assert abs(_count(kernel.asm["ptx"], _PHILOX) - _count(plain.asm["ptx"], _PHILOX)) <= 2
    usage = _resource_usage(kernel)
    assert usage.get("STACK", 0) == 0 and usage.get("LOCAL", 0) == 0, (usage, K.norm_config(H, size, backward))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_norm_rows_of_one(backward):
    """A launch specialises an integer argument equal to 1 into a constant:
    rows of one element (H == 1) and a single row compile too."""
    R, block, warps, loop, tiles = K.norm_config(1, 4, backward)
    flags = {"RMS": False, "HAS_STATE": True, "ALIGNED": False, "LOOP": loop, "EVEN": False, "NT": tiles, "R": R,
             "BLOCK": block,
             "H": 1, "rows": 1}
    fwd, bwd = _norm_types("fp32", "fp32")
    if backward:
        rb, sub, warps = K.norm_backward_rows(1, 4, 4)
        flags.update(HAS_GH=True, HAS_W=True, NEED_DX=True, NEED_DRES=True, NEED_DW=True, NEED_DB=True, per=1,
                     RB=rb, SUB=sub)
        ptx = _compile(K._norm_backward_kernel, bwd, flags, 90, warps)
    else:
        flags.update(HAS_RES=True, HAS_W=True, HAS_B=True, ROUNDS=False)
        ptx = _compile(K._norm_kernel, fwd, flags, 90, warps)
    assert _count(ptx, r"mul\.hi\.u32") >= 1
