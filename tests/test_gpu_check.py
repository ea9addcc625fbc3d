"""tools/gpu_check.sh, the one-command first run on a GPU machine, checked
where no GPU is needed: its plan (--dry-run) fits a short lease's budget,
bad options get a clear error, the run stops at its first step without a GPU
(CUDA_VISIBLE_DEVICES="" hides any) and writes its summary, and its
benchmark steps select the key cases."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
PRIORITY = ["stamp", "build", "quick", "memcheck", "bench", "block"]
OPTIONAL = ["racecheck", "initcheck", "tests", "memcheck-full", "sweep"]
LEASE_BUDGET_S = 480  # 8 minutes of a 15-minute lease, the machine's start and a rerun left over


def gpu_check(*args, timeout=60):
    # PYTHON: the interpreter running these tests; no GPU is visible, whatever the machine.
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def plan(*args):
    proc = gpu_check("--dry-run", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_default_plan_fits_the_lease():
    p = plan()
    assert p["budget_s"] == LEASE_BUDGET_S
    steps = p["steps"]
    assert [s["step"] for s in steps if s["priority"]] == PRIORITY
    assert [s["step"] for s in steps if not s["priority"]] == OPTIONAL
    total = 0
    for s in steps[:len(PRIORITY)]:
        assert s["limit_s"] > p["grace_s"], s
        total += s["limit_s"]
        assert s["cumulative_s"] == total, s
    assert total == p["priority_total_s"] <= LEASE_BUDGET_S
    for s in steps[len(PRIORITY):]:
        assert s["cumulative_s"] is None, s
    # The sweep takes what the budget has left, the others a limit of their own.
    assert [s["step"] for s in steps if s["limit_s"] is None] == ["sweep"]


def test_text_plan_lists_each_step_with_its_limit_and_total():
    proc = gpu_check("--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    total = 0
    for s in plan()["steps"]:
        row = lines[s["step"]]
        if s["priority"]:
            total += s["limit_s"]
            assert row[1:3] == [f"{s['limit_s']}s", f"{total}s"], row
        else:
            assert row[1] == (f"{s['limit_s']}s" if s["limit_s"] else "rest"), row
    assert f"priority steps: {total}s of the {LEASE_BUDGET_S}s budget" in proc.stdout


def test_plan_follows_budget_limit_and_skip():
    p = plan("--budget", "300", "--limit", "build=250", "--skip", "memcheck", "--limit", "sweep=900")
    steps = {s["step"]: s for s in p["steps"]}
    assert p["budget_s"] == 300
    assert steps["build"]["limit_s"] == 250 and steps["sweep"]["limit_s"] == 900
    assert steps["memcheck"]["skipped"] and steps["memcheck"]["cumulative_s"] is None
    assert p["priority_total_s"] == sum(s["limit_s"] for s in p["steps"] if s["priority"] and not s["skipped"])
    text = gpu_check("--dry-run", "--budget", "300", "--limit", "build=250").stdout
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "past the budget" not in rows["build"]  # 30 + 250 s
    assert "past the budget" in rows["quick"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "soon"], "--budget must be a whole number of seconds above 0, got 'soon'"),
    (["--budget", "0"], "--budget must be a whole number of seconds above 0, got '0'"),
    (["--budget"], "--budget needs a value"),
    (["--limit", "build"], "--limit takes STEP=SECONDS, got 'build'"),
    (["--limit", "compile=60"], "--limit: unknown step 'compile'"),
    (["--limit", "build=5"], "--limit build: the limit must be a whole number of seconds above 10, got '5'"),
    (["--skip", "benchmarks"], "--skip: unknown step 'benchmarks'"),
    (["--skip", "stamp"], "--skip: the stamp step cannot be skipped"),
    (["--json"], "--json goes with --dry-run"),
    (["--fast"], "unknown option '--fast'"),
    (["out1", "out2"], "one output folder only, got 'out1' and 'out2'"),
])
def test_bad_options(args, message, tmp_path):
    proc = gpu_check(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""  # nothing ran
    assert not any(tmp_path.iterdir())


def _summary(out):
    assert (out / "summary.txt").is_file()
    return {s["step"]: s["result"] for s in json.loads((out / "summary.json").read_text())["steps"]}


def test_stops_without_a_gpu(tmp_path):
    out = tmp_path / "gpu"
    proc = gpu_check(str(out), timeout=120)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no GPU: torch" in proc.stdout and "stopping: no GPU" in proc.stdout
    results = _summary(out)
    assert results["stamp"] == "no GPU"
    assert all(results[s] == "not run: no GPU" for s in PRIORITY[1:] + OPTIONAL)
    assert "no GPU" in (out / "stamp.log").read_text()
    env = json.loads((out / "environment.json").read_text())
    assert env["gpu_visible"] is False and env["torch"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_step_without_its_whole_limit_left_is_skipped(tmp_path):
    out = tmp_path / "gpu"
    proc = gpu_check("--budget", "20", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = _summary(out)
    # The budget's clock starts with the script: under load a second may pass
    # before the first step asks what is left.
    left = re.fullmatch(r"skipped: needs 30s, (\d+)s of the budget left", results["stamp"])
    assert left is not None and 15 <= int(left.group(1)) <= 20, results["stamp"]
    assert results["build"] == "not run: the stamp step did not pass"


# Collects benchmarks/ once per step's arguments, in one process (torch is
# imported once); prints {step: [exit status, test ids]} as its last line.
_COLLECT = """
import json, sys
import pytest

class Ids:
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid.split("::", 1)[1] for item in session.items]

found = {}
for step, args in json.loads(sys.argv[1]).items():
    ids = Ids()
    status = pytest.main(["benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[ids])
    found[step] = [int(status), ids.ids]
print(json.dumps(found))
"""


def test_benchmark_steps_select_the_key_cases():
    """The cases each benchmark step's own arguments (from the plan) select
    on a GPU, collected here without one."""
    args = {}
    for s in plan()["steps"]:
        run = s["run"].split()
        if run[0] == "step_benchmarks":
            assert run[1] == s["step"]  # its results folder
            args[s["step"]] = [f"--bench-mode={run[2]}", "--bench-device=cuda", *run[3:]]
    assert set(args) == {"bench", "block", "sweep"}
    del args["sweep"]  # the whole suite
    proc = subprocess.run([sys.executable, "-c", _COLLECT, json.dumps(args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["bench"] == [0, [f"test_paired[{op}-forward_backward-bfloat16-{size}]"
                                  for op in ("dropout", "bias_gelu_dropout", "dropout_add_norm")
                                  for size in ("16Mi", "256Mi")]]
    assert found["block"] == [0, ["test_transformer_block_memory"]]
