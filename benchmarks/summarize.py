"""Markdown tables of a benchmark JSON (the form BENCHMARKS.md quotes): the
targets, every implementation at one size, the per-call table of a run that
timed nn.Dropout's module (the small run: instead of the one-size table),
the transformer block and the GPT-2 training step.

    python benchmarks/summarize.py benchmarks/results/<run>/bench-cpu-default.json [--numel 16777216]
"""

import argparse
import json


def _get(rows, key):
    return next((r for r in rows if (r["op"], r["direction"], r["dtype"], r["numel"], r["impl"]) == key), None)


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


# (op, direction, what is compared, the bound): the targets of the fused
# dropout + residual + LayerNorm, stated for 16384 x 1024 on 2 CPU threads.
# "x compile" / "x eager": dropout_ext's speedup must reach the bound;
# "saved": its saved bytes per element must not exceed torch.compile's.
TARGETS = [
    ("dropout_add_norm", "forward_backward", "x compile", 2.0),
    ("dropout_add_norm", "forward", "x eager", 3.0),
    ("dropout_add_norm", "forward", "saved", None),
]


def _targets(rows, numel, impls):
    """The TARGETS rows measured in this run, per dtype and dropout_ext implementation."""
    out = []
    for op, direction, what, bound in TARGETS:
        for dtype in sorted({r["dtype"] for r in rows if r["op"] == op}, key=lambda d: d != "float32"):
            comp = _get(rows, (op, direction, dtype, numel, "torch.compile"))
            eager = _get(rows, (op, direction, dtype, numel, "eager"))
            for impl in impls:
                r = _get(rows, (op, direction, dtype, numel, impl))
                if r is None:
                    continue
                if what == "saved":
                    ours, theirs = r.get("saved_bytes_per_elem"), comp and comp.get("saved_bytes_per_elem")
                    name = f"{op} saves no more bytes per element than `torch.compile`"
                    shown = f"**{_fmt(ours, '.2f')}** vs {_fmt(theirs, '.2f')}"
                    met = None if ours is None or theirs is None else ours <= theirs
                else:
                    base, field = (comp, "speedup_vs_compile") if what == "x compile" else (eager, "speedup_vs_eager")
                    ratio = r.get(field)
                    name = f"{op} {direction} >= {bound:g}x {'`torch.compile`' if what == 'x compile' else 'eager'}"
                    shown = (f"{r['time_s'] * 1e3:.1f} ms vs {_fmt(base and base['time_s'] * 1e3, '.1f')} ms: "
                             f"**{_fmt(ratio, '.2f', 'x')}**")
                    met = None if ratio is None else ratio >= bound
                out.append((name, dtype, impl, shown, {True: "yes", False: "no", None: "-"}[met]))
    return out


def _cases(rows, numel):
    """The targets, then every op, direction and dtype at ``numel``."""
    impls = sorted({r["impl"] for r in rows if r["impl"].startswith("dropout_ext")})
    targets = _targets(rows, numel, impls)
    if targets:
        print(f"| target (2**{numel.bit_length() - 1} elements) | dtype | impl | measured | met |")
        print("| --- | --- | --- | --- | --- |")
        for row in targets:
            print("| " + " | ".join(row) + " |")
        print()
    print("| op | direction | dtype | impl | time ms | eager ms | compile ms | x eager | x compile | t/copy | "
          "saved B/el (ours / eager / compile) |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    keys = sorted({(r["op"], r["direction"], r["dtype"]) for r in rows if r["impl"] != "copy"},
                  key=lambda k: (k[0] != "dropout", k[0], ("forward", "backward", "forward_backward").index(k[1]),
                                 k[2] != "float32"))
    for op, direction, dtype in keys:
        eager = _get(rows, (op, direction, dtype, numel, "eager"))
        comp = _get(rows, (op, direction, dtype, numel, "torch.compile"))
        for impl in impls:
            r = _get(rows, (op, direction, dtype, numel, impl))
            if r is None:
                continue
            saved = " / ".join(_fmt(x and x.get("saved_bytes_per_elem"), ".2f") for x in (r, eager, comp))
            print(f"| {op} | {direction} | {dtype} | {impl} | {r['time_s'] * 1e3:.1f} | "
                  f"{_fmt(eager and eager['time_s'] * 1e3, '.1f')} | {_fmt(comp and comp['time_s'] * 1e3, '.1f')} | "
                  f"{_fmt(r.get('speedup_vs_eager'), '.2f', 'x')} | {_fmt(r.get('speedup_vs_compile'), '.2f', 'x')} | "
                  f"{_fmt(r.get('time_over_copy'), '.2f', 'x')} | {saved} |")


def _per_call(rows):
    """Every size of the cases that timed nn.Dropout's module: microseconds
    per call, the speedup over nn.Dropout, the device ops of a call."""
    keys = sorted({(r["op"], r["direction"], r["dtype"]) for r in rows if r["impl"] == "nn.Dropout"})
    print("| op | direction | dtype | elements | impl | us per call | x nn.Dropout | launches |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for op, direction, dtype in keys:
        for r in sorted((r for r in rows if (r["op"], r["direction"], r["dtype"]) == (op, direction, dtype)
                         and r["impl"] != "copy"), key=lambda r: (r["numel"], r["impl"])):
            print(f"| {op} | {direction} | {dtype} | {r['numel']:,} | {r['impl']} | {r['time_s'] * 1e6:.1f} | "
                  f"{_fmt(r.get('speedup_vs_nn'), '.2f', 'x')} | {_fmt(r.get('launches_per_call'), 'd')} |")


def _gpt2(rows):
    if not rows:
        return
    print("\n| GPT-2 training step | median | x nn.Dropout | launches per step | dropouts swapped | fused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["step_time_s"] is None:
            print(f"| {r['variant']} | not run: {r['note']} | | | | |")
            continue
        print(f"| {r['variant']} | {r['step_time_s'] * 1e3:.1f} ms | {r['speedup_vs_nn']:.2f}x | "
              f"{r['launches_per_step']} | {r['dropouts_swapped']} | {r['fused_modules']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--numel", type=int, default=None, help="the size to tabulate (default: the largest)")
    args = ap.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    env, rows = data["environment"], data["rows"]
    print(f"{env['device_name']}, {env['cpu_threads']} threads, torch {env['torch']}, {env['date']}")
    print(f"command: `{env['command']}`\n")
    if any(r["impl"] == "nn.Dropout" for r in rows):
        _per_call(rows)  # the per-call cost, at every size
    elif rows:
        _cases(rows, args.numel or max(r["numel"] for r in rows))
    block = data.get("transformer_block") or []
    if block:
        print("\n| variant | step time | x nn | peak memory | x nn | saved for backward |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in block:
            print(f"| {r['variant']} | {r['step_time_s'] * 1e3:.1f} ms | {r['speedup_vs_nn']:.2f}x | "
                  f"{r['peak_bytes'] / 2**20:.1f} MiB | {_fmt(r.get('peak_vs_nn'), '.2f', 'x')} | "
                  f"{r['saved_for_backward_bytes'] / 2**20:.1f} MiB |")
    _gpt2(data.get("gpt2_step") or [])


if __name__ == "__main__":
    main()
