"""The Redis session store against a real redis-server: round trip, lookups, listing order, version conflicts
(also under concurrent writers), delete, TTL, and the disk store's same contract for versions."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from model import MemoryState
from service.core.errors import SessionNotFound, StateConflict, StoreError, VersionConflict
from service.core.redis_store import RedisStore
from service.core.store import DiskStore
from service.core.types import LastAppend, SessionMeta
from tests.service_helpers import free_port


def meta(session_id: str = "a" * 32, tenant: str = "t", created_at: float = 1.0, **kw) -> SessionMeta:
    return SessionMeta(id=session_id, tenant=tenant, model="fp", created_at=created_at, updated_at=2.0,
                       **{"version": 1, **kw})


def state(fp: str = "fp", seed: int = 0, d: int = 4) -> MemoryState:
    g = torch.Generator().manual_seed(seed)
    return MemoryState(torch.randn(2, 6, d, generator=g), torch.randn(2, 6, generator=g), fp, [5, 6], 3, 48)


@pytest.fixture()
def store(redis_db):
    s = RedisStore.from_url(redis_db)
    yield s
    s.close()


def test_round_trip_lookups_and_gauges(store):
    m = meta(offset=10, held=" wor", partial=b"\xe2\x82", last_append=LastAppend(0, 10, "ab" * 32, 50, 3))
    s = state()
    assert store.get(m.id) is None and store.count() == 0 and store.total_bytes() == 0
    store.save(m, s)
    assert store.get(m.id) == m
    m2, s2 = store.load(m.id, "fp")
    assert m2 == m and s2.digest() == s.digest()
    assert store.count() == 1 and store.total_bytes() == len(s.to_bytes())
    bigger = state(d=8)
    store.save(m.evolve(version=2, offset=20), bigger)
    assert store.get(m.id).offset == 20 and store.load(m.id, "fp")[1].digest() == bigger.digest()
    assert store.count() == 1 and store.total_bytes() == len(bigger.to_bytes())
    assert store.check() is None


def test_a_write_over_the_wrong_version_is_refused_and_changes_nothing(store):
    first = meta(offset=5)
    store.save(first, state(seed=1))
    with pytest.raises(VersionConflict, match="at version 1"):
        store.save(meta(offset=7), state(seed=2))  # a second "create" of the same id
    store.save(first.evolve(version=2, offset=9), state(seed=3))
    with pytest.raises(VersionConflict, match="at version 2"):
        store.save(first.evolve(version=2, offset=11), state(seed=4))  # read version 1 too, wrote second
    with pytest.raises(VersionConflict):
        store.save(first.evolve(version=4), state(seed=5))  # skipping a version is no better
    got, s = store.load(first.id, "fp")
    assert got.offset == 9 and got.version == 2 and s.digest() == state(seed=3).digest()


def test_after_a_rollback_a_write_over_a_lost_write_is_refused(store):
    """Redis restarted from an older snapshot: one version number then names two different writes, and only the
    write id tells the one the store holds from the one that was lost."""
    v1 = meta(write_id="w1")
    store.save(v1, state(seed=1))
    key = store._key(v1.id)
    snapshot = store.r.dump(key)
    a2 = v1.evolve(version=2, offset=5, write_id="a2")
    store.save(a2, state(seed=2), replaces="w1")  # replica A's write, lost in the rollback below
    store.r.restore(key, 0, snapshot, replace=True)
    b2 = v1.evolve(version=2, offset=7, write_id="b2")
    store.save(b2, state(seed=3), replaces="w1")  # replica B writes the same version over what is there now
    with pytest.raises(VersionConflict):  # A goes on from its lost write: refused, B's write stays
        store.save(a2.evolve(version=3, offset=9, write_id="a3"), state(seed=4), replaces="a2")
    assert store.get(v1.id) == b2 and store.load(v1.id, "fp")[1].digest() == state(seed=3).digest()


def test_a_state_that_does_not_match_its_digest_is_never_served(store):
    s = state(seed=1)
    m = meta(state_digest=s.digest())
    store.save(m, s)
    store.r.hset(store._key(m.id), "state", state(seed=2).to_bytes())
    with pytest.raises(StoreError, match="digest"):
        store.load(m.id, "fp")


def test_sessions_are_counted_per_tenant(store):
    for i, tenant in enumerate(["t", "t", "t", "u"]):
        store.save(meta(f"{i:032x}", tenant=tenant), state())
    assert (store.count_for("t"), store.count_for("u"), store.count_for("v")) == (3, 1, 0)
    store.delete(f"{0:032x}")
    store.r.delete(store._key(f"{1:032x}"))  # expired (TTL): gone from lookups, still in the tenant's set
    assert store.count_for("t") == 1


def test_concurrent_writers_exactly_one_wins(redis_db):
    stores = [RedisStore.from_url(redis_db) for _ in range(8)]  # a connection each, like replicas
    stores[0].save(meta(), state())
    barrier, results = threading.Barrier(len(stores)), []

    def write(i: int) -> None:
        barrier.wait()
        try:
            stores[i].save(meta(version=2, offset=100 + i), state(seed=i))
            results.append(i)
        except VersionConflict:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    winner = results[0]
    got, s = stores[1].load("a" * 32, "fp")
    assert got.offset == 100 + winner and s.digest() == state(seed=winner).digest()


def test_pages_are_per_tenant_in_creation_order(store):
    ids = [f"{i:032x}" for i in range(7)]
    for i, sid in enumerate(ids):  # two share a creation time: the id breaks the tie, as on disk
        store.save(meta(sid, created_at=100.0 + (i if i != 4 else 3)), state())
    store.save(meta("f" * 32, tenant="other"), state())
    expected = sorted(ids, key=lambda sid: store.get(sid).sort_key)
    assert [m.id for m in store.page("t", None, 100)] == expected
    seen, after = [], None
    while page := store.page("t", after, 2):
        seen += [m.id for m in page]
        after = page[-1].sort_key
    assert seen == expected
    assert [m.id for m in store.page("other", None, 10)] == ["f" * 32]
    assert store.count() == 8


def test_delete_removes_everything_and_a_late_write_cannot_resurrect(store):
    m = meta()
    store.save(m, state())
    store.save(meta("b" * 32), state())
    store.delete(m.id)
    assert store.get(m.id) is None and [x.id for x in store.page("t", None, 10)] == ["b" * 32]
    assert store.count() == 1 and store.total_bytes() == len(state().to_bytes())
    with pytest.raises(SessionNotFound):
        store.load(m.id, "fp")
    with pytest.raises(VersionConflict):  # an append that read version 1 before the delete
        store.save(m.evolve(version=2), state())
    store.delete(m.id)  # deleting twice is harmless


def test_ttl_expires_sessions_and_their_index_entries(redis_db):
    store = RedisStore.from_url(redis_db, ttl_s=1)
    store.save(meta(), state())
    assert 0 < store.r.pttl(store._key("a" * 32)) <= 1000
    keep = RedisStore.from_url(redis_db)  # no TTL: this one stays
    keep.save(meta("b" * 32), state())
    time.sleep(1.3)
    assert store.get("a" * 32) is None
    assert [m.id for m in store.page("t", None, 10)] == ["b" * 32]
    assert store.count() == 1 and store.total_bytes() == len(state().to_bytes())


def test_foreign_states_missing_sessions_and_an_unreachable_server(store):
    store.save(meta(), state("other-model"))
    with pytest.raises(StateConflict, match="other-model"):
        store.load("a" * 32, "fp")
    with pytest.raises(SessionNotFound):
        store.load("c" * 32, "fp")
    with pytest.raises(StoreError, match="bad session id"):
        store.get("../x")
    dead = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert "unreachable" in dead.check()
    with pytest.raises(StoreError, match=r"session store is unavailable \(cannot read"):
        dead.get("a" * 32)


def test_disk_store_keeps_the_same_version_contract(tmp_path):
    disk = DiskStore(tmp_path)
    disk.save(meta(), state())
    with pytest.raises(VersionConflict):
        disk.save(meta(), state())
    disk.save(meta(version=2, offset=3), state())
    assert DiskStore(tmp_path).get("a" * 32).version == 2  # the version survives a restart
    disk.delete("a" * 32)
    with pytest.raises(VersionConflict):
        disk.save(meta(version=3), state())
    with pytest.raises(SessionNotFound):
        disk.load("a" * 32, "fp")


def test_store_settings_are_checked():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="ARMT_STORE must be 'disk' or a redis://"):
        Settings(store="mysql://db/1")
    with pytest.raises(ValidationError, match=r"got 'Redis://\*\*\*@h:6379/0'") as info:  # a typo: no password
        Settings(store="Redis://:hunter2@h:6379/0")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValidationError, match="ARMT_STORE_TTL_S applies to a Redis store"):
        Settings(store_ttl_s=60)
    assert Settings(store="redis://r:6379/2", store_ttl_s=60).to_core().store_ttl_s == 60


def test_an_unreachable_redis_is_a_503_and_not_ready(tiny_model_dir, free_redis_url):
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(model=tiny_model_dir, store=free_redis_url))) as c:
        for _ in range(600):
            if c.get("/health").status_code == 200:  # the model loads; the store is not needed for that
                break
            time.sleep(0.05)
        ready = c.get("/ready")
        assert ready.status_code == 503 and "redis store unreachable" in ready.json()["problems"][0]
        r = c.post("/v1/sessions")
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_error"
        r = c.get(f"/v1/sessions/{'a' * 32}")
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "cannot read" in message and "127.0.0.1" not in message  # no addresses
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "armt_sessions NaN" in metrics.text


@pytest.fixture()
def free_redis_url() -> str:
    """A Redis URL where nothing listens (a port just freed)."""
    return f"redis://127.0.0.1:{free_port()}/0"


def test_a_hung_redis_leaves_ready_and_metrics_answering_in_seconds(tiny_model_dir):
    """A Redis that accepts connections and never answers (paused, a network black hole): /ready and /metrics
    answer within the probe timeout, far below Prometheus' 10 s scrape timeout."""
    import socket

    from fastapi.testclient import TestClient

    from service.core.redis_store import PROBE_TIMEOUT_S
    from service.http.app import create_app
    from service.settings import Settings

    with socket.create_server(("127.0.0.1", 0), backlog=64) as hung:  # never accepts: connects, then silence
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        with TestClient(create_app(Settings(model=tiny_model_dir, store=url))) as c:
            for _ in range(600):
                if c.get("/health").status_code == 200:
                    break
                time.sleep(0.05)
            for path, status in (("/ready", 503), ("/metrics", 200)):
                start = time.perf_counter()
                assert c.get(path).status_code == status
                assert time.perf_counter() - start < 3 * PROBE_TIMEOUT_S + 1, path


def test_store_urls_are_redacted_for_logs():
    from service.core.config import redact_url

    assert redact_url("redis://:hunter2@10.0.0.5:6379/0") == "redis://***@10.0.0.5:6379/0"
    assert redact_url("rediss://user:pw@h:1/2?ssl_cert_reqs=none") == "rediss://***@h:1/2?ssl_cert_reqs=none"
    assert redact_url("redis://:Sup3r/S3cret?#pw@h:6379/0") == "redis://***@h:6379/0"  # / ? # in a password
    assert redact_url("rediss//:Sup3rS3cret@h:6379/0") == "***@h:6379/0"  # a mistyped scheme
    assert redact_url("unix:///run/redis.sock?password=hunter2&db=3") == "unix:///run/redis.sock?password=***&db=3"


def test_a_store_url_that_cannot_be_opened_keeps_its_password_out_of_health(tiny_model_dir, tmp_path, caplog):
    """A password with a '/' breaks URL parsing ("Port could not be cast ... 'Sup3r'"): that text must not reach the
    open /health, 503 bodies or the log."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    url = "redis://:Sup3r/S3cretRedisPW@127.0.0.1:16391/0"
    with TestClient(create_app(Settings(model=tiny_model_dir, store=url, data_dir=tmp_path))) as c, \
            caplog.at_level(logging.DEBUG):
        for _ in range(600):
            health = c.get("/health")
            if health.json().get("status") == "failed":
                break
            time.sleep(0.05)
        assert health.json()["status"] == "failed" and "session store" in health.json()["error"]
        assert "cannot open the session store redis://***@127.0.0.1:16391/0" in caplog.text
        for text in (health.text, c.post("/v1/sessions").text, caplog.text):
            assert "Sup3r" not in text and "S3cret" not in text


def test_the_queue_share_per_tenant_is_half_the_queue_with_several_tenants():
    from service.settings import Settings

    assert Settings(max_queue=10).to_core().max_queue_per_tenant is None  # no keys: one tenant
    assert Settings(max_queue=10, api_keys="k1=a,k2=a").to_core().max_queue_per_tenant is None
    assert Settings(max_queue=10, api_keys="k1=a,k2=b").to_core().max_queue_per_tenant == 5
    assert Settings(max_queue=10, max_queue_per_tenant=3).to_core().max_queue_per_tenant == 3


def test_the_example_secrets_placeholder_key_is_refused():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="placeholder of the example secret"):
        Settings(api_keys="good-key=a,replace-me-with-a-random-key=default")


def test_damaged_metadata_is_a_store_error_and_left_out_of_listings(store):
    """Metadata that is not a JSON object was a 500 on lookups and failed the tenant's whole listing."""
    store.save(meta(), state())
    store.save(meta("b" * 32, created_at=2.0), state())
    store.r.hset(store._key("a" * 32), "meta", "null")
    with pytest.raises(StoreError, match="cannot read session a+: session metadata is a JSON NoneType"):
        store.get("a" * 32)
    with pytest.raises(StoreError, match="not an object"):
        store.load("a" * 32, "fp")
    assert [m.id for m in store.page("t", None, 10)] == ["b" * 32]
