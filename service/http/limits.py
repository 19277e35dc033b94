"""Request body limits as ASGI middleware: how long a body may stall and how large a JSON body may be.

uvicorn waits for a request body as long as the client keeps the connection open, so a client that announces a
body and then sends it one byte a minute (or never) would hold a request, and its memory, forever. Here every wait
for the next piece of a body is bounded (`body_timeout` seconds, then 408). JSON bodies (every route but append)
are read whole by FastAPI, so they are limited to `max_json_bytes` (413: from Content-Length before anything is
read, else while counting). Append bodies stream through the engine a chunk at a time and have their own limit
(ARMT_MAX_APPEND_BYTES, checked in the core), so only the timeout applies to them.

The errors are raised from `receive` as starlette HTTPExceptions: FastAPI re-raises those while it reads a body
(other exceptions would become a 400), and service/http/errors.py renders them in the service's error body.
"""
from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.http.errors import error_response

STREAMED_BODY_SUFFIX = "/append"  # routes whose body is streamed and limited by the core


class BodyLimits:
    def __init__(self, app, max_json_bytes: int, body_timeout: float) -> None:
        self.app, self.max_json_bytes, self.body_timeout = app, max_json_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = None if scope["path"].endswith(STREAMED_BODY_SUFFIX) else self.max_json_bytes
        declared = _content_length(scope)
        if limit is not None and declared is not None and declared > limit:
            response = error_response(Request(scope), 413, "payload_too_large",
                                      f"request body of {declared} bytes is over the limit of {limit} bytes")
            return await response(scope, receive, send)
        return await self.app(scope, self._guarded(receive, limit), send)

    def _guarded(self, receive, limit: int | None):
        """`receive` with a deadline on each piece of the body and a byte count; after the body's last piece it
        is the plain `receive` again (streaming responses wait on it for the client's disconnect, unbounded)."""
        state = {"done": False, "received": 0}

        async def guarded_receive():
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise HTTPException(408, f"no request body data for {self.body_timeout:g} seconds") from None
            if message["type"] != "http.request":
                state["done"] = True  # a disconnect
                return message
            state["received"] += len(message.get("body", b""))
            state["done"] = not message.get("more_body", False)
            if limit is not None and state["received"] > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        return guarded_receive


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # a malformed one is refused by the route or uvicorn
    return None
