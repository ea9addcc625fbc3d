"""The CUDA kernels, executed on the host, equal the reference bit for bit.

The cuda_host_ ops (csrc/cuda_host/driver.cpp) run the op bodies and the
per-thread kernel code that nvcc compiles for the GPU (csrc/cuda/ops_impl.h,
csrc/cuda/kernel_body.h) on CPU tensors: every block and thread of each
launch, on the grid an H100 gets. So this file checks the CUDA backend's
arithmetic, masks, index math, vector/scalar paths and launch layout on any
machine, GPU or not, and never skips.

The test-only ops of the dropout_ext_testing namespace take the launch's SM
count (small grids: several units per thread) and a shift of every
element's global index (index arithmetic past 2**31 and 2**32 without
allocating), besides the ops' own place.
"""

import itertools
import math
import struct

import pytest
import torch

from dropout_ext import _ops
from dropout_ext import reference as ref
from conftest import assert_bitwise_equal, bits, check_contract, make_inputs
from error_bounds import (bias_grad_terms, check_bias_grad, check_bounded, check_norm_param_grads, check_sum, math_dtype,
                          norm_bounds)
from test_cuda_compile import declared_blocks_per_sm

ops = torch.ops.dropout_ext
testing = torch.ops.dropout_ext_testing

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SEED, OFFSET = 2024, 11
H100_SMS = 132
# The bias reduction's slots: partial rows it sums apart, then adds in slot
# order (kReduceSlots, csrc/cuda/kernel_args.h).
REDUCE_SLOTS = 32
# The kernels' element types as nvcc names them.
KERNEL_DTYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def unit_elems(dtype):
    return 8 if dtype in (torch.float16, torch.bfloat16) else 4


def state(p, seed=SEED, offset=OFFSET):
    return torch.tensor([seed, offset, struct.unpack("<q", struct.pack("<d", p))[0]], dtype=torch.int64)


def test_host_driver_is_built():
    assert _ops.HAS_CUDA_HOST_KERNELS, "dropout_ext._C lacks the cuda_host_ kernels (csrc/cuda_host)"


def _both(x, bias, res, grad, st, activation, mask_shape=(), bias_grad=False):
    """(forward, dx, dbias) of the host-run CUDA kernels and of the reference."""
    ms = list(mask_shape)
    got = (ops.cuda_host_fused_dropout(x, bias, res, st, activation, ms)[0],
           *ops.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, ms, bias_grad))
    want = (ops.reference_fused_dropout(x, bias, res, st, activation, ms)[0],
            *ops.reference_fused_dropout_backward(grad, x, bias, st, activation, ms, bias_grad))
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_forward_backward_equal_reference(dtype, activation):
    for shape in [(1,), (7,), (3, 37), (2, 5, 64), (1027,)]:
        x, bias, res, grad = make_inputs(shape, dtype, seed=len(shape))
        for b, r in [(None, None), (bias, None), (None, res), (bias, res)]:
            got, want = _both(x, b, r, grad, state(0.3), activation, bias_grad=b is not None)
            check_contract(got[0], want[0], dtype, activation)
            check_contract(got[1], want[1], dtype, activation)
            if b is not None:
                check_bias_grad(got[2], grad, x, b, SEED, OFFSET, 0.3, activation)
            else:
                assert got[2].shape == (0,)


def _misaligned_inputs(dtype):
    """x, bias, residual and grad of shape (6, 45), the three big ones
    contiguous views one element into their storage (off 16 bytes)."""
    shape = (6, 45)
    g = torch.Generator().manual_seed(5)
    flat = [(torch.randn(math.prod(shape) + 1, generator=g) * 3).to(dtype) for _ in range(3)]
    x, res, grad = (t[1:].view(shape) for t in flat)
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    bias = torch.randn(shape[-1], generator=g).to(dtype)
    return x, bias, res, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu_tanh"])
def test_misaligned_views_take_the_scalar_path(dtype, activation):
    """A storage offset of one element leaves the pointers off 16 bytes: the
    kernels then load and store element by element (the CPU allocator's 64-byte
    alignment gives the 128-bit path everywhere else in this file)."""
    x, bias, res, grad = _misaligned_inputs(dtype)
    shape = x.shape
    got, want = _both(x, bias, res, grad, state(0.4), activation, bias_grad=True)
    check_contract(got[0], want[0], dtype, activation)
    check_contract(got[1], want[1], dtype, activation)
    check_bias_grad(got[2], grad, x, bias, SEED, OFFSET, 0.4, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_stride_loop(dtype):
    """One SM: 4 blocks of 256 threads, so each thread walks six or seven
    units."""
    n = 3 * 8 * 256 * unit_elems(dtype) + 5
    x, bias, res, grad = make_inputs((n // 5, 5), dtype, seed=9)
    st = state(0.25)
    y = testing.cuda_host_fused_dropout(x, bias, res, st, "silu", [], 0, 1)[0]
    assert_bitwise_equal(y, ops.reference_fused_dropout(x, bias, res, st, "silu", [])[0])
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, "silu", [], False, 0, 1)
    assert_bitwise_equal(dx, ops.reference_fused_dropout_backward(grad, x, bias, st, "silu", [], False)[0])


@pytest.mark.parametrize("p", [0.0, 1e-12, 0.3, 1.0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_p_carried_in_the_state(p, dtype):
    """p is data: 0 (and p < 2**-32, and no state) keeps everything without
    drawing, 1 drops everything; NaN and Inf inputs are dropped to zeros."""
    x, bias, res, grad = make_inputs((9, 33), dtype, seed=2)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    st = None if p is None else state(p)
    got, want = _both(x, bias, res, grad, st, "relu", bias_grad=True)
    assert_bitwise_equal(got[0], want[0])
    assert_bitwise_equal(got[1], want[1])
    check_bias_grad(got[2], grad, x, bias, SEED, OFFSET, 0.0 if p is None else p, "relu")
    m = ops.cuda_host_dropout_mask(state(0.0 if p is None else p), [5, 7])
    assert torch.equal(m, ops.reference_dropout_mask(state(0.0 if p is None else p), [5, 7]))


@pytest.mark.parametrize("p,read_as", [(float("nan"), 0.0), (-0.5, 0.0), (-float("inf"), 0.0), (1.5, 1.0),
                                       (float("inf"), 1.0)])
def test_p_outside_0_1(p, read_as):
    """The host can read the state, so the ops refuse such p as the CPU ops
    do; a GPU cannot without a sync, so its kernels read NaN and negatives as
    0 and anything from 1 up as 1: the test entry points (which leave p to
    the kernels) show that sanitising."""
    x, bias, res, grad = make_inputs((6, 20), torch.float32, seed=3)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        ops.cuda_host_fused_dropout(x, bias, res, state(p), "gelu", [])
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        ops.cuda_host_fused_dropout_backward(grad, x, bias, state(p), "gelu", [], True)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        ops.cuda_host_dropout_mask(state(p), [3])
    y = testing.cuda_host_fused_dropout(x, bias, res, state(p), "gelu", [], 0, 132)[0]
    assert_bitwise_equal(y, ref.fused_dropout(x, bias, res, SEED, OFFSET, read_as, "gelu"))
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, state(p), "gelu", [], True, 0, 132)
    assert_bitwise_equal(dx, ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, read_as, "gelu")[0])
    m = testing.cuda_host_dropout_mask(state(p), [5, 7], 0, 132)
    assert torch.equal(m, ref.dropout_mask((5, 7), read_as, SEED, OFFSET))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 1023, 4099])
def test_mask_equals_reference(n):
    for seed, offset in [(0, 0), (2**64 - 1, 2**63 + 7), (-1, 3)]:
        st = torch.tensor([seed - 2**64 if seed >= 2**63 else seed,
                           offset - 2**64 if offset >= 2**63 else offset,
                           struct.unpack("<q", struct.pack("<d", 0.5))[0]])
        assert torch.equal(ops.cuda_host_dropout_mask(st, [n]), ops.reference_dropout_mask(st, [n]))
    m = testing.cuda_host_dropout_mask(state(0.5), [n], 0, 1)  # one SM's grid
    assert torch.equal(m, ops.reference_dropout_mask(state(0.5), [n]))


STRUCTURED = [
    ((4, 6, 5, 7), (4, 6, 1, 1)),   # Dropout2d: runs of 35 (not a multiple of a unit)
    ((4, 6, 5, 7), (1, 6, 5, 1)),
    ((4, 6, 5, 7), (4, 1, 5, 7)),   # locked dropout: units cross the kept rows
    ((4, 6, 5, 7), (1, 1, 1, 7)),
    ((3, 17, 9), (3, 1, 9)),
    ((8, 3, 2, 2), (8, 1, 1, 1)),   # DropPath
    ((2, 3, 4, 5, 6, 7, 2, 3), (2, 1, 4, 1, 6, 1, 2, 1)),  # 8 alternating runs, the most there can be
    ((1, 1, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,mask_shape", STRUCTURED)
def test_structured_masks(dtype, shape, mask_shape):
    x, bias, res, grad = make_inputs(shape, dtype, seed=4)
    activation = "gelu" if dtype != torch.float64 else "relu"
    for p in (0.5, 0.0):
        got, want = _both(x, bias, res, grad, state(p), activation, mask_shape, bias_grad=True)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])
        check_bias_grad(got[2], grad, x, bias, SEED, OFFSET, p, activation, mask_shape)
    # no state: no mask is drawn, everything is kept
    got, want = _both(x, bias, res, grad, None, "identity", mask_shape)
    assert_bitwise_equal(got[0], want[0])
    assert_bitwise_equal(got[1], want[1])


def test_a_structured_mask_too_fragmented_is_refused_before_the_draw():
    """Nine alternating runs of broadcast and kept dimensions exceed the
    kernels' index map: the call is refused with nothing drawn, so the
    generator is where it was (and under capture no draw is recorded)."""
    x = torch.ones([2] * 9)
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    with pytest.raises(ValueError, match="alternating runs"):
        ops.cuda_host_fused_dropout(x, None, None, None, "identity", [2, 1, 2, 1, 2, 1, 2, 1, 2], None, False,
                                    0.5, gen)
    assert torch.equal(gen.get_state(), before)


def _kernel_order_dbias(d, plan, dtype):
    """The bias gradient in the kernels' summation order: per row block, each
    row lane sums its rows (r0 + lane, r0 + lane + row_lanes, ...), the lanes
    are added in lane order; then the reduction's slot s sums the row blocks
    b with b % 32 == s in block order, and the slots are added in slot order,
    all in the math type from the unrounded dx `d` [rows, H]."""
    _, row_lanes, rows_per_block, row_blocks, _, _ = plan
    rows, H = d.shape
    slots = [torch.zeros(H, dtype=d.dtype) for _ in range(REDUCE_SLOTS)]
    for b in range(row_blocks):
        r0, r1 = b * rows_per_block, min((b + 1) * rows_per_block, rows)
        block = torch.zeros(H, dtype=d.dtype)
        for lane in range(row_lanes):
            s = torch.zeros(H, dtype=d.dtype)
            for r in range(r0 + lane, r1, row_lanes):
                s = s + d[r]
            block = block + s
        slots[b % REDUCE_SLOTS] = slots[b % REDUCE_SLOTS] + block
    total = torch.zeros(H, dtype=d.dtype)
    for s in slots:
        total = total + s
    return total.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,H,sm_count", [
    (300, 768, 132),  # bf16: 96 units per row, 3 full tiles of 32; 8 row lanes
    (299, 13, 1),     # H % 4 != 0: rows start mid-group; rows not a multiple of the row block
    (1000, 1, 132),   # one column: 256 row lanes
    (37, 301, 2),     # 2+ tiles, a partial last unit, misfitting rows
    (5, 4, 132),
])
def test_bias_gradient_in_kernel_order(dtype, rows, H, sm_count):
    """The bias-gradient kernel (all 256 threads of a block busy, lanes
    reduced in shared memory in a fixed order) gives exactly the sum in its
    documented order, for any row count and width."""
    activation = "gelu_tanh" if dtype != torch.float64 else "relu"
    x, bias, _, grad = make_inputs((rows, H), dtype, seed=rows + H)
    st = state(0.35)
    plan = testing.cuda_bias_grad_plan(rows, H, dtype, activation, sm_count)
    col_units, row_lanes, rows_per_block, row_blocks, grid_x, grid_y = plan
    assert col_units * row_lanes == 256 and grid_y == row_blocks
    assert row_blocks == -(-rows // rows_per_block)
    dx, db = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, [], True, 0, sm_count)
    dx_ref, db_ref = ops.reference_fused_dropout_backward(grad, x, bias, st, activation, [], True)
    assert_bitwise_equal(dx, dx_ref)
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.35, activation)
    terms = bias_grad_terms(grad, x, bias, SEED, OFFSET, 0.35, activation)
    assert_bitwise_equal(db, _kernel_order_dbias(terms, plan, dtype))


def test_bias_gradient_keeps_every_thread_busy():
    """H = 768 in bfloat16 is 96 units of 8 columns: three tiles of 32 units,
    so every thread of every block has a column (the kernel before used 96 of
    its 256 threads for this shape, one column unit each)."""
    col_units, row_lanes, rows_per_block, row_blocks, grid_x, _ = testing.cuda_bias_grad_plan(
        4096, 768, torch.bfloat16, "gelu", 132)
    assert (col_units, row_lanes, grid_x) == (32, 8, 3)
    assert grid_x * col_units * 8 == 768 and rows_per_block >= row_lanes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "gelu"])
@pytest.mark.parametrize("shape,sm_count", [
    ((1024, 1024), H100_SMS),   # 2**20 elements: few rows per row block
    ((8192, 8192), H100_SMS),
    ((2**16, 768), H100_SMS),
    ((2**17, 256), 1024),       # more SMs than the reduction's chain allows row blocks for
])
def test_bias_gradient_launches_stream(dtype, activation, shape, sm_count):
    """The bias gradient's two launches as the static model reads them
    (LaunchFacts): the partial rows written and read back cost at most 5% of
    the op's least traffic, at least 90% of the lanes have a row, each
    streaming launch keeps 32 KiB in flight per SM (the reduction reads
    only the partial rows), and the reduction's serial chain of loads is at
    most 32 whatever the number of row blocks."""
    names, v = testing.cuda_launch_facts("backward", list(shape), dtype, activation, ["bias", "bias_grad"], sm_count)
    assert len(names) == 2 and "BiasGradKernel" in names[0] and "BiasReduceKernel" in names[1]
    launches = [v[i:i + 10] for i in range(0, len(v), 10)]
    rows, H = shape
    size = torch.empty((), dtype=dtype).element_size()
    streams = 1 if activation == "identity" else 2
    least = rows * H * size * (streams + 1) + H * size * (2 if activation != "identity" else 1)
    moved = sum(f[4] + f[5] for f in launches)
    assert moved <= 1.05 * least, (moved, least)
    for _, _, blocks_per_sm, _, _, _, inflight, lane_slots, busy_slots, chain in launches:
        assert busy_slots >= 0.9 * lane_slots
    blocks_per_sm, inflight = launches[0][2], launches[0][6]
    assert blocks_per_sm * 256 * inflight >= 32 * 1024
    assert launches[0][9] == 1 and launches[1][9] <= 32


def _launches(op, n, H, dtype, activation, bias_grad=False, sm_count=H100_SMS):
    """[(grid.x, grid.y, blocks per SM)] of each launch of op, planned and
    checked by the host driver with nothing allocated or run."""
    flat = testing.cuda_launch_plan(op, n, H, dtype, activation, bias_grad, sm_count)
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def _steps_per_thread(op, dtype, activation):
    """Steps (a unit, or in the pack mode a byte's 8 elements) an elementwise
    kernel's thread takes at once: its bytes in flight (LaunchFacts) over a
    step of each tensor it streams."""
    fields = testing.cuda_launch_facts(op, [2**20], dtype, activation, [], H100_SMS)[1]
    streams = 2 if op == "backward" and activation != "identity" else 1
    elems = 8 if op == "forward_packed" else unit_elems(dtype)
    step_bytes = elems * torch.empty((), dtype=dtype).element_size() * streams
    assert fields[6] % step_bytes == 0
    return fields[6] // step_bytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_grids_are_one_wave_of_each_kernels_residency(dtype, activation):
    """Each grid is planned with the blocks per SM its kernel declares, the
    number its __launch_bounds__ carry on the GPU and its registers allow
    (declared_blocks_per_sm, checked against ptxas in test_cuda_compile.py):
    a grid-stride launch is exactly one wave of resident blocks, and the
    bias gradient's row blocks fill one wave without a tail."""
    kd = KERNEL_DTYPE[dtype]
    n, H = 2**30, 1024
    for backward in (False, True):
        want = declared_blocks_per_sm("ElementwiseKernel", kd, activation, backward)
        got = _launches("backward" if backward else "forward", n, H, dtype, activation)
        assert got == [(H100_SMS * want, 1, want)]
        # fewer units than a wave's threads take: a block per 256 threads' k units
        op = "backward" if backward else "forward"
        units = 3 * 256 * _steps_per_thread(op, dtype, activation)
        assert _launches(op, (units + 1) * unit_elems(dtype), 1, dtype, activation) == [(4, 1, want)]
        assert _launches(op, units * unit_elems(dtype), 1, dtype, activation) == [(3, 1, want)]
    grad, reduce = _launches("backward", n, H, dtype, activation, bias_grad=True)
    want = declared_blocks_per_sm("BiasGradKernel", kd, activation, True)
    col_tiles = -(-H // (32 * unit_elems(dtype)))
    assert grad == (col_tiles, H100_SMS * want // col_tiles, want)
    assert reduce == (H // 32, 1, declared_blocks_per_sm("BiasReduceKernel", kd, None, False))
    big_h = 2**22
    assert _launches("backward", n, big_h, dtype, activation, True)[1] == (H100_SMS * 8, 1, 8)
    assert _launches("mask", n, 1, dtype, activation) == [(H100_SMS * 4, 1, declared_blocks_per_sm(
        "MaskKernel", None, None, False))]


def test_launches_a_gpu_would_refuse_are_refused():
    """The host driver checks every launch against the GPU's limits (grid.x
    up to 2**31 - 1, grid.y up to 65535, no empty grid, 48 KiB of static
    shared memory), so a plan the GPU would refuse fails here too. A probe
    kernel launched without running shows the limits are exact."""
    dry = lambda gx, gy, words=256: testing.cuda_host_shared_probe(gx, gy, words, False)  # noqa: E731
    dry(2**31 - 1, 65535)
    dry(1, 1, 12288)  # 48 KiB
    for gx, gy, words, why in [(2**31, 1, 256, "gridDim.x"), (0, 1, 256, "gridDim.x"), (1, 65536, 256, "gridDim.y"),
                               (1, 0, 256, "gridDim.y"), (1, 1, 12289, "shared memory")]:
        with pytest.raises(RuntimeError, match=f"a GPU would refuse this launch: .*{why}"):
            dry(gx, gy, words)
    # A bias gradient whose last dimension has 2**33 column tiles: the plan
    # keeps the 64-bit grid (it used to wrap to a 0-block grid that ran
    # nothing) and the launch is refused.
    H = 2**40
    assert testing.cuda_bias_grad_plan(1, H, torch.float32, "identity", H100_SMS)[4] == 2**33
    with pytest.raises(RuntimeError, match=r"gridDim.x must be in \[1, 2\*\*31 - 1\]; got grid \(8589934592, 1\)"):
        _launches("backward", H, H, torch.float32, "identity", bias_grad=True)
    want = declared_blocks_per_sm("ElementwiseKernel", "float", "identity", False)
    assert _launches("forward", H, H, torch.float32, "identity") == [(H100_SMS * want, 1, want)]


def test_shared_memory_is_poisoned_for_every_block():
    """A GPU block's shared memory starts with whatever was there, so the
    host driver fills it with all-one bytes (NaN as float or double) before
    every block: a read before the block's own write turns up in the
    results instead of finding zeros (a value-initialised buffer) or the
    previous block's values (one buffer reused). The probe's threads report
    the AND of the words they own as they found them, then overwrite them."""
    for gx, gy, words in [(3, 2, 256), (2, 1, 12288)]:
        seen = testing.cuda_host_shared_probe(gx, gy, words, True)
        assert seen.shape == (gx * gy, 256)
        assert bool((seen == 0xFFFFFFFF).all()), seen.unique().tolist()


def test_launch_layout_changes_no_bit_of_the_outputs():
    x, bias, res, grad = make_inputs((123, 40), torch.float32, seed=8)
    st = state(0.2)
    outs = [testing.cuda_host_fused_dropout(x, bias, res, st, "gelu", [], 0, sms)[0] for sms in (1, 3, 132)]
    dxs = [testing.cuda_host_fused_dropout_backward(grad, x, bias, st, "gelu", [], True, 0, sms) for sms in (1, 132)]
    for y in outs[1:]:
        assert_bitwise_equal(y, outs[0])
    assert_bitwise_equal(dxs[1][0], dxs[0][0])


def _expected_at(x, bias, res, grad, p, activation, base, keep=None):
    """(forward, dx, keep, dx before its rounding) of the elements
    base .. base + n - 1 of a huge tensor: keep bits (unless given) from the
    logical index (reference.keep_for_indices), bias columns x's own (a
    shard's bias is its slice), math as the reference's."""
    acc = math_dtype(x.dtype)
    idx = base + torch.arange(x.numel(), dtype=torch.int64)
    if keep is None:
        keep = ref.keep_for_indices(idx, p, SEED, OFFSET).reshape(x.shape)
    v = x.to(acc) + bias.to(acc)
    scale = 1.0 / (1.0 - p)
    kept = ref.activation_forward(v, activation) * scale
    y = res.to(acc) + torch.where(keep, kept, torch.copysign(torch.zeros_like(kept), kept))
    gs = grad.to(acc) * scale
    if activation == "identity":
        d = gs
    elif activation == "relu":
        d = torch.where(v > 0, gs, torch.zeros_like(gs))
    else:
        d = gs * ref.activation_grad(v, activation)
    dx = torch.where(keep, d, torch.copysign(torch.zeros_like(d), d))
    return y.to(x.dtype), dx.to(x.dtype), keep, dx


def _base_before(boundary, H=48):
    """A multiple of H (and so of 16) some rows before `boundary`."""
    return (boundary // H) * H - 8 * H


@pytest.mark.parametrize("boundary", [2**31, 2**32, 2**34, 2**62 - 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_arithmetic_past_2_31_and_2_32(boundary, dtype):
    """Elements whose logical index crosses 2**31, 2**32 and 2**34 (where the
    Philox counter's second word becomes nonzero): keep bits and the bias
    gradient's rows, against keep_for_indices."""
    shape = (40, 48)
    base = _base_before(boundary)
    assert base < boundary < base + math.prod(shape)
    x, bias, res, grad = make_inputs(shape, dtype, seed=6)
    p = 0.3
    y_want, dx_want, keep, terms = _expected_at(x, bias, res, grad, p, "silu", base)
    y = testing.cuda_host_fused_dropout(x, bias, res, state(p), "silu", [], base, 1)[0]
    assert_bitwise_equal(y, y_want)
    dx, db = testing.cuda_host_fused_dropout_backward(grad, x, bias, state(p), "silu", [], True, base, 1)
    assert_bitwise_equal(dx, dx_want)
    check_sum(db, terms, "bias gradient")
    m = testing.cuda_host_dropout_mask(state(p), list(shape), base, 132)
    assert torch.equal(m, keep)
    # the same span without a base is a different set of draws
    assert not torch.equal(m, ops.cuda_host_dropout_mask(state(p), list(shape)))


def test_index_past_2_32_with_unaligned_rows():
    """H % 4 != 0 puts row starts mid-group; the bias-gradient kernel then
    draws each group its unit touches, here with indices above 2**32."""
    shape, base = (33, 7), (2**32 // 112) * 112  # a multiple of 16 and of 7
    assert base < 2**32 < base + 33 * 7
    x, bias, _, grad = make_inputs(shape, torch.float32, seed=7)
    _, dx_want, _, _ = _expected_at(x, bias, torch.zeros_like(x), grad, 0.5, "relu", base)
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, state(0.5), "relu", [], True, base, 1)
    assert_bitwise_equal(dx, dx_want)


# --- the packed mask mode ----------------------------------------------------------
# pack_mask: the forward kernels also store the keep bits they draw, 8 per
# byte, a byte per thread step (two units of float or double); mask_bits:
# every kernel that draws keep bits reads them instead (docs/RNG.md).

def _random_bits(shape, seed):
    """(keep, packed): a keep mask that is no state's, and its bits."""
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    return keep, ref.pack_bits(keep)


@pytest.mark.parametrize("boundary", [2**31, 2**32, 2**34, 2**62 - 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_mode_past_2_31_and_2_32(boundary, dtype):
    """Packing at logical indices across 2**31, 2**32 and 2**34: the bits are
    those of the logical indices, stored from byte 0; reading: the given bits
    of element 0 on, the bias gradient's rows kernel included."""
    shape = (40, 48)
    base = _base_before(boundary)
    x, bias, res, grad = make_inputs(shape, dtype, seed=6)
    p = 0.3
    y_want, _, keep, _ = _expected_at(x, bias, res, grad, p, "relu", base)
    y, packed = testing.cuda_host_fused_dropout(x, bias, res, state(p), "relu", [], base, 1, None, True)
    assert_bitwise_equal(y, y_want)
    assert torch.equal(packed, ref.pack_bits(keep))
    other, bits = _random_bits(shape, boundary % 1000)
    y_want, dx_want, _, terms = _expected_at(x, bias, res, grad, p, "relu", base, other)
    y, none = testing.cuda_host_fused_dropout(x, bias, res, state(p), "relu", [], base, 1, bits)
    assert_bitwise_equal(y, y_want)
    assert none.shape == (0,)
    dx, db = testing.cuda_host_fused_dropout_backward(grad, x, bias, state(p), "relu", [], True, base, 1, bits)
    assert_bitwise_equal(dx, dx_want)
    check_sum(db, terms, "bias gradient")
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, state(p), "relu", [], False, base, 132, bits)
    assert_bitwise_equal(dx, dx_want)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 17, 1001, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_packed_last_byte_past_2_32(n, dtype):
    """Any n: the last byte's bits past n are zero, also at p == 0, where
    everything is kept and nothing drawn."""
    base = 2**32 - 64
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    idx = base + torch.arange(n, dtype=torch.int64)
    for p in (0.0, 0.5, 1.0):
        keep = ref.keep_for_indices(idx, p, SEED, OFFSET)
        y, packed = testing.cuda_host_fused_dropout(x, None, None, state(p), "identity", [], base, 1, None, True)
        assert torch.equal(packed, ref.pack_bits(keep))
        assert_bitwise_equal(y, ref.fused_dropout(x, None, None, SEED, OFFSET, p, keep=keep))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu_tanh"])
def test_packed_mode_on_misaligned_views(dtype, activation):
    """Pointers off 16 bytes take the scalar loads and stores; the bits are
    packed and read all the same, and a mask_bits view at an odd byte
    offset is read where it is."""
    x, bias, res, grad = _misaligned_inputs(dtype)
    shape = x.shape
    st = state(0.4)
    y, packed, _ = ops.cuda_host_fused_dropout(x, bias, res, st, activation, [], None, True)
    y_ref, packed_ref, _ = ops.reference_fused_dropout(x, bias, res, st, activation, [], None, True)
    check_contract(y, y_ref, dtype, activation)
    assert torch.equal(packed, packed_ref)
    _, bits = _random_bits(shape, 7)
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8), bits])[1:]
    assert odd.data_ptr() % 2 == 1
    for given in (bits, odd):
        y = ops.cuda_host_fused_dropout(x, bias, res, st, activation, [], given)[0]
        check_contract(y, ops.reference_fused_dropout(x, bias, res, st, activation, [], bits)[0], dtype, activation)
        dx, db = ops.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, [], True, given)
        dx_ref, db_ref = ops.reference_fused_dropout_backward(grad, x, bias, st, activation, [], True, bits)
        check_contract(dx, dx_ref, dtype, activation)
        check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.4, activation, keep=ref.unpack_bits(bits, shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_packed_mode_grid_stride_loop(dtype):
    """One SM: each thread packs several bytes in turn, a pack step of 8
    elements (two units of float or double) apart from its neighbours'."""
    n = 3 * 4 * 256 * 8 + 13
    x, bias, res, grad = make_inputs((n // 13, 13), dtype, seed=9)
    st = state(0.25)
    y, packed = testing.cuda_host_fused_dropout(x, bias, res, st, "silu", [], 0, 1, None, True)
    y_ref, packed_ref, _ = ops.reference_fused_dropout(x, bias, res, st, "silu", [], None, True)
    check_contract(y, y_ref, dtype, "silu")
    assert torch.equal(packed, packed_ref)
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, "silu", [], False, 0, 1, packed)
    check_contract(dx, ops.reference_fused_dropout_backward(grad, x, bias, st, "silu", [], False)[0], dtype, "silu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,H,sm_count", [
    (300, 768, 132),
    (299, 13, 1),     # rows start at every bit of a byte; units straddle two bytes
    (1000, 1, 132),
    (37, 301, 2),
    (5, 4, 132),
])
def test_bias_gradient_reads_the_bits_in_kernel_order(dtype, rows, H, sm_count):
    """The bias-gradient kernel reading the bits: dx of the given bits, and
    the bias gradient summed in the kernel's order from it; given the
    bits a forward packed, the very bits of drawing the mask again."""
    activation = "gelu_tanh" if dtype != torch.float64 else "relu"
    x, bias, _, grad = make_inputs((rows, H), dtype, seed=rows + H)
    st = state(0.35)
    plan = testing.cuda_bias_grad_plan(rows, H, dtype, activation, sm_count)
    _, bits = _random_bits((rows, H), rows)
    dx, db = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, [], True, 0, sm_count, bits)
    dx_ref, db_ref = ops.reference_fused_dropout_backward(grad, x, bias, st, activation, [], True, bits)
    assert_bitwise_equal(dx, dx_ref)
    keep = ref.unpack_bits(bits, (rows, H))
    check_bias_grad(db, grad, x, bias, SEED, OFFSET, 0.35, activation, keep=keep)
    terms = bias_grad_terms(grad, x, bias, SEED, OFFSET, 0.35, activation, keep=keep)
    assert_bitwise_equal(db, _kernel_order_dbias(terms, plan, dtype))
    packed = ops.cuda_host_fused_dropout(x, bias, None, st, activation, [], None, True)[1]
    drawn = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, [], True, 0, sm_count)
    read = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, [], True, 0, sm_count, packed)
    assert_bitwise_equal(read[0], drawn[0])
    assert_bitwise_equal(read[1], drawn[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_mode_launch_plans(dtype):
    """A pack launch walks steps of 8 elements (a byte of bits) on the same
    one wave; reading keeps the plain launches' grids."""
    n, H = 2**30, 1024
    kd = KERNEL_DTYPE[dtype]
    want = declared_blocks_per_sm("ElementwiseKernel", kd, "gelu", False, "pack")
    assert _launches("forward_packed", n, H, dtype, "gelu") == [(H100_SMS * want, 1, want)]
    steps = 3 * 256 * _steps_per_thread("forward_packed", dtype, "gelu")
    assert _launches("forward_packed", steps * 8, 1, dtype, "gelu") == [(3, 1, want)]
    assert _launches("forward_packed", (steps + 1) * 8, 1, dtype, "gelu") == [(4, 1, want)]
    assert _launches("forward_packed", steps * 8 + 1, 1, dtype, "gelu") == [(4, 1, want)]
    for bias_grad in (False, True):
        assert [g[:2] for g in _launches("backward_read", n, H, dtype, "gelu", bias_grad)] == \
            [g[:2] for g in _launches("backward", n, H, dtype, "gelu", bias_grad)]


def test_fast_division_is_exact():
    """The kernels' 64-bit division by a launch constant (multiply-high and
    shift, no division routine) over the whole int64 range."""
    g = torch.Generator().manual_seed(0)
    n = torch.cat([torch.randint(0, 2**63 - 1, (20000,), generator=g, dtype=torch.int64),
                   torch.randint(0, 2**33, (5000,), generator=g, dtype=torch.int64),
                   torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1])])
    divisors = [1, 2, 3, 5, 7, 48, 768, 1000003, 2**31 - 1, 2**31, 2**32 + 1, 2**40 + 7, 2**62 + 3, 2**63 - 1]
    divisors += torch.randint(1, 2**63 - 1, (8,), generator=g).tolist()
    for d in divisors:
        q, r = testing.cuda_fast_divmod(n, d)
        assert torch.equal(q, torch.div(n, d, rounding_mode="floor")), d
        assert torch.equal(r, torch.remainder(n, d)), d
        edge = torch.tensor([d - 1, d, min(d + 1, 2**63 - 1), 2**63 - 1 - (2**63 - 1) % d])
        q, r = testing.cuda_fast_divmod(edge, d)
        assert torch.equal(q, torch.div(edge, d, rounding_mode="floor")), d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_conversions_on_the_host(dtype):
    """The host twins of the device conversions round to nearest even
    exactly as PyTorch does: every 16-bit value round-trips, and random
    float32 bit patterns, ties, subnormals and overflow round as .to() does."""
    as_float = lambda b: b.to(torch.int16).view(dtype).float()  # noqa: E731
    every = as_float(torch.arange(-(2**15), 2**15, dtype=torch.int32))
    g = torch.Generator().manual_seed(1)
    rand = torch.randint(-(2**31), 2**31 - 1, (200000,), generator=g, dtype=torch.int64).to(torch.int32)
    finite = torch.arange(0, 0x7BFF if dtype == torch.float16 else 0x7F7F, dtype=torch.int32)
    ties = (as_float(finite) + as_float(finite + 1)) / 2  # exact in float32: halfway between neighbours
    ties = torch.cat([ties, -ties])
    special = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2**-24, 2**-25, 1.5 * 2**-25, 2**-14,
                            2**-14 - 2**-25, 3.0e38, float("inf"), float("nan")])
    for values in (every, rand.view(torch.float32), ties, special, -special):
        rounded, back = testing.cuda_round(values, dtype)
        want = values.to(dtype)
        assert torch.equal(bits(rounded.to(dtype)), bits(want))
        assert torch.equal(bits(back), bits(want.float()))


def test_zero_dim_empty_and_strided_inputs():
    st = state(0.5)
    for x in (torch.tensor(1.5), torch.empty(0, 3), torch.randn(6, 5).t()):
        y = ops.cuda_host_fused_dropout(x, None, None, st, "relu", [])[0]
        assert_bitwise_equal(y, ops.reference_fused_dropout(x, None, None, st, "relu", [])[0])
        assert y.stride() == x.stride() or x.numel() == 0
    grad = torch.empty(0, 3)
    dx, db = ops.cuda_host_fused_dropout_backward(grad, None, None, st, "identity", [], True)
    assert dx.shape == (0, 3) and torch.equal(db, torch.zeros(3))


def test_bad_state_is_refused():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="state must be an int64 tensor"):
        ops.cuda_host_fused_dropout(x, None, None, torch.tensor([1, 2]), "identity", [])
    with pytest.raises(ValueError, match="state must be an int64 tensor"):
        ops.cuda_host_dropout_mask(torch.tensor([1.0, 2.0, 3.0]), [3])


# --- dropout_add_norm -----------------------------------------------------------------
# A row over the fewest warps that hold it, several rows per block for short
# rows (plan_norm), the row's runs in registers while they fit and read again
# from memory when not: the sizes below take both paths in both directions
# (65536 and 8193 the second), and the backward's short-row and long-row
# kernels (4097 float32 the long one). h is compared bit for bit;
# y, the statistics and the gradients with the float64 values within their
# error bounds (error_bounds.norm_bounds, check_sum: the row sums add in the
# kernels' order, not torch's).

NORM_H = [1, 7, 77, 1000, 4097, 65536]
LOW = (torch.float16, torch.bfloat16)


def _norm_inputs(shape, dtype, residual_in_fp32, param_dtype, seed):
    """(x, residual, weight, bias, grad, grad_h) with the residual stream in
    h's dtype and the parameters in param_dtype."""
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    h_dtype = torch.float32 if residual_in_fp32 and dtype in LOW else dtype
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    res = (torch.randn(shape, generator=g) + 0.5).to(h_dtype)
    w = (1 + 0.5 * torch.randn(H, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(H, generator=g)).to(param_dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    grad_h = torch.randn(shape, generator=g).to(h_dtype)
    return x, res, w, b, grad, grad_h


def _check_norm_forward(got, want, w, b, norm, eps):
    """h bit for bit the reference's; y, mean and rstd the float64 values
    of h as stored within their error bounds (error_bounds.norm_bounds)."""
    y, h, mean, rstd = got
    assert_bitwise_equal(h, want[1])
    assert mean.shape == want[2].shape and rstd.shape == want[3].shape
    stat = rstd.dtype
    bounds = norm_bounds(h, w, b, torch.zeros_like(h), None, norm, eps, stat)
    for name, value in (("y", y), ("mean", mean), ("rstd", rstd)):
        check_bounded(value, *bounds[name], stat, name)


def _check_norm_backward(got, grad, grad_h, h, w, mean, rstd, norm, eps, keep, p, output_mask):
    """grad_input and grad_residual the float64 values within their error
    bounds (from the statistics the backward was given, within theirs);
    the weight and bias gradients the sums of their terms (check_sum)."""
    bounds = norm_bounds(h, w, None, grad, grad_h, norm, eps, rstd.dtype, keep, p)
    for i, g in enumerate(got):
        if not output_mask[i]:
            assert g.shape == (0,), i
    for i, name in ((0, "dx"), (1, "dh")):
        if output_mask[i]:
            check_bounded(got[i], *bounds[name], rstd.dtype, name)
    assert all(g.dtype == rstd.dtype for g, need in zip(got[2:], output_mask[2:]) if need)
    check_norm_param_grads(got[2] if output_mask[2] else None, got[3] if output_mask[3] else None, grad, h, mean,
                           rstd, norm)


def _norm_case(x, res, w, b, grad, grad_h, st, norm, fp32, output_mask=(True,) * 4, sm_count=None, eps=1e-5):
    """The host-run CUDA kernels against the reference's h and the float64
    values, both directions, the backward from the reference's saved
    tensors."""
    if sm_count is None:
        got = ops.cuda_host_dropout_add_norm(x, res, w, b, st, norm, eps, fp32)[:4]
    else:
        got = testing.cuda_host_dropout_add_norm(x, res, w, b, st, norm, eps, fp32, 0, sm_count)
    want = ops.reference_dropout_add_norm(x, res, w, b, st, norm, eps, fp32)[:4]
    _check_norm_forward(got, want, w, b, norm, eps)
    _, h, mean, rstd = want
    mask = list(output_mask)
    if sm_count is None:
        grads = ops.cuda_host_dropout_add_norm_backward(grad, grad_h, h, w, mean, rstd, st, norm, mask)
    else:
        grads = testing.cuda_host_dropout_add_norm_backward(grad, grad_h, h, w, mean, rstd, st, norm, mask, 0,
                                                            sm_count)
    p = 0.0 if st is None else struct.unpack("<d", struct.pack("<q", int(st[2])))[0]
    keep = ref.dropout_mask(x.shape, p, SEED, OFFSET)
    _check_norm_backward(grads, grad, grad_h, h, w, mean, rstd, norm, eps, keep, p, output_mask)
    return got, grads


@pytest.mark.parametrize("H", NORM_H)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_equals_reference(H, dtype, norm):
    """Every H kind (one element, odd, a partial last run, registers, memory),
    weight/bias None, in x's dtype or float32, residual None or in h's dtype
    (float32 with residual_in_fp32), grad_h None or given."""
    shape = (2, 3, H) if H <= 1000 else (2, H) if H < 2**16 else (1, H)
    low = dtype in LOW
    # (weight, bias, residual, residual_in_fp32, float32 parameters, grad_h)
    combos = [(True, True, True, False, False, True), (False, False, False, False, False, False),
              (True, False, True, low, True, False), (False, True, False, low, False, True)]
    st = state(0.3)
    if H >= 2**16:  # the reference's int64 Philox takes seconds here: one case per norm, two with dropout
        combos = combos[:1] if norm == "layer" else combos[2:3]
        if (norm, dtype) not in (("layer", torch.float32), ("rms", torch.bfloat16)):
            st = None
    for i, (use_w, use_b, use_r, fp32, f32_params, use_gh) in enumerate(combos):
        x, res, w, b, grad, grad_h = _norm_inputs(shape, dtype, fp32, torch.float32 if f32_params else dtype,
                                                  seed=H + i)
        y_h = _norm_case(x, res if use_r else None, w if use_w else None, b if use_b else None, grad,
                         grad_h if use_gh else None, st, norm, fp32, output_mask=(True, True, use_w, use_b))[0]
        if y_h[1].dtype == dtype:  # h is fused_dropout's output, bit for bit
            assert_bitwise_equal(y_h[1], ops.cuda_host_fused_dropout(x, None, res if use_r else None, st,
                                                                     "identity", [])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [77, 4097, 8193])
def test_norm_rounds_of_rows_per_block(dtype, H):
    """One SM's blocks walk the 40 rows in rounds: the backward's column sums
    carry across rounds (in registers, added across a block's rows through
    shared memory for 77; a row per block for 4097; the block's partial row
    in memory for 8193), and no output bit but the summed gradients' depends
    on the grid."""
    x, res, w, b, grad, grad_h = _norm_inputs((40, H), dtype, False, dtype, seed=H)
    st = state(0.25)
    one, g_one = _norm_case(x, res, w, b, grad, grad_h, st, "layer", False, sm_count=1)
    full = testing.cuda_host_dropout_add_norm(x, res, w, b, st, "layer", 1e-5, False, 0, 132)
    for a, c in zip(one, full):
        assert_bitwise_equal(a, c)
    g_full = testing.cuda_host_dropout_add_norm_backward(grad, grad_h, one[1], w, one[2], one[3], st, "layer",
                                                         [True] * 4, 0, 132)
    g_one = testing.cuda_host_dropout_add_norm_backward(grad, grad_h, one[1], w, one[2], one[3], st, "layer",
                                                        [True] * 4, 0, 1)
    for a, c in zip(g_one[:2], g_full[:2]):
        assert_bitwise_equal(a, c)
    for g in (g_one, g_full):
        check_norm_param_grads(g[2], g[3], grad, one[1], one[2], one[3], "layer")


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_output_mask_and_dropout_edges(norm):
    """Outputs left out of output_mask are empty; p = 0, p = 1 and no state;
    rows of zero variance (rstd = 1 / sqrt(eps))."""
    x, res, w, b, grad, grad_h = _norm_inputs((6, 33), torch.float32, False, torch.float32, seed=1)
    for mask in [(True, False, False, False), (False, True, True, False), (False, False, False, True)]:
        _norm_case(x, res, w, b, grad, grad_h, state(0.5), norm, False, output_mask=mask)
    for st in (state(0.0), state(1.0), None):
        _norm_case(x, res, w, b, grad, grad_h, st, norm, False)
    flat = torch.full((4, 50), 1.25)
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    got, _ = _norm_case(flat, None, w[:1].expand(50).contiguous(), None, g, None, None, norm, False)
    if norm == "layer":
        assert torch.equal(got[2], torch.full((4,), 1.25))
        eps = torch.full((4,), 1e-5)  # a zero variance: 1 / sqrt(eps in float32), two correct roundings
        assert_bitwise_equal(got[3], 1 / eps.sqrt())


def test_norm_empty_inputs():
    for shape in [(0, 8), (3, 0), (2, 0, 5)]:
        x = torch.randn(shape)
        got = ops.cuda_host_dropout_add_norm(x, None, None, None, state(0.5), "layer", 1e-5, False)
        want = ops.reference_dropout_add_norm(x, None, None, None, state(0.5), "layer", 1e-5, False)
        for a, c in zip(got, want):
            assert a.shape == c.shape
            assert torch.equal(a.isnan(), c.isnan())
        grads = ops.cuda_host_dropout_add_norm_backward(x, None, want[1], None, want[2], want[3], state(0.5), "layer",
                                                        [True, True, False, True])
        assert grads[0].shape == shape and grads[2].shape == (0,)
        assert torch.equal(grads[3], torch.zeros(shape[-1]))


@pytest.mark.parametrize("boundary", [2**31, 2**32, 2**34])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_rows_past_2_31_and_2_32(boundary, dtype):
    """Rows of a huge tensor around logical index 2**31, 2**32 and 2**34
    (row starts off Philox groups, H = 77): h and grad_input take the keep
    bits of the logical indices (keep_for_indices)."""
    shape = (40, 77)
    n = math.prod(shape)
    base = (boundary - n // 2) // 16 * 16
    assert base < boundary < base + n
    x, res, w, b, grad, grad_h = _norm_inputs(shape, dtype, False, dtype, seed=3)
    p = 0.3
    keep = ref.keep_for_indices(base + torch.arange(n), p, SEED, OFFSET).reshape(shape)
    dropped = ref._drop(keep, x * (1.0 / (1.0 - p)))
    # The reference without dropout on the dropped, scaled input: its h is the kernels' h.
    want = ops.reference_dropout_add_norm(dropped, res, w, b, None, "layer", 1e-5, False)[:4]
    got = testing.cuda_host_dropout_add_norm(x, res, w, b, state(p), "layer", 1e-5, False, base, 1)
    _check_norm_forward(got, want, w, b, "layer", 1e-5)
    _, h, mean, rstd = want
    mask = [True, True, True, True]
    grads = testing.cuda_host_dropout_add_norm_backward(grad, grad_h, h, w, mean, rstd, state(p), "layer", mask,
                                                        base, 1)
    _check_norm_backward(grads, grad, grad_h, h, w, mean, rstd, "layer", 1e-5, keep, p, mask)
    plain = ops.reference_dropout_add_norm_backward(grad, grad_h, h, w, mean, rstd, None, "layer", mask)
    assert torch.equal(grads[0] == 0, ~keep | (ref._drop(keep, plain[0] * (1.0 / (1.0 - p))) == 0))


def test_norm_launch_plans():
    """A block per step of rows (a row's threads: the fewest warps that hold
    it) up to one wave of the kernels' declared residency; the backward's
    weight and bias sums each one reduction launch."""
    kd = KERNEL_DTYPE[torch.bfloat16]
    want = declared_blocks_per_sm("NormForwardKernel", kd, None, False)
    # 64 bfloat16 elements: a warp per row, 8 rows per block.
    assert _launches("norm_forward", 5 * 64, 64, torch.bfloat16, "identity") == [(1, 1, want)]
    assert _launches("norm_forward", 9 * 64, 64, torch.bfloat16, "identity") == [(2, 1, want)]
    assert _launches("norm_forward", 2**20 * 64, 64, torch.bfloat16, "identity") == [(H100_SMS * want, 1, want)]
    want_b = declared_blocks_per_sm("NormBackwardKernel", kd, None, True)
    reduce = declared_blocks_per_sm("BiasReduceKernel", "float", None, False)
    plans = _launches("norm_backward", 2**20 * 1024, 1024, torch.bfloat16, "identity", bias_grad=True)
    # the sums: a reduction block per 32-column tile
    assert plans == [(H100_SMS * want_b, 1, want_b)] + [(1024 // 32, 1, reduce)] * 2
    assert _launches("norm_backward", 3 * 7, 7, torch.float32, "identity") == [(1, 1, want_b)]


# --- sharded calls (place) --------------------------------------------------------------
# A shard given its place draws each element at its index in the global
# tensor (csrc/index_map.h, the kernels' ShardMap). The conformance suite
# checks a shard against the unsharded call on every backend; here the
# kernels' own paths of a strided map: runs shorter than a unit and than a
# Philox group, pack bytes across runs, the bias-gradient kernel's rows of a
# split column range, several units per thread, keep-all and drop-all,
# indices past 2**32. Each case also shows that the place decides: the same
# local call without it draws other bits.

def _block(t, start, local):
    return t[tuple(slice(s, s + n) for s, n in zip(start, local))]


def _tiles(cuts):
    """(start, local) of the blocks of a tiling: cuts[d] the boundaries along dimension d."""
    per_dim = [list(zip(c[:-1], (b - a for a, b in zip(c[:-1], c[1:])))) for c in cuts]
    for combo in itertools.product(*per_dim):
        yield tuple(s for s, _ in combo), tuple(n for _, n in combo)


@pytest.mark.parametrize("p", [0.4, 0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_place_tiles_of_runs_shorter_than_a_unit(dtype, p):
    """The last dimension cut into pieces of 1 to 3 elements at odd starts and
    the first one at row 1: every shard's y, packed bits and dx (drawn, and
    read from its bits) are the unsharded call's block; a pack byte spans
    up to eight runs, a unit several."""
    global_shape = (6, 5, 11)
    cuts = [(0, 1, 6), (0, 5), (0, 1, 4, 6, 9, 11)]
    x, bias, res, grad = make_inputs(global_shape, dtype, seed=21)
    st = state(p)
    y, _ = testing.cuda_host_fused_dropout(x, bias, res, st, "gelu", [], 0, H100_SMS)
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, "gelu", [], False, 0, H100_SMS)
    keep = ops.cuda_host_dropout_mask(st, list(global_shape))
    unplaced = torch.empty_like(y)
    for start, local in _tiles(cuts):
        place = list(global_shape) + list(start)
        xl, rl, gl = (_block(t, start, local).contiguous() for t in (x, res, grad))
        bl = bias[start[-1]:start[-1] + local[-1]].contiguous()
        yl, packed = testing.cuda_host_fused_dropout(xl, bl, rl, st, "gelu", [], 0, H100_SMS, None, True, place)
        assert_bitwise_equal(yl, _block(y, start, local))
        assert torch.equal(packed, ref.pack_bits(_block(keep, start, local)))
        dxl, _ = testing.cuda_host_fused_dropout_backward(gl, xl, bl, st, "gelu", [], False, 0, H100_SMS, None,
                                                          place)
        assert_bitwise_equal(dxl, _block(dx, start, local))
        read, _ = testing.cuda_host_fused_dropout_backward(gl, xl, bl, st, "gelu", [], False, 0, H100_SMS, packed)
        assert_bitwise_equal(read, dxl)
        _block(unplaced, start, local).copy_(testing.cuda_host_fused_dropout(xl, bl, rl, st, "gelu", [], 0,
                                                                             H100_SMS)[0])
    assert torch.equal(bits(unplaced), bits(y)) == (p != 0.4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sm_count", [1, H100_SMS])
def test_place_bias_gradient_of_a_column_range(dtype, sm_count):
    """A column-parallel shard: columns 5..17 of 29 (rows start mid Philox
    group and mid byte, units cross no run) and rows 3..36 of 37. The
    bias-gradient kernel's dx is the unsharded block, its bias gradient the
    sum of the shard's terms in the kernel's order, and reading the shard's
    bits gives both again."""
    activation = "gelu_tanh" if dtype != torch.float64 else "relu"
    global_shape, start, local = (37, 29), (3, 5), (34, 13)
    place = list(global_shape) + list(start)
    x, bias, _, grad = make_inputs(global_shape, dtype, seed=22)
    st = state(0.35)
    dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, activation, [], False, 0, sm_count)
    keep = _block(ops.cuda_host_dropout_mask(st, list(global_shape)), start, local)
    xl, gl = _block(x, start, local).contiguous(), _block(grad, start, local).contiguous()
    bl = bias[start[1]:start[1] + local[1]].contiguous()
    dxl, dbl = testing.cuda_host_fused_dropout_backward(gl, xl, bl, st, activation, [], True, 0, sm_count, None,
                                                        place)
    assert_bitwise_equal(dxl, _block(dx, start, local))
    plan = testing.cuda_bias_grad_plan(local[0], local[1], dtype, activation, sm_count)
    terms = bias_grad_terms(gl, xl, bl, SEED, OFFSET, 0.35, activation, keep=keep)
    assert_bitwise_equal(dbl, _kernel_order_dbias(terms, plan, dtype))
    read = testing.cuda_host_fused_dropout_backward(gl, xl, bl, st, activation, [], True, 0, sm_count,
                                                    ref.pack_bits(keep))
    assert_bitwise_equal(read[0], dxl)
    assert_bitwise_equal(read[1], dbl)
    unplaced = testing.cuda_host_fused_dropout_backward(gl, xl, bl, st, activation, [], True, 0, sm_count)[0]
    assert not torch.equal(bits(unplaced), bits(dxl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_place_grid_stride_loop(dtype):
    """One SM's grid over a shard of runs of 3 (columns 2..4 of 7): each
    thread walks several units (forward), pack bytes and mask groups, and
    every one draws at its own global index."""
    rows = 2 * 256 * 8 * unit_elems(dtype) // 3 + 5  # above two steps per thread of any planned grid
    global_shape, start, local = (rows, 7), (0, 2), (rows, 3)
    place = list(global_shape) + list(start)
    for op, steps in (("forward", rows * 3 // unit_elems(dtype)), ("forward_packed", rows * 3 // 8),
                      ("mask", rows * 3 // 4)):
        grid_x, _, _ = _launches(op, rows * 3, 3, dtype, "silu", sm_count=1)[0]
        assert steps >= 2 * grid_x * 256, op
    x, bias, res, _ = make_inputs(global_shape, dtype, seed=23)
    st = state(0.25)
    y = testing.cuda_host_fused_dropout(x, bias, res, st, "silu", [], 0, H100_SMS)[0]
    keep = _block(testing.cuda_host_dropout_mask(st, list(global_shape), 0, H100_SMS), start, local)
    xl, rl = _block(x, start, local).contiguous(), _block(res, start, local).contiguous()
    bl = bias[2:5].contiguous()
    assert_bitwise_equal(testing.cuda_host_fused_dropout(xl, bl, rl, st, "silu", [], 0, 1, None, False, place)[0],
                         _block(y, start, local))
    yl, packed = testing.cuda_host_fused_dropout(xl, bl, rl, st, "silu", [], 0, 1, None, True, place)
    assert_bitwise_equal(yl, _block(y, start, local))
    assert torch.equal(packed, ref.pack_bits(keep))
    m = testing.cuda_host_dropout_mask(st, list(local), 0, 1, place)
    assert torch.equal(m, keep)
    assert not torch.equal(m, testing.cuda_host_dropout_mask(st, list(local), 0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_place_past_2_32(dtype):
    """A shard of a (3, 2**33, 5) tensor, runs of 3 with strides 5 and
    5 * 2**33, rows across index 2**32 of their dimension: keep bits,
    packed bits, y and dx are the reference's at the global indices (no
    such tensor is allocated), at one SM and at an H100's."""
    global_shape, start, local = (3, 2**33, 5), (1, 2**32 - 2, 1), (2, 4, 3)
    place = list(global_shape) + list(start)
    x, bias, res, grad = make_inputs(local, dtype, seed=24)
    p = 0.5
    keep = ref.dropout_mask(local, p, SEED, OFFSET, place=place)
    assert not torch.equal(keep, ref.dropout_mask(local, p, SEED, OFFSET))
    y_want = ref.fused_dropout(x, bias, res, SEED, OFFSET, p, "relu", keep=keep)
    dx_want = ref.fused_dropout_backward(grad, x, bias, SEED, OFFSET, p, "relu", keep=keep)[0]
    for sm_count in (1, H100_SMS):
        assert torch.equal(testing.cuda_host_dropout_mask(state(p), list(local), 0, sm_count, place), keep)
        y, packed = testing.cuda_host_fused_dropout(x, bias, res, state(p), "relu", [], 0, sm_count, None, True,
                                                    place)
        assert_bitwise_equal(y, y_want)
        assert torch.equal(packed, ref.pack_bits(keep))
        for bias_grad in (False, True):
            dx, _ = testing.cuda_host_fused_dropout_backward(grad, x, bias, state(p), "relu", [], bias_grad, 0,
                                                             sm_count, None, place)
            assert_bitwise_equal(dx, dx_want)


# (global shape, global mask shape, cuts): channels cut into 1, 3 and 2 with
# the batch cut too (the small mask's map strided), and a mask over (C, H)
# whose shards' masks are single runs at odd starts.
PLACE_STRUCTURED = [
    ((4, 6, 5, 7), (4, 6, 1, 1), [(0, 3, 4), (0, 1, 4, 6), (0, 5), (0, 7)]),
    ((4, 6, 5, 7), (1, 6, 5, 1), [(0, 4), (0, 1, 4, 6), (0, 2, 5), (0, 7)]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("global_shape,mask_shape,cuts", PLACE_STRUCTURED)
def test_place_structured_mask_tiles(dtype, global_shape, mask_shape, cuts):
    """Every shard of a structured mask applies the block of the global small
    mask, drawn by the mask kernel at the small mask's global indices: y and
    dx (of the bias-gradient kernel) are the unsharded call's blocks, at one
    SM."""
    x, bias, res, grad = make_inputs(global_shape, dtype, seed=25)
    st = state(0.5)
    ms = list(mask_shape)
    y = testing.cuda_host_fused_dropout(x, bias, res, st, "relu", ms, 0, H100_SMS)[0]
    dx = testing.cuda_host_fused_dropout_backward(grad, x, bias, st, "relu", ms, False, 0, H100_SMS)[0]
    unplaced = torch.empty_like(y)
    for start, local in _tiles(cuts):
        place = list(global_shape) + list(start)
        xl, rl, gl = (_block(t, start, local).contiguous() for t in (x, res, grad))
        bl = bias[start[-1]:start[-1] + local[-1]].contiguous()
        yl = testing.cuda_host_fused_dropout(xl, bl, rl, st, "relu", ms, 0, 1, None, False, place)[0]
        assert_bitwise_equal(yl, _block(y, start, local))
        dxl = testing.cuda_host_fused_dropout_backward(gl, xl, bl, st, "relu", ms, True, 0, 1, None, place)[0]
        assert_bitwise_equal(dxl, _block(dx, start, local))
        local_ms = [m if m == 1 else n for m, n in zip(mask_shape, local)]
        _block(unplaced, start, local).copy_(testing.cuda_host_fused_dropout(xl, bl, rl, st, "relu", local_ms, 0,
                                                                             1)[0])
    assert not torch.equal(bits(unplaced), bits(y))


@pytest.mark.parametrize("H", [77, 4097])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_place_norm_of_split_rows(norm, H):
    """A sequence-parallel shard of whole rows (rows 2..4 of 6 and 1..3 of 5:
    a strided map whose rows start off Philox groups), in registers and
    read again from memory, at one SM (rounds of rows per block) and an
    H100's: y, h, the statistics and dx, dh are the unsharded call's
    blocks; the weight and bias gradients the sums of the shard's terms."""
    dtype = torch.bfloat16
    global_shape, start, local = (6, 5, H), (2, 1, 0), (3, 3, H)
    place = list(global_shape) + list(start)
    x, res, w, b, grad, grad_h = _norm_inputs(global_shape, dtype, False, dtype, seed=H)
    st = state(0.3)
    full = testing.cuda_host_dropout_add_norm(x, res, w, b, st, norm, 1e-5, False, 0, H100_SMS)
    mask = [True] * 4
    full_grads = testing.cuda_host_dropout_add_norm_backward(grad, grad_h, full[1], w, full[2], full[3], st, norm,
                                                             mask, 0, H100_SMS)
    rows = lambda t: _block(t.reshape(global_shape[:-1]), start, local[:-1]).reshape(-1)  # noqa: E731
    xl, rl, gl, ghl = (_block(t, start, local).contiguous() for t in (x, res, grad, grad_h))
    for sm_count in (1, H100_SMS):
        part = testing.cuda_host_dropout_add_norm(xl, rl, w, b, st, norm, 1e-5, False, 0, sm_count, place)
        for got, want in zip(part[:2], full[:2]):
            assert_bitwise_equal(got, _block(want, start, local))
        for got, want in zip(part[2:], full[2:]):
            assert_bitwise_equal(got, rows(want) if want.numel() else want)
        grads = testing.cuda_host_dropout_add_norm_backward(gl, ghl, part[1], w, part[2], part[3], st, norm, mask, 0,
                                                            sm_count, place)
        for got, want in zip(grads[:2], full_grads[:2]):
            assert_bitwise_equal(got, _block(want, start, local))
        check_norm_param_grads(grads[2], grads[3], gl, part[1], part[2], part[3], norm)
    unplaced = testing.cuda_host_dropout_add_norm(xl, rl, w, b, st, norm, 1e-5, False, 0, H100_SMS)
    assert not torch.equal(bits(unplaced[1]), bits(part[1]))
