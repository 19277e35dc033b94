"""`armt` command line: the HTTP service (`serve`) and its client (`ingest`, `ask`, `sessions`); inspect a model
directory, run a document + question through the engine, benchmarks, demo."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ARMT engine command line")

DEMO_DIR = Path(".cache/demo-model")


def _load(model_dir: Path):
    import torch

    from model import ArmtModel

    try:
        return ArmtModel.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def info(model_dir: Path) -> None:
    """Print a model's configuration, size and fingerprint as JSON."""
    m = _load(model_dir)
    params = sum(p.numel() for p in m.parameters())
    state = m.new_state()
    typer.echo(json.dumps({"base": m.base.kind, "layers": m.n_layers, "d_model": m.base.d_model,
                           "parameters": params, "armt": m.config.to_dict(), "state_bytes": state.nbytes,
                           "fingerprint": m.fingerprint, "tokenizer": m.tokenizer is not None}, indent=2))


def _encode(m, text: str) -> list[int]:
    if m.tokenizer is not None:
        return m.tokenizer.encode(text).ids
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        typer.echo("error: this model has no tokenizer.json; give space-separated token ids", err=True)
        raise typer.Exit(2) from None


@app.command()
def generate(
    model_dir: Path,
    prompt: str = typer.Option(..., help="question (text, or token ids when the model has no tokenizer)"),
    context: Path = typer.Option(None, help="file read into memory first"),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    executor: str = "sequential",
) -> None:
    """Ingest a context file, then stream the answer to a prompt."""
    m = _load(model_dir)
    state = m.new_state()
    start = time.perf_counter()
    if context is not None:
        state = m.ingest(state, _encode(m, context.read_text(encoding="utf-8")), executor=executor)
    ingest_s = time.perf_counter() - start
    try:
        stream = m.generate(state, _encode(m, prompt), max_new_tokens=max_new_tokens, temperature=temperature,
                            executor=executor)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for token in stream:
        piece = m.tokenizer.decode([token]) if m.tokenizer is not None else f"{token} "
        sys.stdout.write(piece)
        sys.stdout.flush()
    typer.echo(f"\n[{state.tokens} context tokens, {state.segments} segments, ingest {ingest_s:.2f}s, "
               f"state {state.nbytes} bytes]", err=True)


def demo_tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on Python's bundled documentation (offline, ~1 s)."""
    from pydoc_data.topics import topics

    from model.text import train_tokenizer

    return train_tokenizer(list(topics.values()), vocab_size=vocab)


@app.command("init-random")
def init_random(out_dir: Path, base: str = "llama", layers: int = 4, hidden: int = 128, vocab: int = 512,
                num_mem_tokens: int = 16, d_mem: int = 32, segment_size: int = 64, seed: int = 0,
                tokenizer: bool = False) -> None:
    """Write a randomly initialised ARMT in the project format (untrained: for plumbing and benchmarks).

    --tokenizer adds a byte-level BPE tokenizer (trained on Python's docs, `vocab` tokens, its <|endoftext|> as
    eos) so that the HTTP service, which takes text, can serve it.
    """
    from transformers import GPT2Config, LlamaConfig

    from model import ArmtConfig, ArmtModel
    from model.text import EOS

    tok = demo_tokenizer(vocab) if tokenizer else None
    eos = {"eos_token_id": tok.token_to_id(EOS), "bos_token_id": tok.token_to_id(EOS)} if tok else {}
    if base == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                          max_position_embeddings=4096, **eos)
    elif base == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 32),
                         n_positions=1024, **eos)
    else:
        typer.echo("error: --base must be llama or gpt2", err=True)
        raise typer.Exit(2)
    armt = ArmtConfig(num_mem_tokens=num_mem_tokens, d_mem=d_mem, segment_size=segment_size)
    model = ArmtModel.from_config(cfg, armt, seed=seed)
    model.tokenizer = tok
    model.save_pretrained(out_dir)
    typer.echo(f"wrote {out_dir}")


bench_app = typer.Typer(no_args_is_help=True, help="benchmarks (ratios measured side by side in one run)")
app.add_typer(bench_app, name="bench")


@bench_app.command("ingest")
def bench_ingest(
    preset: str = typer.Option("small", help="small | medium | llama-1b (model shape; random weights)"),
    segments: str = typer.Option("2,8,64", help="document lengths, in segments"),
    sessions: int = typer.Option(8, help="concurrent documents for the shared-pipeline comparison (0: skip)"),
    session_segments: int = typer.Option(4, help="segments per concurrent document"),
    repeats: int = typer.Option(3, help="timed runs per measurement (median; one warm-up first)"),
    base_max_tokens: int = typer.Option(40_000, help="longest document for the bare full-attention base"),
    device: str = "cpu",
    bf16: bool = typer.Option(False, help="bfloat16 weights (the memory state stays fp32)"),
    out: Path = typer.Option(Path("runs/bench-ingest.json"), help="JSON results"),
    plot: Path = typer.Option(Path("runs/bench-ingest.png"), help="PNG of time vs length (needs matplotlib)"),
) -> None:
    """Bare base vs sequential vs diagonal ARMT ingest, and N sessions shared vs one by one."""
    import torch

    from model.bench import PRESETS, run

    if preset not in PRESETS:
        typer.echo(f"error: --preset must be one of {sorted(PRESETS)}", err=True)
        raise typer.Exit(2)
    lengths = [int(x) for x in segments.split(",") if x.strip()]
    dtype = torch.bfloat16 if bf16 else torch.float32
    run(preset, lengths, sessions, session_segments, repeats, base_max_tokens, dtype, device, out, plot)


@app.command()
def demo(model_dir: Path = DEMO_DIR) -> None:
    """Engine smoke run: ingest a random 20,000-token document, print the speed and a continuation.

    Uses MODEL_DIR, or writes an untrained random model there first: its answer is noise, it only shows that a
    long document goes into a fixed-size memory and an answer streams out.
    """
    if not (model_dir / "armt_config.json").is_file():
        init_random(model_dir)
    m = _load(model_dir)
    import random

    rng = random.Random(0)
    doc = [rng.randrange(m.base.vocab_size) for _ in range(20_000)]
    start = time.perf_counter()
    state = m.ingest(m.new_state(), doc, executor="diagonal")
    elapsed = time.perf_counter() - start
    typer.echo(f"ingested {state.tokens} tokens ({state.segments} segments) in {elapsed:.2f}s "
               f"= {state.tokens / elapsed:.0f} tokens/s; memory state {state.nbytes} bytes")
    answer = list(m.generate(state, doc[:8], max_new_tokens=16, stop_token_ids=[]))
    typer.echo(f"greedy continuation (untrained model, token ids): {answer}")


# ---------------------------------------------------------------------------------------------- HTTP service
URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="ARMT_URL", help="server address")
API_KEY = typer.Option(None, "--api-key", envvar="ARMT_API_KEY", help="bearer key (when the server has keys)")


def ensure_demo_model(model_dir: Path) -> None:
    """The untrained demo model, with a tokenizer (the service takes text): created, or completed, when missing."""
    if not (model_dir / "armt_config.json").is_file():
        typer.echo(f"no model at {model_dir}: writing an untrained random demo model there (answers are noise)")
        init_random(model_dir, tokenizer=True)
    elif not (model_dir / "tokenizer.json").is_file():  # written by `armt demo`, which needs no tokenizer
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        demo_tokenizer(vocab).save(str(model_dir / "tokenizer.json"))


@app.command()
def serve(host: str = typer.Option(None, help="default ARMT_HOST or 127.0.0.1"),
          port: int = typer.Option(None, help="default ARMT_PORT or 8000"),
          model: Path = typer.Option(None, help="model directory (default ARMT_MODEL, else the default model, "
                                                "else .cache/demo-model)")) -> None:
    """Run the HTTP service (uvicorn); every other setting comes from ARMT_* variables (see README)."""
    import uvicorn

    from service.http.app import create_app
    from service.settings import DEMO_MODEL_DIR, Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "model": model}.items() if v is not None}
    settings = Settings(**overrides)
    if settings.model_dir() == DEMO_MODEL_DIR:
        ensure_demo_model(DEMO_MODEL_DIR)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def _client(url: str, api_key: str | None):
    from service.client import ArmtClient

    return ArmtClient(url, api_key=api_key)


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


@app.command()
def ingest(file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
           session: str = typer.Option(None, help="append to this session (default: a new one)"),
           url: str = URL, api_key: str = API_KEY,
           chunk_bytes: int = typer.Option(1 << 20, help="bytes per append request")) -> None:
    """Upload a UTF-8 text file of any size into a session; run again to resume after an interruption."""
    import httpx
    from tqdm import tqdm

    from service.client import ArmtHTTPError, ingest_file

    with _client(url, api_key) as client:
        try:
            session = session or client.create_session()["id"]
            typer.echo(f"session {session}", err=True)
            with tqdm(total=file.stat().st_size, unit="B", unit_scale=True, desc="ingest") as bar:
                def progress(done: int, total: int) -> None:
                    bar.update(done - bar.n)

                result = ingest_file(client, file, session, chunk_bytes=chunk_bytes, progress=progress)
        except (ArmtHTTPError, httpx.HTTPError, ValueError) as e:
            _fail(e)
    typer.echo(json.dumps({"session": session, **{k: result[k] for k in ("offset", "tokens", "segments")}}))


@app.command()
def ask(session: str, question: str, url: str = URL, api_key: str = API_KEY, max_new_tokens: int = 64,
        temperature: float = 0.0) -> None:
    """Ask a question about a session's document; the answer is printed as it streams."""
    import httpx

    from service.client import ArmtHTTPError

    with _client(url, api_key) as client:
        try:
            for event in client.ask_stream(session, question, max_new_tokens=max_new_tokens,
                                           temperature=temperature):
                if event["event"] == "token":
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif event["event"] == "done":
                    typer.echo(f"\n[{event['finish_reason']}, {event['usage']['completion_tokens']} tokens]",
                               err=True)
        except (ArmtHTTPError, httpx.HTTPError) as e:
            _fail(e)


@app.command()
def sessions(url: str = URL, api_key: str = API_KEY) -> None:
    """List your sessions: id, bytes acknowledged, tokens, last update."""
    import httpx

    from service.client import ArmtHTTPError

    with _client(url, api_key) as client:
        try:
            for s in client.iter_sessions():
                typer.echo(f"{s['id']}  {s['offset']:>12} bytes  {s['tokens']:>10} tokens  {s['updated_at']}")
        except (ArmtHTTPError, httpx.HTTPError) as e:
            _fail(e)


if __name__ == "__main__":
    app()


@app.command()
def train(
    out: Path = typer.Option(Path("runs/train"), help="run directory: log, checkpoint, final model in OUT/model"),
    task: str = typer.Option("qa1", help="qa1 | qa2 | remember"),
    init: Path = typer.Option(None, help="start from this local model directory (else a fresh model)"),
    minutes: float = typer.Option(45.0, help="training time budget (evaluation checks included)"),
    max_steps: int = 100_000,
    stages: str = typer.Option("0,1,2,4,8,16", help="curriculum in segments (0 = dense single segment)"),
    batch_size: int = 32,
    aux_batch_size: int = typer.Option(16, help="key-gap-value samples per step (0: off)"),
    copy_batch_size: int = typer.Option(8, help="prose-repeat (copy) samples per step (0: off)"),
    probe_layer: int = typer.Option(2, help="0-based block whose output the name-binding probe reads"),
    probe_weight: float = typer.Option(0.2, help="name-binding probe weight (0: off)"),
    lr: float = 1e-3,
    layers: int = 4, hidden: int = 128, heads: int = 4, ffn: int = 512,
    num_mem_tokens: int = 16, d_mem: int = 32, segment_size: int = 64, vocab: int = 3000,
    seed: int = 0,
    resume: bool = typer.Option(False, help="continue OUT/checkpoint exactly"),
    device: str = "cpu",
    bf16: bool = typer.Option(False, help="bfloat16 weights (memory state stays fp32)"),
    export: Path = typer.Option(None, help="also copy the final model directory here (e.g. model/weights/default)"),
) -> None:
    """Curriculum training with back-propagation through the memory (sequential order); see model/training."""
    import shutil

    import torch
    from tqdm import tqdm

    from model.tasks import Codec
    from model.training import TrainConfig, Trainer, default_tokenizer, load_for_training, new_model, write_log

    torch.manual_seed(seed)
    if init is not None:
        model = load_for_training(init)
    else:
        model = new_model(default_tokenizer(vocab), layers, hidden, heads, ffn, num_mem_tokens, d_mem,
                          segment_size, seed)
    model = model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    cfg = TrainConfig(task=task, stages=tuple(int(s) for s in stages.split(",")), batch_size=batch_size,
                      aux_batch_size=aux_batch_size, copy_batch_size=copy_batch_size, probe_layer=probe_layer,
                      probe_weight=probe_weight, lr=lr, minutes=minutes,
                      max_steps=max_steps, seed=seed)
    trainer = Trainer(model, Codec(model.tokenizer), cfg, out)
    if resume and not trainer.load_checkpoint():
        typer.echo(f"error: no checkpoint in {out / 'checkpoint'}", err=True)
        raise typer.Exit(2)
    params = sum(p.numel() for p in model.parameters())
    typer.echo(f"training {params:,} parameters on {task}, stages {cfg.stages}, {minutes} min budget -> {out}")
    bar = tqdm(total=int(minutes * 60), unit="s", mininterval=5, bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")

    def progress(row: dict) -> None:
        bar.n = int(row["seconds"])
        bar.set_postfix_str(f"step {row['step']} stage {trainer.stage} loss {row['loss']:.3f} "
                            f"acc {row['running_acc']:.3f} {row['tokens_per_s']} tok/s", refresh=True)

    trainer.run(write_log(out / "train_log.jsonl"), progress)
    bar.close()
    model.eval()
    model.save_pretrained(out / "model")
    typer.echo(f"wrote {out / 'model'} after {trainer.state.step} steps, {trainer.state.seconds:.0f}s, "
               f"stage {trainer.stage}")
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        for f in (out / "model").iterdir():
            shutil.copy2(f, export / f.name)
        typer.echo(f"exported to {export}")


@app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(None, help="model directory (default: the shipped default model)"),
    task: str = typer.Option("qa1", help="qa1 | qa2 | remember"),
    segments: str = typer.Option("1,2,4,8,16,32,64", help="document lengths in segments"),
    samples: int = typer.Option(256, help="documents per length"),
    long_samples: int = typer.Option(64, help="documents per length above 256 segments (time)"),
    split: str = typer.Option("eval", help="prose source: eval (held out) or train"),
    seed: int = 1234,
    batch_size: int = 16,
    out: Path = typer.Option(None, help="JSON results (default runs/eval-TASK.json)"),
    plot: Path = typer.Option(None, help="PNG of accuracy vs length (needs matplotlib)"),
    executor: str = "diagonal",
) -> None:
    """Exact-match accuracy against document length, with 95% Wilson intervals; JSON and an optional PNG."""
    import torch

    from model import default_model_path
    from model.tasks import Codec
    from model.training import accuracy

    m = _load(model_dir or default_model_path())
    if m.tokenizer is None:
        typer.echo("error: the model has no tokenizer.json", err=True)
        raise typer.Exit(2)
    torch.set_grad_enabled(False)
    codec = Codec(m.tokenizer)
    rows = []
    for n in (int(x) for x in segments.split(",") if x.strip()):
        start = time.perf_counter()
        k = samples if n <= 256 else long_samples
        row = accuracy(m, codec, task, n, k, split=split, seed=seed + n, batch_size=batch_size, executor=executor)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        typer.echo(f"{task} {n:5d} seg {row['tokens']:8d} tok  exact match {row['accuracy']:.3f} "
                   f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]  n={row['samples']}  {row['seconds']}s")
    out = out or Path(f"runs/eval-{task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir or default_model_path()), "split": split, "rows": rows},
                              indent=2))
    if plot is not None:
        _plot_eval(rows, task, plot)


def _plot_eval(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["segments"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    err = [[y - r["ci95"][0] for y, r in zip(ys, rows)], [r["ci95"][1] - y for y, r in zip(ys, rows)]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("document length (segments)")
    ax.set_ylabel("exact match")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
