"""Where a diagonal step's time goes on this machine, against a sequential segment (the figures behind README
"Performance", "Where the time goes"):

    .venv/bin/python -m bench.step_profile --preset small --segments 64

1. per-call overhead: the same executors on a model so small that its kernels cost ~nothing (hidden 16, the
   preset's layer count), so the time is Python, dispatch and allocation: per diagonal step and per sequential
   segment;
2. the preset on 1 and on 2 threads, side by side: how much each executor gains from the second core;
3. one pipeline run under torch.profiler: the share of the batched matmuls in the diagonal executor's op time;
4. minor page faults per sequential segment, per diagonal step, and per shared-pipeline step of 8 sessions x 4
   segments, a mean over 5 runs (once more with ARMT_KEEP_HEAP=0 for glibc's default heap settings: model/heap.py).
"""
from __future__ import annotations

import torch


def _ingest(model, ids, executor):
    return lambda: model.ingest(model.new_state(), ids, executor=executor)


@torch.no_grad()
def overhead(layers: int, segments: int, repeats: int) -> dict:
    """ms per sequential segment and per diagonal step when the kernels cost ~nothing."""
    from model.armt import ArmtModel
    from model.bench import timed
    from model.config import ArmtConfig
    from model.hf_base import make_config

    cfg = make_config("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    m = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=2, d_mem=4, segment_size=4)).eval()
    ids = torch.randint(0, 64, (1, segments * 4))
    t = timed({name: _ingest(m, ids, name) for name in ("sequential", "diagonal")}, m.device, repeats)
    return {"sequential_ms_per_segment": round(t["sequential"] * 1e3 / segments, 2),
            "diagonal_ms_per_step": round(t["diagonal"] * 1e3 / (segments + layers - 1), 2)}


@torch.no_grad()
def by_threads(model, ids, repeats: int) -> dict:
    from model.bench import timed

    def on(threads: int, executor: str):
        def run():
            torch.set_num_threads(threads)
            try:
                _ingest(model, ids, executor)()
            finally:
                torch.set_num_threads(before)
        return run

    before = torch.get_num_threads()
    # the four paths in one timed() call: its rounds interleave them, so drift falls on all alike
    t = timed({(n, name): on(n, name) for n in (1, 2) for name in ("sequential", "diagonal")}, model.device, repeats)
    return {n: {name: round(t[n, name] * 1e3, 1) for name in ("sequential", "diagonal")} for n in (1, 2)}


@torch.no_grad()
def matmul_share(model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    _ingest(model, ids, "diagonal")()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _ingest(model, ids, "diagonal")()
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    mm = sum(v for k, v in ops.items() if k in ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm"))
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
    return {"matmul_share": round(mm / total, 3), "top_ops_ms": {k: round(v / 1e3, 1) for k, v in top}}


@torch.no_grad()
def page_faults(model, ids, segments: int) -> dict:
    """Minor page faults per sequential segment, diagonal step and shared-pipeline step (8 x 4 sessions, 4 lanes)."""
    import resource

    docs = [ids[0, : 4 * model.config.segment_size]] * 8
    runs = {"sequential_per_segment": (_ingest(model, ids, "sequential"), segments),
            "diagonal_per_step": (_ingest(model, ids, "diagonal"), segments + model.n_layers - 1),
            "shared_8x4_per_step": (lambda: model.ingest_many([model.new_state() for _ in docs], docs, lanes=4),
                                    8 + model.n_layers - 1)}
    out = {}
    for name, (fn, steps) in runs.items():  # faults come in bursts: a mean over 5 runs
        fn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            fn()
        out[name] = round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (5 * steps), 1)
    return out


def main() -> None:
    from model.bench import preset_document

    args, model, ids = preset_document(description=__doc__.splitlines()[0])
    layers, steps = model.n_layers, args.segments + model.n_layers - 1
    print(f"{args.preset}, {args.segments} segments ({steps} diagonal steps)")
    print("overhead (kernels ~free):", overhead(layers, args.segments, args.repeats))
    for threads, ms in by_threads(model, ids, args.repeats).items():
        print(f"{threads} thread(s): sequential {ms['sequential']} ms ({ms['sequential'] / args.segments:.2f} per "
              f"segment), diagonal {ms['diagonal']} ms ({ms['diagonal'] / steps:.2f} per step), "
              f"diag/seq {ms['sequential'] / ms['diagonal']:.2f}x")
    print("diagonal op time:", matmul_share(model, ids))
    print("minor page faults:", page_faults(model, ids, args.segments))


if __name__ == "__main__":
    main()
