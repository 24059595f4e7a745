#!/usr/bin/env bash
# The GPU runbook (docs: DESIGN.md, "GPU runbook"): everything to check on a GPU machine, in one call.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu-out)
#
# Steps: versions, build (the CUDA extension), tests (the whole suite, on CUDA), bench
# (python -m fastlm.bench all). Each step logs to OUT_DIR/<step>.log and leaves its exit
# code in OUT_DIR/<step>.rc; one failing step does not stop the others. OUT_DIR/summary.txt
# lists every step recorded in OUT_DIR, so steps run in separate calls add up.
#
# It uses only what the GPU machine has (python with torch and triton; no package index):
# the repository is not installed but put on PYTHONPATH, and pytest runs without
# pytest-benchmark. Environment knobs:
#   GPU_CHECK_STEPS="versions build tests bench"   the steps to run, in order
#   BENCH_SUITES="attention ffn"                   the suites to run (default: all)
#   BENCH_ARGS="--quick"                           extra arguments for fastlm.bench
#   PYTEST_ARGS="-x -k 'norm and not slow'"        extra arguments for pytest (shell-quoted)
# Exit status: 0 when every step recorded in OUT_DIR passed, 1 otherwise.

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-./gpu-out}}
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STEPS=${GPU_CHECK_STEPS:-versions build tests bench}

if command -v python3 >/dev/null 2>&1; then PY=python3
elif command -v python >/dev/null 2>&1; then PY=python
else echo "gpu_check: no python3 or python on PATH" >&2; exit 2
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# The kernels must run on the GPU, with nothing slowing them: these are for CPU testing.
unset TRITON_INTERPRET FASTLM_POISON FASTLM_BACKEND

# run_step NAME FUNCTION: run FUNCTION from the repository root, log it, record its exit code.
run_step() {
    local name=$1 fn=$2 log="$OUT_DIR/$1.log" start rc
    start=$(date +%s)
    echo "== $name: started $(date -u '+%Y-%m-%dT%H:%M:%SZ'), log $log"
    (cd "$REPO" && "$fn") >"$log" 2>&1
    rc=$?
    echo "$rc $(( $(date +%s) - start ))" >"$OUT_DIR/$name.rc"
    echo "== $name: exit $rc after $(( $(date +%s) - start ))s"
    tail -n 5 "$log" | sed 's/^/   | /'
}

step_versions() {
    echo "date: $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
    echo "host: $(uname -a)"
    echo "repo: $REPO at $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'no git')"
    git -C "$REPO" status --short 2>/dev/null
    echo
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo
    if command -v nvcc >/dev/null 2>&1; then nvcc --version; else echo "nvcc: not found"; fi
    # Triton compiles a small launcher with the host C compiler the first time it runs.
    for cc in gcc cc clang; do
        if command -v "$cc" >/dev/null 2>&1; then "$cc" --version | head -n 1; break; fi
    done
    echo
    echo "python: $(command -v $PY)"
    "$PY" - <<'EOF'
import importlib.metadata as md
import platform
import sys

print("python", platform.python_version())
for pkg in ("torch", "triton", "numpy", "pytest", "pytest-benchmark", "pybind11", "ninja", "setuptools"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} not installed")

import torch
print("torch cuda runtime", torch.version.cuda, "| cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")

import fastlm
print("fastlm from", fastlm.__file__)
for name, info in fastlm.available_backends().items():
    print(f"backend {name}: {'yes' if info.available else 'no'} ({info.reason})")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

step_build() {
    local sources
    sources=$(find csrc -name '*.cu' 2>/dev/null | head -n 1)
    if [ -z "$sources" ]; then
        echo "csrc has no kernels yet: nothing to build"
        return 0
    fi
    if ! command -v nvcc >/dev/null 2>&1; then
        echo "csrc has CUDA sources but nvcc is not on PATH"
        return 1
    fi
    # The documented build command: ninja + nvcc into fastlm/_C*.so (see fastlm/cuda_build.py).
    # pybind11 is header-only: FASTLM_PYBIND11_INCLUDE may point at its headers where the
    # package is not installed (the GPU machine has no package registry).
    "$PY" -m fastlm.cuda_build --verbose
}

step_tests() {
    # No pytest-benchmark here: its plugin is switched off, and with it the pyproject addopts
    # (--benchmark-disable) that only the plugin understands.
    local -a extra=()
    eval "extra=(${PYTEST_ARGS:-})"  # keeps quoted words whole: PYTEST_ARGS="-k 'norm and not slow'"
    "$PY" -m pytest -q tests benchmarks -p no:cacheprovider -p no:benchmark -o addopts="" -ra \
        --junitxml="$OUT_DIR/junit.xml" "${extra[@]}"
}

step_bench() {
    local -a extra=()
    eval "extra=(${BENCH_ARGS:-})"
    # shellcheck disable=SC2086
    "$PY" -m fastlm.bench ${BENCH_SUITES:-all} --out "$OUT_DIR/bench" "${extra[@]}"
}

for step in $STEPS; do
    case $step in
        versions|build|tests|bench) run_step "$step" "step_$step" ;;
        *) echo "gpu_check: unknown step '$step' (known: versions build tests bench)" >&2 ;;
    esac
done

# The summary covers every step recorded in OUT_DIR, including ones from earlier calls.
status=0
{
    echo "gpu_check summary, $(date -u '+%Y-%m-%dT%H:%M:%SZ'), repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    for step in versions build tests bench; do
        if [ -f "$OUT_DIR/$step.rc" ]; then
            read -r rc secs <"$OUT_DIR/$step.rc"
            [ "$rc" = 0 ] && verdict=ok || { verdict=FAILED; status=1; }
            printf '%-9s %-6s exit %-3s %5ss  %s\n' "$step" "$verdict" "$rc" "$secs" "$step.log"
        else
            printf '%-9s %-6s\n' "$step" "not run"
        fi
    done
    if [ -f "$OUT_DIR/tests.log" ]; then
        echo
        echo "tests: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT_DIR/tests.log" | tail -n 1)"
        grep -E '^(FAILED|ERROR) ' "$OUT_DIR/tests.log" | head -n 40
    fi
    if [ -d "$OUT_DIR/bench" ]; then
        echo
        echo "bench results: $(cd "$OUT_DIR" && ls bench/*.json bench/*.md bench/*.png 2>/dev/null | tr '\n' ' ')"
    fi
} >"$OUT_DIR/summary.txt"
echo
cat "$OUT_DIR/summary.txt"
exit $status
