#!/usr/bin/env bash
# The first thing a freshly lent GPU runs (issue 26); benchmarks/README.md "GPU check (issue 26)".
#   bash benchmarks/gpu_check.sh /tmp/gpu_check               # one H100: at most 8 minutes
#   bash benchmarks/gpu_check.sh /tmp/gpu_check_cpu --cpu     # rehearsal on the CPU (vit_demo)
# Writes OUTDIR/gpu_check.json and OUTDIR/log.txt; prints a summary. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
