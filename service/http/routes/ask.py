"""POST /v1/sessions/{id}/ask: a question over the session's memory, as JSON or as Server-Sent Events.

SSE events (one `data:` line of JSON each):
    event: token   data: {"text": "..."}                 one per decoded piece (whole characters only)
    event: done    data: {"answer", "finish_reason", "mean_hops", "usage": {"prompt_tokens", "completion_tokens"}}
    event: error   data: {"error": {"code", "message"}}  if decoding fails after the stream started, or the
                                                         server shuts down before the answer ends (shutting_down)
and `: ping` comments while waiting. Closing the connection stops decoding.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends

from service.core.answers import collect
from service.core.types import AnswerDone, AskParams, TextDelta
from service.http.deps import V1_CHECKS, SessionId, Sessions, Tenant, get_settings
from service.http.errors import error_event
from service.http.openapi import JSON_BODY, V1, error_responses
from service.http.schemas import AskIn, AskOut, stop_tuple
from service.http.streams import event_stream, sse_json
from service.settings import Settings

router = APIRouter(prefix="/v1/sessions", tags=["ask"], dependencies=V1_CHECKS)


def ask_params(body: AskIn, settings: Settings) -> AskParams:
    return AskParams(question=body.question, max_new_tokens=body.max_new_tokens or settings.default_max_new_tokens,
                     temperature=body.temperature, top_p=body.top_p, stop=stop_tuple(body.stop), seed=body.seed,
                     max_hop=body.max_hop)


@router.post(
    "/{session_id}/ask", response_model=AskOut,
    responses={**error_responses(*V1, *JSON_BODY, 404, 409, 429),
               200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"}},
)
async def ask(body: AskIn, tenant: Tenant, svc: Sessions, session_id: SessionId,
              settings: Settings = Depends(get_settings)):
    """Answer a question from the session's memory; the session is not changed."""
    events = await svc.ask(tenant, session_id, ask_params(body, settings))
    if not body.stream:
        return AskOut.of(await collect(events))
    return event_stream(sse_events, events, settings)


async def sse_events(events: AsyncIterator) -> AsyncIterator[dict]:
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield {"event": "token", "data": sse_json({"text": event.text})}
            elif isinstance(event, AnswerDone):
                yield {"event": "done", "data": sse_json(AskOut.of(event).model_dump(mode="json"))}
    except Exception as exc:  # after the 200 went out an error can only be an event
        yield {"event": "error", "data": json.dumps(error_event(exc))}
    finally:
        await events.aclose()
