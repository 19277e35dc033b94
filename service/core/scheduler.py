"""Who runs next: a bounded set of admitted jobs, handed to the engine worker as units of work. No tensors.

Two kinds of job: an `IngestJob` (token ids to write into one session's memory) and a `GenerateJob` (a question
decoded token by token). The HTTP layer submits through `SessionService`; a full scheduler refuses at once
(`Overloaded` -> 429 + Retry-After) instead of letting requests queue without bound.

Policy (`next_work`): every running decode gets one step per round (questions that have no token yet first),
then the ingest jobs (up to `max_batch` sessions, oldest first) advance by one bounded unit together. So a
question's first token waits for at most one ingest unit, never for another client's whole book, and concurrent
appends share one diagonal pipeline.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import Overloaded


@dataclass(eq=False)
class IngestJob:
    """Write `ids` into `state` (opaque here); the result state is set on `future`. Cancel = drop the job."""

    state: object
    ids: list[int]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cursor: int = 0  # ids already written
    started: bool = False
    reserved: bool = False  # submitted under a Reservation, whose place in the queue it uses
    tenant: str = ""  # whose (the per-tenant share of the queue; "" counts for no one)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


@dataclass(eq=False)
class GenerateJob:
    """Decode an answer; `on_token(id) -> keep going?` and `on_done(finish_reason, error)` run on the worker."""

    state: object
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    on_token: Callable[[int], bool]
    on_done: Callable[[str | None, BaseException | None], None]
    max_hop: int | None = None  # ACT models: hop limit for this answer
    act_stats: object = None  # ACT models: a model.act.ActStats the engine fills
    tenant: str = ""  # whose (the per-tenant share of the queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    # the worker's own bookkeeping
    iterator: object = None
    generated: int = 0
    last_token_at: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()


@dataclass
class Work:
    decodes: list[GenerateJob]
    ingests: list[IngestJob]


class Scheduler:
    """Thread-safe: submitted from the event loop, consumed by the worker thread."""

    def __init__(self, max_queue: int = 64, max_batch: int = 16, retry_after: float = 1.0,
                 max_per_tenant: int | None = None) -> None:
        self.max_queue, self.max_batch, self.retry_after = max_queue, max_batch, retry_after
        self.max_per_tenant = max_per_tenant  # places one tenant may hold (None: no limit)
        self._cv = threading.Condition()
        self._ingests: list[IngestJob] = []
        self._batch: list[IngestJob] = []  # the appends of the round in progress
        self._decodes: list[GenerateJob] = []
        self._reserved: collections.Counter[str] = collections.Counter()  # tenant -> places held by reservations
        self._closed = False

    def submit(self, job: IngestJob | GenerateJob) -> None:
        """Admit a job, or raise Overloaded; an IngestJob marked `reserved` takes its Reservation's place."""
        with self._cv:
            if self._closed or not getattr(job, "reserved", False):
                self._check_room(job.tenant)
            (self._ingests if isinstance(job, IngestJob) else self._decodes).append(job)
            self._cv.notify_all()

    @contextmanager
    def reservation(self, tenant: str = "") -> Iterator[None]:
        """One place in the queue for the whole of a request that submits several jobs in turn (an append: one
        ingest job per chunk of its body, read as it arrives). Refused at once like a job; once admitted, its
        reserved jobs are never refused for room, so an append is not cut off with a 429 halfway through its
        body, after part of it was written into the memory."""
        with self._cv:
            self._check_room(tenant)
            self._reserved[tenant] += 1
        try:
            yield
        finally:
            with self._cv:
                self._reserved[tenant] -= 1

    def check_room(self, tenant: str = "") -> None:
        """Overloaded now if a job would be refused, so that a request fails fast, before it reads its body,
        loads a state or tokenizes: under overload the refusals must stay cheap, or they take the CPU (and the
        GIL) from the engine. `submit` checks again (the room can be gone in between)."""
        with self._cv:
            self._check_room(tenant)

    def _held(self, tenant: str | None = None) -> int:
        """Places held (by `tenant`, or by everyone): reservations, and jobs not in a reservation's place."""
        jobs = [job for job in self._ingests if not job.reserved] + self._decodes
        if tenant is None:
            return sum(self._reserved.values()) + len(jobs)
        return self._reserved[tenant] + sum(job.tenant == tenant for job in jobs)

    def _check_room(self, tenant: str = "") -> None:
        if self._closed:
            raise Overloaded("the engine is shutting down", self.retry_after)
        if tenant and self.max_per_tenant is not None and self._held(tenant) >= self.max_per_tenant:
            raise Overloaded(f"this API key's requests hold {self.max_per_tenant} places of the engine queue, its "
                             "share; retry when one ends", self.retry_after)
        if self._held() >= self.max_queue:
            raise Overloaded(f"the engine queue is full ({self.max_queue} requests); retry later", self.retry_after)

    def next_work(self, timeout: float) -> Work | None:
        """The next round for the worker, or None after `timeout` seconds with nothing to do."""
        with self._cv:
            if not (self._ingests or self._decodes):
                self._cv.wait(timeout)
            if not (self._ingests or self._decodes) or self._closed:
                return None
            # questions not started yet first: their first token (prefill) goes before the next token of others
            batch = self._ingests[: self.max_batch]
            # round robin by unit: this round's appends go behind the others, so with more pending appends than
            # max_batch every one advances every few rounds (a job stays until its whole chunk is written: first
            # come first served made a later append wait for 16 whole chunks, minutes)
            self._ingests = self._ingests[self.max_batch :] + batch
            self._batch = batch  # what runs this round: the gauges count the others as waiting
            return Work(sorted(self._decodes, key=lambda job: job.started), batch)

    def unstarted_decodes(self) -> list[GenerateJob]:
        """Questions admitted since the round began (no token yet), oldest first."""
        with self._cv:
            return [job for job in self._decodes if not job.started]

    def finish(self, job: IngestJob | GenerateJob) -> None:
        with self._cv:
            jobs = self._ingests if isinstance(job, IngestJob) else self._decodes
            if job in jobs:
                jobs.remove(job)

    def close(self) -> list[IngestJob | GenerateJob]:
        """Refuse new jobs and hand back the unfinished ones (the worker fails them)."""
        with self._cv:
            self._closed = True
            left = self._ingests + self._decodes
            self._ingests, self._decodes = [], []
            self._cv.notify_all()
            return left

    @property
    def waiting(self) -> int:
        """Admitted work the worker has not started yet (armt_queue_depth): jobs, and appends admitted whose body
        is still arriving (a reservation with no job queued), which hold a place in the queue all the same."""
        with self._cv:
            between_jobs = sum(self._reserved.values()) - sum(job.reserved for job in self._ingests)
            return (len(self._ingests) - self._ingests_running() + sum(not j.started for j in self._decodes)
                    + max(0, between_jobs))

    @property
    def running(self) -> int:
        """Jobs in progress: this round's appends (at most max_batch; the rest wait their turn) and the questions
        that have started."""
        with self._cv:
            return self._ingests_running() + sum(j.started for j in self._decodes)

    def _ingests_running(self) -> int:
        batch = set(self._batch)  # jobs compare by identity (eq=False)
        return sum(job.started and job in batch for job in self._ingests)
