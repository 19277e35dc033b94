"""Load generator: latency and overload behaviour of a real `armt serve` at 1x, 2x and 4x its saturating rate.

    .venv/bin/python -m bench.loadgen [--model default|tiny|DIR | --url http://127.0.0.1:PORT] [--seconds 30]
        [--levels 1,2,4] [--ask-fraction 0.8] [--max-new-tokens 16] [--out runs/load.json] [--env ARMT_X=Y ...]

Requests are a mix: streamed questions (SSE) about prepared sessions, and appends of `--append-bytes` to fresh
sessions. Steps, each bounded in time (`--seconds`, `--probe-seconds`) and count (`--max-requests`):
1. unloaded: one client, one request at a time: the baseline TTFT;
2. saturation: closed loops of 1, 2, 4, ... clients until completed requests/s stop growing (by 5%): the largest
   throughput is the saturating rate;
3. open loop (Poisson arrivals, independent of answers) at each level x the saturating rate.
Per step: time to first token, inter-token latency and end-to-end latency percentiles (client side), ingest
tokens/s (the server's armt_ingest_tokens_total), and every refusal: the 429 rate, whether each 429 carried
Retry-After, and any other status or transport error. Goals checked at the top level: every refused request is a
429 with Retry-After, and accepted questions' p99 TTFT stays within 3x of the unloaded p99.
Loopback only: the URL must be 127.0.0.1, ::1 or localhost.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import add_server_options, aiter_sse, document, percentiles, run_against_server, write_json

TEXT = {"Content-Type": "text/plain; charset=utf-8"}
QUESTIONS = ("Where is Mary?", "What is described here?", "Where did John go?", "Who moved last?")


@dataclass
class Result:
    kind: str  # "ask" | "append"
    status: int | None = None  # None: a transport error
    e2e: float = 0.0
    headers: float | None = None  # time to the response's status line (a 429 is complete then)
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    retry_after: bool = False
    error: str | None = None


@dataclass
class Workload:
    sessions: list[str]
    ask_fraction: float
    max_new_tokens: int
    append_data: bytes
    rng: random.Random

    async def request(self, http: httpx.AsyncClient) -> Result:
        if self.rng.random() < self.ask_fraction:
            return await ask(http, self.rng.choice(self.sessions), self.rng.choice(QUESTIONS), self.max_new_tokens)
        return await append(http, self.append_data)


async def ask(http: httpx.AsyncClient, sid: str, question: str, max_new_tokens: int) -> Result:
    res, start = Result("ask"), time.perf_counter()
    body = {"question": question, "max_new_tokens": max_new_tokens, "stream": True}
    try:
        async with http.stream("POST", f"/v1/sessions/{sid}/ask", json=body) as r:
            res.headers = time.perf_counter() - start
            res.status, res.retry_after = r.status_code, "retry-after" in r.headers
            last, final = None, None
            async for name, _ in aiter_sse(r):
                now, final = time.perf_counter(), name
                if name == "token":
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
            if r.status_code == 200 and final != "done":  # an `error` event after the 200, or a cut stream
                res.status, res.error = None, f"stream ended with {final or 'no event'}"
    except httpx.HTTPError as e:
        res.status, res.error = None, f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - start
    return res


async def append(http: httpx.AsyncClient, data: bytes) -> Result:
    """An append to a fresh session (appends to one session run one at a time by design)."""
    res = Result("append")
    try:
        sid = (await http.post("/v1/sessions")).json()["id"]
        start = time.perf_counter()
        r = await http.post(f"/v1/sessions/{sid}/append", params={"offset": 0}, content=data, headers=TEXT)
        res.e2e = res.headers = time.perf_counter() - start
        res.status, res.retry_after = r.status_code, "retry-after" in r.headers
        await http.delete(f"/v1/sessions/{sid}")
    except httpx.HTTPError as e:
        res.status, res.error = None, f"{type(e).__name__}: {e}"
    return res


async def closed_loop(http, work: Workload, clients: int, seconds: float, max_requests: int) -> list[Result]:
    """`clients` clients, each sending its next request when the previous one is answered."""
    results: list[Result] = []
    deadline = time.perf_counter() + seconds

    async def client():
        while time.perf_counter() < deadline and len(results) < max_requests:
            results.append(await work.request(http))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


async def open_loop(http, work: Workload, rate: float, seconds: float, max_requests: int) -> list[Result]:
    """Poisson arrivals at `rate` per second for `seconds` (at most `max_requests`), whatever the answers do."""
    tasks, start = [], time.perf_counter()
    next_at = start
    while next_at < start + seconds and len(tasks) < max_requests:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(work.request(http)))
        next_at += work.rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def server_counters(http: httpx.AsyncClient) -> dict:
    """From /metrics: ingested tokens and the server's own TTFT histogram (cumulative bucket counts by bound)."""
    text = (await http.get("/metrics")).text
    buckets = {float(le): float(n) for le, n in
               re.findall(r'^armt_time_to_first_token_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}
    return {"tokens": float(re.search(r"^armt_ingest_tokens_total (\S+)$", text, re.M).group(1)),
            "ttft_buckets": buckets}


def server_ttft(before: dict, after: dict) -> dict:
    """p50 / p99 of the server-side TTFT (submitted to the engine -> first token) over a step, as the upper bound
    of the histogram bucket they fall in: with the client's TTFT it tells engine waiting from HTTP handling."""
    counts = {b: after["ttft_buckets"][b] - before["ttft_buckets"].get(b, 0.0) for b in after["ttft_buckets"]}
    total, out = counts.get(float("inf"), 0.0), {"n": int(counts.get(float("inf"), 0.0))}
    for p in (50, 99):
        bound = next((b for b in sorted(counts) if total and counts[b] >= p / 100 * total), None)
        out[f"p{p}_at_most"] = round(bound * 1000, 1) if bound not in (None, float("inf")) else bound
    return out


async def measure(http, work: Workload, run) -> dict:
    """Run one step (a closed or open loop), timed, with the server's counters before and after, and the load
    generator's own event-loop lag (a busy client reads answers late and inflates every latency it reports)."""
    before, start = await server_counters(http), time.perf_counter()
    lags: list[float] = []
    ticker = asyncio.create_task(loop_lag(lags))
    results = await run()
    ticker.cancel()
    elapsed = time.perf_counter() - start
    after = await server_counters(http)
    return {**summarize(results, elapsed, after["tokens"] - before["tokens"]),
            "server_ttft_ms": server_ttft(before, after),
            "client_loop_lag_ms": {k: (round(v * 1000, 1) if isinstance(v, float) else v)
                                   for k, v in percentiles(lags).items()}}


async def loop_lag(lags: list[float], every: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up, sampled until cancelled."""
    while True:
        due = time.perf_counter() + every
        await asyncio.sleep(every)
        lags.append(max(0.0, time.perf_counter() - due))


def summarize(results: list[Result], elapsed: float, ingested: float) -> dict:
    ok = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status == 429]
    other: dict[str, int] = {}
    for r in results:
        if r.status not in (200, 429):
            key = str(r.status) if r.status is not None else (r.error or "error").split(":")[0]
            other[key] = other.get(key, 0) + 1
    asks = [r for r in ok if r.kind == "ask"]
    ms = lambda values: {k: (round(v * 1000, 1) if isinstance(v, float) else v)  # noqa: E731
                         for k, v in percentiles(values).items()}
    return {
        "requests": len(results), "seconds": round(elapsed, 2), "completed_per_s": round(len(ok) / elapsed, 2),
        "accepted": len(ok), "refused_429": len(refused),
        "rate_429": round(len(refused) / len(results), 3) if results else 0.0,
        "refused_without_retry_after": sum(not r.retry_after for r in refused), "other_errors": other,
        "refusal_ms": ms([r.headers for r in refused if r.headers is not None]),
        "ttft_ms": ms([r.ttft for r in asks if r.ttft is not None]),
        "itl_ms": ms([x for r in asks for x in r.itl]),
        "ask_e2e_ms": ms([r.e2e for r in asks]),
        "append_e2e_ms": ms([r.e2e for r in ok if r.kind == "append"]),
        "ingest_tokens_per_s": round(ingested / elapsed, 1),
    }


async def prepare(http: httpx.AsyncClient, count: int, doc_chars: int) -> list[str]:
    """`count` sessions holding a document each (the questions' memory)."""
    text, sessions = document(doc_chars * count), []
    for k in range(count):
        sid = (await http.post("/v1/sessions")).json()["id"]
        r = await http.post(f"/v1/sessions/{sid}/append", params={"offset": 0},
                            content=text[k * doc_chars : (k + 1) * doc_chars].encode(), headers=TEXT)
        r.raise_for_status()
        sessions.append(sid)
    return sessions


async def saturation(http, work: Workload, args) -> tuple[float, list[dict]]:
    """Closed loops of 1, 2, 4, ... clients; the saturating rate is the best completed/s before it stops growing
    by 5% (or 429s appear: the queue, not the engine, is then the limit)."""
    probes, best = [], 0.0
    clients = 1
    while clients <= args.max_clients:
        step = await measure(http, work, lambda: closed_loop(http, work, clients, args.probe_seconds,
                                                             args.max_requests))
        probes.append({"clients": clients, **step})
        print(f"  {clients:3d} clients: {step['completed_per_s']:.2f} completed/s, TTFT p99 "
              f"{step['ttft_ms']['p99']} ms, 429s {step['refused_429']}")
        if step["refused_429"]:  # the queue, not the engine, limits this step: not a rate to offer
            break
        grew = step["completed_per_s"] >= best * 1.05
        best = max(best, step["completed_per_s"])  # the last probe counts too (it may be a little higher)
        if not grew:
            break
        clients *= 2
    return best, probes


async def run(url: str, args) -> dict:
    # idle connections expire before uvicorn's keep-alive timeout (5 s): a request sent on a connection the server
    # is closing at that moment would fail without reaching it
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        append_data = document(args.append_bytes).encode()[: args.append_bytes]  # may end inside a character
        work = Workload(await prepare(http, args.sessions, args.doc_chars), args.ask_fraction,
                        args.max_new_tokens, append_data, random.Random(args.seed))
        print("unloaded (one request at a time):")
        unloaded = await measure(http, work, lambda: closed_loop(http, work, 1, args.probe_seconds,
                                                                 args.max_requests))
        print(f"  TTFT p99 {unloaded['ttft_ms']['p99']} ms, {unloaded['completed_per_s']} completed/s")
        print("saturation (closed loops):")
        rate, probes = await saturation(http, work, args)
        levels = {}
        for level in args.levels:
            step = await measure(http, work, lambda: open_loop(http, work, level * rate, args.seconds,
                                                               args.max_requests))
            levels[f"{level:g}x"] = {"offered_per_s": round(level * rate, 2), **step}
            print(f"{level:g}x ({level * rate:.1f}/s offered): {line(step)}")
    return {"unloaded": unloaded, "saturating_rate_per_s": rate, "saturation_probes": probes, "levels": levels,
            "goals": goals(unloaded, levels)}


def line(step: dict) -> str:
    return (f"{step['completed_per_s']}/s done, 429 rate {step['rate_429']:.1%} "
            f"(without Retry-After: {step['refused_without_retry_after']}), other errors {step['other_errors']}; "
            f"TTFT p50/p99 {step['ttft_ms']['p50']}/{step['ttft_ms']['p99']} ms, ITL p50/p99 "
            f"{step['itl_ms']['p50']}/{step['itl_ms']['p99']} ms, e2e p99 {step['ask_e2e_ms']['p99']} ms, "
            f"append e2e p99 {step['append_e2e_ms']['p99']} ms, ingest {step['ingest_tokens_per_s']} tokens/s; "
            f"server-side TTFT p99 <= {step['server_ttft_ms']['p99_at_most']} ms, "
            f"429 answered in p50/p99 {step['refusal_ms']['p50']}/{step['refusal_ms']['p99']} ms; "
            f"load generator's loop lag p99 {step['client_loop_lag_ms']['p99']} ms")


def goals(unloaded: dict, levels: dict) -> dict:
    """The issue's overload goals, on the highest level measured."""
    top = levels[max(levels, key=lambda k: float(k[:-1]))]
    base, p99 = unloaded["ttft_ms"]["p99"], top["ttft_ms"]["p99"]
    return {
        "level": max(levels, key=lambda k: float(k[:-1])),
        "every_refusal_is_429_with_retry_after": not top["other_errors"] and not top["refused_without_retry_after"],
        "ttft_p99_ratio_to_unloaded": round(p99 / base, 2) if base and p99 else None,
        "ttft_p99_within_3x_unloaded": bool(base and p99 and p99 <= 3 * base),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(p, "runs/load.json")
    p.add_argument("--seconds", type=float, default=30, help="per load level")
    p.add_argument("--probe-seconds", type=float, default=10, help="unloaded and each saturation probe")
    p.add_argument("--max-requests", type=int, default=5000, help="per step")
    p.add_argument("--levels", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 2.0, 4.0])
    p.add_argument("--max-clients", type=int, default=64, help="largest closed loop of the saturation search")
    p.add_argument("--ask-fraction", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--append-bytes", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=16, help="sessions the questions go to")
    p.add_argument("--doc-chars", type=int, default=4000, help="document in each of those")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    report = run_against_server(args, lambda url, pid: run(url, args))
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    print("goals:", report["goals"])
    write_json(args.out, report)


if __name__ == "__main__":
    main()
