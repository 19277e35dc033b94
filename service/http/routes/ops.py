"""Operations endpoints, open without an API key: /health (liveness + model loaded), /ready, /metrics."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

router = APIRouter(tags=["ops"])


class HealthOut(BaseModel):
    status: str
    error: str | None = None


class ReadyOut(BaseModel):
    status: str
    problems: list[str]


def _both(model: type[BaseModel]) -> dict:
    return {200: {"model": model}, 503: {"model": model, "description": "Not (yet) able to serve"}}


@router.get("/health", responses=_both(HealthOut))
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine runs; 503 while loading (or when loading failed)."""
    rt = request.app.state.runtime
    alive = rt.status == "ready" and rt.worker is not None and rt.worker.alive
    body = {"status": "ok" if alive else rt.status}
    if rt.error:
        body["error"] = rt.error
    return JSONResponse(body, status_code=200 if alive else 503)


@router.get("/ready", responses=_both(ReadyOut))
async def ready(request: Request) -> JSONResponse:
    """Like /health, and the session store must be usable (data directory writable, or Redis answering)."""
    rt = request.app.state.runtime
    problems = []
    if rt.status != "ready" or rt.worker is None or not rt.worker.alive:
        problems.append(f"model {rt.status}")
    elif (why := await asyncio.to_thread(rt.store.check)) is not None:
        problems.append(why)
    body = {"status": "ready" if not problems else "not_ready", "problems": problems}
    return JSONResponse(body, status_code=200 if not problems else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}})
async def metrics(request: Request) -> Response:
    # In a thread: with a shared store the session gauges are read from it over the network.
    body = await asyncio.to_thread(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
