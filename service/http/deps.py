"""Request dependencies: the caller's tenant (API-key auth) and the core services.

All are `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per
request that, under overload, costs the event loop more than the work itself.

Every /v1 route takes `Tenant`; tests/test_service_auth.py walks app.routes so that a new route without it fails.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.errors import InvalidRequest, Unauthorized
from service.core.sessions import SessionService
from service.settings import Settings

OPEN_TENANT = "default"  # everyone's tenant when ARMT_API_KEYS is empty
# Declares the bearer scheme in the OpenAPI document; the 401 itself is ours (auto_error=False), in our error body.
BEARER = HTTPBearer(auto_error=False, description="an API key of ARMT_API_KEYS (when set)")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def current_tenant(request: Request,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> str:
    """The tenant of the bearer key; 401 (with WWW-Authenticate) when keys are configured and none matches."""
    keys: dict[str, str] = request.app.state.tenants
    if not keys:
        return OPEN_TENANT
    checked = getattr(request.state, "tenant", None)  # by KeyGate (service/http/admission.py), before the body
    return checked if checked is not None else tenant_of(keys, credentials.credentials if credentials else "")


def tenant_of(keys: dict[str, str], token: str) -> str:
    """The tenant of a bearer token, or Unauthorized; compared with every key, in constant time per key."""
    token = token.strip()
    if not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = None
    for key, owner in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


async def known_query_only(request: Request) -> None:
    """422 for a query parameter the route does not take: a misspelt `?limt=5` must not be silently ignored.
    A dependency of every /v1 router (V1_CHECKS); tests/test_service_auth.py checks that each /v1 route has it."""
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    unknown = set(request.query_params) - set(_query_names(route.dependant))
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")


def _query_names(dependant):
    yield from (param.alias for param in dependant.query_params)
    for dep in dependant.dependencies:
        yield from _query_names(dep)


async def session_service(request: Request) -> SessionService:
    """503 while the model loads."""
    return request.app.state.runtime.require()


V1_CHECKS = [Depends(known_query_only)]  # the `dependencies=` of every /v1 router
Tenant = Annotated[str, Depends(current_tenant)]
Sessions = Annotated[SessionService, Depends(session_service)]
SessionId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="32 lowercase hex digits",
                                examples=["9f86d081884c7d659a2feaa0c55ad015"])]
