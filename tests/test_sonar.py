"""A reduced Sonar experiment (examples/sonar.py): nn.Dropout and
dropout_ext.Dropout, on the same folds, initial weights and batch order,
reach accuracies that agree within sampling noise."""

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import sonar  # noqa: E402


def test_data_copy_is_the_documented_set():
    x, y = sonar.load(sonar.DEFAULT_DATA)
    assert x.shape == (208, 60) and int(y.sum()) == 111 and float(x.min()) >= 0 and float(x.max()) <= 1


def test_reduced_experiment_implementations_agree():
    """5 folds x 2 repeats of the hidden-dropout model, 60 epochs. The paired
    per-fold difference (same fold, same start, different masks) must have a
    mean within 4 standard errors of 0, and both must learn (> 65%)."""
    results = sonar.run(epochs=60, folds=5, repeats=2, models=("dropout_hidden",), seed=3)
    a = results["dropout_hidden"]["nn.Dropout"]
    b = results["dropout_hidden"]["dropout_ext.Dropout"]
    diffs = [u - v for u, v in zip(a, b)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    assert abs(statistics.mean(diffs)) <= 4 * se + 0.02, (a, b)
    assert statistics.mean(a) > 0.65 and statistics.mean(b) > 0.65, (a, b)
    print("\n" + sonar.table(results))
