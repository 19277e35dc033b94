"""The engine worker on a tiny model, stepped by hand: ingest units batched over sessions, decode between units,
cancellation, and chunk invariance of the unit size."""
from __future__ import annotations

import random

import pytest
import torch

from model import ArmtModel
from service.core.errors import Cancelled
from service.core.scheduler import GenerateJob, IngestJob, Scheduler
from service.core.stats import ServiceStats
from service.core.worker import EngineWorker
from tests.service_helpers import SEGMENT


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ArmtModel.from_pretrained(tiny_model_dir)


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


def drain(worker: EngineWorker, scheduler: Scheduler, limit: int = 1000) -> int:
    rounds = 0
    while (work := scheduler.next_work(timeout=0)) is not None and rounds < limit:
        worker.step(work)
        rounds += 1
    return rounds


def gen_job(model, tokens: list, cap: int = 5) -> GenerateJob:
    return GenerateJob(model.new_state(), [5, 6, 7], cap, 0.0, 1.0, None,
                       lambda t: tokens.append(t) is None, lambda reason, error: tokens.append((reason, error)))


@pytest.mark.parametrize("executor", ["sequential", "diagonal"])
def test_sessions_share_units_and_match_ingest_alone(model, executor, monkeypatch):
    scheduler, stats = Scheduler(max_batch=4), ServiceStats()
    worker = EngineWorker(model, scheduler, stats, executor=executor, unit_segments=2)
    calls = []
    real = model.ingest_many
    monkeypatch.setattr(model, "ingest_many", lambda states, pieces: calls.append(len(states)) or real(states, pieces))
    docs = [ids(5 * SEGMENT + 3, 1), ids(2 * SEGMENT, 2), ids(7, 3)]
    jobs = [IngestJob(model.new_state(), d) for d in docs]
    for job in jobs:
        scheduler.submit(job)
    assert drain(worker, scheduler) == 3  # ceil(83 / 32) units for the longest document
    for job, doc in zip(jobs, docs):
        alone = model.ingest(model.new_state(), doc, executor="sequential")
        got = job.future.result(timeout=0)
        assert got.tokens == alone.tokens and got.pending == alone.pending and got.segments == alone.segments
        if executor == "sequential":
            assert got.digest() == alone.digest()  # bit-exact whatever the unit size
        else:
            torch.testing.assert_close(got.A, alone.A, rtol=1e-5, atol=1e-6)
    assert calls == ([3, 1, 1] if executor == "diagonal" else [])  # diagonal: one pipeline for all sessions
    assert stats.engine.ingest_tokens == sum(map(len, docs))
    assert stats.engine.ingest_segments == 7


def test_a_question_gets_its_first_token_after_at_most_one_unit(model):
    scheduler = Scheduler()
    worker = EngineWorker(model, scheduler, ServiceStats(), unit_segments=1)
    book = IngestJob(model.new_state(), ids(50 * SEGMENT, 4))
    tokens: list = []
    scheduler.submit(book)
    worker.step(scheduler.next_work(timeout=0))  # the book's first unit
    scheduler.submit(gen_job(model, tokens, cap=3))
    worker.step(scheduler.next_work(timeout=0))
    assert len(tokens) == 1 and book.cursor == 2 * SEGMENT  # one decode step, then one more unit
    drain(worker, scheduler)
    assert tokens[-1] == ("length", None) and len(tokens) == 4 and book.future.done()


def test_cancelled_jobs_stop(model):
    scheduler, stats = Scheduler(), ServiceStats()
    worker = EngineWorker(model, scheduler, stats, unit_segments=1)
    tokens: list = []
    job = gen_job(model, tokens, cap=100)
    scheduler.submit(job)
    worker.step(scheduler.next_work(timeout=0))
    worker.step(scheduler.next_work(timeout=0))
    job.cancel.set()
    drain(worker, scheduler)
    assert stats.engine.generated_tokens == 2 and isinstance(tokens[-1][1], Cancelled)
    upload = IngestJob(model.new_state(), ids(10 * SEGMENT, 5))
    scheduler.submit(upload)
    upload.future.cancel()  # the client went away: the job is dropped before any unit
    drain(worker, scheduler)
    assert stats.engine.ingest_tokens == 0 and scheduler.waiting == 0


def test_a_question_arriving_during_the_decodes_gets_its_first_token_before_the_ingest_unit(model):
    """A question submitted while a round's decodes run is answered in that round, ahead of its ingest unit."""
    scheduler, stats = Scheduler(), ServiceStats()
    worker = EngineWorker(model, scheduler, stats, executor="sequential", unit_segments=1)
    order: list[str] = []
    late = GenerateJob(model.new_state(), [5, 6, 7], 3, 0.0, 1.0, None,
                       lambda t: order.append("late token") is None, lambda reason, error: None)

    def early_token(token: int) -> bool:
        if late not in scheduler._decodes:  # the first decode step of the round submits the late question
            scheduler.submit(late)
        order.append("early token")
        return True

    early = GenerateJob(model.new_state(), [5, 6, 7], 3, 0.0, 1.0, None, early_token, lambda reason, error: None)
    ingest = IngestJob(model.new_state(), ids(3 * SEGMENT, 4))
    scheduler.submit(early)
    scheduler.submit(ingest)
    work = scheduler.next_work(timeout=0)
    real_unit = worker._ingest_unit
    worker._ingest_unit = lambda jobs: order.append("ingest unit") or real_unit(jobs)
    worker.step(work)
    assert order == ["early token", "late token", "ingest unit"]
    assert late.generated == 1


def test_a_question_starts_a_segment_of_its_own(model):
    """The worker asks generate for own_segment: a session's pending tail + question longer than a segment would
    otherwise cut the question in two (the default model lost such questions)."""
    state = model.ingest(model.new_state(), ids(3 * SEGMENT - 2, seed=4))  # pending: SEGMENT - 2 tokens
    question = ids(5, seed=5)
    want = list(model.generate(state, question, max_new_tokens=5, own_segment=True))
    assert want != list(model.generate(state, question, max_new_tokens=5))  # the two layouts differ here
    tokens, scheduler = [], Scheduler()
    worker = EngineWorker(model, scheduler, ServiceStats())
    job = GenerateJob(state, question, 5, 0.0, 1.0, None, lambda t: tokens.append(t) is None,
                      lambda reason, error: tokens.append((reason, error)))
    scheduler.submit(job)
    drain(worker, scheduler)
    assert tokens[:-1] == want
