"""No secrets in logs: a real `armt serve` at its most verbose (ARMT_LOG_LEVEL=debug, uvicorn's access log on)
gets every kind of request with valid keys, wrong keys and malformed auth; no key string may appear in its
stdout/stderr, in an error body or in /metrics. A malformed ARMT_API_KEYS must be refused at start-up without
quoting the key either."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.service_helpers import REPO, Server

KEYS = {"sk-live-SECRET-alpha-0123456789": "alice", "sk-live-SECRET-bravo-9876543210": "bob"}
WRONG = "sk-wrong-SECRET-charlie-555"
SECRETS = [*KEYS, WRONG]


def exercise(url: str) -> list[str]:
    """Every route with a valid key, and auth failures; returns the response bodies."""
    alice, bob = (httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=30) for k in KEYS)
    with alice, bob:
        sid = alice.post("/v1/sessions").json()["id"]
        calls = [
            alice.post(f"/v1/sessions/{sid}/append?offset=0", content=b"Mary went to the garden. "),
            alice.post(f"/v1/sessions/{sid}/append?offset=3", content=b"x"),  # 409
            alice.post(f"/v1/sessions/{sid}/ask", json={"question": "Where is Mary?", "max_new_tokens": 3}),
            alice.post(f"/v1/sessions/{sid}/ask", json={"question": "Where?", "max_new_tokens": 3, "stream": True}),
            alice.post("/v1/chat/completions", json={"session_id": sid, "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "Where is Mary?"}]}),
            alice.get("/v1/sessions"), alice.get("/v1/models"), alice.post(f"/v1/sessions/{sid}/ask", json={}),
            bob.get(f"/v1/sessions/{sid}"),  # another tenant: 404
            httpx.get(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {WRONG}"}),
            httpx.get(f"{url}/v1/sessions", headers={"Authorization": f"Basic {WRONG}"}),
            httpx.get(f"{url}/v1/sessions", headers={"Authorization": WRONG}),
            httpx.get(f"{url}/v1/sessions?api_key={next(iter(KEYS))}&limit=2"),  # a key in the URL: refused, and
            httpx.get(f"{url}/metrics"),  # masked in the access log
            alice.delete(f"/v1/sessions/{sid}"),
        ]
    assert [c.status_code for c in calls] == [200, 409, 200, 200, 200, 200, 200, 422, 404, 401, 401, 401, 401, 200, 204]
    return [c.text for c in calls]


def test_keys_never_reach_logs_error_bodies_or_metrics(tiny_model_dir, tmp_path):
    srv = Server(tiny_model_dir, tmp_path / "data", ARMT_API_KEYS=",".join(f"{k}={t}" for k, t in KEYS.items()),
                 ARMT_LOG_LEVEL="debug")
    with srv:
        bodies = exercise(srv.url)
    log = srv.log.read_text(errors="replace")
    assert "GET /v1/sessions HTTP/1.1" in log and "401" in log, log[-2000:]  # the access log was on: a real check
    leaked = [s for s in SECRETS if s in log or any(s in body for body in bodies)]
    assert not leaked, f"secrets in the server log or responses: {leaked}"


@pytest.mark.parametrize("bad", ["sk-live-SECRET-bad:alice", "sk-live-SECRET-bad=ali ce",
                                 "ok-key=alice,sk-live-SECRET-bad"])
def test_a_malformed_key_list_is_refused_without_quoting_the_key(tmp_path, bad):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "1"], cwd=REPO,
                          env={"ARMT_API_KEYS": bad, "ARMT_DATA_DIR": str(tmp_path), "PATH": ""},
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ARMT_API_KEYS item" in out, out[-2000:]
    assert "SECRET" not in out, out[-2000:]
