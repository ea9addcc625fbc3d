#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU, in one command:
#   1. stamp the machine (GPU, driver, CUDA, torch, Triton, date, commit);
#   2. build the extension for the visible GPU (editable, so the tests and
#      benchmarks of this checkout use it) and check every op has a CUDA kernel;
#   3. the GPU tests (tests/test_gpu.py; --all-tests: the whole suite);
#   4. compute-sanitizer memcheck, racecheck and initcheck over
#      tools/sanitize_ops.py, a small run of every op on each GPU backend;
#   5. the benchmark sweep (pytest benchmarks --benchmark-only).
# Every log, JUnit XML and benchmark JSON goes into one folder, with
# summary.txt listing each step's time and result. The steps after the build
# all run even when one fails; the exit status is non-zero if any failed.
#
# Needs, installed beforehand: torch's CUDA build, requirements-test.txt and
# the CUDA toolkit (nvcc, compute-sanitizer). Uses no network.
#
# Usage: tools/gpu_check.sh [OPTIONS] [OUT_DIR]
#   OUT_DIR             default: benchmarks/results/gpu-<YYYY-MM-DD>
#   --bench-mode MODE   default (a handful of sizes), full (the whole sweep) or smoke
#   --all-tests         run `pytest tests` instead of tests/test_gpu.py only
#   --skip STEP         leave out build, tests, sanitizer or bench (repeatable)
# Environment: PYTHON (default python3), MAX_JOBS (default: the number of
# cores), TORCH_CUDA_ARCH_LIST (default: the visible GPUs).
set -uo pipefail
exec </dev/null
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
BENCH_MODE="default"
ALL_TESTS=0
SKIP=" "
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bench-mode) BENCH_MODE="$2"; shift 2 ;;
        --all-tests) ALL_TESTS=1; shift ;;
        --skip) SKIP+="$2 "; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT="$1"; shift ;;
    esac
done
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

# step NAME LOGFILE COMMAND...: runs COMMAND with its output shown and kept in
# OUT/LOGFILE, and appends its time and result to summary.txt.
step() {
    local name="$1" log="$OUT/$2"; shift 2
    echo
    echo "=== $name (log: $log) ==="
    local start rc
    start=$(date +%s)
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local result="ok"
    if [[ $rc -eq 5 ]]; then
        result="FAILED (pytest collected no tests)"
    elif [[ $rc -ne 0 ]]; then
        result="FAILED (exit $rc)"
    fi
    [[ $rc -eq 0 ]] || FAILED=1
    printf '%-44s %7ss  %s\n' "$name" "$(( $(date +%s) - start ))" "$result" | tee -a "$SUMMARY"
    return "$rc"
}

skipped() { [[ "$SKIP" == *" $1 "* ]]; }

stamp() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "host: $(hostname)"
    local commit="unknown"
    if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        commit="$(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    fi
    echo "commit: $commit"
    echo "--- nvidia-smi"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv || echo "nvidia-smi failed"
    nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1 || true
    echo "--- nvcc"
    local nvcc_version="not on PATH"
    command -v nvcc >/dev/null && nvcc_version="$(nvcc --version 2>&1 | grep -o 'release [0-9.]*, V[0-9.]*')"
    echo "$nvcc_version"
    echo "--- compute-sanitizer"
    sanitizer_path || echo "compute-sanitizer not found"
    echo "--- python"
    GPU_CHECK_COMMIT="$commit" GPU_CHECK_NVCC="$nvcc_version" "$PYTHON" - "$OUT/environment.json" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except Exception as exc:  # reported, not fatal: the CUDA backend needs no Triton
    triton_version = f"unavailable ({exc})"
def smi(field):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return None
env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    "triton": triton_version,
    "gpu_visible": torch.cuda.is_available(),
    "devices": [{"name": torch.cuda.get_device_name(i),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                 "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                for i in range(torch.cuda.device_count())],
    "driver": smi("driver_version"),
    "cuda_driver_api": torch._C._cuda_getDriverVersion() if torch.cuda.is_available() else None,
    "nvcc": os.environ.get("GPU_CHECK_NVCC"),
    "commit": os.environ.get("GPU_CHECK_COMMIT"),
    "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")},
}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
if not env["gpu_visible"]:
    sys.exit("torch sees no CUDA GPU: nothing here can be checked")
EOF
}

sanitizer_path() {
    local cand
    for cand in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-}/bin/compute-sanitizer" \
                "$(nvcc_top)/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
        if [[ -n "$cand" && -x "$cand" ]]; then echo "$cand"; return 0; fi
    done
    return 1
}

# The toolkit folder the nvcc on PATH really runs from (it may be a wrapper).
nvcc_top() {
    command -v nvcc >/dev/null || return 0
    nvcc -dryrun -c probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1
}

build() {
    # DROPOUT_EXT_FORCE_CUDA: a CPU-only build would make every later step
    # meaningless, so it fails here. --no-index: nothing is fetched.
    DROPOUT_EXT_FORCE_CUDA=1 "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index -e . || return
    "$PYTHON" - <<'EOF'
import sys, torch
import dropout_ext
missing = [op for op in ("fused_dropout", "fused_dropout_backward", "dropout_mask")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dropout_ext::{op}", "CUDA")]
print("GPU backends:", dropout_ext.available_backends("cuda"))
sys.exit(f"no CUDA kernel registered for {missing}" if missing else 0)
EOF
}

tests() {
    local target=(tests/test_gpu.py)
    [[ $ALL_TESTS -eq 1 ]] && target=(tests)
    "$PYTHON" -m pytest "${target[@]}" -v -rs --junitxml "$OUT/tests.xml"
}

sanitize() {
    local tool="$1" sanitizer
    sanitizer="$(sanitizer_path)" || { echo "compute-sanitizer not found (CUDA toolkit's bin/)"; return 1; }
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool="$tool" --error-exitcode=1 \
        "$PYTHON" tools/sanitize_ops.py
}

bench() {
    "$PYTHON" -m pytest benchmarks --benchmark-only --bench-mode="$BENCH_MODE" --bench-device=cuda \
        --bench-out "$OUT/bench" --benchmark-json "$OUT/pytest-benchmark.json"
}

echo "results in $OUT"
step "stamp: machine and versions" stamp.txt stamp || { echo "stopping: see $OUT/stamp.txt"; exit 1; }
if ! skipped build; then
    step "build (editable) and CUDA kernels registered" build.log build || { echo "stopping: the build failed"; exit 1; }
fi
skipped tests || step "tests ($([[ $ALL_TESTS -eq 1 ]] && echo 'pytest tests' || echo tests/test_gpu.py))" tests.log tests
if ! skipped sanitizer; then
    for tool in memcheck racecheck initcheck; do
        step "compute-sanitizer $tool" "sanitizer-$tool.log" sanitize "$tool"
    done
fi
skipped bench || step "benchmarks ($BENCH_MODE)" bench.log bench
echo
echo "=== summary ($SUMMARY) ==="
cat "$SUMMARY"
exit "$FAILED"
