"""One table from core exceptions to HTTP status codes, and the handlers that give every error the same body:

    {"error": {"code": "offset_mismatch", "message": "...", ...extra fields such as "offset"}}

Client mistakes (malformed JSON, wrong types, unknown routes) get a 4xx in that form; anything unexpected is a
500 with no traceback in the body (the traceback goes to the server log).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.core import errors as e

log = logging.getLogger("armt.http")
MAX_DETAILS = 20  # validation errors listed in a 422 body

STATUS: dict[type[e.ArmtServiceError], int] = {
    e.InvalidRequest: 422,
    e.InvalidText: 400,
    e.UnsupportedMediaType: 415,
    e.PayloadTooLarge: 413,
    e.Unauthorized: 401,
    e.QuotaExceeded: 403,
    e.SessionNotFound: 404,
    e.OffsetConflict: 409,
    e.StateConflict: 409,
    e.Overloaded: 429,
    e.NotReady: 503,
    e.ShuttingDown: 503,
    e.Cancelled: 499,  # the client went away (nginx's "client closed request"): not a server error in metrics
    e.StoreError: 503,
}
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type"}


def status_of(exc: e.ArmtServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(request: Request, status: int, code: str, message: str, headers: dict | None = None,
                   **extra) -> JSONResponse:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        runtime.stats.fail(code)
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status,
                        headers=headers)


def error_event(exc: BaseException) -> dict:
    """The body of an SSE `error` event for a failure after the stream started."""
    if isinstance(exc, e.ArmtServiceError):
        return {"error": {"code": exc.code, "message": exc.message}}
    return {"error": {"code": "internal", "message": "internal error while decoding"}}


async def _core_error(request: Request, exc: e.ArmtServiceError) -> JSONResponse:
    headers = {}
    if isinstance(exc, e.Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif isinstance(exc, e.NotReady):
        headers["Retry-After"] = "5"
    elif isinstance(exc, e.Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="armt"'
    return error_response(request, status_of(exc), exc.code, exc.message, headers, **exc.extra)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(request, 400, "malformed_json", "the request body is not valid JSON")
    if _not_json(request) and any(tuple(err.get("loc", ())) == ("body",) for err in errors):
        # FastAPI reads a body of another type as bytes, which then "is not an object": say what is wrong
        return error_response(request, 415, "unsupported_media_type",
                              "this route takes a JSON body: send it with Content-Type: application/json")
    details = [{"location": ".".join(str(p) for p in err.get("loc", ())), "message": _message(err)}
               for err in errors[:MAX_DETAILS]]  # a body with 70,000 bad items must not get a 70,000-item answer
    summary = "; ".join(f"{d['location']}: {d['message']}" for d in details[:3])
    more = {"more_errors": len(errors) - MAX_DETAILS} if len(errors) > MAX_DETAILS else {}
    return error_response(request, 422, "invalid_request", summary or "invalid request", details=details, **more)


def _message(err: dict) -> str:
    """pydantic's message, said plainly where it would quote a regex."""
    if err.get("type") == "string_pattern_mismatch" and tuple(err.get("loc", ()))[-1:] == ("question",):
        return "question is blank: it needs something besides whitespace"
    return err.get("msg", "")


def _not_json(request: Request) -> bool:
    """A Content-Type that FastAPI does not parse as JSON (a missing one it does parse)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    return not (kind == "application/json" or kind.startswith("application/") and kind.endswith("+json"))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI: not UTF-8 JSON
        if isinstance(exc.__cause__ or exc.__context__, ClientDisconnect):  # FastAPI says the same of a client gone
            return await _core_error(request, e.Cancelled("the client disconnected before its request body ended"))
        return error_response(request, 400, "malformed_json", "the request body is not valid JSON in UTF-8")
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "internal", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.ArmtServiceError, _core_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
