"""API keys: every /v1 route needs a bearer key when ARMT_API_KEYS is set; sessions are per tenant."""
from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from service.http.app import create_app
from service.http.deps import current_tenant, known_query_only
from service.settings import Settings
from tests.test_service_http import start

KEYS = "key-a=alice,key-b=bob"


def api_routes(routes):
    """Every APIRoute, looking inside included routers (FastAPI keeps them lazily)."""
    for route in routes:
        if hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)
        elif isinstance(route, APIRoute):
            yield route


def dependency_calls(dependant):
    for dep in dependant.dependencies:
        yield dep.call
        yield from dependency_calls(dep)


@pytest.mark.parametrize("dependency", [current_tenant, known_query_only])
def test_every_v1_route_requires_auth_and_known_query_parameters(tmp_path, dependency):
    routes = list(api_routes(create_app(Settings(data_dir=tmp_path)).routes))
    v1 = [r for r in routes if r.path.startswith("/v1")]
    assert len(v1) >= 8
    missing = [f"{sorted(r.methods)} {r.path}" for r in v1 if dependency not in set(dependency_calls(r.dependant))]
    assert not missing, f"/v1 routes without {dependency.__name__}: {missing}"


@pytest.fixture(scope="module")
def c(tiny_model_dir, tmp_path_factory):
    client = start(Settings(model=tiny_model_dir, data_dir=tmp_path_factory.mktemp("auth"), api_keys=KEYS))
    yield client
    client.__exit__(None, None, None)


A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
SID = "0" * 32


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/sessions"), ("GET", "/v1/sessions"), ("GET", f"/v1/sessions/{SID}"),
    ("DELETE", f"/v1/sessions/{SID}"), ("POST", f"/v1/sessions/{SID}/append?offset=0"),
    ("POST", f"/v1/sessions/{SID}/ask"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LWE="},
                                     {"Authorization": "Bearer"}])
def test_v1_routes_are_401_without_a_valid_key(c, method, path, headers):
    r = c.request(method, path, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_ops_routes_stay_open(c):
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 200
    assert c.get("/metrics").status_code == 200


def test_sessions_are_visible_only_to_their_tenant(c):
    sid = c.post("/v1/sessions", headers=A).json()["id"]
    assert c.get(f"/v1/sessions/{sid}", headers=A).status_code == 200
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/append?offset=0"), ("POST", "/ask")):
        r = c.request(method, f"/v1/sessions/{sid}{path}", headers={**B, "Content-Type": "text/plain"},
                      content=b"hello" if "append" in path else b'{"question": "q"}' if "ask" in path else None)
        if "ask" in path:
            r = c.post(f"/v1/sessions/{sid}/ask", headers=B, json={"question": "q"})
        assert r.status_code == 404, (method, path, r.text)
    body = {"session_id": sid, "messages": [{"role": "user", "content": "q"}]}
    assert c.post("/v1/chat/completions", headers=B, json=body).status_code == 404
    assert sid in [s["id"] for s in c.get("/v1/sessions", headers=A).json()["sessions"]]
    assert sid not in [s["id"] for s in c.get("/v1/sessions", headers=B).json()["sessions"]]
    assert c.get(f"/v1/sessions/{sid}", headers=A).json()["offset"] == 0  # B's append did nothing
