"""Counters, gauges and histograms the core keeps as plain dataclasses (no Prometheus here).

service/http/metrics.py reads them at scrape time and exposes them under Prometheus names; keeping them here lets
the worker and the session service record without knowing about HTTP or any metrics library.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

# Latencies of single tokens and requests (vLLM's TTFT range, 1 ms .. 43 min).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# Per-segment ingest time and state save/load: fast operations that can still stall for seconds.
FAST_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# ACT models: hops per layer actually used by an answer (averaged over its tokens and layers).
HOP_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
# Whole requests: an append of a book on a CPU takes minutes to hours, so the buckets reach 4 hours.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                   1200.0, 1800.0, 3600.0, 7200.0, 14400.0)


@dataclass
class Histogram:
    """Bucket counts (non-cumulative) + sum + count, like a Prometheus histogram."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class EngineStats:
    """Recorded by the engine worker thread."""

    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    ingest_seconds_per_segment: Histogram = field(default_factory=lambda: Histogram(FAST_BUCKETS))
    act_hops: Histogram = field(default_factory=lambda: Histogram(HOP_BUCKETS))  # ACT models: mean hops per answer
    ingest_tokens: int = 0
    ingest_segments: int = 0
    generated_tokens: int = 0


@dataclass
class StoreStats:
    """Recorded by the session service around store calls."""

    save_seconds: Histogram = field(default_factory=lambda: Histogram(FAST_BUCKETS))
    load_seconds: Histogram = field(default_factory=lambda: Histogram(FAST_BUCKETS))
    version_conflicts: int = 0  # writes a shared store refused: another replica wrote the session first


@dataclass
class ServiceStats:
    """All core statistics; one lock because writers are few and scrapes are rare."""

    engine: EngineStats = field(default_factory=EngineStats)
    store: StoreStats = field(default_factory=StoreStats)
    failures: Counter = field(default_factory=Counter)  # reason (an error code) -> count
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, reason: str) -> None:
        with self.lock:
            self.failures[reason] += 1
