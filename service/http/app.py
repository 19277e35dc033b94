"""`create_app(settings)`: the FastAPI application. Nothing is loaded at import; the model loads in the lifespan
(in a background thread, so that /health can say 503 "loading" meanwhile)."""
from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.core.runtime import Runtime
from service.http import errors, openapi
from service.http.admission import AdmissionGate, KeyGate
from service.http.limits import BodyLimits
from service.http.metrics import HttpMetrics, build_registry, package_version
from service.http.routes import ask, openai, ops, sessions
from service.settings import Settings

DESCRIPTION = """Sessions hold a document in an ARMT's fixed-size associative memory: append the document's bytes
(any size, in any pieces, resumable by byte offset), then ask questions, as JSON or streamed (SSE).
Auth: `Authorization: Bearer KEY` on every /v1 route when ARMT_API_KEYS is set."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings.to_core())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(title="armt-serve", version=package_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.tenants = settings.tenants()
    app.state.registry = build_registry(runtime, {"version": package_version(), "device": settings.device,
                                                  "dtype": settings.dtype, "executor": settings.executor})
    errors.install(app)
    for module in (sessions, ask, openai, ops):
        app.include_router(module.router)
    app.add_middleware(BodyLimits, max_json_bytes=settings.max_json_bytes, body_timeout=settings.body_timeout_seconds)
    app.add_middleware(KeyGate)  # inside the admission gate: a full queue still answers 429 first
    app.add_middleware(AdmissionGate)
    app.add_middleware(HttpMetrics, registry=app.state.registry)
    openapi.install(app, settings)
    _configure_logging(settings.log_level)
    return app


def _configure_logging(level: str) -> None:
    """ARMT_LOG_LEVEL for the `armt.*` loggers. uvicorn configures only its own loggers, and Python's last-resort
    handler prints warnings and above: without a handler of its own (unless the embedding application set up
    logging) the service's info lines would never show."""
    logger = logging.getLogger("armt")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _MaskSecretQuery) for f in access.filters):
        access.addFilter(_MaskSecretQuery())


class _MaskSecretQuery(logging.Filter):
    """A client that puts its key in the URL (`?api_key=...`, refused) must not leave it in uvicorn's access log:
    query values of parameters named like a secret are masked there."""

    SECRET = re.compile(r"([?&][^=&#]*(?:key|token|secret|password|auth)[^=&#]*=)[^&#]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):  # (client, method, path, ...)
            record.args = (*args[:2], self.SECRET.sub(r"\1***", args[2]), *args[3:])
        return True


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory service.http.app:app_from_env` (settings from ARMT_* variables)."""
    return create_app(Settings())
