#!/usr/bin/env bash
# Issue 3's GPU measurements, prepared for the day a GPU is lent: one call of the device tool, about 6-8 minutes on
# an H200 (the image has torch, transformers and typer; nothing is installed):
#     run(command="bash bench/gpu_check.sh", timeout_s=590)    -> $OUT/gpu.log, $OUT/llama-1b.json, $OUT/small.json
# 1. the CUDA tests: diagonal on the GPU (fp32, bf16) against the CPU sequential executor; CUDA graphs == eager
# 2. a Llama-3.2-1B-shaped model (random weights), bf16, segments of 1024 + 128 memory tokens: sequential vs
#    diagonal vs diagonal with CUDA graphs vs the bare base (full attention), 2 to 128 segments (128k tokens), and
#    the bf16 drift against fp32 on 8 segments
# 3. the small preset on the GPU, fp32: the same paths, and 8 sessions x 4 segments shared vs one by one
# Each part has its own time limit, so a hang in one still leaves the others' results.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bench() {
    timeout "$1" "$PY" -m service.cli bench ingest --device cuda --plot "$OUT/$2.png" --out "$OUT/$2.json" "${@:3}"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_diagonal.py -k cuda
    bench 300 llama-1b --preset llama-1b --bf16 --segments 2,8,32,128 --repeats 3 --sessions 0 --graphs \
        --base-max-tokens 140000 --drift-segments 8
    bench 120 small --preset small --segments 2,8,64,512 --repeats 5 --sessions 8 --graphs --drift-segments 8
} 2>&1 | tee "$OUT/gpu.log"
