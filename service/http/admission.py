"""Fast 429s under overload: engine requests are refused before routing when the engine queue is full.

Under overload most requests are refusals, and each one routed through FastAPI (dependencies, body parsing,
validation, the exception handler) costs the event loop about as much as an accepted request's handling: the
loop, not the engine, becomes the bottleneck and every accepted question's first token waits behind refusals.
This middleware answers them from the path alone, with the same 429 body and Retry-After as the core's
`Overloaded`. A full queue is said before authentication (a 401 or 404 would have to wait for room anyway); the
scheduler checks again at submit time, so nothing is admitted past the limit.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

from starlette.requests import Request

from service.core.errors import Overloaded, Unauthorized
from service.http.deps import tenant_of
from service.http.errors import error_response

ENGINE_ROUTES = re.compile(r"^/v1/(sessions/[^/]+/(ask|append)|chat/completions)$")
TEMPLATES = {"ask": "/v1/sessions/{session_id}/ask", "append": "/v1/sessions/{session_id}/append",
             None: "/v1/chat/completions"}  # the route label of armt_request_duration_seconds


class AdmissionGate:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        match = ENGINE_ROUTES.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match:
            scheduler = scope["app"].state.runtime.scheduler  # None while the model loads: the route says 503
            try:
                if scheduler is not None:
                    scheduler.check_room()
            except Overloaded as exc:
                scope["route"] = SimpleNamespace(path=TEMPLATES[match.group(2)])
                response = error_response(Request(scope), 429, exc.code, exc.message,
                                          {"Retry-After": str(max(1, round(exc.retry_after)))})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class KeyGate:
    """401 for a /v1 request without a valid key before its body is read or parsed: a client without a key must
    not make the server read (up to a megabyte) and parse JSON for it. The tenant it found rides in the request's
    state to the routes' `Tenant` dependency."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        keys = scope["app"].state.tenants if scope["type"] == "http" else None
        if keys and scope["path"].startswith("/v1/"):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")  # first
            scheme, _, token = header.strip().partition(" ")
            try:
                if scheme.lower() != "bearer":
                    raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
                scope.setdefault("state", {})["tenant"] = tenant_of(keys, token)
            except Unauthorized as exc:
                match = ENGINE_ROUTES.match(scope["path"])
                if match:  # the route label of armt_request_duration_seconds, as the 429s above have it
                    scope["route"] = SimpleNamespace(path=TEMPLATES[match.group(2)])
                response = error_response(Request(scope), 401, exc.code, exc.message,
                                          {"WWW-Authenticate": 'Bearer realm="armt"'})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
