"""Request and response bodies (pydantic). Conversions from core dataclasses live next to the models."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.types import AnswerDone, AppendResult, SessionMeta


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class SessionOut(BaseModel):
    id: str
    offset: int = Field(description="bytes of the document acknowledged; the next append must name this")
    tokens: int = Field(description="tokens in the memory state (written + pending); held-back text excluded")
    segments: int
    pending_tokens: int
    held_chars: int = Field(description="characters held back until the next word boundary")
    state_bytes: int = Field(description="size of the memory (A and z); independent of the document length")
    state_digest: str = Field(description="sha256 of the serialized state: equal digest = identical memory")
    model: str = Field(description="fingerprint of the model that wrote the state")
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, m: SessionMeta) -> "SessionOut":
        return cls(id=m.id, offset=m.offset, tokens=m.tokens, segments=m.segments, pending_tokens=m.pending_tokens,
                   held_chars=len(m.held), state_bytes=m.state_bytes, state_digest=m.state_digest, model=m.model,
                   created_at=_iso(m.created_at), updated_at=_iso(m.updated_at))


class SessionList(BaseModel):
    sessions: list[SessionOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class AppendOut(BaseModel):
    offset: int
    tokens: int
    segments: int

    @classmethod
    def of(cls, r: AppendResult) -> "AppendOut":
        return cls(offset=r.offset, tokens=r.tokens, segments=r.segments)


class AskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=1_000_000)
    max_new_tokens: int | None = Field(None, ge=1, description="1..ARMT_MAX_NEW_TOKENS_LIMIT; "
                                                               "default ARMT_DEFAULT_MAX_NEW_TOKENS")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = Field(None, description="stop when the answer contains one (trimmed)")
    stream: bool = False
    seed: int | None = None
    max_hop: int | None = Field(None, ge=1, le=64, description="models trained with adaptive computation time "
                                "only: most hops per layer for this answer (the inference-time compute knob)")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AskOut(BaseModel):
    answer: str
    finish_reason: Literal["stop", "length"]
    usage: UsageOut
    mean_hops: float | None = Field(None, description="ACT models: hops per layer used (mean over tokens, layers)")

    @classmethod
    def of(cls, d: AnswerDone) -> "AskOut":
        return cls(answer=d.answer, finish_reason=d.finish_reason, mean_hops=d.mean_hops,
                   usage=UsageOut(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatIn(BaseModel):
    """OpenAI chat.completions request; the session comes in `session_id` (extra_body in OpenAI clients)."""

    model_config = ConfigDict(extra="allow")

    session_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)


def stop_tuple(stop: list[str] | str | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)
