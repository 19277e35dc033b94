"""End to end against a real `armt serve` (uvicorn) on 127.0.0.1 and a random free port, real disk store:
chunked == whole, SSE as a client reads it, error paths, idempotent retry, disconnect stops decoding, resumable
upload through the client and the CLI, and a SIGKILLed server that restarts with every acknowledged session."""
from __future__ import annotations

import json
import random
import re
import signal
import socket
import time

import httpx
import pytest
from typer.testing import CliRunner

from service.cli import app as cli
from service.client import ArmtClient, ArmtHTTPError, ingest_file, parse_sse
from tests.service_helpers import Server, document

KEY = "e2e-key"
LIMIT = 4000


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("e2e-data"), ARMT_API_KEYS=f"{KEY}=tenant1",
                 ARMT_MAX_APPEND_BYTES="65536", ARMT_APPEND_CHUNK_BYTES="4096",
                 ARMT_MAX_NEW_TOKENS_LIMIT=str(LIMIT)).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


@pytest.fixture()
def client(server):
    with ArmtClient(server.url, api_key=KEY, timeout=60) as c:
        yield c


DOC = document(4000).encode()
QUESTION = {"max_new_tokens": 16}


def random_cuts(data: bytes, seed: int) -> list[int]:
    """Random cut points plus cuts inside multi-byte characters and inside words."""
    rng = random.Random(seed)
    cuts = {rng.randrange(1, len(data)) for _ in range(25)}
    multibyte = [i for i, b in enumerate(data) if b >= 0xC0]
    cuts |= {multibyte[0] + 1, multibyte[3] + 2, multibyte[-1] + 1}  # inside 2-, 3- and 4-byte characters
    cuts |= {data.index(b"the") + 1}
    return sorted(cuts)


def append_in_pieces(client: ArmtClient, sid: str, data: bytes, cuts: list[int]) -> dict:
    bounds = [0] + cuts + [len(data)]
    for a, b in zip(bounds, bounds[1:]):
        result = client.append(sid, a, data[a:b])
        assert result["offset"] == b
    return result


def test_ingest_file_gives_up_on_writers_that_keep_disagreeing(tmp_path):
    """Two servers without a shared store answer each offset with a 409 naming the other's: back off, then fail
    instead of spinning forever."""
    class Disagreeing:
        appends = 0

        def get_session(self, sid):
            return {"offset": 0}

        def append(self, sid, offset, chunk):
            self.appends += 1
            raise ArmtHTTPError(409, {"error": {"code": "offset_mismatch", "message": "m", "offset": 4 - offset}})

    (tmp_path / "doc.txt").write_text("some text here")
    client, naps = Disagreeing(), []
    with pytest.raises(ArmtHTTPError):
        ingest_file(client, tmp_path / "doc.txt", "0" * 32, chunk_bytes=4, max_retries=3, sleep=naps.append)
    assert client.appends == 4 and naps == [0.5, 1.0]  # the first 409 is a plain resume


def test_resuming_checks_the_file_through_a_busy_server(tmp_path):
    """The check that the file is the session's document is retried like the upload (a 503 right after a restart),
    and only a 409 at the session's own offset means another document."""
    class Busy:
        def __init__(self, answers):
            self.answers, self.sent = list(answers), []

        def get_session(self, sid):
            return {"offset": 4, "last_append_offset": 0}

        def append(self, sid, offset, chunk):
            self.sent.append((offset, chunk))
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    (tmp_path / "doc.txt").write_text("abcdefgh")
    busy = Busy([ArmtHTTPError(503, {"error": {"code": "not_ready"}}), {"offset": 4}, {"offset": 8}])
    naps, seen = [], []
    assert ingest_file(busy, tmp_path / "doc.txt", "0" * 32, sleep=naps.append,
                       progress=lambda done, total: seen.append(done))["offset"] == 8
    assert busy.sent == [(0, b"abcd"), (0, b"abcd"), (4, b"efgh")] and len(naps) == 1
    assert seen == [4, 8]  # a resume's progress starts where the server is (its bar sat at 0, then jumped)
    other = Busy([ArmtHTTPError(409, {"error": {"code": "offset_mismatch", "offset": 4}})])
    with pytest.raises(ValueError, match="is not the document"):
        ingest_file(other, tmp_path / "doc.txt", "0" * 32, sleep=naps.append)


def test_ingest_file_reports_the_server_s_offset_when_the_last_answer_is_lost(tmp_path):
    """The last chunk stored but its answer lost (the case idempotent appends exist for): the result was the one of
    the chunk before; and a 409 naming an offset past the file's end passed silently (an error at the start)."""
    class Lossy:
        def __init__(self, size):
            self.offset, self.size = 0, size

        def get_session(self, sid):
            return {"offset": self.offset, "tokens": self.offset, "segments": 0}

        def append(self, sid, offset, chunk):
            self.offset += len(chunk)
            if self.offset == self.size:
                raise httpx.ReadTimeout("the answer was lost")
            return {"offset": self.offset, "tokens": self.offset, "segments": 0}

    (tmp_path / "doc.txt").write_text("0123456789" * 3)
    seen = []
    result = ingest_file(Lossy(30), tmp_path / "doc.txt", "0" * 32, chunk_bytes=10, sleep=lambda s: None,
                         progress=lambda done, total: seen.append(done))
    assert result["offset"] == 30 and seen[-1] == 30

    class Ahead(Lossy):
        def append(self, sid, offset, chunk):
            raise ArmtHTTPError(409, {"error": {"code": "offset_mismatch", "message": "m", "offset": 999}})

    with pytest.raises(ValueError, match="only 30"):
        ingest_file(Ahead(30), tmp_path / "doc.txt", "0" * 32, chunk_bytes=10, sleep=lambda s: None)


def test_a_2xx_answer_that_is_not_json_is_an_http_error():
    """A --url pointing at another web server: its HTML page was a JSONDecodeError traceback in `armt sessions`."""
    page = httpx.MockTransport(lambda request: httpx.Response(200, text="<html>hello</html>"))
    with ArmtClient("http://example", transport=page) as client:
        with pytest.raises(ArmtHTTPError, match="not JSON"):
            client.list_sessions()
    html = "<!DOCTYPE HTML>\n<html>\n<body>\n" + "<p>File not found</p>\n" * 50 + "</body></html>"
    missing = httpx.MockTransport(lambda request: httpx.Response(404, text=html))
    with ArmtClient("http://example", transport=missing) as client:
        with pytest.raises(ArmtHTTPError) as error:
            client.list_sessions()
    assert "\n" not in str(error.value) and len(str(error.value)) < 250  # one line, not the whole page


def test_ingest_file_refuses_an_empty_chunk_size(tmp_path):
    """read(0) is b"": the upload would append nothing at the same offset forever."""
    (tmp_path / "doc.txt").write_text("text")
    with pytest.raises(ValueError, match="chunk_bytes"):
        ingest_file(None, tmp_path / "doc.txt", "0" * 32, chunk_bytes=0)


def test_chunked_appends_equal_whole_append(client):
    whole, pieces = client.create_session()["id"], client.create_session()["id"]
    client.append(whole, 0, DOC)
    append_in_pieces(client, pieces, DOC, random_cuts(DOC, 0))
    w, p = client.get_session(whole), client.get_session(pieces)
    assert w["offset"] == p["offset"] == len(DOC)
    assert w["state_digest"] == p["state_digest"] and w["tokens"] == p["tokens"] and w["segments"] > 50
    for q in ("What is described here?", "Who wrote it?"):
        assert client.ask(whole, q, **QUESTION) == client.ask(pieces, q, **QUESTION)


def test_sse_stream_as_a_client_reads_it(client, server):
    sid = client.create_session()["id"]
    client.append(sid, 0, DOC[:2000])
    answer = client.ask(sid, "Summarise.", **QUESTION)
    events = list(client.ask_stream(sid, "Summarise.", **QUESTION))
    assert [e["event"] for e in events][-1] == "done" and {e["event"] for e in events[:-1]} == {"token"}
    assert "".join(e["text"] for e in events[:-1]) == answer["answer"]
    assert {k: events[-1][k] for k in ("answer", "finish_reason", "usage", "mean_hops")} == answer
    with httpx.stream("POST", f"{server.url}/v1/sessions/{sid}/ask", headers={"Authorization": f"Bearer {KEY}"},
                      json={"question": "Summarise.", "stream": True, **QUESTION}) as r:
        raw = list(r.iter_lines())
    assert raw[0] == "event: token" and raw[1].startswith("data: {") and raw[2] == ""
    assert [n for n, _ in parse_sse(iter(raw))].count("done") == 1


def test_error_paths(client, server):
    sid = client.create_session()["id"]
    client.append(sid, 0, b"first words ")
    with pytest.raises(ArmtHTTPError) as e:
        client.append(sid, 5, b"x")
    assert e.value.status == 409 and e.value.body["error"]["offset"] == 12
    with pytest.raises(ArmtHTTPError) as e:
        client.append(sid, 12, b"ok \xc3\x28")
    assert e.value.status == 400 and e.value.body["error"]["position"] == 15
    with pytest.raises(ArmtHTTPError) as e:
        client.append(sid, 12, b"a" * 65537)
    assert e.value.status == 413
    with pytest.raises(ArmtHTTPError) as e:
        client.get_session("0" * 32)
    assert e.value.status == 404
    r = httpx.get(f"{server.url}/v1/sessions")
    assert r.status_code == 401 and "www-authenticate" in r.headers
    assert client.get_session(sid)["offset"] == 12


def test_idempotent_retry_of_an_append(client):
    sid = client.create_session()["id"]
    first = client.append(sid, 0, DOC[:700])
    digest = client.get_session(sid)["state_digest"]
    assert client.append(sid, 0, DOC[:700]) == first  # e.g. the first answer was lost on the way back
    assert client.get_session(sid)["state_digest"] == digest
    assert client.append(sid, 700, DOC[700:900])["offset"] == 900


def generated_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^armt_generated_tokens_total (\S+)$", text, re.M).group(1))


def test_a_disconnected_stream_stops_decoding(client, server):
    sid = client.create_session()["id"]
    client.append(sid, 0, DOC[:500])
    assert client.ask(sid, "Go on.", max_new_tokens=40)["finish_reason"] == "length"  # no early eos
    before = generated_tokens(server.url)
    with httpx.stream("POST", f"{server.url}/v1/sessions/{sid}/ask", headers={"Authorization": f"Bearer {KEY}"},
                      json={"question": "Go on.", "stream": True, "max_new_tokens": LIMIT}) as r:
        lines = r.iter_lines()
        for _ in range(9):  # three token events, then hang up
            next(lines)
    previous, stable = -1.0, 0
    for _ in range(100):  # wait until the counter stops moving
        time.sleep(0.1)
        now = generated_tokens(server.url)
        stable = stable + 1 if now == previous else 0
        previous = now
        if stable >= 5:
            break
    print(f"tokens decoded for the abandoned stream: {previous - before:.0f} of max {LIMIT}")
    assert 3 <= previous - before < LIMIT / 4, previous - before


def test_interrupted_upload_stores_nothing_and_the_client_resumes(client, server, tmp_path):
    sid = client.create_session()["id"]
    client.append(sid, 0, DOC[:1000])
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # a body cut off half way
        s.sendall(f"POST /v1/sessions/{sid}/append?offset=1000 HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {KEY}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                  f"Content-Length: 2000\r\n\r\n".encode() + DOC[1000:2000])
    time.sleep(0.3)
    assert client.get_session(sid)["offset"] == 1000
    path = tmp_path / "doc.txt"
    path.write_bytes(DOC)
    seen = []
    result = ingest_file(client, path, sid, chunk_bytes=777, progress=lambda done, total: seen.append(done))
    assert result["offset"] == len(DOC) and seen[-1] == len(DOC)
    reference = client.create_session()["id"]
    client.append(reference, 0, DOC)
    assert client.get_session(sid)["state_digest"] == client.get_session(reference)["state_digest"]


def test_cli_ingest_ask_sessions(server, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(DOC[:3000])
    runner, common = CliRunner(), ["--url", server.url, "--api-key", KEY]
    out = runner.invoke(cli, ["ingest", str(path), *common, "--chunk-bytes", "1000"])
    assert out.exit_code == 0, out.output
    sid = re.search(r"session ([0-9a-f]{32})", out.output).group(1)
    assert '"offset": 3000' in out.output
    again = runner.invoke(cli, ["ingest", str(path), "--session", sid, *common])  # nothing left: a no-op
    assert again.exit_code == 0 and '"offset": 3000' in again.output
    other = tmp_path / "other.txt"  # a longer, different file: resuming it would skip its first 3000 bytes
    other.write_bytes(DOC[1000:] + DOC[:1000])
    wrong = runner.invoke(cli, ["ingest", str(other), "--session", sid, *common])
    assert wrong.exit_code == 1 and "is not the document" in wrong.output, wrong.output
    assert client_offset(server, sid) == 3000
    asked = runner.invoke(cli, ["ask", sid, "What is it?", *common, "--max-new-tokens", "5"])
    assert asked.exit_code == 0 and "[length, 5 tokens]" in asked.output
    listed = runner.invoke(cli, ["sessions", *common])
    assert listed.exit_code == 0 and sid in listed.output
    denied = runner.invoke(cli, ["sessions", "--url", server.url, "--api-key", "wrong"])
    assert denied.exit_code == 1 and "401" in denied.output


def client_offset(server, sid: str) -> int:
    return ArmtClient(server.url, api_key=KEY).get_session(sid)["offset"]


def test_sigkill_and_restart_keeps_every_acknowledged_session(client, server):
    """Last in this module: it kills the shared server."""
    before = {s["id"]: s for s in client.iter_sessions()}
    sid = next(iter(before))
    answer = client.ask(sid, "And then?", **QUESTION)
    server.kill()
    server.start()
    after = {s["id"]: s for s in client.iter_sessions()}
    assert after == before
    assert client.ask(sid, "And then?", **QUESTION) == answer
    offset = after[sid]["offset"]
    assert client.append(sid, offset, b" more text")["offset"] == offset + 10


@pytest.mark.parametrize("route", ["ask", "openai"])
def test_sigterm_ends_open_streams_with_a_final_event(tiny_model_dir, tmp_path, route):
    """A graceful stop (rolling deploy, docker stop) gives an answer still streaming after ARMT_SHUTDOWN_GRACE_SECONDS
    a last `error` event (shutting_down) and a complete HTTP response, then the server exits cleanly."""
    srv = Server(tiny_model_dir, tmp_path / "data", ARMT_MAX_NEW_TOKENS_LIMIT=str(LIMIT),
                 ARMT_SHUTDOWN_GRACE_SECONDS="0.3").start()
    try:
        sid = httpx.post(f"{srv.url}/v1/sessions").json()["id"]
        assert httpx.post(f"{srv.url}/v1/sessions/{sid}/append?offset=0", content=DOC[:500]).is_success
        url, body = f"{srv.url}/v1/sessions/{sid}/ask", {"question": "Go on.", "stream": True,
                                                         "max_new_tokens": LIMIT}
        if route == "openai":
            url, body = f"{srv.url}/v1/chat/completions", {"session_id": sid, "stream": True, "max_tokens": LIMIT,
                                                           "messages": [{"role": "user", "content": "Go on."}]}
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            events = parse_sse(r.iter_lines())
            next(events)  # decoding runs
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(events)  # a response cut short would raise here (incomplete chunked read)
        last = json.loads(rest[-1][1])
        assert last["error"]["code"] == "shutting_down" and (route == "openai" or rest[-1][0] == "error"), rest[-3:]
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful stop
        assert "without completing response" not in srv.log.read_text(errors="replace"), srv.log_tail()
    finally:
        srv.stop()


def test_an_abandoned_upload_stops_the_engine_work_of_its_chunk(tiny_model_dir, tmp_path):
    """The body used to be read only between chunks: a client gone mid-upload kept the engine on its chunk to the
    end (~45 s for 512 KiB on the default model), for nothing. It is read ahead now, so the job is dropped."""
    chunk = 256 * 1024
    srv = Server(tiny_model_dir, tmp_path / "data", ARMT_APPEND_CHUNK_BYTES=str(chunk),
                 ARMT_MAX_APPEND_BYTES=str(16 * chunk), ARMT_INGEST_UNIT_SEGMENTS="1").start()

    def ingested() -> float:
        text = httpx.get(f"{srv.url}/metrics", timeout=10).text
        return float(re.search(r"^armt_ingest_tokens_total(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))

    try:
        with ArmtClient(srv.url, timeout=120) as c:
            data = (document(chunk // 4) * 8).encode()[:chunk]
            full = c.append(c.create_session()["id"], 0, data)["tokens"]  # what one whole chunk writes
            sid, before = c.create_session()["id"], ingested()
        head = (f"POST /v1/sessions/{sid}/append?offset=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {16 * chunk}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(head.encode() + data + b"more words")  # one whole chunk and a little, then gone
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ingested() == before:  # the engine is on the chunk
                time.sleep(0.02)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "armt_running_requests 0.0" not in httpx.get(f"{srv.url}/metrics").text:
            time.sleep(0.05)
        assert ingested() - before < full / 2, (ingested() - before, full)
        assert httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["offset"] == 0  # nothing stored
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()
