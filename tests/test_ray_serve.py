"""Ray Serve (service/ray_app.py): a local Ray cluster runs two replicas of the service on the tiny model with one
real redis-server as their store; one session is appended and asked through Ray's HTTP proxy, which spreads the
requests over both replicas (the `x-armt-replica` header says which one answered)."""
from __future__ import annotations

import time
from collections import defaultdict

import httpx
import pytest
import ray
from fastapi.testclient import TestClient
from ray import serve

from service.http.app import create_app
from service.ray_app import REPLICA_HEADER, build
from service.settings import Settings
from tests.service_helpers import document, free_port

DOC = document(4000).encode()
PIECE = 200
QUESTION = {"question": "What is described here?", "max_new_tokens": 12}
TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def reference(model_dir, data_dir) -> tuple[str, dict]:
    """The same document and question in one process on the disk store: the expected digest and answer."""
    with TestClient(create_app(Settings(model=model_dir, data_dir=data_dir))) as c:
        for _ in range(600):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        sid = c.post("/v1/sessions").json()["id"]
        c.post(f"/v1/sessions/{sid}/append", params={"offset": 0}, content=DOC, headers=TEXT)
        return c.get(f"/v1/sessions/{sid}").json()["state_digest"], c.post(f"/v1/sessions/{sid}/ask",
                                                                           json=QUESTION).json()


@pytest.fixture()
def ray_serve_url(tiny_model_dir, redis_db, monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    env = {"ARMT_MODEL": str(tiny_model_dir), "ARMT_STORE": redis_db, "ARMT_LOG_LEVEL": "warning",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # Logical CPUs: the two replicas ask for one each; the machine's cores are shared by everything anyway.
    ray.init(num_cpus=4, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"num_replicas": "2"}), name="armt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_two_ray_replicas_serve_one_session(ray_serve_url, tiny_model_dir, tmp_path):
    served = defaultdict(set)  # replica -> what it did
    with httpx.Client(base_url=ray_serve_url, timeout=120) as c:
        r = c.post("/v1/sessions")
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        for start in range(0, len(DOC), PIECE):  # each append may land on either replica
            r = c.post(f"/v1/sessions/{sid}/append", params={"offset": start}, content=DOC[start:start + PIECE],
                       headers=TEXT)
            assert r.status_code == 200, r.text
            served[r.headers[REPLICA_HEADER]].add("append")
        answers, infos = {}, {}
        for _ in range(40):
            r = c.post(f"/v1/sessions/{sid}/ask", json=QUESTION)
            assert r.status_code == 200, r.text
            answers[r.headers[REPLICA_HEADER]] = r.json()
            r = c.get(f"/v1/sessions/{sid}")
            infos[r.headers[REPLICA_HEADER]] = r.json()
            if len(answers) == len(infos) == 2:
                break
        metrics = c.get("/metrics")
    assert len(served) == 2 and all(what == {"append"} for what in served.values()), dict(served)
    assert len(answers) == 2 and len(infos) == 2, (answers, infos)
    digest, answer = reference(tiny_model_dir, tmp_path)
    assert {i["state_digest"] for i in infos.values()} == {digest}
    assert {i["offset"] for i in infos.values()} == {len(DOC)}
    assert all(a == answer for a in answers.values()), (answers, answer)
    assert metrics.status_code == 200 and "armt_sessions 1.0" in metrics.text
