"""Request and response bodies (pydantic). Conversions from core dataclasses live next to the models."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from service.core.sessions import MAX_HOP_LIMIT
from service.core.types import NON_BLANK, AnswerDone, AppendResult, SessionMeta

# Stop strings are searched for after every decoded token: at most 16 of at most 1000 characters (empty: ignored).
StopText = Annotated[str, Field(max_length=1000)]
Stop = Annotated[list[StopText], Field(max_length=16)] | StopText | None
STOP = Field(None, description="stop when the answer contains one (trimmed); up to 16")


def _json_number(value):
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON number")
    return value


# Request bodies are strict (model_config below): JSON `true` is not the integer 1 and "5" is not 5, as in their
# JSON Schema. Integers alone are lax, because JSON Schema's integer includes 5.0; booleans and strings stay out.
def json_int(**constraints):
    return Annotated[int, Field(strict=False, **constraints), BeforeValidator(_json_number)]


TokenLimit = json_int(ge=1)  # the upper bound is ARMT_MAX_NEW_TOKENS_LIMIT, written into the schema by openapi.py
Seed = json_int(ge=-(2**63), le=2**64 - 1)  # the range of torch.Generator.manual_seed
HopLimit = json_int(ge=1, le=MAX_HOP_LIMIT)  # ACT models only


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
    last_append_offset: int | None = Field(None, description="where the last append started (its bytes end at "
                                                             "`offset`; sent again there, they are a no-op retry)")

    @classmethod
    def of(cls, m: SessionMeta) -> "SessionOut":
        return cls(id=m.id, offset=m.offset, tokens=m.tokens, segments=m.segments, pending_tokens=m.pending_tokens,
                   held_chars=len(m.held), state_bytes=m.state_bytes, state_digest=m.state_digest, model=m.model,
                   created_at=_iso(m.created_at), updated_at=_iso(m.updated_at),
                   last_append_offset=m.last_append.start if m.last_append else None)


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
    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, max_length=1_000_000, pattern=NON_BLANK,
                          description="not blank; at most ARMT_MAX_QUESTION_CHARS characters")
    max_new_tokens: TokenLimit | None = Field(None, description="1..ARMT_MAX_NEW_TOKENS_LIMIT; "
                                                                "default ARMT_DEFAULT_MAX_NEW_TOKENS")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Stop = STOP
    stream: bool = False
    seed: Seed | None = None
    max_hop: HopLimit | None = Field(None, description="models trained with adaptive computation time "
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


class ContentPart(BaseModel):
    """An OpenAI content part; only `text` parts carry the question, others (images, ...) are ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | Annotated[list[ContentPart], Field(max_length=1024)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ChatIn(BaseModel):
    """OpenAI chat.completions request; the session comes in `session_id` (extra_body in OpenAI clients)."""

    model_config = ConfigDict(extra="allow", strict=True)

    session_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    model: str | None = None
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    # OpenAI takes null for every optional field (some clients send it): null means the default
    temperature: float | None = Field(0.0, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(1.0, ge=0, le=1)  # 0 (OpenAI allows it): greedy
    stop: Stop = STOP
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    n: json_int(ge=1, le=1) | None = 1

    @model_validator(mode="after")
    def _refuse_what_is_not_served(self) -> "ChatIn":
        """Other fields are ignored, but not OpenAI features that would change the answer or its shape: a client
        asking for log-probabilities, tools, JSON output or penalties gets a 422 rather than an answer without them."""
        for name, value in (self.model_extra or {}).items():
            if name in NOT_SERVED and value not in NOT_SERVED[name]:
                raise ValueError(f"{name} is not supported by this server (only plain text answers)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


# OpenAI chat fields this server does not implement -> the values that ask for nothing (accepted)
NOT_SERVED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,),
}


def stop_tuple(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)
