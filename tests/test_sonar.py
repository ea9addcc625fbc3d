"""A reduced Sonar experiment (examples/sonar.py): nn.Dropout and
dropout_ext.Dropout, on the same folds, initial weights and batch order,
reach accuracies that agree within sampling noise, and their dropout layers
do what a dropout of their p does (training_checks.DropoutRecorder); a
deliberately broken dropout fails that check."""

import os
import statistics
import sys

import pytest

from training_checks import BrokenDropout, DropoutRecorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import sonar  # noqa: E402


def test_data_copy_is_the_documented_set():
    x, y = sonar.load(sonar.DEFAULT_DATA)
    assert x.shape == (208, 60) and int(y.sum()) == 111 and float(x.min()) >= 0 and float(x.max()) <= 1


def _run(impls, **kw):
    """sonar.run of the hidden-dropout model with each implementation's
    layers watched (their first 400 calls, some 137,000 live elements):
    ({name: accuracies}, {name: DropoutRecorder})."""
    recorders = {name: DropoutRecorder(max_calls=400) for name in impls}
    watched = {name: (lambda p, make=make, rec=recorders[name]: rec.watch(make(p))) for name, make in impls.items()}
    results = sonar.run(models=("dropout_hidden",), impls=watched, **kw)
    return results["dropout_hidden"], recorders


def _check(accuracies, recorder):
    """An implementation's dropout layers behave as a dropout of their p,
    and it learns (> 65%, where the data's majority class is 53%)."""
    recorder.check()
    assert statistics.mean(accuracies) > 0.65, accuracies


def test_reduced_experiment_implementations_agree():
    """5 folds x 2 repeats of the hidden-dropout model, 60 epochs. The paired
    per-fold difference (same fold, same start, different masks) must have a
    mean within 4 standard errors of 0 (a t of 4 with 9 degrees of freedom:
    p = 0.003), with 0.02 more, under half of one test sample's 1/21 of a
    fold's accuracy, for folds whose differences happen to come out nearly
    alike."""
    results, recorders = _run(sonar.IMPLS, epochs=60, folds=5, repeats=2, seed=3)
    a, b = results["nn.Dropout"], results["dropout_ext.Dropout"]
    diffs = [u - v for u, v in zip(a, b)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    assert abs(statistics.mean(diffs)) <= 4 * se + 0.02, (a, b)
    for name in sonar.IMPLS:
        _check(results[name], recorders[name])
    print("\n" + sonar.table({"dropout_hidden": results}))


CAUGHT_BY = {"p ignored": "dropped fraction", "half p": "dropped fraction", "no scale": "not input \\* 1/\\(1 - p\\)",
             "shared mask": "the rows share masks"}


@pytest.mark.parametrize("kind", BrokenDropout.KINDS)
def test_the_check_fails_for_a_broken_dropout(kind):
    """The check against a broken dropout, on a short run (2 folds, 3
    epochs): it fails, on the statistic that the mistake moves."""
    results, recorders = _run({kind: lambda p: BrokenDropout(p, kind)}, epochs=3, folds=2, repeats=1, seed=3)
    with pytest.raises(AssertionError, match=CAUGHT_BY[kind]):
        _check(results[kind], recorders[kind])
