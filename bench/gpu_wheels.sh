#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on the lent GPU machine, fetched here (the GPU machine reaches no registry).
# Its image holds torch 2.11 and transformers 5.17 (/work/.library/device/KINDS.md); this project needs
# transformers >= 5.20 (5.17's create_causal_mask takes no `cache`), a pure-Python wheel whose other needs the
# image has. Then:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=450)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=$(ls .venv/bin/python 2>/dev/null || command -v python3)
version=$("$PY" -c "import transformers; print(transformers.__version__)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "transformers==$version" "regex"
ls -l .whl
