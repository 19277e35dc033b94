"""Ray Serve deployment of the HTTP service: N replicas of the same FastAPI app behind Ray's HTTP proxy, sharing
one Redis session store, so that Ray (placement, routing, health checks, restarts) distributes the work and no
code of ours does. Any replica can serve any session because the state lives in the store and every
write is version-checked there (service/core/redis_store.py).

    ARMT_STORE=redis://host:6379/0 serve run service.ray_app:build num_replicas=2

Settings come from the ARMT_* environment of the replicas (deploy/ray/rayservice.yaml sets them as the worker
containers' `env`, which Ray's replica processes inherit; `runtime_env.env_vars` works too).
This module lives in the `service` package, not in deploy/, so that the container image (which installs the
package) can import it. Needs the `deploy` extra: `pip install 'armt-serve[deploy]'`.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from ray import serve

REPLICA_HEADER = "x-armt-replica"  # which replica answered: for debugging routing (and for the tests)
LOAD_TIMEOUT_S = 1800.0  # a large model from a slow volume; Ray's own deployment timeout applies as well


class ReplicaHeader:
    """ASGI middleware: adds `x-armt-replica` to every response (streamed ones too)."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_app() -> FastAPI:
    """Runs inside each replica. Ray routes requests to a replica once its ASGI start-up has finished, so the
    start-up here waits for the model: a replica never takes traffic only to answer 503 "loading"."""
    from service.http.app import create_app
    from service.settings import Settings

    settings = Settings()
    if settings.store == "disk":
        raise ValueError("under Ray Serve any replica may get any request: set ARMT_STORE=redis://... (a store "
                         "shared by the replicas); the disk store is one process's own")
    app = create_app(settings)
    service_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        async with service_lifespan(a) as state:
            runtime = a.state.runtime
            if not await asyncio.to_thread(runtime.wait, LOAD_TIMEOUT_S):
                raise RuntimeError(f"model not loaded: {runtime.status} {runtime.error or ''}")
            yield state

    app.router.lifespan_context = lifespan
    app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
    return app


@serve.deployment(
    name="armt",
    # The service queues and refuses work itself (ARMT_MAX_QUEUE, 429 with Retry-After) and SSE answers stay open
    # while they stream: Ray's small default would queue requests in the proxy instead.
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 1},  # the engine worker thread keeps about one core busy
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(build_app)
class ArmtReplica:
    """One replica: the FastAPI app (model, engine worker, Redis store client) in a Ray actor."""

    def check_health(self) -> None:
        """Ray restarts a replica whose engine died (the same condition as /health, after start-up)."""
        runtime = self.app.state.runtime
        if runtime.status != "ready" or runtime.worker is None or not runtime.worker.alive:
            raise RuntimeError(f"engine not running: {runtime.status} {runtime.error or ''}")


def build(args: dict[str, str]) -> serve.Application:
    """Application builder for `serve run service.ray_app:build num_replicas=N` and RayService configs."""
    return ArmtReplica.options(num_replicas=int(args.get("num_replicas", 2))).bind()
