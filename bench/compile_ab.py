"""Does torch.compile change the diagonal / sequential ratio? Both executors eager, then both compiled.

The diagonal executor compiles each step whole through its own switch (model/kernels.py, `model.compiled_kernels`);
for the sequential one this script compiles its per-segment function whole (`segment_forward`: inputs, every
layer's read, block and write, the head), so that both compiled runs fuse their layers' work (the sequential one
also its segment's embedding, which the diagonal executor builds eagerly, PREFETCH segments at a time; a segment's
one host sync, the count of first segments, splits its graph in two). Same model, same tokens, one process:

    .venv/bin/python -m bench.compile_ab --preset small --segments 64
"""
from __future__ import annotations

import logging

import torch


@torch.no_grad()
def main() -> None:
    from model.bench import preset_document, timed, with_flags

    args, m, ids = preset_document(description=__doc__.splitlines()[0])

    def ingest(executor):
        return lambda: m.ingest(m.new_state(), ids, executor=executor)

    # the sequential path compiled: its per-segment function swapped in for a run and back out (an instance
    # attribute shadows the method), so that all four paths are timed in one timed() call (its rounds interleave)
    compiled_segment = torch.compile(m.segment_forward, dynamic=False)
    logging.getLogger("torch._dynamo.variables.tensor").setLevel(logging.ERROR)  # not that split's warning
    sequential_compiled = with_flags(m, ingest("sequential"), segment_forward=compiled_segment)

    expected = ingest("sequential")()
    torch.testing.assert_close(sequential_compiled().A, expected.A, rtol=1e-4, atol=1e-4)
    ms = timed({"sequential": ingest("sequential"), "diagonal": ingest("diagonal"),
                "diagonal compiled": with_flags(m, ingest("diagonal"), compiled_kernels=True),
                "sequential compiled": sequential_compiled}, m.device, args.repeats)
    print(f"{args.preset}, {args.segments} segments, {torch.get_num_threads()} threads: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in ms.items()))
    print(f"diagonal / sequential: eager {ms['sequential'] / ms['diagonal']:.2f}x, both compiled "
          f"{ms['sequential compiled'] / ms['diagonal compiled']:.2f}x; compile speeds diagonal up "
          f"{ms['diagonal'] / ms['diagonal compiled']:.2f}x, "
          f"sequential {ms['sequential'] / ms['sequential compiled']:.2f}x")


if __name__ == "__main__":
    main()
