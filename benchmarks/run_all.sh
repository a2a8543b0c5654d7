#!/usr/bin/env bash
# Every benchmark, one after another. Not collected by pytest; see benchmarks/README.md.
#   bash benchmarks/run_all.sh            # CPU, small defaults: vit_demo, about 2 minutes on 2 cores
#   bash benchmarks/run_all.sh gpu        # one H100: the issue's ViT-B settings, without and with --compile
#   DATA=/imagenet bash benchmarks/run_all.sh gpu    # ... and the loader on real JPEGs
# The GPU line for one pair, e.g. KAMIM ViT-B/16 at 192 px, batch 256 (the issue's target: >= 50 % MFU):
#   python benchmarks/bench_kamim.py --model vit_b --img-size 192 --batch-size 256 --device cuda --compile --warmup 5 --steps 20
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) CPUs, git $(git rev-parse --short HEAD 2>/dev/null || echo -)"
if [ "${1:-cpu}" = gpu ]; then
  G="--device cuda --warmup 5 --steps 20"
  for c in "" --compile; do
    $PY benchmarks/bench_kamim.py --model vit_b --img-size 192 --batch-size 256 $G $c
    $PY benchmarks/bench_lut.py --model vit_b --img-size 224 --batch-size 256 $G $c
    $PY benchmarks/bench_semanticmim.py --model vit_b --img-size 224 --batch-size 256 $G $c
    $PY benchmarks/bench_abmilp_probe.py --model vit_b --img-size 224 --batch-size 1024 $G $c
    $PY benchmarks/bench_finetune.py --model vit_b --img-size 224 --batch-size 256 $G $c
  done
  $PY benchmarks/bench_knn.py --bank 1281167 --device cuda
  if [ -n "${DATA:-}" ]; then
    $PY benchmarks/bench_data.py --data "$DATA" --workers 1 8 16 --images 8192
  fi
  $PY benchmarks/bench_data.py --write-jpegs /tmp/jpegs --scripts --device cuda   # per-script worker ms/img, nvJPEG
else
  $PY benchmarks/bench_knn.py
  for b in kamim lut semanticmim abmilp_probe finetune; do
    $PY benchmarks/bench_$b.py --warmup 2 --steps 6
    echo
  done
  $PY benchmarks/bench_data.py --workers 0 2 --images 256
  $PY benchmarks/bench_data.py --write-jpegs /tmp/jpegs --scripts   # per-script worker ms/img on JPEGs, cores needed
fi
