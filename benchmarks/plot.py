"""Plots of a benchmark JSON: GB/s against size, one panel per op and
direction, one line per implementation, the measured copy bandwidth as the
ceiling.

    python benchmarks/plot.py benchmarks/results/latest/bench-cpu-default.json --out DIR
"""

import argparse
import json
import os
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    with open(args.json) as f:
        data = json.load(f)
    env, rows = data["environment"], data["rows"]
    out = args.out or os.path.dirname(args.json)
    os.makedirs(out, exist_ok=True)
    # The ceiling of a panel is the clone() timed in alternation with its own
    # case; results written before clone() was paired per case have one
    # clone() row per dtype and size (op "copy") instead.
    copy = defaultdict(dict)
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["impl"] == "copy":
            copy[(r["dtype"], r["op"], r["direction"])][r["numel"]] = r["gbps"]
        else:
            panels[(r["dtype"], r["op"], r["direction"])][r["impl"]].append((r["numel"], r["gbps"]))
    written = []
    for dtype in sorted({k[0] for k in panels}):
        keys = sorted(k for k in panels if k[0] == dtype)
        ops = sorted({k[1] for k in keys})
        dirs = ["forward", "backward", "forward_backward"]
        fig, axes = plt.subplots(len(ops), 3, figsize=(15, 3.6 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for j, d in enumerate(dirs):
                ax = axes[i][j]
                for impl, pts in sorted(panels.get((dtype, op, d), {}).items()):
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                ceiling = copy.get((dtype, op, d)) or copy.get((dtype, "copy", "forward"))
                if ceiling:
                    xs = sorted(ceiling)
                    ax.plot(xs, [ceiling[x] for x in xs], "k--", label="copy (clone)")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{op} {d} ({dtype})", fontsize=9)
                ax.set_xlabel("elements")
                ax.set_ylabel("GB/s (minimal bytes)")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:  # a -k subset leaves panels empty
                    ax.legend(fontsize=7)
        fig.suptitle(f"{env['device_name']} - torch {env['torch']} - {env['date']}", fontsize=10)
        fig.tight_layout()
        name = os.path.join(out, os.path.basename(args.json).replace(".json", f"-{dtype}.png"))
        fig.savefig(name, dpi=80)
        plt.close(fig)
        written.append(name)
    print("plots: " + ", ".join(written))


if __name__ == "__main__":
    main()
