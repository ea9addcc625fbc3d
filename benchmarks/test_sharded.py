"""What a shard's place costs: the same op on the same local tensor, with
``place=`` (each element drawn at its global index, docs/RNG.md "Sharded
tensors") and without (the unsharded kernel on a tensor of the shard's
size), and clone() of it, timed in alternation round by round.

    pytest benchmarks/test_sharded.py --benchmark-only --bench-device=cpu

Layouts of a local (rows, 1024) shard: ``rows`` (half the rows: one run of
the global tensor), ``cols`` (half the columns, a tensor-parallel block:
runs of 1024), ``grid`` (both, a 2x2 mesh), ``cols_odd`` (columns from an
odd start: no run starts a Philox group). The report's table gives each
layout's time over the unsharded call's (x unsharded).
"""

import itertools

import pytest
import torch

import cases
from conftest import SHARD_ROWS, bench_device, bench_rounds
from dropout_ext import Place, Split

OPS = ["dropout", "bias_gelu_dropout", "dropout_add_norm"]
LAYOUTS = ["rows", "cols", "grid", "cols_odd"]
GROUP = "sharded: place against the unsharded call, paired"


def _place(layout: str, rows: int):
    return {"rows": Split(0, 1, 2), "cols": Split(-1, 1, 2), "grid": (Split(0, 1, 2), Split(-1, 1, 2)),
            "cols_odd": Place((rows, 3 * cases.HIDDEN), (0, cases.HIDDEN + 1))}[layout]


def _fn(op: str, place):
    """dropout_ext's op on the CPU kernels, with the place or without."""
    if op in cases.NORM_OPS:
        def norm_fn(x, r, w, b):
            return cases.F.dropout_add_norm(x, r, w, b, cases.P, cases.EPS, norm=cases.NORM_OPS[op], place=place)
        return norm_fn
    act = cases.OPS[op][0]

    def fn(x, b, r):
        return cases.F.fused_dropout(x, cases.P, bias=b, activation=act, residual=r, place=place)
    return fn


def pytest_generate_tests(metafunc):
    if "layout" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench_device(config)
    numel = max(cases.sizes(device, config.getoption("--bench-mode")))
    params = []
    for op in OPS:
        for direction in ("forward", "forward_backward"):
            for layout in LAYOUTS:
                if op in cases.NORM_OPS and layout in ("cols", "grid", "cols_odd"):
                    continue  # a norm shard holds whole rows
                params.append(pytest.param(op, direction, numel, layout,
                                           id=f"{op}-{direction}-float32-{cases.size_id(numel)}-{layout}",
                                           marks=pytest.mark.benchmark(group=GROUP)))
    metafunc.parametrize("op, direction, size, layout", params)


def test_sharded_paired(benchmark, request, op, direction, size, layout):
    numel = size  # not named numel: conftest orders the report's cases by that parameter
    device = bench_device(request.config)
    if device.type != "cpu":
        pytest.skip("the place's cost is measured on the CPU kernels (the GPU kernels: docs/DESIGN.md)")
    rounds, warmup = bench_rounds(request.config, numel, device)
    sets = cases.make_inputs(op, numel, torch.float32, device, direction != "forward", cases.COPIES)
    grads = cases.make_grads(sets)
    place = _place(layout, sets[0][0].shape[0])
    names = ["unsharded", "sharded", "copy"]
    calls = [cases.make_call(_fn(op, None), direction, sets, grads),
             cases.make_call(_fn(op, place), direction, sets, grads), cases.copy_call(sets)]
    samples = [[] for _ in names]
    orders = cases.round_orders(len(calls))
    timer = cases.timer_for(device)
    k = itertools.cycle(range(cases.COPIES))  # the input set of each round, rotated
    benchmark.pedantic(lambda: cases.paired_round(calls, timer, next(k), samples, next(orders)),
                       rounds=rounds, warmup_rounds=warmup)
    medians = {name: cases.median(s[-rounds:]) for name, s in zip(names, samples)}
    for name in names:
        SHARD_ROWS.append({"op": op, "direction": direction, "dtype": "float32", "numel": numel, "layout": layout,
                           "impl": name, "time_s": medians[name], "rounds": rounds,
                           "over_unsharded": medians[name] / medians["unsharded"]})
    benchmark.extra_info.update(op=op, direction=direction, numel=numel, layout=layout, median_s=medians)
