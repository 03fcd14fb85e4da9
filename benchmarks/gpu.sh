#!/usr/bin/env bash
# One prepared run for a lent GPU machine (issue 16): the CUDA tests, then the bench in bfloat16
# (DeiT-S and DeiT-B shape: dense, ATS packed (varlen) and padded, top-K and ToMe at ATS's GMACs, the bound).
# Usage (repository root, on the device): bash benchmarks/gpu.sh; JSON goes to $OUT (default runs/gpu).
set -euo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
make setup >/dev/null
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 180 $PY -m pytest -q tests/test_cuda.py tests/test_patch.py -k "cuda or variable_length or off_the_cpu" 2>&1 | tee "$OUT/tests.txt"
timeout 300 .venv/bin/ats-vit bench --device cuda --case deit_s,deit_b --dtypes bfloat16 --batch-sizes 1,64,256 \
    --out "$OUT" 2>&1 | tail -20 | tee "$OUT/bench.txt"
