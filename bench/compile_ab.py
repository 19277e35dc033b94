"""Does torch.compile change the diagonal / sequential ratio? Both executors eager, then both compiled.

The diagonal executor compiles through its own switch (model/kernels.py, `model.compiled_kernels`); for the
sequential one this script compiles the HF decoder blocks in place and the memory read / write functions the
sequential path calls, so that the two compiled runs fuse comparable work. Same model, same tokens, one process:

    .venv/bin/python -m bench.compile_ab --preset small --segments 64
"""
from __future__ import annotations

import torch


@torch.no_grad()
def main() -> None:
    import model.armt as armt
    from model.bench import preset_document, timed, with_flags

    args, m, ids = preset_document(description=__doc__.splitlines()[0])

    def ingest(executor):
        return lambda: m.ingest(m.new_state(), ids, executor=executor)

    # the sequential path compiled: the HF blocks' forward and the memory read / write it calls, swapped in for a
    # run and back out, so that all four paths are timed in one timed() call (its rounds interleave them)
    compiled_forward = [torch.compile(block.forward, dynamic=False) for block in m.base.blocks]
    eager = {name: getattr(armt, name) for name in ("associative_read", "delta_write")}
    fused = {name: torch.compile(fn, dynamic=False) for name, fn in eager.items()}

    def sequential_compiled():
        for block, forward in zip(m.base.blocks, compiled_forward):
            block.forward = forward
        for name, fn in fused.items():
            setattr(armt, name, fn)
        try:
            return ingest("sequential")()
        finally:
            for block in m.base.blocks:
                del block.forward
            for name, fn in eager.items():
                setattr(armt, name, fn)

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
