"""All of the service's settings in one place: `Settings` (pydantic-settings, environment prefix `ARMT_`).

Defaults live only here; Dockerfiles and manifests override them through the environment. `to_core()` converts
them once into the core's plain dataclass, so nothing below service/http reads the environment.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.config import CoreConfig, redact_url

DEMO_MODEL_DIR = Path(".cache/demo-model")
MiB = 1024 * 1024
# a key of printable ASCII but ',' and '=' (HTTP headers arrive as Latin-1: a non-ASCII key could never match)
_KEY_ITEM = re.compile(r"^([!-+\--<>-~]+)=([A-Za-z0-9_.\-]+)$")


def default_model_dir() -> Path:
    """The trained default model when this checkout has one (`model.default_model_path()`), else the demo model.

    Imported lazily: the default model and its helper may not exist in every checkout. The demo model
    (`.cache/demo-model`, untrained, random answers) is created by `armt serve` when missing.
    """
    try:
        from model import default_model_path  # type: ignore[attr-defined]

        path = Path(default_model_path())
        if (path / "armt_config.json").is_file():
            return path
    except (ImportError, AttributeError, OSError, TypeError):
        pass
    return DEMO_MODEL_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARMT_", extra="ignore", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: Path | None = Field(None, description="model directory; default: the trained default model, "
                                                  "else .cache/demo-model")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # sequential: bit-exact chunk invariance (equal state_digest however a document is split), sessions share
    # ingest units one after another. diagonal: concurrent sessions share one batched pipeline (ingest_many),
    # faster, but the batch composition changes float rounding (~1e-10), so digests can differ between splits.
    executor: Literal["diagonal", "sequential"] = "sequential"
    data_dir: Path = Path(".cache/armt-data")
    # "disk": one file per session under data_dir, for one process. redis://host:port/db (or rediss://, unix://):
    # a store shared by several replicas (service/core/redis_store.py); data_dir is then unused.
    store: str = "disk"
    store_ttl_s: int | None = Field(None, ge=1, description="shared store only: a session expires this many "
                                                             "seconds after its last write; unset: never")
    api_keys: str = Field("", description="'key1=tenantA,key2=tenantB'; empty: no auth, one tenant 'default'")
    max_append_bytes: int = Field(8 * MiB, ge=1)
    append_chunk_bytes: int = Field(1 * MiB, ge=1024)
    max_new_tokens_limit: int = Field(1024, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    max_question_chars: int = Field(16_384, ge=1, le=1_000_000)
    max_queue: int = Field(64, ge=1)
    # Places of the engine queue one tenant may hold at once; 0: half the queue when ARMT_API_KEYS names two or more
    # tenants (so that one cannot lock the others out, with slow uploads say), else no share.
    max_queue_per_tenant: int = Field(0, ge=0)
    # Sessions one tenant may hold (each stores a whole memory state, ~400 KB for the default model); 0: no limit.
    max_sessions_per_tenant: int = Field(10_000, ge=0)
    max_batch_sessions: int = Field(16, ge=1)
    ingest_unit_segments: int = Field(16, ge=1)
    retry_after_seconds: int = Field(1, ge=1)
    state_cache_size: int = Field(64, ge=0)
    sse_ping_seconds: float = Field(15.0, gt=0)
    # After SIGTERM, how long a streamed answer may go on before it ends with an `error` event (shutting_down).
    shutdown_grace_seconds: float = Field(5.0, ge=0)
    # Threads of torch's CPU kernels (torch.set_num_threads) in the engine; 0: all cores but one, so that the
    # HTTP event loop always has a core to answer on (and to refuse with a fast 429 under overload).
    torch_threads: int = Field(0, ge=0)
    # HTTP request limits (service/http/limits.py): a JSON body's size, and the longest wait for the next piece
    # of any request body before a 408 (a stalled upload must not hold a request open forever).
    max_json_bytes: int = Field(1 * MiB, ge=1024)
    body_timeout_seconds: float = Field(30.0, gt=0)
    # Test-only fault injection (tests/test_crash_consistency.py, bench/crash_harness.py): the disk store sleeps this
    # long between writing a session's temporary file and renaming it, so a SIGKILL can land inside a state write.
    fault_delay_save_s: float = Field(0.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value != "disk" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("ARMT_STORE must be 'disk' or a redis://, rediss:// or unix:// URL, "
                             f"got {redact_url(value)!r}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str) -> str:
        for number, item in enumerate(filter(None, (part.strip() for part in value.split(","))), 1):
            if not _KEY_ITEM.match(item):  # the message must not quote the item: it holds a secret
                raise ValueError(f"ARMT_API_KEYS item {number} is not KEY=TENANT (a key of printable ASCII without "
                                 "spaces, commas or '='; a tenant of letters, digits, '_', '.', '-')")
            if item.startswith("replace-me"):  # deploy/k8s/common/secret.yaml's placeholder, deployed as it is
                raise ValueError(f"ARMT_API_KEYS item {number} is the placeholder of the example secret: put a "
                                 "random key there (e.g. `openssl rand -hex 24`)")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> "Settings":
        if self.store_ttl_s is not None and self.store == "disk":  # silently ignoring it would keep data forever
            raise ValueError("ARMT_STORE_TTL_S applies to a Redis store (ARMT_STORE=redis://...), not to 'disk'")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"ARMT_DEFAULT_MAX_NEW_TOKENS ({self.default_max_new_tokens}) is over "
                             f"ARMT_MAX_NEW_TOKENS_LIMIT ({self.max_new_tokens_limit})")
        return self

    def tenants(self) -> dict[str, str]:
        """API key -> tenant; empty when authentication is off."""
        pairs = (part.strip().split("=", 1) for part in self.api_keys.split(",") if part.strip())
        return {key: tenant for key, tenant in pairs}

    def model_dir(self) -> Path:
        return self.model if self.model is not None else default_model_dir()

    def to_core(self) -> CoreConfig:
        return CoreConfig(
            model_dir=self.model_dir(), data_dir=self.data_dir, store=self.store, store_ttl_s=self.store_ttl_s,
            device=self.device, dtype=self.dtype,
            executor=self.executor, max_append_bytes=self.max_append_bytes,
            append_chunk_bytes=self.append_chunk_bytes, max_new_tokens_limit=self.max_new_tokens_limit,
            max_question_chars=self.max_question_chars, max_queue=self.max_queue,
            max_batch_sessions=self.max_batch_sessions, unit_segments=self.ingest_unit_segments,
            retry_after_seconds=float(self.retry_after_seconds), state_cache_size=self.state_cache_size,
            fault_delay_save_s=self.fault_delay_save_s, torch_threads=self.torch_threads,
            max_sessions_per_tenant=self.max_sessions_per_tenant,
            max_queue_per_tenant=self.max_queue_per_tenant or (
                max(1, self.max_queue // 2) if len(set(self.tenants().values())) > 1 else None),
        )
