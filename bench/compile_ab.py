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

    expected = ingest("sequential")()
    ms = timed({"sequential": ingest("sequential"), "diagonal": ingest("diagonal"),
                "diagonal compiled": with_flags(m, ingest("diagonal"), compiled_kernels=True)}, m.device, args.repeats)
    for block in m.base.blocks:
        block.compile(dynamic=False)
    armt.associative_read = torch.compile(armt.associative_read, dynamic=False)
    armt.delta_write = torch.compile(armt.delta_write, dynamic=False)
    got = ingest("sequential")()
    torch.testing.assert_close(got.A, expected.A, rtol=1e-4, atol=1e-4)
    ms.update(timed({"sequential compiled": ingest("sequential")}, m.device, args.repeats))
    print(f"{args.preset}, {args.segments} segments, {torch.get_num_threads()} threads: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in ms.items()))
    print(f"diagonal / sequential: eager {ms['sequential'] / ms['diagonal']:.2f}x, both compiled "
          f"{ms['sequential compiled'] / ms['diagonal compiled']:.2f}x; compile speeds diagonal up "
          f"{ms['diagonal'] / ms['diagonal compiled']:.2f}x, "
          f"sequential {ms['sequential'] / ms['sequential compiled']:.2f}x")


if __name__ == "__main__":
    main()
