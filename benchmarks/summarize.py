"""Markdown tables of a benchmark JSON (the form BENCHMARKS.md quotes).

    python benchmarks/summarize.py benchmarks/results/<run>/bench-cpu-default.json [--numel 16777216]
"""

import argparse
import json


def _get(rows, key):
    return next((r for r in rows if (r["op"], r["direction"], r["dtype"], r["numel"], r["impl"]) == key), None)


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--numel", type=int, default=None, help="the size to tabulate (default: the largest)")
    args = ap.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    env, rows = data["environment"], data["rows"]
    numel = args.numel or max(r["numel"] for r in rows)
    print(f"{env['device_name']}, {env['cpu_threads']} threads, torch {env['torch']}, {env['date']}")
    print(f"command: `{env['command']}`\n")
    impls = sorted({r["impl"] for r in rows if r["impl"].startswith("dropout_ext")})
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
    block = data.get("transformer_block") or []
    if block:
        print("\n| variant | step time | x nn | peak memory | x nn | saved for backward |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in block:
            print(f"| {r['variant']} | {r['step_time_s'] * 1e3:.1f} ms | {r['speedup_vs_nn']:.2f}x | "
                  f"{r['peak_bytes'] / 2**20:.1f} MiB | {_fmt(r.get('peak_vs_nn'), '.2f', 'x')} | "
                  f"{r['saved_for_backward_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
