"""`armt serve` and the client commands on it: `armt ingest FILE`, `armt ask SESSION QUESTION`, `armt sessions`.

Registered on the `armt` app by service/cli.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

# ---------------------------------------------------------------------------------------------- HTTP service
URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="ARMT_URL", help="server address")
API_KEY = typer.Option(None, "--api-key", envvar="ARMT_API_KEY", help="bearer key (when the server has keys)")


def ensure_demo_model(model_dir: Path) -> None:
    """The untrained demo model, with a tokenizer (the service takes text): created, or completed, when missing."""
    if not (model_dir / "armt_config.json").is_file():
        typer.echo(f"no model at {model_dir}: writing an untrained random demo model there (answers are noise)")
        from service.cli import init_random

        init_random(model_dir, tokenizer=True)
    elif not (model_dir / "tokenizer.json").is_file():  # written by `armt demo`, which needs no tokenizer
        from service.cli import demo_tokenizer

        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        demo_tokenizer(vocab).save(str(model_dir / "tokenizer.json"))


def serve(host: str = typer.Option(None, help="default ARMT_HOST or 127.0.0.1"),
          port: int = typer.Option(None, help="default ARMT_PORT or 8000"),
          model: Path = typer.Option(None, help="model directory (default ARMT_MODEL, else the default model, "
                                                "else .cache/demo-model)")) -> None:
    """Run the HTTP service (uvicorn); every other setting comes from ARMT_* variables (see README)."""
    import uvicorn
    from pydantic import ValidationError

    from service.http.app import create_app
    from service.settings import DEMO_MODEL_DIR, Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "model": model}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:  # a configuration mistake: its message, not a traceback (inputs are hidden)
        typer.echo(f"error: invalid settings: {e}", err=True)
        raise typer.Exit(2) from None
    if settings.model_dir() == DEMO_MODEL_DIR:
        ensure_demo_model(DEMO_MODEL_DIR)
    _preflight(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def _preflight(settings) -> None:
    """Mistakes that would leave a started server answering 503 forever (the model loads in the background, and a
    failed load keeps the process up for /health to say why) end `armt serve` at once instead, with exit code 2."""
    from model.config import is_armt_directory
    from service.core.errors import StoreError
    from service.core.store import lock_data_directory

    directory = settings.model_dir()
    if not is_armt_directory(directory):
        typer.echo(f"error: {directory} is not an ARMT model directory (no armt_config.json, nor an HF "
                   "ARMTForCausalLM config.json); set --model or ARMT_MODEL", err=True)
        raise typer.Exit(2)
    if settings.store == "disk":
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            lock_data_directory(settings.data_dir).close()  # the server takes it again as it starts
        except StoreError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a file in the way, no permission, a path that cannot exist
            typer.echo(f"error: cannot use data directory {settings.data_dir} (ARMT_DATA_DIR): {e}", err=True)
            raise typer.Exit(2) from None


def _client(url: str, api_key: str | None):
    import httpx

    from service.client import ArmtClient

    try:
        return ArmtClient(url, api_key=api_key)
    except httpx.InvalidURL as e:
        typer.echo(f"error: bad --url {url!r}: {e}", err=True)
        raise typer.Exit(2) from None


def _fail(error: Exception, url: str = "") -> None:
    """The error, and what to do about the usual ones."""
    import httpx

    from service.client import ArmtHTTPError

    hint = ""
    if isinstance(error, httpx.ConnectError):
        hint = f" (no server at {url}? start one with `armt serve`, or point --url / ARMT_URL at it)"
    elif isinstance(error, ArmtHTTPError) and error.status == 413:
        hint = " (this server takes smaller appends: pass a smaller --chunk-bytes)"
    typer.echo(f"error: {error}{hint}", err=True)
    raise typer.Exit(1)


def ingest(file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
           session: str = typer.Option(None, help="append to this session (default: a new one)"),
           url: str = URL, api_key: str = API_KEY,
           chunk_bytes: int = typer.Option(1 << 20, min=1, help="bytes per append request")) -> None:
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
            _fail(e, url)
    typer.echo(json.dumps({"session": session, **{k: result[k] for k in ("offset", "tokens", "segments")}}))


def ask(session: str, question: str, url: str = URL, api_key: str = API_KEY, max_new_tokens: int = 64,
        temperature: float = 0.0) -> None:
    """Ask a question about a session's document; the answer is printed as it streams."""
    import math

    import httpx

    from service.client import ArmtHTTPError

    if not (math.isfinite(temperature) and temperature >= 0):
        raise typer.BadParameter(f"must be a finite number >= 0, got {temperature}", param_hint="--temperature")

    done = False
    with _client(url, api_key) as client:
        try:
            for event in client.ask_stream(session, question, max_new_tokens=max_new_tokens,
                                           temperature=temperature):
                if event["event"] == "token":
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif event["event"] == "done":
                    done = True
                    sys.stdout.write("\n")  # the answer is a line of its own (redirected to a file, too)
                    typer.echo(f"[{event['finish_reason']}, {event['usage']['completion_tokens']} tokens]", err=True)
        except (ArmtHTTPError, httpx.HTTPError) as e:
            _fail(e, url)
    if not done:  # the server went away between two events: the answer above is cut short
        typer.echo("\nerror: the answer stream ended before its last event (server stopped?)", err=True)
        raise typer.Exit(1)


def sessions(url: str = URL, api_key: str = API_KEY) -> None:
    """List your sessions: id, bytes acknowledged, tokens, last update."""
    import httpx

    from service.client import ArmtHTTPError

    with _client(url, api_key) as client:
        try:
            for s in client.iter_sessions():
                typer.echo(f"{s['id']}  {s['offset']:>12} bytes  {s['tokens']:>10} tokens  {s['updated_at']}")
        except (ArmtHTTPError, httpx.HTTPError) as e:
            _fail(e, url)


