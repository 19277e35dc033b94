"""Requests and results of the core as plain dataclasses (the HTTP layer converts them to and from JSON)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")  # 128 random bits, hex; the only form ever used in a file name
# A question must hold something besides ASCII whitespace. Written as a character class, not `\S`, so that Python,
# pydantic (Rust) and JSON Schema (ECMA) regexes agree on it: the OpenAPI schema states the same rule.
NON_BLANK = r"[^\t\n\v\f\r ]"


@dataclass(frozen=True)
class LastAppend:
    """The last acknowledged append, kept so that a retry of it (same offset, same bytes) is a no-op."""

    start: int  # document byte offset the append started at
    length: int  # bytes it carried
    sha256: str  # of those bytes
    tokens: int  # the answer it got: tokens and segments after it
    segments: int


# The JSON types of SessionMeta's fields (partial and last_append are decoded by from_json itself).
_FIELD_TYPES = {"id": str, "tenant": str, "model": str, "created_at": (int, float), "updated_at": (int, float),
                "offset": int, "held": str, "tokens": int, "segments": int, "pending_tokens": int,
                "state_bytes": int, "state_digest": str, "version": int, "write_id": str}


@dataclass(frozen=True)
class SessionMeta:
    """Everything about a session except the memory tensors; stored in the same file as the state.

    `held` is the unfinished tail of the text (the last word, see service.core.textstream) and `partial` an
    incomplete UTF-8 sequence at the end of the bytes so far: both wait for the next append.
    """

    id: str
    tenant: str
    model: str  # fingerprint of the model that wrote the state
    created_at: float
    updated_at: float
    offset: int = 0  # bytes of the document acknowledged
    held: str = ""
    partial: bytes = b""
    tokens: int = 0  # tokens in the state (written + pending); the held text is not tokenized yet
    segments: int = 0
    pending_tokens: int = 0
    state_bytes: int = 0
    state_digest: str = ""
    last_append: LastAppend | None = None
    # Bumped by every write. A store writes only over version - 1 (optimistic concurrency): with several replicas
    # on one shared store, the append that lost a race is refused instead of overwriting the winner.
    version: int = 0
    # Random per write: a version number alone names no write once a store rolls back (Redis restarted from an older
    # snapshot, a failover to a lagging replica) and two different writes get the same number. Caches and the
    # store's compare-and-set check both.
    write_id: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["partial"] = self.partial.hex()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SessionMeta":
        # fields a newer version added are dropped: during a rolling update old and new replicas share one store
        d = {k: v for k, v in d.items() if k in _META_FIELDS}
        d["partial"] = bytes.fromhex(d.get("partial", ""))
        last = d.get("last_append")
        d["last_append"] = LastAppend(**last) if last else None
        return cls(**d)

    @classmethod
    def parse(cls, raw: str | bytes) -> "SessionMeta":
        """Stored JSON -> SessionMeta; anything malformed (not JSON, not an object, fields missing or of the wrong
        type) is a ValueError, so that a store reports one damaged session instead of failing as a whole."""
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError(f"session metadata is a JSON {type(d).__name__}, not an object")
            meta = cls.from_json(d)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed session metadata: {e!r}") from None
        for f in fields(cls):  # a wrong type that is valid JSON ("created_at": "2026-12-01") would fail later
            value, kinds = getattr(meta, f.name), _FIELD_TYPES.get(f.name)
            if kinds and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise ValueError(f"malformed session metadata: {f.name} is {value!r}")
        return meta

    def evolve(self, **changes) -> "SessionMeta":
        return replace(self, **changes)

    @property
    def sort_key(self) -> tuple[int, str]:
        return int(self.created_at * 1_000_000), self.id


_META_FIELDS = {f.name for f in fields(SessionMeta)}


@dataclass(frozen=True)
class AppendResult:
    offset: int
    tokens: int
    segments: int


@dataclass(frozen=True)
class SessionPage:
    sessions: list[SessionMeta]
    next_cursor: str | None


@dataclass(frozen=True)
class AskParams:
    """A question and its sampling settings (validated by `SessionService.ask`)."""

    question: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_hop: int | None = None  # ACT models only: hop limit per layer for this answer


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer as it streams (never a split UTF-8 character)."""

    text: str


@dataclass(frozen=True)
class AnswerDone:
    answer: str
    finish_reason: str  # "stop" (eos or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    mean_hops: float | None = None  # ACT models: hops per layer actually used (mean over tokens and layers)
