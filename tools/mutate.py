#!/usr/bin/env python3
"""The mutation check: deliberate breakages of the kernels, the reference and
the public API, each applied alone to a copy of the checkout, and the tests
that catch each. A breakage no test catches is a hole in the suite.

    python tools/mutate.py                 # every mutation, each with its own tests
    python tools/mutate.py --list          # the mutations, checked to apply
    python tools/mutate.py --only NAME     # one mutation (repeatable)
    python tools/mutate.py --tests tests   # every mutation against the whole suite
    python tools/mutate.py --keep          # leave the copy for inspection

The checkout is never modified. Its files (tracked and untracked but not
ignored) and its built extension are copied into a temporary folder; each
mutation replaces one exact text (found exactly once, or the run stops
naming the mutation) in that copy, rebuilds the extension there when a C++
source changed, runs the mutation's tests with the copy as the working
directory (so the copy's package is imported) and restores the copy. The
table at the end gives, per mutation, whether it was caught, how many tests
failed and the first of them; the exit status is 1 when a mutation survives.

The copy builds the CPU kernels only (DROPOUT_EXT_NO_CUDA=1): the host driver
that runs the CUDA kernels on the CPU (csrc/cuda_host) is part of every
build, so a mutation of the CUDA kernels reaches tests/test_cuda_host.py
without a CUDA toolkit. The first C++ mutation builds the unmutated copy
once (minutes); later ones recompile only the objects the changed file
reaches, and the unmutated build comes back from a snapshot, not a rebuild.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP_SUFFIXES = (".h", ".cpp", ".cu", ".cuh", ".inc")
# Test functions shown per mutation in the table.
SHOWN = 4


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the checkout
    old: str   # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    breaks: str                # what goes wrong, in one line
    edits: Tuple[Edit, ...]
    tests: Tuple[str, ...]     # the pytest arguments of the tests expected to catch it
    # environment variables those tests run with (None: unset), not applied to --tests
    env: Tuple[Tuple[str, Optional[str]], ...] = ()

    @property
    def where(self) -> str:
        return ", ".join(dict.fromkeys(e.path for e in self.edits))

    @property
    def needs_build(self) -> bool:
        return any(e.path.endswith(CPP_SUFFIXES) for e in self.edits)


def _one(path, old, new):
    return (Edit(path, old, new),)


MUTATIONS: Tuple[Mutation, ...] = (
    Mutation(
        "cpu_kept_scale",
        "the CPU kernels keep act(x) without the 1/(1-p) scale (forward and backward)",
        _one("csrc/cpu/elementwise.cpp",
             "a.scale = static_cast<acc_t>(mp.scale);",
             "a.scale = acc_t(1);"),
        ("tests/test_conformance.py", "-k", "test_forward_backward and cpu-"),
    ),
    Mutation(
        "cpu_bias_grad_zero",
        "the CPU backward returns a zero bias gradient",
        _one("csrc/cpu/elementwise.cpp",
             "db[hh] = static_cast<scalar_t>(s);",
             "db[hh] = static_cast<scalar_t>(acc_t(0));"),
        ("tests/test_conformance.py", "-k", "(test_forward_backward or test_packed_bits_read_back) and cpu-"),
    ),
    Mutation(
        "cuda_bias_grad_negated",
        "the CUDA bias-gradient kernel (run on the host) sums the negated dx, so the bias gradient is negated",
        _one("csrc/cuda/kernel_body.h",
             "static_cast<acc_t*>(a.partial)[static_cast<int64_t>(idx.block_y) * H + col] = s;",
             "static_cast<acc_t*>(a.partial)[static_cast<int64_t>(idx.block_y) * H + col] = -s;"),
        ("tests/test_cuda_host.py",),
    ),
    Mutation(
        "contract_ln2_hi_ulp",
        "LN2_HI (the Cody-Waite split of exp) 1 ulp high, in the table and its generated header alike, "
        "so every backend and the reference move together",
        (Edit("dropout_ext/_contract.py", '("LN2_HI", "0x1.62e4p-1",', '("LN2_HI", "0x1.62e402p-1",'),
         Edit("csrc/activation_constants.h", "LN2_HI             = 0x1.62e4p-1f;",
              "LN2_HI             = 0x1.62e402p-1f;")),
        ("tests/test_activations.py", "tests/test_fusion.py", "tests/test_api.py",
         "tests/test_activation_constants.py"),
    ),
    Mutation(
        "cpu_norm_rstd_zero",
        "the CPU dropout_add_norm saves rstd = 0 (y itself is right; the backward then gets no gradient)",
        _one("csrc/cpu/norm.h",
             "a.rstd_out[r] = rstd;",
             "a.rstd_out[r] = acc_t(0);"),
        ("tests/test_norm.py", "-k", "cpu-"),
    ),
    Mutation(
        "cpu_mask_shared_by_rows",
        "the CPU kernels draw every row's keep bits from the first row's counters (one mask for all rows)",
        (Edit("csrc/cpu/elementwise.h",
              "const bool rowwise = BIAS || structured || partial != nullptr;",
              "const bool rowwise = true;"),
         Edit("csrc/cpu/elementwise.h",
              "philox_keep<I>(a.mp, g, len, keep);",
              "philox_keep<I>(a.mp, h, len, keep);")),
        ("tests/test_conformance.py", "tests/test_statistics.py", "-k",
         "(test_forward_backward and cpu-) or test_statistics"),
    ),
    Mutation(
        "cuda_blocks_per_sm",
        "the CUDA planner plans (and bounds) the elementwise kernels for 4 resident blocks per SM, not 2",
        _one("csrc/cuda/kernel_args.h",
             "return t == DType::kDouble && backward && a != Act::kIdentity ? 3 : 2;",
             "return t == DType::kDouble && backward && a != Act::kIdentity ? 3 : 4;"),
        ("tests/test_cuda_host.py", "tests/test_cuda_compile.py"),
    ),
    Mutation(
        "cpu_packed_complement",
        "the CPU kernels read the complement of the packed mask's bits",
        _one("csrc/cpu/elementwise.h",
             "return kDropMask | (0u - ((byte >> t) & 1u));",
             "return kDropMask | (0u - ((~byte >> t) & 1u));"),
        ("tests/test_conformance.py", "-k", "packed and cpu-"),
    ),
    Mutation(
        "reference_norm_backward_no_mean",
        "the reference's LayerNorm backward drops the mean(w * dy) term",
        _one("dropout_ext/reference.py",
             '    if norm == "layer":\n        dh = dh - gw.mean(-1, keepdim=True)\n',
             ""),
        ("tests/test_norm.py",),
    ),
    Mutation(
        "triton_norm_backward_no_mean",
        "the Triton LayerNorm backward drops the mean(w * dy) term",
        _one("dropout_ext/triton_kernels.py",
             "    if not RMS:\n        dh = dh - c2\n",
             ""),
        # The Triton cases of tests/test_triton_interpreter.py, run directly
        # (as it runs them), so the table names the cases that fail.
        ("tests/test_norm.py", "tests/triton_interpreted_cases.py", "-k", "norm"),
        env=(("TRITON_INTERPRET", "1"), ("DROPOUT_EXT_BACKEND", None)),
    ),
    Mutation(
        "cpu_shard_local_index",
        "a shard's CPU kernels draw each element at its local index: the place is ignored",
        _one("csrc/cpu/elementwise.h",
             "  return map.global(pos);",
             "  return pos;"),
        ("tests/test_conformance.py", "tests/test_place.py", "-k", "place and cpu- or test_place"),
    ),
    Mutation(
        "cuda_shard_runs_unmapped",
        "the CUDA kernels (run on the host) draw a strided shard's runs at their local indices",
        _one("csrc/cuda/kernel_body.h",
             "bits |= ungrouped_keep<E>(mp, g, run) << j;",
             "bits |= ungrouped_keep<E>(mp, e0 + j, run) << j;"),
        ("tests/test_conformance.py", "-k", "place and cuda_host"),
    ),
    Mutation(
        "dtensor_ignores_offsets",
        "a DTensor's shard is given the global shape with every start 0",
        _one("dropout_ext/sharding.py",
             "    words = list(input.shape) + list(offset)",
             "    words = list(input.shape) + [0] * len(offset)"),
        ("tests/test_sharding.py",),
    ),
    Mutation(
        "module_ignores_p",
        "Dropout (and LockedDropout) drops at 0.5 whatever its p, eager and compiled",
        _one("dropout_ext/modules.py",
             "F._broadcast_dropout(input, self._rate(input), self.training, self.inplace,",
             "F._broadcast_dropout(input, 0.5, self.training, self.inplace,"),
        ("tests/test_api.py", "tests/test_structured.py", "tests/test_gpt2.py", "tests/test_sonar.py"),
    ),
)


class MutationError(RuntimeError):
    """A mutation that cannot be applied or built: the run stops."""


def apply_edit(text: str, edit: Edit, mutation: str) -> str:
    """``text`` with ``edit`` applied; the old text must occur exactly once."""
    count = text.count(edit.old)
    if count != 1:
        raise MutationError(f"mutation {mutation}: the text to replace occurs {count} times in {edit.path} "
                            f"(must be exactly once), so the source changed under it:\n{edit.old}")
    return text.replace(edit.old, edit.new)


def mutated_sources(mutation: Mutation, root: str) -> Dict[str, Tuple[str, str]]:
    """{path: (original text, mutated text)} of the files ``mutation`` changes
    in the tree at ``root``; raises MutationError if an edit does not apply."""
    files: Dict[str, Tuple[str, str]] = {}
    for edit in mutation.edits:
        full = os.path.join(root, edit.path)
        if not os.path.isfile(full):
            raise MutationError(f"mutation {mutation.name}: {edit.path} does not exist")
        if edit.path not in files:
            with open(full, encoding="utf-8") as f:
                text = f.read()
            files[edit.path] = (text, text)
        original, current = files[edit.path]
        files[edit.path] = (original, apply_edit(current, edit, mutation.name))
    return files


def failing_tests(junit_xml: str) -> List[str]:
    """The ids of the failed and errored tests in a pytest JUnit XML report
    (xunit1: each test case names its file)."""
    ids = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        name = case.get("name", "")
        path = case.get("file")
        if path:
            module = os.path.splitext(path)[0].replace("/", ".").replace("\\", ".")
            cls = case.get("classname", "")
            inner = cls[len(module) + 1:] if cls.startswith(module + ".") else ""
            ids.append("::".join(filter(None, (path, inner, name))))
        else:
            ids.append(f"{case.get('classname', '')}::{name}")
    return ids


@dataclass
class Result:
    mutation: Mutation
    failed: List[str]
    summary: str
    seconds: float

    @property
    def caught(self) -> bool:
        return bool(self.failed)


def _files_to_copy(checkout: str) -> List[str]:
    try:
        out = subprocess.run(["git", "-C", checkout, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise MutationError(f"{checkout} is not a git checkout that git can list ({e})") from e
    names = [n for n in out.decode().split("\0") if n]
    return [n for n in names if os.path.isfile(os.path.join(checkout, n))]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Copy:
    """The checkout's copy the mutations are applied to, and its build."""

    def __init__(self, checkout: str, folder: str, jobs: int, log):
        self.checkout = checkout
        self.folder = folder
        self.tree = os.path.join(folder, "tree")
        self.snapshot = os.path.join(folder, "unmutated-build")
        self.jobs = jobs
        self.log = log
        self.built = False  # the copy holds its own build, snapshotted
        for name in _files_to_copy(checkout):
            dst = os.path.join(self.tree, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(checkout, name), dst)  # mtimes kept: ninja compares them
        for so in glob.glob(os.path.join(checkout, "dropout_ext", "_C*.so")):
            shutil.copy2(so, os.path.join(self.tree, "dropout_ext"))

    def extension(self) -> Optional[str]:
        found = glob.glob(os.path.join(self.tree, "dropout_ext", "_C*.so"))
        return found[0] if found else None

    def env(self, overrides=()) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no cached bytecode of a mutated module outlives it
        env["MAX_JOBS"] = str(self.jobs)
        env["DROPOUT_EXT_NO_CUDA"] = "1"
        env.pop("DROPOUT_EXT_FORCE_CUDA", None)
        for name, value in overrides:
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def build(self, what: str) -> None:
        # --force: setuptools skips the build when no .cpp is newer than the
        # extension, which misses a changed header; ninja still recompiles
        # only the objects whose inputs changed.
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]
        start = time.monotonic()
        log_path = os.path.join(self.folder, "build.log")
        with open(log_path, "a") as log:
            log.write(f"\n=== {what}\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=self.tree, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log_path) as log:
                tail = log.read()[-4000:]
            raise MutationError(f"building {what} failed (exit status {proc.returncode}); "
                                f"the end of {log_path}:\n{tail}")
        self.log(f"  built {what} in {time.monotonic() - start:.0f} s")

    def ensure_built(self) -> None:
        """The unmutated copy built once, and its build saved for restoring."""
        if self.built:
            return
        self.log("building the unmutated copy (once; minutes)")
        self.build("the unmutated copy")
        shutil.copytree(os.path.join(self.tree, "build"), os.path.join(self.snapshot, "build"), symlinks=True)
        shutil.copy2(self.extension(), self.snapshot)
        self.built = True

    def restore_build(self) -> None:
        shutil.rmtree(os.path.join(self.tree, "build"))
        shutil.copytree(os.path.join(self.snapshot, "build"), os.path.join(self.tree, "build"), symlinks=True)
        so = self.extension()
        shutil.copy2(os.path.join(self.snapshot, os.path.basename(so)), so)

    def check_import(self) -> None:
        """The copy's package is the one the tests import from the copy."""
        proc = subprocess.run([sys.executable, "-c", "import os, dropout_ext; "
                               "print(os.path.dirname(os.path.realpath(dropout_ext.__file__)))"],
                              cwd=self.tree, env=self.env(), capture_output=True, text=True)
        want = os.path.realpath(os.path.join(self.tree, "dropout_ext"))
        if proc.returncode != 0 or proc.stdout.strip() != want:
            raise MutationError(f"the copy's tests would not import the copy's dropout_ext (got "
                                f"{proc.stdout.strip() or proc.stderr[-2000:]!r}, want {want})")

    def run_tests(self, args: Sequence[str], tag: str, env=()) -> Tuple[List[str], str]:
        """(failing test ids, pytest's last line) of ``args`` run in the copy."""
        xml = os.path.join(self.folder, f"{tag}.xml")
        cmd = [sys.executable, "-m", "pytest", *args, "-q", "--tb=no", "-p", "no:cacheprovider",
               "-o", "junit_family=xunit1", f"--junitxml={xml}"]
        with open(os.path.join(self.folder, f"{tag}.log"), "w") as log:
            proc = subprocess.run(cmd, cwd=self.tree, env=self.env(env), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            log.write(proc.stdout)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        summary = lines[-1].strip("= ") if lines else ""
        if proc.returncode not in (0, 1) or not os.path.exists(xml):
            # 2: interrupted or a collection error, 5: nothing selected. A
            # collection error is a failure the mutation caused; nothing
            # selected is a selection that no longer matches the suite.
            if proc.returncode == 5:
                raise MutationError(f"{tag}: pytest selected no test with {shlex.join(args)}")
            if not os.path.exists(xml):
                raise MutationError(f"{tag}: pytest exited with {proc.returncode} and no report:\n"
                                    + proc.stdout[-3000:])
        return failing_tests(xml), summary

    def run(self, mutation: Mutation, tests: Optional[Sequence[str]], unmutated_failures: Sequence[str]) -> Result:
        start = time.monotonic()
        files = mutated_sources(mutation, self.tree)
        stats = {p: os.stat(os.path.join(self.tree, p)) for p in files}
        if mutation.needs_build:
            self.ensure_built()
            before = _digest(self.extension())
        try:
            for path, (_, mutated) in files.items():
                with open(os.path.join(self.tree, path), "w", encoding="utf-8") as f:
                    f.write(mutated)
            if mutation.needs_build:
                self.build(f"mutation {mutation.name}")
                if _digest(self.extension()) == before:
                    raise MutationError(f"mutation {mutation.name}: the extension built with it is the unmutated "
                                        "one, byte for byte (the edit changes no code that is compiled)")
            failed, summary = (self.run_tests(tests, mutation.name) if tests else
                               self.run_tests(mutation.tests, mutation.name, mutation.env))
        finally:
            for path, (original, _) in files.items():
                full = os.path.join(self.tree, path)
                with open(full, "w", encoding="utf-8") as f:
                    f.write(original)
                # The original mtime: with the unmutated objects restored,
                # ninja then sees nothing to rebuild.
                os.utime(full, ns=(stats[path].st_atime_ns, stats[path].st_mtime_ns))
            if mutation.needs_build and self.built:
                self.restore_build()
        failed = [t for t in failed if t not in set(unmutated_failures)]
        return Result(mutation, failed, summary, time.monotonic() - start)


def by_function(ids: Sequence[str]) -> List[Tuple[str, int]]:
    """(test function, failing cases) in the order of first failure: the
    parametrised cases of one function counted together."""
    counts: Dict[str, int] = {}
    for test in ids:
        function = test.split("[", 1)[0]
        counts[function] = counts.get(function, 0) + 1
    return list(counts.items())


def table(results: Sequence[Result]) -> str:
    rows = [("mutation", "where", "caught", "failing", "failing tests (cases)", "seconds")]
    for r in results:
        functions = by_function(r.failed)
        shown = "; ".join(f"{f} ({n})" for f, n in functions[:SHOWN])
        shown += f"; {len(functions) - SHOWN} more" if len(functions) > SHOWN else ""
        rows.append((r.mutation.name, r.mutation.where, "yes" if r.caught else "NO", str(len(r.failed)),
                     shown or "-", f"{r.seconds:.0f}"))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows[:1] + [("---",) * 6] + rows[1:])


def select(names: Optional[Sequence[str]]) -> List[Mutation]:
    if not names:
        return list(MUTATIONS)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MutationError(f"--only: no mutation named {', '.join(unknown)} (--list shows them)")
    return [known[n] for n in names]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutations (each checked to apply) and stop")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation only (repeatable)")
    parser.add_argument("--tests", metavar="ARGS",
                        help="pytest arguments run for every mutation instead of its own tests, e.g. 'tests'")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the tests unmutated; tests failing there do not count as catches")
    parser.add_argument("--keep", action="store_true", help="leave the copy (and its logs) for inspection")
    parser.add_argument("--checkout", default=ROOT, help="the checkout to copy (default: this one)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 2),
                        help="parallel compile jobs of the copy's builds (default: $MAX_JOBS or 2)")
    args = parser.parse_args(argv)

    def log(message):
        print(message, flush=True)

    try:
        mutations = select(args.only)
        for m in mutations:  # before anything is copied or built
            mutated_sources(m, args.checkout)
        if args.list:
            for m in mutations:
                env = "".join(f"{n}={v} " if v is not None else f"(no {n}) " for n, v in m.env)
                print(f"{m.name}\n  where:  {m.where}\n  breaks: {m.breaks}\n  tests:  {env}{shlex.join(m.tests)}")
            return 0
        tests = shlex.split(args.tests) if args.tests else None
        folder = tempfile.mkdtemp(prefix="dropout_ext-mutate-")
        results: List[Result] = []
        start = time.monotonic()
        try:
            log(f"copying {args.checkout} to {folder}")
            copy = Copy(args.checkout, folder, args.jobs, log)
            if copy.extension() is None or any(m.needs_build for m in mutations):
                copy.ensure_built()
            copy.check_import()
            baseline: List[str] = []
            if args.baseline:
                selections = [(tuple(tests), ())] if tests else list(dict.fromkeys((m.tests, m.env) for m in mutations))
                for i, (sel, env) in enumerate(selections):
                    failed, summary = copy.run_tests(sel, f"unmutated-{i}", env)
                    log(f"unmutated {shlex.join(sel)}: {summary}")
                    baseline += failed
            for i, m in enumerate(mutations, 1):
                log(f"[{i}/{len(mutations)}] {m.name}: {m.breaks}")
                result = copy.run(m, tests, baseline)
                results.append(result)
                log(f"  {'caught' if result.caught else 'SURVIVED'}: {result.summary} ({result.seconds:.0f} s)")
        finally:
            if args.keep:
                log(f"the copy is kept in {folder}")
            else:
                shutil.rmtree(folder, ignore_errors=True)
        print()
        print(table(results))
        survivors = [r.mutation.name for r in results if not r.caught]
        print(f"\n{len(results) - len(survivors)} of {len(results)} mutations caught in "
              f"{time.monotonic() - start:.0f} s" + (f"; survived: {', '.join(survivors)}" if survivors else ""))
        if baseline:
            print(f"{len(baseline)} tests failed unmutated (not counted): {'; '.join(baseline[:SHOWN])}")
        return 1 if survivors else 0
    except MutationError as e:
        print(f"mutate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
