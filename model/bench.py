"""Ingest benchmark: bare base (full attention), sequential ARMT, diagonal ARMT, and concurrent sessions through the
shared diagonal pipeline vs one after another, all on the same tokens in one run (ratios side by side).

    armt bench ingest --preset small --segments 2,8,64 --out runs/bench-small.json
Random weights (speed does not depend on training); W_mv non-zero so the memory path does real work.
"""
from __future__ import annotations

import gc
import json
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .armt import ArmtModel
from .config import ArmtConfig
from .diagonal import lane_count
from .hf_base import make_config

PRESETS = {
    # name: (layers, hidden, heads, segment_size, num_mem_tokens, d_mem)
    "small": (4, 128, 4, 64, 16, 32),
    "medium": (8, 256, 8, 128, 16, 32),
    "llama-1b": (16, 2048, 32, 1024, 128, 64),  # Llama-3.2-1B shape (8 KV heads), for a GPU
}


def build(preset: str, dtype=torch.float32, device="cpu") -> ArmtModel:
    layers, hidden, heads, seg, M, d_mem = PRESETS[preset]
    kv = 8 if preset == "llama-1b" else heads
    ffn = 8192 if preset == "llama-1b" else 4 * hidden
    cfg = make_config("llama", vocab_size=4096 if preset != "llama-1b" else 128256, hidden_size=hidden,
                      intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=1 << 20)
    model = ArmtModel.from_config(cfg, ArmtConfig(num_mem_tokens=M, d_mem=d_mem, segment_size=seg))
    with torch.no_grad():
        model.W_mv.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def preset_document(argv: list[str] | None = None, description: str = ""):
    """The bench scripts' common command line (--preset, --segments, --repeats) -> (args, model, ids [1, T]): the
    preset's random model (seed 0) and a random document of that many full segments."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build(args.preset)
    ids = torch.randint(0, model.base.vocab_size, (1, args.segments * model.config.segment_size))
    return args, model, ids


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each of `fns` (name -> callable) over `repeats` rounds, after one warm-up each.

    Each round runs every callable once, in turn, so that a drift of the machine's speed (10-20% between runs on a
    shared 2-core VM) falls on all of them alike instead of on whichever ran last; each round starts one path
    later than the one before, so that no path always follows the same one (a large path's allocations, say)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def with_flags(model: ArmtModel, fn, **flags):
    """fn run with the model's executor switches (compiled_kernels, cuda_graphs) set, then restored."""
    def run():
        saved = {k: getattr(model, k) for k in flags}
        for k, v in flags.items():
            setattr(model, k, v)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                setattr(model, k, v)
    return run


def variants(compiled: bool, graphs: bool) -> dict:
    """Name -> executor switches of the diagonal variants timed beside the plain one (keys diagonal_<name>...)."""
    out = {"compiled": {"compiled_kernels": True}} if compiled else {}
    if graphs:
        out["graphs"] = {"cuda_graphs": True}
    return out


@torch.no_grad()
def measure_length(model: ArmtModel, n_segments: int, repeats: int, with_base: bool, compiled: bool = False,
                   graphs: bool = False) -> dict:
    """One document of n_segments full segments through each path, side by side (+ the diagonal one with its step
    compiled or CUDA graphs)."""
    T = n_segments * model.config.segment_size
    ids = torch.randint(0, model.base.vocab_size, (1, T), device=model.device)
    ingest = lambda executor: lambda: model.ingest(model.new_state(), ids, executor=executor)  # noqa: E731
    fns = {"sequential": ingest("sequential"), "diagonal": ingest("diagonal")}
    for name, flags in variants(compiled, graphs).items():
        fns[f"diagonal_{name}"] = with_flags(model, ingest("diagonal"), **flags)
    if with_base:
        fns["base_full_attention"] = lambda: model.base.hf.model(ids, use_cache=False)  # no KV cache to build
    row = {"segments": n_segments, "tokens": T}
    row.update({f"{name}_s": t for name, t in timed(fns, model.device, repeats).items()})
    if model.device.type == "cuda":
        row.update({f"{name}_cuda_peak_bytes": b for name, b in cuda_peaks(fns, model).items()})
    for key in [k for k in row if k.endswith("_s")]:
        row[key[:-2] + "_tok_per_s"] = T / row[key]
    row["diagonal_over_sequential"] = row["sequential_s"] / row["diagonal_s"]
    for name in variants(compiled, graphs):
        row[f"diagonal_{name}_over_sequential"] = row["sequential_s"] / row[f"diagonal_{name}_s"]
    if with_base:
        row["diagonal_over_base"] = row["base_full_attention_s"] / row["diagonal_s"]
    return row


@torch.no_grad()
def measure_sessions(model: ArmtModel, n_sessions: int, n_segments: int, repeats: int, compiled: bool = False,
                     graphs: bool = False) -> dict:
    """n_sessions documents: one shared pipeline (default lanes, and 1 / 2 / 4 / n_sessions lanes side by side) vs one
    after another (diagonal and sequential), all timed side by side."""
    T = n_segments * model.config.segment_size
    docs = [torch.randint(0, model.base.vocab_size, (T,), device=model.device) for _ in range(n_sessions)]
    states = [model.new_state() for _ in docs]
    fns = {"shared": lambda: model.ingest_many(states, docs)}
    for name in ("diagonal", "sequential"):
        fns[f"one_by_one_{name}"] = lambda name=name: [model.ingest(s, d, executor=name) for s, d in zip(states, docs)]
    lanes = sorted({1, 2, 4, n_sessions})
    for n in lanes:
        fns[f"lanes_{n}"] = lambda n=n: model.ingest_many(states, docs, lanes=n)
    for name, flags in variants(compiled, graphs).items():
        fns[f"shared_{name}"] = with_flags(model, fns["shared"], **flags)
    t = timed(fns, model.device, repeats)
    row = {"sessions": n_sessions, "segments_each": n_segments, "default_lanes": lane_count(model.device, n_sessions),
           "shared_pipeline_s": t["shared"],
           "one_by_one_diagonal_s": t["one_by_one_diagonal"], "one_by_one_sequential_s": t["one_by_one_sequential"],
           "shared_over_one_by_one_diagonal": t["one_by_one_diagonal"] / t["shared"],
           "shared_over_one_by_one_sequential": t["one_by_one_sequential"] / t["shared"],
           "shared_by_lanes_s": {n: t[f"lanes_{n}"] for n in lanes}}
    for name in variants(compiled, graphs):
        row[f"shared_{name}_s"] = t[f"shared_{name}"]
        row[f"shared_{name}_over_one_by_one_sequential"] = t["one_by_one_sequential"] / t[f"shared_{name}"]
    if model.device.type == "cuda":
        row.update({f"{name}_cuda_peak_bytes": b for name, b in cuda_peaks(fns, model).items()})
    return row


def _case(preset: str, device, n_segments: int) -> tuple[ArmtModel, torch.Tensor]:
    """The accuracy checks' case: the preset's random model in fp32 (seed 0) and a random document ids [1, T] of
    n_segments full segments."""
    torch.manual_seed(0)
    model = build(preset, torch.float32, device)
    return model, torch.randint(0, model.base.vocab_size, (1, n_segments * model.config.segment_size), device=device)


@torch.no_grad()
def bf16_drift(preset: str, device, n_segments: int) -> dict:
    """How far the diagonal executor in bf16 lands from the sequential one in fp32, same weights and tokens.

    Recorded, not asserted (bf16 keeps 8 bits of mantissa): the largest logit difference against the largest
    logit, how often the top token agrees, and the relative distance of the memory A after the document."""
    model, ids = _case(preset, device, n_segments)
    ref_logits, ref_state = model.forward_long(ids, executor="sequential")
    logits, state = model.to(torch.bfloat16).forward_long(ids, executor="diagonal")
    diff = (logits.float() - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    return {"segments": n_segments, "logits_max_abs_diff": diff, "logits_max_abs": scale,
            "logits_relative": diff / scale,
            "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "memory_A_relative": ((state.A.float() - ref_state.A).norm() / ref_state.A.norm()).item()}


@torch.no_grad()
def fp32_exactness(preset: str, device, n_segments: int) -> dict:
    """exactness() on the preset's random model (seed 0) and a random document of n_segments full segments."""
    return {"segments": n_segments, **exactness(*_case(preset, device, n_segments))}


@torch.no_grad()
def exactness(model: ArmtModel, ids: torch.Tensor) -> dict:
    """The issue's exactness goal: the diagonal executor's fp32 logits against the sequential executor's (largest
    difference over the largest logit); each against the same model in float64 (its memory too; only the RoPE
    tables stay float32, as HF computes them, the same in both runs), whose rounding is ~1e-16 (how far fp32
    rounding alone puts either executor from the exact result: a random model's memory recurrence can amplify it
    by orders of magnitude over many segments, README "Executors"); and the two executors in float64 (the same
    math: 0 to ~1e-15, more only where the recurrence is chaotic). The model is converted to float64 and back
    (lossless)."""
    if model.config.act:
        raise ValueError("an ACT model runs the sequential order in both executors: nothing to compare")
    dtype = model.dtype
    seq, diag = (model.forward_long(ids, executor=e)[0] for e in ("sequential", "diagonal"))
    model.to(torch.float64)
    try:
        seq64, diag64 = (model.forward_long(ids, executor=e)[0] for e in ("sequential", "diagonal"))
    finally:
        model.to(dtype)
    scale = seq64.abs().max().item()
    rel = lambda a, b: (a.double() - b.double()).abs().max().item() / scale  # noqa: E731
    return {"diagonal_vs_sequential_relative": rel(diag, seq),
            "sequential_vs_float64_relative": rel(seq, seq64),
            "diagonal_vs_float64_relative": rel(diag, seq64),
            "diagonal_vs_sequential_float64_relative": rel(diag64, seq64)}


def format_exactness(d: dict) -> str:
    """An exactness() result in one line (the bench's and bench/exactness.py's)."""
    return (f"float32 diagonal vs sequential {d['diagonal_vs_sequential_relative']:.1e} of the largest logit; each "
            f"vs float64: sequential {d['sequential_vs_float64_relative']:.1e}, diagonal "
            f"{d['diagonal_vs_float64_relative']:.1e}; float64 diagonal vs sequential "
            f"{d['diagonal_vs_sequential_float64_relative']:.1e}")


def _format_drift(d: dict) -> str:
    return (f"largest logit difference {d['logits_relative']:.1%} of the largest logit, same top token at "
            f"{d['top1_agreement']:.1%} of positions, memory A {d['memory_A_relative']:.1%} apart")


def _accuracy(result: dict, preset: str, device, n_segments: int) -> None:
    """bf16 drift and fp32 exactness into result (each rebuilds the model: on a large preset the likeliest parts to
    run out of memory or time, so a failure is recorded, not raised; the float64 one last)."""
    checks = (("bf16_drift", "bf16 diagonal vs fp32 sequential", bf16_drift, _format_drift),
              ("fp32_exactness", "exactness", fp32_exactness, format_exactness))
    for key, label, measure, describe in checks:
        try:
            result[key] = d = measure(preset, device, n_segments)
        except (RuntimeError, MemoryError) as e:
            result[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{key.replace('_', ' ')} not measured: {result[key]['error']}", flush=True)
            continue
        print(f"{label}, {d['segments']} segment{'s' * (d['segments'] != 1)}: {describe(d)}", flush=True)


def _format_sessions(row: dict) -> str:
    """The sessions result as README "Performance" quotes it (the JSON has every figure)."""
    lanes = ", ".join(f"{n} lane{'s' * (int(n) > 1)} {t * 1e3:.0f} ms" for n, t in row["shared_by_lanes_s"].items())
    extra = "".join(f" ({name} {row[f'shared_{name}_over_one_by_one_sequential']:.2f}x)"
                    for name in ("compiled", "graphs") if f"shared_{name}_s" in row)
    lane_word = "lane" + "s" * (row["default_lanes"] != 1)
    return (f"{row['sessions']} sessions x {row['segments_each']} segments: shared pipeline ({row['default_lanes']} "
            f"{lane_word}) {row['shared_over_one_by_one_diagonal']:.2f}x over one-by-one diagonal, "
            f"{row['shared_over_one_by_one_sequential']:.2f}x over one-by-one sequential{extra}\n"
            f"  shared {row['shared_pipeline_s'] * 1e3:.0f} ms, one-by-one diagonal "
            f"{row['one_by_one_diagonal_s'] * 1e3:.0f} ms, one-by-one sequential "
            f"{row['one_by_one_sequential_s'] * 1e3:.0f} ms; by lanes: {lanes}")


def cuda_peaks(fns: dict, model: ArmtModel | None = None) -> dict:
    """Per path, the most CUDA memory it held beyond what was allocated before it ran (weights, inputs).

    The model's CUDA graphs are dropped before each path, so that a path using them captures them inside the
    measurement: a replay allocates nothing (its memory was set aside at capture, in the timed warm-up), so the
    allocator would otherwise see only the eager part of a graphed step."""
    peaks = {}
    for name, fn in fns.items():
        if model is not None:
            model.drop_block_graphs()
            gc.collect()  # the dropped graphs' pool goes back before `before` is read
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
    return peaks


def peak_memory(device) -> dict:
    """The process's peaks: RSS (on a CPU it includes building the model) and, on a GPU, CUDA memory since the last
    per-path measurement (see cuda_peaks for each path's own)."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.device(device).type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


@dataclass
class Options:
    """What `run` measures besides sequential vs diagonal (the CLI's flags)."""

    sessions: int = 8  # concurrent documents for the shared pipeline (0: skip)
    session_segments: int = 4
    repeats: int = 3
    base_max_tokens: int = 40_000  # longest document for the bare full-attention base
    compiled: bool = False  # also the diagonal executor with its step torch.compile'd
    graphs: bool = False  # also the diagonal executor with CUDA graphs (CUDA only)
    drift_segments: int = 8  # fp32 exactness and bf16 drift on a document this long (0: skip)


def run(preset: str, segments: list[int], opts: Options = Options(), dtype=torch.float32, device="cpu",
        out: Path | None = None, plot: Path | None = None) -> dict:
    torch.manual_seed(0)
    model = build(preset, dtype, device)
    result = {"preset": preset, "shape": dict(zip(("layers", "hidden", "heads", "segment_size", "mem_tokens",
                                                   "d_mem"), PRESETS[preset])),
              "dtype": str(dtype), "device": str(device), "machine": machine(device), "torch": torch.__version__,
              "state_bytes": model.new_state().nbytes, "lengths": [], "threads": torch.get_num_threads()}
    for n in segments:  # the JSON is rewritten after each part: a time limit or a late failure keeps the rest
        with_base = n * model.config.segment_size <= opts.base_max_tokens
        row = measure_length(model, n, opts.repeats, with_base, opts.compiled, opts.graphs)
        result["lengths"].append(row)
        print(_format_row(row), flush=True)
        _write(result, out, device)
    if opts.sessions:
        result["sessions"] = measure_sessions(model, opts.sessions, opts.session_segments, opts.repeats,
                                              opts.compiled, opts.graphs)
        print(_format_sessions(result["sessions"]), flush=True)
        _write(result, out, device)
    if plot:
        draw(result, plot)
    if opts.drift_segments:
        del model
        _accuracy(result, preset, device, opts.drift_segments)
        _write(result, out, device, peaks=False)  # the peaks stay those of the measured paths
    return result


def _write(result: dict, out: Path | None, device, peaks: bool = True) -> None:
    """The result so far as JSON, with the process's memory peaks up to now."""
    if peaks:
        result.update(peak_memory(device))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


def _format_row(row: dict) -> str:
    base = f" base {row['base_full_attention_tok_per_s']:9.0f} tok/s  diag/base {row['diagonal_over_base']:5.2f}x" \
        if "diagonal_over_base" in row else ""
    extra = "".join(f" {name} {row[f'diagonal_{name}_tok_per_s']:9.0f} tok/s  /seq "
                    f"{row[f'diagonal_{name}_over_sequential']:5.2f}x |" for name in ("compiled", "graphs")
                    if f"diagonal_{name}_s" in row)
    return (f"{row['segments']:5d} seg {row['tokens']:7d} tok | seq {row['sequential_tok_per_s']:9.0f} tok/s "
            f"diag {row['diagonal_tok_per_s']:9.0f} tok/s  diag/seq {row['diagonal_over_sequential']:5.2f}x |"
            f"{extra}{base}")


def machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def draw(result: dict, path: Path) -> None:
    """Time vs length for each path (needs matplotlib: `pip install -e .[bench]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    rows = result["lengths"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("sequential_s", "sequential ARMT"), ("diagonal_s", "diagonal ARMT"),
                       ("base_full_attention_s", "base, full attention")):
        pts = [(r["tokens"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("document tokens"), ax.set_ylabel("seconds")
    ax.set_title(f"ingest, {result['preset']} ({result['machine']})")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
