"""Benchmark options, the order the cases run in, the shared result table,
and the report written when the run ends (table on the terminal, JSON and
PNG plots in the results folder)."""

import datetime
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import cases
import dropout_ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = []
MEMORY_ROWS = []
GPT2_ROWS = []
SHARD_ROWS = []


def pytest_addoption(parser):
    g = parser.getgroup("dropout_ext benchmarks")
    g.addoption("--bench-mode", choices=("default", "full", "smoke", "small", "lease"), default="default",
                help="default: a handful of sizes; full: the whole sweep; "
                     "small: 2**8 to 2**14 elements (per-call cost); "
                     "lease: the key cases for a short GPU lease (tools/gpu_check.sh; smoke-sized off the GPU); "
                     "smoke: tiny, no timing claims")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    g.addoption("--bench-threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.addoption("--bench-rounds", type=int, default=None,
                help="timed rounds per test (default: by size, e.g. 15 at 2**24 elements on the CPU, 100 on CUDA)")
    g.addoption("--bench-out", default=os.path.join(HERE, "results", "latest"),
                help="folder for the JSON and the plots")


def bench_device(config) -> torch.device:
    name = config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def bench_rounds(config, numel: int, device: torch.device):
    """(rounds, warm-up rounds) of one test."""
    rounds, warmup = cases.rounds_for(numel, config.getoption("--bench-mode"), device)
    return config.getoption("--bench-rounds") or rounds, warmup


def pytest_configure(config):
    threads = config.getoption("--bench-threads") or os.cpu_count()
    torch.set_num_threads(threads)
    device = bench_device(config)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the CUDA-event clock records on the current device


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    # A benchmark stopped mid-measurement (a run interrupted, as
    # tools/gpu_check.sh ends a step at its time limit) has no rounds, and
    # pytest-benchmark's JSON of it fails, which loses the JUnit XML and this
    # suite's report of the cases that finished: it is left out.
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None:
        bench.benchmarks[:] = [b for b in bench.benchmarks if b]  # a Metadata is false without rounds
    yield


def _case_key(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "numel" not in params or os.path.dirname(str(item.path)) != HERE:
        return None
    return params["op"], params["direction"], params["dtype"], params["numel"]


def pytest_collection_modifyitems(session, config, items):
    """Runs the tests of one case back to back (each implementation alone,
    then the paired test), so they share the case's inputs, its torch.compile
    and its warm-up instead of building them once per test."""
    order = {c: i for i, c in enumerate(cases.bench_cases(bench_device(config), config.getoption("--bench-mode")))}
    slots = [i for i, item in enumerate(items) if _case_key(item) in order]
    ordered = sorted((items[i] for i in slots), key=lambda item: order[_case_key(item)])  # stable: test_impl first
    for i, item in zip(slots, ordered):
        items[i] = item


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "dropout_ext": dropout_ext.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "pytest " + " ".join(sys.argv[1:]),
    }


def _machine(device: torch.device) -> dict:
    env = environment(device)
    return {k: v for k, v in env.items() if k not in ("date", "command")}


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    # Saved runs carry the device and versions, and --benchmark-compare warns
    # when a baseline was measured on another device, torch or thread count.
    machine_info["dropout_ext_bench"] = _machine(bench_device(config))


def _add_ratios(rows):
    by_case = {}
    for r in rows:
        by_case.setdefault((r["op"], r["direction"], r["dtype"], r["numel"]), {})[r["impl"]] = r
    copies = {(r["dtype"], r["numel"]): r for r in rows if r["impl"] == "copy"}
    for key, impls in by_case.items():
        copy = copies.get((key[2], key[3]))
        for r in impls.values():
            if r["impl"] == "copy":
                continue
            for base, field in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile"),
                                ("nn.Dropout", "speedup_vs_nn")):
                if base in impls:
                    r[field] = impls[base]["time_s"] / r["time_s"]
            if r.get("copy_time_s"):
                # the clone() timed in alternation with this op
                r["copy_gbps"] = r["copy_bytes"] / r["copy_time_s"] / 1e9
                r["time_over_copy"] = r["time_s"] / r["copy_time_s"]
            elif copy is not None:
                r["copy_gbps"] = copy["gbps"]
                r["time_over_copy"] = r["time_s"] / copy["time_s"]
            if "copy_gbps" in r:
                r["pct_of_copy"] = 100.0 * r["gbps"] / r["copy_gbps"]


def _table(rows) -> str:
    head = (f"{'op':24} {'dir':17} {'dtype':9} {'numel':>6} {'impl':27} {'time':>10} {'GB/s':>7} {'%copy':>6} "
            f"{'t/copy':>6} {'x eager':>8} {'x compile':>9} {'x nn':>6} {'launches':>8} {'saved B/el':>10}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["op"], r["direction"], r["dtype"], r["numel"], r["impl"])):
        t = r["time_s"]
        t_s = f"{t * 1e3:8.3f}ms" if t >= 1e-4 else f"{t * 1e6:8.2f}us"
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else "-"
        lines.append(f"{r['op']:24} {r['direction']:17} {r['dtype']:9} 2^{int(r['numel']).bit_length() - 1:<4} {r['impl']:27} "
                     f"{t_s:>10} {r['gbps']:7.1f} {f('pct_of_copy', '%5.0f%%'):>6} {f('time_over_copy', '%5.2fx'):>6} {f('speedup_vs_eager', '%7.2fx'):>8} "
                     f"{f('speedup_vs_compile', '%8.2fx'):>9} {f('speedup_vs_nn', '%5.2fx'):>6} "
                     f"{f('launches_per_call', '%8d'):>8} {f('saved_bytes_per_elem', '%10.2f'):>10}")
    return "\n".join(lines)


def _memory_table(rows) -> str:
    head = f"{'transformer block':20} {'step time':>10} {'x nn':>6} {'peak MiB':>9} {'x nn':>6} {'saved MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['peak_vs_nn']:5.2f}x" if r.get("peak_vs_nn") is not None else "-"
        lines.append(f"{r['variant']:20} {r['step_time_s'] * 1e3:8.1f}ms {r['speedup_vs_nn']:5.2f}x "
                     f"{r['peak_bytes'] / 2**20:9.1f} {ratio:>6} {r['saved_for_backward_bytes'] / 2**20:9.1f}")
    lines.append(f"peak: {rows[0]['peak_kind']}; saved: bytes autograd keeps for backward in one forward")
    return "\n".join(lines)


def _gpt2_table(rows) -> str:
    head = f"{'GPT-2 training step':20} {'step time':>10} {'x nn':>6} {'launches':>8} {'swapped':>7} {'fused':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["step_time_s"] is None:
            lines.append(f"{r['variant']:20} not run: {r['note']}")
            continue
        lines.append(f"{r['variant']:20} {r['step_time_s'] * 1e3:8.1f}ms {r['speedup_vs_nn']:5.2f}x "
                     f"{r['launches_per_step']:8d} {r['dropouts_swapped']:7d} {r['fused_modules']:5d}")
    cfg = rows[0]["config"]
    lines.append(f"median of {rows[0]['rounds']} paired rounds; {cfg['n_layer']} layers, width {cfg['n_embd']}, "
                 f"{cfg['n_head']} heads, vocabulary {cfg['vocab_size']}, batch {cfg['batch']} x {cfg['seq']} "
                 f"tokens, p {cfg['p']}, {cfg['optimizer']}; launches: device ops of one step")
    return "\n".join(lines)


def _shard_table(rows) -> str:
    head = f"{'sharded call':20} {'dir':17} {'numel':>6} {'layout':9} {'impl':10} {'time':>10} {'x unsharded':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:20} {r['direction']:17} 2^{int(r['numel']).bit_length() - 1:<4} {r['layout']:9} "
                     f"{r['impl']:10} {r['time_s'] * 1e3:8.3f}ms {r['over_unsharded']:10.3f}x")
    lines.append("the same local tensor with place= (sharded), without (unsharded), and its clone(), paired rounds")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS and not MEMORY_ROWS and not GPT2_ROWS and not SHARD_ROWS:
        return
    device = bench_device(config)
    _add_ratios(ROWS)
    env = environment(device)
    mode = config.getoption("--bench-mode")
    terminalreporter.write_sep("=", f"dropout_ext benchmark report: {env['device_name']} ({mode} run)")
    terminalreporter.write_line(f"torch {env['torch']}, triton {env['triton']}, threads {env['cpu_threads']}, {env['date']}")
    terminalreporter.write_line("time: median per call; GB/s: minimal bytes / time; %copy, t/copy: against "
                                "clone() of the same tensor; x eager / x compile / x nn: speedups over the eager composition, "
                                "torch.compile, nn.Dropout's module; launches: device ops of one call (dropout_ext.launches). "
                                "All implementations of a case and its "
                                "clone() are timed in alternation, round by round, in one test (test_paired); pytest-benchmark's "
                                "own tables are of each implementation timed alone (test_impl), grouped per case")
    if ROWS:
        terminalreporter.write_line(_table(ROWS))
    if MEMORY_ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line(_memory_table(MEMORY_ROWS))
    if GPT2_ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line(_gpt2_table(GPT2_ROWS))
    if SHARD_ROWS:
        terminalreporter.write_line("")
        terminalreporter.write_line(_shard_table(SHARD_ROWS))
    if cases.tiny(device, mode):
        return
    out = config.getoption("--bench-out")
    os.makedirs(out, exist_ok=True)
    tag = f"{device.type}-{mode}"
    path = os.path.join(out, f"bench-{tag}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": ROWS, "transformer_block": MEMORY_ROWS, "gpt2_step": GPT2_ROWS,
                   "sharded": SHARD_ROWS}, f, indent=1)
    terminalreporter.write_line(f"results: {path}")
    if not ROWS:
        return
    plot = os.path.join(os.path.dirname(__file__), "plot.py")
    proc = subprocess.run([sys.executable, plot, path, "--out", out], capture_output=True, text=True)
    terminalreporter.write_line(proc.stdout.strip() or proc.stderr.strip())
