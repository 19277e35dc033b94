"""Hand-written hostile requests against a real `armt serve` (raw sockets on 127.0.0.1, so nothing is normalised
by a client library): path-like and over-long session ids, invalid UTF-8, NUL bytes, gigantic Content-Length,
stalled bodies, negative and huge numbers, malformed JSON, and streams whose client vanishes. Each must get a
clear 4xx in the service's error body (or, where uvicorn refuses the bytes before the app sees them, a 4xx from
uvicorn and a closed connection), never a 5xx, and /health must answer 200 after every one of them.
"""
from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.service_helpers import Server

KEY = "hostile-key"
BODY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("hostile-data"), ARMT_API_KEYS=f"{KEY}=t",
                 ARMT_MAX_APPEND_BYTES="65536", ARMT_MAX_JSON_BYTES="65536", ARMT_MAX_NEW_TOKENS_LIMIT="4000",
                 ARMT_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text(errors="replace"), srv.log_tail()


@pytest.fixture(scope="module")
def sid(server) -> str:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        sid = http.post("/v1/sessions").json()["id"]
        r = http.post(f"/v1/sessions/{sid}/append?offset=0", content=b"Mary went to the garden. John slept. ")
        assert r.status_code == 200
    return sid


def raw(server: Server, head: str, body: bytes = b"", timeout: float = 10.0, then_close: bool = False):
    """Send bytes as they are; (status, body) of the answer, or (None, b"") when the server just closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        if then_close:
            return None, b""
        data = b""
        while chunk := s.recv(65536):  # a socket.timeout here fails the test: the server must answer or close
            data += chunk
    if not data:
        return None, b""
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


def request(method: str, path: str, headers: dict | None = None, length: int | None = None) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return "\n".join(lines) + "\n"


def assert_clean_4xx(status, body: bytes, server: Server, code: str | None = None) -> None:
    assert status is not None and 400 <= status < 500, (status, body[:300])
    if code is not None:
        assert json.loads(body)["error"]["code"] == code, body[:300]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain; charset=utf-8"}


@pytest.mark.parametrize("path, code", [
    ("/v1/sessions/..%2F..%2Fetc%2Fpasswd", "not_found"),  # uvicorn decodes %2F: no route has that many parts
    ("/v1/sessions/%2E%2E", "invalid_request"),
    ("/v1/sessions/../../../etc/passwd", "not_found"),
    ("/v1/sessions/" + "a" * 5000, "invalid_request"),
    ("/v1/sessions/" + "0" * 31 + "%00", "invalid_request"),
    ("/v1/sessions/" + "A" * 32, "invalid_request"),
    ("/v1/sessions?limit=-1", "invalid_request"),
    ("/v1/sessions?limit=" + "9" * 40, "invalid_request"),
    ("/v1/sessions?cursor=%FF%FE", "invalid_request"),
    ("/v1/sessions?cursor=1-" + "0" * 32 + "&limt=3", "invalid_request"),
])
def test_hostile_paths_and_query_strings(server, path, code):
    assert_clean_4xx(*raw(server, request("GET", path)), server, code)


def test_an_over_long_request_line_is_refused_by_uvicorn(server):
    status, _ = raw(server, request("GET", "/v1/sessions/" + "a" * 100_000))
    assert_clean_4xx(status, b"", server)


@pytest.mark.parametrize("query, code", [
    ("offset=-1", "invalid_request"), ("offset=" + str(2**63), "invalid_request"),
    ("offset=" + "9" * 30, "invalid_request"), ("offset=abc", "invalid_request"), ("offset=%FF", "invalid_request"),
    ("", "invalid_request"), ("offset=5", "offset_mismatch"),
])
def test_hostile_append_offsets(server, sid, query, code):
    status, body = raw(server, request("POST", f"/v1/sessions/{sid}/append?{query}", TEXT, 3), b"abc")
    assert_clean_4xx(status, body, server, code)


@pytest.mark.parametrize("payload, code", [
    (b'{"question": "Where?", "max_new_tokens": -1}', "invalid_request"),
    (b'{"question": "Where?", "max_new_tokens": 0}', "invalid_request"),
    (b'{"question": "Where?", "max_new_tokens": 1' + b"0" * 30 + b"}", "invalid_request"),
    (b'{"question": "Where?", "max_new_tokens": 1e400}', "invalid_request"),
    (b'{"question": "Where?", "max_new_tokens": true}', "invalid_request"),
    (b'{"question": "Where?", "seed": 1' + b"0" * 30 + b"}", "invalid_request"),
    (b'{"question": "Where?", "temperature": -1e-300}', "invalid_request"),
    (b'{"question": "Where?", "temperature": NaN}', "invalid_request"),
    (b'{"question": "Where?", "top_p": 0}', "invalid_request"),
    (b'{"question": " \\t\\n "}', "invalid_request"),
    (b'{"question": "Where?", "stop": ["x", "y", "z", "w", "v", "u", "t", "s", "r", "q", "p", "o", "n", "m", '
     b'"l", "k", "j"]}', "invalid_request"),
    (b'{"question": "Where?"', "malformed_json"),
    (b'{"question": "\xff\xfe"}', None),
    (b"[" * 30_000 + b"]" * 30_000, None),
    (b'{"question": ' + b"1" * 5000 + b"}", None),
    (b"[]", "invalid_request"),
    (b'{"question": "Where?", "extra": 1}', "invalid_request"),
])
def test_hostile_question_bodies(server, sid, payload, code):
    status, body = raw(server, request("POST", f"/v1/sessions/{sid}/ask", JSON, len(payload)), payload)
    assert_clean_4xx(status, body, server, code)


def test_hostile_chat_bodies(server, sid):
    for payload in ({"session_id": sid, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                    {"session_id": sid, "messages": [{"role": "user", "content": "\u0000"}], "n": 2},
                    {"session_id": "../" + sid, "messages": [{"role": "user", "content": "q"}]},
                    {"session_id": sid, "messages": []}):
        data = json.dumps(payload).encode()
        status, body = raw(server, request("POST", "/v1/chat/completions", JSON, len(data)), data)
        assert_clean_4xx(status, body, server, "invalid_request")


def test_nul_bytes_are_text_in_appends_and_questions(server):
    """NUL is valid UTF-8: stored and answered like any character, not an error."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        sid = http.post("/v1/sessions").json()["id"]
        r = http.post(f"/v1/sessions/{sid}/append?offset=0", content=b"a\x00b \x00\x00 c ", headers=TEXT)
        assert r.status_code == 200 and r.json()["offset"] == 9
        r = http.post(f"/v1/sessions/{sid}/ask", json={"question": "\u0000?\u0000", "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_invalid_utf8_in_an_append_names_its_position(server, sid):
    offset = httpx.get(f"{server.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY}"}).json()["offset"]
    body = b"fine words \xed\xa0\x80 (a UTF-16 surrogate)"
    status, answer = raw(server, request("POST", f"/v1/sessions/{sid}/append?offset={offset}", TEXT, len(body)), body)
    assert_clean_4xx(status, answer, server, "invalid_utf8")
    assert json.loads(answer)["error"]["position"] == offset + 11


@pytest.mark.parametrize("route", ["append", "ask"])
@pytest.mark.parametrize("length", [10**19, 10**21])
def test_gigantic_content_length_is_refused_before_any_body(server, sid, route, length):
    """10**19 bytes reach the app, which answers 413 from the header alone; 21 digits are refused by uvicorn."""
    head = request("POST", f"/v1/sessions/{sid}/{route}" + ("?offset=0" if route == "append" else ""),
                   TEXT if route == "append" else JSON, length)
    start = time.monotonic()
    status, body = raw(server, head, b"", timeout=5)  # no body sent
    assert_clean_4xx(status, body, server, "payload_too_large" if length < 10**20 else None)
    assert time.monotonic() - start < BODY_TIMEOUT


@pytest.mark.parametrize("route", ["append", "ask"])
def test_a_stalled_body_gets_408_and_stores_nothing(server, sid, route):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=auth).json()
    path = f"/v1/sessions/{sid}/{route}" + (f"?offset={before['offset']}" if route == "append" else "")
    start = time.monotonic()
    status, body = raw(server, request("POST", path, TEXT if route == "append" else JSON, 1000), b'{"qu',
                       timeout=BODY_TIMEOUT + 10)
    assert_clean_4xx(status, body, server, "request_timeout")
    assert BODY_TIMEOUT <= time.monotonic() - start < BODY_TIMEOUT + 5
    assert httpx.get(f"{server.url}/v1/sessions/{sid}", headers=auth).json() == before


def test_a_trickling_body_within_the_timeout_is_accepted(server):
    """The timeout bounds each wait for data, not the whole upload: a slow but live client gets through."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        sid = http.post("/v1/sessions").json()["id"]

    def trickle():
        for piece in (b"slow ", b"but ", b"steady "):
            time.sleep(BODY_TIMEOUT / 3)
            yield piece

    r = httpx.post(f"{server.url}/v1/sessions/{sid}/append?offset=0", content=trickle(),
                   headers={**TEXT, "Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["offset"] == 16


@pytest.mark.parametrize("head", [
    "POST /v1/sessions HTTP/1.1\nHost: x\nContent-Length: 5\nContent-Length: 6\n",
    "POST /v1/sessions HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\nzz\n",
    "GET /v1/sessions HTTP/1.1\nHost: x\nX-Bad: a\x00b\n",
    "GET /v1/sessions HTTP/1.1\nHost: x\nConnection: close\n" + "X-Long: " + "a" * 100_000 + "\n",
    "BREW /v1/sessions HTCPCP/1.0\n",
], ids=["two-content-lengths", "bad-chunk", "nul-in-header", "huge-header", "bad-request-line"])
def test_broken_http_is_refused_or_closed(server, head):
    status, body = raw(server, head)
    assert status is None or 400 <= status < 500, (status, body[:200])
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def generated(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^armt_generated_tokens_total (\S+)$", text, re.M).group(1))


def settle(server: Server) -> float:
    """Wait until the generated-token counter stops moving; returns it."""
    previous, stable = -1.0, 0
    for _ in range(200):
        now = generated(server)
        stable = stable + 1 if now == previous else 0
        if stable >= 5:
            return now
        previous = now
        time.sleep(0.1)
    raise AssertionError("decoding never stopped")


@pytest.mark.parametrize("route, reads", [("ask", 0), ("ask", 1), ("chat", 0), ("chat", 2)])
def test_streams_whose_client_vanishes_stop_decoding(server, sid, route, reads):
    """The client hangs up right after its request, or after a few stream lines: the server drops the question
    (far fewer tokens decoded than asked for) and keeps serving."""
    if route == "ask":
        path, payload = f"/v1/sessions/{sid}/ask", {"question": "Go on.", "stream": True, "max_new_tokens": 4000}
    else:
        path, payload = "/v1/chat/completions", {"session_id": sid, "stream": True, "max_tokens": 4000,
                                                 "messages": [{"role": "user", "content": "Go on."}]}
    before = settle(server)
    data = json.dumps(payload).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request("POST", path, JSON, len(data)).replace("\n", "\r\n").encode() + b"\r\n" + data)
        for _ in range(reads):
            s.recv(100)
    after = settle(server)
    print(f"tokens decoded after the client left ({route}, {reads} reads): {after - before:.0f} of 4000")
    assert after - before < 1000, after - before
    assert httpx.get(f"{server.url}/health").status_code == 200
