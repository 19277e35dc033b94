"""Soak: a steady mixed workload against a real `armt serve` for `--minutes` (10 by default), sampling the server
process's resident memory (RSS) and open file descriptors, to show that neither grows.

    .venv/bin/python -m bench.soak [--minutes 10] [--model default|tiny|DIR | --url URL --pid PID] [--clients 4]
        [--sample-seconds 5] [--out runs/soak.json] [--env ARMT_X=Y ...]

Each client repeats a session's life: create, append a document in random pieces, ask (JSON and SSE), abandon a
stream after its first token, make a few client mistakes (a wrong offset, an unknown session), list, delete. So
sessions come and go (the store does not grow), and every allocation path (states, the state cache, per-session
locks, SSE tasks, error bodies) runs thousands of times. RSS is compared between the first minute after a warm-up
(`--warmup-minutes`, default 1: the allocator and the state cache fill up) and the last minute (shorter windows in
short runs); the goal is growth within 10%. Open files must end where they started (within 5: sockets come and
go). Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter

import httpx

from bench.common import add_server_options, aiter_sse, document, proc_sample, run_against_server, write_json

TEXT = {"Content-Type": "text/plain; charset=utf-8"}


class Soak:
    def __init__(self, url: str, pid: int, args) -> None:
        self.url, self.pid, self.args = url, pid, args
        self.statuses: Counter = Counter()
        self.cycles = 0
        self.samples: list[dict] = []
        self.doc = document(args.doc_chars)

    async def run(self) -> dict:
        deadline = time.monotonic() + self.args.minutes * 60
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as http:
            sampler = asyncio.create_task(self._sample(deadline))
            await asyncio.gather(*(self._client(http, random.Random(k), deadline) for k in range(self.args.clients)))
            await sampler
        return self.report()

    async def _sample(self, deadline: float) -> None:
        start = time.monotonic()
        while True:
            rss, fds = proc_sample(self.pid)
            self.samples.append({"t": round(time.monotonic() - start, 1), "rss_mib": round(rss / 2**20, 1),
                                 "open_files": fds, "cycles": self.cycles})
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(self.args.sample_seconds, max(0.0, deadline - time.monotonic())))

    def _count(self, r: httpx.Response) -> httpx.Response:
        self.statuses[r.status_code] += 1
        return r

    async def _client(self, http: httpx.AsyncClient, rng: random.Random, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                await self._cycle(http, rng)
                self.cycles += 1
            except httpx.HTTPError as e:
                self.statuses[type(e).__name__] += 1

    async def _cycle(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        sid = self._count(await http.post("/v1/sessions")).json()["id"]
        data = self.doc[rng.randrange(len(self.doc) // 2):].encode()
        cuts = sorted(rng.sample(range(1, len(data)), 3))
        for a, b in zip([0] + cuts, cuts + [len(data)]):  # pieces cut anywhere, inside characters too
            self._count(await http.post(f"/v1/sessions/{sid}/append", params={"offset": a}, content=data[a:b],
                                        headers=TEXT))
        self._count(await http.post(f"/v1/sessions/{sid}/append", params={"offset": 1}, content=b"x",
                                    headers=TEXT))  # a wrong offset: 409
        self._count(await http.get(f"/v1/sessions/{'0' * 32}"))  # 404
        question = {"question": "Where is Mary?", "max_new_tokens": self.args.max_new_tokens}
        self._count(await http.post(f"/v1/sessions/{sid}/ask", json=question))
        await self._stream(http, sid, question, abandon=rng.random() < 0.5)
        self._count(await http.get("/v1/sessions", params={"limit": 10}))
        self._count(await http.delete(f"/v1/sessions/{sid}"))

    async def _stream(self, http: httpx.AsyncClient, sid: str, question: dict, abandon: bool) -> None:
        async with http.stream("POST", f"/v1/sessions/{sid}/ask", json={**question, "stream": True}) as r:
            self.statuses[r.status_code] += 1
            final = None
            async for name, _ in aiter_sse(r):
                final = name
                if abandon and name == "token":
                    return  # hang up mid-answer: the server must drop the question and free what it held
            if r.status_code == 200 and final != "done":  # an `error` event after the 200, or a cut stream
                self.statuses[f"stream ended with {final or 'no event'}"] += 1

    def report(self) -> dict:
        """RSS: median of the first window after the warm-up vs median of the last window (a minute each, less in
        short runs); open files: the first sample after the warm-up vs the last."""
        total = self.args.minutes * 60
        warmup = self.args.warmup_minutes * 60 if self.args.warmup_minutes is not None else min(60.0, total / 5)
        window = min(60.0, (total - warmup) / 3)
        first = [s for s in self.samples if warmup <= s["t"] < warmup + window] or self.samples[:1]
        last = [s for s in self.samples if s["t"] >= total - window] or self.samples[-1:]
        rss0, rss1 = (statistics.median(s["rss_mib"] for s in part) for part in (first, last))
        fds = (first[0]["open_files"], last[-1]["open_files"])
        return {
            "minutes": self.args.minutes, "clients": self.args.clients, "cycles": self.cycles,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "warmup_seconds": warmup, "window_seconds": round(window, 1),
            "rss_mib_first_window": rss0, "rss_mib_last_window": rss1, "rss_growth": round((rss1 - rss0) / rss0, 4),
            "rss_mib_max": max(s["rss_mib"] for s in self.samples), "open_files_start_end": fds,
            "rss_within_10_percent": abs(rss1 - rss0) <= 0.10 * rss0, "open_files_flat": fds[1] - fds[0] <= 5,
            "samples": self.samples,
        }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(p, "runs/soak.json")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--warmup-minutes", type=float, help="default: 1, or a fifth of a shorter run")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--doc-chars", type=int, default=6000)
    p.add_argument("--sample-seconds", type=float, default=5)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.url and args.pid is None:
        raise SystemExit("--url needs --pid (the server process to sample)")
    report = run_against_server(args, lambda url, pid: Soak(url, pid, args).run())
    print(f"{report['minutes']} min, {report['clients']} clients, {report['cycles']} session cycles, statuses "
          f"{report['statuses']}; RSS {report['rss_mib_first_window']} -> {report['rss_mib_last_window']} MiB "
          f"({report['rss_growth']:+.1%}, max {report['rss_mib_max']}), "
          f"open files {report['open_files_start_end'][0]} -> {report['open_files_start_end'][1]}; "
          f"RSS within 10%: {report['rss_within_10_percent']}, open files flat: {report['open_files_flat']}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
