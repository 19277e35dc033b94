"""Request dependencies: the caller's tenant (API-key auth) and the core services.

Every /v1 route takes `Tenant`; tests/test_service_auth.py walks app.routes so that a new route without it fails.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from service.core.errors import Unauthorized
from service.core.runtime import Runtime
from service.core.sessions import SessionService
from service.settings import Settings

OPEN_TENANT = "default"  # everyone's tenant when ARMT_API_KEYS is empty


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def current_tenant(request: Request) -> str:
    """The tenant of the bearer key; 401 (with WWW-Authenticate) when keys are configured and none matches."""
    keys: dict[str, str] = request.app.state.tenants
    if not keys:
        return OPEN_TENANT
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = None
    for key, owner in keys.items():  # compare with every key, in constant time per key
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


def session_service(request: Request) -> SessionService:
    """503 while the model loads."""
    return get_runtime(request).require()


Tenant = Annotated[str, Depends(current_tenant)]
Sessions = Annotated[SessionService, Depends(session_service)]
SessionId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="32 lowercase hex digits",
                                examples=["9f86d081884c7d659a2feaa0c55ad015"])]
