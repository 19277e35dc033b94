"""Prometheus exposition on a per-app registry: the core's stats dataclasses mapped to `armt_*` metrics.

Names follow Prometheus conventions: one prefix, base units (seconds, bytes), `_total` on counters, and no
unbounded labels (never a session id; `route` is the route template, e.g. /v1/sessions/{session_id}/ask).
"""
from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.routing import Match

from service.core.errors import StoreError
from service.core.runtime import Runtime
from service.core.stats import REQUEST_BUCKETS
from service.core.stats import Histogram as CoreHistogram


def package_version() -> str:
    try:
        return version("armt-serve")
    except PackageNotFoundError:
        return "unknown"


def _histogram(name: str, doc: str, h: CoreHistogram) -> HistogramMetricFamily:
    buckets, running = [], 0
    for bound, count in zip(list(h.bounds) + [float("inf")], h.counts):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class CoreCollector:
    """Reads the core's stats at scrape time (nothing is pushed from the core)."""

    def __init__(self, runtime: Runtime, labels: dict[str, str]) -> None:
        self.runtime, self.labels = runtime, labels

    def describe(self):
        return []  # do not collect at registration (the model may not be loaded yet)

    def collect(self):
        rt, stats = self.runtime, self.runtime.stats
        with stats.lock:
            eng, store, failures = stats.engine, stats.store, dict(stats.failures)
            yield _histogram("armt_time_to_first_token_seconds", "Question submitted to first token",
                             eng.time_to_first_token)
            yield _histogram("armt_inter_token_latency_seconds", "Time between consecutive answer tokens",
                             eng.inter_token_latency)
            yield _histogram("armt_ingest_seconds_per_segment", "Ingest time per written segment (per unit)",
                             eng.ingest_seconds_per_segment)
            yield _histogram("armt_act_hops", "ACT models: mean hops per layer used by an answer", eng.act_hops)
            yield _histogram("armt_state_save_seconds", "Durable write of a session", store.save_seconds)
            yield _histogram("armt_state_load_seconds", "Read of a session's state from the store",
                             store.load_seconds)
            counters = (("armt_ingest_tokens", "Tokens ingested into session memories", eng.ingest_tokens),
                        ("armt_ingest_segments", "Segments written into session memories", eng.ingest_segments),
                        ("armt_generated_tokens", "Answer tokens decoded", eng.generated_tokens),
                        ("armt_store_version_conflicts", "Session writes refused because another replica wrote "
                         "the session first (answered 409)", store.version_conflicts))
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        fail = CounterMetricFamily("armt_failures", "Failed requests and jobs by reason (error code)",
                                   labels=["reason"])
        for reason, count in sorted(failures.items()):
            fail.add_metric([reason], count)
        yield fail
        yield from self._gauges(rt)

    def _gauges(self, rt: Runtime):
        sched = rt.scheduler
        values = (("armt_queue_depth", "Admitted engine jobs not started yet", sched.waiting if sched else 0),
                  ("armt_running_requests", "Engine jobs in progress", sched.running if sched else 0),
                  ("armt_queue_capacity", "Engine jobs admitted (waiting + running) before a 429: ARMT_MAX_QUEUE",
                   rt.cfg.max_queue),
                  ("armt_sessions", "Sessions in the store (all replicas' with a shared store)",
                   _store_value(rt, "count")),
                  ("armt_state_bytes", "Bytes of all stored sessions", _store_value(rt, "total_bytes")))
        for name, doc, value in values:
            yield GaugeMetricFamily(name, doc, value=value)
        labels = {**self.labels, "model": rt.model.fingerprint if rt.model is not None else "", "status": rt.status}
        info = GaugeMetricFamily("armt_build_info", "Version and model of this server (value 1)",
                                 labels=list(labels))
        info.add_metric(list(labels.values()), 1)
        yield info


def _store_value(rt: Runtime, method: str) -> float:
    """A store-wide number; NaN when the store cannot answer (a scrape never fails for it), 0 before loading."""
    if rt.store is None:
        return 0
    try:
        return getattr(rt.store, method)()
    except StoreError:
        return float("nan")


class HttpMetrics:
    """ASGI middleware: armt_request_duration_seconds{route,method,status}, the whole response included."""

    def __init__(self, app, registry: CollectorRegistry) -> None:
        self.app = app
        self.duration = Histogram("armt_request_duration_seconds", "HTTP request duration, streaming included",
                                  ["route", "method", "status"], buckets=REQUEST_BUCKETS, registry=registry)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or _template(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"  # clients choose it: bounded here
            self.duration.labels(route, method, str(status[0])).observe(time.perf_counter() - start)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _template(scope) -> str:
    """The route template of a request answered before routing (a 413 from the body limits, a 401 from the key
    check): the route whose path it matches, so that it is counted with the rest of that route's requests;
    "unmatched" for a path no route has (templates only: the label stays bounded)."""
    for route in _flat_routes(getattr(scope.get("app"), "routes", ())):
        if route.matches(scope)[0] != Match.NONE:
            return getattr(route, "path", "unmatched")
    return "unmatched"


def _flat_routes(routes):
    """The routes, looking inside the routers FastAPI includes lazily (their routes carry their full paths here:
    every router of this app has its prefix and is included without another)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat_routes(inner.routes)
        else:
            yield route


def build_registry(runtime: Runtime, labels: dict[str, str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoreCollector(runtime, labels))
    return registry
