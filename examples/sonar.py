"""The classic dropout experiment on the Sonar (rocks vs mines) data, run with
torch.nn.Dropout and with dropout_ext.Dropout side by side.

A 60-60-30-1 MLP (ReLU, sigmoid output), SGD (lr 0.01, momentum 0.8), 300
epochs, batch 16, inputs standardised with each training fold's statistics,
10-fold stratified cross-validation; three models: no dropout, dropout 0.2 on
the input, dropout 0.2 after each hidden layer. Both implementations see the
same folds, the same initial weights and the same batch order, so they differ
only in their masks.

    python examples/sonar.py [--data examples/data/sonar.csv] [--epochs 300] [--folds 10] [--repeats 1]
"""

import argparse
import csv
import os
import statistics
import time

import torch
from torch import nn

import dropout_ext

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "sonar.csv")
MODELS = ("baseline", "dropout_input", "dropout_hidden")
IMPLS = {"nn.Dropout": nn.Dropout, "dropout_ext.Dropout": dropout_ext.Dropout}


def load(path):
    features, labels = [], []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            features.append([float(v) for v in row[:60]])
            labels.append(1.0 if row[60].strip() == "M" else 0.0)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32)


def stratified_folds(labels, k, generator):
    """k folds with each class spread evenly: indices of each class shuffled,
    then dealt round-robin."""
    folds = [[] for _ in range(k)]
    for cls in (0.0, 1.0):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        for j, i in enumerate(idx.tolist()):
            folds[j % k].append(i)
    return [torch.tensor(sorted(f)) for f in folds]


def build(kind, drop):
    layers = []
    if kind == "dropout_input":
        layers.append(drop(0.2))
    layers += [nn.Linear(60, 60), nn.ReLU()]
    if kind == "dropout_hidden":
        layers.append(drop(0.2))
    layers += [nn.Linear(60, 30), nn.ReLU()]
    if kind == "dropout_hidden":
        layers.append(drop(0.2))
    layers += [nn.Linear(30, 1)]
    return nn.Sequential(*layers)


def fold_accuracy(kind, drop, x, y, train_idx, test_idx, epochs, seed):
    torch.manual_seed(seed)  # same initial weights for both implementations
    model = build(kind, drop)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-6)
    xt, yt = (x[train_idx] - mean) / std, y[train_idx]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.8)
    order = torch.Generator().manual_seed(seed)  # same batch order for both
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(train_idx), generator=order)
        for start in range(0, len(perm), 16):
            b = perm[start:start + 16]
            opt.zero_grad()
            loss_fn(model(xt[b]).squeeze(-1), yt[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model((x[test_idx] - mean) / std).squeeze(-1) > 0
    return (pred.float() == y[test_idx]).float().mean().item()


def run(data=DEFAULT_DATA, epochs=300, folds=10, repeats=1, models=MODELS, seed=7, impls=IMPLS):
    """{model: {impl: [accuracy per fold and repeat]}}; ``impls`` maps a name
    to the dropout class (anything called with p that returns a module)."""
    x, y = load(data)
    results = {m: {name: [] for name in impls} for m in models}
    for r in range(repeats):
        split = stratified_folds(y, folds, torch.Generator().manual_seed(seed + r))
        for f, test_idx in enumerate(split):
            train_idx = torch.cat([s for j, s in enumerate(split) if j != f])
            for m in models:
                for name, drop in impls.items():
                    acc = fold_accuracy(m, drop, x, y, train_idx, test_idx, epochs, seed * 1000 + r * 100 + f)
                    results[m][name].append(acc)
    return results


def table(results):
    lines = [f"{'model':16} " + "  ".join(f"{name:>22}" for name in IMPLS)]
    for m, per in results.items():
        cells = []
        for name in IMPLS:
            accs = per[name]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(accs):6.1f}% (sd {100 * sd:4.1f})".rjust(22))
        lines.append(f"{m:16} " + "  ".join(cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args.data, args.epochs, args.folds, args.repeats)
    print(f"Sonar, {args.folds}-fold stratified CV x {args.repeats}, {args.epochs} epochs: mean accuracy (sd over folds)")
    print(table(results))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
