"""SessionService: the operations behind the API (create, list, get, delete, append, ask), on the event loop.

Lookups ask the store (the disk store answers from its own index; a shared store from the shared data, so that a
replica sees what the others wrote). It keeps a small LRU of memory states, used only when the store's version
of the session is the cached one, and one asyncio lock per session so that appends to one session run one at a
time in this process; between processes the store's version check decides (the loser gets a 409). Model work goes
through the scheduler to the engine worker thread; store I/O runs in threads. Nothing here knows about HTTP.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator

import anyio

from model.text import question_text

from .answers import AnswerRun
from .config import CoreConfig
from .errors import (InvalidRequest, OffsetConflict, PayloadTooLarge, QuotaExceeded, SessionNotFound,
                     VersionConflict)
from .readahead import ReadAhead, first_of
from .scheduler import IngestJob, Scheduler
from .stats import ServiceStats
from .store import SessionStore
from .textstream import ReadyText, Utf8Stream
from .types import (SESSION_ID, AnswerDone, AppendResult, AskParams, LastAppend, SessionMeta, SessionPage,
                    TextDelta)

CURSOR_PATTERN = r"^([0-9]{1,20})-([0-9a-f]{32})$"  # a next_cursor: created_at in microseconds, id
CURSOR = re.compile(CURSOR_PATTERN)

MAX_HOP_LIMIT = 64  # ACT: the most hops per layer a request may ask for (compute grows linearly with it)


class SessionService:
    def __init__(self, model, store: SessionStore, scheduler: Scheduler, stats: ServiceStats,
                 config: CoreConfig) -> None:
        self.model, self.store, self.scheduler, self.stats, self.cfg = model, store, scheduler, stats, config
        self.tokenizer = model.tokenizer
        self._cache: OrderedDict[str, tuple[SessionMeta, object]] = OrderedDict()
        # one lock per session while someone holds or awaits it (weak: a replica serves unboundedly many sessions)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ------------------------------------------------------------------ lookups
    async def get(self, tenant: str, session_id: str) -> SessionMeta:
        """The session's newest metadata, as the store has it now."""
        meta = await self._lookup(session_id)
        if meta is None or meta.tenant != tenant:  # another tenant's session does not exist for this caller
            raise SessionNotFound(f"no session {session_id}")
        return meta

    async def _lookup(self, session_id: str) -> SessionMeta | None:
        if not SESSION_ID.match(session_id):
            return None
        if self.store.index_in_memory:  # a dict lookup: cheaper than the thread hop
            return self.store.get(session_id)
        return await asyncio.to_thread(self.store.get, session_id)

    async def list(self, tenant: str, limit: int, cursor: str | None) -> SessionPage:
        """Oldest first; `cursor` is the `next_cursor` of the previous page."""
        if not 1 <= limit <= 1000:
            raise InvalidRequest(f"limit must be in 1..1000, got {limit}")
        after: tuple[int, str] | None = None
        if cursor:
            m = CURSOR.match(cursor)
            if not m:
                raise InvalidRequest("cursor is not one this server returned")
            after = (int(m.group(1)), m.group(2))
        mine = await asyncio.to_thread(self.store.page, tenant, after, limit + 1)
        page = mine[:limit]
        more = len(mine) > limit
        return SessionPage(page, f"{page[-1].sort_key[0]}-{page[-1].id}" if more else None)

    # ------------------------------------------------------------------ create / delete
    async def create(self, tenant: str) -> SessionMeta:
        limit = self.cfg.max_sessions_per_tenant  # a soft limit: creates in flight together may pass it by a few
        if limit and await asyncio.to_thread(self.store.count_for, tenant, limit) >= limit:
            raise QuotaExceeded(f"this API key's tenant holds {limit} sessions, its limit "
                                "(ARMT_MAX_SESSIONS_PER_TENANT): delete some first")
        state = self.model.new_state()
        now = time.time()
        meta = SessionMeta(id=secrets.token_hex(16), tenant=tenant, model=self.model.fingerprint, created_at=now,
                           updated_at=now)
        return await self._commit(meta, state)

    async def delete(self, tenant: str, session_id: str) -> None:
        await self.get(tenant, session_id)
        async with self._lock(session_id):
            await self.get(tenant, session_id)  # deleted meanwhile?
            try:
                _, cancelled = await _to_the_end(self.store.delete, session_id)
            finally:
                self._cache.pop(session_id, None)
            if cancelled:
                raise asyncio.CancelledError
        self._locks.pop(session_id, None)

    # ------------------------------------------------------------------ append
    async def append(self, tenant: str, session_id: str, offset: int, body: AsyncIterable[bytes],
                     declared_length: int | None) -> AppendResult:
        """Append the document's next bytes at `offset`; returns only after the new state is durably stored."""
        limit = self.cfg.max_append_bytes
        if declared_length is not None and declared_length > limit:
            raise PayloadTooLarge(f"append body of {declared_length} bytes is over the limit of {limit} bytes")
        await self.get(tenant, session_id)
        async with self._lock(session_id):
            meta, state = await self._snapshot(tenant, session_id)
            if offset != meta.offset:
                return await self._retry(meta, offset, body)
            return await self._ingest_body(meta, state, body)

    async def _retry(self, meta: SessionMeta, offset: int, body: AsyncIterable[bytes]) -> AppendResult:
        """The same bytes at the last append's offset are a retry: answer as before, change nothing."""
        last = meta.last_append
        if last is None or offset != last.start or meta.offset != last.start + last.length:
            raise OffsetConflict(f"append at offset {offset} but the session's document has {meta.offset} bytes",
                                 offset=meta.offset)
        sha, n = hashlib.sha256(), 0
        async for chunk in body:
            n += len(chunk)
            if n > last.length:
                break
            sha.update(chunk)
        if n != last.length or sha.hexdigest() != last.sha256:
            raise OffsetConflict(f"bytes {offset}..{meta.offset} were already appended with different content",
                                 offset=meta.offset)
        return AppendResult(meta.offset, last.tokens, last.segments)

    async def _ingest_body(self, meta: SessionMeta, state, body: AsyncIterable[bytes]) -> AppendResult:
        # A full queue refuses before the body is read (a retry, answered from the metadata, needs no room). One
        # place is then held from the body's first whole chunk to its end, so the append is never refused halfway,
        # after part of it went into the memory; a client trickling its first chunk holds no place meanwhile.
        self.scheduler.check_room(meta.tenant)
        async with contextlib.AsyncExitStack() as place:
            take_place = functools.cache(lambda: place.enter_context(self.scheduler.reservation(meta.tenant)))
            decoder, text = Utf8Stream(meta.partial, meta.offset), ReadyText(meta.held)
            sha, n, buf = hashlib.sha256(), 0, bytearray()
            body = ReadAhead(body, self.cfg.append_chunk_bytes)  # a client gone mid-chunk drops the chunk's job
            place.push_async_callback(body.close)
            async for chunk in body:
                n += len(chunk)
                if n > self.cfg.max_append_bytes:
                    raise PayloadTooLarge(f"append body is over the limit of {self.cfg.max_append_bytes} bytes")
                sha.update(chunk)
                buf += chunk
                if len(buf) >= self.cfg.append_chunk_bytes:  # up to ~3 chunks in memory: this, its copy, the next
                    take_place()  # the first time only (Overloaded if no place is left: nothing written yet)
                    state = await self._ingest_bytes(state, decoder, text, bytes(buf), body.failed)
                    buf.clear()
            if not n:
                return AppendResult(meta.offset, meta.tokens, meta.segments)
            take_place()
            state = await self._ingest_bytes(state, decoder, text, bytes(buf), body.failed)
        last = LastAppend(meta.offset, n, sha.hexdigest(), state.tokens, state.segments)
        meta = meta.evolve(offset=meta.offset + n, held=text.held, partial=decoder.partial, last_append=last,
                           updated_at=time.time())
        try:
            meta = await self._commit(meta, state)
        except VersionConflict:  # another replica appended to this session meanwhile and won
            self._cache.pop(meta.id, None)
            now = await self.get(meta.tenant, meta.id)
            won = now.last_append
            if won is not None and (won.start, won.length, won.sha256) == (last.start, last.length, last.sha256):
                # the winner carried these very bytes (this request is a retry, sent to another replica while the
                # first was still running): the answer a retry gets, not a conflict
                return AppendResult(now.offset, won.tokens, won.segments)
            raise OffsetConflict(f"append at offset {last.start} lost a race with a concurrent append to this "
                                 f"session; the session's document has {now.offset} bytes", offset=now.offset) from None
        return AppendResult(meta.offset, meta.tokens, meta.segments)

    async def _ingest_bytes(self, state, decoder: Utf8Stream, text: ReadyText, data: bytes,
                            body_failed: asyncio.Future):
        ids = await asyncio.to_thread(self._tokenize, decoder, text, data)
        if not ids:
            return state
        job = IngestJob(state, ids, reserved=True)  # inside _ingest_body's reservation
        self.scheduler.submit(job)
        # the job is dropped if the request is cancelled or its body fails meanwhile (client gone, stalled)
        return await first_of(asyncio.wrap_future(job.future), body_failed)

    def _tokenize(self, decoder: Utf8Stream, text: ReadyText, data: bytes) -> list[int]:
        pieces = text.feed(decoder.feed(data))
        ids: list[int] = []
        for enc in self.tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []:
            ids.extend(enc.ids)
        return ids

    # ------------------------------------------------------------------ ask
    async def ask(self, tenant: str, session_id: str, params: AskParams) -> AsyncIterator[TextDelta | AnswerDone]:
        """Submit a question; returns its event stream. Overload and lookup errors raise here, before any event."""
        self._check_params(params)
        self.scheduler.check_room(tenant)
        meta, state = await self._snapshot(tenant, session_id)
        # The question follows the document's last word after one space, as in the training data: trailing
        # whitespace of the document (a final newline, say) is not part of the prompt.
        text = meta.held.rstrip() + question_text(params.question)
        prompt = self.tokenizer.encode(text, add_special_tokens=False).ids
        run = AnswerRun(self.tokenizer, state, prompt, params, asyncio.get_running_loop(), self.model.config.act)
        run.job.tenant = tenant
        self.scheduler.submit(run.job)
        return run.events()

    def _check_params(self, p: AskParams) -> None:
        if not p.question.strip():  # what question_text() strips: every Unicode space, not only NON_BLANK's
            raise InvalidRequest("question is empty")
        if len(p.question) > self.cfg.max_question_chars:
            raise InvalidRequest(f"question is {len(p.question)} characters; the limit is "
                                 f"{self.cfg.max_question_chars}")
        if not 1 <= p.max_new_tokens <= self.cfg.max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens must be in 1..{self.cfg.max_new_tokens_limit}, "
                                 f"got {p.max_new_tokens}")
        if not 0 <= p.temperature < float("inf"):
            raise InvalidRequest(f"temperature must be >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
        if p.max_hop is not None and not self.model.config.act:
            raise InvalidRequest("max_hop applies only to models trained with adaptive computation time; "
                                 "this model has none")
        if p.max_hop is not None and not 1 <= p.max_hop <= MAX_HOP_LIMIT:
            raise InvalidRequest(f"max_hop must be in 1..{MAX_HOP_LIMIT}, got {p.max_hop}")

    # ------------------------------------------------------------------ state
    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    async def _snapshot(self, tenant: str, session_id: str) -> tuple[SessionMeta, object]:
        """The session's newest committed (meta, state) pair: from the LRU when it holds the version the store
        has now (one metadata read), else read from the store (meta and state in one consistent read)."""
        meta = await self.get(tenant, session_id)
        cached = self._cache.get(session_id)
        if cached is not None and (cached[0].version, cached[0].write_id) == (meta.version, meta.write_id):
            self._cache.move_to_end(session_id)
            return cached
        start = time.perf_counter()
        pair = await asyncio.to_thread(self.store.load, session_id, self.model.fingerprints)
        with self.stats.lock:
            self.stats.store.load_seconds.observe(time.perf_counter() - start)
        if pair[0].tenant != tenant:
            raise SessionNotFound(f"no session {session_id}")
        self._remember(session_id, pair)
        return pair

    async def _commit(self, meta: SessionMeta, state) -> SessionMeta:
        """Store meta + state durably (in a thread) as the version after `meta`'s, then keep them in the LRU;
        VersionConflict when the stored session is no longer the one `meta` was read from."""
        replaces = meta.write_id
        meta = meta.evolve(tokens=state.tokens, segments=state.segments, pending_tokens=len(state.pending),
                           state_bytes=state.nbytes, state_digest=await asyncio.to_thread(state.digest),
                           version=meta.version + 1, write_id=secrets.token_hex(8))
        start = time.perf_counter()
        try:
            _, cancelled = await _to_the_end(self.store.save, meta, state, replaces)
        except VersionConflict:
            with self.stats.lock:
                self.stats.store.version_conflicts += 1
            raise
        with self.stats.lock:
            self.stats.store.save_seconds.observe(time.perf_counter() - start)
        self._remember(meta.id, (meta, state))
        if cancelled:  # the write is stored and cached; the request still ends as cancelled
            raise asyncio.CancelledError
        return meta

    def _remember(self, session_id: str, pair: tuple[SessionMeta, object]) -> None:
        self._cache[session_id] = pair
        self._cache.move_to_end(session_id)
        while len(self._cache) > self.cfg.state_cache_size:
            self._cache.popitem(last=False)


async def _to_the_end(fn, *args) -> tuple[object, bool]:
    """fn(*args) in a thread, waited for to its end even if this task is cancelled meanwhile (at shutdown, say):
    (its result, whether the task was cancelled). The thread cannot be stopped, and a caller that returned at the
    cancellation would release the session's lock while a store write still runs, and leave its cache a version
    behind the store. A failure of fn raises as itself, or, when the task was cancelled meanwhile, as the
    CancelledError (fn's error its cause): the cancellation is never lost.

    The wait is shielded from anyio cancel scopes too (which cancel again at every await until the scope exits:
    a bare loop would spin); a plain asyncio cancel is caught once and the wait goes on."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while not work.done():
        try:
            with anyio.CancelScope(shield=True):
                await asyncio.shield(work)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # noqa: S110  read from `work` below
            pass
    if cancelled and work.exception() is not None:
        raise asyncio.CancelledError() from work.exception()
    return work.result(), cancelled
