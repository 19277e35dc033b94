"""Session storage behind one protocol; `DiskStore` keeps each session as one safetensors file.

A session's memory state and its metadata (offset, held-back text, last append, ...) live in the same file: the
tensors plus a header whose metadata holds the session JSON. A write goes to a temporary file, is fsynced, renamed
over the old file and the directory is fsynced, so after a crash the file is the old session or the new one, never a
mix, and never a state that disagrees with its offset. The index is rebuilt from the file headers at start-up.

The store, not the session service, answers lookups (`get`, `page`, `count`): the disk store from its own index
(one process owns a data directory), a shared store (service/core/redis_store.py) from the shared data, so that a
replica sees sessions that other replicas created or changed.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from model import MemoryState, StateMismatchError
from model.state import atomic_write, fsync_dir, header_metadata

from .errors import SessionNotFound, StateConflict, StoreError, VersionConflict
from .types import SESSION_ID, SessionMeta

log = logging.getLogger("armt.store")
SESSION_KEY = "armt_session"  # header metadata key holding the session JSON


class SessionStore(Protocol):
    """What the service needs from a store (DiskStore here, RedisStore in redis_store.py)."""

    # True when get() is a lookup in this process's memory: the service then calls it on the event loop, since
    # a thread hop per request would cost more than the lookup (and, under overload, delay every request).
    index_in_memory: bool

    def get(self, session_id: str) -> SessionMeta | None:
        """The newest metadata of a session (reads no tensors); None when there is none."""

    def page(self, tenant: str, after: tuple[int, str] | None, limit: int) -> list[SessionMeta]:
        """Up to `limit` of the tenant's sessions in `sort_key` order, those after `after` only."""

    def count(self) -> int: ...

    def count_for(self, tenant: str, at_least: int = 0) -> int:
        """The tenant's sessions (its quota). Exact from `at_least` on; below it a store may give a cheap upper bound
        (still below `at_least`: under the quota either way)."""

    def save(self, meta: SessionMeta, state: MemoryState, replaces: str = "") -> None:
        """Store meta and state together (atomic: old or new, never a mix), only over version `meta.version - 1`
        whose write_id is `replaces` (no session counts as version 0, write ""); otherwise VersionConflict and
        nothing is written."""

    def load(self, session_id: str, fingerprint: str | tuple[str, ...]) -> tuple[SessionMeta, MemoryState]:
        """Meta and state as last saved (one consistent pair); SessionNotFound when there is no such session,
        StateConflict if another model wrote the state."""

    def delete(self, session_id: str) -> None: ...

    def check(self) -> str | None:
        """None when usable, else why not (for /ready)."""

    def total_bytes(self) -> int: ...

    def close(self) -> None:
        """Release connections or the data directory (the service's shutdown)."""


def lock_data_directory(root: Path):
    """An open file holding an exclusive flock on root/.lock, or StoreError when another process holds it."""
    owner = open(root / ".lock", "a+")
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if not isinstance(e, BlockingIOError):  # a filesystem without flock (some NFS, SMB, FUSE): go on unlocked
            log.warning("cannot lock the data directory %s (%s): one server per directory is not enforced", root, e)
            return owner
        owner.close()
        raise StoreError(f"another process (a second armt serve?) is using the data directory {root}; a disk store "
                         "has one owner: give each server its own ARMT_DATA_DIR, or share sessions through Redis "
                         "(ARMT_STORE)") from None
    return owner


def check_version(session_id: str, stored: SessionMeta | None, meta: SessionMeta, replaces: str) -> None:
    """Optimistic concurrency: a write must name the write it replaces (its version - 1, and that write's id)."""
    version, write_id = (stored.version, stored.write_id) if stored else (0, "")
    if meta.version != version + 1 or replaces != write_id:
        raise VersionConflict(f"session {session_id} is at version {version}; a write of version {meta.version} "
                              "lost a race with another writer")


class DiskStore:
    index_in_memory = True
    """One file per session under `root/sessions/<id>.safetensors`, and an in-memory index of their metadata.

    One process owns a data directory: the index is this process's view, rebuilt from the file headers here. The
    service therefore opens it `exclusive`: a lock on `root/.lock` (released with the process, or by close()) makes
    a second server on the same directory fail at start instead of serving its own stale view.

    `fault_delay_save_s` (ARMT_FAULT_DELAY_SAVE_S, tests only) sleeps between a write's temporary file and its
    rename, so that a crash test can kill the server inside a state write (it waits for the `.tmp` file).
    """

    def __init__(self, root: Path, fault_delay_save_s: float = 0.0, exclusive: bool = False) -> None:
        self.root = Path(root)
        self._before_replace = (lambda: time.sleep(fault_delay_save_s)) if fault_delay_save_s > 0 else None
        self.dir = self.root / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._owner = lock_data_directory(self.root) if exclusive else None
        self._sizes: dict[str, int] = {}
        for leftover in self.dir.glob(".*.tmp"):  # a write interrupted by a crash: never acknowledged
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()  # guards the index and the per-session write locks
        self._writing: dict[str, threading.Lock] = {}
        self._index: dict[str, SessionMeta] = {meta.id: meta for meta in self.scan()}

    def close(self) -> None:
        """Give up the data directory (exclusive stores)."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    def get(self, session_id: str) -> SessionMeta | None:
        return self._index.get(session_id)

    def page(self, tenant: str, after: tuple[int, str] | None, limit: int) -> list[SessionMeta]:
        with self._lock:
            mine = [s for s in self._index.values() if s.tenant == tenant and (after is None or s.sort_key > after)]
        return sorted(mine, key=lambda s: s.sort_key)[:limit]

    def count(self) -> int:
        return len(self._index)

    def count_for(self, tenant: str, at_least: int = 0) -> int:
        with self._lock:
            return sum(meta.tenant == tenant for meta in self._index.values())

    def _path(self, session_id: str) -> Path:
        if not SESSION_ID.match(session_id):  # ids are validated before; this keeps paths safe regardless
            raise ValueError(f"bad session id {session_id!r}")
        return self.dir / f"{session_id}.safetensors"

    def scan(self) -> Iterator[SessionMeta]:
        for path in sorted(self.dir.glob("*.safetensors")):
            if not SESSION_ID.match(path.stem):
                continue
            try:
                meta = SessionMeta.parse(header_metadata(_read_header(path))[SESSION_KEY])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("skipping unreadable session file %s: %s", path, e)
                continue
            self._sizes[meta.id] = path.stat().st_size
            yield meta

    def save(self, meta: SessionMeta, state: MemoryState, replaces: str = "") -> None:
        path = self._path(meta.id)
        data = state.to_bytes({SESSION_KEY: json.dumps(meta.to_json(), sort_keys=True)})
        with self._session_lock(meta.id):  # check, write and publish one version at a time; other sessions go on
            current = self._index.get(meta.id)
            check_version(meta.id, current, meta, replaces)
            try:
                atomic_write(path, data, self._before_replace)
            except OSError as e:
                raise StoreError(f"cannot write session {meta.id}: {e.strerror or e}") from None
            with self._lock:
                self._sizes[meta.id] = len(data)
                self._index[meta.id] = meta

    @contextmanager
    def _session_lock(self, session_id: str) -> Iterator[None]:
        """Hold the session's write lock: its saves and its delete run one at a time (a save already past its version
        check when a delete came would otherwise rename its file back in, and the deleted session return).

        The lock leaves the table when its holder leaves no session behind (a delete, a failed first write): no
        entry per deleted session lingers; a writer that was waiting on that lock meanwhile takes the table's
        current one instead, so that all writers of an id share one lock."""
        while True:
            with self._lock:
                writing = self._writing.setdefault(session_id, threading.Lock())
            with writing:
                with self._lock:
                    current = self._writing.get(session_id) is writing
                if current:
                    try:
                        yield
                    finally:
                        with self._lock:
                            if session_id not in self._index:
                                self._writing.pop(session_id, None)
                    return

    def load(self, session_id: str, fingerprint: str | tuple[str, ...]) -> tuple[SessionMeta, MemoryState]:
        try:
            data = self._path(session_id).read_bytes()
            meta = SessionMeta.parse(header_metadata(data)[SESSION_KEY])
            state = MemoryState.from_bytes(data, fingerprint=fingerprint)
        except StateMismatchError as e:
            raise StateConflict(f"session {session_id} holds a state this server's model cannot use: {e}") from None
        except FileNotFoundError:
            raise SessionNotFound(f"no session {session_id}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"cannot read session {session_id}: {e}") from None
        if meta.state_digest and state.digest() != meta.state_digest:  # damaged on disk: never serve it
            raise StoreError(f"session {session_id}: the stored state does not match its digest")
        return meta, state

    def delete(self, session_id: str) -> None:
        with self._session_lock(session_id):
            try:
                self._path(session_id).unlink(missing_ok=True)
                fsync_dir(self.dir)
            except OSError as e:
                raise StoreError(f"cannot delete session {session_id}: {e.strerror or e}") from None
            with self._lock:
                self._sizes.pop(session_id, None)
                self._index.pop(session_id, None)

    def check(self) -> str | None:
        if not self.dir.is_dir():
            return f"data directory {self.dir} is missing"
        if not os.access(self.dir, os.W_OK | os.X_OK):
            return f"data directory {self.dir} is not writable"
        return None

    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())


def _read_header(path: Path) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file, without its tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"implausible safetensors header length {n}")
        return head + f.read(n)

