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
EXECUTORS = ("sequential", "diagonal")


def _load(model_dir: Path):
    import torch

    from model import ArmtModel

    try:
        return ArmtModel.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    except (OSError, ValueError) as e:  # missing files, a damaged or foreign weights file, a bad config
        _fail(str(e))


def _fail(message: str) -> None:
    """A user's mistake: its message, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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
    if m.tokenizer is not None:  # as the service: text is text, special-token spellings included
        m.tokenizer.encode_special_tokens = True
        return m.tokenizer.encode(text, add_special_tokens=False).ids
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        _fail("this model has no tokenizer.json; give space-separated token ids")


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
    if executor not in EXECUTORS:
        raise typer.BadParameter(f"{executor!r} is not one of {', '.join(EXECUTORS)}", param_hint="--executor")
    m = _load(model_dir)
    state = m.new_state()
    start = time.perf_counter()
    try:
        text = context.read_text(encoding="utf-8") if context is not None else ""
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"cannot read --context {context}: {e}")
    if m.tokenizer is not None:  # the question follows the document's last word after one space, as the service
        from model.text import question_text  # and the training data put it (a file's final newline is not text)

        text, prompt = text.rstrip(), question_text(prompt)
    if text:
        try:
            state = m.ingest(state, _encode(m, text), executor=executor)
        except ValueError as e:  # token ids outside the vocabulary in an id file, say
            _fail(f"--context {context}: {e}")
    ingest_s = time.perf_counter() - start
    try:
        stream = m.generate(state, _encode(m, prompt), own_segment=True, max_new_tokens=max_new_tokens,
                            temperature=temperature, executor=executor)
    except ValueError as e:
        _fail(str(e))
    from service.core.textstream import AnswerText

    eos = set(m.default_stop_ids())
    answer = AnswerText(m.tokenizer, ()) if m.tokenizer is not None else None  # whole characters, no lead space
    for token in stream:
        if token in eos:
            break
        sys.stdout.write(answer.add(token) if answer is not None else f"{token} ")
        sys.stdout.flush()
    if answer is not None:
        sys.stdout.write(answer.flush())
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

    if layers < 1 or hidden < 32 or hidden % 32:
        _fail(f"--layers must be >= 1 and --hidden a multiple of 32 (heads of 32), got {layers} and {hidden}")
    if vocab < 2:
        _fail(f"--vocab must be >= 2, got {vocab}")
    tok = demo_tokenizer(vocab) if tokenizer else None
    if tok is not None and tok.get_vocab_size() > vocab:
        _fail(f"--vocab {vocab} is too small for a byte-level tokenizer ({tok.get_vocab_size()} tokens at least)")
    eos = {"eos_token_id": tok.token_to_id(EOS), "bos_token_id": tok.token_to_id(EOS)} if tok else {}
    if base == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                          max_position_embeddings=4096, **eos)
    elif base == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 32),
                         n_positions=1024, **eos)
    else:
        _fail("--base must be llama or gpt2")
    try:
        armt = ArmtConfig(num_mem_tokens=num_mem_tokens, d_mem=d_mem, segment_size=segment_size)
        model = ArmtModel.from_config(cfg, armt, seed=seed)  # e.g. more positions than a GPT-2 table has
    except ValueError as e:
        _fail(str(e))
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
    compile: bool = typer.Option(False, "--compile", help="also time the diagonal executor with its step "
                                                         "compiled (model/kernels.py; needs a C++ compiler on CPU)"),
    graphs: bool = typer.Option(False, "--graphs", help="also time the diagonal executor with CUDA graphs "
                                                        "(model/graphs.py; --device cuda only)"),
    drift_segments: int = typer.Option(8, help="record fp32 diagonal vs sequential (each also vs float64) and "
                                               "bf16 diagonal vs fp32 sequential on a document this long (0: skip)"),
    out: Path = typer.Option(Path("runs/bench-ingest.json"), help="JSON results"),
    plot: Path = typer.Option(Path("runs/bench-ingest.png"), help="PNG of time vs length (needs matplotlib)"),
) -> None:
    """Bare base vs sequential vs diagonal ARMT ingest, and N sessions shared vs one by one."""
    import torch

    from model.bench import PRESETS, Options, run

    if preset not in PRESETS:
        _fail(f"--preset must be one of {sorted(PRESETS)}")
    if graphs and not device.startswith("cuda"):
        _fail("--graphs needs --device cuda (CUDA graphs)")
    from service.cli_options import check_device, int_list

    check_device(device)
    lengths = list(int_list(segments, "--segments", low=1))
    for hint, value, low in (("--repeats", repeats, 1), ("--sessions", sessions, 0),
                             ("--session-segments", session_segments, 1), ("--drift-segments", drift_segments, 0),
                             ("--base-max-tokens", base_max_tokens, 0)):
        if value < low:
            raise typer.BadParameter(f"must be >= {low}, got {value}", param_hint=hint)
    dtype = torch.bfloat16 if bf16 else torch.float32
    opts = Options(sessions, session_segments, repeats, base_max_tokens, compile, graphs, drift_segments)
    run(preset, lengths, opts, dtype, device, out, plot)


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


# Commands that live in their own modules (one concept per file).
from service import cli_client, cli_eval, cli_train  # noqa: E402

for _command in (cli_client.serve, cli_client.ingest, cli_client.ask, cli_client.sessions, cli_train.train):
    app.command()(_command)
app.command("eval")(cli_eval.evaluate)


def main() -> None:
    """The `armt` entry point: the app, with a mistake that no command caught on the way (a path that is a file or
    cannot be created, a value the engine refuses: OSError, ValueError) as one `error:` line and exit code 2
    instead of a traceback. ARMT_TRACEBACK=1 shows the traceback."""
    import os

    try:
        app()
    except (OSError, ValueError) as e:
        if os.environ.get("ARMT_TRACEBACK", "") not in ("", "0"):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
