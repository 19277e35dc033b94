"""Core without HTTP: the scheduler (no model), the disk store (atomic files, index rebuild, foreign states)."""
from __future__ import annotations

import time

import pytest
import torch

from model import MemoryState
from service.core.errors import Overloaded, StateConflict, StoreError
from service.core.scheduler import GenerateJob, IngestJob, Scheduler
from service.core.store import DiskStore
from service.core.types import LastAppend, SessionMeta


def gen_job() -> GenerateJob:
    return GenerateJob(None, [1], 4, 0.0, 1.0, None, lambda t: True, lambda r, e: None)


def test_scheduler_refuses_at_once_when_full():
    s = Scheduler(max_queue=2, retry_after=3)
    s.submit(IngestJob(None, [1]))
    s.submit(gen_job())
    start = time.perf_counter()
    with pytest.raises(Overloaded) as info:
        s.submit(IngestJob(None, [2]))
    assert time.perf_counter() - start < 0.1 and info.value.retry_after == 3


def test_scheduler_round_gives_every_decode_a_step_and_batches_ingests():
    s = Scheduler(max_queue=10, max_batch=2)
    ingests = [IngestJob(None, [i]) for i in range(3)]
    decodes = [gen_job(), gen_job()]
    for job in ingests + decodes:
        s.submit(job)
    work = s.next_work(timeout=0)
    assert work.decodes == decodes and work.ingests == ingests[:2]  # oldest first, at most max_batch
    assert s.waiting == 5 and s.running == 0
    # round robin by unit: the appends left out come first in the next round (first come first served kept a
    # later append out until max_batch whole chunks were written)
    for job in ingests[:2]:
        job.started = True  # as the worker marks them
    assert s.next_work(timeout=0).ingests == [ingests[2], ingests[0]]
    ingests[2].started = True
    assert s.running == 2 and s.waiting == 3  # this round's appends run; the one sitting out waits (+2 decodes)
    assert s.next_work(timeout=0).ingests == [ingests[1], ingests[2]]
    s.finish(ingests[0])
    assert s.next_work(timeout=0).ingests == [ingests[1], ingests[2]]
    assert s.next_work(timeout=0.01) is not None
    assert Scheduler().next_work(timeout=0.01) is None


def test_scheduler_check_room_refuses_without_submitting_and_new_questions_go_first():
    s = Scheduler(max_queue=2)
    old, new = gen_job(), gen_job()
    s.submit(old)
    s.check_room()  # room for one more: no error, nothing submitted
    old.started = True
    s.submit(new)
    with pytest.raises(Overloaded):
        s.check_room()
    assert s.next_work(timeout=0).decodes == [new, old]  # the first token of a question before others' next


def test_a_reservation_holds_one_place_for_all_of_its_jobs():
    s = Scheduler(max_queue=2)
    with s.reservation():
        assert s.waiting == 1  # an append reading its body: admitted, not started (armt_queue_depth)
        s.submit(gen_job())  # the second place
        with pytest.raises(Overloaded):
            s.submit(IngestJob(None, [1]))
        for i in range(3):  # the reservation's jobs, one after another, each in the reserved place
            job = IngestJob(None, [i], reserved=True)
            s.submit(job)
            assert s.waiting == 2  # the job in the reservation's place, not both
            with pytest.raises(Overloaded):
                s.check_room()
            s.finish(job)
        with pytest.raises(Overloaded):
            s.reservation().__enter__()  # refused at once when full, like a job
    s.check_room()  # its place is free again
    s.close()
    with pytest.raises(Overloaded):  # shutting down refuses even reserved jobs
        s.submit(IngestJob(None, [9], reserved=True))


def test_one_tenant_holds_at_most_its_share_of_the_queue():
    """Slow uploads or long questions of one API key must not lock the others out."""
    s = Scheduler(max_queue=4, max_per_tenant=2)
    with s.reservation("a"):
        s.submit(GenerateJob(None, [1], 4, 0.0, 1.0, None, lambda t: True, lambda r, e: None, tenant="a"))
        with pytest.raises(Overloaded, match="share"):
            s.reservation("a").__enter__()
        with pytest.raises(Overloaded, match="share"):
            s.check_room("a")
        s.check_room("b")
        s.submit(IngestJob(None, [1], tenant="b"))
        s.submit(IngestJob(None, [2]))  # no tenant (tools, tests): only the whole queue's limit
        with pytest.raises(Overloaded, match="queue is full"):
            s.check_room("c")
    s.check_room("a")


def meta(session_id: str = "a" * 32, **kw) -> SessionMeta:
    return SessionMeta(id=session_id, tenant="t", model="fp", created_at=1.0, updated_at=2.0, **{"version": 1, **kw})


def state(fp: str = "fp") -> MemoryState:
    return MemoryState(torch.randn(2, 6, 4), torch.randn(2, 6), fp, [5, 6], 3, 48)


def test_disk_store_round_trip_and_index_rebuild(tmp_path):
    store = DiskStore(tmp_path)
    m = meta(offset=10, held=" wor", partial=b"\xe2\x82", last_append=LastAppend(0, 10, "ab" * 32, 50, 3))
    s = state()
    store.save(m, s)
    (tmp_path / "sessions" / f".{'b' * 32}.123.tmp").write_bytes(b"torn")  # a crash mid-write
    (tmp_path / "sessions" / "not-a-session.safetensors").write_bytes(b"x")
    store2 = DiskStore(tmp_path)  # a restart
    assert list(store2.scan()) == [m]
    assert not list((tmp_path / "sessions").glob(".*.tmp"))
    m2, s2 = store2.load(m.id, "fp")
    assert m2 == m and s2.digest() == s.digest() and store2.total_bytes() > 0
    store2.delete(m.id)
    assert list(store2.scan()) == []


def test_a_data_directory_has_one_owner(tmp_path):
    """A second server on the same ARMT_DATA_DIR would serve its own stale index: it fails at start instead."""
    first = DiskStore(tmp_path, exclusive=True)
    with pytest.raises(StoreError, match="another process .* data directory"):
        DiskStore(tmp_path, exclusive=True)
    DiskStore(tmp_path).close()  # the tests' and tools' plain readers take no lock
    first.close()
    DiskStore(tmp_path, exclusive=True).close()


def test_disk_store_refuses_another_models_state(tmp_path):
    store = DiskStore(tmp_path)
    store.save(meta(), state("other-model"))
    with pytest.raises(StateConflict, match="other-model"):
        store.load("a" * 32, "fp")


def test_disk_store_refuses_a_damaged_state(tmp_path):
    """A state whose bytes no longer match the digest recorded at commit (bit rot, a torn copy) is a StoreError
    (503), never served: the crash harness reads states through questions and counts such answers as corrupt."""
    store, s = DiskStore(tmp_path), state()
    store.save(meta(state_digest=s.digest()), s)
    path = tmp_path / "sessions" / f"{'a' * 32}.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of the last tensor (`pending`), the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its digest"):
        store.load("a" * 32, "fp")


def test_disk_store_never_builds_paths_from_bad_ids(tmp_path):
    with pytest.raises(StoreError, match="bad session id"):
        DiskStore(tmp_path).load("../../etc/passwd", "fp")


def imported_modules(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_layering_core_has_no_http_and_model_has_no_service():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    http = {"fastapi", "starlette", "sse_starlette", "httpx", "uvicorn", "prometheus_client", "pydantic"}
    for path in (root / "service" / "core").glob("*.py"):
        assert not imported_modules(path) & http, path
    for path in (root / "model").glob("*.py"):
        assert not imported_modules(path) & (http | {"service"}), path


def test_read_ahead_stops_even_when_a_read_swallows_its_cancellation():
    """Python 3.11's wait_for (BodyLimits' timeout around receive) returns a message that arrives as it is
    cancelled and drops the cancellation: close() then waited forever (the pump blocked on the full buffer),
    holding the session's lock. The reader gives up here as the next bytes arrive."""
    import asyncio

    from service.core.errors import PayloadTooLarge
    from service.core.readahead import ReadAhead

    size, pending = 1024, []

    async def body():
        yield b"a" * size
        while True:
            inner = asyncio.get_running_loop().create_future()  # the server's receive(), waiting for bytes
            pending.append(inner)
            yield await asyncio.wait_for(inner, 100)

    async def append():
        reader = ReadAhead(body(), size)
        try:
            async for _ in reader:
                await asyncio.sleep(0.01)  # the pump now waits in wait_for
                pending[-1].set_result(b"b" * size)  # bytes arrive in the same iteration as the reader gives up
                raise PayloadTooLarge("over the limit")
        finally:
            await reader.close()

    async def main():
        with pytest.raises(PayloadTooLarge):
            await asyncio.wait_for(append(), 5)

    asyncio.run(main())


def test_the_store_latency_bench_writes_states_a_store_can_read(tmp_path):
    """bench/store_latency.py made z [1, 1] for an A of [1, rows, 256]: since states are validated on load, every
    run of it failed at its first load. Disk and Redis are timed in turn within each round."""
    from bench.store_latency import make_state, time_stores

    state = make_state(64 * 1024)
    assert MemoryState.from_bytes(state.to_bytes(), "bench").z.shape == state.A.shape[:2]
    times = time_stores({"a": DiskStore(tmp_path / "a"), "b": DiskStore(tmp_path / "b")}, state, 2)
    assert set(times) == {"a", "b"} and all(t["save"]["min"] > 0 and t["load"]["min"] > 0 for t in times.values())


def _wait_for_tmp(root, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not list((root / "sessions").glob(".*.tmp")):
        assert time.monotonic() < deadline, "the save never reached its temporary file"
        time.sleep(0.01)


def test_a_delete_waits_for_a_save_in_flight_and_the_session_stays_deleted(tmp_path):
    """A save past its version check renamed its file back in after a delete: the acknowledged DELETE was undone
    (and survived a restart)."""
    import threading

    store = DiskStore(tmp_path, fault_delay_save_s=0.4)
    first = meta(write_id="w1")
    store.save(first, state())
    writer = threading.Thread(target=store.save, args=(first.evolve(version=2, write_id="w2"), state(), "w1"))
    writer.start()
    _wait_for_tmp(tmp_path)  # between its temporary file and its rename
    store.delete(first.id)
    writer.join()
    assert store.get(first.id) is None and not list((tmp_path / "sessions").glob("*.safetensors"))
    assert list(DiskStore(tmp_path).scan()) == []


def test_session_metadata_that_is_not_an_object_is_one_unreadable_session(tmp_path):
    """JSON `null` in a session file's header failed the store's start (AttributeError out of the scan) and its
    load was a 500: it is skipped at start, and reading it is a StoreError (503) like any damaged file."""
    import json

    from safetensors.torch import save as save_tensors

    from service.core.store import SESSION_KEY

    good, s = meta("b" * 32), state()
    DiskStore(tmp_path).save(good, s)
    (tmp_path / "sessions" / f"{'a' * 32}.safetensors").write_bytes(s.to_bytes({SESSION_KEY: "null"}))
    header = {"armt": "[]", SESSION_KEY: json.dumps(meta("c" * 32).to_json())}
    (tmp_path / "sessions" / f"{'c' * 32}.safetensors").write_bytes(save_tensors({"A": s.A}, metadata=header))
    store = DiskStore(tmp_path)  # starts
    assert [m.id for m in store.scan()] == ["b" * 32, "c" * 32]
    with pytest.raises(StoreError, match="not an object"):
        store.load("a" * 32, "fp")
    with pytest.raises(StoreError, match="its metadata is a JSON list"):
        store.load("c" * 32, "fp")


def test_a_cancelled_commit_waits_for_its_write_and_keeps_the_cache_in_step(tmp_path):
    """A request cancelled during its state write (a server shutting down) released the session lock at once while
    the write went on in its thread, and left the cache a version behind the store."""
    import asyncio
    from types import SimpleNamespace

    from service.core.sessions import SessionService
    from service.core.stats import ServiceStats

    store = DiskStore(tmp_path, fault_delay_save_s=0.4)
    first, s = meta(write_id="w1"), state()
    store.save(first, s)
    service = SessionService(SimpleNamespace(tokenizer=None), store, None, ServiceStats(),
                             SimpleNamespace(state_cache_size=4))

    async def main():
        commit = asyncio.ensure_future(service._commit(first, s))
        await asyncio.to_thread(_wait_for_tmp, tmp_path)
        commit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await commit
        return store.get(first.id).version  # at the moment the cancelled request ended

    assert asyncio.run(main()) == 2
    assert service._cache[first.id][0] == store.get(first.id)


class _SlowFailingStore(DiskStore):
    """Its saves take 0.3 s, then fail as a lost race."""

    def save(self, meta, state, replaces=""):
        time.sleep(0.3)
        from service.core.errors import VersionConflict

        raise VersionConflict("lost")


def _service(store):
    from types import SimpleNamespace

    from service.core.sessions import SessionService
    from service.core.stats import ServiceStats

    return SessionService(SimpleNamespace(tokenizer=None), store, None, ServiceStats(),
                          SimpleNamespace(state_cache_size=4))


def test_a_cancelled_commit_whose_write_fails_still_ends_cancelled(tmp_path):
    """The write's error replaced the cancellation: the task went on (answering a 409 to a client that was gone)."""
    import asyncio

    from service.core.errors import VersionConflict

    service = _service(_SlowFailingStore(tmp_path))

    async def main():
        commit = asyncio.ensure_future(service._commit(meta(write_id="w1"), state()))
        await asyncio.sleep(0.1)
        commit.cancel()
        with pytest.raises(asyncio.CancelledError) as error:
            await commit
        return error.value.__cause__

    assert isinstance(asyncio.run(main()), VersionConflict)


def test_a_commit_inside_a_cancelled_anyio_scope_waits_for_its_write_without_spinning(tmp_path):
    """anyio cancels again at every await while its scope is cancelled: the wait is shielded from it (a loop that
    caught each cancellation would spin the event loop until the write's thread ended)."""
    import anyio

    store = DiskStore(tmp_path, fault_delay_save_s=0.3)
    first, s = meta(write_id="w1"), state()
    store.save(first, s)
    service = _service(store)

    async def main():
        start = time.process_time()
        with anyio.move_on_after(0.05):
            await service._commit(first, s)
        return time.process_time() - start

    cpu = anyio.run(main)
    assert store.get(first.id).version == 2 and service._cache[first.id][0] == store.get(first.id)
    assert cpu < 0.2, f"{cpu:.2f} s of CPU while waiting 0.3 s for a thread"


def test_session_metadata_of_the_wrong_types_is_one_unreadable_session(tmp_path):
    """"created_at": "2026-12-01" passed the start-up scan, then failed every listing of the tenant."""
    import json

    from service.core.store import SESSION_KEY

    good, s = meta("b" * 32), state()
    store = DiskStore(tmp_path)
    store.save(good, s)
    bad = {**meta().to_json(), "created_at": "2026-12-01"}
    (tmp_path / "sessions" / f"{'a' * 32}.safetensors").write_bytes(s.to_bytes({SESSION_KEY: json.dumps(bad)}))
    store = DiskStore(tmp_path)
    assert [m.id for m in store.page("t", None, 10)] == ["b" * 32]
    with pytest.raises(StoreError, match="created_at is '2026-12-01'"):
        store.load("a" * 32, "fp")


def test_no_write_lock_lingers_for_a_session_that_is_gone(tmp_path):
    """A save that waited on a deleted session's lock put a fresh one back into the table, for good."""
    import threading

    from service.core.errors import VersionConflict

    store = DiskStore(tmp_path, fault_delay_save_s=0.3)
    first = meta(write_id="w1")
    store.save(first, state())
    writer = threading.Thread(target=store.save, args=(first.evolve(version=2, write_id="w2"), state(), "w1"))
    writer.start()
    _wait_for_tmp(tmp_path)
    stale = []

    def stale_save():
        try:
            store.save(first.evolve(version=2, write_id="w3"), state(), "w1")
        except VersionConflict as e:
            stale.append(e)

    late = threading.Thread(target=stale_save)
    late.start()
    store.delete(first.id)
    writer.join()
    late.join()
    assert len(stale) == 1 and store._writing == {} and store.get(first.id) is None
