"""The performance report: every dropout_ext backend present against
nn.Dropout / the eager composition and torch.compile of it, side by side.

    pytest benchmarks --benchmark-only                # a handful of sizes
    pytest benchmarks --benchmark-only --bench-mode=full
    pytest benchmarks --benchmark-only --bench-mode=small --bench-threads=1   # per-call cost
    pytest benchmarks --benchmark-only -k test_gpt2_training_step             # the GPT-2 row alone

Each case (op, direction, dtype, size) is measured twice over:

- test_impl[<case>-<impl>]: one implementation alone, its rounds timed by
  pytest-benchmark, grouped per case, so pytest-benchmark's table, --benchmark-save,
  --benchmark-compare and --benchmark-histogram see every implementation;
- test_paired[<case>]: all implementations and clone() in alternation, round
  by round, whose per-implementation medians feed the report's table, the
  JSON and the plots (the ratios hold on a machine whose speed drifts).

Each implementation's device ops per call (dropout_ext.launches, on the
bench device) are counted once per case, after its timing.

Before an implementation is first timed at an (op, dtype, size), its output
and gradients are checked against eager given the same mask
(cases.check_against_eager): a benchmark of a wrong result fails instead.

conftest runs the tests of one case back to back, so they share its inputs,
its torch.compile and its warm-up.
"""

import itertools

import pytest
import torch

import cases
import gpt2_step
import transformer_block
from conftest import GPT2_ROWS, MEMORY_ROWS, ROWS, bench_device, bench_rounds
from dropout_ext.launches import count_launches

PAIRED_GROUP = "paired rounds (every implementation and clone() in alternation)"


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = bench_device(config)
    mode = config.getoption("--bench-mode")
    if "numel" not in metafunc.fixturenames:
        return
    # The clock of a benchmark is set per test; on CUDA it must wait for the GPU.
    timer = {"timer": cases.cuda_event_timer} if device.type == "cuda" else {}
    params = []
    for op, direction, dtype, numel in cases.bench_cases(device, mode):
        cid = cases.case_id(op, direction, dtype, numel)
        if "impl" in metafunc.fixturenames:
            for impl in cases.impl_names(op, device, mode):
                params.append(pytest.param(op, direction, dtype, numel, impl, id=f"{cid}-{impl}",
                                           marks=pytest.mark.benchmark(group=cid, **timer)))
        else:
            params.append(pytest.param(op, direction, dtype, numel, id=cid,
                                       marks=pytest.mark.benchmark(group=PAIRED_GROUP, **timer)))
    names = "op,direction,dtype,numel" + (",impl" if "impl" in metafunc.fixturenames else "")
    metafunc.parametrize(names, params)


@pytest.fixture(scope="module", autouse=True)
def _compile_or_fail():
    # A torch.compile that ran out of recompiles would fall back to eager and
    # be reported under its own name: fail instead.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


_case = {}        # the state of the case now running (one at a time: its tensors can be GiBs)
_saved = {}       # (op, dtype, impl, device) -> saved bytes per element, independent of direction and size


def _case_state(op, direction, dtype, numel, device):
    key = (op, direction, dtype, numel, str(device))
    if _case.get("key") != key:
        _case.clear()
        # torch.compile caches graphs per code object, and every case compiles
        # the same eager function: without a reset the ninth case would hit
        # dynamo's recompile limit and run eager under the torch.compile name.
        torch._dynamo.reset()
        sets = cases.make_inputs(op, numel, cases.DTYPES[dtype], device, direction != "forward", cases.COPIES)
        grads = cases.make_grads(sets) if direction != "forward" else None
        _case.update(key=key, sets=sets, grads=grads, fns={}, calls={}, solo={}, warm=set(), launches={})
    return _case


_checked = set()   # (op, dtype, numel, device, impl) whose results were checked against eager


def _call(state, op, direction, impl):
    if impl not in state["calls"]:
        # Before an implementation is timed, its output and gradients are
        # checked against eager once per (op, dtype, size): the directions of
        # a case run the same kernels.
        x = state["sets"][0][0]
        key = (op, x.dtype, x.numel(), str(x.device), impl)
        if key not in _checked:
            gen = torch.Generator(device=x.device).manual_seed(1)
            grad = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            cases.check_against_eager(op, impl, state["sets"][0], grad)
            _checked.add(key)
        if impl == "copy":
            state["calls"][impl] = cases.copy_call(state["sets"])
        else:
            fn = state["fns"][impl] = cases.build_impl(op, impl)
            state["calls"][impl] = cases.make_call(fn, direction, state["sets"], state["grads"])
    return state["calls"][impl]


def _saved_bytes(state, op, dtype, impl, device):
    if impl == "copy":
        return None, None
    key = (op, dtype, impl, str(device))
    if key not in _saved:
        try:
            _saved[key] = (cases.saved_bytes_per_element(state["fns"][impl], op, cases.DTYPES[dtype], device), None)
        except Exception as exc:  # a compiled graph may refuse the hooks
            _saved[key] = (None, type(exc).__name__)
    return _saved[key]


def _launches(state, impl, device):
    """Device ops of one call of the implementation (dropout_ext.launches),
    counted once per case; None for torch.compile, which runs eagerly under
    the counting mode, so the count would be eager's."""
    if impl == "torch.compile":
        return None
    if impl not in state["launches"]:
        with count_launches(device.type) as launches:
            state["calls"][impl](0)
        state["launches"][impl] = launches.count
    return state["launches"][impl]


def _rotation():
    """pytest-benchmark setup: hands each round the next input set."""
    k = itertools.cycle(range(cases.COPIES))
    return lambda: ((next(k),), {})


def _case_info(op, direction, dtype, numel, device):
    return {"op": op, "direction": direction, "dtype": dtype, "numel": numel, "device": str(device)}


def test_impl(benchmark, request, op, direction, dtype, numel, impl):
    """One implementation of one case, timed alone: its rounds are pytest-benchmark's statistics."""
    device = bench_device(request.config)
    rounds, warmup = bench_rounds(request.config, numel, device)
    state = _case_state(op, direction, dtype, numel, device)
    call = _call(state, op, direction, impl)
    benchmark.pedantic(call, setup=_rotation(), rounds=rounds, warmup_rounds=warmup)
    state["warm"].add(impl)
    elem = cases.DTYPES[dtype].itemsize
    info = dict(_case_info(op, direction, dtype, numel, device), impl=impl,
                bytes=cases.impl_bytes(op, direction, impl, numel, elem))
    if benchmark.stats is not None:  # None under --benchmark-disable
        med = benchmark.stats.stats.median
        state["solo"][impl] = med
        info["gbps"] = info["bytes"] / med / 1e9
    info["saved_bytes_per_elem"], note = _saved_bytes(state, op, dtype, impl, device)
    if note:
        info["saved_bytes_note"] = note
    info["launches_per_call"] = _launches(state, impl, device)
    benchmark.extra_info.update(info)


def test_paired(benchmark, request, op, direction, dtype, numel):
    """Every implementation of one case (each dropout_ext backend here, the
    eager composition, torch.compile of it) and clone() of the same tensor,
    timed in alternation round by round on shared inputs: a slow phase of the
    machine hits them all alike, so the speedups and the copy ratio hold.
    pytest-benchmark records the whole round; each implementation's samples
    feed the report."""
    device = bench_device(request.config)
    rounds, warmup = bench_rounds(request.config, numel, device)
    state = _case_state(op, direction, dtype, numel, device)
    names = cases.impl_names(op, device, request.config.getoption("--bench-mode"))
    calls = [_call(state, op, direction, name) for name in names]
    if state["warm"].issuperset(names):
        # Warmed by this case's test_impl runs; one round still brings every
        # implementation's data back into play after the others'.
        warmup = min(warmup, 1)
    timer = cases.timer_for(device)
    samples = [[] for _ in names]
    orders = cases.round_orders(len(calls))
    benchmark.pedantic(lambda k: cases.paired_round(calls, timer, k, samples, next(orders)), setup=_rotation(),
                       rounds=rounds, warmup_rounds=warmup)
    # The warm-up rounds came first; keep the timed ones (all there is under --benchmark-disable).
    samples = [s[-rounds:] for s in samples]
    elem = cases.DTYPES[dtype].itemsize
    copy_samples = samples[names.index("copy")]
    medians = {}
    for name, impl_samples in zip(names, samples):
        med = medians[name] = cases.median(impl_samples)
        nbytes = cases.impl_bytes(op, direction, name, numel, elem)
        row = dict(_case_info(op, direction, dtype, numel, device), impl=name, bytes=nbytes, time_s=med,
                   gbps=nbytes / med / 1e9, rounds=len(impl_samples),
                   solo_time_s=state["solo"].get(name),  # test_impl's median, when it ran
                   launches_per_call=_launches(state, name, device))
        if name != "copy":
            row.update(copy_time_s=cases.median(copy_samples), copy_bytes=2 * numel * elem)
            row["saved_bytes_per_elem"], note = _saved_bytes(state, op, dtype, name, device)
            if note:
                row["saved_bytes_note"] = note
        ROWS.append(row)
    benchmark.extra_info.update(_case_info(op, direction, dtype, numel, device), impls=names,
                                median_s=medians)


@pytest.mark.benchmark(group="transformer block")
def test_transformer_block_memory(benchmark, request):
    """A small transformer block trained a few steps with nn.Dropout, with
    dropout_ext swapped in, and with the fused ops: peak memory and step time
    (each variant in its own process; see transformer_block.py). One round:
    the figures are in extra_info, the time is the three processes'."""
    device = bench_device(request.config)
    mode = request.config.getoption("--bench-mode")
    threads = request.config.getoption("--bench-threads")
    rows = benchmark.pedantic(transformer_block.run_all, args=(device.type, threads, cases.tiny(device, mode)),
                              rounds=1, iterations=1)
    base = next(r for r in rows if r["variant"] == "nn")
    for r in rows:
        r["peak_vs_nn"] = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] > 0 else None
        r["speedup_vs_nn"] = base["step_time_s"] / r["step_time_s"]
    benchmark.extra_info["rows"] = rows
    MEMORY_ROWS.extend(rows)


@pytest.mark.benchmark(group="gpt2 training step")
def test_gpt2_training_step(benchmark, request):
    """One training step of a small Hugging Face GPT-2 with nn.Dropout, with
    replace_dropout and with fuse_dropout, paired round by round in this
    process (see gpt2_step.py). One round: the figures are in extra_info,
    the time is the whole paired run's."""
    device = bench_device(request.config)
    tiny = cases.tiny(device, request.config.getoption("--bench-mode"))
    rounds, warmup = gpt2_step.rounds_for(device, tiny)
    rows = benchmark.pedantic(gpt2_step.run, args=(device, rounds, warmup, tiny), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    GPT2_ROWS.extend(rows)
