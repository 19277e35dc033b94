"""HTTP routes in-process (FastAPI TestClient over the ASGI app): sessions, the append protocol, ask (JSON and
SSE), the OpenAI endpoint, error bodies, 429, 503, 409 for another model's state, metrics."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from model import MemoryState
from service.client import parse_sse
from service.core.scheduler import GenerateJob
from service.core.store import DiskStore
from service.core.types import SessionMeta
from service.http.app import create_app
from service.settings import Settings
from tests.service_helpers import document

TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def start(settings: Settings) -> TestClient:
    client = TestClient(create_app(settings)).__enter__()
    for _ in range(600):
        if client.get("/health").status_code == 200:
            return client
        time.sleep(0.05)
    raise RuntimeError(client.get("/health").json())


@pytest.fixture(scope="module")
def c(tiny_model_dir, tmp_path_factory):
    settings = Settings(model=tiny_model_dir, data_dir=tmp_path_factory.mktemp("data"),
                        max_append_bytes=64 * 1024, append_chunk_bytes=2048, max_new_tokens_limit=64)
    client = start(settings)
    yield client
    client.__exit__(None, None, None)


def new(c) -> str:
    r = c.post("/v1/sessions")
    assert r.status_code == 201, r.text
    return r.json()["id"]


def append(c, sid: str, offset: int, data: bytes, **headers):
    return c.post(f"/v1/sessions/{sid}/append", params={"offset": offset}, content=data, headers={**TEXT, **headers})


def assert_error(r, status: int, code: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def test_session_lifecycle_and_pagination(c):
    ids = [new(c) for _ in range(3)]
    info = c.get(f"/v1/sessions/{ids[0]}").json()
    assert {"id", "offset", "tokens", "segments", "pending_tokens", "state_bytes", "state_digest", "model",
            "created_at", "updated_at"} <= set(info)
    assert info["offset"] == 0 and info["state_bytes"] > 0 and len(info["state_digest"]) == 64
    seen, cursor = [], None
    while True:
        page = c.get("/v1/sessions", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["sessions"]) <= 2
        seen += [s["id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    assert c.delete(f"/v1/sessions/{ids[0]}").status_code == 204
    assert_error(c.get(f"/v1/sessions/{ids[0]}"), 404, "not_found")
    assert_error(c.delete(f"/v1/sessions/{ids[0]}"), 404, "not_found")
    assert_error(c.get("/v1/sessions", params={"cursor": "nope"}), 422, "invalid_request")
    append(c, ids[1], 0, b"some words ")
    assert len(c.app.state.runtime.sessions._locks) == 0  # per-session locks live only while in use
    first = c.get("/v1/sessions?limit=2&cursor=")  # the README's form: an empty cursor is the first page
    assert first.status_code == 200 and first.json() == c.get("/v1/sessions", params={"limit": 2}).json()


def test_append_protocol_offsets_and_idempotent_retry(c):
    sid = new(c)
    first = append(c, sid, 0, "Hello wor".encode())
    assert first.status_code == 200 and first.json()["offset"] == 9
    digest = c.get(f"/v1/sessions/{sid}").json()["state_digest"]
    again = append(c, sid, 0, "Hello wor".encode())  # a retry of an acknowledged append
    assert again.status_code == 200 and again.json() == first.json()
    assert c.get(f"/v1/sessions/{sid}").json()["state_digest"] == digest
    assert assert_error(append(c, sid, 0, b"Hello WOR"), 409, "offset_mismatch")["offset"] == 9
    assert assert_error(append(c, sid, 3, b"lo"), 409, "offset_mismatch")["offset"] == 9
    assert assert_error(append(c, sid, 10**12, b"x"), 409, "offset_mismatch")["offset"] == 9
    second = append(c, sid, 9, "ld, and more words follow here.".encode())
    assert second.status_code == 200 and second.json()["offset"] == 40
    assert assert_error(append(c, sid, 0, "Hello wor".encode()), 409, "offset_mismatch")["offset"] == 40
    assert append(c, sid, 40, b"").json()["offset"] == 40  # empty body: nothing to do


def test_chunked_append_equals_whole_append(c):
    doc = document(1500).encode()
    whole, parts = new(c), new(c)
    assert append(c, whole, 0, doc).status_code == 200
    cuts = [0, 1, 7, 300, 301, 302, 555, 1000, len(doc)]
    for a, b in zip(cuts, cuts[1:]):
        assert append(c, parts, a, doc[a:b]).status_code == 200
    w, p = c.get(f"/v1/sessions/{whole}").json(), c.get(f"/v1/sessions/{parts}").json()
    assert (w["state_digest"], w["tokens"], w["offset"]) == (p["state_digest"], p["tokens"], p["offset"])
    q = {"question": "What follows?", "max_new_tokens": 12}
    assert c.post(f"/v1/sessions/{whole}/ask", json=q).json() == c.post(f"/v1/sessions/{parts}/ask", json=q).json()


def test_invalid_utf8_is_400_with_the_document_position(c):
    sid = new(c)
    append(c, sid, 0, b"abc ")
    err = assert_error(append(c, sid, 4, b"ok \xff more"), 400, "invalid_utf8")
    assert err["position"] == 7 and "7" in err["message"]
    assert c.get(f"/v1/sessions/{sid}").json()["offset"] == 4  # nothing stored


def test_body_limits_and_content_type(c):
    sid = new(c)
    assert_error(append(c, sid, 0, b"a" * (64 * 1024 + 1)), 413, "payload_too_large")

    def stream():  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b"word " * 1000

    r = c.post(f"/v1/sessions/{sid}/append", params={"offset": 0}, content=stream(), headers=TEXT)
    assert_error(r, 413, "payload_too_large")
    assert_error(append(c, sid, 0, b"{}", **{"Content-Type": "application/json"}), 415, "unsupported_media_type")
    assert_error(append(c, sid, 0, b"x", **{"Content-Type": "text/plain; charset=latin-1"}), 415,
                 "unsupported_media_type")
    assert c.get(f"/v1/sessions/{sid}").json()["offset"] == 0


def test_client_mistakes_are_clear_4xx(c):
    sid = new(c)
    assert_error(c.get("/v1/sessions/not-an-id"), 422, "invalid_request")
    assert_error(c.get("/v1/sessions/" + "0" * 32), 404, "not_found")
    assert_error(append(c, sid, -1, b"x"), 422, "invalid_request")
    assert_error(append(c, sid, 10**30, b"x"), 422, "invalid_request")
    assert_error(c.post(f"/v1/sessions/{sid}/append", content=b"x", headers=TEXT), 422, "invalid_request")
    r = c.post(f"/v1/sessions/{sid}/ask", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "malformed_json")
    assert_error(c.post(f"/v1/sessions/{sid}/ask", json={"question": 5}), 422, "invalid_request")
    assert_error(c.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "bogus": 1}), 422, "invalid_request")
    assert_error(c.get("/v1/nothing-here"), 404, "not_found")
    assert_error(c.put("/v1/sessions"), 405, "method_not_allowed")
    # curl -d sends a form content type; JSON that is not UTF-8
    for url in (f"/v1/sessions/{sid}/ask", "/v1/chat/completions"):
        for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, TEXT):
            r = c.post(url, content=json.dumps({"question": "q"}).encode(), headers=headers)
            assert "Content-Type: application/json" in assert_error(r, 415, "unsupported_media_type")["message"]
    r = c.post(f"/v1/sessions/{sid}/ask", content=b'{"question": "\xff"}', headers={"Content-Type": "application/json"})
    assert_error(r, 400, "malformed_json")


@pytest.mark.parametrize("body", [{"question": ""}, {"question": "   "}, {"question": "\u00a0\u2028"},
                                  {"question": "q", "max_new_tokens": 0},
                                  {"question": "q", "max_new_tokens": 65}, {"question": "q", "temperature": -0.1},
                                  {"question": "q", "top_p": 0}, {"question": "q", "top_p": 1.5}])
def test_ask_validation(c, body):
    assert_error(c.post(f"/v1/sessions/{new(c)}/ask", json=body), 422, "invalid_request")


def sse(c, url: str, body: dict) -> list[tuple[str | None, str]]:
    with c.stream("POST", url, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(r.iter_lines()))


def test_ask_json_and_stream_agree_and_never_change_the_session(c):
    sid = new(c)
    append(c, sid, 0, document(800).encode())
    before = c.get(f"/v1/sessions/{sid}").json()
    q = {"question": "What is this about?", "max_new_tokens": 20}
    answer = c.post(f"/v1/sessions/{sid}/ask", json=q).json()
    assert answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 20
    events = sse(c, f"/v1/sessions/{sid}/ask", {**q, "stream": True})
    tokens = [json.loads(d)["text"] for name, d in events if name == "token"]
    done = [json.loads(d) for name, d in events if name == "done"]
    assert done == [answer] and "".join(tokens) == answer["answer"]
    assert c.get(f"/v1/sessions/{sid}").json() == before


def test_stop_strings_trim_the_answer(c):
    sid = new(c)
    append(c, sid, 0, document(500).encode())
    full = c.post(f"/v1/sessions/{sid}/ask", json={"question": "Go on", "max_new_tokens": 30}).json()["answer"]
    stop = full[6:8]
    r = c.post(f"/v1/sessions/{sid}/ask", json={"question": "Go on", "max_new_tokens": 30, "stop": [stop]}).json()
    assert r["answer"] == full[: full.find(stop)] and r["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < 30


def test_openai_chat_completions(c):
    sid = new(c)
    append(c, sid, 0, document(600).encode())
    expected = c.post(f"/v1/sessions/{sid}/ask", json={"question": "Who?", "max_new_tokens": 10}).json()
    body = {"model": "armt", "session_id": sid, "max_tokens": 10,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Who?"}]}
    r = c.post("/v1/chat/completions", json=body).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["content"] == expected["answer"]
    assert r["usage"]["completion_tokens"] == 10 and r["choices"][0]["finish_reason"] == "length"
    events = sse(c, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == expected["answer"] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert_error(c.post("/v1/chat/completions", json={**body, "session_id": "0" * 32}), 404, "not_found")
    assert_error(c.post("/v1/chat/completions", json={**body, "messages": [{"role": "system", "content": "x"}]}),
                 422, "invalid_request")
    assert c.get("/v1/models").json()["data"][0]["id"].startswith("armt-")
    # OpenAI takes null for its optional fields; a limit names the field the client sent
    nulls = {**body, "temperature": None, "top_p": None, "stream": None, "n": None}
    assert c.post("/v1/chat/completions", json=nulls).json()["choices"] == r["choices"]
    error = assert_error(c.post("/v1/chat/completions", json={**body, "max_tokens": 65}), 422, "invalid_request")
    assert error["message"].startswith("max_tokens must be at most 64")


def test_a_body_with_thousands_of_bad_items_gets_a_short_answer(c):
    """Every validation error listed would make a 1 MB body an 18 MB answer and block the event loop for seconds."""
    sid = new(c)
    for messages in ([{"role": "user", "content": 1}] * 500, [{"role": "user", "content": "q"}] * 2000):
        r = c.post("/v1/chat/completions", json={"session_id": sid, "messages": messages})
        error = assert_error(r, 422, "invalid_request")
        assert len(error["details"]) <= 20 and len(r.content) < 20_000


def test_special_token_text_in_documents_and_questions_stays_text(c):
    """"<|endoftext|>" typed by a user is characters, not the EOS token the model stops at."""
    tokenizer = c.app.state.runtime.model.tokenizer
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert eos is not None and eos not in tokenizer.encode("a <|endoftext|> b", add_special_tokens=False).ids
    sid = new(c)
    append(c, sid, 0, document(300).encode())
    usage = [c.post(f"/v1/sessions/{sid}/ask", json={"question": q}).json()["usage"]["prompt_tokens"]
             for q in ("Where?", "Where? <|endoftext|>")]
    assert usage[1] - usage[0] > 1  # the special token would be one


def test_full_queue_is_429_with_retry_after_at_once(tiny_model_dir, tmp_path):
    client = start(Settings(model=tiny_model_dir, data_dir=tmp_path, max_queue=1, retry_after_seconds=2))
    try:
        rt = client.app.state.runtime
        gate = threading.Event()
        blocker = GenerateJob(rt.model.new_state(), [1, 2, 3], 2, 0.0, 1.0, None, lambda t: gate.wait(10) or True,
                              lambda reason, error: None)
        rt.scheduler.submit(blocker)  # the engine thread now waits inside this job's token callback
        sid = new(client)
        start_t = time.perf_counter()
        r = client.post(f"/v1/sessions/{sid}/ask", json={"question": "q"})
        assert_error(r, 429, "overloaded")
        assert r.headers["retry-after"] == "2" and time.perf_counter() - start_t < 2
        assert_error(append(client, sid, 0, b"some words here"), 429, "overloaded")
        gate.set()
        for _ in range(100):
            if rt.scheduler.waiting + rt.scheduler.running == 0:
                break
            time.sleep(0.05)
        assert client.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_new_tokens": 2}).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_sse_sends_ping_comments_while_a_question_waits(tiny_model_dir, tmp_path):
    client = start(Settings(model=tiny_model_dir, data_dir=tmp_path, sse_ping_seconds=0.1))
    try:
        rt = client.app.state.runtime
        gate = threading.Event()
        rt.scheduler.submit(GenerateJob(rt.model.new_state(), [1, 2], 2, 0.0, 1.0, None,
                                        lambda t: gate.wait(10) or True, lambda reason, error: None))
        threading.Timer(0.8, gate.set).start()  # the engine is busy for 0.8 s
        sid = new(client)
        with client.stream("POST", f"/v1/sessions/{sid}/ask",
                           json={"question": "q", "stream": True, "max_new_tokens": 2}) as r:
            lines = list(r.iter_lines())
        assert any(line.startswith(": ping") for line in lines), lines
        assert [name for name, _ in parse_sse(iter(lines))][-1] == "done"
    finally:
        client.__exit__(None, None, None)


def test_state_of_another_model_is_409(tiny_model_dir, tmp_path):
    foreign = SessionMeta(id="f" * 32, tenant="default", model="someone-else", created_at=1.0, updated_at=1.0,
                          version=1)
    DiskStore(tmp_path).save(foreign, MemoryState(torch.zeros(2, 48, 32), torch.zeros(2, 48), "someone-else"))
    client = start(Settings(model=tiny_model_dir, data_dir=tmp_path))
    try:
        assert client.get(f"/v1/sessions/{'f' * 32}").json()["model"] == "someone-else"
        err = assert_error(client.post(f"/v1/sessions/{'f' * 32}/ask", json={"question": "q"}), 409,
                           "state_model_mismatch")
        assert "someone-else" in err["message"]
        assert_error(append(client, "f" * 32, 0, b"x"), 409, "state_model_mismatch")
    finally:
        client.__exit__(None, None, None)


def test_health_is_503_until_a_model_is_loaded(tmp_path):
    with TestClient(create_app(Settings(model=tmp_path / "missing", data_dir=tmp_path / "d"))) as client:
        client.app.state.runtime.wait(30)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed" and "missing" in health.text
        assert client.get("/ready").status_code == 503
        r = client.post("/v1/sessions")
        assert_error(r, 503, "not_ready")
        assert "retry-after" in r.headers


def test_openapi_docs(c):
    spec = c.get("/openapi.json").json()
    append_op = spec["paths"]["/v1/sessions/{session_id}/append"]["post"]
    assert "text/plain" in append_op["requestBody"]["content"]
    assert {"/v1/sessions/{session_id}/ask", "/v1/chat/completions", "/health", "/metrics"} <= set(spec["paths"])
    assert c.get("/docs").status_code == 200


def test_ready_and_metrics(c):
    assert c.get("/ready").json() == {"status": "ready", "problems": []}
    sid = new(c)
    append(c, sid, 0, document(400).encode())
    c.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_new_tokens": 3})
    text = c.get("/metrics").text
    for name in ("armt_time_to_first_token_seconds_bucket", "armt_inter_token_latency_seconds_count",
                 "armt_ingest_tokens_total", "armt_ingest_segments_total", "armt_ingest_seconds_per_segment_sum",
                 "armt_queue_depth", "armt_running_requests", "armt_sessions", "armt_state_bytes",
                 "armt_state_save_seconds_count", "armt_generated_tokens_total", "armt_build_info{",
                 'armt_request_duration_seconds_count{method="POST",route="/v1/sessions/{session_id}/ask"'):
        assert name in text, name
    assert sid not in text  # never a session id in a label
    assert 'armt_failures_total{reason="not_found"}' in text


STARTUP = """
import sys, time
from fastapi.testclient import TestClient
from service.http.app import create_app
from service.settings import Settings
with TestClient(create_app(Settings(model=sys.argv[1], data_dir=sys.argv[2]))) as c:
    while c.get("/health").status_code != 200:
        time.sleep(0.05)
"""


def test_info_logs_of_the_service_are_printed_by_default(tiny_model_dir, tmp_path):
    """ARMT_LOG_LEVEL (info by default) reaches the armt.* loggers: uvicorn configures only its own, and Python's
    last-resort handler prints warnings only (a fresh process: pytest's own handlers would hide the bug)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARMT_")}
    out = subprocess.run([sys.executable, "-c", STARTUP, str(tiny_model_dir), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"INFO +armt\.runtime: model [0-9a-f]+ loaded from ", out.stderr), out.stderr


def test_a_blank_question_is_said_plainly(c):
    error = assert_error(c.post(f"/v1/sessions/{new(c)}/ask", json={"question": "  \n "}), 422, "invalid_request")
    assert "question is blank" in error["message"] and "pattern" not in error["message"]


def test_a_tenant_holds_at_most_its_session_quota(tiny_model_dir, tmp_path):
    """Each session stores a whole memory state: one key creating sessions in a loop must not fill the disk."""
    client = start(Settings(model=tiny_model_dir, data_dir=tmp_path, max_sessions_per_tenant=2))
    try:
        ids = [new(client) for _ in range(2)]
        error = assert_error(client.post("/v1/sessions"), 403, "session_quota")
        assert "ARMT_MAX_SESSIONS_PER_TENANT" in error["message"]
        assert client.delete(f"/v1/sessions/{ids[0]}").status_code == 204
        new(client)  # room again
    finally:
        client.__exit__(None, None, None)


def test_line_like_characters_stay_inside_an_event():
    """U+2028, U+2029 and U+0085 went out raw in the JSON of an event; httpx's iter_lines (the project's client)
    breaks lines there, so ask_stream failed on such an answer. The server escapes them, and the client breaks
    lines only where SSE does."""
    import asyncio

    from service.client import sse_lines
    from service.core.types import AnswerDone, TextDelta
    from service.http.routes.ask import sse_events

    text = "line\u2028sep\u2029x\x85y"

    async def events():
        yield TextDelta(text)
        yield AnswerDone(text, "stop", 3, 4)

    async def render():
        return [event async for event in sse_events(events())]

    sent = asyncio.run(render())
    assert not any(ch in e["data"] for e in sent for ch in "\u2028\u2029\x85")
    assert json.loads(sent[0]["data"])["text"] == text == json.loads(sent[1]["data"])["answer"]
    raw = f'event: token\r\ndata: {json.dumps({"text": text}, ensure_ascii=False)}\r\n\r\n: ping\r\n\r\n' \
          f'event: done\ndata: {json.dumps({"answer": text}, ensure_ascii=False)}\n\n'  # an unescaping server
    for cuts in ([], [len(raw) // 3, len(raw) // 2], list(range(1, len(raw)))):  # chunks cut anywhere, "\r|\n" too
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
        events_ = list(parse_sse(sse_lines(iter(chunks))))
        assert [n for n, _ in events_] == ["token", "done"]
        assert json.loads(events_[0][1])["text"] == text == json.loads(events_[1][1])["answer"]


def test_openai_features_the_server_lacks_are_refused(c):
    """They were accepted and ignored: a client asking for log-probabilities or tools got an answer without them."""
    sid = new(c)
    append(c, sid, 0, document(300).encode())
    body = {"session_id": sid, "max_tokens": 2, "messages": [{"role": "user", "content": "Who?"}]}
    for extra in ({"logprobs": True}, {"top_logprobs": 2}, {"tools": [{"type": "function"}]},
                  {"response_format": {"type": "json_object"}}, {"presence_penalty": 0.5}, {"logit_bias": {"5": 1}},
                  {"stream_options": {"include_usage": True}}):
        error = assert_error(c.post("/v1/chat/completions", json={**body, **extra}), 422, "invalid_request")
        assert next(iter(extra)) in error["message"], error
    neutral = {"logprobs": False, "top_logprobs": 0, "tools": [], "presence_penalty": 0, "frequency_penalty": 0.0,
               "response_format": {"type": "text"}, "user": "anyone", "parallel_tool_calls": True}
    assert c.post("/v1/chat/completions", json={**body, **neutral}).status_code == 200
    sampled = {**body, "temperature": 1.5, "seed": 3, "max_tokens": 6}
    greedy = c.post("/v1/chat/completions", json={**body, "max_tokens": 6}).json()["choices"][0]["message"]
    assert c.post("/v1/chat/completions", json={**sampled, "top_p": 0}).json()["choices"][0]["message"] == greedy


async def _raw_asgi(app, method: str, path: str, headers: list, messages: list, query: bytes = b""):
    """One request straight through the ASGI app, its body as `messages` (to send what no HTTP client sends: a
    disconnect in the middle of a body, a header value that is not ASCII) -> (status, body)."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    pending, sent = list(messages), []

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_client_gone_in_the_middle_of_a_json_body_is_a_499_not_malformed_json(c):
    """FastAPI reports a disconnect while it reads a JSON body as "error parsing the body": it was answered and
    counted as 400 malformed_json, a client mistake, where the append route says 499 cancelled."""
    sid = new(c)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"40")]
    body = [{"type": "http.request", "body": b'{"question":', "more_body": True}, {"type": "http.disconnect"}]
    for path in (f"/v1/sessions/{sid}/ask", "/v1/chat/completions"):
        status, answer = c.portal.call(_raw_asgi, c.app, "POST", path, headers, list(body))
        assert (status, answer["error"]["code"]) == (499, "cancelled"), answer


def test_a_content_length_of_non_ascii_digits_is_refused(c):
    """'²' is a digit to str.isdigit but not to int(): the append answered 500."""
    sid = new(c)
    headers = [(b"content-type", b"text/plain"), (b"content-length", "\u00b2".encode("latin-1"))]
    status, answer = c.portal.call(_raw_asgi, c.app, "POST", f"/v1/sessions/{sid}/append", headers,
                                   [{"type": "http.request", "body": b"ab", "more_body": False}], b"offset=0")
    assert (status, answer["error"]["code"]) == (422, "invalid_request"), answer


def test_an_answer_closed_before_its_first_read_stops_decoding():
    """The answer's events were an async generator: closed before it ever started, it ran no cleanup, so the engine
    decoded the whole answer for nobody."""
    import asyncio
    from types import SimpleNamespace

    from service.core.answers import AnswerRun
    from service.core.types import AskParams

    async def main():
        run = AnswerRun(None, SimpleNamespace(pending=[]), [1], AskParams("q"), asyncio.get_running_loop())
        await run.events().aclose()
        return run.job.cancel.is_set()

    assert asyncio.run(main())


def test_a_stream_whose_client_is_gone_before_it_starts_closes_the_answer(tiny_model_dir, tmp_path):
    """A client gone before the SSE body's first read: the body generator never started, so nothing closed the
    core's events (the route's cleanup lives in that generator)."""
    import asyncio

    from service.http.streams import event_stream

    closed = []

    class Events:
        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(3600)

        async def aclose(self):
            closed.append(True)

    async def render(events):
        async for event in events:
            yield event

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("connection reset by peer")

    response = event_stream(render, Events(), Settings(data_dir=tmp_path, model=tiny_model_dir))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/",
             "headers": []}
    with pytest.raises(BaseException):  # the send error, however the task group wraps it
        asyncio.run(response(scope, receive, send))
    assert closed
