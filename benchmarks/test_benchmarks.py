"""The performance report: every dropout_ext backend present against
nn.Dropout / the eager composition and torch.compile of it, side by side.

    pytest benchmarks --benchmark-only                # a handful of sizes
    pytest benchmarks --benchmark-only --bench-mode=full
"""

import torch

import cases
import transformer_block
from conftest import MEMORY_ROWS, ROWS, bench_device

COPIES = 3


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = bench_device(config)
    mode = config.getoption("--bench-mode")
    ops = list(cases.OPS) if mode == "full" else cases.DEFAULT_OPS
    if "op" in metafunc.fixturenames:
        params = [(op, d, dt, n) for op in ops for d in cases.DIRECTIONS
                  for dt in cases.dtypes(device, mode) for n in cases.sizes(device, mode)]
        ids = [f"{op}-{d}-{str(dt).replace('torch.', '')}-2^{cases.log2(n)}" for op, d, dt, n in params]
        metafunc.parametrize("op,direction,dtype,numel", params, ids=ids)
    if "copy_case" in metafunc.fixturenames:
        params = [(dt, n) for dt in cases.dtypes(device, mode) for n in cases.sizes(device, mode)]
        metafunc.parametrize("copy_case", params, ids=[f"{str(dt).replace('torch.', '')}-2^{cases.log2(n)}" for dt, n in params])


def _record(benchmark, row, samples):
    med = cases.median(samples)
    row.update(time_s=med, gbps=row["bytes"] / med / 1e9, rounds=len(samples))
    benchmark.extra_info.update(row)
    ROWS.append(row)


def test_copy_bandwidth(benchmark, request, copy_case):
    """clone(): the device's copy bandwidth, the ceiling for a read-one-write-one op."""
    dtype, numel = copy_case
    device = bench_device(request.config)
    mode = request.config.getoption("--bench-mode")
    rounds, warmup = cases.rounds_for(numel, mode, device)
    call = cases.copy_call(numel, dtype, device, COPIES)
    samples, = cases.time_calls([call], device, COPIES, rounds, warmup)
    benchmark.pedantic(call, args=(0,), rounds=1, iterations=1)
    elem = torch.empty((), dtype=dtype).element_size()
    _record(benchmark, {"op": "copy", "direction": "forward", "dtype": str(dtype).replace("torch.", ""),
                        "numel": numel, "impl": "copy", "bytes": 2 * numel * elem}, samples)


def test_op(benchmark, request, op, direction, dtype, numel):
    """Every implementation of one case (each dropout_ext backend here, the
    eager composition, torch.compile of it) and clone() of the same tensor,
    timed in alternation round by round on shared inputs: a slow phase of the
    machine hits them all alike, so the speedups and the copy ratio hold."""
    device = bench_device(request.config)
    mode = request.config.getoption("--bench-mode")
    impls = {}
    for kind in ("dropout_ext", "eager", "torch.compile"):
        impls.update(cases.implementations(op, device, kind))
    rounds, warmup = cases.rounds_for(numel, mode, device)
    elem = torch.empty((), dtype=dtype).element_size()
    sets = cases.make_inputs(op, numel, dtype, device, direction != "forward", COPIES)
    names = list(impls)
    calls = [cases.make_call(impls[name], direction, sets) for name in names]
    copy = cases.copy_call(numel, dtype, device, COPIES)
    *samples, copy_samples = cases.time_calls(calls + [copy], device, COPIES, rounds, max(warmup, 2))
    benchmark.pedantic(calls[0], args=(0,), rounds=1, iterations=1)
    for name, impl_samples in zip(names, samples):
        row = {"op": op, "direction": direction, "dtype": str(dtype).replace("torch.", ""), "numel": numel,
               "impl": name, "bytes": cases.minimal_bytes(op, direction, numel, elem),
               "copy_time_s": cases.median(copy_samples), "copy_bytes": 2 * numel * elem}
        try:
            row["saved_bytes_per_elem"] = cases.saved_bytes_per_element(impls[name], op, dtype, device)
        except Exception as exc:  # a compiled graph may refuse the hooks
            row["saved_bytes_per_elem"] = None
            row["saved_bytes_note"] = f"{type(exc).__name__}"
        _record(benchmark, row, impl_samples)


def test_transformer_block_memory(benchmark, request):
    """A small transformer block trained a few steps with nn.Dropout, with
    dropout_ext swapped in, and with the fused ops: peak memory and step time
    (each variant in its own process; see transformer_block.py)."""
    device = bench_device(request.config)
    mode = request.config.getoption("--bench-mode")
    threads = request.config.getoption("--bench-threads")
    rows = benchmark.pedantic(transformer_block.run_all, args=(device.type, threads, mode == "smoke"),
                              rounds=1, iterations=1)
    base = next(r for r in rows if r["variant"] == "nn")
    for r in rows:
        r["peak_vs_nn"] = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] > 0 else None
        r["speedup_vs_nn"] = base["step_time_s"] / r["step_time_s"]
    benchmark.extra_info["rows"] = rows
    MEMORY_ROWS.extend(rows)
