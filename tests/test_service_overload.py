"""Overload against a real `armt serve` with a small engine queue (ARMT_MAX_QUEUE=2): a burst of concurrent
questions and appends gets exactly two admissions at a time and a 429 with Retry-After and the error body for every
other request, nothing else (no 5xx, no dropped connection); an append refused for overload is refused before its
body is read. Properties only: the timing figures come from bench/loadgen.py."""
from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from tests.service_helpers import Server

BURST = 30


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("overload-data"), ARMT_MAX_QUEUE="2",
                 ARMT_RETRY_AFTER_SECONDS="3", ARMT_MAX_NEW_TOKENS_LIMIT="4000", ARMT_APPEND_CHUNK_BYTES="1024").start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


async def hold(http: httpx.AsyncClient, sid: str, started: asyncio.Event, release: asyncio.Event) -> int:
    """A long streamed question that occupies a queue slot until `release`."""
    body = {"question": "Go on.", "stream": True, "max_new_tokens": 4000}
    async with http.stream("POST", f"/v1/sessions/{sid}/ask", json=body) as r:
        started.set()
        await release.wait()
        return r.status_code


async def while_full(url: str, sid: str, work) -> tuple[list[int], object]:
    """`await work(http)` while two long questions fill the queue; (the two questions' statuses, its result)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        release, holders = asyncio.Event(), []
        for _ in range(2):
            started = asyncio.Event()
            holders.append(asyncio.create_task(hold(http, sid, started, release)))
            await started.wait()
        result = await work(http)
        release.set()
        return list(await asyncio.gather(*holders)), result


async def burst(http: httpx.AsyncClient, sid: str) -> list[httpx.Response]:
    asks = [http.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_new_tokens": 2}) for _ in range(BURST)]
    appends = [http.post(f"/v1/sessions/{s}/append", params={"offset": 0}, content=b"more words ")
               for s in [(await http.post("/v1/sessions")).json()["id"] for _ in range(5)]]
    return list(await asyncio.gather(*asks, *appends))


def test_every_excess_request_gets_429_with_retry_after(server):
    sid = httpx.post(f"{server.url}/v1/sessions").json()["id"]
    assert httpx.post(f"{server.url}/v1/sessions/{sid}/append?offset=0", content=b"Mary went home. ").is_success
    held, answers = asyncio.run(while_full(server.url, sid, lambda http: burst(http, sid)))
    assert held == [200, 200]
    assert [r.status_code for r in answers] == [429] * len(answers)
    for r in answers:
        assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "overloaded"
    assert httpx.post(f"{server.url}/v1/sessions/{sid}/ask", json={"question": "q", "max_new_tokens": 2},
                      timeout=60).status_code == 200  # slots are free again
    # refused before routing (service/http/admission.py), yet counted under the route's template
    metrics = httpx.get(f"{server.url}/metrics").text
    for route in ("/v1/sessions/{session_id}/ask", "/v1/sessions/{session_id}/append"):
        line = next(ln for ln in metrics.splitlines() if ln.startswith("armt_request_duration_seconds_count{")
                    and f'route="{route}"' in ln and 'status="429"' in ln)
        assert float(line.rsplit(" ", 1)[1]) >= 1


def test_an_append_refused_for_overload_is_refused_before_its_body(server):
    """The 429 comes from the headers alone: a client that announced a megabyte and sent nothing gets it."""
    sid = httpx.post(f"{server.url}/v1/sessions").json()["id"]
    held, (status, body) = asyncio.run(while_full(
        server.url, sid, lambda http: asyncio.to_thread(headers_only_append, server.port, sid)))
    assert held == [200, 200]
    assert status == 429 and json.loads(body)["error"]["code"] == "overloaded"


def headers_only_append(port: int, sid: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a timeout fails the test
        s.sendall(f"POST /v1/sessions/{sid}/append?offset=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 1048576\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):  # the server closes after its answer
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def test_an_admitted_append_keeps_its_place_until_its_body_ends(server):
    """An append holds one queue place from its first whole chunk (1024 bytes here) to its answer: while the rest of
    its body is arriving a full queue refuses others, never the append's next chunk (which would throw away what it
    already wrote)."""
    sid, asker = (httpx.post(f"{server.url}/v1/sessions").json()["id"] for _ in range(2))
    body = b"Mary went to the garden. " * 100
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST /v1/sessions/{sid}/append?offset=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        s.sendall(body[:1100])

        def rest_of_the_body() -> bytes:  # sent while the queue is full: its chunks' jobs use the append's place
            s.sendall(body[1100:])
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

        statuses, data = asyncio.run(asks_beside_one_long_question(server.url, asker, rest_of_the_body))
    assert statuses[-1] == 429 and 200 not in statuses[1:]  # the append's place + the question fill the queue
    assert data.split(b" ", 2)[1] == b"200" and json.loads(data.split(b"\r\n\r\n", 1)[1])["offset"] == len(body)


async def asks_beside_one_long_question(url: str, sid: str, then) -> tuple[list[int], object]:
    """Statuses of short questions asked while one long question holds a place, until one is refused (<= 5 s); then
    `then()` (in a thread) while that question still holds its place: (statuses, its result)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        release, started = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(http, sid, started, release))
        await started.wait()
        statuses = []
        for _ in range(50):
            r = await http.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_new_tokens": 1})
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
            await asyncio.sleep(0.1)
        result = await asyncio.to_thread(then)
        release.set()
        await holder
        return statuses, result


def test_the_load_generator_counts_a_stream_that_ends_in_an_error_event_as_an_error():
    """An `error` event after the 200 (decoding failed) was counted as an accepted answer, so the overload goals
    ("no 5xx") could not fail on it."""
    import asyncio

    import httpx

    from bench.loadgen import ask, summarize

    def handler(request):
        body = b'event: token\ndata: {"text": "a"}\n\nevent: error\ndata: {"error": {"code": "internal"}}\n\n'
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as http:
            return await ask(http, "0" * 32, "Where?", 4)

    result = asyncio.run(main())
    assert result.status is None and "error" in result.error
    assert summarize([result], 1.0, 0.0)["other_errors"] == {"stream ended with error": 1}
