"""Triton kernels for y = residual + dropout(act(x + bias)), its backward and
the keep mask, under the contract of docs/RNG.md.

The launchers here are plain functions of tensors; ``_triton_ops`` registers
them as ``torch.library.triton_op``s with autograd. They take a ``wrap``
argument (``torch.library.wrap_triton`` inside the registered ops, the
identity otherwise) so the same code also runs under the Triton interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, which is how CI checks it.

Contract rules that shape the code:
- the random words come from ``tl.philox`` with the contract's counter words
  (group i >> 2 split into two words, the offset split into two), never from
  ``tl.rand``/``tl.randint4x``, whose counter mapping changed between Triton
  releases; one Philox call serves the four elements of a group;
- keep iff word >= t, an unsigned integer compare; t and the scale are
  runtime arguments that are not specialised, so a new p reuses the binary;
- float32 math with IEEE division (``div_rn``) and no FMA contraction
  (``enable_fp_fusion=False``): the activations are the exact operation
  sequences of csrc/activations.h, so every backend rounds alike;
- a dropped element is a zero with the sign bit of the value it replaces;
- 64-bit element indices throughout.
"""

import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

AVAILABLE = True

ACTS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
# float64 is routed to another backend (see _backend.run).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _direct(kernel):
    return kernel


_c = lambda h: tl.constexpr(float.fromhex(h))  # noqa: E731  (exact in float32)
LOG2E = _c("0x1.715476p+0")
ROUND_MAGIC = _c("0x1.8p+23")
LN2_HI = _c("0x1.62e4p-1")
LN2_LO = _c("0x1.7f7d1cp-20")
E7 = _c("0x1.a01a02p-13")
E6 = _c("0x1.6c16c2p-10")
E5 = _c("0x1.111112p-7")
E4 = _c("0x1.555556p-5")
E3 = _c("0x1.555556p-3")
SQRT1_2 = _c("0x1.6a09e6p-1")
AS_P = _c("0x1.4f740ap-2")
AS_A1 = _c("0x1.0fb844p+0")
AS_A2 = _c("-0x1.7401c6p+0")
AS_A3 = _c("0x1.6be1c6p+0")
AS_A4 = _c("-0x1.23531cp-2")
AS_A5 = _c("0x1.04f20cp-2")
INV_SQRT_2PI = _c("0x1.988454p-2")
SQRT_2_OVER_PI = _c("0x1.988454p-1")
GELU_TANH_C = _c("0x1.6e4e26p-5")
GELU_TANH_3C = _c("0x1.12ba9ep-3")


# --- device functions (csrc/activations.h, line for line) ----------------------

@triton.jit
def _exp_nonpos(x):
    in_range = x >= -87.0
    xc = tl.where(in_range, x, 0.0)
    t = xc * LOG2E
    k = (t + ROUND_MAGIC) - ROUND_MAGIC
    r = (xc - k * LN2_HI) - k * LN2_LO
    poly = E6 + r * E7
    poly = E5 + r * poly
    poly = E4 + r * poly
    poly = E3 + r * poly
    poly = 0.5 + r * poly
    poly = 1.0 + r * poly
    poly = 1.0 + r * poly
    ki = k.to(tl.int32)
    scale = ((ki + 127) << 23).to(tl.float32, bitcast=True)
    e = poly * scale
    return tl.where(in_range, e, tl.where(x != x, x, 0.0))


@triton.jit
def _gelu_parts(v):
    z = tl.where(v < 0.0, -v, v) * SQRT1_2
    t = tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), 1.0 + AS_P * z)
    poly = AS_A2 + t * AS_A1
    poly = AS_A3 + t * poly
    poly = AS_A4 + t * poly
    poly = AS_A5 + t * poly
    poly = t * poly
    e = _exp_nonpos(-(z * z))
    q = poly * e
    return tl.where(v >= 0.0, 2.0 - q, q), e


@triton.jit
def _gelu_tanh_parts(v):
    u = SQRT_2_OVER_PI * (v + GELU_TANH_C * ((v * v) * v))
    e = _exp_nonpos(-(2.0 * tl.where(u < 0.0, -u, u)))
    d = 1.0 + e
    big = tl.math.div_rn(tl.full(v.shape, 2.0, tl.float32), d)
    small = tl.math.div_rn(2.0 * e, d)
    pos = u >= 0.0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _sigmoid(v):
    e = _exp_nonpos(tl.where(v < 0.0, v, -v))
    d = 1.0 + e
    return tl.where(v >= 0.0, tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), d), tl.math.div_rn(e, d))


@triton.jit
def _act_fwd(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACT == 2:
        cdf2, _e = _gelu_parts(v)
        v = (0.5 * v) * cdf2
    elif ACT == 3:
        opt, _omt = _gelu_tanh_parts(v)
        v = (0.5 * v) * opt
    elif ACT == 4:
        v = v * _sigmoid(v)
    return v


@triton.jit
def _act_bwd(gs, v, ACT: tl.constexpr):
    """The gradient through the activation of one kept element, given the
    scaled incoming gradient gs (relu selects, so 0 * Inf stays 0)."""
    if ACT == 1:
        d = tl.where(v > 0.0, gs, 0.0)
    elif ACT == 2:
        cdf2, e = _gelu_parts(v)
        d = gs * (0.5 * cdf2 + v * (e * INV_SQRT_2PI))
    elif ACT == 3:
        opt, omt = _gelu_tanh_parts(v)
        du = SQRT_2_OVER_PI * (1.0 + GELU_TANH_3C * (v * v))
        d = gs * (0.5 * opt + ((0.5 * v) * (opt * omt)) * du)
    elif ACT == 4:
        s = _sigmoid(v)
        d = gs * (s * (1.0 + v * (1.0 - s)))
    else:
        d = gs
    return d


@triton.jit
def _params(rng_ptr, thr, drop_all, scale, P_FROM_RNG: tl.constexpr):
    """(t, drop_all, scale) of the contract: the host's, or, when the rng
    tensor carries p (its binary64 bits in word 2), derived here with the
    host's double arithmetic: t = floor(p * 2**32), scale = 1 / (1 - p)
    rounded once to float32. NaN and negatives mean 0, 1 and above drop all."""
    if P_FROM_RNG:
        p = tl.load(rng_ptr + 2).to(tl.float64, bitcast=True)
        p = tl.where(p >= 0.0, tl.minimum(p, 1.0), 0.0)
        drop = p >= 1.0
        t = tl.where(drop, 0.0, p * 4294967296.0).to(tl.uint32)
        one = tl.full([], 1.0, tl.float64)
        # float64 division is IEEE round-to-nearest in PTX (div.rn.f64);
        # div_rn is needed only for float32, whose "/" is approximate.
        s = tl.where(drop, 0.0, one / (one - p)).to(tl.float32)
        return t, drop.to(tl.int32), s
    else:
        return thr.to(tl.uint32), drop_all, scale


@triton.jit
def _keep_tile(rng_ptr, group0, thr, drop_all, ROWS: tl.constexpr, R: tl.constexpr):
    """Keep bits of the [ROWS, R] tile of consecutive elements 4 * group0 + j.

    One Philox call per group of four: key = the 64-bit seed, counter =
    (group low, group high, offset low, offset high); element k of a group
    takes word k. The four words are interleaved by joins, so a row of R
    elements (16 bytes of the tensor per thread) needs no select chain.
    """
    NG: tl.constexpr = ROWS * R // 4
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    group = group0 + tl.arange(0, NG).to(tl.int64)
    c0 = group.to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = (group >> 32).to(tl.uint32)
    c2 = offset.to(tl.uint32) + zero
    c3 = (offset >> 32).to(tl.uint32) + zero
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=10)
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, R])
    return (w >= thr) & (drop_all == 0)


@triton.jit
def _drop(value, keep):
    """Kept values pass; a dropped one keeps only its sign bit (x * 0 in
    nn.Dropout for finite x; NaN and Inf become a zero too)."""
    bits = value.to(tl.uint32, bitcast=True)
    and_mask = tl.where(keep, tl.full(value.shape, 0xFFFFFFFF, tl.uint32), tl.full(value.shape, 0x80000000, tl.uint32))
    return (bits & and_mask).to(tl.float32, bitcast=True)


@triton.jit
def _bias_col(start, local, H, BLOCK: tl.constexpr):
    """Column (position in the last dimension) of elements start + local."""
    row0 = start // H
    col = (start - row0 * H) + local
    if H >= BLOCK:
        col = tl.where(col >= H, col - H, col)
    else:
        col = col % H
    return col


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
def _flat_tile(BLOCK: tl.constexpr, R: tl.constexpr):
    """This program's tile of the flat tensor: its first element (64-bit) and
    the [BLOCK // R, R] element offsets within it, R contiguous per row."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK // R)[:, None] * R + tl.arange(0, R)[None, :]
    return start, local


# --- kernels ------------------------------------------------------------------

@triton.jit(do_not_specialize=["thr", "drop_all", "scale"])
def _fwd_kernel(x_ptr, bias_ptr, res_ptr, keep_ptr, out_ptr, rng_ptr, n, H, thr: tl.uint32, drop_all: tl.int32,
                scale: tl.float32, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                MASK_FROM_PTR: tl.constexpr, SIZE_CLASS: tl.constexpr, P_FROM_RNG: tl.constexpr,
                R: tl.constexpr, BLOCK: tl.constexpr):
    thr, drop_all, scale = _params(rng_ptr, thr, drop_all, scale, P_FROM_RNG)
    ROWS: tl.constexpr = BLOCK // R
    start, local = _flat_tile(BLOCK, R)
    offs = start + local
    m = offs < n
    v = _f32(tl.load(x_ptr + offs, mask=m, other=0.0))
    if HAS_BIAS:
        col = _bias_col(start, local, H, BLOCK)
        v = v + _f32(tl.load(bias_ptr + col, mask=m, other=0.0))
    kept = _act_fwd(v, ACT) * scale
    if MASK_FROM_PTR:
        keep = tl.load(keep_ptr + offs, mask=m, other=0) != 0
    else:
        keep = _keep_tile(rng_ptr, start // 4, thr, drop_all, ROWS, R)
    y = _drop(kept, keep)
    if HAS_RES:
        y = _f32(tl.load(res_ptr + offs, mask=m, other=0.0)) + y
    tl.store(out_ptr + offs, _rounded(y, out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["thr", "drop_all", "scale"])
def _bwd_kernel(g_ptr, x_ptr, bias_ptr, keep_ptr, dx_ptr, d32_ptr, rng_ptr, n, H, thr: tl.uint32, drop_all: tl.int32,
                scale: tl.float32, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_FROM_PTR: tl.constexpr,
                STORE_F32: tl.constexpr, SIZE_CLASS: tl.constexpr, P_FROM_RNG: tl.constexpr,
                R: tl.constexpr, BLOCK: tl.constexpr):
    thr, drop_all, scale = _params(rng_ptr, thr, drop_all, scale, P_FROM_RNG)
    ROWS: tl.constexpr = BLOCK // R
    start, local = _flat_tile(BLOCK, R)
    offs = start + local
    m = offs < n
    gs = _f32(tl.load(g_ptr + offs, mask=m, other=0.0)) * scale
    if ACT != 0:
        v = _f32(tl.load(x_ptr + offs, mask=m, other=0.0))
        if HAS_BIAS:
            col = _bias_col(start, local, H, BLOCK)
            v = v + _f32(tl.load(bias_ptr + col, mask=m, other=0.0))
        d = _act_bwd(gs, v, ACT)
    else:
        d = gs
    if MASK_FROM_PTR:
        keep = tl.load(keep_ptr + offs, mask=m, other=0) != 0
    else:
        keep = _keep_tile(rng_ptr, start // 4, thr, drop_all, ROWS, R)
    d = _drop(d, keep)
    tl.store(dx_ptr + offs, _rounded(d, dx_ptr.dtype.element_ty), mask=m)
    if STORE_F32:
        tl.store(d32_ptr + offs, d, mask=m)


@triton.jit(do_not_specialize=["thr", "drop_all", "scale"])
def _bwd_rows_kernel(g_ptr, x_ptr, bias_ptr, keep_ptr, dx_ptr, part_ptr, rng_ptr, rows, H, thr: tl.uint32,
                     drop_all: tl.int32, scale: tl.float32, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     MASK_FROM_PTR: tl.constexpr, ROWS: tl.constexpr, P_FROM_RNG: tl.constexpr,
                     R: tl.constexpr, BLOCK: tl.constexpr):
    """Backward with the bias gradient, for a last dimension H divisible by 4.

    Program (r, c) walks ROWS rows over columns [c * BLOCK, (c + 1) * BLOCK)
    and writes the column sums of the unrounded dx to row r of a partial
    buffer; summing that buffer over its rows finishes the reduction in an
    order fixed by the shape, so the result does not vary run to run. H % 4
    == 0 keeps every row start on a Philox group boundary.
    """
    thr, drop_all, scale = _params(rng_ptr, thr, drop_all, scale, P_FROM_RNG)
    TR: tl.constexpr = BLOCK // R
    pid_r = tl.program_id(0).to(tl.int64)
    c_start = tl.program_id(1).to(tl.int64) * BLOCK
    cols = c_start + tl.arange(0, TR)[:, None] * R + tl.arange(0, R)[None, :]
    cm = cols < H
    if HAS_BIAS:
        b = _f32(tl.load(bias_ptr + cols, mask=cm, other=0.0))
    acc = tl.zeros([TR, R], dtype=tl.float32)
    for i in range(ROWS):
        row = pid_r * ROWS + i
        m = cm & (row < rows)
        offs = row * H + cols
        gs = _f32(tl.load(g_ptr + offs, mask=m, other=0.0)) * scale
        if ACT != 0:
            v = _f32(tl.load(x_ptr + offs, mask=m, other=0.0))
            if HAS_BIAS:
                v = v + b
            d = _act_bwd(gs, v, ACT)
        else:
            d = gs
        if MASK_FROM_PTR:
            keep = tl.load(keep_ptr + offs, mask=m, other=0) != 0
        else:
            keep = _keep_tile(rng_ptr, (row * H + c_start) // 4, thr, drop_all, TR, R)
        d = _drop(d, keep)
        tl.store(dx_ptr + offs, _rounded(d, dx_ptr.dtype.element_ty), mask=m)
        acc += tl.where(m, d, 0.0)
    tl.store(part_ptr + pid_r * H + cols, acc, mask=cm)


@triton.jit(do_not_specialize=["thr", "drop_all"])
def _mask_kernel(out_ptr, rng_ptr, n, thr: tl.uint32, drop_all: tl.int32, SIZE_CLASS: tl.constexpr,
                 P_FROM_RNG: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    thr, drop_all, _ = _params(rng_ptr, thr, drop_all, 1.0, P_FROM_RNG)
    ROWS: tl.constexpr = BLOCK // R
    start, local = _flat_tile(BLOCK, R)
    offs = start + local
    keep = _keep_tile(rng_ptr, start // 4, thr, drop_all, ROWS, R)
    tl.store(out_ptr + offs, keep, mask=offs < n)


# Block sizes and warps are tuned once per (dtype, activation, bias, residual,
# size class) on the GPU the kernels first run on. Under the interpreter one
# small block is used (nothing to tune on the CPU).
_FLAT_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                 ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16))]
_ROW_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((256, 2), (512, 4), (1024, 4), (1024, 8))]
_INTERPRET_BLOCK = 64

if _INTERPRET:
    _fwd, _bwd, _bwd_rows, _mask = _fwd_kernel, _bwd_kernel, _bwd_rows_kernel, _mask_kernel
else:
    _fwd = triton.autotune(_FLAT_CONFIGS, key=["ACT", "HAS_BIAS", "HAS_RES", "MASK_FROM_PTR", "SIZE_CLASS",
                                                "P_FROM_RNG"])(_fwd_kernel)
    _bwd = triton.autotune(_FLAT_CONFIGS, key=["ACT", "HAS_BIAS", "MASK_FROM_PTR", "STORE_F32", "SIZE_CLASS",
                                                "P_FROM_RNG"])(_bwd_kernel)
    _bwd_rows = triton.autotune(_ROW_CONFIGS, key=["ACT", "HAS_BIAS", "MASK_FROM_PTR", "ROWS", "P_FROM_RNG"])(
        _bwd_rows_kernel)
    _mask = triton.autotune(_FLAT_CONFIGS, key=["SIZE_CLASS", "P_FROM_RNG"])(_mask_kernel)


def _size_class(n: int) -> int:
    return 0 if n < (1 << 20) else (1 if n < (1 << 26) else 2)


def _elems_per_row(t: torch.Tensor) -> int:
    """Elements per row of a tile: 16 bytes of the tensor, so each thread
    loads and stores 128 bits at a time."""
    return max(4, 16 // t.element_size())


def _launch_opts() -> dict:
    opts = {"enable_fp_fusion": False}
    if _INTERPRET:
        opts["BLOCK"] = _INTERPRET_BLOCK
    return opts


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


# --- host side ----------------------------------------------------------------

def _threshold(p: float, rng: torch.Tensor) -> Tuple[int, int, float]:
    """(t, drop_all, scale) of the contract, computed on the host in double;
    unused placeholders when the rng tensor carries p (the kernels derive
    them from it, see _params)."""
    if rng.numel() == 3:
        return 0, 0, 1.0
    if p >= 1.0:
        return 0, 1, 0.0
    return int(p * 4294967296.0), 0, 1.0 / (1.0 - p)


def _rng_on(rng: torch.Tensor, device: torch.device) -> torch.Tensor:
    return rng if rng.device == device else rng.to(device)


def _structured_keep(rng, shape, mask_shape, p, wrap) -> Optional[torch.Tensor]:
    """For a structured mask: its small keep mask broadcast to the full shape
    (a 1-byte temporary, never saved for backward)."""
    if not mask_shape or tuple(mask_shape) == tuple(shape):
        return None
    small = dropout_mask(rng, list(mask_shape), p, wrap)
    return small.expand(tuple(shape)).contiguous()


def _like_input(input: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The output in the input's memory format, as nn.Dropout gives it."""
    if input.is_contiguous():
        return result
    out = torch.empty_like(input)
    out.copy_(result)
    return out


def fused_dropout(input: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  rng: torch.Tensor, p: float, activation: str, mask_shape: Sequence[int],
                  wrap: Callable = _direct) -> torch.Tensor:
    x = input.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return _like_input(input, out)
    rng = _rng_on(rng, x.device)
    thr, drop_all, scale = _threshold(p, rng)
    keep = _structured_keep(rng, x.shape, mask_shape, p, wrap)
    b = bias.contiguous() if bias is not None else x
    r = residual.contiguous() if residual is not None else x
    H = x.shape[-1] if x.dim() >= 1 else 1
    wrap(_fwd)[_grid(n)](x, b, r, keep if keep is not None else x, out, rng, n, H, thr, drop_all, scale,
                         ACT=ACTS[activation], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                         MASK_FROM_PTR=keep is not None, SIZE_CLASS=_size_class(n), P_FROM_RNG=rng.numel() == 3,
                         R=_elems_per_row(x),
                         **_launch_opts())
    return _like_input(input, out)


def _row_block(rows: int, H: int, block_guess: int = 1024) -> int:
    """Rows per program of the bias-gradient kernel: enough programs to fill
    a large GPU, few enough that the partial buffer stays small."""
    col_blocks = max(1, triton.cdiv(H, block_guess))
    want_programs = 1024
    per = max(1, (rows * col_blocks) // want_programs)
    return min(256, 1 << (per.bit_length() - 1))


def fused_dropout_backward(grad: torch.Tensor, input: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           rng: torch.Tensor, p: float, activation: str, mask_shape: Sequence[int],
                           bias_grad: bool, wrap: Callable = _direct) -> Tuple[torch.Tensor, torch.Tensor]:
    g = grad.contiguous()
    dx = torch.empty_like(g, memory_format=torch.contiguous_format)
    H = g.shape[-1] if g.dim() >= 1 else 1
    n = g.numel()
    db = g.new_zeros((H,) if bias_grad else (0,))
    if n == 0:
        return _like_input(grad, dx), db
    rng = _rng_on(rng, g.device)
    thr, drop_all, scale = _threshold(p, rng)
    keep = _structured_keep(rng, g.shape, mask_shape, p, wrap)
    act = ACTS[activation]
    x = input.contiguous() if (input is not None and act != 0) else g
    b = bias.contiguous() if bias is not None else g
    has_bias = bias is not None and act != 0
    kp = keep if keep is not None else g
    if bias_grad and H % 4 == 0:
        rows = n // H
        per = _row_block(rows, H)
        part = torch.empty((triton.cdiv(rows, per), H), dtype=torch.float32, device=g.device)
        opts = _launch_opts()
        grid = lambda meta: (triton.cdiv(rows, per), triton.cdiv(H, meta["BLOCK"]))  # noqa: E731
        wrap(_bwd_rows)[grid](g, x, b, kp, dx, part, rng, rows, H, thr, drop_all, scale, ACT=act,
                              HAS_BIAS=has_bias, MASK_FROM_PTR=keep is not None, ROWS=per,
                              P_FROM_RNG=rng.numel() == 3, R=_elems_per_row(g),
                              **opts)
        db = part.sum(0).to(g.dtype)
    else:
        d32 = torch.empty(g.shape, dtype=torch.float32, device=g.device) if bias_grad else dx
        wrap(_bwd)[_grid(n)](g, x, b, kp, dx, d32, rng, n, H, thr, drop_all, scale, ACT=act,
                             HAS_BIAS=has_bias, MASK_FROM_PTR=keep is not None, STORE_F32=bias_grad,
                             SIZE_CLASS=_size_class(n), P_FROM_RNG=rng.numel() == 3, R=_elems_per_row(g),
                             **_launch_opts())
        if bias_grad:
            db = d32.reshape(-1, H).sum(0).to(g.dtype)
    return _like_input(grad, dx), db


def dropout_mask(rng: torch.Tensor, shape: List[int], p: float, wrap: Callable = _direct) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=torch.bool, device=rng.device)
    n = out.numel()
    if n == 0:
        return out
    thr, drop_all, _ = _threshold(p, rng)
    wrap(_mask)[_grid(n)](out, rng, n, thr, drop_all, SIZE_CLASS=_size_class(n), P_FROM_RNG=rng.numel() == 3,
                          R=_elems_per_row(out),
                          **_launch_opts())
    return out
