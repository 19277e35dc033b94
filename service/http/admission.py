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

from service.core.errors import Overloaded
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
