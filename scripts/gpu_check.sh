#!/usr/bin/env bash
# The GPU half of the tests in one command (on a CUDA machine, from the repository root or anywhere):
#
#   bash scripts/gpu_check.sh [RESULTS_DIR] [--parts units notebooks/NN_name.ipynb ...] [--jobs-per-gpu N] [--time-limit S]
#
# Runs every unit test (CUDA tests included) and every notebook in its FULL profile through nbval, spread over the
# visible GPUs, and writes RESULTS_DIR/gpu_check.json (+ .log): pass/fail and wall time per part, the CUDA tests by
# name, GPU names, torch version. Commit the record under data/results. Exit status 1 if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
