"""Session store latency: save and load of one session (state + metadata) through DiskStore and RedisStore, the
two stores side by side in one run, at several state sizes (1 KB, 1 MB, 50 MB by default).

    .venv/bin/python bench/store_latency.py [--sizes 1KB,1MB,50MB] [--redis redis://host:port/db] [--json out.json]

Without --redis a redis-server (Debian package) is started on a free port in a temporary directory, without
persistence: that measures Redis's in-memory path plus the loopback network, as replicas on one host would see it.
The disk store writes under --dir (default: a temporary directory), with fsync of the file and the directory.
Times are medians (and min / max) over --repeats runs after one warm-up; they measure the store calls the service
makes (`save`, `load`), not the hashing of the state that the service does before a save.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from model import MemoryState
from service.core.redis_store import RedisStore
from service.core.store import DiskStore
from service.core.types import SessionMeta

UNITS = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
ROW = 256  # floats per row of A


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def make_state(nbytes: int) -> MemoryState:
    """A state whose A and z hold about `nbytes` bytes of fp32 (the serialized file adds a small header)."""
    rows = max(1, round(nbytes / 4 / ROW))
    g = torch.Generator().manual_seed(0)
    return MemoryState(torch.randn(1, rows, ROW, generator=g), torch.randn(1, rows, generator=g), "bench")


def time_stores(stores: dict, state: MemoryState, repeats: int) -> dict:
    """Per store: median / min / max seconds of save and of load of one session, after one warm-up of each. Each
    round saves and loads once in every store, in turn, so that the machine's drift falls on all alike."""
    now = time.time()
    meta = SessionMeta(id="b" * 32, tenant="bench", model="bench", created_at=now, updated_at=now)
    times = {name: {"save": [], "load": []} for name in stores}
    for i in range(repeats + 1):
        meta = meta.evolve(version=i + 1)
        for name, store in stores.items():
            start = time.perf_counter()
            store.save(meta, state)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            store.load(meta.id, "bench")
            loaded = time.perf_counter() - start
            if i:  # the first of each is the warm-up
                times[name]["save"].append(saved)
                times[name]["load"].append(loaded)
    for store in stores.values():
        store.delete(meta.id)
    summary = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}  # noqa: E731
    return {name: {op: summary(xs) for op, xs in ops.items()} for name, ops in times.items()}


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: apt-get install redis-server, or pass --redis URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    probe = RedisStore.from_url(url)
    for _ in range(200):
        if probe.check() is None:
            return proc, url
        time.sleep(0.05)
    proc.terminate()
    raise SystemExit("redis-server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1KB,1MB,50MB")
    ap.add_argument("--repeats", type=int, default=0, help="runs per measurement (default: 20, 5 from 10 MB on)")
    ap.add_argument("--redis", help="an existing Redis (its database is used for one key prefix 'armt')")
    ap.add_argument("--dir", type=Path, help="where the disk store writes (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="armt-bench-"))
    proc, url = (None, args.redis) if args.redis else start_redis(tmp)
    try:
        disk, redis_store = DiskStore(args.dir or tmp / "disk"), RedisStore.from_url(url)
        results = []
        for text in args.sizes.split(","):
            state = make_state(parse_size(text))
            repeats = args.repeats or (5 if parse_size(text) >= 10 * UNITS["MB"] else 20)
            results.append({"size": text.strip(), "state_file_bytes": len(state.to_bytes()), "repeats": repeats,
                            **time_stores({"disk": disk, "redis": redis_store}, state, repeats)})
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    report = {"disk_dir": str(args.dir or "temporary directory"), "redis": url if args.redis else "local redis-server",
              "results": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_table(results: list[dict]) -> None:
    ms = lambda r, store, op: f"{r[store][op]['median'] * 1e3:9.2f}"  # noqa: E731
    print(f"{'state':>6} {'bytes':>10} | {'disk save':>9} {'disk load':>9} | {'redis save':>10} {'redis load':>10}"
          "   (median ms)")
    for r in results:
        print(f"{r['size']:>6} {r['state_file_bytes']:>10} | {ms(r, 'disk', 'save')} {ms(r, 'disk', 'load')} | "
              f"{ms(r, 'redis', 'save'):>10} {ms(r, 'redis', 'load'):>10}")


if __name__ == "__main__":
    main()
