"""Shared by the reliability scripts (crash harness, load generator, soak): which model to serve, a server on a
random loopback port, SSE parsing for httpx's async streams, percentiles, /proc sampling and JSON output.

The server is tests/service_helpers.Server (`armt serve` in a subprocess on 127.0.0.1 and a free port), so the
scripts and the test suite start servers one way. Extra server settings come as ARMT_* variables (`--env`), which
keeps the scripts independent of the session store in use.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(REPO))

from tests.service_helpers import Server, build_tiny_model, document  # noqa: E402

__all__ = ["Server", "document", "resolve_model", "parse_env", "aiter_sse", "percentiles", "proc_sample",
           "write_json", "add_server_options", "run_against_server"]


def resolve_model(spec: str, work: Path) -> Path:
    """`tiny`: the test suite's 2-layer model with a real tokenizer (built into `work`); `default`: the shipped
    model (model/weights/default); anything else: a model directory."""
    if spec == "tiny":
        target = work / "tiny-model"
        return target if (target / "armt_config.json").is_file() else build_tiny_model(target)
    if spec == "default":
        from model import default_model_path

        return Path(default_model_path())
    return Path(spec)


def parse_env(items: list[str] | None) -> dict[str, str]:
    """`--env ARMT_MAX_QUEUE=8` items -> a dict for the server's environment."""
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env takes KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def add_server_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The options of scripts that run against a server: one they start (`--model`, `--env`) or a running one."""
    parser.add_argument("--model", default="default", help="tiny | default | a model directory (a server is started)")
    parser.add_argument("--url", help="a running server on this machine instead (loopback only)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (sampled from /proc)")
    parser.add_argument("--env", action="append", help="KEY=VALUE for the started server (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(out), help="JSON report")


def run_against_server(args: argparse.Namespace, run: Callable[[str, int | None], Awaitable[dict]]) -> dict:
    """`run(url, pid)` against `--url` (loopback only), else against a server started for it on a temporary data
    directory with `--model` and `--env`."""
    if args.url:
        host = urlsplit(args.url).hostname
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise SystemExit(f"--url must be a loopback address, got {host!r}")
        return run_loop(run(args.url.rstrip("/"), args.pid))
    with tempfile.TemporaryDirectory(prefix="armt-bench-") as tmp:
        with Server(resolve_model(args.model, Path(tmp)), Path(tmp) / "data", **parse_env(args.env)) as srv:
            return run_loop(run(srv.url, srv.proc.pid))


def run_loop(main: Awaitable[dict]) -> dict:
    """On uvloop when installed (uvicorn[standard] brings it): the client's own event loop stays the lighter side
    of the measurement."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def aiter_sse(response) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) of each server-sent event of an httpx streaming response; comments are skipped."""
    name, data = None, []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def percentiles(values: list[float], points=(50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (p50, p90, p99, max) in the values' unit; None when there are no values."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        out[f"p{p}"] = ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else None
    out["max"] = ordered[-1] if ordered else None
    out["n"] = len(ordered)
    return out


def proc_sample(pid: int) -> tuple[int, int]:
    """(resident set size in bytes, open file descriptors) of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kib * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
