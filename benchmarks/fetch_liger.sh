#!/usr/bin/env bash
# Liger-Kernel for the GPU check, where a machine has no package index: download its wheel here
# into .whl/ (git-ignored); name .whl in the device tool's carry, and benchmarks/gpu_check.py
# installs it (pip --no-index --no-deps into its work folder) and benchmarks it as a peer.
# Liger is pure Python and Triton: it needs nothing the GPU machine lacks (torch, triton).
#
#   bash benchmarks/fetch_liger.sh [VERSION]      (default 0.8.5)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.8.5}
PY=${PYTHON:-python3}
mkdir -p .whl
rm -f .whl/liger_kernel-*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "liger-kernel==$VERSION"
ls -l .whl/liger_kernel-*.whl
