"""The launch plans of the Triton kernels as a static performance model
reads them: ``triton_kernels.recording()`` runs the launchers on meta
tensors (shapes only, no GPU), and each launch's facts (bytes, loads in
flight, lanes with work, serial loads) are checked against numbers computed
here by hand; the compiled variants a model of many shapes would build stay
few; every pass over memory is a kernel of the module (no torch pass
between them)."""

import random

import pytest
import torch

from dropout_ext import triton_kernels as K

SMS = 132
P_BITS = 4599075939470750515  # p = 0.3
KEYS = {"kernel", "grid", "num_warps", "constexprs", "bytes_read", "bytes_written", "inflight_bytes_per_thread",
        "lane_slots", "busy_slots", "dependent_loads"}


def _state():
    return torch.tensor([1, 2, P_BITS], device="meta")


def _t(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _record(fn, sm_count=SMS):
    with K.recording(sm_count) as records:
        fn()
    for r in records:
        # a kernel's launch also carries its argument types and the integers
        # its launch specialises (the model compiles it ahead of time as that)
        assert set(r) == KEYS | (set() if r["kernel"].startswith("torch.") else {"signature", "divisible"}), r
    return records


def test_records_name_the_integers_a_launch_specialises():
    """A row length that is a multiple of 16 is compiled as one (Triton
    specialises it, and the loads of a row stay 16-byte aligned); one that
    is not, and the counts a kernel leaves unspecialised, are not. A
    row-major tensor's row stride is its row length."""
    for H, divisible in ((768, ["H", "g_stride", "x_stride"]), (770, [])):
        (rows, _) = _record(lambda: K.fused_dropout_backward(_t(4096, H), _t(4096, H), _t(H), _state(), "gelu", [],
                                                             True))
        assert rows["kernel"] == "_rows_kernel" and rows["divisible"] == divisible, rows["divisible"]


def test_recording_launches_nothing_and_restores():
    x = _t(4, 8)
    records = _record(lambda: K.fused_dropout(x, None, None, _state(), "identity", []))
    assert [r["kernel"] for r in records] == ["_flat_kernel"]
    assert K._RECORDS is None


def test_flat_forward_facts():
    rows, H = 4096, 1024
    n = rows * H
    x, r, b = _t(rows, H), _t(rows, H), _t(H)
    [rec] = _record(lambda: K.fused_dropout(x, b, r, _state(), "gelu", []))
    # 16 bytes a thread of each 16-bit tensor, 8 warps: a 2048-element block
    assert rec["grid"] == (n // 2048,) and rec["num_warps"] == 8 and rec["constexprs"]["BLOCK"] == 2048
    assert "num_warps" not in rec["constexprs"]
    assert rec["bytes_read"] == n * (2 + 2) + H * 2 + 24  # x, residual, the bias once, the state
    assert rec["bytes_written"] == n * 2
    assert rec["inflight_bytes_per_thread"] == 2048 * (2 + 2 + 2) / 256  # x, residual and bias tiles
    assert rec["lane_slots"] == rec["busy_slots"] == n and rec["dependent_loads"] == 1


def test_bias_gradient_facts():
    rows, H = 8192, 768
    g, x, b = _t(rows, H), _t(rows, H), _t(H)
    rec, second = _record(lambda: K.fused_dropout_backward(g, x, b, _state(), "gelu", [], True))
    assert rec["kernel"] == "_rows_kernel" and second["kernel"] == "_sum_rows_kernel"
    # three 256-column tiles (768 = 3 x 256, every lane busy), 4 rows a step
    # stacked on 4 warps; 8 programs an SM over them, but at least 48 rows each
    per = 48
    parts = -(-rows // per)
    assert rec["grid"] == (3, parts) and rec["num_warps"] == 4
    assert rec["constexprs"]["BLOCK"] == 256 and rec["constexprs"]["RB"] == 4
    assert rec["bytes_read"] == rows * H * (2 + 2) + H * 2 + 24
    assert rec["bytes_written"] == rows * H * 2 + parts * H * 4
    assert rec["lane_slots"] == parts * per * H and rec["busy_slots"] == rows * H
    assert rec["dependent_loads"] == 1  # a streaming walk over rows
    assert rec["inflight_bytes_per_thread"] == 1024 * 4 / 128
    # the second stage: 16 partial rows a tile, 256 columns a program
    assert second["grid"] == (3,) and second["constexprs"] == {"C": 16, "BLOCK": 256}
    assert second["bytes_read"] == parts * H * 4 and second["bytes_written"] == H * 2
    assert second["dependent_loads"] == -(-parts // 16)
    partials = 2 * parts * H * 4
    assert partials <= 0.05 * sum(r["bytes_read"] + r["bytes_written"] for r in (rec, second))


def test_bias_gradient_any_row_length_is_one_pass():
    """A last dimension not divisible by 4 takes the row kernel too (its
    rows drawn element by element): no float32 copy of dx, no torch sum."""
    g, x, b = _t(1000, 7), _t(1000, 7), _t(7)
    records = _record(lambda: K.fused_dropout_backward(g, x, b, _state(), "gelu", [], True))
    assert [r["kernel"] for r in records] == ["_rows_kernel", "_sum_rows_kernel"]
    assert records[0]["constexprs"]["ALIGNED"] is False
    assert records[0]["bytes_written"] == 1000 * 7 * 2 + records[0]["grid"][1] * 7 * 4


@pytest.mark.parametrize("H", [768, 1024, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_norm_backward_partials_are_small(H, dtype):
    """The parameter-gradient partials (written by the backward, read by the
    second stage) are at most 5% of the op's bytes from 2**20 elements on."""
    for rows in (2**20 // H, 3 * 2**20 // H + 5, 8192, 65536):
        g, x = _t(rows, H, dtype=dtype), _t(rows, H, dtype=dtype)
        w = _t(H, dtype=dtype)
        h = _t(rows, H, dtype=dtype)
        mean, rstd = _t(rows, dtype=torch.float32), _t(rows, dtype=torch.float32)
        records = _record(lambda: K.dropout_add_norm_backward(g, None, h, w, mean, rstd, _state(), "layer",
                                                              [True] * 4))
        bwd, sum_w, sum_b = records
        assert (bwd["kernel"], sum_w["kernel"], sum_b["kernel"]) == (
            "_norm_backward_kernel", "_sum_rows_kernel", "_sum_rows_kernel")
        programs = bwd["grid"][0]
        assert programs <= K._NORM_SM_PROGRAMS * SMS and sum_w["dependent_loads"] <= K._SUM_STEPS
        partials = 2 * 2 * programs * H * 4
        total = sum(r["bytes_read"] + r["bytes_written"] for r in records)
        assert partials <= 0.05 * total, (rows, programs, partials / total)


def test_norm_backward_facts():
    rows, H = 8192, 768
    g, h, w = _t(rows, H), _t(rows, H), _t(H)
    mean, rstd = _t(rows, dtype=torch.float32), _t(rows, dtype=torch.float32)
    bwd, sum_w, sum_b = _record(lambda: K.dropout_add_norm_backward(g, None, h, w, mean, rstd, _state(), "layer",
                                                                    [True] * 4))
    # 170 programs of 49 rows wanted (48 at least); whole steps of 8 rows: 48
    per = 48
    programs = -(-rows // per)
    # the row in registers as three tiles of 256 (a 16-byte row each for
    # the 32 threads of one warp), 8 rows a step, on 8 warps
    assert bwd["grid"] == (programs,) and bwd["num_warps"] == 8
    assert bwd["constexprs"]["NT"] == 3 and bwd["constexprs"]["BLOCK"] == 256
    assert bwd["constexprs"]["RB"] == 8 and bwd["constexprs"]["SUB"] == 32
    assert bwd["bytes_read"] == rows * H * (2 + 2) + 2 * rows * 4 + H * 2 + 24  # g, h, mean, rstd, w, state
    assert bwd["bytes_written"] == rows * H * (2 + 2) + 2 * programs * H * 4  # dx, dres, two partial rows a program
    assert bwd["lane_slots"] == programs * per * H and bwd["busy_slots"] == rows * H
    assert bwd["inflight_bytes_per_thread"] == 8 * 3 * 256 * (2 + 2) / 256
    assert bwd["dependent_loads"] == 1  # a streaming walk over rows
    for s in (sum_w, sum_b):
        assert s["bytes_read"] == programs * H * 4 and s["bytes_written"] == H * 4


def test_norm_forward_column_tiles_reread_h():
    """A row longer than the tile: h is read back in the second pass (a
    re-read), and the statistics merge tile after tile."""
    rows, H = 64, 65536
    x = _t(rows, H, dtype=torch.float32)
    [rec] = _record(lambda: K.dropout_add_norm(x, x, None, None, _state(), "rms", 1e-5, False))
    block = rec["constexprs"]["BLOCK"]
    assert rec["constexprs"]["LOOP"] and H % block == 0
    assert rec["bytes_read"] == rows * H * (4 + 4 + 4) + 24  # x, residual, h again, the state
    assert rec["bytes_written"] == rows * H * (4 + 4) + rows * 4
    assert rec["dependent_loads"] == H // block and rec["lane_slots"] == rec["busy_slots"] == rows * H


def test_torch_passes_are_recorded():
    """What a launcher leaves to torch on the device is a record too: the
    copy of a non-contiguous input, and of the output back to its layout."""
    x = _t(8, 16).t()
    b = _t(8)
    records = _record(lambda: K.fused_dropout(x, b, None, _state(), "relu", []))
    names = [r["kernel"] for r in records]
    assert names == ["torch.contiguous", "_flat_kernel", "torch.copy_"]
    assert records[0]["bytes_read"] == records[0]["bytes_written"] == 16 * 8 * 2


def test_structured_mask_read_through_strides():
    """A structured mask: the mask kernel draws the small keep tensor, the
    flat kernel reads it through broadcast strides (its bytes once), no
    full-size keep tensor; past MAX_KEEP_DIMS collapsed dimensions, the old
    broadcast copy (a torch pass) and a full-size read."""
    N, C, HW = 16, 64, 1024
    x = _t(N, C, 32, 32)
    mask, flat = _record(lambda: K.fused_dropout(x, None, None, _state(), "identity", [N, C, 1, 1]))
    assert (mask["kernel"], flat["kernel"]) == ("_mask_kernel", "_flat_kernel")
    assert mask["bytes_written"] == N * C
    assert flat["constexprs"]["MASK_FROM_PTR"] and flat["constexprs"]["KEEP_DIMS"] == 2
    n = N * C * HW
    assert flat["bytes_read"] == n * 2 + N * C + 24 and flat["bytes_written"] == n * 2
    # five alternating runs of kept and broadcast dimensions: the fallback
    y = _t(2, 3, 5, 7, 3)
    names = [r["kernel"] for r in _record(lambda: K.fused_dropout(y, None, None, _state(), "identity",
                                                                  [2, 1, 5, 1, 3]))]
    assert names == ["_mask_kernel", "torch.contiguous", "_flat_kernel"]


# --- compiled variants ----------------------------------------------------------------


def _variants(records):
    return {(r["kernel"], tuple(sorted(r["constexprs"].items()))) for r in records}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("H", [768, 1024, 4096, 8192])
def test_few_compiled_variants(H, dtype):
    """Over 50 random row counts (1 to 2**20) of each op, at most 4 distinct
    constexpr sets per kernel: a row count is a run-time argument, or falls
    in one of a few buckets."""
    rng = random.Random(H)
    counts = [rng.randint(1, 2**20) for _ in range(50)]
    with K.recording(SMS) as records:
        for rows in counts:
            x, g, w = _t(rows, H, dtype=dtype), _t(rows, H, dtype=dtype), _t(H, dtype=dtype)
            K.fused_dropout(x, w, x, _state(), "gelu", [])
            K.fused_dropout_backward(g, x, w, _state(), "gelu", [], True)
            K.fused_dropout_backward(g, x, w, _state(), "gelu", [], False)
            K.dropout_mask(_state(), [rows, H])
            y, h, mean, rstd = K.dropout_add_norm(x, x, w, w, _state(), "layer", 1e-5, False)
            K.dropout_add_norm_backward(g, None, h, w, mean, rstd, _state(), "layer", [True] * 4)
    variants = _variants(records)
    # the flat kernel: a forward and a backward; the second stage: per output dtype
    per_kernel = {}
    for name, consts in variants:
        per_kernel.setdefault(name, set()).add(consts)
    limits = {"_flat_kernel": 2 * 4, "_sum_rows_kernel": 4 * 2}
    for name, sets in per_kernel.items():
        assert len(sets) <= limits.get(name, 4), (name, sorted(sets))


@pytest.mark.parametrize("H", [768, 1024, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_norm_lanes_hold_elements(H, dtype):
    """At least 90% of the norm kernels' lanes hold an element (a row of
    768 in three tiles of 256, not one of 1024)."""
    rows = 4096
    x, g, w = _t(rows, H, dtype=dtype), _t(rows, H, dtype=dtype), _t(H, dtype=dtype)
    h = _t(rows, H, dtype=dtype)
    mean, rstd = _t(rows, dtype=torch.float32), _t(rows, dtype=torch.float32)

    def calls():
        K.dropout_add_norm(x, x, w, w, _state(), "layer", 1e-5, False)
        K.dropout_add_norm_backward(g, None, h, w, mean, rstd, _state(), "layer", [True] * 4)

    fwd, bwd, *_ = _record(calls)
    for rec in (fwd, bwd):
        assert rec["busy_slots"] >= 0.9 * rec["lane_slots"], rec
