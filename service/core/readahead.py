"""An append's body, read ahead while the engine writes the chunk before it.

The engine writes an append chunk by chunk (ARMT_APPEND_CHUNK_BYTES, about 30 s for 1 MiB with the default model
on 2 CPU cores). Were the body read only between chunks, a client that goes away mid-upload would be noticed only
once the current chunk is written: up to a chunk of engine time spent on an append that can never be stored, with
every other append and question waiting behind it. Reading on meanwhile notices the disconnect, or a stalled body,
at once, and the caller drops the engine job (`first_of(job, reader.failed)`).

The read-ahead is bounded (`max_bytes`, one chunk): an ASGI server reports a disconnect only through the next read,
so a client that is a whole chunk or more ahead of the engine (a fast upload) is noticed only when the engine
reaches the chunk being read, as before. It helps a client slower than the engine, whose engine work would
otherwise wait for its next chunk's bytes and then run a whole chunk for nothing.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

from .errors import Cancelled

_END = object()


class ReadAhead:
    """Iterates the body's chunks like the body itself, while a task keeps reading up to `max_bytes` ahead."""

    def __init__(self, body: AsyncIterable[bytes], max_bytes: int) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._max, self._buffered, self._closed = max_bytes, 0, False
        self._drained = asyncio.Condition()
        self.failed: asyncio.Future = asyncio.get_running_loop().create_future()  # the read's error, if any
        self._task = asyncio.create_task(self._pump(body))

    async def _pump(self, body: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in body:
                if self._closed:  # a cancellation lost in a read that completed at the same time
                    return
                async with self._drained:  # at most max_bytes (+ one message) waiting for the reader
                    await self._drained.wait_for(lambda: self._closed or self._buffered < self._max)
                    self._buffered += len(chunk)
                self._queue.put_nowait(chunk)
            self._queue.put_nowait(_END)
        except Exception as e:  # the client went away (Cancelled), stalled (408), ...: for the reader to raise
            self.failed.set_exception(e)
            self.failed.exception()  # retrieved: no "never retrieved" warning if nobody waits on it
            self._queue.put_nowait(e)
        except asyncio.CancelledError:  # close(), or the loop shutting down: a waiting reader must not wait forever
            self._queue.put_nowait(Cancelled("the request body's reader was cancelled"))
            raise

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end too
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        async with self._drained:
            self._buffered -= len(item)
            self._drained.notify_all()
        return item

    async def close(self, grace: float = 1.0) -> None:
        """Stop reading (the append ended, or failed for another reason). Never waits long: a read that swallowed
        the cancellation (asyncio.wait_for completing at the same moment) ends on its own at the next message, the
        `closed` flag, or the body timeout, without holding the session's lock meanwhile."""
        self._closed = True
        async with self._drained:
            self._drained.notify_all()
        deadline = asyncio.get_running_loop().time() + grace
        while not self._task.done() and asyncio.get_running_loop().time() < deadline:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=0.05)


async def first_of(job: asyncio.Future, failed: asyncio.Future):
    """job's result, unless `failed` fails first: then job is cancelled and failed's error raised. Cancelling
    the waiter cancels the job too."""
    try:
        await asyncio.wait({job, failed}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.cancel()
        raise
    if not job.done():
        job.cancel()
        raise failed.exception()
    return job.result()
