"""The OpenAPI document tells the truth: every error status a route can answer, with the service's error body, and
this server's configured limits (ARMT_MAX_NEW_TOKENS_LIMIT, ARMT_MAX_QUESTION_CHARS) in the request schemas.

tests/test_service_fuzz.py holds the server to it: schemathesis generates requests from this document and fails
on any status, header or body the document does not declare, and on a schema-valid request that is refused.
"""
from __future__ import annotations

from fastapi import FastAPI

from service.http.schemas import ErrorBody
from service.settings import Settings

DESCRIPTIONS = {
    400: "Malformed JSON, or an append body that is not valid UTF-8 (`position` names the byte)",
    401: "Missing or wrong API key",
    403: "The API key's tenant holds ARMT_MAX_SESSIONS_PER_TENANT sessions already",
    404: "No such session for this API key",
    408: "The request body stalled (ARMT_BODY_TIMEOUT_SECONDS without data)",
    409: "Wrong append offset (the body holds the current `offset`), or a state written by another model",
    413: "Body over ARMT_MAX_APPEND_BYTES (append) or ARMT_MAX_JSON_BYTES (JSON)",
    415: "Append body not `text/plain; charset=utf-8`; a JSON body sent without Content-Type: application/json",
    422: "Invalid parameter or field values",
    429: "Engine queue full (ARMT_MAX_QUEUE); retry after `Retry-After` seconds",
    503: "Model not loaded yet, or the session store failed",
}
HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
}
V1 = (401, 422, 503)  # every /v1 route: auth, parameter validation, model loading / store errors
JSON_BODY = (400, 408, 413, 415)  # routes that read a JSON body


def error_responses(*codes: int) -> dict:
    """`responses=` for a route: each status with the error body model (and its headers)."""
    out: dict = {}
    for code in sorted(set(codes)):
        out[code] = {"model": ErrorBody, "description": DESCRIPTIONS[code]}
        if code in HEADERS:
            out[code]["headers"] = HEADERS[code]
    return out


def install(app: FastAPI, settings: Settings) -> None:
    """Generate the document once, then write the configured limits into it."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            apply_limits(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi


def apply_limits(document: dict, settings: Settings) -> None:
    schemas = document["components"]["schemas"]
    ask, chat = schemas["AskIn"]["properties"], schemas["ChatIn"]["properties"]
    ask["question"]["maxLength"] = settings.max_question_chars
    for field in (ask["max_new_tokens"], chat["max_tokens"], chat["max_completion_tokens"]):
        for branch in field.get("anyOf", [field]):
            if branch.get("type") == "integer":
                branch["maximum"] = settings.max_new_tokens_limit
