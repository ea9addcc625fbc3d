"""How much of an op's time on the CPU is its fresh output's first touch.

A new tensor of many MiB comes from fresh pages that the kernel maps and
zeroes on first write; an op that allocates its output pays that on every
call, whatever its arithmetic. This times `clone()` (allocate, then copy)
against `copy_()` into a tensor already touched, and a bare `empty().fill_()`.
Run it with and without `THP_MEM_ALLOC_ENABLE=1` (PyTorch's huge-page
allocation) to see how much of the cost is per page.

    python benchmarks/first_touch.py [--numel N] [--threads T] [--rounds R]
"""

import argparse
import statistics
import time

import torch


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel)
    out = torch.empty_like(x).fill_(0)
    cases = {
        "clone() (fresh output)": lambda: x.clone(),
        "copy_() into a touched tensor": lambda: out.copy_(x),
        "empty().fill_() (fresh, write only)": lambda: torch.empty(args.numel).fill_(1),
    }
    for name, fn in cases.items():
        fn()  # warm-up
    print(f"float32, {args.numel} elements, {args.threads} threads, median of {args.rounds} rounds")
    for name, fn in cases.items():
        print(f"{name:40s} {median_ms(fn, args.rounds):8.1f} ms")


if __name__ == "__main__":
    main()
