"""The engine worker: the only thread that touches the model.

`step()` = take a round of work from the scheduler -> run it -> update jobs. A round is one decode step for every
running question (decode first: time to first token matters most; questions that arrived meanwhile get their
first token too, so that a new question never waits for a whole round plus an ingest unit), then one ingest unit:
up to `unit_segments` segments of every admitted append, all sessions batched through one diagonal pipeline
(`ingest_many`). Chunk invariance of the engine makes the unit size invisible in the result.
"""
from __future__ import annotations

import logging
import threading
import time

from .errors import Cancelled, InvalidRequest
from .scheduler import GenerateJob, IngestJob, Scheduler, Work
from .stats import ServiceStats

log = logging.getLogger("armt.worker")


class EngineWorker:
    def __init__(self, model, scheduler: Scheduler, stats: ServiceStats, executor: str = "diagonal",
                 unit_segments: int = 16) -> None:
        self.model, self.scheduler, self.stats = model, scheduler, stats
        self.executor = executor
        self.unit_tokens = max(1, unit_segments) * model.config.segment_size
        self.stop_ids = frozenset(model.default_stop_ids())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="armt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for job in self.scheduler.close():
            self._fail(job, Cancelled("the server is shutting down"))
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            work = self.scheduler.next_work(timeout=0.2)
            if work is None:
                continue
            try:
                self.step(work)
            except Exception:  # a bug in a round must not kill the only engine thread
                log.exception("engine round failed")

    def step(self, work: Work) -> None:
        for job in work.decodes:
            self._decode_step(job)
        for job in self.scheduler.unstarted_decodes():  # arrived during the decodes: first token before the unit
            self._decode_step(job)
        if work.ingests:
            self._ingest_unit(work.ingests)

    # ------------------------------------------------------------------ questions
    def _decode_step(self, job: GenerateJob) -> None:
        if job.cancelled:
            return self._end(job, None, Cancelled("the client went away"))
        try:
            if job.iterator is None:
                job.started = True
                job.iterator = self.model.generate(
                    job.state, job.prompt_ids, max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                    top_p=job.top_p, seed=job.seed, max_hop=job.max_hop, act_stats=job.act_stats,
                    own_segment=True)  # a question is never cut across two segments
            token = next(job.iterator)
        except StopIteration:
            return self._end(job, "length", None)
        except ValueError as e:  # the engine's eager argument checks (e.g. a GPT-2 position limit)
            return self._end(job, None, InvalidRequest(str(e)))
        except Exception as e:
            log.exception("decode failed")
            return self._end(job, None, e)
        self._record_token(job)
        try:
            keep_going = job.on_token(token)
        except Exception as e:  # a bug in the answer's text handling: that answer fails, not the round
            log.exception("answer callback failed")
            return self._end(job, None, e)
        if token in self.stop_ids or not keep_going:
            self._end(job, "stop", None)
        elif job.generated >= job.max_new_tokens:
            self._end(job, "length", None)

    def _record_token(self, job: GenerateJob) -> None:
        now = time.perf_counter()
        engine = self.stats.engine
        with self.stats.lock:
            if job.generated == 0:
                engine.time_to_first_token.observe(now - job.submitted)
            else:
                engine.inter_token_latency.observe(now - job.last_token_at)
            engine.generated_tokens += 1
        job.generated += 1
        job.last_token_at = now

    def _end(self, job: GenerateJob, reason: str | None, error: BaseException | None) -> None:
        self.scheduler.finish(job)
        if job.act_stats is not None and job.act_stats.tokens:
            with self.stats.lock:
                self.stats.engine.act_hops.observe(job.act_stats.mean_hops)
        if isinstance(error, Cancelled):  # nobody sees an error body for these: count them here
            self.stats.fail(error.code)
        if job.iterator is not None:
            try:
                job.iterator.close()
            except Exception:  # on_done must still run, or the request would wait forever
                log.exception("closing an answer's generator failed")
        try:
            job.on_done(reason, error)
        except Exception:
            log.exception("on_done callback failed")

    # ------------------------------------------------------------------ appends
    def _ingest_unit(self, jobs: list[IngestJob]) -> None:
        live = []
        for job in jobs:
            if job.cancelled:
                self.scheduler.finish(job)
            else:
                job.started = True
                live.append(job)
        if not live:
            return
        pieces = [job.ids[job.cursor : job.cursor + self.unit_tokens] for job in live]
        start = time.perf_counter()
        try:
            states = self._ingest([job.state for job in live], pieces)
        except Exception as e:
            log.exception("ingest failed")
            for job in live:
                self._fail(job, e)
            return
        self._record_ingest(live, states, pieces, time.perf_counter() - start)
        for job, state, piece in zip(live, states, pieces):
            job.state, job.cursor = state, job.cursor + len(piece)
            if job.cursor >= len(job.ids):
                self.scheduler.finish(job)
                _resolve(job, state)

    def _ingest(self, states: list, pieces: list[list[int]]) -> list:
        if self.executor == "diagonal":
            return self.model.ingest_many(states, pieces)
        return [self.model.ingest(s, p, executor=self.executor) for s, p in zip(states, pieces)]

    def _record_ingest(self, jobs, states, pieces, seconds: float) -> None:
        segments = sum(new.segments - job.state.segments for job, new in zip(jobs, states))
        engine = self.stats.engine
        with self.stats.lock:
            engine.ingest_tokens += sum(len(p) for p in pieces)
            engine.ingest_segments += segments
            if segments:
                engine.ingest_seconds_per_segment.observe(seconds / segments)

    def _fail(self, job: IngestJob | GenerateJob, error: BaseException) -> None:
        self.scheduler.finish(job)
        if isinstance(job, GenerateJob):
            self._end(job, None, error)
        elif not job.future.done():
            try:
                job.future.set_exception(error)
            except Exception:  # cancelled meanwhile
                pass


def _resolve(job: IngestJob, state) -> None:
    try:
        job.future.set_result(state)
    except Exception:  # the waiting request was cancelled meanwhile: nobody wants the result
        pass
