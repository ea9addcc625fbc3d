#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU, in one command, sized for a
# short lease: the steps run in priority order within one time budget
# (default 480 s, the build included, planned for 16 cores), each under its
# own time limit, and each writes its results as it ends, so a run cut short
# keeps what finished.
#
# Priority steps (their limits add up to the default budget):
#   stamp     GPU, driver, CUDA, torch, Triton, tools, date, commit; without
#             a GPU the run stops here (exit status 3)
#   build     the extension for the visible GPU only (editable, --no-index,
#             MAX_JOBS = the cores); every op has a CUDA kernel
#   quick     tests/test_gpu.py -m gpu_quick: a few shapes and dtypes against
#             the reference, CUDA-graph replays, no host synchronisation, the
#             device operations per call (figures, in figures.txt)
#   memcheck  compute-sanitizer memcheck over tools/sanitize_ops.py --quick
#   bench     the key benchmark cases (benchmarks, --bench-mode=lease), each
#             beside the static model's time for it (tools/gpu_model.py)
#   block     the transformer block's step time and memory (the same mode)
# Then, while the budget lasts: racecheck and initcheck over the same
# script, the rest of tests/test_gpu.py (--all-tests: of `pytest tests`),
# memcheck over every op (tools/sanitize_ops.py), and the full benchmark
# sweep with what the budget has left (at least SWEEP_MIN seconds).
# A step starts only with its whole limit left in the budget; otherwise, or
# when a tool it needs is missing (compute-sanitizer, pytest-benchmark), it
# is skipped with the reason. Without nvcc the build makes the CPU kernels
# only and the Triton backend is checked alone. At its limit a step's
# process group gets SIGINT (pytest still writes its JUnit XML and report)
# and, GRACE seconds later, SIGKILL.
#
# Everything goes into one folder: each step's log (<step>.log), JUnit XML
# (<step>.xml), benchmark JSON and plots (<step>/), environment.json, and
# summary.txt / summary.json (step, limit, seconds used, result), rewritten
# after every step and printed at the end. Exit status: 0 every step that
# ran passed; 1 a step failed or hit its limit; 2 bad usage; 3 no GPU;
# 130 interrupted.
#
# Installs and fetches nothing beyond the editable build of this checkout:
# needs torch's CUDA build and requirements-test.txt; the CUDA toolkit
# (nvcc, compute-sanitizer) for the CUDA kernels and the sanitizer steps.
#
# Usage: tools/gpu_check.sh [OPTIONS] [OUT_DIR]
#   OUT_DIR               default: benchmarks/results/gpu-<YYYY-MM-DD>
#   --budget SECONDS      the time budget of the whole run (default 480)
#   --limit STEP=SECONDS  another limit for one step (repeatable)
#   --skip STEP           leave a step out (repeatable; not stamp)
#   --all-tests           the tests step runs `pytest tests`, not tests/test_gpu.py
#   --dry-run [--json]    print the plan (each step, its limit, the running
#                         total) and exit; needs no GPU
# Environment: PYTHON (default python3), MAX_JOBS (default: the cores).
# TORCH_CUDA_ARCH_LIST is set to the visible GPUs' architectures.
set -uo pipefail
exec </dev/null
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
BUDGET=480
GRACE=10        # of a step's limit, the seconds between its SIGINT and its SIGKILL
SWEEP_MIN=120   # the least budget left for which the sweep starts

STEPS=(stamp build quick memcheck bench block racecheck initcheck tests memcheck-full sweep)
PRIORITY_STEPS=6
declare -A LIMIT=([stamp]=30 [build]=165 [quick]=90 [memcheck]=60 [bench]=100 [block]=35
                  [racecheck]=120 [initcheck]=120 [tests]=420 [memcheck-full]=300 [sweep]=rest)
# Each step's command: a function step_<first word> below and its arguments.
declare -A RUN=([stamp]=stamp [build]=build [quick]=quick [memcheck]="sanitizer memcheck --quick"
                [bench]="benchmarks bench lease -k test_paired"
                [block]="benchmarks block lease -k test_transformer_block_memory"
                [racecheck]="sanitizer racecheck --quick" [initcheck]="sanitizer initcheck --quick"
                [tests]=tests [memcheck-full]="sanitizer memcheck" [sweep]="benchmarks sweep full")
declare -A NEEDS=([quick]=pytest [tests]=pytest [bench]=pytest_benchmark [block]=pytest_benchmark
                  [sweep]=pytest_benchmark [memcheck]=compute-sanitizer [racecheck]=compute-sanitizer
                  [initcheck]=compute-sanitizer [memcheck-full]=compute-sanitizer)
declare -A WHAT=(
    [stamp]="machine and versions; stops the run without a GPU"
    [build]="editable build for the visible GPU; every op has a CUDA kernel"
    [quick]="tests/test_gpu.py -m gpu_quick"
    [memcheck]="compute-sanitizer memcheck, tools/sanitize_ops.py --quick"
    [bench]="the key benchmark cases (--bench-mode=lease, the paired tests)"
    [block]="the transformer block's step time and memory (--bench-mode=lease)"
    [racecheck]="compute-sanitizer racecheck, tools/sanitize_ops.py --quick"
    [initcheck]="compute-sanitizer initcheck, tools/sanitize_ops.py --quick"
    [tests]="the rest of tests/test_gpu.py"
    [memcheck-full]="compute-sanitizer memcheck, tools/sanitize_ops.py (every op)"
    [sweep]="the benchmark sweep (--bench-mode=full), with what the budget has left")

usage_error() {
    echo "gpu_check.sh: $*" >&2
    echo "usage: tools/gpu_check.sh [--budget SECONDS] [--limit STEP=SECONDS] [--skip STEP] [--all-tests]" \
         "[--dry-run [--json]] [OUT_DIR]; see --help" >&2
    exit 2
}
is_step() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }
seconds() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

ALL_TESTS=0
DRY_RUN=0
JSON=0
SKIP=" "
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --budget|--limit|--skip)
            [[ $# -ge 2 ]] || usage_error "$1 needs a value" ;;&
        --budget)
            seconds "$2" || usage_error "--budget must be a whole number of seconds above 0, got '$2'"
            BUDGET="$2"; shift 2 ;;
        --limit)
            step="${2%%=*}" secs="${2#*=}"
            [[ "$2" == *=* ]] || usage_error "--limit takes STEP=SECONDS, got '$2'"
            is_step "$step" || usage_error "--limit: unknown step '$step' (steps: ${STEPS[*]})"
            { seconds "$secs" && (( secs > GRACE )); } ||
                usage_error "--limit $step: the limit must be a whole number of seconds above $GRACE, got '$secs'"
            LIMIT[$step]="$secs"; shift 2 ;;
        --skip)
            is_step "$2" || usage_error "--skip: unknown step '$2' (steps: ${STEPS[*]})"
            [[ "$2" != stamp ]] || usage_error "--skip: the stamp step cannot be skipped (it is the GPU check)"
            SKIP+="$2 "; shift 2 ;;
        --all-tests) ALL_TESTS=1; WHAT[tests]="pytest tests, less the gpu_quick tests"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --json) JSON=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) usage_error "unknown option '$1'" ;;
        *) [[ -z "$OUT" ]] || usage_error "one output folder only, got '$OUT' and '$1'"
           OUT="$1"; shift ;;
    esac
done
[[ $JSON -eq 0 || $DRY_RUN -eq 1 ]] || usage_error "--json goes with --dry-run"
CORES="$(nproc)"
export MAX_JOBS="${MAX_JOBS:-$CORES}"

skipped() { [[ "$SKIP" == *" $1 "* ]]; }
priority() { local i; for ((i = 0; i < PRIORITY_STEPS; i++)); do [[ "${STEPS[i]}" == "$1" ]] && return 0; done; return 1; }
limit_text() { [[ "${LIMIT[$1]}" == rest ]] && echo "rest" || echo "${LIMIT[$1]}s"; }
json_str() { local s="${1//\\/\\\\}"; printf '"%s"' "${s//\"/\\\"}"; }

# The plan: each step, its limit and, for the priority steps, the running total.
plan() {
    local s total=0 first=1 fits
    if [[ $JSON -eq 1 ]]; then
        printf '{"budget_s": %s, "cores": %s, "max_jobs": %s, "grace_s": %s, "sweep_min_s": %s, "steps": [' \
            "$BUDGET" "$CORES" "$MAX_JOBS" "$GRACE" "$SWEEP_MIN"
        for s in "${STEPS[@]}"; do
            local limit="${LIMIT[$s]}" cumulative=null is_priority=false
            [[ "$limit" == rest ]] && limit=null
            if priority "$s"; then
                is_priority=true
                skipped "$s" || { total=$((total + ${LIMIT[$s]})); cumulative=$total; }
            fi
            [[ $first -eq 1 ]] || printf ', '
            first=0
            printf '{"step": "%s", "limit_s": %s, "cumulative_s": %s, "priority": %s, "skipped": %s, ' \
                "$s" "$limit" "$cumulative" "$is_priority" "$(skipped "$s" && echo true || echo false)"
            printf '"what": %s, "run": %s}' "$(json_str "${WHAT[$s]}")" "$(json_str "step_${RUN[$s]}")"
        done
        printf '], "priority_total_s": %s}\n' "$total"
        return
    fi
    echo "gpu_check plan: budget ${BUDGET}s; $CORES cores, MAX_JOBS=$MAX_JOBS"
    (( CORES >= 16 )) || echo "(the build's limit is planned for 16 cores: with $CORES it may need more, --limit build=SECONDS)"
    printf '  %-14s %6s %7s  %s\n' step limit total what
    for s in "${STEPS[@]}"; do
        if [[ "$s" == "${STEPS[PRIORITY_STEPS]}" ]]; then
            echo "  priority steps: ${total}s of the ${BUDGET}s budget"
            echo "  then, while the budget lasts (each only with its whole limit left):"
        fi
        if skipped "$s"; then
            printf '  %-14s %6s %7s  %s\n' "$s" - - "skipped (--skip)"
        elif priority "$s"; then
            total=$((total + ${LIMIT[$s]}))
            fits=""
            (( total <= BUDGET )) || fits="  [past the budget: runs only if earlier steps end early]"
            printf '  %-14s %6s %6ss  %s%s\n' "$s" "$(limit_text "$s")" "$total" "${WHAT[$s]}" "$fits"
        else
            local note=""
            [[ "${LIMIT[$s]}" == rest ]] && note=" (at least ${SWEEP_MIN}s)"
            printf '  %-14s %6s %7s  %s%s\n' "$s" "$(limit_text "$s")" "" "${WHAT[$s]}" "$note"
        fi
    done
}

if [[ $DRY_RUN -eq 1 ]]; then
    plan
    exit 0
fi

# --- the steps: each runs under `timeout` in a child bash, so it is exported --

command -v timeout >/dev/null || { echo "gpu_check.sh: needs coreutils' timeout" >&2; exit 2; }
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
NOTE="$OUT/.note"   # a step's remark for its summary row (e.g. what it left out and why)
export ROOT PYTHON OUT NOTE ALL_TESTS PYTHONUNBUFFERED=1
# Nothing is fetched: no pip index, no version check, no model hub.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# A value the stamp found (tools.txt): a tool's path, a module's version, the GPUs' architectures.
tool() { sed -n "s/^$1=//p" "$OUT/tools.txt" 2>/dev/null; }

nvcc_path() {
    local cand
    for cand in "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc; do
        if [[ -n "$cand" && -x "$cand" ]]; then echo "$cand"; return 0; fi
    done
    return 1
}

sanitizer_path() {
    local cand nvcc top=""
    # The toolkit folder the nvcc really runs from (it may be a wrapper).
    nvcc="$(nvcc_path)" && top="$("$nvcc" -dryrun -c probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
    for cand in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" \
                "${top:+$top/bin/compute-sanitizer}" /usr/local/cuda/bin/compute-sanitizer; do
        if [[ -n "$cand" && -x "$cand" ]]; then echo "$cand"; return 0; fi
    done
    return 1
}

step_stamp() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "host: $(uname -n)"
    local commit="unknown"
    if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        commit="$(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    fi
    echo "commit: $commit"
    echo "--- nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv || echo "nvidia-smi failed"
        nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1 || true
    else
        echo "not found"
    fi
    local nvcc sanitizer ninja nvcc_version="not found"
    nvcc="$(nvcc_path)" && nvcc_version="$("$nvcc" --version 2>&1 | grep -o 'release [0-9.]*, V[0-9.]*')"
    sanitizer="$(sanitizer_path)"
    ninja="$(command -v ninja)"
    echo "--- tools"
    echo "nvcc: ${nvcc:-not found} ($nvcc_version)"
    echo "compute-sanitizer: ${sanitizer:-not found}"
    echo "ninja: ${ninja:-not found (the build compiles one file at a time)}"
    echo "--- python"
    GPU_CHECK_COMMIT="$commit" GPU_CHECK_NVCC="$nvcc_version" GPU_CHECK_TOOLS="nvcc=$nvcc
compute-sanitizer=$sanitizer
ninja=$ninja" "$PYTHON" - "$OUT" <<'EOF'
import datetime, importlib.metadata, json, os, platform, subprocess, sys
import torch
out = sys.argv[1]
def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
def smi(field):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return None
gpu = torch.cuda.is_available()
devices = [{"name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
           for i in range(torch.cuda.device_count())] if gpu else []
modules = {name: version(name) for name in ("triton", "pytest", "pytest-benchmark", "hypothesis", "transformers")}
env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if gpu else None,
    "gpu_visible": gpu,
    "devices": devices,
    "driver": smi("driver_version"),
    "cuda_driver_api": torch._C._cuda_getDriverVersion() if gpu else None,
    "nvcc": os.environ.get("GPU_CHECK_NVCC"),
    "commit": os.environ.get("GPU_CHECK_COMMIT"),
    "modules": modules,
    "cores": os.cpu_count(),
    "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "MAX_JOBS")},
}
with open(os.path.join(out, "environment.json"), "w") as f:
    json.dump(env, f, indent=2)
print(json.dumps(env, indent=2))
arch = ";".join(sorted({d["capability"] for d in devices}))
with open(os.path.join(out, "tools.txt"), "w") as f:
    f.write(os.environ["GPU_CHECK_TOOLS"] + "\n")
    f.writelines(f"{name.replace('-', '_')}={v or ''}\n" for name, v in modules.items())
    f.write(f"cuda_arch_list={arch}\n")
if not gpu:
    why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
           else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no device"
                + (f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
                   if "CUDA_VISIBLE_DEVICES" in os.environ else ""))
    print(f"no GPU: {why}; nothing here can be checked", file=sys.stderr)
    sys.exit(3)
EOF
}

step_build() {
    local force=0
    if [[ -n "$(tool nvcc)" ]]; then
        # With a toolkit here, a build without the CUDA kernels would leave the
        # CUDA backend unchecked: DROPOUT_EXT_FORCE_CUDA makes it fail instead.
        force=1
        export DROPOUT_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(tool cuda_arch_list)"
        echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (the visible GPUs)"
    else
        echo "no nvcc: the CUDA kernels are not built, the Triton backend is checked alone" | tee -a "$NOTE"
    fi
    [[ -n "$(tool ninja)" ]] || echo "no ninja: one file at a time" | tee -a "$NOTE"
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index -e . || return
    "$PYTHON" - "$force" <<'EOF'
import sys, torch
import dropout_ext
backends = dropout_ext.available_backends("cuda")
print("GPU backends:", backends)
missing = [op for op in ("fused_dropout", "fused_dropout_backward", "dropout_mask", "dropout_add_norm",
                         "dropout_add_norm_backward")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dropout_ext::{op}", "CUDA")]
if sys.argv[1] == "1" and missing:
    sys.exit(f"no CUDA kernel registered for {missing}")
if not {"cuda", "triton"} & set(backends):
    sys.exit("no GPU backend: neither the CUDA kernels nor Triton")
EOF
}

step_quick() {
    "$PYTHON" -m pytest tests/test_gpu.py -m gpu_quick -v -rs -p no:cacheprovider --junitxml "$OUT/quick.xml"
}

step_tests() {
    local target=(tests/test_gpu.py)
    [[ $ALL_TESTS -eq 1 ]] && target=(tests)
    # test_compute_sanitizer_clean runs what the sanitizer steps run.
    "$PYTHON" -m pytest "${target[@]}" -m "not gpu_quick" -k "not test_compute_sanitizer_clean" -v -rs \
        -p no:cacheprovider --junitxml "$OUT/tests.xml"
}

step_sanitizer() {  # TOOL [--quick]
    # PYTHONPATH: the script imports this checkout's dropout_ext, installed or not (--skip build).
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        "$(tool compute-sanitizer)" --tool="$1" --error-exitcode=1 "$PYTHON" tools/sanitize_ops.py "${@:2}"
}

step_benchmarks() {  # NAME MODE [PYTEST ARGS]: its report, JSON and plots in OUT/NAME/
    local name="$1" mode="$2" rc json
    shift 2
    mkdir -p "$OUT/$name"
    "$PYTHON" -m pytest benchmarks --benchmark-only --bench-mode="$mode" --bench-device=cuda -p no:cacheprovider \
        --bench-out "$OUT/$name" --benchmark-json "$OUT/$name/pytest-benchmark.json" --junitxml "$OUT/$name.xml" "$@"
    rc=$?
    # Each measured case beside the static model's time for it (tools/gpu_model.py,
    # its committed rows): the first GPU run checks the model too.
    for json in "$OUT/$name"/bench-*.json; do
        [[ -f "$json" ]] || continue
        "$PYTHON" tools/gpu_model.py --predict "$json" | tee "$OUT/$name/model-vs-measured.txt"
    done
    return $rc
}

export -f tool nvcc_path sanitizer_path step_stamp step_build step_quick step_tests step_sanitizer step_benchmarks

# --- running them -------------------------------------------------------------

START=$(date +%s)
FAILED=0
INTERRUPTED=""
declare -A RESULT USED
for s in "${STEPS[@]}"; do RESULT[$s]="pending"; done
SUMMARY="$OUT/summary.txt"
FIGURES="$OUT/figures.txt"
rm -f "$FIGURES" "$OUT/tools.txt"

elapsed() { echo $(( $(date +%s) - START )); }

write_summary() {
    local s first=1
    {
        printf '%-14s %6s %6s  %s\n' step limit used result
        for s in "${STEPS[@]}"; do
            printf '%-14s %6s %6s  %s\n' "$s" "$(limit_text "$s")" "${USED[$s]:+${USED[$s]}s}" "${RESULT[$s]}"
        done
        echo "budget ${BUDGET}s, $(elapsed)s used; results in $OUT"
        if [[ -s "$FIGURES" ]]; then cat "$FIGURES"; fi
    } >"$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
    {
        printf '{"budget_s": %s, "elapsed_s": %s, "steps": [' "$BUDGET" "$(elapsed)"
        for s in "${STEPS[@]}"; do
            local limit="${LIMIT[$s]}"
            [[ "$limit" == rest ]] && limit=null
            [[ $first -eq 1 ]] || printf ', '
            first=0
            printf '{"step": "%s", "limit_s": %s, "used_s": %s, "result": %s}' \
                "$s" "$limit" "${USED[$s]:-null}" "$(json_str "${RESULT[$s]}")"
        done
        printf ']}\n'
    } >"$OUT/summary.json.tmp" && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

# Every step not yet run gets REASON, and the run ends with STATUS.
stop() {
    local s
    for s in "${STEPS[@]}"; do [[ "${RESULT[$s]}" == pending ]] && RESULT[$s]="not run: $2"; done
    write_summary
    rm -f "$NOTE" "$OUT/.rc" "$OUT/.pid"
    echo
    echo "=== summary ($SUMMARY) ==="
    cat "$SUMMARY"
    exit "$1"
}

on_signal() {
    INTERRUPTED="$1"
    # The step runs in its own process group (timeout's): pass the signal on.
    [[ -s "$OUT/.pid" ]] && kill -INT "$(cat "$OUT/.pid")" 2>/dev/null
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGHUP' HUP

# run_limited SECONDS LOG COMMAND...: COMMAND under `timeout` (its own process
# group: at the limit SIGINT to the group, SIGKILL GRACE seconds later), its
# output shown and kept in LOG; returns its exit status (124 or 137: the limit).
run_limited() {
    local secs="$1" log="$2" job
    shift 2
    rm -f "$OUT/.pid" "$OUT/.rc"
    {
        # A handler, not SIG_IGN (which the step would inherit): a Ctrl-C at
        # the terminal reaches this group, and the step is ended by on_signal.
        trap : INT TERM HUP
        timeout --signal=INT --kill-after="$GRACE" "$((secs - GRACE))" "$@" &
        pid=$!
        echo "$pid" >"$OUT/.pid"
        wait "$pid"
        rc=$?
        while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
        echo "$rc" >"$OUT/.rc"
    } 2>&1 | tee -i "$log" &
    job=$!
    wait "$job"
    while kill -0 "$job" 2>/dev/null; do wait "$job"; done
    rm -f "$OUT/.pid"
    return "$(cat "$OUT/.rc" 2>/dev/null || echo 1)"
}

# run_step NAME: runs the step if it may (not --skip'd, its tools here, its
# whole limit left in the budget), records its result and rewrites the summary.
run_step() {
    local name="$1" limit="${LIMIT[$1]}" left need rc start
    left=$((BUDGET - $(elapsed)))
    need="${NEEDS[$name]:-}"
    if skipped "$name"; then
        RESULT[$name]="skipped (--skip)"
    elif [[ -n "$need" && -z "$(tool "$need")" ]]; then
        RESULT[$name]="skipped: ${need//_/-} not found"
    elif [[ "$limit" == rest ]] && (( left < SWEEP_MIN )); then
        RESULT[$name]="skipped: needs at least ${SWEEP_MIN}s, ${left}s of the budget left"
    elif [[ "$limit" != rest ]] && (( limit > left )); then
        RESULT[$name]="skipped: needs ${limit}s, ${left}s of the budget left"
    fi
    if [[ "${RESULT[$name]}" != pending ]]; then
        echo
        echo "=== $name: ${RESULT[$name]}"
        write_summary
        return 0
    fi
    [[ "$limit" == rest ]] && limit="$left"
    echo
    echo "=== $name: ${WHAT[$name]} (limit ${limit}s, $(elapsed)s into the ${BUDGET}s budget; log: $OUT/$name.log)"
    : >"$NOTE"
    start=$(date +%s)
    # shellcheck disable=SC2086  # RUN holds the function's name and its arguments
    run_limited "$limit" "$OUT/$name.log" bash -c 'f="step_$1"; shift; "$f" "$@"' "$name" ${RUN[$name]}
    rc=$?
    USED[$name]=$(( $(date +%s) - start ))
    local note
    note="$(paste -sd ';' "$NOTE" 2>/dev/null)"
    if [[ -n "$INTERRUPTED" ]]; then
        RESULT[$name]="interrupted ($INTERRUPTED)"
        FAILED=1
    elif [[ $rc -eq 0 ]]; then
        RESULT[$name]="ok"
    elif [[ $rc -eq 124 || $rc -eq 137 ]] && [[ "${LIMIT[$name]}" == rest ]]; then
        RESULT[$name]="stopped at the end of the budget (what it measured is kept)"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        RESULT[$name]="FAILED: stopped at its ${limit}s limit"
        FAILED=1
    elif [[ $rc -eq 5 && "${NEEDS[$name]:-}" == pytest* ]]; then
        RESULT[$name]="FAILED: pytest collected no tests"
        FAILED=1
    elif [[ "$name" == stamp && $rc -eq 3 ]]; then
        RESULT[$name]="no GPU"
    else
        RESULT[$name]="FAILED (exit $rc)"
        FAILED=1
    fi
    [[ -n "$note" ]] && RESULT[$name]+=" ($note)"
    if [[ -f "$OUT/$name.log" ]] && grep -q '^figure: ' "$OUT/$name.log"; then
        grep '^figure: ' "$OUT/$name.log" >>"$FIGURES"
    fi
    write_summary
    echo "--- $name: ${RESULT[$name]} (${USED[$name]}s)"
    [[ -z "$INTERRUPTED" ]] || stop 130 "interrupted"
    return "$rc"
}

echo "results in $OUT; budget ${BUDGET}s"
write_summary
run_step stamp
case "${RESULT[stamp]}" in
    ok) ;;
    "no GPU"*) echo "stopping: no GPU (see $OUT/stamp.log)"; stop 3 "no GPU" ;;
    *) echo "stopping: stamp: ${RESULT[stamp]} (see $OUT/stamp.log)"; stop 1 "the stamp step did not pass" ;;
esac
run_step build
case "${RESULT[build]}" in
    ok*|"skipped (--skip)") ;;
    *) echo "stopping: build: ${RESULT[build]} (see $OUT/build.log)"; stop 1 "the build did not pass" ;;
esac
for s in "${STEPS[@]:2}"; do run_step "$s"; done
stop "$FAILED" "-"
