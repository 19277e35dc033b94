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


@pytest.mark.parametrize("path", ["/v1/sessions/" + "a" * 32 + "/ask", "/v1/chat/completions"])
def test_no_key_is_a_401_before_the_body_is_read(c, path):
    """Without a key the server neither reads nor parses a body: malformed JSON still gets the 401, not a 400."""
    r = c.post(path, content=b"{not json" + b" " * 500_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    template = path.replace("a" * 32, "{session_id}")  # counted under its route, not as "unmatched"
    assert f'route="{template}",status="401"' in c.get("/metrics").text


def test_requests_refused_before_routing_are_counted_under_their_route(c):
    """A 401 on POST /v1/sessions (no body: the key check runs before routing) and a 413 from the body limits
    were counted as route="unmatched", apart from the rest of their route's requests; an unknown path still is."""
    assert c.post("/v1/sessions").status_code == 401
    big = c.post("/v1/sessions/" + "a" * 32 + "/ask", headers={**A, "Content-Length": str(10**9)}, content=b"{}")
    assert big.status_code == 413
    assert c.get("/no/such/path").status_code == 404
    text = c.get("/metrics").text
    assert 'method="POST",route="/v1/sessions",status="401"' in text
    assert 'method="POST",route="/v1/sessions/{session_id}/ask",status="413"' in text
    assert 'method="GET",route="unmatched",status="404"' in text


def test_ops_routes_stay_open(c):
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 200
    assert c.get("/metrics").status_code == 200


# Every /v1 route: those that name a session, with a request that passes validation (so that only the tenant check
# can refuse it), and those that do not. A new /v1 route fails test_every_v1_route_is_classified until added here.
NAMING = {
    ("GET", "/v1/sessions/{session_id}"): {},
    ("POST", "/v1/sessions/{session_id}/append"): {"params": {"offset": 0}, "content": b"hello world ",
                                                   "headers": {"Content-Type": "text/plain; charset=utf-8"}},
    ("POST", "/v1/sessions/{session_id}/ask"): {"json": {"question": "q", "max_new_tokens": 2}},
    ("POST", "/v1/chat/completions"): {"json": {"session_id": "{session_id}", "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "q"}]}},
    ("DELETE", "/v1/sessions/{session_id}"): {},
}
NOT_NAMING = {("POST", "/v1/sessions"), ("GET", "/v1/sessions"), ("GET", "/v1/models")}


def test_every_v1_route_is_classified(tmp_path):
    routes = {(m, r.path) for r in api_routes(create_app(Settings(data_dir=tmp_path)).routes)
              if r.path.startswith("/v1") for m in r.methods}
    assert routes == set(NAMING) | NOT_NAMING


def another_tenants_requests(c, sid: str, headers: dict) -> list[int]:
    """Every session-naming route called on `sid` with `headers`; their status codes."""
    statuses = []
    for (method, path), kwargs in NAMING.items():
        kwargs = dict(kwargs)
        if "json" in kwargs:
            kwargs["json"] = {k: (sid if v == "{session_id}" else v) for k, v in kwargs["json"].items()}
        kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
        statuses.append(c.request(method, path.replace("{session_id}", sid), **kwargs).status_code)
    return statuses


def test_sessions_are_visible_only_to_their_tenant_also_after_a_restart(tiny_model_dir, tmp_path):
    """B gets 404 on every route naming A's session (B's append repeats A's last append: as a retry it would be
    answered with A's counts), sees none of A's sessions, and changes nothing; the same after a restart that
    rebuilds the index from the disk store. A's own requests on the same routes all succeed."""
    settings = Settings(model=tiny_model_dir, data_dir=tmp_path, api_keys=KEYS)
    c = start(settings)
    sid = c.post("/v1/sessions", headers=A).json()["id"]
    assert c.post(f"/v1/sessions/{sid}/append", params={"offset": 0}, content=b"hello world ", headers=A).is_success
    before = c.get(f"/v1/sessions/{sid}", headers=A).json()
    for restarted in (False, True):
        if restarted:
            c.__exit__(None, None, None)
            c = start(settings)
        assert another_tenants_requests(c, sid, B) == [404] * len(NAMING), restarted
        assert [s["id"] for s in c.get("/v1/sessions", headers=B).json()["sessions"]] == []
        assert c.get(f"/v1/sessions/{sid}", headers=A).json() == before
    assert another_tenants_requests(c, sid, A) == [200, 200, 200, 200, 204]  # the append: a retry of A's own
    c.__exit__(None, None, None)


def test_every_v1_route_declares_the_statuses_its_checks_answer(tmp_path):
    """Every /v1 route refuses an unknown query parameter (422), and create-session's empty body is held to the JSON
    limit (413): the OpenAPI document left both out for some routes."""
    spec = create_app(Settings(data_dir=tmp_path)).openapi()
    missing = [f"{method.upper()} {path}" for path, ops in spec["paths"].items() if path.startswith("/v1")
               for method, op in ops.items() if "422" not in op["responses"]]
    assert not missing, missing
    assert "413" in spec["paths"]["/v1/sessions"]["post"]["responses"]


@pytest.mark.parametrize("field, value", [("api_keys", "ka=alice,\u043a\u043b\u044e\u0447=dave"),
                                          ("max_question_chars", 2_000_000), ("retry_after_seconds", 0)])
def test_settings_that_could_never_work_as_configured_are_refused(tmp_path, field, value):
    """A non-ASCII key could never match (headers arrive as Latin-1); questions over 1,000,000 characters are
    refused by the schema whatever the setting; Retry-After 0 went out as 1."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        Settings(data_dir=tmp_path, **{field: value})
    assert Settings(data_dir=tmp_path, log_level="INFO").log_level == "info"
