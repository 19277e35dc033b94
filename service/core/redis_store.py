"""`RedisStore`: sessions in Redis, shared by every replica of the service (`ARMT_STORE=redis://host:port/db`).

Why Redis: an ARMT session is one small fixed-size state plus a little JSON, so any replica can serve any session
if the state lives in one shared store; Redis gives atomic scripts and key expiry for that without more machinery.

Layout (`P` is the key prefix, `armt` by default):
- `P:s:<id>`   hash {v: version, meta: session JSON, state: safetensors bytes of the MemoryState}
- `P:t:<tenant>` sorted set of the tenant's ids, scored by creation time in microseconds (the listing order)
- `P:all`      sorted set of every id, scored by the time its key expires (+inf without a TTL): the session count
- `P:sizes`    hash id -> stored bytes, and `P:bytes` their sum: the `armt_state_bytes` gauge without a scan

A write is one Lua script, atomic in Redis: it compares the stored version with the one the writer read and writes
the state, the metadata and the indexes together, or nothing. The append that lost a race between two replicas is
refused (VersionConflict, a 409 for the client) instead of overwriting the winner. Lookups always read Redis, so a
replica sees sessions that others created, changed or deleted; the session service's state cache is validated
against the version read here before use. With a TTL each write (creation, append) restarts the session's clock;
expired sessions disappear from lookups at once and from the indexes lazily (listing, counting).
"""
from __future__ import annotations

import json
import logging

import redis

from model import MemoryState, StateMismatchError

from .errors import SessionNotFound, StateConflict, StoreError, VersionConflict
from .types import SESSION_ID, SessionMeta

log = logging.getLogger("armt.store")
PROBE_TIMEOUT_S = 2.0  # /ready and the gauges: well under Prometheus' 10 s scrape timeout for both Redis calls

# KEYS: session hash, tenant zset, all zset, sizes hash, bytes counter.
# ARGV: new version, meta JSON, state bytes, id, listing score, TTL in ms (0: none), the write_id replaced, the
# new write_id. Returns {1, version} when written, {0, stored version} when the stored session is not the one the
# writer read (version - 1 with that write_id).
_SAVE = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local version = tonumber(ARGV[1])
if stored ~= version - 1 or (redis.call('HGET', KEYS[1], 'w') or '') ~= ARGV[7] then return {0, stored} end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'meta', ARGV[2], 'state', ARGV[3], 'w', ARGV[8])
local ttl = tonumber(ARGV[6])
local expires = '+inf'
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  local now = redis.call('TIME')
  expires = tostring(tonumber(now[1]) + tonumber(now[2]) / 1000000 + ttl / 1000)
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[3], expires, ARGV[4])
local old = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
redis.call('HSET', KEYS[4], ARGV[4], #ARGV[3])
redis.call('INCRBY', KEYS[5], #ARGV[3] - old)
return {1, version}
"""

# KEYS: session hash, tenant zset, all zset, sizes hash, bytes counter. ARGV: id.
_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('INCRBY', KEYS[5], -old)
return old
"""

# KEYS: all zset, sizes hash, bytes counter. ARGV: session key prefix. Drops the index entries of expired
# sessions (their keys are gone) and returns the number of sessions left.
_PRUNE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. tostring(t), 'LIMIT', 0, 1000)
for _, id in ipairs(gone) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    local old = tonumber(redis.call('HGET', KEYS[2], id) or '0')
    redis.call('HDEL', KEYS[2], id)
    redis.call('INCRBY', KEYS[3], -old)
  end
end
return redis.call('ZCARD', KEYS[1])
"""


class RedisStore:
    """The SessionStore protocol on Redis; thread-safe (redis-py's connection pool), called from worker threads."""

    index_in_memory = False  # every lookup is a round trip: the service calls it in a thread

    def __init__(self, client: redis.Redis, ttl_s: int | None = None, prefix: str = "armt",
                 probe: redis.Redis | None = None) -> None:
        self.r, self.ttl_ms, self.prefix = client, int(ttl_s * 1000) if ttl_s else 0, prefix
        # /ready and the /metrics gauges go through `probe`, a client with a short timeout: a Redis that hangs must
        # not hold a scrape past Prometheus' timeout (every replica would look down and the store-error alert,
        # whose counter lives in that scrape, could never fire)
        self.probe = probe or client
        self._save, self._delete = client.register_script(_SAVE), client.register_script(_DELETE)
        self._prune = client.register_script(_PRUNE)

    @classmethod
    def from_url(cls, url: str, ttl_s: int | None = None) -> "RedisStore":
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        probe = redis.Redis.from_url(url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
        return cls(client, ttl_s, probe=probe)

    # ------------------------------------------------------------------ keys
    def _key(self, session_id: str) -> str:
        if not SESSION_ID.match(session_id):  # ids are validated before; this keeps keys well-formed regardless
            raise StoreError(f"bad session id {session_id!r}")
        return f"{self.prefix}:s:{session_id}"

    def _keys(self, session_id: str, tenant: str) -> list[str]:
        p = self.prefix
        return [self._key(session_id), f"{p}:t:{tenant}", f"{p}:all", f"{p}:sizes", f"{p}:bytes"]

    # ------------------------------------------------------------------ protocol
    def get(self, session_id: str) -> SessionMeta | None:
        raw = self._call("read", session_id, self.r.hget, self._key(session_id), "meta")
        if raw is None:
            return None
        try:
            return SessionMeta.parse(raw)
        except ValueError as e:
            raise StoreError(f"cannot read session {session_id}: {e}") from None

    def page(self, tenant: str, after: tuple[int, str] | None, limit: int) -> list[SessionMeta]:
        """Reads the tenant's sorted set from `after`'s score on, in batches, skipping expired entries."""
        key, out, start = f"{self.prefix}:t:{tenant}", [], 0
        low = after[0] if after else "-inf"
        while len(out) < limit:
            batch = self._call("list", tenant, self.r.zrangebyscore, key, low, "+inf", start=start,
                               num=limit + 1, withscores=True)
            if not batch:
                break
            start += len(batch)
            ids = [i.decode() for i, score in batch if after is None or (int(score), i.decode()) > after]
            pipe = self.r.pipeline(transaction=False)
            for session_id in ids:
                pipe.hget(self._key(session_id), "meta")
            raws = self._call("list", tenant, pipe.execute)
            gone = [i for i, raw in zip(ids, raws) if raw is None]
            if gone:  # expired sessions: drop their listing entries
                self._call("list", tenant, self.r.zrem, key, *gone)
                start -= len(gone)
            out += [meta for session_id, raw in zip(ids, raws) if raw is not None
                    and (meta := self._parse_listed(session_id, raw)) is not None]
        return out[:limit]

    @staticmethod
    def _parse_listed(session_id: str, raw: bytes) -> SessionMeta | None:
        """A listed session's metadata; a damaged one is logged and left out of the listing (as the disk store's
        scan does), so that one bad entry does not fail the whole page."""
        try:
            return SessionMeta.parse(raw)
        except ValueError as e:
            log.error("skipping unreadable session %s in a listing: %s", session_id, e)
            return None

    def count(self) -> int:
        p = self.prefix
        return int(self._call("count", "", self._prune, keys=[f"{p}:all", f"{p}:sizes", f"{p}:bytes"],
                              args=[f"{p}:s:"], client=self.probe))

    def count_for(self, tenant: str, at_least: int = 0) -> int:
        """The tenant's sessions: its sorted set's size when under `at_least` (one call), else its live ids
        counted one by one (expired ones leave the set here, as in page())."""
        key = f"{self.prefix}:t:{tenant}"
        size = int(self._call("count", tenant, self.r.zcard, key))
        if size < at_least:
            return size
        ids = [i.decode() for i in self._call("count", tenant, self.r.zrange, key, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for session_id in ids:
            pipe.exists(self._key(session_id))
        alive = self._call("count", tenant, pipe.execute) if ids else []
        gone = [i for i, live in zip(ids, alive) if not live]
        if gone:
            self._call("count", tenant, self.r.zrem, key, *gone)
        return len(ids) - len(gone)

    def save(self, meta: SessionMeta, state: MemoryState, replaces: str = "") -> None:
        data = state.to_bytes()
        args = [meta.version, json.dumps(meta.to_json(), sort_keys=True), data, meta.id, meta.sort_key[0],
                self.ttl_ms, replaces, meta.write_id]
        written, stored = self._call("write", meta.id, self._save, keys=self._keys(meta.id, meta.tenant), args=args)
        if not written:
            raise VersionConflict(f"session {meta.id} is at version {stored}; a write of version {meta.version} "
                                  "lost a race with another writer")

    def load(self, session_id: str, fingerprint: str | tuple[str, ...]) -> tuple[SessionMeta, MemoryState]:
        raw, data = self._call("read", session_id, self.r.hmget, self._key(session_id), ["meta", "state"])
        if raw is None or data is None:
            raise SessionNotFound(f"no session {session_id}")
        try:
            meta = SessionMeta.parse(raw)
            state = MemoryState.from_bytes(data, fingerprint=fingerprint)
        except StateMismatchError as e:
            raise StateConflict(f"session {session_id} holds a state this server's model cannot use: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"cannot read session {session_id}: {e}") from None
        if meta.state_digest and state.digest() != meta.state_digest:  # as the disk store: never serve a damaged one
            raise StoreError(f"session {session_id}: the stored state does not match its digest")
        return meta, state

    def delete(self, session_id: str) -> None:
        meta = self.get(session_id)
        if meta is not None:
            self._call("delete", session_id, self._delete, keys=self._keys(session_id, meta.tenant),
                       args=[session_id])

    def check(self) -> str | None:
        try:
            self.probe.ping()
        except redis.RedisError as e:
            log.warning("redis store unreachable: %s", e)
            return "redis store unreachable"
        return None

    def total_bytes(self) -> int:
        return int(self._call("count", "", self.probe.get, f"{self.prefix}:bytes") or 0)

    def close(self) -> None:
        self.r.close()
        if self.probe is not self.r:
            self.probe.close()

    @staticmethod
    def _call(what: str, name: str, fn, *args, **kwargs):
        """A Redis call whose failure is a StoreError (a 503 for the client), never a raw redis exception."""
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:  # the details (addresses) go to the log, not to clients
            log.warning("redis store: cannot %s %s: %s", what, name or "sessions", e)
            raise StoreError(f"the session store is unavailable (cannot {what} {name or 'sessions'})") from None
