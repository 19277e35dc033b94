"""OpenAI-compatible `POST /v1/chat/completions` (and `GET /v1/models`) over a session's memory.

The session is named by `session_id` in the body (OpenAI clients: `extra_body={"session_id": ...}`); the last
user message is the question; earlier messages are ignored (the memory holds the document). Streaming sends
`chat.completion.chunk` objects and ends with `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from service.core.answers import collect
from service.core.errors import InvalidRequest
from service.core.types import AnswerDone, AskParams, TextDelta
from service.http.deps import V1_CHECKS, Sessions, Tenant, get_settings
from service.http.errors import error_event
from service.http.openapi import JSON_BODY, V1, error_responses
from service.http.schemas import ChatIn, stop_tuple
from service.http.streams import event_stream, sse_json
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=V1_CHECKS)


@router.get("/models", responses=error_responses(401, 422))
async def list_models(request: Request, tenant: Tenant) -> dict:
    """The one model this server runs (OpenAI `models.list` shape)."""
    return {"object": "list", "data": [{"id": _model_id(request), "object": "model", "created": 0,
                                        "owned_by": "armt-serve"}]}


def _model_id(request: Request) -> str:
    runtime = request.app.state.runtime
    return f"armt-{runtime.model.fingerprint}" if runtime.model is not None else "armt"


def _params(body: ChatIn, settings: Settings) -> AskParams:
    questions = [m.text() for m in body.messages if m.role == "user"]
    if not questions or not questions[-1].strip():
        raise InvalidRequest("messages must end with a non-empty user message (the question)")
    field, limit = next(((name, value) for name in ("max_completion_tokens", "max_tokens")
                         if (value := getattr(body, name)) is not None), (None, settings.default_max_new_tokens))
    if field is not None and limit > settings.max_new_tokens_limit:
        raise InvalidRequest(f"{field} must be at most {settings.max_new_tokens_limit}, got {limit}")
    temperature = 0.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # OpenAI takes 0: a nucleus of the top token alone, which is greedy decoding
        temperature, top_p = 0.0, 1.0
    return AskParams(question=questions[-1], max_new_tokens=limit, temperature=temperature, top_p=top_p,
                     stop=stop_tuple(body.stop), seed=body.seed)


@router.post("/chat/completions", responses={
    **error_responses(*V1, *JSON_BODY, 404, 409, 429),
    200: {"content": {"text/event-stream": {}}, "description": "chat.completion, or chunks (SSE) when stream is true"}})
async def chat_completions(request: Request, body: ChatIn, tenant: Tenant, svc: Sessions,
                           settings: Settings = Depends(get_settings)):
    events = await svc.ask(tenant, body.session_id, _params(body, settings))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": _model_id(request)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(lambda events: _chunks(events, meta, include_usage), events, settings)
    done = await collect(events)
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.answer},
                         "finish_reason": done.finish_reason}],
            "usage": _usage(done)}


def _usage(done: AnswerDone) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _chunk(meta: dict, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk = {**meta, "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return {"data": sse_json(chunk)}


async def _chunks(events: AsyncIterator, meta: dict, include_usage: bool) -> AsyncIterator[dict]:
    try:
        yield _chunk(meta, {"role": "assistant", "content": ""})
        async for event in events:
            if isinstance(event, TextDelta):
                yield _chunk(meta, {"content": event.text})
            elif isinstance(event, AnswerDone):
                yield _chunk(meta, {}, event.finish_reason)
                if include_usage:
                    yield _chunk(meta, {}, usage=_usage(event))
        yield {"data": "[DONE]"}
    except Exception as exc:  # after the 200 went out an error can only be part of the stream
        yield {"data": json.dumps(error_event(exc))}
    finally:
        await events.aclose()
