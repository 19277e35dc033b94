"""One question being answered: the bridge between the engine worker thread and the request's event loop.

The worker calls `on_token` / `on_done` on its own thread; they turn token ids into text (AnswerText: whole
characters only, trimmed at a stop string) and hand events to the loop with call_soon_threadsafe. The request
reads them from `events()`; leaving or closing that iterator early (client disconnect) sets the job's cancel flag,
and the worker drops the job before its next decode step.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from model.act import ActStats

from .errors import ArmtServiceError
from .scheduler import GenerateJob
from .textstream import AnswerText
from .types import AnswerDone, AskParams, TextDelta

_END = object()


class AnswerRun:
    def __init__(self, tokenizer, state, prompt_ids: list[int], params: AskParams,
                 loop: asyncio.AbstractEventLoop, act: bool = False) -> None:
        self.text = AnswerText(tokenizer, params.stop)
        self.prompt_tokens = len(state.pending) + len(prompt_ids)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.act_stats = ActStats() if act else None
        self.job = GenerateJob(state, prompt_ids, params.max_new_tokens, params.temperature, params.top_p,
                               params.seed, self._on_token, self._on_done, params.max_hop, self.act_stats)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            pass

    def _on_token(self, token_id: int) -> bool:
        delta = self.text.add(token_id)
        if delta:
            self._put(TextDelta(delta))
        return not self.text.stopped

    def _on_done(self, reason: str | None, error: BaseException | None) -> None:
        if error is not None:
            self._put(error)
            return
        tail = self.text.flush()
        if tail:
            self._put(TextDelta(tail))
        hops = round(self.act_stats.mean_hops, 3) if self.act_stats is not None else None
        reason = "stop" if self.text.stopped else reason or "stop"  # a stop string may complete only in flush
        self._put(AnswerDone(self.text.text, reason, self.prompt_tokens, len(self.text.ids), hops))
        self._put(_END)

    def events(self) -> "AnswerEvents":
        """Text deltas, then one AnswerDone; raises the worker's error (an ArmtServiceError or a bug)."""
        return AnswerEvents(self)

    async def _events(self) -> AsyncIterator[TextDelta | AnswerDone]:
        try:
            while True:
                item = await self.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item if isinstance(item, ArmtServiceError) else RuntimeError("decoding failed") from item
                yield item
        finally:
            self.job.cancel.set()  # no-op when finished; stops decoding when the client left early


class AnswerEvents:
    """An answer's events, as an async iterator whose aclose() stops the decoding also when iteration never began:
    a client gone before its stream's first read (an async generator that never started runs no cleanup, and the
    engine would decode the whole answer for nobody, holding its queue place)."""

    def __init__(self, run: AnswerRun) -> None:
        self._job = run.job
        self._events = run._events()

    def __aiter__(self) -> "AnswerEvents":
        return self

    async def __anext__(self) -> TextDelta | AnswerDone:
        return await anext(self._events)

    async def aclose(self) -> None:
        self._job.cancel.set()  # no-op when finished
        await self._events.aclose()


async def collect(events: AsyncIterator[TextDelta | AnswerDone]) -> AnswerDone:
    """The whole answer of a non-streaming request."""
    done = None
    async for event in events:
        if isinstance(event, AnswerDone):
            done = event
    assert done is not None
    return done
