#!/usr/bin/env bash
# Issue 3's GPU measurements, prepared for the day a GPU is lent: one call of the device tool, 4-5 minutes of
# commands on an H200 by a review's estimate (the parts' limits add up to 7), leaving device time for a rerun. Its
# image has torch 2.11 and typer but transformers 5.17 (this project needs >= 5.20), so first, here:
#     bash bench/gpu_wheels.sh                                  (the transformers wheel into .whl/, git-ignored)
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=450)
#                                   -> $OUT/gpu.log, $OUT/llama-1b.json and .png, $OUT/small.json and .png
# 1. the CUDA tests: diagonal on the GPU (fp32, bf16) against the CPU sequential executor; CUDA graphs == eager
# 2. a Llama-3.2-1B-shaped model (random weights), bf16, segments of 1024 + 128 memory tokens: sequential vs
#    diagonal vs diagonal with CUDA graphs vs the bare base (full attention), 2 to 128 segments (128k tokens), the
#    bf16 drift against fp32 on 8 segments, and the fp32 exactness there (diagonal vs sequential, each vs float64)
# 3. the small preset on the GPU, fp32: the same paths, and 8 sessions x 4 segments shared vs one by one
# Each part has its own time limit, so a hang in one still leaves the others' results.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels first on the path (the device README's recipe)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    # without the carried wheel every part fails at create_causal_mask: stop before spending the device time
    "$PY" -c "import sys, transformers; v = tuple(int(x) for x in transformers.__version__.split('.')[:2]);
sys.exit(0 if v >= (5, 20) else 'transformers >= 5.20 needed: run bench/gpu_wheels.sh here and carry .whl')" || exit 1
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_diagonal.py tests/test_training.py -k cuda
    timeout 240 "$PY" -m bench.gpu_runs llama-1b "$OUT"  # the runs' settings: bench/gpu_runs.py
    timeout 90 "$PY" -m bench.gpu_runs small "$OUT"
} 2>&1 | tee "$OUT/gpu.log"
