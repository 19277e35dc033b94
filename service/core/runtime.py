"""The running core: loads the model off the request path, then starts the worker and the session service.

`start()` returns at once and loads in a thread, so that the server answers /health with 503 while a large model
loads (a probe can tell "loading" from "dead"); `sessions` is None until the model is ready.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from .config import CoreConfig, redact_url
from .errors import NotReady, StoreError
from .scheduler import Scheduler
from .sessions import SessionService
from .stats import ServiceStats
from .store import DiskStore, SessionStore
from .worker import EngineWorker

log = logging.getLogger("armt.runtime")
GIL_SWITCH_INTERVAL_S = 0.001


class Runtime:
    def __init__(self, config: CoreConfig) -> None:
        self.cfg = config
        self.stats = ServiceStats()
        self.status = "starting"  # starting -> loading -> ready | failed
        self.error: str | None = None
        self.model = None
        self.store: SessionStore | None = None
        self.scheduler: Scheduler | None = None
        self.worker: EngineWorker | None = None
        self.sessions: SessionService | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # The engine thread runs Python between torch calls while holding the GIL; the event loop thread waits up
        # to the switch interval (5 ms by default) each time it needs the GIL back. 1 ms keeps request handling
        # (first tokens, fast 429s) responsive under load (measured with bench/loadgen.py: README "Reliability").
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._load, name="armt-load", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (tests, CLI); True when ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status == "ready"

    def _load(self) -> None:
        self.status = "loading"
        try:
            start = time.perf_counter()
            model = load_model(self.cfg)
            try:
                store = open_store(self.cfg)
            except Exception as e:
                if self.cfg.store == "disk":  # its own words (a directory in use, a permission): no secret there
                    raise
                # a Redis URL's parse error may quote pieces of it (a password): never shown, nor logged
                log.error("cannot open the session store %s (%s): check the URL's syntax; a password holding / ? # "
                          "or @ must be percent-encoded", redact_url(self.cfg.store), type(e).__name__)
                raise StoreError(f"cannot open the session store {redact_url(self.cfg.store)} (see the server "
                                 "log)") from None
            scheduler = Scheduler(self.cfg.max_queue, self.cfg.max_batch_sessions, self.cfg.retry_after_seconds,
                                  self.cfg.max_queue_per_tenant)
            worker = EngineWorker(model, scheduler, self.stats, self.cfg.executor, self.cfg.unit_segments)
            sessions = SessionService(model, store, scheduler, self.stats, self.cfg)
            worker.start()
        except Exception as e:  # reported by /health; the process stays up so that the reason is visible
            log.exception("model load failed")
            self.error, self.status = f"{type(e).__name__}: {e}", "failed"
            return
        self.model, self.store, self.scheduler, self.worker = model, store, scheduler, worker
        self.sessions = sessions
        self.status = "ready"
        where = self.cfg.data_dir if self.cfg.store == "disk" else redact_url(self.cfg.store)
        log.info("model %s loaded from %s in %.1fs; sessions in %s (%s)", model.fingerprint, self.cfg.model_dir,
                 time.perf_counter() - start, where, store.check() or "ok")

    def require(self) -> SessionService:
        if self.sessions is None:
            if self.status == "failed":
                raise NotReady(f"the server failed to start: {self.error}")
            raise NotReady(f"the model is {self.status}")
        return self.sessions

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.store is not None:
            self.store.close()


def open_store(cfg: CoreConfig) -> SessionStore:
    """The disk store by default; a Redis store (imported only then) for ARMT_STORE=redis://..."""
    if cfg.store == "disk":
        return DiskStore(cfg.data_dir, fault_delay_save_s=cfg.fault_delay_save_s, exclusive=True)
    from .redis_store import RedisStore

    return RedisStore.from_url(cfg.store, cfg.store_ttl_s)  # connects on first use: /ready tells if it cannot


def load_model(cfg: CoreConfig):
    import torch

    from model import ArmtModel

    torch.set_num_threads(engine_threads(cfg.torch_threads))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    model = ArmtModel.from_pretrained(cfg.model_dir, device=cfg.device, dtype=dtype)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model_dir} has no tokenizer.json: the HTTP service takes text and needs one")
    # users' text is text: "<|endoftext|>" in a document or question stays those characters, never the EOS token
    model.tokenizer.encode_special_tokens = True
    vocab = model.tokenizer.get_vocab_size()
    if vocab > model.base.vocab_size:
        raise ValueError(f"tokenizer has {vocab} tokens but the model's vocabulary is {model.base.vocab_size}")
    return model


def engine_threads(requested: int) -> int:
    """torch's CPU threads: as requested, else all cores but one (the HTTP event loop's), at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return requested if requested > 0 else max(1, cores - 1)
