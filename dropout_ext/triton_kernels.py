"""Triton kernels for y = residual + dropout(act(x + bias)), its backward,
the keep mask, and dropout_add_norm (h = residual + dropout(x), y =
norm(h) * weight + bias) with its backward, under the contract of
docs/RNG.md.

``KERNELS`` holds the launchers, plain functions with the op schemas'
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
A parameter gradient (the bias gradient, the norm's weight and bias
gradients) is a float32 partial row per program, a program walking many
rows so that the partials stay a few percent of the op's bytes, then summed
by a second Triton kernel (``_sum_rows_kernel``) in an order fixed by the
shape and the SM count: no atomics, no torch pass. Sizes are run-time
arguments (not specialised) or fall in a few buckets, so a new shape
compiles nothing. Under ``recording()`` the launchers run on meta tensors and
record each launch with its facts (bytes moved, loads in flight, lanes with
work, serial loads) for a static performance model.

The packed mask mode (``reference.pack_bits``: element i at bit i % 8 of byte
i // 8): the flat kernel's forward also stores the keep bits it draws
(``BITS_OUT``; its programs start on whole bytes), and both kernels can read
such bits instead of drawing them (``BITS_IN``: no Philox at all). Both are
constexpr flags, so a call without them compiles to the code it had before.

A shard (an op's ``place``) draws each element at its index in the global
tensor, by the index map of the op ``index_map`` (csrc/index_map.h), passed
as the tuple ``imap`` with its strided dimensions as the constexpr
``MAP_DIMS``; an unsharded call has ``NO_MAP`` and compiles to the code it
had before shards existed. A map that keeps groups of four whole draws a
group at a time, any other element by element; memory, the structured
mask's keep tensor and the packed bits stay in local order, only the draws
move. A structured mask's small keep tensor is read through broadcast
strides (``kmap``, ``KEEP_DIMS``), never expanded to the input's size. A
norm shard holds whole rows, so each row is a shift of the global index,
one scalar per row.

The elementwise kernels and the norm forward read a tensor whose rows are
evenly spaced whole 16-byte units (a chunk of a wider last dimension) where
it lies, each tile row at its row's start plus its column (``STRIDED``, the
op ``row_stride``), and write a row-major output: no copy in or out.

dropout_add_norm computes h with that same body, a row per program, held
in registers as one tile, or as whole tiles of a power of two where the
row's length is not one (768: three of 256), so that every lane holds an
element; a row whose length is not a multiple of 4 starts inside a Philox
group, so its tiles draw element by element (``ALIGNED`` off), as do the
bias gradient's rows then. float64 has no Triton
kernel here either: ``_backend.ops_for`` routes it to the CUDA kernels (or
the reference), and a direct call with it fails.
"""

import contextlib
import inspect
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._contract import ACTIVATIONS, F32
from ._ops import mask_bits_like
from ._state import _words
from ._validate import global_shape, norm_dtypes
from .sharding import mask_place

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

# A shard's index map (csrc/index_map.h), as the op index_map gives it to
# the kernels: imap = (base, run, size * MAX_MAP_DIMS, stride *
# MAX_MAP_DIMS), and MAP_DIMS, a constexpr: its strided dimensions, SHIFT
# (0) for a map that only adds base, or NO_MAP for the identity of an
# unsharded call, which compiles to the code it had before maps existed.
NO_MAP = tl.constexpr(-1)
SHIFT = tl.constexpr(0)
MAX_MAP_DIMS = tl.constexpr((len(torch.ops.dropout_ext.index_map([], None)) - 3) // 2)
# A structured mask read through broadcast strides: kmap = (size *
# MAX_KEEP_DIMS, stride * MAX_KEEP_DIMS) of its collapsed dimensions,
# innermost first, and KEEP_DIMS, a constexpr: their count, or 0 for a keep
# tensor as large as the input (read at the element's own index).
MAX_KEEP_DIMS = tl.constexpr(4)


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
def _philox_words(state_ptr, group):
    """The four Philox words of each int64 group index: key = the 64-bit
    seed, counter = (group low, group high, offset low, offset high);
    element k of a group takes word k. Every random word of this module is
    drawn here."""
    seed = tl.load(state_ptr)
    offset = tl.load(state_ptr + 1)
    c0 = group.to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = (group >> 32).to(tl.uint32)
    c2 = offset.to(tl.uint32) + zero
    c3 = (offset >> 32).to(tl.uint32) + zero
    return tl.philox(seed, c0, c1, c2, c3, n_rounds=10)


@triton.jit
def _global(i, imap, MAP_DIMS: tl.constexpr):
    """The contract's index of local row-major elements i (int64): i itself
    without a map (NO_MAP), else their row-major index in the global tensor,
    by IndexMap::global's walk (csrc/index_map.h) over the map imap with
    MAP_DIMS strided dimensions; SHIFT (none): base + i, no division."""
    if MAP_DIMS == NO_MAP:
        return i
    g = i + tl.cast(imap[0], tl.int64)
    if MAP_DIMS > 0:
        run = tl.cast(imap[1], tl.int64)
        q = i // run
        g -= q * run
        for k in tl.static_range(MAP_DIMS - 1):
            size = tl.cast(imap[2 + k], tl.int64)
            next_q = q // size
            g += (q - next_q * size) * tl.cast(imap[2 + MAX_MAP_DIMS + k], tl.int64)
            q = next_q
        # The outermost coordinate is what is left: a local index lies in
        # the tensor, so one 64-bit division (a long emulated sequence) less.
        g += q * tl.cast(imap[1 + MAX_MAP_DIMS + MAP_DIMS], tl.int64)
    return g


@triton.jit
def _philox_keep(state_ptr, groups, thr, ROWS: tl.constexpr, R: tl.constexpr):
    """Keep bits of the [ROWS, R] tile whose groups of four consecutive
    elements are the contract's groups `groups` ([ROWS * R // 4] int64).

    One Philox call per group of four. The four words are interleaved by
    joins, so a row of R elements needs no select chain.
    """
    w0, w1, w2, w3 = _philox_words(state_ptr, groups)
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, R])
    return w >= thr


@triton.jit
def _philox_keep_at(state_ptr, offs, thr):
    """Keep bits of elements at any int64 indices offs: for a tile that does
    not start on a group of four (a row of dropout_add_norm whose length is
    not a multiple of 4, a shard whose map splits groups), each element
    draws its own group's words and takes word offs & 3, four times the
    Philox work of _philox_keep, where the words of a group would have to
    cross between threads."""
    w0, w1, w2, w3 = _philox_words(state_ptr, offs >> 2)
    k = offs & 3
    w = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
    return w >= thr


@triton.jit
def _keep_index(start, local, kmap, KEEP_DIMS: tl.constexpr, TILE: tl.constexpr):
    """The index in a structured mask's small keep tensor of the elements
    start + local (start an int64 scalar, local int32 in [0, TILE)), through
    the collapsed dimensions of kmap, a stride 0 where the mask broadcasts
    (as csrc/cuda/ops_impl.h collapse_mask): one 64-bit division a
    dimension for the tile's first element, then per element a compare and
    subtract in a dimension of TILE or more elements, a 32-bit division in a
    shorter one (a 64-bit one per element is a long emulated sequence). The
    carry into a dimension is below TILE / 2 + 1 (every collapsed dimension
    has 2 elements or more), so a long dimension wraps at most once."""
    if KEEP_DIMS == 0:
        return start + local
    q = start
    carry = local
    idx = tl.zeros(local.shape, tl.int64)
    for k in tl.static_range(KEEP_DIMS - 1):
        size = tl.cast(kmap[k], tl.int64)
        next_q = q // size
        c = (q - next_q * size) + carry
        if size >= TILE:
            over = c >= size
            coord = tl.where(over, c - size, c)
            carry = over.to(tl.int32)
        else:
            c32 = c.to(tl.int32)
            s32 = size.to(tl.int32)
            carry = c32 // s32
            coord = (c32 - carry * s32).to(tl.int64)
        idx += coord * tl.cast(kmap[MAX_KEEP_DIMS + k], tl.int64)
        q = next_q
    # The outermost coordinate is what is left (the element lies in the tensor).
    return idx + (q + carry) * tl.cast(kmap[MAX_KEEP_DIMS + KEEP_DIMS - 1], tl.int64)


@triton.jit
def _keep(state_ptr, keep_ptr, bits_ptr, offs, koffs, m, group0, thr, drop_all, keep_all, imap, ROWS: tl.constexpr,
          R: tl.constexpr, MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, MASKED: tl.constexpr,
          ALIGNED: tl.constexpr, MAP_DIMS: tl.constexpr):
    """The keep bits of a tile at local elements offs: from a structured
    mask's keep tensor at koffs (_keep_index), from the packed keep bits of the forward (BITS_IN), or
    drawn at the elements' contract indices (_global over imap): a group of
    four at a time when the tile starts on a group (ALIGNED, at element
    4 * group0) and the map keeps groups whole, else element by element."""
    if MASK_FROM_PTR:
        keep = _load(keep_ptr, koffs, m, MASKED) != 0
    elif BITS_IN:
        # Element i is bit i % 8 of byte i // 8. Gathered per element, as a
        # tile row of the bias-gradient kernel may start in the middle of a
        # byte (H % 8 == 4): the elements of a byte load it again, from the
        # same cache line, and the bits are 1/16 of a 16-bit tensor's bytes.
        # No Philox and no test of p: the bits decide alone. The bits are in
        # local order, so a shard reads them without its map.
        byte = _load(bits_ptr, offs >> 3, m, MASKED)
        keep = ((byte >> (offs & 7).to(tl.uint8)) & 1) != 0
    elif keep_all | drop_all:
        # p == 0 or p >= 1: no Philox (the common eval-like and p == 0 calls)
        keep = tl.full([ROWS, R], 0, tl.int1) | keep_all
    elif ALIGNED:
        groups = group0 + tl.arange(0, ROWS * R // 4).to(tl.int64)
        if MAP_DIMS != NO_MAP:
            # The map sends each local group to a whole global one (the
            # host's _keeps_groups): its first element tells which.
            groups = _global(groups * 4, imap, MAP_DIMS) >> 2
        keep = _philox_keep(state_ptr, groups, thr, ROWS, R)
    else:
        keep = _philox_keep_at(state_ptr, _global(offs, imap, MAP_DIMS), thr)
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


@triton.jit
def _row_starts(pid, H, ROWS: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """(row, column) of the first element of each tile row of block pid
    ([ROWS] int64): one 64-bit division per program, then per tile row a
    compare and subtract (H >= BLOCK: a block spans two rows at most) or a
    32-bit division (t < H + BLOCK < 2**31)."""
    start = pid.to(tl.int64) * BLOCK
    row0 = start // H
    t = start - row0 * H + (tl.arange(0, ROWS) * R).to(tl.int64)
    if H >= BLOCK:
        q = (t >= H).to(tl.int64)
    else:
        q = (t.to(tl.int32) // tl.cast(H, tl.int32)).to(tl.int64)
    return row0 + q, t - q * H


@triton.jit
def _strided(row, col, stride, R: tl.constexpr):
    """Offsets of [ROWS, R] tile rows starting at (row, col) ([ROWS]) in a
    tensor whose rows lie `stride` elements apart. The host reads a tensor
    so only where H and the stride are multiples of R (the op row_stride): a
    tile row stays in one row and starts a 16-byte unit, which multiple_of
    tells the compiler, so the accesses stay 128 bits wide."""
    return tl.multiple_of(row * stride + col, R)[:, None] + tl.arange(0, R)[None, :]


# --- the one elementwise body ----------------------------------------------------------

@triton.jit
def _tile(src_ptr, x_ptr, res_ptr, keep_ptr, bits_ptr, out_ptr, state_ptr, offs, so, xo, ro, koffs, m, b, group0,
          thr, drop_all, keep_all, scale, imap, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
          HAS_STATE: tl.constexpr, MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, BITS_OUT: tl.constexpr,
          BWD: tl.constexpr, ROWS: tl.constexpr, R: tl.constexpr, MASKED: tl.constexpr,
          ALIGNED: tl.constexpr, MAP_DIMS: tl.constexpr):
    """One [ROWS, R] tile at element offsets offs (row-major indices: the
    output, the draws, the packed bits), read from src, x and the residual at
    so, xo and ro (offs, or where a tensor's rows lie apart, _strided), mask m
    when MASKED, its structured mask at koffs (MASK_FROM_PTR); b is the
    tile's bias in float32 (HAS_BIAS). The tile's first
    element is 4 * group0 when ALIGNED; imap and MAP_DIMS map the local
    indices to the contract's (see _keep).

    Forward (src = x): out = residual + drop(act(x + b) * scale).
    Backward (src = dy): out = drop(act'(x + b) * (dy * scale)). Returns the
    unrounded float32 result (the bias gradient sums it).
    The packed mask mode: the keep bits read from bits_ptr (BITS_IN), or
    written there as drawn (BITS_OUT, the flat kernel's forward).
    """
    a = _f32(_load(src_ptr, so, m, MASKED))
    if BWD:
        if HAS_STATE:
            a = _mul(a, scale)
        if ACT != IDENTITY:
            v = _f32(_load(x_ptr, xo, m, MASKED))
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
        keep = _keep(state_ptr, keep_ptr, bits_ptr, offs, koffs, m, group0, thr, drop_all, keep_all, imap, ROWS, R,
                     MASK_FROM_PTR, BITS_IN, MASKED, ALIGNED, MAP_DIMS)
        if BITS_OUT:
            _pack_bits(bits_ptr, keep, group0, m, ROWS, R, MASKED)
        a = _drop(a, keep)
    if HAS_RES:
        a = _add(_f32(_load(res_ptr, ro, m, MASKED)), a)
    _store(out_ptr, offs, _rounded(a, out_ptr.dtype.element_ty), m, MASKED)
    return a


# --- kernels ----------------------------------------------------------------------------
# n is not specialised: whether a program's block is full is decided in the
# kernel, so one binary serves every size.

@triton.jit(do_not_specialize=["n"])
def _flat_kernel(src_ptr, x_ptr, bias_ptr, res_ptr, keep_ptr, out_ptr, state_ptr, bits_ptr, n, H, src_stride,
                 x_stride, res_stride, imap, kmap, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RES: tl.constexpr, HAS_STATE: tl.constexpr,
                 MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, BITS_OUT: tl.constexpr,
                 BWD: tl.constexpr, ALIGNED: tl.constexpr, MAP_DIMS: tl.constexpr,
                 KEEP_DIMS: tl.constexpr, STRIDED: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """The tensor as a flat array of n elements, BLOCK per program, in
    [BLOCK // R, R] tiles with R contiguous elements (16 bytes) per row.
    BLOCK is a multiple of 8, so with BITS_OUT each program packs whole bytes.
    A shard draws at its elements' global indices (imap, MAP_DIMS), by
    groups of four where its map keeps them whole (ALIGNED). STRIDED: src,
    x and the residual are read with their rows src_stride, x_stride and
    res_stride elements apart (H for a row-major one); out is row-major."""
    ROWS: tl.constexpr = BLOCK // R
    thr, drop_all, keep_all, scale = _mask_params(state_ptr, HAS_STATE)
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    local = tl.arange(0, ROWS)[:, None] * R + tl.arange(0, R)[None, :]
    offs = start + local
    koffs = offs
    if MASK_FROM_PTR:
        koffs = _keep_index(start, local, kmap, KEEP_DIMS, BLOCK)
    so = offs
    xo = offs
    ro = offs
    if STRIDED:
        row, col = _row_starts(pid, H, ROWS, R, BLOCK)
        so = _strided(row, col, src_stride, R)
        xo = _strided(row, col, x_stride, R)
        ro = _strided(row, col, res_stride, R)
    if start + BLOCK <= n:
        # A full block: no mask, so the accesses stay 128 bits wide.
        b = 0.0
        if HAS_BIAS:
            b = _bias_tile(bias_ptr, pid, local, None, H, BLOCK, False)
        _tile(src_ptr, x_ptr, res_ptr, keep_ptr, bits_ptr, out_ptr, state_ptr, offs, so, xo, ro, koffs, None, b,
              start // 4, thr, drop_all, keep_all, scale, imap, ACT, HAS_BIAS, HAS_RES, HAS_STATE, MASK_FROM_PTR,
              BITS_IN, BITS_OUT, BWD, ROWS, R, False, ALIGNED, MAP_DIMS)
    else:
        m = offs < n
        b = 0.0
        if HAS_BIAS:
            b = _bias_tile(bias_ptr, pid, local, m, H, BLOCK, True)
        _tile(src_ptr, x_ptr, res_ptr, keep_ptr, bits_ptr, out_ptr, state_ptr, offs, so, xo, ro, koffs, m, b,
              start // 4, thr, drop_all, keep_all, scale, imap, ACT, HAS_BIAS, HAS_RES, HAS_STATE, MASK_FROM_PTR,
              BITS_IN, BITS_OUT, BWD, ROWS, R, True, ALIGNED, MAP_DIMS)


def _flat_facts(grid, a, warps):
    """Launch facts (see recording) of _flat_kernel: every element once,
    the bias once (its rows are re-read from cache)."""
    n, block = a["n"], a["BLOCK"]
    per_elem = _streamed_bytes(a, "src_ptr", a["BWD"] and a["ACT"] != IDENTITY.value and "x_ptr",
                               a["HAS_RES"] and "res_ptr")
    read = n * per_elem + _once(a, "HAS_BIAS", "bias_ptr", min(n, a["H"])) + (24 if a["HAS_STATE"] else 0) - \
        _keep_reread(a, n)
    written = n * a["out_ptr"].element_size() + (
        triton.cdiv(n, 8) if a["BITS_OUT"] else 0)
    tile = per_elem + (a["bias_ptr"].element_size() if a["HAS_BIAS"] else 0)
    return _facts(read, written, block * tile, warps, grid[0] * block, n, 1)


@triton.jit
def _rows_step(g_ptr, x_ptr, keep_ptr, dx_ptr, state_ptr, bits_ptr, row, end, H, g_stride, x_stride, c_start, cols, cm,
               x_row, gs, g_at, thr, drop_all, keep_all, scale, b, imap, kmap, ACT: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr,
               X: tl.constexpr, R: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
               MAP_DIMS: tl.constexpr, KEEP_DIMS: tl.constexpr, STRIDED: tl.constexpr):
    """The RB rows from `row` of the column tile, stacked ([X, R], slot x of
    row row + x_row[x]): dx stored, its unrounded values returned, 0 where
    masked (a row at `end` or past it, a column past H). STRIDED: the rows
    of g and x lie g_stride and x_stride elements apart (see _flat_kernel)."""
    rows_x = row + x_row
    offs = rows_x[:, None] * H + cols
    go = offs
    xo = offs
    if STRIDED:
        go = tl.multiple_of(rows_x * g_stride, R)[:, None] + cols
        xo = tl.multiple_of(rows_x * x_stride, R)[:, None] + cols
    koffs = offs
    if KEEP_DIMS > 0:
        # Through broadcast strides, one row a step (rows_config): the keep
        # index walks from the row's start. Without them, a keep tensor of
        # the input's shape.
        koffs = _keep_index(row * H + c_start, (cols - c_start).to(tl.int32), kmap, KEEP_DIMS, X * R)
    # The stacked rows' groups are not consecutive: each one's index, less
    # its place in the tile (_keep adds it).
    group0 = (row * H + g_at) // 4 - gs
    m = cm
    if MASKED:
        m = (rows_x[:, None] < end) & cm
    d = _tile(g_ptr, x_ptr, g_ptr, keep_ptr, bits_ptr, dx_ptr, state_ptr, offs, go, xo, go, koffs, m, b, group0, thr,
              drop_all, keep_all, scale, imap, ACT, HAS_BIAS, False, HAS_STATE, MASK_FROM_PTR, BITS_IN, False, True, X,
              R, MASKED, ALIGNED, MAP_DIMS)
    if MASKED:
        d = tl.where(m, d, 0.0)
    return d


@triton.jit(do_not_specialize=["rows", "per"])
def _rows_kernel(g_ptr, x_ptr, bias_ptr, keep_ptr, dx_ptr, part_ptr, state_ptr, bits_ptr, rows, H, g_stride, x_stride,
                 per, imap, kmap, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                 MASK_FROM_PTR: tl.constexpr, BITS_IN: tl.constexpr, ALIGNED: tl.constexpr, MAP_DIMS: tl.constexpr,
                 KEEP_DIMS: tl.constexpr, STRIDED: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                 RB: tl.constexpr):
    """The backward with the bias gradient, for any last dimension H: a row
    drawn a group of four at a time where every row starts on a Philox
    group (ALIGNED: H divisible by 4, and a shard's map keeping groups, see
    _flat_kernel), else element by element; BITS_IN reads the keep bits of
    the packed mask mode.

    Program (c, r) walks the `per` rows from r * per over columns
    [c * BLOCK, (c + 1) * BLOCK), RB rows a step stacked in one tile (a
    column tile that divides a row leaves no lane idle, and the stack keeps
    as many loads in flight as a wide tile), and writes the column sums of
    the unrounded dx to row r of a partial buffer, which _sum_rows_kernel
    sums in a fixed order, so the result does not vary run to run (no
    atomics). The column tiles are grid axis 0, the one without the 65535
    limit, as a wide H has more of them than that. A whole step over a whole
    column tile is unmasked, so its accesses stay 128 bits wide. The walks
    are while loops: a for loop over a run-time range is not run by every
    Triton interpreter.
    """
    # A structured mask's keep index walks one row (_rows_step).
    tl.static_assert((KEEP_DIMS == 0) | (RB == 1))
    TR: tl.constexpr = BLOCK // R
    X: tl.constexpr = RB * TR
    G: tl.constexpr = R // 4
    thr, drop_all, keep_all, scale = _mask_params(state_ptr, HAS_STATE)
    c_start = tl.program_id(0).to(tl.int64) * BLOCK
    pid_r = tl.program_id(1).to(tl.int64)
    xs = tl.arange(0, X)
    x_row = (xs // TR).to(tl.int64)
    local = (xs % TR)[:, None] * R + tl.arange(0, R)[None, :]
    cols = c_start + local
    cm = cols < H
    # Group k of the tile: its row in the step and its first column.
    gs = tl.arange(0, X * G)
    g_at = (gs // G // TR).to(tl.int64) * H + c_start + (gs // G % TR) * R + gs % G * 4
    r0 = pid_r * per
    end = tl.minimum(r0 + per, rows)
    acc = tl.zeros([X, R], dtype=tl.float32)
    row = r0
    if c_start + BLOCK <= H:
        b = 0.0
        if HAS_BIAS:
            b = _f32(tl.load(bias_ptr + cols))
        while row + RB <= end:
            acc = _add(acc, _rows_step(g_ptr, x_ptr, keep_ptr, dx_ptr, state_ptr, bits_ptr, row, end, H, g_stride,
                                       x_stride, c_start, cols, cm, x_row, gs, g_at, thr, drop_all, keep_all, scale, b,
                                       imap, kmap, ACT, HAS_BIAS, HAS_STATE, MASK_FROM_PTR, BITS_IN, X, R, False,
                                       ALIGNED, MAP_DIMS, KEEP_DIMS, STRIDED))
            row += RB
    else:
        b = 0.0
        if HAS_BIAS:
            b = _f32(tl.load(bias_ptr + cols, mask=cm, other=0.0))
    # The rows left: a step short of RB rows, or a partial column tile.
    while row < end:
        acc = _add(acc, _rows_step(g_ptr, x_ptr, keep_ptr, dx_ptr, state_ptr, bits_ptr, row, end, H, g_stride,
                                   x_stride, c_start, cols, cm, x_row, gs, g_at, thr, drop_all, keep_all, scale, b,
                                   imap, kmap, ACT, HAS_BIAS, HAS_STATE, MASK_FROM_PTR, BITS_IN, X, R, True, ALIGNED,
                                   MAP_DIMS, KEEP_DIMS, STRIDED))
        row += RB
    # The stacked rows' sums: tl.sum's order is the compiled kernel's, the
    # same every run.
    sums = tl.sum(tl.reshape(acc, [RB, TR, R]), axis=0)
    local0 = tl.arange(0, TR)[:, None] * R + tl.arange(0, R)[None, :]
    tl.store(part_ptr + pid_r * H + c_start + local0, sums, mask=c_start + local0 < H)


def _rows_facts(grid, a, warps):
    """Launch facts of _rows_kernel: each program streams its rows' tiles
    (the bias tile is loaded once, before) into its column sums and writes
    one float32 partial row. The walk over rows is a streaming one: each
    row's loads also produce its dx, and the other resident programs cover
    their latency, so it counts 1 (only _sum_rows_kernel's walk over partial
    rows, loads that exist for the sum alone, is a reduction's tail)."""
    rows, H, per, block, rb = a["rows"], a["H"], a["per"], a["BLOCK"], a["RB"]
    per_elem = _streamed_bytes(a, "g_ptr", a["ACT"] != IDENTITY.value and "x_ptr")
    read = rows * H * per_elem + _once(a, "HAS_BIAS", "bias_ptr", H) + (24 if a["HAS_STATE"] else 0) - \
        _keep_reread(a, rows * H)
    written = rows * H * a["dx_ptr"].element_size() + grid[1] * H * 4
    slots = grid[0] * block * grid[1] * triton.cdiv(per, rb) * rb
    # A step's rows past a program's end are masked: they load nothing.
    return _facts(read, written, min(rb, per) * block * per_elem, warps, slots, rows * H, 1)


@triton.jit(do_not_specialize=["parts"])
def _sum_rows_kernel(part_ptr, out_ptr, parts, H, C: tl.constexpr, BLOCK: tl.constexpr):
    """The second stage of a parameter gradient: out[c] = the sum over the
    `parts` rows of the float32 partial buffer part ([parts, H]), rounded
    once to out's dtype. Each program takes BLOCK columns and adds tiles of C
    partial rows, each summed by tl.sum, in row order: an order fixed by
    the shape (the launcher keeps parts / C small), the same bits every run."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    r = tl.zeros([], tl.int64)
    while r < parts:
        rr = r + tl.arange(0, C)[:, None]
        acc += tl.sum(tl.load(part_ptr + rr * H + cols[None, :], mask=(rr < parts) & cm[None, :], other=0.0), axis=0)
        r += C
    tl.store(out_ptr + cols, _rounded(acc, out_ptr.dtype.element_ty), mask=cm)


def _sum_rows_facts(grid, a, warps):
    """Launch facts of _sum_rows_kernel: the partial rows read once, a
    serial walk of ceil(parts / C) tiles per column."""
    parts, H, C, block = a["parts"], a["H"], a["C"], a["BLOCK"]
    steps = triton.cdiv(parts, C)
    return _facts(parts * H * 4, H * a["out_ptr"].element_size(), C * block * 4, warps,
                  grid[0] * block * steps * C, parts * H, steps)


@triton.jit(do_not_specialize=["n"])
def _mask_kernel(out_ptr, state_ptr, n, imap, ALIGNED: tl.constexpr, MAP_DIMS: tl.constexpr, R: tl.constexpr,
                 BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // R
    thr, drop_all, keep_all, _scale = _mask_params(state_ptr, True)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, ROWS)[:, None] * R + tl.arange(0, R)[None, :]
    keep = _keep(state_ptr, out_ptr, out_ptr, offs, offs, None, start // 4, thr, drop_all, keep_all, imap, ROWS, R, False,
                 False, False, ALIGNED, MAP_DIMS)
    if start + BLOCK <= n:
        tl.store(out_ptr + offs, keep)
    else:
        tl.store(out_ptr + offs, keep, mask=offs < n)


def _mask_facts(grid, a, warps):
    """Launch facts of _mask_kernel: it reads only the state."""
    n, block = a["n"], a["BLOCK"]
    return _facts(24, n, 0, warps, grid[0] * block, n, 1)


# --- dropout_add_norm ---------------------------------------------------------------------
# h = residual + dropout(x) is fused_dropout's forward body (_tile, identity,
# no bias), so h is bit for bit what fused_dropout(x, residual) stores, and
# its mask is the contract's for flat index row * H + column. The statistics
# are those of h as stored (rounded to h's dtype, then widened): the backward
# sees only the stored h, so forward and backward normalise the same values.
# The norm's own arithmetic is plain float32 (contraction allowed: y, the
# statistics and the gradients are compared within tolerances), except that
# divisions and the square root are IEEE ones (div.rn, sqrt.rn), as on the
# other backends.

@triton.jit
def _row_sum(v):
    return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit
def _row_map(start, imap, MAP_DIMS: tl.constexpr):
    """The map of the row at element `start`, for ROW_MAP = SHIFT: a shard
    holds the last dimension whole, so a row is consecutive in the global
    index too, a shift by one scalar per row where the whole map would take
    divisions per element. A multiple of 4 when H is (every global row
    starts at a multiple of H), so ALIGNED tiles stay aligned."""
    return (_global(start, imap, MAP_DIMS) - start,)


@triton.jit
def _norm_h(x_ptr, res_ptr, h_ptr, state_ptr, start, local, m, thr, drop_all, keep_all, scale, rmap,
            HAS_RES: tl.constexpr, HAS_STATE: tl.constexpr, ALIGNED: tl.constexpr, TR: tl.constexpr,
            R: tl.constexpr, MASKED: tl.constexpr, ROW_MAP: tl.constexpr):
    """h of the tile at row-major elements start + local, computed and stored
    by fused_dropout's body; returned as stored, in float32, 0 where masked."""
    offs = start + local
    a = _tile(x_ptr, x_ptr, res_ptr, x_ptr, x_ptr, h_ptr, state_ptr, offs, offs, offs, offs, None, m, 0.0, start // 4,
              thr, drop_all, keep_all, scale, rmap, IDENTITY, False, HAS_RES, HAS_STATE, False, False, False, False, TR,
              R, MASKED, ALIGNED, ROW_MAP)
    hv = _f32(_rounded(a, h_ptr.dtype.element_ty))
    if MASKED:
        hv = tl.where(m, hv, 0.0)
    return hv


@triton.jit
def _norm_merge(hv, m, count, mean, m2, seen, RMS: tl.constexpr, MASKED: tl.constexpr):
    """(mean, m2, seen) after `count` more columns, the tile hv (0 where
    masked). Layer: the tile's own mean and sum of squared deviations, merged
    with the columns seen so far by Chan et al.'s pairwise update, so no
    E[h^2] - E[h]^2 cancellation; one tile (a row in registers) is the plain
    two-pass mean then variance. RMS: m2 sums the squares."""
    cnt = tl.zeros([], tl.float32) + count
    total = seen + cnt
    if RMS:
        m2 = m2 + _row_sum(hv * hv)
    else:
        t_mean = _div(_row_sum(hv), cnt)
        d = hv - t_mean
        if MASKED:
            d = tl.where(m, d, 0.0)
        delta = t_mean - mean
        mean = mean + delta * _div(cnt, total)
        # The weight first: on a row's first tile it is 0, and delta * delta
        # alone overflows for |mean| above 2**64 (then 0 * inf is NaN).
        m2 = m2 + _row_sum(d * d) + (delta * _div(seen * cnt, total)) * delta
    return mean, m2, total


@triton.jit
def _norm_y(y_ptr, w_ptr, b_ptr, hv, offs, cols, m, mean, rstd, RMS: tl.constexpr, HAS_W: tl.constexpr,
            HAS_B: tl.constexpr, MASKED: tl.constexpr):
    """y = (h - mean) * rstd * w + b of a tile, rounded once to y's dtype."""
    if RMS:
        v = hv * rstd
    else:
        v = (hv - mean) * rstd
    if HAS_W:
        v = v * _f32(_load(w_ptr, cols, m, MASKED))
    if HAS_B:
        v = v + _f32(_load(b_ptr, cols, m, MASKED))
    _store(y_ptr, offs, _rounded(v, y_ptr.dtype.element_ty), m, MASKED)


@triton.jit(do_not_specialize=["rows"])
def _norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr, state_ptr, rows, H, x_stride,
                 res_stride, eps, imap, RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, HAS_STATE: tl.constexpr, ALIGNED: tl.constexpr, MAP_DIMS: tl.constexpr,
                 LOOP: tl.constexpr, EVEN: tl.constexpr, ROUNDS: tl.constexpr, NT: tl.constexpr,
                 STRIDED: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """The forward, a row per program (and, ROUNDS, for more rows than a
    grid holds, every grid-size-th row after it): the whole row in one
    [BLOCK // R, R] tile in registers (BLOCK >= H; unmasked when EVEN, BLOCK
    == H), in NT tiles of BLOCK (NT * BLOCK == H), or (LOOP) over column
    tiles of BLOCK: one pass computes and stores
    h and merges the tiles' statistics, a second reads h back for y.
    ALIGNED: H is a multiple of 4, so every tile starts on a Philox group.
    A shard (imap, MAP_DIMS) draws each row at its global start (_row_map).
    STRIDED: the rows of x and the residual lie x_stride and res_stride
    elements apart; y and h are row-major."""
    TR: tl.constexpr = BLOCK // R
    thr, drop_all, keep_all, scale = _mask_params(state_ptr, HAS_STATE)
    local = tl.arange(0, TR)[:, None] * R + tl.arange(0, R)[None, :]
    # int64 rows: row * H, the element index, passes 2**31 on large tensors.
    row = tl.program_id(0).to(tl.int64)
    if ROUNDS:
        while row < rows:
            _norm_row(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr, state_ptr, row, H, x_stride,
                      res_stride, eps, local, thr, drop_all, keep_all, scale, imap, RMS, HAS_RES, HAS_W, HAS_B,
                      HAS_STATE, ALIGNED, MAP_DIMS, LOOP, EVEN, NT, STRIDED, TR, R, BLOCK)
            row += tl.num_programs(0).to(tl.int64)
    else:
        # One row a program: straight-line code, where a loop around the row
        # keeps more values live (a widest row in registers would spill).
        # The test is always true; without it the ptxas of Triton 3.9 put
        # 8 bytes on the stack (sm_90, column tiles, float32 h of 16-bit x).
        if row < rows:
            _norm_row(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr, state_ptr, row, H, x_stride,
                      res_stride, eps, local, thr, drop_all, keep_all, scale, imap, RMS, HAS_RES, HAS_W, HAS_B,
                      HAS_STATE, ALIGNED, MAP_DIMS, LOOP, EVEN, NT, STRIDED, TR, R, BLOCK)


def _norm_facts(grid, a, warps):
    """Launch facts of _norm_kernel. A row held in one tile is read once;
    one longer than the tile (LOOP) is walked twice, and the second pass
    reads h back from memory (the program keeps one tile of it): a re-read.
    The statistics merge tile after tile: a serial walk of the row's tiles."""
    rows, H, block = a["rows"], a["H"], a["BLOCK"]
    tiles = triton.cdiv(H, block) if a["LOOP"] else a["NT"]
    h_size = a["h_ptr"].element_size()
    per_elem = _streamed_bytes(a, "x_ptr", a["HAS_RES"] and "res_ptr")
    read = rows * H * (per_elem + (h_size if a["LOOP"] else 0)) + _once(a, "HAS_W", "w_ptr", H) + \
        _once(a, "HAS_B", "b_ptr", H) + (24 if a["HAS_STATE"] else 0)
    stats = (1 if a["RMS"] else 2) * rows * a["rstd_ptr"].element_size()
    written = rows * H * (a["y_ptr"].element_size() + h_size) + stats
    steps = triton.cdiv(rows, grid[0])
    # A row held in registers issues all its tiles' loads together.
    inflight = block * per_elem * (1 if a["LOOP"] else tiles)
    return _facts(read, written, inflight, warps, grid[0] * steps * tiles * block, rows * H,
                  tiles if a["LOOP"] else 1)


@triton.jit
def _norm_row(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr, state_ptr, row, H, x_stride,
              res_stride, eps, local, thr, drop_all, keep_all, scale, imap, RMS: tl.constexpr, HAS_RES: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_STATE: tl.constexpr, ALIGNED: tl.constexpr,
              MAP_DIMS: tl.constexpr, LOOP: tl.constexpr, EVEN: tl.constexpr, NT: tl.constexpr,
              STRIDED: tl.constexpr, TR: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """One row of the forward (see _norm_kernel)."""
    ROW_MAP: tl.constexpr = NO_MAP if MAP_DIMS == NO_MAP else SHIFT
    start = row * H
    if STRIDED:
        # Rows lying apart: the row's elements at their row-major indices
        # from a base moved by (stride - H) a row.
        x_ptr += row * (x_stride - H)
        res_ptr += row * (res_stride - H)
    rmap = _row_map(start, imap, MAP_DIMS)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    seen = tl.zeros([], tl.float32)
    if LOOP:
        # The full tiles unmasked (16-byte accesses), then the partial one.
        # while loops: the trip count depends on H, and a for loop over a
        # run-time range is not run by every Triton interpreter; c0 = t *
        # BLOCK, so the compiler knows each tile starts on a multiple of BLOCK.
        tail = H // BLOCK * BLOCK
        # The tile index in 64 bits: t * BLOCK passes 2**31 on rows that long.
        t = tl.zeros([], tl.int64)
        while t * BLOCK < H:
            c0 = t * BLOCK
            if c0 < tail:
                hv = _norm_h(x_ptr, res_ptr, h_ptr, state_ptr, start + c0, local, None, thr, drop_all, keep_all,
                             scale, rmap, HAS_RES, HAS_STATE, ALIGNED, TR, R, False, ROW_MAP)
                mean, m2, seen = _norm_merge(hv, None, BLOCK, mean, m2, seen, RMS, False)
            else:
                m = c0 + local < H
                hv = _norm_h(x_ptr, res_ptr, h_ptr, state_ptr, start + c0, local, m, thr, drop_all, keep_all,
                             scale, rmap, HAS_RES, HAS_STATE, ALIGNED, TR, R, True, ROW_MAP)
                mean, m2, seen = _norm_merge(hv, m, H - c0, mean, m2, seen, RMS, True)
            t += 1
    elif NT == 1:
        m = local < H
        hv = _norm_h(x_ptr, res_ptr, h_ptr, state_ptr, start, local, m, thr, drop_all, keep_all, scale, rmap,
                     HAS_RES, HAS_STATE, ALIGNED, TR, R, not EVEN, ROW_MAP)
        mean, m2, seen = _norm_merge(hv, m, H, mean, m2, seen, RMS, not EVEN)
    else:
        # The row as NT whole tiles, all held: the plain two-pass mean then
        # variance over them, as over one tile.
        hs = ()
        total = tl.zeros([], tl.float32)
        for t in tl.static_range(NT):
            hv = _norm_h(x_ptr, res_ptr, h_ptr, state_ptr, start + t * BLOCK, local, None, thr, drop_all, keep_all,
                         scale, rmap, HAS_RES, HAS_STATE, ALIGNED, TR, R, False, ROW_MAP)
            hs = hs + (hv,)
            if RMS:
                m2 += _row_sum(hv * hv)
            else:
                total += _row_sum(hv)
        seen = tl.zeros([], tl.float32) + H
        if not RMS:
            mean = _div(total, seen)
            for t in tl.static_range(NT):
                d = hs[t] - mean
                m2 += _row_sum(d * d)
    rstd = _div(tl.full([], 1.0, tl.float32), tl.sqrt_rn(_div(m2, seen) + eps))
    if LOOP:
        # The second pass reads h back from global memory, where other
        # threads of the program stored it: a barrier, so that no layout
        # choice of the compiler decides whether those stores are seen.
        tl.debug_barrier()
        t = tl.zeros([], tl.int64)
        while t * BLOCK < H:
            c0 = t * BLOCK
            cols = c0 + local
            if c0 < tail:
                hv = _f32(tl.load(h_ptr + start + cols))
                _norm_y(y_ptr, w_ptr, b_ptr, hv, start + cols, cols, None, mean, rstd, RMS, HAS_W, HAS_B, False)
            else:
                m = cols < H
                hv = _f32(tl.load(h_ptr + start + cols, mask=m, other=0.0))
                _norm_y(y_ptr, w_ptr, b_ptr, hv, start + cols, cols, m, mean, rstd, RMS, HAS_W, HAS_B, True)
            t += 1
    elif NT == 1:
        _norm_y(y_ptr, w_ptr, b_ptr, hv, start + local, local, m, mean, rstd, RMS, HAS_W, HAS_B, not EVEN)
    else:
        for t in tl.static_range(NT):
            cols = t * BLOCK + local
            _norm_y(y_ptr, w_ptr, b_ptr, hs[t], start + cols, cols, None, mean, rstd, RMS, HAS_W, HAS_B, False)
    # The statistics last: a scalar store is one thread's, and between the
    # two passes the thread index that picks it went to the stack under the
    # ptxas of Triton 3.9 (sm_90, the column tiles of float32 rows); stored
    # here it stays in a register under every supported Triton.
    if not RMS:
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_grad_tile(g_ptr, h_ptr, w_ptr, offs, cols, m, mean, rstd, RMS: tl.constexpr, HAS_W: tl.constexpr,
                    MASKED: tl.constexpr):
    """(g, xhat, g * w) of a tile in float32, all 0 where masked."""
    g = _f32(_load(g_ptr, offs, m, MASKED))
    hv = _f32(_load(h_ptr, offs, m, MASKED))
    if RMS:
        xhat = hv * rstd
    else:
        xhat = (hv - mean) * rstd
    if MASKED:
        xhat = tl.where(m, xhat, 0.0)
    gw = g
    if HAS_W:
        gw = g * _f32(_load(w_ptr, cols, m, MASKED))
    return g, xhat, gw


@triton.jit
def _norm_dh_tile(gh_ptr, dx_ptr, dres_ptr, state_ptr, start, local, m, gw, xhat, c1, c2, rstd, thr, drop_all,
                  keep_all, scale, rmap, group0, RMS: tl.constexpr, HAS_GH: tl.constexpr, HAS_STATE: tl.constexpr,
                  ALIGNED: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr, TR: tl.constexpr,
                  R: tl.constexpr, MASKED: tl.constexpr, ROW_MAP: tl.constexpr):
    """dh = (g w - xhat c1 - c2) rstd + grad_h, stored as grad_residual (h's
    dtype), and dropout of dh with the forward's mask as grad_input (grad's
    dtype), a dropped element a zero with dh's sign. The [TR, R] tile is at
    elements start + local; group0 as _keep takes it (ALIGNED)."""
    offs = start + local
    dh = gw - xhat * c1
    if not RMS:
        dh = dh - c2
    dh = dh * rstd
    if HAS_GH:
        dh = dh + _f32(_load(gh_ptr, offs, m, MASKED))
    if NEED_DRES:
        _store(dres_ptr, offs, _rounded(dh, dres_ptr.dtype.element_ty), m, MASKED)
    if NEED_DX:
        if HAS_STATE:
            keep = _keep(state_ptr, dx_ptr, dx_ptr, offs, offs, m, group0, thr, drop_all, keep_all, rmap, TR, R, False,
                         False, MASKED, ALIGNED, ROW_MAP)
            dh = _drop(_mul(dh, scale), keep)
        _store(dx_ptr, offs, _rounded(dh, dx_ptr.dtype.element_ty), m, MASKED)


@triton.jit
def _norm_backward_row_tiled(g_ptr, gh_ptr, h_ptr, w_ptr, mean, rstd, state_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr,
                             start, part, first, H, n, local, thr, drop_all, keep_all, scale, rmap,
                             RMS: tl.constexpr, HAS_GH: tl.constexpr, HAS_W: tl.constexpr, HAS_STATE: tl.constexpr,
                             ALIGNED: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
                             NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                             ROW_MAP: tl.constexpr):
    """One row of the backward over column tiles: the row sums, then dh and
    the partial sums, kept in the program's rows of the partial buffers (at
    part), which the first row writes and later rows read back."""
    TR: tl.constexpr = BLOCK // R
    full = H // BLOCK
    tail = full * BLOCK
    mt = tail + local < H
    c1 = 0.0
    c2 = 0.0
    if NEED_DX | NEED_DRES:
        s1 = tl.zeros([TR, R], tl.float32)
        s2 = tl.zeros([TR, R], tl.float32)
        t = tl.zeros([], tl.int64)
        while t * BLOCK < tail:
            c0 = t * BLOCK
            cols = c0 + local
            g, xhat, gw = _norm_grad_tile(g_ptr, h_ptr, w_ptr, start + cols, cols, None, mean, rstd, RMS, HAS_W,
                                          False)
            s1 += gw * xhat
            s2 += gw
            t += 1
        if tail < H:
            g, xhat, gw = _norm_grad_tile(g_ptr, h_ptr, w_ptr, start + tail + local, tail + local, mt, mean, rstd, RMS,
                                          HAS_W, True)
            s1 += gw * xhat
            s2 += gw
        c1 = _div(_row_sum(s1), n)
        c2 = _div(_row_sum(s2), n)
    t = tl.zeros([], tl.int64)
    while t * BLOCK < H:
        c0 = t * BLOCK
        cols = c0 + local
        if c0 < tail:
            g, xhat, gw = _norm_grad_tile(g_ptr, h_ptr, w_ptr, start + cols, cols, None, mean, rstd, RMS, HAS_W,
                                          False)
            if NEED_DX | NEED_DRES:
                _norm_dh_tile(gh_ptr, dx_ptr, dres_ptr, state_ptr, start + c0, local, None, gw, xhat, c1, c2, rstd,
                              thr, drop_all, keep_all, scale, rmap, (start + c0) // 4, RMS, HAS_GH, HAS_STATE,
                              ALIGNED, NEED_DX, NEED_DRES, TR, R, False, ROW_MAP)
            if NEED_DW:
                prev = tl.where(first, 0.0, tl.load(dw_ptr + part + cols))
                tl.store(dw_ptr + part + cols, prev + g * xhat)
            if NEED_DB:
                prev = tl.where(first, 0.0, tl.load(db_ptr + part + cols))
                tl.store(db_ptr + part + cols, prev + g)
        else:
            g, xhat, gw = _norm_grad_tile(g_ptr, h_ptr, w_ptr, start + cols, cols, mt, mean, rstd, RMS, HAS_W, True)
            if NEED_DX | NEED_DRES:
                _norm_dh_tile(gh_ptr, dx_ptr, dres_ptr, state_ptr, start + c0, local, mt, gw, xhat, c1, c2, rstd,
                              thr, drop_all, keep_all, scale, rmap, (start + c0) // 4, RMS, HAS_GH, HAS_STATE,
                              ALIGNED, NEED_DX, NEED_DRES, TR, R, True, ROW_MAP)
            if NEED_DW:
                prev = tl.where(first, 0.0, tl.load(dw_ptr + part + cols, mask=mt, other=0.0))
                tl.store(dw_ptr + part + cols, prev + g * xhat, mask=mt)
            if NEED_DB:
                prev = tl.where(first, 0.0, tl.load(db_ptr + part + cols, mask=mt, other=0.0))
                tl.store(db_ptr + part + cols, prev + g, mask=mt)
        t += 1


@triton.jit
def _spread(v, REPS: tl.constexpr, SUB: tl.constexpr, K: tl.constexpr):
    """The [RB] values of a step's rows at the slots of the stacked tile
    (see _norm_backward_kernel), K consecutive to a slot, flat."""
    RB: tl.constexpr = v.shape[0]
    return tl.reshape(tl.broadcast_to(v[None, :, None, None], [REPS, RB, SUB, K]), [REPS * RB * SUB * K])


@triton.jit
def _stack_row_sums(v, REPS: tl.constexpr, RB: tl.constexpr, SUB: tl.constexpr):
    """The [RB] sums of the rows of a stacked tile: for each row, the order
    of _row_sum over the row alone (a slot's R elements, then the row's
    slots in a thread, then across its threads), so a row's sums do not
    depend on the rows beside it."""
    s = tl.reshape(tl.sum(v, axis=1), [REPS, RB, SUB])
    return tl.sum(tl.sum(s, axis=0), axis=1)


@triton.jit(do_not_specialize=["rows", "per"])
def _norm_backward_kernel(g_ptr, gh_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, state_ptr, dx_ptr, dres_ptr, dw_ptr,
                          db_ptr, rows, H, per, imap, RMS: tl.constexpr, HAS_GH: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_STATE: tl.constexpr, ALIGNED: tl.constexpr,
                          MAP_DIMS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
                          NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, LOOP: tl.constexpr, EVEN: tl.constexpr,
                          NT: tl.constexpr, RB: tl.constexpr, SUB: tl.constexpr, R: tl.constexpr,
                          BLOCK: tl.constexpr):
    """The backward, rows [pid * per, (pid + 1) * per) per program, each in
    one pass when the row fits in registers, as one tile or NT tiles of
    BLOCK (NT * BLOCK == H) (else two over column tiles, see
    _norm_backward_row_tiled). The program sums g * xhat and g over its rows
    in float32 and writes them to its row of the [programs, H] partial
    buffers (dw_ptr, db_ptr), which _sum_rows_kernel sums in a fixed order:
    the same bits every run (no atomics). A shard
    draws each row at its global start, as the forward (_row_map).

    A row in registers is taken RB rows at a time, so that a program has
    several rows' loads in flight (its rows are few: the partial buffers
    bound the programs). Their tiles are stacked in one [RB * TR, R] tile
    whose slots (16-byte rows of a row's tile) are laid out so that each
    row's tile sits on its own warps as a lone row's tile would on RB times
    fewer (SUB slots of a row per span of its warps), and a row's sums are
    taken in the order of the row alone (_stack_row_sums), so that its dx
    and grad_residual do not depend on the rows beside it. Each slot sums
    its column over the rows it takes, and the RB slots of a column are
    added at the end (a different order of the parameter-gradient sums
    than a row at a time)."""
    TR: tl.constexpr = BLOCK // R
    ROW_MAP: tl.constexpr = NO_MAP if MAP_DIMS == NO_MAP else SHIFT
    thr, drop_all, keep_all, scale = _mask_params(state_ptr, HAS_STATE)
    # A lone row's tile, and the columns past H of a padded one.
    local0 = tl.arange(0, TR)[:, None] * R + tl.arange(0, R)[None, :]
    m0 = local0 < H
    n = tl.zeros([], tl.float32) + H
    pid = tl.program_id(0).to(tl.int64)
    part = pid * H
    r0 = pid * per
    end = tl.minimum(r0 + per, rows)
    if LOOP or RB == 1:
        # A row at a time: the parameter-gradient sums of the program's
        # rows, a tile each (in registers unless LOOP).
        acc_w = ()
        acc_b = ()
        for t in tl.static_range(NT):
            acc_w = acc_w + (tl.zeros([TR, R], tl.float32),)
            acc_b = acc_b + (tl.zeros([TR, R], tl.float32),)
        row = r0
        while row < end:
            start = row * H
            rmap = _row_map(start, imap, MAP_DIMS)
            rstd = tl.load(rstd_ptr + row)
            mean = 0.0
            if not RMS:
                mean = tl.load(mean_ptr + row)
            if LOOP:
                _norm_backward_row_tiled(g_ptr, gh_ptr, h_ptr, w_ptr, mean, rstd, state_ptr, dx_ptr, dres_ptr,
                                         dw_ptr, db_ptr, start, part, row == r0, H, n, local0, thr, drop_all,
                                         keep_all, scale, rmap, RMS, HAS_GH, HAS_W, HAS_STATE, ALIGNED, NEED_DX,
                                         NEED_DRES, NEED_DW, NEED_DB, R, BLOCK, ROW_MAP)
            else:
                gws = ()
                xhats = ()
                new_w = ()
                new_b = ()
                # -0.0: adding it changes no value, the sign of a zero included.
                s1 = tl.full([], -0.0, tl.float32)
                s2 = tl.full([], -0.0, tl.float32)
                for t in tl.static_range(NT):
                    cols = t * BLOCK + local0
                    g, xhat, gw = _norm_grad_tile(g_ptr, h_ptr, w_ptr, start + cols, cols, m0, mean, rstd, RMS,
                                                  HAS_W, not EVEN)
                    gws = gws + (gw,)
                    xhats = xhats + (xhat,)
                    new_w = new_w + (acc_w[t] + g * xhat,)
                    new_b = new_b + (acc_b[t] + g,)
                    s1 += _row_sum(gw * xhat)
                    s2 += _row_sum(gw)
                if NEED_DW:
                    acc_w = new_w
                if NEED_DB:
                    acc_b = new_b
                if NEED_DX | NEED_DRES:
                    c1 = _div(s1, n)
                    c2 = 0.0
                    if not RMS:
                        c2 = _div(s2, n)
                    for t in tl.static_range(NT):
                        _norm_dh_tile(gh_ptr, dx_ptr, dres_ptr, state_ptr, start + t * BLOCK, local0, m0, gws[t],
                                      xhats[t], c1, c2, rstd, thr, drop_all, keep_all, scale, rmap,
                                      (start + t * BLOCK) // 4, RMS, HAS_GH, HAS_STATE, ALIGNED, NEED_DX, NEED_DRES,
                                      TR, R, not EVEN, ROW_MAP)
            row += 1
        if not LOOP:
            for t in tl.static_range(NT):
                if NEED_DW:
                    _store(dw_ptr, part + t * BLOCK + local0, acc_w[t], m0, not EVEN)
                if NEED_DB:
                    _store(db_ptr, part + t * BLOCK + local0, acc_b[t], m0, not EVEN)
    else:
        X: tl.constexpr = RB * TR
        REPS: tl.constexpr = TR // SUB
        # Slot x: repetition x // (RB * SUB), row (x // SUB) % RB of the
        # step, and within its row's tile the slot `sub`.
        xs = tl.arange(0, X)
        x_row = (xs // SUB) % RB
        sub = xs // (RB * SUB) * SUB + xs % SUB
        local = sub[:, None] * R + tl.arange(0, R)[None, :]
        cm = local < H
        # The same per group of four elements (ALIGNED draws a group at a time).
        G: tl.constexpr = R // 4
        gs = tl.arange(0, X * G)
        g_row = (gs // G // SUB) % RB
        g_col = (gs // G // (RB * SUB) * SUB + gs // G % SUB) * R + gs % G * 4
        # Masked: a step may hold rows past the program's.
        MASKED: tl.constexpr = True
        acc_w = ()
        acc_b = ()
        for t in tl.static_range(NT):
            acc_w = acc_w + (tl.zeros([X, R], tl.float32),)
            acc_b = acc_b + (tl.zeros([X, R], tl.float32),)
        row = r0
        while row < end:
            step = row + tl.arange(0, RB).to(tl.int64)
            valid_rb = step < end
            rstd = _spread(tl.load(rstd_ptr + step, mask=valid_rb, other=0.0), REPS, SUB, 1)[:, None]
            mean = 0.0
            if not RMS:
                mean = _spread(tl.load(mean_ptr + step, mask=valid_rb, other=0.0), REPS, SUB, 1)[:, None]
            rows_x = row + x_row[:, None].to(tl.int64)
            valid = rows_x < end
            m = valid
            if not EVEN:
                m = valid & cm
            start = rows_x * H
            group_rows = row + g_row.to(tl.int64)
            # A shard: each row's shift (_row_map), at the slots, or at the groups when drawn by groups.
            rmap = (0,)
            if MAP_DIMS != NO_MAP:
                shift = _global(step * H, imap, MAP_DIMS) - step * H
                if ALIGNED:
                    rmap = (_spread(shift, REPS, SUB, G),)
                else:
                    rmap = (_spread(shift, REPS, SUB, 1)[:, None],)
            gws = ()
            xhats = ()
            new_w = ()
            new_b = ()
            # -0.0: adding it changes no value, the sign of a zero included.
            s1 = tl.full([RB], -0.0, tl.float32)
            s2 = tl.full([RB], -0.0, tl.float32)
            for t in tl.static_range(NT):
                cols = t * BLOCK + local
                g, xhat, gw = _norm_grad_tile(g_ptr, h_ptr, w_ptr, start + cols, cols, m, mean, rstd, RMS, HAS_W,
                                              MASKED)
                gws = gws + (gw,)
                xhats = xhats + (xhat,)
                # A slot without a row keeps its sums (-0.0 + 0.0 would not).
                new_w = new_w + (tl.where(valid, acc_w[t] + g * xhat, acc_w[t]),)
                new_b = new_b + (tl.where(valid, acc_b[t] + g, acc_b[t]),)
                s1 += _stack_row_sums(gw * xhat, REPS, RB, SUB)
                s2 += _stack_row_sums(gw, REPS, RB, SUB)
            if NEED_DW:
                acc_w = new_w
            if NEED_DB:
                acc_b = new_b
            if NEED_DX | NEED_DRES:
                c1 = _spread(_div(s1, n), REPS, SUB, 1)[:, None]
                c2 = 0.0
                if not RMS:
                    c2 = _spread(_div(s2, n), REPS, SUB, 1)[:, None]
                for t in tl.static_range(NT):
                    # The groups are not consecutive across the rows: each
                    # one's index, less its place in the tile (_keep adds it).
                    group0 = (group_rows * H + t * BLOCK + g_col) // 4 - gs
                    _norm_dh_tile(gh_ptr, dx_ptr, dres_ptr, state_ptr, start + t * BLOCK, local, m, gws[t],
                                  xhats[t], c1, c2, rstd, thr, drop_all, keep_all, scale, rmap, group0, RMS, HAS_GH,
                                  HAS_STATE, ALIGNED, NEED_DX, NEED_DRES, X, R, MASKED, ROW_MAP)
            row += RB
        for t in tl.static_range(NT):
            cols = t * BLOCK + local0
            if NEED_DW:
                w_sum = tl.reshape(tl.sum(tl.reshape(acc_w[t], [REPS, RB, SUB, R]), axis=1), [TR, R])
                _store(dw_ptr, part + cols, w_sum, m0, not EVEN)
            if NEED_DB:
                b_sum = tl.reshape(tl.sum(tl.reshape(acc_b[t], [REPS, RB, SUB, R]), axis=1), [TR, R])
                _store(db_ptr, part + cols, b_sum, m0, not EVEN)


def _norm_backward_facts(grid, a, warps):
    """Launch facts of _norm_backward_kernel. A row held in one tile is read
    once and its parameter-gradient terms summed in registers over the
    program's rows, then one float32 partial row each is written. A row
    longer than the tile (LOOP) is read twice when dx or grad_residual needs
    its sums (the program keeps one tile), and its partial rows are read and
    written again for every row after the program's first. Either walk over
    rows streams them (each row's loads produce its dx and grad_residual),
    so it counts 1, as the CUDA kernel's does."""
    rows, H, per, block = a["rows"], a["H"], a["per"], a["BLOCK"]
    loop = a["LOOP"]
    tiles = triton.cdiv(H, block) if loop else a["NT"]
    need_dh = a["NEED_DX"] or a["NEED_DRES"]
    per_elem = _streamed_bytes(a, "g_ptr", "h_ptr", a["HAS_GH"] and need_dh and "gh_ptr")
    rowpass = _streamed_bytes(a, "g_ptr", "h_ptr")
    grads = int(a["NEED_DW"]) + int(a["NEED_DB"])
    stats = (1 if a["RMS"] else 2) * rows * a["rstd_ptr"].element_size()
    read = rows * H * (per_elem + (rowpass if loop and need_dh else 0)) + stats + \
        _once(a, "HAS_W", "w_ptr", H) + (24 if a["HAS_STATE"] else 0)
    written = rows * H * ((a["dx_ptr"].element_size() if a["NEED_DX"] else 0) +
                          (a["dres_ptr"].element_size() if a["NEED_DRES"] else 0))
    if loop:
        read += grads * (rows - grid[0]) * H * 4
        written += grads * rows * H * 4
    else:
        written += grads * grid[0] * H * 4
    # A step's rows (RB of them, each held as its tiles) issue their loads together.
    rb = a["RB"]
    inflight = block * per_elem * (1 if loop else tiles * rb)
    slots = grid[0] * triton.cdiv(per, rb) * rb * tiles * block
    return _facts(read, written, inflight, warps, slots, rows * H, 1)


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
# Rows a thread, where neither an activation nor Philox has values live: a
# structured mask read through broadcast strides (its keep index is integer
# work) with the identity. Two rows double the loads in flight for fewer
# than twice the registers (16-bit on sm_90: 80 registers with 2 rows, 44
# with one, at 8 warps).
_FLAT_LIGHT_ROWS = 2
_ROWS_WARPS = 4
# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1).
GRID_YZ_MAX = 65535
# Programs per SM of the bias-gradient kernel (over all column tiles), at
# most: it streams the whole backward, so it wants programs to spare.
_ROWS_SM_PROGRAMS = 8
# Rows a program walks, at least, in the kernels that leave a float32
# partial row per program (the bias gradient, the norm backward's parameter
# gradients): each partial element is written and read again, 8 bytes, per
# this many row elements of the op, which move 4 bytes or more each (a
# 16-bit g read and dx written; the norm backward's 16-bit g, h, dx and
# grad_residual move 8 bytes for its two partial buffers' 16). So the
# partials are at most 8 / (48 * 4), about 4%, of the op's bytes.
_PART_MIN_ROWS = 48
# The second stage (_sum_rows_kernel): partial rows summed a tile at a time,
# in at most _SUM_STEPS tiles of at least _SUM_MIN_C rows, with about
# _SUM_TILE elements a program's tile (16 a thread at 4 warps: no spills).
_SUM_STEPS = 32
_SUM_MIN_C = 16
_SUM_TILE = 4096
_SUM_WARPS = 4
# Under the interpreter, tiny blocks, so that small test tensors span several
# programs and take both the full-block and the partial-block path.
_INTERPRET_ROWS = 8


def _vector(elem_size: int) -> int:
    """Elements per row of a tile: 16 bytes of the tensor (a 128-bit access)."""
    return max(4, 16 // elem_size)


def flat_config(n: int, elem_size: int, light: bool = False) -> Tuple[int, int, int]:
    """(R, BLOCK, num_warps) of the flat kernels for n elements of elem_size
    bytes; light: a tile with no activation and no draws (_FLAT_LIGHT_ROWS)."""
    R = _vector(elem_size)
    if _INTERPRET:
        return R, R * _INTERPRET_ROWS, 1
    for limit, rows, warps in _FLAT_TABLE:
        if limit is None or n <= limit:
            if light and limit is None:
                rows = _FLAT_LIGHT_ROWS
            return R, R * 32 * warps * rows, warps
    raise AssertionError("unreachable")


def rows_config(rows: int, H: int, elem_size: int, sm_count: int,
                structured: bool = False) -> Tuple[int, int, int, int, int]:
    """(R, BLOCK, num_warps, rows per program, RB) of the bias-gradient
    kernel: column tiles of BLOCK that divide H where it is a multiple of R
    (no idle lane: 768 = 3 x 256), RB rows a step stacked in a tile of
    R * 32 * _ROWS_WARPS elements. The rows per program are a run-time
    argument: a new row count compiles nothing. A structured mask's keep
    index walks one row (RB = 1)."""
    R = _vector(elem_size)
    if _INTERPRET:
        # Two rows a step and an odd count a program: the test shapes take
        # the stacked tile, whole steps and a step short of RB rows.
        return R, 2 * R, 1, 3, 1 if structured else 2
    tile = R * 32 * _ROWS_WARPS
    split = H & -H  # the largest power of two dividing H
    if split * elem_size >= 128 and not structured:
        # A warp's width of columns, stacked rows filling the tile: the
        # partial rows cost the same whatever the width (a row per row
        # program), so narrower tiles are more programs for a short tensor
        # to spread. A row's part is a 128-byte line at least: a narrower
        # one would leave half of each sector it loads to another program.
        block = min(R * 32, split)
    else:
        # One padded power-of-two tile (a structured mask's keep index walks
        # one row a step, so it takes the widest).
        block = min(tile, max(R, triton.next_power_of_2(H)))
    rb = 1 if structured else max(1, tile // block)
    warps = max(1, min(_ROWS_WARPS, rb * block // (R * 32)))
    programs = max(1, _ROWS_SM_PROGRAMS * sm_count // triton.cdiv(H, block))
    per = max(_PART_MIN_ROWS, triton.cdiv(rows, programs))
    # The row programs are grid axis 1: past 65535 of them, longer programs.
    per = min(rows, max(per, triton.cdiv(rows, GRID_YZ_MAX)))
    return R, block, warps, per, rb


def rows_grid(rows: int, H: int, block: int, per: int) -> Tuple[int, int]:
    """The bias-gradient kernel's grid: (column tiles, row programs)."""
    return triton.cdiv(H, block), triton.cdiv(rows, per)


def sum_config(parts: int, H: int) -> Tuple[int, int, int]:
    """(C, BLOCK, num_warps) of the second stage over `parts` partial rows
    of H columns: C a power of two (a constexpr, one of a few), so that no
    program adds more than _SUM_STEPS tiles one after the other."""
    if _INTERPRET:
        # Two rows a tile: the test shapes' few partial rows take several steps.
        return 2, 4, 1
    C = max(_SUM_MIN_C, triton.next_power_of_2(triton.cdiv(parts, _SUM_STEPS)))
    block = max(4, min(triton.next_power_of_2(H), _SUM_TILE // C))
    return C, block, _SUM_WARPS


# dropout_add_norm: a row is one tile in registers up to a length set by
# what a thread can hold without spilling (tests/test_triton_compile.py
# checks the widest configurations on sm_90): the elements of a tile per
# thread and the warps, at most, by direction and by whether rows start on a
# Philox group. A thread's registers are capped at 65536 / threads, so 16
# warps leave 128 each and 8 warps 255. The forward holds h (a value an
# element); the backward g, xhat, g * w and the two partial sums; a row not
# starting on a group draws a Philox call per element, whose rounds keep
# several words live per element. A longer row is walked in column tiles,
# twice. NORM_MAX_BLOCK caps the tile for all; a module global, so that a
# test can make it small and take the tiled path with small rows.
NORM_MAX_BLOCK = 16384
NORM_LOOP_BLOCK = 4096
# Tiles of a row held in registers, at most (each is unrolled in the code).
_NORM_MAX_TILES = 7
# (elements a thread, warps) at most, keyed by (backward, aligned)
_NORM_LIMITS = {(False, True): (32, 16), (True, True): (32, 8), (False, False): (8, 8), (True, False): (4, 8)}
# Programs per SM of the backward, at most: each writes one float32 partial
# row per parameter gradient, so their count is what the partial buffers
# cost, and each walks at least _PART_MIN_ROWS rows, which bounds that cost
# on any shape; a program holds one step's rows in flight, so a long tensor
# takes several programs an SM to keep the memory busy.
_NORM_SM_PROGRAMS = 8
# Bytes of g and h a backward program has in flight, at least, where its
# rows are held in registers: the partial buffers bound the programs (under
# one an SM on a short tensor), so a program takes several rows at a time
# (norm_backward_rows), on up to _NORM_BWD_MAX_WARPS warps.
_NORM_BWD_INFLIGHT = 32 * 1024
_NORM_BWD_MAX_WARPS = 8
# Under the interpreter: a few programs, so that a program walks several rows.
_INTERPRET_NORM_PROGRAMS = 3
GRID_X_MAX = 2**31 - 1


def norm_limits(H: int, elem_size: int, backward: bool) -> Tuple[int, int]:
    """(elements a thread, warps) at most of a norm row held in registers."""
    per_thread, max_warps = _NORM_LIMITS[backward, H % 4 == 0]
    if backward and elem_size == 4:
        # float32's backward: past 16 elements a thread, Triton 3.6's ptxas
        # puts part of the row on the stack at 255 registers.
        per_thread = min(per_thread, 16)
    return per_thread, max_warps


def norm_config(H: int, elem_size: int, backward: bool = False) -> Tuple[int, int, int, bool, int]:
    """(R, BLOCK, num_warps, loop, tiles) of a dropout_add_norm kernel for
    rows of H elements of elem_size bytes: the row in registers, as one
    tile (BLOCK >= H) or as `tiles` tiles of BLOCK (H == tiles * BLOCK, a
    row whose length is not a power of two: every lane holds an element,
    where one padded tile would leave up to half of them idle, a quarter at
    768), or, with loop, the column tile of a longer row."""
    R = _vector(elem_size)
    per_thread, max_warps = norm_limits(H, elem_size, backward)
    limit = min(NORM_MAX_BLOCK, per_thread * 32 * max_warps)
    block = max(R, triton.next_power_of_2(max(H, 1)))
    loop = block > limit
    tiles = 1
    if loop:
        block = max(R, min(NORM_LOOP_BLOCK, limit))
    # 16 elements a thread or fewer where the limit allows: more loads in
    # flight per row.
    warps = max(1, min(max_warps, max(block // 512, block // (32 * per_thread))))
    split = H & -H  # the largest power of two dividing H
    # A tile of whole 16-byte rows for every thread (under the interpreter,
    # whose test rows are short, of one such row at least).
    smallest = R if _INTERPRET else R * 32
    if not loop and split != H and H // split <= _NORM_MAX_TILES and split >= smallest:
        want = triton.next_power_of_2(max(triton.cdiv(H, 512), triton.cdiv(H, 32 * per_thread)))
        split_warps = max(1, min(max_warps, want, split // (R * 32)))
        if H <= split_warps * 32 * per_thread:
            block, tiles, warps = split, H // split, split_warps
    return R, block, 1 if _INTERPRET else warps, loop, tiles


def norm_backward_rows(H: int, elem_size: int, h_size: int) -> Tuple[int, int, int]:
    """(RB, SUB, num_warps) of the dropout_add_norm backward: RB rows a step
    when its rows are held in registers, each on the warps a lone row's tile
    takes (norm_config), SUB of its tile's 16-byte rows per span of them;
    enough rows for _NORM_BWD_INFLIGHT bytes of g and h (h_size bytes an
    element) in flight, within _NORM_BWD_MAX_WARPS warps."""
    R, block, warps, loop, tiles = norm_config(H, elem_size, backward=True)
    TR = block // R
    if _INTERPRET:
        # Two rows a step: the test shapes take the stacked tile, and steps
        # with a row past the program's.
        return (1 if loop else 2), TR, warps
    if loop or TR < 32 * warps:
        return 1, TR, warps
    rb = triton.next_power_of_2(triton.cdiv(_NORM_BWD_INFLIGHT, H * (elem_size + h_size)))
    rb = max(1, min(rb, _NORM_BWD_MAX_WARPS // warps))
    return rb, 32 * warps, rb * warps


def norm_backward_grid(rows: int, sm_count: int, rb: int = 1) -> Tuple[int, int]:
    """(programs, rows per program) of the dropout_add_norm backward, from
    the shape and the SM count alone (they fix the order of the
    parameter-gradient sums): up to _NORM_SM_PROGRAMS programs per SM, each
    over consecutive rows, at least _PART_MIN_ROWS of them, in whole steps
    of rb rows (rounded down where that keeps both bounds: more programs).
    The rows per program are a run-time argument: a new row count compiles
    nothing."""
    cap = _INTERPRET_NORM_PROGRAMS if _INTERPRET else _NORM_SM_PROGRAMS * sm_count
    target = _INTERPRET_NORM_PROGRAMS if _INTERPRET else min(cap, rows // _PART_MIN_ROWS)
    per = triton.cdiv(rows, max(1, min(rows, target)))
    down = per // rb * rb
    if down >= _PART_MIN_ROWS and triton.cdiv(rows, down) <= cap:
        per = down
    else:
        per = triton.cdiv(per, rb) * rb
    return triton.cdiv(rows, per), per


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


# --- launch facts, for a static performance model ------------------------------------------
# Under ``recording()`` the launchers run on tensors of any device ("meta"
# included, shapes only) and launch nothing: each launch, and each pass a
# launcher leaves to torch on the device, becomes a record, a dict:
#   kernel: the jit function's name ("torch.<op>" for a torch pass);
#   grid, num_warps, constexprs (the meta arguments but num_warps);
#   bytes_read, bytes_written: global memory the launch reads and writes in
#     all, each byte once (a tensor read by every program, such as the bias,
#     counts once); a row a program re-reads counts again only when it is
#     longer than the tile the program keeps;
#   inflight_bytes_per_thread: bytes one thread has requested before it
#     first waits on a load: a program issues its tile's loads together,
#     the tile's bytes of every streamed tensor / (num_warps * 32);
#   lane_slots, busy_slots: element slots the programs' tiles offer in all
#     (grid x tile x steps), and those holding an element;
#   dependent_loads: the longest serial walk of loads one thread makes whose
#     values feed one reduction result, each waiting on the previous (a
#     streaming step counts 1, and so does a walk over rows whose loads
#     also produce the rows' outputs: the other resident threads cover it).
# The facts of a kernel come from its function beside it (_FACTS).

_RECORDS: Optional[list] = None
_RECORD_SMS = 0


@contextlib.contextmanager
def recording(sm_count: int = 132):
    """Within it, launches are recorded, not made, and the launchers size
    their grids for a GPU of sm_count SMs; yields the list of records."""
    global _RECORDS, _RECORD_SMS
    saved = _RECORDS, _RECORD_SMS
    _RECORDS, _RECORD_SMS = [], sm_count
    try:
        yield _RECORDS
    finally:
        _RECORDS, _RECORD_SMS = saved


def _streamed_bytes(a, *names) -> float:
    """Bytes a tile element loads: of each named tensor (a false name: not
    loaded), and of the mask it reads (a structured keep byte, a packed bit)."""
    total = sum(a[name].element_size() for name in names if name)
    if a.get("MASK_FROM_PTR"):
        total += 1
    if a.get("BITS_IN"):
        total += 1 / 8
    return total


def _keep_reread(a, elements: int) -> int:
    """Bytes to take off `elements` streamed keep bytes for a structured
    mask read through broadcast strides: its small keep tensor counts once."""
    if a.get("MASK_FROM_PTR") and a.get("KEEP_DIMS"):
        return elements - a["keep_ptr"].numel()
    return 0


def _once(a, flag: str, name: str, count: int) -> int:
    """Bytes of `count` elements of a tensor every program reads, when flag."""
    return count * a[name].element_size() if a[flag] else 0


def _facts(read, written, tile_bytes, warps, slots, busy, chain) -> dict:
    return {"bytes_read": math.ceil(read), "bytes_written": math.ceil(written),
            "inflight_bytes_per_thread": tile_bytes / (warps * 32), "lane_slots": slots, "busy_slots": busy,
            "dependent_loads": chain}


def _fn_name(kernel) -> str:
    return getattr(kernel, "fn", kernel).__name__


def _torch_pass(name: str, read: int, written: int, elements: int) -> None:
    """Records a pass that torch runs on the device for a launcher."""
    if _RECORDS is not None:
        _RECORDS.append({"kernel": name, "grid": (), "num_warps": 0, "constexprs": {},
                         **_facts(read, written, 0, 1, elements, elements, 1)})


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


def _signature(params, args, constexprs) -> dict:
    """A recorded launch's argument types, as Triton's ahead-of-time compiler
    takes them (an integer as i64: what a launch with a large value gets)."""
    def kind(v):
        if isinstance(v, torch.Tensor):
            return "*" + _TRITON_TYPES[v.dtype]
        if isinstance(v, tuple):
            return tuple(kind(e) for e in v)
        return "fp32" if isinstance(v, float) else "i64"

    values = dict(zip(params, args))
    return {p: "constexpr" if p in constexprs else kind(values[p]) for p in params}


def _specialised_divisible(kernel, params, args) -> List[str]:
    """The integer arguments a launch specialises as multiples of 16 (a
    launch compiles for what it is given: a row length of 768 is known to
    keep rows 16-byte aligned, which the compiled loads rely on)."""
    if not hasattr(kernel, "params"):
        return []  # the interpreter's kernels: nothing is compiled
    fixed = {p.name for p in kernel.params if p.do_not_specialize}
    return [p for p, v in zip(params, args)
            if isinstance(v, int) and not isinstance(v, bool) and p not in fixed and v % 16 == 0]


def _launch(kernel, grid, like: torch.Tensor, *args, **meta) -> None:
    """Every launch of this module: on ``like``'s device (recorded instead
    under ``recording()``)."""
    if _RECORDS is not None:
        name = _fn_name(kernel)
        warps = meta["num_warps"]
        constexprs = {k: v for k, v in meta.items() if k != "num_warps"}
        params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        facts_of = _FACTS[name]
        facts = facts_of(grid, {**dict(zip(params, args)), **constexprs}, warps)
        _RECORDS.append({"kernel": name, "grid": tuple(grid), "num_warps": warps, "constexprs": constexprs,
                         "signature": _signature(params, args, constexprs),
                         "divisible": _specialised_divisible(kernel, params, args), **facts})
        return
    with _device_guard(like):
        kernel[grid](*args, **meta)


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t row-major: itself, or a copy (a pass over it)."""
    if t is None or t.is_contiguous():
        return t
    _torch_pass("torch.contiguous", t.numel() * t.element_size(), t.numel() * t.element_size(), t.numel())
    return t.contiguous()


def _rows(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """A streamed tensor as the elementwise kernels read it, and how far
    apart its rows lie: itself where its rows can be read in place (the op
    row_stride, csrc/op_common.h: a slice or chunk of a wider last
    dimension), else a row-major copy (_dense)."""
    H = _last_dim(t)
    if t.is_contiguous():
        return t, H
    stride = torch.ops.dropout_ext.row_stride(list(t.shape), list(t.stride()), _vector(t.element_size()))
    return (t, stride) if stride >= 0 else (_dense(t), H)


def _state_on(state: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The state where the kernels read it. One the host holds (``seed=``) is
    written on the device by fills that carry its words as kernel
    arguments: a copy from pageable host memory would synchronise."""
    if state is None or state.device == device:
        return state
    for _ in range(state.numel()):
        _torch_pass("torch.fill_", 0, 8, 1)
    return _words(state.tolist(), device)


# The identity map's launch arguments (imap, MAP_DIMS): an unsharded call.
_IDENTITY = ((0, 1) + (1,) * MAX_MAP_DIMS.value + (0,) * MAX_MAP_DIMS.value, NO_MAP.value)


def _index_map(shape: Sequence[int], place: Optional[Sequence[int]]) -> Tuple[tuple, int]:
    """(imap, MAP_DIMS) of a tensor of `shape` at `place`, from the C++
    derivation (one for every backend); the identity for no place, and for
    a place whose map is one (a shard that starts the global tensor and is
    consecutive in it), which then costs nothing."""
    if place is None:
        return _IDENTITY
    words = torch.ops.dropout_ext.index_map(list(shape), list(place))
    base, run, dims = words[:3]
    if dims == 0 and base == 0:
        return _IDENTITY
    return (base, run, *words[3:]), dims


def _keeps_groups(imap: tuple, dims: int) -> bool:
    """Whether the map sends every group of four local elements (4j to 4j + 3)
    to a whole group of the contract: base a multiple of 4, and with strided
    dimensions the run and their strides too. The kernels then draw a group
    at a time (ALIGNED), else element by element."""
    if dims == NO_MAP.value:
        return True
    strides = imap[2 + MAX_MAP_DIMS.value:2 + MAX_MAP_DIMS.value + dims]
    return imap[0] % 4 == 0 and (dims == 0 or imap[1] % 4 == 0 and all(t % 4 == 0 for t in strides))


# A launch without a structured mask: kmap's words unread (KEEP_DIMS 0).
_NO_KEEP = ((1,) * MAX_KEEP_DIMS.value + (0,) * MAX_KEEP_DIMS.value, 0)


def _keep_view(shape: Sequence[int], small: Sequence[int]) -> Optional[Tuple[tuple, int]]:
    """(kmap, KEEP_DIMS) reading a row-major keep tensor of shape `small`
    broadcast to `shape`: the dimensions of more than one element, runs of
    them collapsed where one continues the next (a broadcast run included),
    as csrc/cuda/ops_impl.h collapse_mask; None past MAX_KEEP_DIMS."""
    small = (1,) * (len(shape) - len(small)) + tuple(small)
    own, step = [], 1
    for s in reversed(small):
        own.append(step)
        step *= s
    own.reverse()
    sizes, strides = [], []
    for s, k, st in zip(shape, small, own):
        if s == 1:
            continue
        st = st if k == s else 0
        if sizes and strides[-1] == s * st:
            sizes[-1] *= s
            strides[-1] = st
        else:
            sizes.append(s)
            strides.append(st)
    if not sizes:
        sizes, strides = [1], [0]
    dims = len(sizes)
    if dims > MAX_KEEP_DIMS.value:
        return None
    pad = MAX_KEEP_DIMS.value - dims
    return tuple(sizes[::-1]) + (1,) * pad + tuple(strides[::-1]) + (0,) * pad, dims


def _structured_keep(state, shape, mask_shape, place) -> Tuple[Optional[torch.Tensor], tuple, int]:
    """(keep, kmap, KEEP_DIMS) of a structured mask: its small keep mask,
    which the kernels read through broadcast strides (never saved for
    backward); a shard's is the block of the global small mask at its place
    (sharding.mask_place). A mask of more alternating runs of broadcast and
    kept dimensions than the kernels index is broadcast to the full shape
    (a 1-byte temporary) and read at each element's index. No keep tensor
    (None) for a full mask or none."""
    if state is None or not mask_shape or tuple(mask_shape) == global_shape(shape, place):
        return (None,) + _NO_KEEP
    small, small_place = mask_place(shape, mask_shape, place)
    keep = dropout_mask(state, list(small), small_place)
    view = _keep_view(shape, small)
    if view is not None:
        return (keep,) + view
    n = math.prod(shape)
    _torch_pass("torch.contiguous", keep.numel(), n, n)
    return (keep.expand(tuple(shape)).contiguous(),) + _NO_KEEP


def _like_input(input: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The output in the input's memory format, as nn.Dropout gives it:
    empty_like's, the result's own layout for most tensors with gaps (a
    slice), whose result then needs no copy."""
    if input.is_contiguous():
        return result
    out = torch.empty_like(input)
    if out.stride() == result.stride():
        return result
    _torch_pass("torch.copy_", result.numel() * result.element_size(), result.numel() * result.element_size(),
                result.numel())
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
                  mask_bits: Optional[torch.Tensor] = None, pack_mask: bool = False,
                  place: Optional[List[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, bits): bits is the packed keep mask when pack_mask asks for it
    and the mask is packable, else empty; with mask_bits the keep bits are
    read from there instead of drawn (state still gives the scale). place:
    the input is that block of a global tensor, whose mask it draws."""
    _check_dtype(input, "input")
    x, x_stride = _rows(input)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    bits = mask_bits_like(x, state, mask_shape, pack_mask, place)
    n = x.numel()
    if n == 0:
        return _like_input(input, out), bits
    state = _state_on(state, x.device)
    keep, kmap, kdims = _structured_keep(state, x.shape, mask_shape, place)
    b = _dense(bias) if bias is not None else x
    r, r_stride = _rows(residual) if residual is not None else (x, x_stride)
    pack = bits.numel() > 0
    bits_in = _dense(mask_bits) if mask_bits is not None else None
    bp = bits if pack else bits_in if bits_in is not None else x
    draws = state is not None and keep is None and bits_in is None
    imap, dims = _index_map(x.shape, place if draws else None)
    R, block, warps = flat_config(n, x.element_size(), light=kdims > 0 and activation == "identity")
    H = _last_dim(x)
    _launch(_flat_kernel, (triton.cdiv(n, block),), x,
            x, x, b, r, keep if keep is not None else x, out, state if state is not None else x, bp, n,
            H, x_stride, x_stride, r_stride, imap, kmap, ACT=ACTS[activation], HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, HAS_STATE=state is not None, MASK_FROM_PTR=keep is not None,
            BITS_IN=bits_in is not None, BITS_OUT=pack, BWD=False, ALIGNED=_keeps_groups(imap, dims), MAP_DIMS=dims,
            KEEP_DIMS=kdims, STRIDED=x_stride != H or r_stride != H, R=R, BLOCK=block, num_warps=warps)
    return _like_input(input, out), bits


def fused_dropout_backward(grad: torch.Tensor, input: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           state: Optional[torch.Tensor], activation: str, mask_shape: Sequence[int],
                           bias_grad: bool, mask_bits: Optional[torch.Tensor] = None,
                           place: Optional[List[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_dtype(grad, "grad")
    _check_dtype(input, "input")
    g, g_stride = _rows(grad)
    dx = torch.empty_like(g, memory_format=torch.contiguous_format)
    H = _last_dim(g)
    n = g.numel()
    if not bias_grad:
        db = g.new_empty((0,))
    elif n == 0:
        _torch_pass("torch.zeros", 0, H * g.element_size(), H)
        db = g.new_zeros((H,))
    if n == 0:
        return _like_input(grad, dx), db
    state = _state_on(state, g.device)
    keep, kmap, kdims = _structured_keep(state, g.shape, mask_shape, place)
    act = ACTS[activation]
    x, x_stride = _rows(input) if (input is not None and act != ACTS["identity"]) else (g, g_stride)
    has_bias = bias is not None and act != ACTS["identity"]
    b = _dense(bias) if has_bias else g
    kp = keep if keep is not None else g
    st = state if state is not None else g
    bp = _dense(mask_bits) if mask_bits is not None else g
    draws = state is not None and keep is None and mask_bits is None
    imap, dims = _index_map(g.shape, place if draws else None)
    common = dict(ACT=act, HAS_BIAS=has_bias, HAS_STATE=state is not None, MASK_FROM_PTR=keep is not None,
                  BITS_IN=mask_bits is not None, ALIGNED=_keeps_groups(imap, dims), MAP_DIMS=dims, KEEP_DIMS=kdims,
                  STRIDED=g_stride != H or x_stride != H)
    if bias_grad:
        rows = n // H
        R, block, warps, per, rb = rows_config(rows, H, g.element_size(), _sm_count(g.device), kdims > 0)
        grid = rows_grid(rows, H, block, per)
        part = g.new_empty((grid[1], H), dtype=torch.float32)
        common["ALIGNED"] = common["ALIGNED"] and H % 4 == 0
        _launch(_rows_kernel, grid, g,
                g, x, b, kp, dx, part, st, bp, rows, H, g_stride, x_stride, per, imap, kmap, R=R, BLOCK=block, RB=rb,
                num_warps=warps, **common)
        db = _sum_rows(part, g.dtype)
    else:
        R, block, warps = flat_config(n, g.element_size(), light=kdims > 0 and act == ACTS["identity"])
        _launch(_flat_kernel, (triton.cdiv(n, block),), g,
                g, x, b, g, kp, dx, st, bp, n, H, g_stride, x_stride, g_stride, imap, kmap, HAS_RES=False,
                BITS_OUT=False, BWD=True, R=R, BLOCK=block, num_warps=warps, **common)
    return _like_input(grad, dx), db


def _sum_rows(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The column sums of a float32 partial buffer, rounded once to dtype."""
    parts, H = part.shape
    out = part.new_empty((H,), dtype=dtype)
    C, block, warps = sum_config(parts, H)
    _launch(_sum_rows_kernel, (triton.cdiv(H, block),), part, part, out, parts, H, C=C, BLOCK=block,
            num_warps=warps)
    return out


def dropout_mask(state: torch.Tensor, shape: List[int], place: Optional[List[int]] = None) -> torch.Tensor:
    out = state.new_empty(tuple(shape), dtype=torch.bool)
    n = out.numel()
    if n == 0:
        return out
    imap, dims = _index_map(shape, place)
    R, block, warps = flat_config(n, 1)
    _launch(_mask_kernel, (triton.cdiv(n, block),), out, out, state, n, imap, ALIGNED=_keeps_groups(imap, dims),
            MAP_DIMS=dims, R=R, BLOCK=block, num_warps=warps)
    return out


def _sm_count(device: torch.device) -> int:
    """SMs of the tensors' GPU (the backward's grid); the interpreter has none."""
    if _RECORDS is not None:
        return _RECORD_SMS
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def dropout_add_norm(input: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], state: Optional[torch.Tensor], norm: str, eps: float,
                     residual_in_fp32: bool, place: Optional[List[int]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd), as reference.dropout_add_norm; y and h row-major.
    place: the input is that block of a global tensor, whose rows it holds whole."""
    _check_dtype(input, "input")
    x, x_stride = _rows(input)
    h_dtype, stat_dtype = norm_dtypes(x.dtype, residual_in_fp32)
    H = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape, dtype=h_dtype)
    mean = x.new_empty((rows if norm == "layer" else 0,), dtype=stat_dtype)
    rstd = x.new_empty((rows,), dtype=stat_dtype)
    if rows == 0:
        return y, h, mean, rstd
    state = _state_on(state, x.device)
    r, r_stride = _rows(residual) if residual is not None else (x, x_stride)
    w = _dense(weight) if weight is not None else x
    b = _dense(bias) if bias is not None else x
    imap, dims = _index_map(x.shape, place if state is not None else None)
    R, block, warps, loop, tiles = norm_config(H, x.element_size())
    grid = min(rows, GRID_X_MAX)
    _launch(_norm_kernel, (grid,), x,
            x, r, w, b, y, h, mean if norm == "layer" else rstd, rstd, state if state is not None else x, rows, H,
            x_stride, r_stride, float(eps), imap, ROUNDS=rows > grid, RMS=norm == "rms", HAS_RES=residual is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_STATE=state is not None, ALIGNED=H % 4 == 0,
            MAP_DIMS=dims, LOOP=loop, EVEN=not loop and block * tiles == H, NT=tiles,
            STRIDED=x_stride != H or r_stride != H, R=R, BLOCK=block, num_warps=warps)
    return y, h, mean, rstd


def dropout_add_norm_backward(grad: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor,
                              weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                              state: Optional[torch.Tensor], norm: str, output_mask: Sequence[bool],
                              place: Optional[List[int]] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_residual, grad_weight, grad_bias), as
    reference.dropout_add_norm_backward; [0] where output_mask leaves one out."""
    _check_dtype(grad, "grad")
    need_dx, need_dres, need_dw, need_db = (bool(v) for v in output_mask)
    g = _dense(grad)
    hc = _dense(h)
    H = g.shape[-1]
    rows = math.prod(g.shape[:-1])
    stat = rstd.dtype
    dx = g.new_empty(g.shape if need_dx else (0,))
    dres = g.new_empty(g.shape if need_dres else (0,), dtype=h.dtype)

    def param(need):
        return g.new_empty((H,) if need else (0,), dtype=stat)

    if g.numel() == 0 or not any((need_dx, need_dres, need_dw, need_db)):
        for need in (need_dw, need_db):
            if need:
                _torch_pass("torch.zero_", 0, H * 4, H)
        return dx, dres, param(need_dw).zero_(), param(need_db).zero_()
    state = _state_on(state, g.device)
    R, block, _, loop, tiles = norm_config(H, g.element_size(), backward=True)
    rb, sub, warps = norm_backward_rows(H, g.element_size(), hc.element_size())
    programs, per = norm_backward_grid(rows, _sm_count(g.device), rb)
    dw_part = g.new_empty((programs, H), dtype=torch.float32) if need_dw else g
    db_part = g.new_empty((programs, H), dtype=torch.float32) if need_db else g
    gh = _dense(grad_h) if grad_h is not None else g
    w = _dense(weight) if weight is not None else g
    drop = need_dx and state is not None
    rstd = _dense(rstd)
    imap, dims = _index_map(g.shape, place if drop else None)
    _launch(_norm_backward_kernel, (programs,), g,
            g, gh, hc, w, _dense(mean) if norm == "layer" else rstd, rstd, state if drop else g,
            dx if need_dx else g, dres if need_dres else hc, dw_part, db_part, rows, H, per, imap,
            RMS=norm == "rms", HAS_GH=grad_h is not None, HAS_W=weight is not None, HAS_STATE=drop,
            ALIGNED=H % 4 == 0, MAP_DIMS=dims, NEED_DX=need_dx, NEED_DRES=need_dres, NEED_DW=need_dw, NEED_DB=need_db,
            LOOP=loop, EVEN=not loop and block * tiles == H, NT=tiles, RB=rb, SUB=sub, R=R, BLOCK=block,
            num_warps=warps)
    dw = _sum_rows(dw_part, stat) if need_dw else param(False)
    db = _sum_rows(db_part, stat) if need_db else param(False)
    return dx, dres, dw, db


_FACTS = {"_flat_kernel": _flat_facts, "_rows_kernel": _rows_facts, "_sum_rows_kernel": _sum_rows_facts,
          "_mask_kernel": _mask_facts, "_norm_kernel": _norm_facts, "_norm_backward_kernel": _norm_backward_facts}

KERNELS = {"fused_dropout": fused_dropout, "fused_dropout_backward": fused_dropout_backward,
           "dropout_mask": dropout_mask, "dropout_add_norm": dropout_add_norm,
           "dropout_add_norm_backward": dropout_add_norm_backward}
