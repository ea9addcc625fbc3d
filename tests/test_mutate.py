"""tools/mutate.py's mutations still apply to the sources as they are: each
edit's text occurs exactly once, so the check cannot silently stop
mutating anything, and each names tests that exist. Nothing is built or run."""

import importlib.util
import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    path = os.path.join(ROOT, "tools", "mutate.py")
    spec = importlib.util.spec_from_file_location("mutate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mutate = _tool()


@pytest.mark.parametrize("m", mutate.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_once_and_names_existing_tests(m):
    files = mutate.mutated_sources(m, ROOT)
    assert all(original != mutated for original, mutated in files.values()), m.name
    paths = [a.split("::")[0] for a in m.tests if a.startswith("tests/")]
    assert paths and all(os.path.exists(os.path.join(ROOT, p)) for p in paths), m.tests


def test_mutations_are_named_once_and_reach_the_kernels():
    names = [m.name for m in mutate.MUTATIONS]
    assert len(names) == len(set(names))
    assert sum(m.needs_build for m in mutate.MUTATIONS) >= 3


@pytest.mark.parametrize("text,count", [("a b", 0), ("x x", 2)])
def test_an_edit_that_does_not_match_once_stops_naming_the_mutation(text, count):
    edit = mutate.Edit("f.py", "x", "y")
    with pytest.raises(mutate.MutationError, match=f"mutation broken: the text to replace occurs {count} times"):
        mutate.apply_edit(text, edit, "broken")


def test_failing_tests_are_read_from_the_junit_report(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.test_a" name="test_ok" file="tests/test_a.py"/>
          <testcase classname="tests.test_a" name="test_bad[x-1]" file="tests/test_a.py"><failure/></testcase>
          <testcase classname="tests.test_a.TestC" name="test_err" file="tests/test_a.py"><error/></testcase>
        </testsuite></testsuites>"""))
    assert mutate.failing_tests(str(report)) == ["tests/test_a.py::test_bad[x-1]", "tests/test_a.py::TestC::test_err"]


def test_failing_cases_are_counted_per_test_function():
    ids = ["t.py::f[a]", "t.py::g", "t.py::f[b]"]
    assert mutate.by_function(ids) == [("t.py::f", 2), ("t.py::g", 1)]
