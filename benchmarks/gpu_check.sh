#!/usr/bin/env bash
# The GPU check (docs: DESIGN.md "GPU runbook", docs/STATUS.md "The GPU plan"): every answer the
# GPU machine can give, in one command of at most 8 minutes; everything under OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [options of benchmarks/gpu_check.py]
#        OUT_DIR defaults to $OUT, else ./gpu-out; e.g. --dry-run (the CPU rehearsal CI runs),
#        --list (the stages and their time boxes), --stages ..., --budget SECONDS, --box STAGE=S
#
# The stages, their time boxes and the files left in OUT_DIR are described in
# benchmarks/gpu_check.py. It needs only what the GPU machine has (python3 with torch and triton;
# no package index): the repository is put on PYTHONPATH, not installed. PYTHON picks the
# interpreter (default: python3).
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    OUT_DIR=$1
    shift
else
    OUT_DIR=${OUT:-./gpu-out}
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT_DIR" "$@"
