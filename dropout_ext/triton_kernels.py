"""Triton kernels for y = residual + dropout(act(x + bias)), its backward and
the keep mask, under the contract of docs/RNG.md.

``KERNELS`` holds the three launchers, plain functions with the op schemas'
arguments; ``_ops`` registers them as the ``triton_`` ops (the CUDA key, and
the CPU key under ``TRITON_INTERPRET=1``, where the kernels run on CPU tensors
in Triton's interpreter, which is how they are tested without a GPU).

Contract rules that shape the code:
- the mask parameters come from the state tensor [seed, offset, p bits] in
  device memory, derived in the kernel by one prologue (``_mask_params``) with
  the host's double arithmetic, so a CUDA graph replays fresh draws and a new
  p compiles nothing; no state means keep everything, with no Philox at all;
- the random words come from ``tl.philox`` with the contract's counter words,
  never from ``tl.rand``/``tl.randint4x``, whose counter mapping changed
  between Triton releases; one Philox call serves four elements;
- float32 math with IEEE division and no FMA contraction: every float
  operation of the value path goes through ``_mul``/``_add``/``_sub``/``_div``,
  which emit explicitly rounded PTX (``mul.rn`` ...). The rounding rule lives
  in the kernel source because launch options do not survive every caller
  (Inductor keeps only the arguments of a user-defined Triton kernel, so
  ``enable_fp_fusion=False`` would be lost under torch.compile);
- a dropped element is a zero with the sign bit of the value it replaces;
- 64-bit element indices throughout.

Layout: one elementwise body (``_tile``) serves the forward and the backward
(the ``BWD`` constexpr), used by the flat kernel and by the row-sum kernel of
the bias gradient; each program takes the unmasked path when its block is
full, so the bulk of any tensor, whatever its size, moves in 128-bit accesses.

The packed mask mode (``reference.pack_bits``: element i at bit i % 8 of byte
i // 8): the flat kernel's forward also stores the keep bits it draws
(``BITS_OUT``; its programs start on whole bytes), and both kernels can read
such bits instead of drawing them (``BITS_IN``: no Philox at all). Both are
constexpr flags, so a call without them compiles to the code it had before.
"""

import contextlib
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._contract import ACTIVATIONS, F32
from ._ops import mask_bits_like

AVAILABLE = True

# float64 is routed to another backend (see _backend).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACTS = {name: i for i, name in enumerate(ACTIVATIONS)}
IDENTITY = tl.constexpr(ACTS["identity"])
RELU = tl.constexpr(ACTS["relu"])
GELU = tl.constexpr(ACTS["gelu"])
GELU_TANH = tl.constexpr(ACTS["gelu_tanh"])
SILU = tl.constexpr(ACTS["silu"])

EXP_MIN = tl.constexpr(F32["EXP_MIN"])
LOG2E = tl.constexpr(F32["LOG2E"])
ROUND_MAGIC = tl.constexpr(F32["ROUND_MAGIC"])
LN2_HI = tl.constexpr(F32["LN2_HI"])
LN2_LO = tl.constexpr(F32["LN2_LO"])
EXP_C7 = tl.constexpr(F32["EXP_C7"])
EXP_C6 = tl.constexpr(F32["EXP_C6"])
EXP_C5 = tl.constexpr(F32["EXP_C5"])
EXP_C4 = tl.constexpr(F32["EXP_C4"])
EXP_C3 = tl.constexpr(F32["EXP_C3"])
EXP_C2 = tl.constexpr(F32["EXP_C2"])
EXP_C1 = tl.constexpr(F32["EXP_C1"])
EXP_C0 = tl.constexpr(F32["EXP_C0"])
SQRT1_2 = tl.constexpr(F32["SQRT1_2"])
AS_P = tl.constexpr(F32["AS_P"])
AS_A1 = tl.constexpr(F32["AS_A1"])
AS_A2 = tl.constexpr(F32["AS_A2"])
AS_A3 = tl.constexpr(F32["AS_A3"])
AS_A4 = tl.constexpr(F32["AS_A4"])
AS_A5 = tl.constexpr(F32["AS_A5"])
INV_SQRT_2PI = tl.constexpr(F32["INV_SQRT_2PI"])
SQRT_2_OVER_PI = tl.constexpr(F32["SQRT_2_OVER_PI"])
GELU_TANH_C = tl.constexpr(F32["GELU_TANH_C"])
GELU_TANH_3C = tl.constexpr(F32["GELU_TANH_3C"])


# --- float32 arithmetic that is never contracted ---------------------------------
# On the GPU: one PTX instruction with an explicit rounding mode, which neither
# LLVM (inline asm is opaque) nor ptxas (explicitly rounded mul/add are never
# fused) can merge into an FMA, whatever fp-fusion option the kernel is built
# with. Under the interpreter numpy evaluates each float32 operation on its
# own, correctly rounded; there the helpers are plain functions, as a call to
# a jitted helper costs the interpreter far more than the arithmetic.

if _INTERPRET:
    def _mul(a, b):
        return a * b

    def _add(a, b):
        return a + b

    def _sub(a, b):
        return a - b

    def _div(a, b):
        # numpy's float32 division is IEEE; tl.math.div_rn is not accepted
        # by every Triton interpreter.
        return a / b
else:
    @triton.jit
    def _mul(a, b):
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _add(a, b):
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _sub(a, b):
        return tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _div(a, b):
        # Triton's "/" on float32 is an approximate division on the GPU.
        return tl.math.div_rn(a, b)


# --- the activations (csrc/activations.h, operation for operation) -----------------

@triton.jit
def _exp_nonpos(x):
    in_range = x >= EXP_MIN
    xc = tl.where(in_range, x, 0.0)
    k = _sub(_add(_mul(xc, LOG2E), ROUND_MAGIC), ROUND_MAGIC)
    r = _sub(_sub(xc, _mul(k, LN2_HI)), _mul(k, LN2_LO))
    poly = _add(EXP_C6, _mul(r, EXP_C7))
    poly = _add(EXP_C5, _mul(r, poly))
    poly = _add(EXP_C4, _mul(r, poly))
    poly = _add(EXP_C3, _mul(r, poly))
    poly = _add(EXP_C2, _mul(r, poly))
    poly = _add(EXP_C1, _mul(r, poly))
    poly = _add(EXP_C0, _mul(r, poly))
    scale = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(in_range, _mul(poly, scale), tl.where(x != x, x, 0.0))


@triton.jit
def _gelu_parts(v):
    """(1 + erf(v / sqrt 2), exp(-v*v/2))."""
    z = _mul(tl.where(v < 0.0, -v, v), SQRT1_2)
    t = _div(tl.full(v.shape, 1.0, tl.float32), _add(1.0, _mul(AS_P, z)))
    poly = _add(AS_A2, _mul(t, AS_A1))
    poly = _add(AS_A3, _mul(t, poly))
    poly = _add(AS_A4, _mul(t, poly))
    poly = _add(AS_A5, _mul(t, poly))
    poly = _mul(t, poly)
    e = _exp_nonpos(-_mul(z, z))
    q = _mul(poly, e)
    return tl.where(v >= 0.0, _sub(2.0, q), q), e


@triton.jit
def _gelu_tanh_parts(v):
    """(1 + tanh(u), 1 - tanh(u))."""
    u = _mul(SQRT_2_OVER_PI, _add(v, _mul(GELU_TANH_C, _mul(_mul(v, v), v))))
    e = _exp_nonpos(-_mul(2.0, tl.where(u < 0.0, -u, u)))
    d = _add(1.0, e)
    big = _div(tl.full(v.shape, 2.0, tl.float32), d)
    small = _div(_mul(2.0, e), d)
    pos = u >= 0.0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _sigmoid(v):
    e = _exp_nonpos(tl.where(v < 0.0, v, -v))
    d = _add(1.0, e)
    return tl.where(v >= 0.0, _div(tl.full(v.shape, 1.0, tl.float32), d), _div(e, d))


@triton.jit
def _act_forward(v, ACT: tl.constexpr):
    if ACT == RELU:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == GELU:
        cdf2, _e = _gelu_parts(v)
        v = _mul(_mul(0.5, v), cdf2)
    elif ACT == GELU_TANH:
        opt, _omt = _gelu_tanh_parts(v)
        v = _mul(_mul(0.5, v), opt)
    elif ACT == SILU:
        v = _mul(v, _sigmoid(v))
    return v


@triton.jit
def _act_derivative(v, ACT: tl.constexpr):
    """act'(v) of the smooth activations."""
    if ACT == GELU:
        cdf2, e = _gelu_parts(v)
        d = _add(_mul(0.5, cdf2), _mul(v, _mul(e, INV_SQRT_2PI)))
    elif ACT == GELU_TANH:
        opt, omt = _gelu_tanh_parts(v)
        du = _mul(SQRT_2_OVER_PI, _add(1.0, _mul(GELU_TANH_3C, _mul(v, v))))
        d = _add(_mul(0.5, opt), _mul(_mul(_mul(0.5, v), _mul(opt, omt)), du))
    else:
        s = _sigmoid(v)
        d = _mul(s, _add(1.0, _mul(v, _sub(1.0, s))))
    return d


@triton.jit
def _act_backward(gs, v, ACT: tl.constexpr):
    """The gradient through the activation, given the scaled incoming
    gradient gs: identity and relu select (so 0 * Inf never appears), the
    smooth activations multiply by their derivative."""
    if ACT == IDENTITY:
        d = gs
    elif ACT == RELU:
        d = tl.where(v > 0.0, gs, 0.0)
    else:
        d = _mul(gs, _act_derivative(v, ACT))
    return d


# --- the mask ------------------------------------------------------------------------

@triton.jit
def _mask_params(state_ptr, HAS_STATE: tl.constexpr):
    """(threshold, drop_all, keep_all, scale) of the contract from p's binary64
    bits in state[2], with the host's double arithmetic: t = floor(p * 2**32),
    scale = 1 / (1 - p) rounded once to float32; NaN and negative p count as
    0, p >= 1 drops everything. Without a state every element is kept."""
    if HAS_STATE:
        p = tl.load(state_ptr + 2).to(tl.float64, bitcast=True)
        p = tl.where(p >= 0.0, p, 0.0)
        drop_all = p >= 1.0
        # p * 2**32 is exact and below 2**32 when p < 1; the conversion truncates.
        thr = tl.where(drop_all, 0.0, p * 4294967296.0).to(tl.uint32)
        one = tl.full([], 1.0, tl.float64)
        # float64 "/" is IEEE round-to-nearest on every target (div.rn.f64).
        scale = tl.where(drop_all, 0.0, one / tl.where(drop_all, one, one - p)).to(tl.float32)
        keep_all = (thr == 0) & (drop_all == 0)
    else:
        thr = tl.full([], 0, tl.uint32)
        drop_all = tl.full([], 0, tl.int1)
        keep_all = tl.full([], 1, tl.int1)
        scale = tl.full([], 1.0, tl.float32)
    return thr, drop_all, keep_all, scale


@triton.jit
def _philox_keep(state_ptr, group0, thr, ROWS: tl.constexpr, R: tl.constexpr):
    """Keep bits of the [ROWS, R] tile of consecutive elements 4 * group0 + j.

    One Philox call per group of four: key = the 64-bit seed, counter =
    (group low, group high, offset low, offset high); element k of a group
    takes word k. The four words are interleaved by joins, so a row of R
    elements needs no select chain.
    """
    NG: tl.constexpr = ROWS * R // 4
    seed = tl.load(state_ptr)
    offset = tl.load(state_ptr + 1)
    group = group0 + tl.arange(0, NG).to(tl.int64)
    c0 = group.to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = (group >> 32).to(tl.uint32)
    c2 = offset.to(tl.uint32) + zero
    c3 = (offset >> 32).to(tl.uint32) + zero
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=10)
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, R])
    return w >= thr


@triton.jit
def _keep(state_ptr, keep_ptr, bits_ptr, offs, m, group0, thr, drop_all, keep_all, ROWS: tl.constexpr,
          R: tl.constexpr, MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, MASKED: tl.constexpr):
    """The keep bits of a tile: from an expanded structured mask, from the
    packed keep bits of the forward (BITS_IN), or drawn."""
    if MASK_FROM_PTR:
        keep = _load(keep_ptr, offs, m, MASKED) != 0
    elif BITS_IN:
        # Element i is bit i % 8 of byte i // 8. Gathered per element, as a
        # tile row of the bias-gradient kernel may start in the middle of a
        # byte (H % 8 == 4): the elements of a byte load it again, from the
        # same cache line, and the bits are 1/16 of a 16-bit tensor's bytes.
        # No Philox and no test of p: the bits decide alone.
        byte = _load(bits_ptr, offs >> 3, m, MASKED)
        keep = ((byte >> (offs & 7).to(tl.uint8)) & 1) != 0
    elif keep_all | drop_all:
        # p == 0 or p >= 1: no Philox (the common eval-like and p == 0 calls)
        keep = tl.full([ROWS, R], 0, tl.int1) | keep_all
    else:
        keep = _philox_keep(state_ptr, group0, thr, ROWS, R)
    return keep


@triton.jit
def _drop(value, keep):
    """Kept values pass; a dropped one keeps only its sign bit (x * 0 in
    nn.Dropout for finite x; NaN and Inf become a zero too)."""
    bits = value.to(tl.uint32, bitcast=True)
    and_mask = tl.where(keep, tl.full(value.shape, 0xFFFFFFFF, tl.uint32), tl.full(value.shape, 0x80000000, tl.uint32))
    return (bits & and_mask).to(tl.float32, bitcast=True)


@triton.jit
def _or_bytes(v, ROWS: tl.constexpr, R: tl.constexpr):
    """[ROWS, R] 0/1 int32 values of consecutive elements as the
    [ROWS * R // 8] bytes they pack to, element 8j + k at bit k of byte j.

    Neighbours are paired by splits, not summed by a reduction: a thread
    holds its row of R elements in registers, and a split of a size-2 last
    dimension stays there, while a reduction is laid out anew, which made
    the compiler draw the Philox words a second time in that layout."""
    tl.static_assert((R == 4) | (R == 8))
    if R == 8:
        a, b = tl.split(tl.reshape(v, [ROWS, 4, 2]))
        v = a | (b << 1)
    a, b = tl.split(tl.reshape(v, [ROWS, 2, 2]))
    v = a | (b << (R // 4))
    a, b = tl.split(v)
    v = a | (b << (R // 2))
    if R == 4:
        # A byte spans two rows, held by neighbouring threads: the one
        # exchange between threads (through shared memory), of a value a row.
        a, b = tl.split(tl.reshape(v, [ROWS // 2, 2]))
        v = a | (b << 4)
    return v


@triton.jit
def _pack_bits(bits_ptr, keep, group0, m, ROWS: tl.constexpr, R: tl.constexpr, MASKED: tl.constexpr):
    """Stores the tile's keep bits packed, element i at bit i % 8 of byte
    i // 8. Only the flat kernel packs: its tile starts at a multiple of
    BLOCK (element 4 * group0), a multiple of 8, so a program writes whole
    bytes and no two programs share one. In the partial block the bits past
    n are 0, and the bytes that hold no element are not written."""
    boffs = group0 // 2 + tl.arange(0, ROWS * R // 8)
    if MASKED:
        byte = _or_bytes((keep & m).to(tl.int32), ROWS, R)
        tl.store(bits_ptr + boffs, byte.to(tl.uint8), mask=_or_bytes(m.to(tl.int32), ROWS, R) != 0)
    else:
        tl.store(bits_ptr + boffs, _or_bytes(keep.to(tl.int32), ROWS, R).to(tl.uint8))


# --- memory ------------------------------------------------------------------------

@triton.jit
def _load(ptr, offs, m, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=m, other=0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, value, m, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=m)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _f32(v):
    """A loaded value in float32. bfloat16 widens by a shift of its bits,
    which is exact for every value and the same on every Triton target."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _rounded(y, dtype: tl.constexpr):
    """y rounded once to the output dtype. bfloat16 is rounded to nearest even
    in integer arithmetic, NaN becoming 0x7FC0 as in c10::BFloat16, so the
    result does not depend on the target's conversion instruction."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        out = tl.where(y != y, 0x7FC0, rounded).to(tl.uint16)
        return out.to(tl.bfloat16, bitcast=True)
    return y.to(dtype)


@triton.jit
def _bias_tile(bias_ptr, pid, local, m, H, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """The bias of elements pid * BLOCK + local, in float32: bias[index % H]."""
    if H >= BLOCK:
        # A block spans at most two rows, so one 64-bit remainder per program
        # and a compare and subtract per element; start exceeds 32 bits on
        # large tensors, and so may H.
        col64 = (pid.to(tl.int64) * BLOCK) % H + local
        col64 = tl.where(col64 >= H, col64 - H, col64)
        b = _f32(_load(bias_ptr, col64, m, MASKED))
    else:
        # H < BLOCK: the block's first column, pid * BLOCK mod H, from
        # factors below H, and then every column, stay below H * H + BLOCK
        # < 2**31, so the per-element remainder is a 32-bit one (a 64-bit
        # remainder is a long emulated sequence per element).
        tl.static_assert(BLOCK <= 32768)
        h = tl.cast(H, tl.int32)
        col = ((pid % h) * (BLOCK % h) + local) % h
        b = _f32(_load(bias_ptr, col, m, MASKED))
    return b


# --- the one elementwise body ----------------------------------------------------------

@triton.jit
def _tile(src_ptr, x_ptr, res_ptr, keep_ptr, bits_ptr, out_ptr, f32_ptr, state_ptr, offs, m, b, group0,
          thr, drop_all, keep_all, scale, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
          HAS_STATE: tl.constexpr, MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, BITS_OUT: tl.constexpr,
          STORE_F32: tl.constexpr, BWD: tl.constexpr, ROWS: tl.constexpr, R: tl.constexpr, MASKED: tl.constexpr):
    """One [ROWS, R] tile at element offsets offs (row-major indices), mask m
    when MASKED; b is the tile's bias in float32 (HAS_BIAS). The tile's first
    element is 4 * group0.

    Forward (src = x): out = residual + drop(act(x + b) * scale).
    Backward (src = dy): out = drop(act'(x + b) * (dy * scale)); also the
    unrounded float32 result to f32_ptr (STORE_F32). Returns that result.
    The packed mask mode: the keep bits read from bits_ptr (BITS_IN), or
    written there as drawn (BITS_OUT, the flat kernel's forward).
    """
    a = _f32(_load(src_ptr, offs, m, MASKED))
    if BWD:
        if HAS_STATE:
            a = _mul(a, scale)
        if ACT != IDENTITY:
            v = _f32(_load(x_ptr, offs, m, MASKED))
            if HAS_BIAS:
                v = _add(v, b)
            a = _act_backward(a, v, ACT)
    else:
        if HAS_BIAS:
            a = _add(a, b)
        a = _act_forward(a, ACT)
        if HAS_STATE:
            a = _mul(a, scale)
    if HAS_STATE:
        keep = _keep(state_ptr, keep_ptr, bits_ptr, offs, m, group0, thr, drop_all, keep_all, ROWS, R,
                     MASK_FROM_PTR, BITS_IN, MASKED)
        if BITS_OUT:
            _pack_bits(bits_ptr, keep, group0, m, ROWS, R, MASKED)
        a = _drop(a, keep)
    if HAS_RES:
        a = _add(_f32(_load(res_ptr, offs, m, MASKED)), a)
    _store(out_ptr, offs, _rounded(a, out_ptr.dtype.element_ty), m, MASKED)
    if STORE_F32:
        _store(f32_ptr, offs, a, m, MASKED)
    return a


# --- kernels ----------------------------------------------------------------------------
# n is not specialised: whether a program's block is full is decided in the
# kernel, so one binary serves every size.

@triton.jit(do_not_specialize=["n"])
def _flat_kernel(src_ptr, x_ptr, bias_ptr, res_ptr, keep_ptr, out_ptr, f32_ptr, state_ptr, bits_ptr, n, H,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_STATE: tl.constexpr,
                 MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, BITS_OUT: tl.constexpr,
                 STORE_F32: tl.constexpr, BWD: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """The tensor as a flat array of n elements, BLOCK per program, in
    [BLOCK // R, R] tiles with R contiguous elements (16 bytes) per row.
    BLOCK is a multiple of 8, so with BITS_OUT each program packs whole bytes."""
    ROWS: tl.constexpr = BLOCK // R
    thr, drop_all, keep_all, scale = _mask_params(state_ptr, HAS_STATE)
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    local = tl.arange(0, ROWS)[:, None] * R + tl.arange(0, R)[None, :]
    offs = start + local
    if start + BLOCK <= n:
        # A full block: no mask, so the accesses stay 128 bits wide.
        b = 0.0
        if HAS_BIAS:
            b = _bias_tile(bias_ptr, pid, local, None, H, BLOCK, False)
        _tile(src_ptr, x_ptr, res_ptr, keep_ptr, bits_ptr, out_ptr, f32_ptr, state_ptr, offs, None, b,
              start // 4, thr, drop_all, keep_all, scale, ACT, HAS_BIAS, HAS_RES, HAS_STATE, MASK_FROM_PTR, BITS_IN,
              BITS_OUT, STORE_F32, BWD, ROWS, R, False)
    else:
        m = offs < n
        b = 0.0
        if HAS_BIAS:
            b = _bias_tile(bias_ptr, pid, local, m, H, BLOCK, True)
        _tile(src_ptr, x_ptr, res_ptr, keep_ptr, bits_ptr, out_ptr, f32_ptr, state_ptr, offs, m, b,
              start // 4, thr, drop_all, keep_all, scale, ACT, HAS_BIAS, HAS_RES, HAS_STATE, MASK_FROM_PTR, BITS_IN,
              BITS_OUT, STORE_F32, BWD, ROWS, R, True)


@triton.jit
def _rows_loop(g_ptr, x_ptr, keep_ptr, dx_ptr, state_ptr, bits_ptr, r0, rows, H, c_start, cols, cm, thr, drop_all,
               keep_all, scale, b, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
               MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
               TR: tl.constexpr, R: tl.constexpr, MASKED: tl.constexpr):
    acc = tl.zeros([TR, R], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = r0 + i
        if row < rows:
            offs = row * H + cols
            d = _tile(g_ptr, x_ptr, g_ptr, keep_ptr, bits_ptr, dx_ptr, dx_ptr, state_ptr, offs, cm, b,
                      (row * H + c_start) // 4, thr, drop_all, keep_all, scale, ACT, HAS_BIAS, False, HAS_STATE,
                      MASK_FROM_PTR, BITS_IN, False, False, True, TR, R, MASKED)
            if MASKED:
                d = tl.where(cm, d, 0.0)
            acc = _add(acc, d)
    return acc


@triton.jit
def _rows_kernel(g_ptr, x_ptr, bias_ptr, keep_ptr, dx_ptr, part_ptr, state_ptr, bits_ptr, rows, H,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, MASK_FROM_PTR: tl.constexpr,
                 BITS_IN: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """The backward with the bias gradient, for a last dimension H divisible
    by 4 (every row then starts on a Philox group); BITS_IN reads the keep
    bits of the packed mask mode.

    Program (c, r) walks ROWS_PER_PROGRAM rows over columns
    [c * BLOCK, (c + 1) * BLOCK) and writes the column sums of the unrounded
    dx to row r of a partial buffer; summing that buffer over its rows
    finishes the reduction in an order fixed by the shape, so the result does
    not vary run to run (no atomics). The column tiles are grid axis 0, the
    one without the 65535 limit, as a wide H has more of them than that.
    """
    TR: tl.constexpr = BLOCK // R
    thr, drop_all, keep_all, scale = _mask_params(state_ptr, HAS_STATE)
    c_start = tl.program_id(0).to(tl.int64) * BLOCK
    pid_r = tl.program_id(1).to(tl.int64)
    cols = c_start + tl.arange(0, TR)[:, None] * R + tl.arange(0, R)[None, :]
    r0 = pid_r * ROWS_PER_PROGRAM
    if c_start + BLOCK <= H:
        b = 0.0
        if HAS_BIAS:
            b = _f32(tl.load(bias_ptr + cols))
        acc = _rows_loop(g_ptr, x_ptr, keep_ptr, dx_ptr, state_ptr, bits_ptr, r0, rows, H, c_start, cols, None, thr,
                         drop_all, keep_all, scale, b, ACT, HAS_BIAS, HAS_STATE, MASK_FROM_PTR, BITS_IN,
                         ROWS_PER_PROGRAM, TR, R, False)
        tl.store(part_ptr + pid_r * H + cols, acc)
    else:
        cm = cols < H
        b = 0.0
        if HAS_BIAS:
            b = _f32(tl.load(bias_ptr + cols, mask=cm, other=0.0))
        acc = _rows_loop(g_ptr, x_ptr, keep_ptr, dx_ptr, state_ptr, bits_ptr, r0, rows, H, c_start, cols, cm, thr,
                         drop_all, keep_all, scale, b, ACT, HAS_BIAS, HAS_STATE, MASK_FROM_PTR, BITS_IN,
                         ROWS_PER_PROGRAM, TR, R, True)
        tl.store(part_ptr + pid_r * H + cols, acc, mask=cm)


@triton.jit(do_not_specialize=["n"])
def _mask_kernel(out_ptr, state_ptr, n, R: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // R
    thr, drop_all, keep_all, _scale = _mask_params(state_ptr, True)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, ROWS)[:, None] * R + tl.arange(0, R)[None, :]
    keep = _keep(state_ptr, out_ptr, out_ptr, offs, None, start // 4, thr, drop_all, keep_all, ROWS, R, False, False,
                 False)
    if start + BLOCK <= n:
        tl.store(out_ptr + offs, keep)
    else:
        tl.store(out_ptr + offs, keep, mask=offs < n)


# --- launch configuration ------------------------------------------------------------------
# Fixed, chosen from the dtype and the size alone: no autotuning, so no launch
# ever benchmarks (which synchronises the device and would break a CUDA graph
# being captured), and a shape first seen during capture launches like any other.

# (largest n, rows of 16 bytes per thread, warps), first match wins. One
# row: each row adds its own live values of the activation and Philox (a
# 16-bit gelu backward on sm_90: 255 registers with 4 rows, 166 with 2, 80
# with one, where 255 leaves one 8-warp block per SM), and a launch has
# programs to spare at any size.
_FLAT_TABLE = ((1 << 16, 1, 4), (None, 1, 8))
_ROWS_WARPS = 4
# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1).
GRID_YZ_MAX = 65535
# Rows per program of the bias-gradient kernel, at least: its float32
# partial buffer, written and then summed again, has a row per program, so
# with 8 rows or more it holds at most 1/8 of the gradient's elements (a
# quarter of a 16-bit dx's bytes); one row a program makes it twice a 16-bit dx.
_MIN_ROWS_PER_PROGRAM = 8
_MAX_ROWS_PER_PROGRAM = 256
# Under the interpreter, tiny blocks, so that small test tensors span several
# programs and take both the full-block and the partial-block path.
_INTERPRET_ROWS = 8


def _vector(elem_size: int) -> int:
    """Elements per row of a tile: 16 bytes of the tensor (a 128-bit access)."""
    return max(4, 16 // elem_size)


def flat_config(n: int, elem_size: int) -> Tuple[int, int, int]:
    """(R, BLOCK, num_warps) of the flat kernels for n elements of elem_size bytes."""
    R = _vector(elem_size)
    if _INTERPRET:
        return R, R * _INTERPRET_ROWS, 1
    for limit, rows, warps in _FLAT_TABLE:
        if limit is None or n <= limit:
            return R, R * 32 * warps * rows, warps
    raise AssertionError("unreachable")


def rows_config(rows: int, H: int, elem_size: int) -> Tuple[int, int, int, int]:
    """(R, BLOCK, num_warps, rows per program) of the bias-gradient kernel."""
    R = _vector(elem_size)
    if _INTERPRET:
        return R, 4 * R, 1, 2
    block = min(R * 32 * _ROWS_WARPS, max(R, triton.next_power_of_2(H)))
    warps = max(1, min(_ROWS_WARPS, block // (R * 32)))
    # About 1024 programs fill a large GPU; more rows each keep the partial
    # buffer small. A power of two, as it is a constexpr: few binaries.
    per = (rows * triton.cdiv(H, block)) // 1024
    per = min(_MAX_ROWS_PER_PROGRAM, max(_MIN_ROWS_PER_PROGRAM, 1 << max(0, per.bit_length() - 1)))
    # No more loop steps than rows (a wide H with few rows).
    per = min(per, triton.next_power_of_2(rows))
    # The row programs are grid axis 1: past 65535 of them, longer programs.
    per = max(per, triton.next_power_of_2(triton.cdiv(rows, GRID_YZ_MAX)))
    return R, block, warps, per


def rows_grid(rows: int, H: int, block: int, per: int) -> Tuple[int, int]:
    """The bias-gradient kernel's grid: (column tiles, row programs)."""
    return triton.cdiv(H, block), triton.cdiv(rows, per)


# --- host side --------------------------------------------------------------------------------

def _device_guard(t: torch.Tensor):
    """Launches go to the current CUDA device, so make it the tensors' one
    (an input on cuda:1 while cuda:0 is current). Not for CPU tensors (the
    interpreter), nor for fake ones, which are traced and never launched."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _launch(kernel, grid, like: torch.Tensor, *args, **meta) -> None:
    """Every launch of this module: on ``like``'s device."""
    with _device_guard(like):
        kernel[grid](*args, **meta)


def _state_on(state: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if state is None or state.device == device:
        return state
    return state.to(device)


def _structured_keep(state, shape, mask_shape) -> Optional[torch.Tensor]:
    """For a structured mask: its small keep mask broadcast to the full shape
    (a 1-byte temporary, never saved for backward)."""
    if state is None or not mask_shape or tuple(mask_shape) == tuple(shape):
        return None
    small = dropout_mask(state, list(mask_shape))
    return small.expand(tuple(shape)).contiguous()


def _like_input(input: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The output in the input's memory format, as nn.Dropout gives it."""
    if input.is_contiguous():
        return result
    out = torch.empty_like(input)
    out.copy_(result)
    return out


def _check_dtype(t: Optional[torch.Tensor], name: str) -> None:
    """The public API sends float64 elsewhere (_backend.ops_for); a direct
    torch.ops call with it must fail rather than compute in float32."""
    if t is not None and t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the triton backend, got {t.dtype}")


def _last_dim(t: torch.Tensor) -> int:
    return t.shape[-1] if t.dim() >= 1 else 1


def fused_dropout(input: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  state: Optional[torch.Tensor], activation: str, mask_shape: Sequence[int],
                  mask_bits: Optional[torch.Tensor] = None, pack_mask: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, bits): bits is the packed keep mask when pack_mask asks for it
    and the mask is packable, else empty; with mask_bits the keep bits are
    read from there instead of drawn (state still gives the scale)."""
    _check_dtype(input, "input")
    x = input.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    bits = mask_bits_like(x, state, mask_shape, pack_mask)
    n = x.numel()
    if n == 0:
        return _like_input(input, out), bits
    state = _state_on(state, x.device)
    keep = _structured_keep(state, x.shape, mask_shape)
    b = bias.contiguous() if bias is not None else x
    r = residual.contiguous() if residual is not None else x
    pack = bits.numel() > 0
    bits_in = mask_bits.contiguous() if mask_bits is not None else None
    bp = bits if pack else bits_in if bits_in is not None else x
    R, block, warps = flat_config(n, x.element_size())
    _launch(_flat_kernel, (triton.cdiv(n, block),), x,
            x, x, b, r, keep if keep is not None else x, out, out, state if state is not None else x, bp, n,
            _last_dim(x), ACT=ACTS[activation], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            HAS_STATE=state is not None, MASK_FROM_PTR=keep is not None, BITS_IN=bits_in is not None,
            BITS_OUT=pack, STORE_F32=False, BWD=False, R=R, BLOCK=block, num_warps=warps)
    return _like_input(input, out), bits


def fused_dropout_backward(grad: torch.Tensor, input: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           state: Optional[torch.Tensor], activation: str, mask_shape: Sequence[int],
                           bias_grad: bool, mask_bits: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_dtype(grad, "grad")
    _check_dtype(input, "input")
    g = grad.contiguous()
    dx = torch.empty_like(g, memory_format=torch.contiguous_format)
    H = _last_dim(g)
    n = g.numel()
    if not bias_grad:
        db = g.new_empty((0,))
    elif n == 0:
        db = g.new_zeros((H,))
    if n == 0:
        return _like_input(grad, dx), db
    state = _state_on(state, g.device)
    keep = _structured_keep(state, g.shape, mask_shape)
    act = ACTS[activation]
    x = input.contiguous() if (input is not None and act != ACTS["identity"]) else g
    has_bias = bias is not None and act != ACTS["identity"]
    b = bias.contiguous() if has_bias else g
    kp = keep if keep is not None else g
    st = state if state is not None else g
    bp = mask_bits.contiguous() if mask_bits is not None else g
    common = dict(ACT=act, HAS_BIAS=has_bias, HAS_STATE=state is not None, MASK_FROM_PTR=keep is not None,
                  BITS_IN=mask_bits is not None)
    if bias_grad and H % 4 == 0:
        rows = n // H
        R, block, warps, per = rows_config(rows, H, g.element_size())
        grid = rows_grid(rows, H, block, per)
        part = g.new_empty((grid[1], H), dtype=torch.float32)
        _launch(_rows_kernel, grid, g,
                g, x, b, kp, dx, part, st, bp, rows, H, ROWS_PER_PROGRAM=per, R=R, BLOCK=block, num_warps=warps,
                **common)
        db = part.sum(0).to(g.dtype)
    else:
        d32 = g.new_empty(g.shape, dtype=torch.float32) if bias_grad else dx
        R, block, warps = flat_config(n, g.element_size())
        _launch(_flat_kernel, (triton.cdiv(n, block),), g,
                g, x, b, g, kp, dx, d32, st, bp, n, H, HAS_RES=False, BITS_OUT=False, STORE_F32=bias_grad, BWD=True,
                R=R, BLOCK=block, num_warps=warps, **common)
        if bias_grad:
            db = d32.reshape(-1, H).sum(0).to(g.dtype)
    return _like_input(grad, dx), db


def dropout_mask(state: torch.Tensor, shape: List[int]) -> torch.Tensor:
    out = state.new_empty(tuple(shape), dtype=torch.bool)
    n = out.numel()
    if n == 0:
        return out
    R, block, warps = flat_config(n, 1)
    _launch(_mask_kernel, (triton.cdiv(n, block),), out, out, state, n, R=R, BLOCK=block, num_warps=warps)
    return out


KERNELS = {"fused_dropout": fused_dropout, "fused_dropout_backward": fused_dropout_backward,
           "dropout_mask": dropout_mask}
