"""Two `armt serve` processes (real uvicorn on 127.0.0.1, random ports) sharing one real redis-server: a session
written through one is read and answered through the other, and concurrent appends to one session through both
are decided by the store's version check: one winner per offset, nothing lost or doubled."""
from __future__ import annotations

import re
import threading

import httpx
import pytest

from service.client import ArmtClient, ArmtHTTPError
from tests.service_helpers import Server, document

KEY = "scale-key"
QUESTION = {"max_new_tokens": 12}
DOC = document(9000).encode()
PIECE = 1500  # long enough that both appends of a round are in the engine at once


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory, redis_server):
    url = f"{redis_server.url}/63"  # a database of its own (redis_db hands out 1..62 to function tests)
    servers = [Server(tiny_model_dir, tmp_path_factory.mktemp(f"replica{i}"), ARMT_STORE=url,
                      ARMT_API_KEYS=f"{KEY}=tenant1") for i in range(2)]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()
    for s in servers:
        assert "Traceback" not in s.log.read_text(errors="replace"), s.log_tail()


@pytest.fixture()
def clients(replicas):
    with ArmtClient(replicas[0].url, api_key=KEY, timeout=60) as a, \
            ArmtClient(replicas[1].url, api_key=KEY, timeout=60) as b:
        yield a, b


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_append_through_one_replica_answer_through_the_other(clients, replicas):
    a, b = clients
    sid = a.create_session()["id"]
    a.append(sid, 0, DOC[:1500])
    assert b.get_session(sid) == a.get_session(sid)  # b never saw this session before
    assert sid in {s["id"] for s in b.iter_sessions()}
    first = a.ask(sid, "What is it about?", **QUESTION)
    assert b.ask(sid, "What is it about?", **QUESTION) == first
    b.append(sid, 1500, DOC[1500:])  # a has this session's older state cached: it must not use it
    assert a.get_session(sid)["offset"] == len(DOC)
    again = a.ask(sid, "What is it about?", **QUESTION)
    assert again == b.ask(sid, "What is it about?", **QUESTION)
    whole = a.create_session()["id"]
    a.append(whole, 0, DOC)
    assert a.get_session(whole)["state_digest"] == b.get_session(sid)["state_digest"]
    assert a.ask(whole, "What is it about?", **QUESTION) == again
    b.delete_session(sid)
    with pytest.raises(ArmtHTTPError) as e:
        a.get_session(sid)
    assert e.value.status == 404
    assert metric(replicas[0].url, "armt_sessions") == metric(replicas[1].url, "armt_sessions") >= 1
    assert httpx.get(f"{replicas[1].url}/ready").json()["status"] == "ready"


def piece(writer: int, k: int) -> bytes:
    """Distinct bytes per writer and round (so a late copy can never pass as an idempotent retry)."""
    return f"[writer {writer} piece {k}] ".encode() + DOC[k * PIECE : (k + 1) * PIECE]


def test_concurrent_appends_through_both_replicas_one_winner_per_offset(clients, replicas):
    a, b = clients
    sid = a.create_session()["id"]
    rounds, acked, refused = 6, [], []
    barrier, lock = threading.Barrier(2), threading.Lock()
    conflicts_before = sum(metric(r.url, "armt_store_version_conflicts_total") for r in replicas)

    def writer(w: int, client: ArmtClient) -> None:
        for k in range(rounds):
            barrier.wait(60)  # the previous round is over for both
            offset, data = client.get_session(sid)["offset"], piece(w, k)
            barrier.wait(60)  # both send at the same offset at the same moment
            try:
                result = client.append(sid, offset, data)
                with lock:
                    acked.append((offset, data, result["offset"]))
            except ArmtHTTPError as e:
                assert e.status == 409 and e.body["error"]["code"] == "offset_mismatch", e.body
                with lock:
                    refused.append((offset, e.body["error"]["offset"]))

    threads = [threading.Thread(target=writer, args=(w, c)) for w, c in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    acked.sort()
    offsets = [o for o, _, _ in acked]
    assert len(offsets) == len(set(offsets)) == rounds, acked  # exactly one winner per round's offset
    end = 0
    for offset, data, new_offset in acked:  # the acknowledged appends tile the document: no gap, no overlap
        assert offset == end and new_offset == end + len(data)
        end = new_offset
    assert len(refused) == rounds and all(current > offset for offset, current in refused)
    conflicts = sum(metric(r.url, "armt_store_version_conflicts_total") for r in replicas) - conflicts_before
    print(f"{rounds} rounds: {conflicts} lost races refused by the version check, {rounds - conflicts} by offset")
    assert conflicts >= 1  # both ingested at once and the store, not a process lock, decided
    final_a, final_b = a.get_session(sid), b.get_session(sid)
    assert final_a == final_b and final_a["offset"] == end
    replay = a.create_session()["id"]  # one process, the acknowledged bytes in one append
    a.append(replay, 0, b"".join(data for _, data, _ in acked))
    assert a.get_session(replay)["state_digest"] == final_a["state_digest"]
    assert a.ask(replay, "Who wrote?", **QUESTION) == b.ask(sid, "Who wrote?", **QUESTION)


def test_a_retry_sent_to_the_other_replica_while_the_first_runs_gets_the_same_answer(clients, replicas):
    """A client whose answer was slow retries the same bytes on the other replica: one of the two commits wins the
    store's version check, and the other, carrying the very same bytes, is the retry, not a lost race (it was a
    409 saying the client lost a race it had won)."""
    a, _ = clients
    data, gate = DOC[:1800], threading.Event()
    headers = {"Content-Type": "text/plain; charset=utf-8", "Authorization": f"Bearer {KEY}"}
    for _ in range(2):
        sid, answers = a.create_session()["id"], [None, None]

        def body():
            yield data[:-1]  # both servers have read the session (offset 0) before either body ends
            gate.wait(30)
            yield data[-1:]

        def send(i: int) -> None:
            r = httpx.post(f"{replicas[i].url}/v1/sessions/{sid}/append", params={"offset": 0}, content=body(),
                           headers=headers, timeout=60)
            answers[i] = (r.status_code, r.json())

        gate.clear()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        threading.Event().wait(0.5)
        gate.set()
        for t in threads:
            t.join(120)
        assert answers[0] == answers[1] and answers[0][0] == 200, answers
        assert a.get_session(sid)["offset"] == len(data)
