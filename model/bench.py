"""Ingest benchmark: bare base (full attention), sequential ARMT, diagonal ARMT, and concurrent sessions through the
shared diagonal pipeline vs one after another, all on the same tokens in one run (ratios side by side).

    armt bench ingest --preset small --segments 2,8,64 --out runs/bench-small.json
Random weights (speed does not depend on training); W_mv non-zero so the memory path does real work.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .armt import ArmtModel
from .config import ArmtConfig
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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_length(model: ArmtModel, n_segments: int, repeats: int, with_base: bool, compiled: bool = False) -> dict:
    """One document of n_segments full segments through each path (+ the diagonal one with compiled kernels)."""
    T = n_segments * model.config.segment_size
    ids = torch.randint(0, model.base.vocab_size, (1, T), device=model.device)
    row = {"segments": n_segments, "tokens": T}
    for name in ("sequential", "diagonal"):
        row[f"{name}_s"] = timed(lambda: model.ingest(model.new_state(), ids, executor=name), model.device, repeats)
    if compiled:
        with compiled_kernels(model):
            row["diagonal_compiled_s"] = timed(lambda: model.ingest(model.new_state(), ids, executor="diagonal"),
                                               model.device, repeats)
        row["diagonal_compiled_over_sequential"] = row["sequential_s"] / row["diagonal_compiled_s"]
    if with_base:
        row["base_full_attention_s"] = timed(lambda: model.base.hf.model(ids), model.device, repeats)
    for key in [k for k in row if k.endswith("_s")]:
        row[key[:-2] + "_tok_per_s"] = T / row[key]
    row["diagonal_over_sequential"] = row["sequential_s"] / row["diagonal_s"]
    if with_base:
        row["diagonal_over_base"] = row["base_full_attention_s"] / row["diagonal_s"]
    return row


@torch.no_grad()
def measure_sessions(model: ArmtModel, n_sessions: int, n_segments: int, repeats: int, compiled: bool = False) -> dict:
    """n_sessions documents: one shared pipeline (default lanes, and 1 / 2 / n_sessions lanes side by side) vs one
    after another (diagonal and sequential)."""
    T = n_segments * model.config.segment_size
    docs = [torch.randint(0, model.base.vocab_size, (T,), device=model.device) for _ in range(n_sessions)]
    states = [model.new_state() for _ in docs]
    shared = timed(lambda: model.ingest_many(states, docs), model.device, repeats)
    one_by_one = {name: timed(lambda: [model.ingest(s, d, executor=name) for s, d in zip(states, docs)],
                              model.device, repeats) for name in ("diagonal", "sequential")}
    row = {"sessions": n_sessions, "segments_each": n_segments, "shared_pipeline_s": shared,
           "one_by_one_diagonal_s": one_by_one["diagonal"], "one_by_one_sequential_s": one_by_one["sequential"],
           "shared_over_one_by_one_diagonal": one_by_one["diagonal"] / shared,
           "shared_over_one_by_one_sequential": one_by_one["sequential"] / shared,
           "shared_by_lanes_s": {n: timed(lambda: model.ingest_many(states, docs, lanes=n), model.device, repeats)
                                 for n in sorted({1, 2, n_sessions})}}
    if compiled:
        with compiled_kernels(model):
            row["shared_compiled_s"] = timed(lambda: model.ingest_many(states, docs), model.device, repeats)
        row["shared_compiled_over_one_by_one_sequential"] = one_by_one["sequential"] / row["shared_compiled_s"]
    return row


@contextmanager
def compiled_kernels(model: ArmtModel):
    """The diagonal executor with torch.compile'd kernels (model/kernels.py) inside the block; compiling happens in
    the timed() warm-up run."""
    model.compiled_kernels = True
    try:
        yield
    finally:
        model.compiled_kernels = False


def peak_memory(device) -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.device(device).type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run(preset: str, segments: list[int], sessions: int, session_segments: int, repeats: int, base_max_tokens: int,
        dtype=torch.float32, device="cpu", out: Path | None = None, plot: Path | None = None,
        compiled: bool = False) -> dict:
    torch.manual_seed(0)
    model = build(preset, dtype, device)
    result = {"preset": preset, "shape": dict(zip(("layers", "hidden", "heads", "segment_size", "mem_tokens",
                                                   "d_mem"), PRESETS[preset])),
              "dtype": str(dtype), "device": str(device), "machine": machine(device), "torch": torch.__version__,
              "state_bytes": model.new_state().nbytes, "lengths": [], "threads": torch.get_num_threads()}
    for n in segments:
        with_base = n * model.config.segment_size <= base_max_tokens
        row = measure_length(model, n, repeats, with_base, compiled)
        result["lengths"].append(row)
        print(_format_row(row), flush=True)
    if sessions:
        result["sessions"] = measure_sessions(model, sessions, session_segments, repeats, compiled)
        print(json.dumps(result["sessions"], indent=1), flush=True)
    result.update(peak_memory(device))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    if plot:
        draw(result, plot)
    return result


def _format_row(row: dict) -> str:
    base = f" base {row['base_full_attention_tok_per_s']:9.0f} tok/s  diag/base {row['diagonal_over_base']:5.2f}x" \
        if "diagonal_over_base" in row else ""
    fused = f" compiled {row['diagonal_compiled_tok_per_s']:9.0f} tok/s  /seq " \
        f"{row['diagonal_compiled_over_sequential']:5.2f}x |" if "diagonal_compiled_s" in row else ""
    return (f"{row['segments']:5d} seg {row['tokens']:7d} tok | seq {row['sequential_tok_per_s']:9.0f} tok/s "
            f"diag {row['diagonal_tok_per_s']:9.0f} tok/s  diag/seq {row['diagonal_over_sequential']:5.2f}x |"
            f"{fused}{base}")


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
