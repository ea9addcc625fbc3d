"""How the Triton launchers launch, checked without a GPU: on the device of
their tensors, and with fixed launch configurations (no autotuning, so a
launch never benchmarks, which would synchronise and break a CUDA graph being
captured).

There is no CUDA device here, so the launchers get tensors that claim to live
on cuda:1 (a wrapper subclass whose data stays on the CPU), the kernels are
replaced by recorders, and ``torch.cuda.device`` by a stand-in that tracks the
current device: a launch made while cuda:1 is not current is a launch on the
wrong GPU. Every recorded launch is also held to CUDA's grid limits, which a
launch on a GPU would fail; tensors too large for this machine are wrapped
meta tensors (shapes only)."""

import ast
import inspect
import math

import pytest
import torch
from torch.utils._pytree import tree_map

from dropout_ext import triton_kernels as K

# CUDA's grid limits: axis 0, axes 1 and 2.
GRID_MAX = (2**31 - 1, 65535, 65535)


class OnDevice(torch.Tensor):
    """A CPU tensor that reports another device (metadata only)."""

    @staticmethod
    def __new__(cls, inner, device):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                device=device)
        t.inner = inner
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        device = []

        def unwrap(t):
            if isinstance(t, OnDevice):
                device.append(t.device)
                return t.inner
            if isinstance(t, torch.device) and t.type == "cuda":
                return torch.device("cpu")
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda t: OnDevice(t, device[0]) if isinstance(t, torch.Tensor) else t, out)

    def contiguous(self, memory_format=torch.contiguous_format):
        # Tensor.contiguous would enter a CUDA device guard before dispatch.
        return OnDevice(self.inner.contiguous(memory_format=memory_format), self.device)


def _check_grid(name, grid):
    """A grid a CUDA launch accepts: 1 to 3 axes, each within its limit."""
    assert isinstance(grid, tuple) and 1 <= len(grid) <= 3, (name, grid)
    for axis, (size, limit) in enumerate(zip(grid, GRID_MAX)):
        assert isinstance(size, int) and 1 <= size <= limit, f"{name}: grid {grid}, axis {axis} outside [1, {limit}]"


KERNEL_NAMES = ("_flat_kernel", "_rows_kernel", "_sum_rows_kernel", "_mask_kernel", "_norm_kernel",
                "_norm_backward_kernel")
SMS = 132


@pytest.fixture
def recorded(monkeypatch):
    """(launches, current): each launch as (kernel name, current device at
    launch, grid, meta, args), its grid checked against CUDA's limits; the
    stand-in torch.cuda.device keeps ``current``."""
    current = [torch.device("cuda", 0)]
    launches = []

    class device:  # noqa: N801  (stands in for torch.cuda.device)
        def __init__(self, dev):
            self.dev = torch.device(dev)

        def __enter__(self):
            self.prev = current[0]
            current[0] = self.dev

        def __exit__(self, *exc):
            current[0] = self.prev

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            _check_grid(self.name, grid)
            return lambda *args, **meta: launches.append((self.name, current[0], grid, meta, args))

    monkeypatch.setattr(torch.cuda, "device", device)
    for name in KERNEL_NAMES:
        monkeypatch.setattr(K, name, Kernel(name))
    # The SM count of a GPU like an H100 (the norm backward's grid).
    monkeypatch.setattr(K, "_sm_count", lambda device: SMS)
    return launches, current


def _on(device, *tensors):
    return [OnDevice(t, device) if t is not None else None for t in tensors]


def _every_launcher(device):
    x, b, r, g = _on(device, torch.randn(4, 6, 8), torch.randn(8), torch.randn(4, 6, 8), torch.randn(4, 6, 8))
    (state,) = _on(device, torch.tensor([1, 2, 4599075939470750515]))  # p = 0.3
    K.fused_dropout(x, b, r, state, "gelu", [])
    K.fused_dropout(x, b, r, state, "gelu", [4, 1, 8])  # structured: the mask kernel, then the flat one
    K.fused_dropout(x, None, None, None, "identity", [])
    K.fused_dropout_backward(g, x, b, state, "silu", [], True)  # the bias-gradient row kernel, then its sum
    x7, b7, g7 = _on(device, torch.randn(4, 6, 7), torch.randn(7), torch.randn(4, 6, 7))
    K.fused_dropout_backward(g7, x7, b7, state, "silu", [], True)  # rows not starting on a Philox group
    K.fused_dropout_backward(g, None, None, None, "identity", [], False)
    K.dropout_mask(state, [5, 3])
    _, bits = K.fused_dropout(x, b, r, state, "gelu", [], None, True)  # the packed mask mode
    K.fused_dropout(g, None, None, state, "identity", [], bits)
    K.fused_dropout_backward(g, x, b, state, "silu", [], True, bits)
    y, h, mean, rstd = K.dropout_add_norm(x, r, b, b, state, "layer", 1e-5, False)
    K.dropout_add_norm_backward(g, None, h, b, mean, rstd, state, "layer", [True, True, True, True])


def test_launches_on_the_tensors_device(recorded):
    launches, current = recorded
    _every_launcher("cuda:1")
    assert {name for name, *_ in launches} == set(KERNEL_NAMES)
    for name, device, *_ in launches:
        assert device == torch.device("cuda", 1), f"{name} launched on {device}, its tensors are on cuda:1"
    assert current[0] == torch.device("cuda", 0)  # the caller's device is restored


def test_cpu_tensors_launch_without_a_cuda_guard():
    # The interpreter's CPU tensors: no CUDA call at all.
    guard = K._device_guard(torch.empty(1))
    assert not isinstance(guard, torch.cuda.device)


def test_every_launch_goes_through_the_guard():
    """No kernel[grid](...) call outside _launch: a new launch site cannot
    skip the device guard."""
    tree = ast.parse(inspect.getsource(K))
    sites = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                    sites.append(fn.name)
    assert sites == ["_launch"]


def test_fixed_launch_configs_no_autotuning(recorded):
    """Every kernel is a plain jitted function launched with an explicit
    BLOCK and num_warps from a table: nothing to benchmark at run time."""
    from triton.runtime.autotuner import Autotuner

    assert not any(isinstance(v, Autotuner) for v in vars(K).values())
    assert "autotune" not in inspect.getsource(K).replace("no autotuning", "")
    launches, _ = recorded
    _every_launcher("cuda:1")
    for name, _, grid, meta, _ in launches:
        assert isinstance(grid, tuple) and all(isinstance(d, int) and d >= 1 for d in grid), (name, grid)
        assert isinstance(meta["BLOCK"], int) and math.log2(meta["BLOCK"]).is_integer()
        assert meta["num_warps"] in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("elem_size,R", [(4, 4), (2, 8), (1, 16)])
def test_config_table(elem_size, R):
    """Rows of 16 bytes (one 128-bit access a thread), whole warps of them."""
    for n in (1, 1000, 2**16, 2**16 + 1, 2**22, 2**22 + 1, 2**31 + 3, 2**40):
        r, block, warps = K.flat_config(n, elem_size)
        assert r == R and block % (R * 32 * warps) == 0 and math.log2(block).is_integer()
        _check_grid("flat", (-(-n // block),))
    for rows, H in ((1, 4), (7, 12), (4096, 4096), (10**6, 768), (3, 2**20), (2**27, 4), (2, 2**26 + 4096)):
        r, block, warps, per, rb = K.rows_config(rows, H, elem_size, SMS)
        assert r == R and block % R == 0 and math.log2(block).is_integer() and 1 <= per <= rows
        # A step's stacked rows fill the warps; where the largest power of
        # two dividing H is a 128-byte line or more, the column tiles divide
        # H (no idle lane); a structured mask takes one row a step.
        assert rb * block == R * 32 * warps and ((H & -H) * elem_size < 128 or H % block == 0)
        assert K.rows_config(rows, H, elem_size, SMS, structured=True)[4] == 1
        _check_grid("rows", K.rows_grid(rows, H, block, per))


def _meta(device, *shapes, dtype=torch.float32):
    return _on(device, *(torch.empty(shape, dtype=dtype, device="meta") for shape in shapes))


# The launch plans depend on the dtype through its size alone (rows_config): one of 4 bytes, one of 2.
DTYPE_PER_SIZE = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPE_PER_SIZE)
@pytest.mark.parametrize("rows,H", [(2, 33558528), (2, 67117056), (2**27, 4), (2**24 + 8, 8)])
def test_bias_gradient_grid_within_limits(recorded, dtype, rows, H):
    """A bias gradient just wider than 65535 column tiles (of 512 float32 or
    1024 16-bit columns), or with more rows than 65535 programs of 256 rows
    cover, launches a grid a GPU accepts, covering every element."""
    launches, _ = recorded
    g, x, b = _meta("cuda:1", (rows, H), (rows, H), (H,), dtype=dtype)
    K.fused_dropout_backward(g, x, b, None, "gelu", [], True)
    [(name, _, grid, meta, args), (sum_name, _, sum_grid, sum_meta, sum_args)] = launches
    assert (name, sum_name) == ("_rows_kernel", "_sum_rows_kernel")
    assert grid[0] * meta["BLOCK"] >= H and grid[1] * args[12] >= rows
    assert sum_args[0] is args[5] and sum_grid[0] * sum_meta["BLOCK"] >= H


@pytest.mark.parametrize("dtype", DTYPE_PER_SIZE)
@pytest.mark.parametrize("rows,H", [(1024, 768), (4096, 1024), (64, 4096), (8, 512), (3, 12), (10**6, 768)])
def test_bias_gradient_partial_buffer_is_small(recorded, dtype, rows, H):
    """The float32 partial sums (a row per row program), written and summed
    again by the second stage, hold a row per _PART_MIN_ROWS rows of dx at
    most, or one row; the second stage sums them in at most _SUM_STEPS
    tiles a column, into the bias gradient's dtype."""
    launches, _ = recorded
    g, x, b = _meta("cuda:1", (rows, H), (rows, H), (H,), dtype=dtype)
    K.fused_dropout_backward(g, x, b, None, "gelu", [], True)
    [(name, _, grid, meta, args), (_, _, _, sum_meta, sum_args)] = launches
    assert name == "_rows_kernel"
    part_shape, part_dtype = tuple(args[5].shape), args[5].dtype
    assert part_shape[0] <= -(-rows // K._PART_MIN_ROWS), (part_shape, (rows, H))
    assert part_dtype == torch.float32 and part_shape == (grid[1], H)
    assert sum_args[2] == grid[1] and -(-grid[1] // sum_meta["C"]) <= K._SUM_STEPS
    assert sum_args[1].dtype == dtype and tuple(sum_args[1].shape) == (H,)


def test_packed_mode_launches(recorded):
    """pack_mask: the flat kernel writes the returned bits, (n + 7) // 8
    bytes (BITS_OUT); given bits, the flat and the bias-gradient kernels read
    those (BITS_IN); a structured mask packs nothing."""
    launches, _ = recorded
    x, b, g = _on("cuda:1", torch.randn(5, 6, 12), torch.randn(12), torch.randn(5, 6, 12))
    (state,) = _on("cuda:1", torch.tensor([1, 2, 4599075939470750515]))  # p = 0.3
    _, bits = K.fused_dropout(x, b, None, state, "gelu", [], None, True)
    assert bits.dtype == torch.uint8 and bits.shape == (45,) and bits.device == x.device
    K.fused_dropout(g, None, None, state, "identity", [], bits)
    K.fused_dropout_backward(g, x, b, state, "gelu", [], True, bits)
    _, none = K.fused_dropout(x, b, None, state, "gelu", [5, 1, 12], None, True)
    assert none.shape == (0,)
    flat = [(meta, args) for name, _, _, meta, args in launches if name == "_flat_kernel"]
    rows = [(meta, args) for name, _, _, meta, args in launches if name == "_rows_kernel"]
    assert [name for name, *_ in launches].count("_sum_rows_kernel") == 1
    assert [(m["BITS_OUT"], m["BITS_IN"]) for m, _ in flat] == [(True, False), (False, True), (False, False)]
    assert flat[0][1][7] is bits and flat[1][1][7].inner.data_ptr() == bits.inner.data_ptr()
    [(meta, args)] = rows
    assert meta["BITS_IN"] and args[7].inner.data_ptr() == bits.inner.data_ptr()


# --- dropout_add_norm ------------------------------------------------------------------


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("elem_size", [4, 2])
def test_norm_config(elem_size, backward):
    """A row in registers (one tile, BLOCK >= H) up to NORM_MAX_BLOCK
    elements at most, column tiles past its limit; 16-byte rows of a tile,
    whole powers of two; the limits of elements a thread and warps."""
    R = 16 // elem_size
    for H in (1, 3, 7, 77, 768, 1000, 1536, 2047, 3072, 5120, 6144, 12288, 2048, 4096, 4097, 8192, K.NORM_MAX_BLOCK, K.NORM_MAX_BLOCK + 1, 65536,
              2**20 + 3):
        r, block, warps, loop, tiles = K.norm_config(H, elem_size, backward)
        per_thread, max_warps = K.norm_limits(H, elem_size, backward)
        assert r == R and block % R == 0 and math.log2(block).is_integer()
        assert warps in (1, 2, 4, 8, 16) and warps <= max_warps
        assert block * tiles <= max(R, 32 * warps * per_thread)
        assert loop == (H > min(K.NORM_MAX_BLOCK, 32 * max_warps * per_thread))
        assert block * tiles >= H if not loop else block <= K.NORM_MAX_BLOCK and tiles == 1
        # several tiles: whole ones, each of a 16-byte row a thread at least
        assert tiles == 1 or (block * tiles == H and tiles <= K._NORM_MAX_TILES and block >= R * 32 * warps)
    assert not K.norm_config(16384, elem_size, False)[3] and K.norm_config(16385, elem_size, False)[3]
    assert not K.norm_config(4096, elem_size, True)[3] and K.norm_config(2049, elem_size, True)[3]


def _norm_inputs(device, rows, H, dtype=torch.float32, meta=False):
    make = (lambda *s: torch.empty(s, dtype=dtype, device="meta")) if meta else (lambda *s: torch.randn(s).to(dtype))
    x, r, w, g = _on(device, make(rows, H), make(rows, H), make(H), make(rows, H))
    return x, r, w, g


@pytest.mark.parametrize("rows,H", [(1, 7), (5, 77), (4096, 1024), (3, 65536), (10**6, 64), (2**31 + 5, 1)])
def test_norm_grids(recorded, rows, H):
    """The forward: a program a row, more rows than CUDA's grid holds in
    rounds. The backward: its grid from the shape and the SM count alone
    (the order of the parameter-gradient sums), every row covered, at most
    _NORM_SM_PROGRAMS programs an SM, and a float32 partial buffer of a row
    per program for each parameter gradient, summed by the second stage."""
    launches, _ = recorded
    x, r, w, g = _norm_inputs("cuda:1", rows, H, meta=True)
    (state,) = _on("cuda:1", torch.tensor([1, 2, 4599075939470750515]))
    _, h, _, rstd = K.dropout_add_norm(x, r, w, w, state, "rms", 1e-6, False)
    mean = rstd.new_empty((0,))
    K.dropout_add_norm_backward(g, None, h, w, mean, rstd, state, "rms", [True, True, True, True])
    K.dropout_add_norm_backward(g, None, h, w, mean, rstd, state, "rms", [True, True, True, True])
    [(fname, _, fgrid, fmeta, fargs), (bname, _, bgrid, bmeta, bargs), sum_w, sum_b, second, *_] = launches
    assert (fname, bname, sum_w[0], sum_b[0]) == ("_norm_kernel", "_norm_backward_kernel", "_sum_rows_kernel",
                                                  "_sum_rows_kernel")
    assert fgrid[0] == min(rows, K.GRID_X_MAX) and fmeta["ROUNDS"] == (rows > K.GRID_X_MAX)
    assert fmeta["LOOP"] == K.norm_config(H, 4)[3] and bmeta["LOOP"] == K.norm_config(H, 4, True)[3]
    assert fmeta["ALIGNED"] == bmeta["ALIGNED"] == (H % 4 == 0)
    per = bargs[13]
    assert bgrid[0] * per >= rows and (bgrid[0] - 1) * per < rows
    assert bgrid[0] <= SMS * K._NORM_SM_PROGRAMS and (bgrid[0] == 1 or per >= K._PART_MIN_ROWS)
    dw_part, db_part = bargs[9], bargs[10]
    assert dw_part.dtype == torch.float32 and tuple(dw_part.shape) == (bgrid[0], H) == tuple(db_part.shape)
    assert sum_w[4][0] is dw_part and sum_b[4][0] is db_part and sum_w[4][2] == bgrid[0]
    assert second[2] == bgrid and second[3] == bmeta and second[4][13] == per  # the same shape: the same sums


def test_norm_output_mask(recorded):
    """Outputs left out of output_mask are empty, are not computed (their
    constexpr flags off) and get no partial buffer; nothing asked, no launch."""
    launches, _ = recorded
    x, r, w, g = _norm_inputs("cuda:1", 6, 40, dtype=torch.bfloat16)
    (state,) = _on("cuda:1", torch.tensor([1, 2, 4599075939470750515]))
    y, h, mean, rstd = K.dropout_add_norm(x, r, w, None, state, "layer", 1e-5, True)
    assert h.dtype == torch.float32 and mean.dtype == rstd.dtype == torch.float32 and mean.shape == (6,)
    for mask in ([True, False, False, False], [False, True, False, True], [False, False, True, False]):
        del launches[:]
        out = K.dropout_add_norm_backward(g, None, h, w, mean, rstd, state, "layer", mask)
        assert [tuple(t.shape) != (0,) for t in out] == mask
        [(_, _, _, meta, args)] = [launch for launch in launches if launch[0] == "_norm_backward_kernel"]
        assert [meta[k] for k in ("NEED_DX", "NEED_DRES", "NEED_DW", "NEED_DB")] == mask
        assert meta["HAS_STATE"] == mask[0]  # only grad_input needs the mask
    del launches[:]
    out = K.dropout_add_norm_backward(g, None, h, w, mean, rstd, state, "layer", [False] * 4)
    assert launches == [] and all(tuple(t.shape) == (0,) for t in out)
