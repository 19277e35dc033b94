"""Streamed answers (SSE) across a server shutdown.

sse-starlette cuts every open stream the moment uvicorn gets SIGTERM: no final event, and an HTTP response that never
ends (clients see a broken connection). Instead each stream here learns of the shutdown (sse-starlette's
`shutdown_event`), may finish its answer within ARMT_SHUTDOWN_GRACE_SECONDS, and otherwise ends with its route's
error event (code `shutting_down`) and a properly closed response, so that a client knows to ask again.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import anyio
from sse_starlette import EventSourceResponse

from service.core.errors import ShuttingDown
from service.settings import Settings


# Characters that many line readers (Python's str.splitlines, httpx's iter_lines) take for line breaks, though SSE
# breaks lines only at CR and LF: escaped in JSON, so that an event's data stays one line for every client.
_LINE_LIKE = {ord("\x85"): "\\u0085", ord("\u2028"): "\\u2028", ord("\u2029"): "\\u2029"}


def sse_json(value) -> str:
    """value as compact-enough JSON for an SSE data line: UTF-8 text kept, the line-like characters escaped."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_LIKE)


def event_stream(render: Callable[[AsyncIterator], AsyncIterator[dict]], events: AsyncIterator,
                 settings: Settings) -> EventSourceResponse:
    """`render(events)` (the route's SSE messages) as a response that survives a shutdown as described above."""
    shutdown, grace = anyio.Event(), settings.shutdown_grace_seconds
    return _ClosingResponse(events, render(until_shutdown(events, shutdown, grace)), ping=settings.sse_ping_seconds,
                            shutdown_event=shutdown, shutdown_grace_period=grace + 1.0)


class _ClosingResponse(EventSourceResponse):
    """Closes the core's events when the response ends however it ends: a client gone before the stream's first
    read never starts the body generator, whose own cleanup (until_shutdown's) would then never run."""

    def __init__(self, events: AsyncIterator, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


async def until_shutdown(events: AsyncIterator, shutdown: anyio.Event, grace: float) -> AsyncIterator:
    """The core's events until `grace` seconds after `shutdown` is set; then ShuttingDown is raised (and the
    answer's engine job dropped). Each next event is awaited in a task, never cancelled while it may still come."""
    it, nxt = aiter(events), None
    deadline = asyncio.ensure_future(_after(shutdown, grace))
    try:
        while True:
            nxt = asyncio.ensure_future(anext(it))
            await asyncio.wait({nxt, deadline}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                raise ShuttingDown("the server is shutting down; ask again")
            try:
                event = nxt.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        deadline.cancel()
        with anyio.CancelScope(shield=True):  # also when the stream itself is being cancelled (client gone)
            if nxt is not None and not nxt.done():
                nxt.cancel()  # the event generator's own cleanup (it drops the engine job) runs here
                await asyncio.wait({nxt})
            await events.aclose()


async def _after(shutdown: anyio.Event, grace: float) -> None:
    await shutdown.wait()
    await anyio.sleep(grace)
