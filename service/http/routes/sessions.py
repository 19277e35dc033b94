"""/v1/sessions: create, list, inspect, delete, and append the document's next bytes."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect

from service.core.errors import Cancelled, InvalidRequest, UnsupportedMediaType
from service.core.sessions import CURSOR_PATTERN
from service.http.deps import V1_CHECKS, SessionId, Sessions, Tenant
from service.http.openapi import V1, error_responses
from service.http.schemas import AppendOut, SessionList, SessionOut

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=V1_CHECKS)
ERRORS = error_responses(*V1, 404)  # routes naming a session
MAX_OFFSET = 2**63 - 1


@router.post("", status_code=201, response_model=SessionOut, responses=error_responses(*V1, 403, 413))
async def create_session(tenant: Tenant, svc: Sessions) -> SessionOut:
    """A new, empty session (memory state written to the store before the 201)."""
    return SessionOut.of(await svc.create(tenant))


@router.get("", response_model=SessionList, responses=error_responses(*V1))
async def list_sessions(tenant: Tenant, svc: Sessions, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        cursor: Annotated[str | None, Query(pattern=f"^$|{CURSOR_PATTERN}",
                                                            description="a next_cursor of this server; empty or "
                                                                        "absent for the first page")] = None
                        ) -> SessionList:
    """The caller's sessions, oldest first, `limit` per page; follow `next_cursor`."""
    page = await svc.list(tenant, limit, cursor)
    return SessionList(sessions=[SessionOut.of(m) for m in page.sessions], next_cursor=page.next_cursor)


@router.get("/{session_id}", response_model=SessionOut, responses=ERRORS)
async def get_session(tenant: Tenant, svc: Sessions, session_id: SessionId) -> SessionOut:
    return SessionOut.of(await svc.get(tenant, session_id))


@router.delete("/{session_id}", status_code=204, responses=ERRORS)
async def delete_session(tenant: Tenant, svc: Sessions, session_id: SessionId) -> Response:
    await svc.delete(tenant, session_id)
    return Response(status_code=204)


@router.post(
    "/{session_id}/append", response_model=AppendOut,
    responses=error_responses(*V1, 400, 404, 408, 409, 413, 415, 429),
    openapi_extra={"requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def append(request: Request, tenant: Tenant, svc: Sessions, session_id: SessionId,
                 offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="bytes already acknowledged")]
                 ) -> AppendOut:
    """Append the next bytes of the document (`text/plain; charset=utf-8`), streamed; 200 once durable.

    A wrong `offset` is a 409 whose body holds the current offset; the same bytes at the previous append's offset
    (a retry) get that append's answer again and change nothing.
    """
    _check_text_plain(request.headers.get("content-type"))
    result = await svc.append(tenant, session_id, offset, _body(request), _content_length(request))
    return AppendOut.of(result)


def _check_text_plain(content_type: str | None) -> None:
    if content_type is None:
        return  # curl --data-binary sends one; a missing header is read as text/plain; charset=utf-8
    media, *params = (p.strip().lower() for p in content_type.split(";"))
    charset = next((p.split("=", 1)[1].strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if media != "text/plain" or charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"append takes 'text/plain; charset=utf-8', got {content_type!r}")


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):  # str.isdigit alone takes '²', which int() refuses
        raise InvalidRequest(f"bad Content-Length {value!r}")
    return int(value)


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise Cancelled("the client disconnected during the upload; nothing was stored") from None
