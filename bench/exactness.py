"""How exactly the diagonal executor reproduces the sequential one, and how far float32 rounding alone takes each
from the float64 result, on a preset's random model or on a model directory (the figures behind README
"Executors"):

    .venv/bin/python -m bench.exactness --preset small --segments 8,64
    .venv/bin/python -m bench.exactness --model model/weights/default --segments 8,64,256

Per length, one random document of that many full segments (seed 0), one line: the two executors' float32 logits
apart (largest difference over the largest logit, the issue's 1e-5 goal), each executor's float32 logits from the
same model's in float64 (weights and memory), and the two executors in float64. Where the float32 figures are far
above ~1e-6 while the float64 one is far below them, the model's memory recurrence amplifies rounding (a random model
over many segments can be chaotic: then even float64 drifts), not a difference in the executors' math.
"""
from __future__ import annotations

import argparse

import torch

from model.armt import ArmtModel
from model.bench import PRESETS, build, exactness, format_exactness


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="small", choices=sorted(PRESETS))
    source.add_argument("--model", help="a model directory (ArmtModel.from_pretrained) instead of a preset")
    parser.add_argument("--segments", default="8,64", help="comma-separated document lengths in segments")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.segments.split(",")]
    name = args.model or args.preset
    for n in lengths:
        torch.manual_seed(0)
        model = ArmtModel.from_pretrained(args.model) if args.model else build(args.preset)
        ids = torch.randint(0, model.base.vocab_size, (1, n * model.config.segment_size))
        try:
            d = exactness(model.eval(), ids)
        except ValueError as e:
            raise SystemExit(f"{name}: {e}") from None
        print(f"{name}, {n} segment{'s' * (n != 1)}: {format_exactness(d)}", flush=True)


if __name__ == "__main__":
    main()
