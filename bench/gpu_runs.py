"""The two benchmark runs of bench/gpu_check.sh, called through model.bench directly: the GPU image's own typer
(whatever version it holds) never has to parse a command line.

    python3 -m bench.gpu_runs llama-1b runs/gpu    -> runs/gpu/llama-1b.json, .png
    python3 -m bench.gpu_runs small runs/gpu
    python3 -m bench.gpu_runs small /tmp/x cpu     (the script on a CPU: a few minutes; the graphs variant
                                                    is the plain diagonal path there, graphs need CUDA)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from model.bench import Options, run

RUNS = {
    # Llama-3.2-1B shape in bf16, 2 to 128 segments of 1024 tokens (128k), the bare base up to 128k, CUDA graphs
    "llama-1b": ([2, 8, 32, 128], torch.bfloat16,
                 Options(sessions=0, repeats=3, base_max_tokens=140_000, graphs=True, drift_segments=8)),
    # the CPU presets' small model in fp32, and 8 sessions x 4 segments shared vs one by one
    "small": ([2, 8, 64, 512], torch.float32, Options(sessions=8, repeats=5, graphs=True, drift_segments=8)),
}


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"  # "cpu": a smoke run of this script
    segments, dtype, opts = RUNS[name]
    run(name, segments, opts, dtype, device, out / f"{name}.json", out / f"{name}.png")


if __name__ == "__main__":
    main()
