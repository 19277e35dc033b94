"""The core's configuration as a plain dataclass; service/settings.py builds it once from the ARMT_* settings
(the service's defaults live there; the ones here serve code that builds it directly, such as tests)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl


@dataclass(frozen=True)
class CoreConfig:
    model_dir: Path
    data_dir: Path
    store: str  # "disk" (files under data_dir) or a Redis URL (a store shared by replicas)
    store_ttl_s: int | None  # shared store: seconds a session lives after its last write; None: forever
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    executor: str  # "diagonal" | "sequential"
    max_append_bytes: int  # one append's body
    append_chunk_bytes: int  # bytes decoded + tokenized + ingested at a time while a body streams in
    max_new_tokens_limit: int
    max_question_chars: int
    max_queue: int  # admitted engine jobs (waiting + running) before 429
    max_batch_sessions: int  # sessions sharing one ingest unit
    unit_segments: int  # segments per session per ingest unit (bounds a question's wait)
    retry_after_seconds: float
    state_cache_size: int  # memory states kept in RAM (the rest are read from the store on use)
    torch_threads: int = 0  # torch CPU threads for the engine; 0: all cores but one (at least one)
    fault_delay_save_s: float = 0.0  # test-only: sleep between a session file's temp write and its rename
    max_queue_per_tenant: int | None = None  # places one tenant may hold (None: no share, one tenant or no keys)
    max_sessions_per_tenant: int = 0  # sessions one tenant may hold (0: no limit)


def redact_url(url: str) -> str:
    """A store URL fit for logs and error messages: no user info (redis://:password@host), no password= query."""
    if "@" in url:  # user info ends at the last @, whatever it holds (a password may contain / ? # or :)
        head, tail = url.rsplit("@", 1)
        scheme = head.split("://", 1)[0] + "://" if "://" in head else ""
        url = f"{scheme}***@{tail}"
    if "?" not in url:
        return url
    base, query = url.split("?", 1)
    pairs = "&".join(f"{k}=***" if k.lower() == "password" else f"{k}={v}" for k, v in parse_qsl(query))
    return f"{base}?{pairs}"
