"""Crash consistency: SIGKILL a real `armt serve` at chosen moments while documents stream in, restart it on the
same data directory, and check every session against a reference server that is never killed.

    .venv/bin/python -m bench.crash_harness --kills 100 [--model tiny|default|DIR] [--sessions 4] [--seed 0]
        [--out runs/crash.json] [--env ARMT_X=Y ...]

Kill moments rotate over three kinds:
- append: an append to every session is in flight; the kill comes after a random delay (while the body is read,
  tokenized, ingested, saved or answered);
- save: inside a state write. The server runs with ARMT_FAULT_DELAY_SAVE_S, which holds each write between its
  temporary file and the rename; the kill comes as soon as a temporary file exists (with a store that writes no
  such file the kill falls back to a random delay, reported as `save_timed`);
- ask: a streamed question (and the appends) are in flight; the kill comes with the question's first token.

After each restart, every session must be listed, and its offset must be the last acknowledged one or that plus
the append in flight at the kill (committed, but its answer lost): less is a lost acknowledged append, anything
else a corrupt session. Its state_digest, tokens, segments, pending_tokens and held_chars must equal those of the
reference server's session holding the same bytes, and a question must get the same answer from both (this reads
the stored state; else corrupt). The in-flight append is then retried as a client
would retry it (same bytes, same offset): it must be answered 200 with the offset of its end, and the session must
then equal the reference up to that end; a different state there is a duplicate. At the end every upload resumes
from the server's offset to the end of its document and must equal the reference for the whole document.

The reference is incremental: its session for a document only ever grows by the bytes the checks need, which
relies on the service's chunk invariance (the same bytes in any pieces give the same digest; tested end to end).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.common import Server, aiter_sse, document, parse_env, resolve_model, write_json
from bench.primed import PrimedServer

MODES = ("append", "save", "ask")
COMPARED = ("offset", "state_digest", "tokens", "segments", "pending_tokens", "held_chars")
TEXT = {"Content-Type": "text/plain; charset=utf-8"}


@dataclass
class Upload:
    """One session's document and what the client knows of it."""

    sid: str
    ref: str  # the reference server's session for the same document
    data: bytes
    acked: int = 0  # the offset of the last 200
    ref_offset: int = 0
    inflight: tuple[int, int] | None = None  # (start, end) of an append that got no answer


@dataclass
class Tally:
    kills_by_mode: Counter = field(default_factory=Counter)
    inside_state_write: int = 0
    session_checks: int = 0
    corrupt: int = 0
    lost_acknowledged: int = 0
    duplicates: int = 0
    committed_answer_lost: int = 0  # in flight at the kill, stored, answer never sent: allowed
    not_committed: int = 0  # in flight at the kill, not stored: allowed
    retries: int = 0
    unexpected_answers: int = 0  # a non-200 to an append that should have worked
    completed_documents: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.problems.append(f"{kind}: {text}")


class CrashHarness:
    def __init__(self, model_dir: Path, work: Path, sessions: int, seed: int, save_delay: float, max_chunk: int,
                 env: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.sessions, self.max_chunk = sessions, max_chunk
        self.server = PrimedServer(model_dir, work / "data", ARMT_FAULT_DELAY_SAVE_S=str(save_delay), **env)
        self.reference = Server(model_dir, work / "reference", **env)
        self.sessions_dir = work / "data" / "sessions"
        self.uploads: list[Upload] = []
        self.tally = Tally()

    # ------------------------------------------------------------------ the run
    async def run(self, kills: int) -> dict:
        start = time.monotonic()
        self.server.start()
        self.reference.start()
        try:
            await self._create_uploads(kills)
            for i in range(kills):
                await self._kill_point(MODES[i % len(MODES)])
            await self._finish_uploads()
        finally:
            self.server.stop()
            self.reference.stop()
        for srv in (self.server, self.reference):
            if "Traceback" in srv.log.read_text(errors="replace"):
                self.tally.problems.append(f"traceback in {srv.log}")
        return {"kills": kills, "sessions": self.sessions, "seconds": round(time.monotonic() - start, 1),
                **asdict(self.tally, dict_factory=dict), "kills_by_mode": dict(self.tally.kills_by_mode)}

    async def _create_uploads(self, kills: int) -> None:
        size = kills * self.max_chunk // 2 + 2000  # long enough that uploads are still running at the last kill
        text = document(size * self.sessions)  # cut into documents by characters, into appends by bytes
        async with self._client(self.server) as http, self._client(self.reference) as ref:
            for k in range(self.sessions):
                sid = (await http.post("/v1/sessions")).json()["id"]
                rid = (await ref.post("/v1/sessions")).json()["id"]
                self.uploads.append(Upload(sid, rid, text[k * size : (k + 1) * size].encode()))

    @staticmethod
    def _client(server: Server) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.url, timeout=60)

    async def _kill_point(self, mode: str) -> None:
        """In-flight work, a kill at the chosen moment, a restart, then the checks."""
        first_token = asyncio.Event()
        async with self._client(self.server) as http:
            tasks = [asyncio.create_task(self._append_next(http, up)) for up in self.uploads
                     if up.acked < len(up.data)]
            if mode == "ask":
                tasks.append(asyncio.create_task(self._ask(http, first_token)))
            await self._wait_for_moment(mode, first_token, tasks)
            self.server.kill()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.server.start()
        await self._check_sessions()

    async def _wait_for_moment(self, mode: str, first_token: asyncio.Event, appends: list[asyncio.Task]) -> None:
        if mode == "ask":
            try:
                await asyncio.wait_for(first_token.wait(), 30)
            except TimeoutError:
                self.tally.problems.append("ask: no token within 30 s")
        elif mode == "save" and await self._temp_file_appears(timeout=10):
            self.tally.inside_state_write += 1
        else:
            mode = "save_timed" if mode == "save" else mode
            await self._some_appends_answered(appends, self.rng.randrange(len(appends) or 1))
        self.tally.kills_by_mode[mode] += 1

    async def _some_appends_answered(self, appends: list[asyncio.Task], count: int) -> None:
        """Return as soon as `count` appends are answered (the kill then follows an acknowledgement at once), or
        for 0 after a short random delay (the kill lands while they are read, tokenized or ingested)."""
        if count == 0:
            return await asyncio.sleep(self.rng.uniform(0, 0.05))
        pending = set(appends)
        while len(appends) - len(pending) < count:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    async def _temp_file_appears(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sessions_dir.is_dir() and any(p.suffix == ".tmp" for p in self.sessions_dir.iterdir()):
                return True
            await asyncio.sleep(0.002)
        return False

    # ------------------------------------------------------------------ client work
    async def _append_next(self, http: httpx.AsyncClient, up: Upload) -> None:
        start = up.acked
        end = min(len(up.data), start + self.rng.randint(1, self.max_chunk))  # cuts anywhere, inside characters too
        up.inflight = (start, end)
        r = await http.post(f"/v1/sessions/{up.sid}/append", params={"offset": start}, content=up.data[start:end],
                            headers=TEXT)
        if r.status_code != 200 or r.json()["offset"] != end:
            return self.tally.problem("unexpected_answers", f"append {up.sid} {start}..{end}: {r.status_code} "
                                                             f"{r.text[:200]}")
        up.acked, up.inflight = end, None

    async def _ask(self, http: httpx.AsyncClient, first_token: asyncio.Event) -> None:
        up = self.rng.choice(self.uploads)
        body = {"question": "What happened next?", "stream": True, "max_new_tokens": 1000}
        async with http.stream("POST", f"/v1/sessions/{up.sid}/ask", json=body) as r:
            async for name, _ in aiter_sse(r):
                if name == "token":
                    first_token.set()
        first_token.set()  # answered before the kill (or refused): kill now anyway

    # ------------------------------------------------------------------ checks
    async def _check_sessions(self) -> None:
        async with self._client(self.server) as http, self._client(self.reference) as ref:
            listed = {s["id"] for s in (await http.get("/v1/sessions", params={"limit": 1000})).json()["sessions"]}
            if extra := listed - {up.sid for up in self.uploads}:  # missing ones are lost: see _check_one
                self.tally.problem("corrupt", f"sessions nobody created are listed after the restart: {extra}")
            for up in self.uploads:
                await self._check_one(http, ref, up)

    async def _check_one(self, http: httpx.AsyncClient, ref: httpx.AsyncClient, up: Upload) -> None:
        self.tally.session_checks += 1
        r = await http.get(f"/v1/sessions/{up.sid}")
        if r.status_code != 200:  # its creation was acknowledged: a 404 is a lost session
            kind = "lost_acknowledged" if r.status_code == 404 else "corrupt"
            return self.tally.problem(kind, f"{up.sid}: {r.status_code} {r.text[:200]}")
        got, allowed = r.json(), {up.acked} | ({up.inflight[1]} if up.inflight else set())
        offset = got["offset"]
        if offset < up.acked:
            self.tally.problem("lost_acknowledged", f"{up.sid}: offset {offset} < acknowledged {up.acked}")
        elif offset not in allowed:
            self.tally.problem("corrupt", f"{up.sid}: offset {offset}, expected one of {sorted(allowed)}")
        if await self._differs(ref, up, got):
            self.tally.problem("corrupt", f"{up.sid}: state at offset {offset} differs from the reference")
        elif (why := await self._answer_differs(http, ref, up)) is not None:
            self.tally.problem("corrupt", f"{up.sid}: at offset {offset} {why}")
        if up.inflight and offset in allowed:
            committed = offset == up.inflight[1] and offset != up.acked
            self.tally.committed_answer_lost += committed
            self.tally.not_committed += not committed
            await self._retry(http, ref, up)
        else:
            up.acked = offset  # go on from the server's offset, as a client resuming an upload does
        up.inflight = None

    async def _retry(self, http: httpx.AsyncClient, ref: httpx.AsyncClient, up: Upload) -> None:
        """The append whose answer never came, sent again as it was: 200 at its end, nothing applied twice."""
        start, end = up.inflight
        r = await http.post(f"/v1/sessions/{up.sid}/append", params={"offset": start}, content=up.data[start:end],
                            headers=TEXT)
        self.tally.retries += 1
        got = (await http.get(f"/v1/sessions/{up.sid}")).json()
        up.acked = got.get("offset", up.acked)
        if r.status_code == 200 and r.json()["offset"] != end:
            self.tally.problem("duplicates", f"retry {up.sid} {start}..{end}: answered offset {r.json()['offset']}")
        elif r.status_code != 200:
            self.tally.problem("unexpected_answers", f"retry {up.sid} {start}..{end}: {r.status_code} {r.text[:200]}")
        elif await self._differs(ref, up, got):
            self.tally.problem("duplicates", f"{up.sid}: after the retry of {start}..{end} the state differs")

    async def _differs(self, ref: httpx.AsyncClient, up: Upload, got: dict) -> bool:
        want = await self._reference_at(ref, up, got["offset"])
        return any(got[k] != want[k] for k in COMPARED)

    async def _answer_differs(self, http: httpx.AsyncClient, ref: httpx.AsyncClient, up: Upload) -> str | None:
        """Ask both servers (greedy): this reads the stored state itself, which the metadata checks do not (after
        a restart the server has nothing cached; the store refuses a state that does not match its digest)."""
        question = {"question": "Where is it?", "max_new_tokens": 4}
        got = await http.post(f"/v1/sessions/{up.sid}/ask", json=question)
        want = await ref.post(f"/v1/sessions/{up.ref}/ask", json=question)
        if got.status_code != 200 or got.json() != want.json():
            return f"the answer differs: {got.status_code} {got.text[:200]} vs {want.text[:200]}"
        return None

    async def _reference_at(self, ref: httpx.AsyncClient, up: Upload, offset: int) -> dict:
        """The reference session's view after exactly `offset` bytes of the document."""
        if offset < up.ref_offset:  # only after a lost append: replay from scratch, in one piece
            up.ref, up.ref_offset = (await ref.post("/v1/sessions")).json()["id"], 0
        if offset > up.ref_offset:
            r = await ref.post(f"/v1/sessions/{up.ref}/append", params={"offset": up.ref_offset},
                               content=up.data[up.ref_offset : offset], headers=TEXT)
            r.raise_for_status()
            up.ref_offset = offset
        return (await ref.get(f"/v1/sessions/{up.ref}")).json()

    async def _finish_uploads(self) -> None:
        """Resume every upload from the server's offset to the end of its document."""
        async with self._client(self.server) as http, self._client(self.reference) as ref:
            for up in self.uploads:
                offset = (await http.get(f"/v1/sessions/{up.sid}")).json().get("offset", len(up.data))
                while offset < len(up.data):
                    end = min(len(up.data), offset + self.max_chunk)
                    r = await http.post(f"/v1/sessions/{up.sid}/append", params={"offset": offset},
                                        content=up.data[offset:end], headers=TEXT)
                    if r.status_code != 200:
                        break
                    offset = r.json()["offset"]
                got = (await http.get(f"/v1/sessions/{up.sid}")).json()
                if got.get("offset") == len(up.data) and not await self._differs(ref, up, got):
                    self.tally.completed_documents += 1
                else:
                    self.tally.problem("corrupt", f"{up.sid}: the resumed upload does not equal the reference")


async def run(model_dir: Path, work: Path, kills: int, sessions: int = 4, seed: int = 0, save_delay: float = 0.1,
              max_chunk: int = 1500, env: dict[str, str] | None = None) -> dict:
    harness = CrashHarness(model_dir, work, sessions, seed, save_delay, max_chunk, env or {})
    return await harness.run(kills)


def summary(report: dict) -> str:
    return (f"{report['kills']} kills ({report['kills_by_mode']}), {report['inside_state_write']} inside a state "
            f"write; {report['session_checks']} session checks: {report['corrupt']} corrupt, "
            f"{report['lost_acknowledged']} lost acknowledged appends, {report['duplicates']} duplicates; "
            f"in flight at a kill: {report['committed_answer_lost']} stored without an answer, "
            f"{report['not_committed']} not stored, {report['retries']} retried; "
            f"{report['unexpected_answers']} unexpected answers; "
            f"{report['completed_documents']}/{report['sessions']} uploads resumed to completion; "
            f"{report['seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--model", default="tiny", help="tiny | default | a model directory")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-delay", type=float, default=0.1, help="ARMT_FAULT_DELAY_SAVE_S of the killed server")
    parser.add_argument("--max-chunk", type=int, default=1500, help="largest append, bytes")
    parser.add_argument("--out", type=Path, default=Path("runs/crash.json"))
    parser.add_argument("--env", action="append", help="KEY=VALUE for both servers (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="armt-crash-") as tmp:
        work = Path(tmp)
        report = asyncio.run(run(resolve_model(args.model, work), work, args.kills, args.sessions, args.seed,
                                 args.save_delay, args.max_chunk, parse_env(args.env)))
    report["model"] = args.model
    print(summary(report))
    for line in report["problems"][:20]:
        print("  ", line)
    write_json(args.out, report)
    raise SystemExit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
