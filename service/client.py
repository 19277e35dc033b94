"""A small synchronous Python client for the HTTP API (httpx), and a resumable file upload on top of it.

    with ArmtClient("http://127.0.0.1:8000", api_key="...") as c:
        sid = c.create_session()["id"]
        ingest_file(c, "book.txt", sid)                 # any size, resumes from the server's offset
        for event in c.ask_stream(sid, "Who is Mary?"):
            print(event.get("text", ""), end="")
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

RETRYABLE_STATUS = (429, 502, 503, 504)


class ArmtHTTPError(Exception):
    """A non-2xx answer: `status`, the error `code` and `message` of the body, and the whole `body`."""

    def __init__(self, status: int, body: dict, retry_after: float | None = None) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status, self.body, self.retry_after = status, body, retry_after
        self.code, self.message = err.get("code", "http_error"), err.get("message", str(body))
        super().__init__(f"HTTP {status} {self.code}: {self.message}")


class ArmtClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "ArmtClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response):
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:  # not an armt answer (a proxy's error page, another web server): one short line
                snippet = " ".join(response.text.split())[:120]
                body = {"error": {"code": "http_error", "message": f"not an armt server's answer ({response.url}): "
                                                                  f"{snippet}"}}
            retry = response.headers.get("retry-after")
            raise ArmtHTTPError(response.status_code, body, float(retry) if retry and retry.isdigit() else None)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # a 2xx that is not JSON: not an armt server (a proxy's page, another service)
            message = f"the answer is not JSON (is {response.url} an armt server?)"
            raise ArmtHTTPError(response.status_code, {"error": {"code": "not_json", "message": message}}) from None

    # ------------------------------------------------------------------ sessions
    def health(self) -> dict:
        return self.http.get("/health").json()

    def create_session(self) -> dict:
        return self._json(self.http.post("/v1/sessions"))

    def list_sessions(self, limit: int = 100, cursor: str | None = None) -> dict:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return self._json(self.http.get("/v1/sessions", params=params))

    def iter_sessions(self) -> Iterator[dict]:
        cursor = None
        while True:
            page = self.list_sessions(cursor=cursor)
            yield from page["sessions"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def get_session(self, session_id: str) -> dict:
        return self._json(self.http.get(f"/v1/sessions/{session_id}"))

    def delete_session(self, session_id: str) -> None:
        self._json(self.http.delete(f"/v1/sessions/{session_id}"))

    def append(self, session_id: str, offset: int, data: bytes) -> dict:
        """Append `data` at byte `offset` of the document; ArmtHTTPError 409 carries the current offset."""
        return self._json(self.http.post(f"/v1/sessions/{session_id}/append", params={"offset": offset},
                                         content=data, headers={"Content-Type": "text/plain; charset=utf-8"}))

    # ------------------------------------------------------------------ questions
    def ask(self, session_id: str, question: str, **params) -> dict:
        """The whole answer: {"answer", "finish_reason", "mean_hops", "usage"}."""
        return self._json(self.http.post(f"/v1/sessions/{session_id}/ask",
                                         json={"question": question, **params, "stream": False}))

    def ask_stream(self, session_id: str, question: str, **params) -> Iterator[dict]:
        """Server-sent events as dicts: {"event": "token", "text"}, then {"event": "done", "answer", ...}."""
        body = {"question": question, **params, "stream": True}
        with self.http.stream("POST", f"/v1/sessions/{session_id}/ask", json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            for name, data in parse_sse(sse_lines(response.iter_text())):
                event = {"event": name or "message", **json.loads(data)}
                if name == "error":
                    raise ArmtHTTPError(500, event)
                yield event


_SSE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_lines(chunks: Iterator[str]) -> Iterator[str]:
    """Lines of an event stream, broken at CR LF, CR or LF only (SSE's rule): httpx's iter_lines also breaks at
    U+0085, U+2028 and U+2029, which may stand unescaped in a JSON string of the data."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        held = "\r" if buf.endswith("\r") else ""  # its LF may come with the next chunk
        lines = _SSE_BREAK.split(buf[: len(buf) - len(held)])
        buf = lines.pop() + held  # the unfinished last line
        yield from lines
    if buf:
        yield buf.removesuffix("\r")


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(event name, data) per server-sent event; comments (`: ping`) are skipped."""
    name, data = None, []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield name, "\n".join(data)


def ingest_file(client: ArmtClient, path: str | Path, session_id: str, chunk_bytes: int = 1 << 20,
                progress: Callable[[int, int], None] | None = None, max_retries: int = 8,
                sleep: Callable[[float], None] = time.sleep) -> dict:
    """Upload a file to a session from the server's current offset, chunk by chunk; resumable.

    The server's offset is the truth: after a 409, a dropped connection or a restart, the upload continues from
    the offset the server acknowledged (the file is seeked there). Connection errors, 429, 502, 503 and 504 are
    retried with exponential backoff (honouring Retry-After); `progress(done_bytes, total_bytes)` after every chunk.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    path = Path(path)
    total = path.stat().st_size
    offset, failures, conflicts, result = _offset(client, session_id, total), 0, 0, None
    with open(path, "rb") as f:
        if offset:
            _check_same_document(client, session_id, f, path, sleep, max_retries)
            if progress:  # a resume starts where the server is, not at 0
                progress(offset, total)
        while offset < total:
            f.seek(offset)
            chunk = f.read(chunk_bytes)
            try:
                result = client.append(session_id, offset, chunk)
                offset, failures, conflicts = result["offset"], 0, 0
            except (httpx.TransportError, ArmtHTTPError) as e:
                if isinstance(e, ArmtHTTPError) and e.status == 409 and "offset" in e.body.get("error", {}):
                    # someone (an earlier attempt) got further: resume there. 409s in a row mean writers that
                    # keep disagreeing (a concurrent uploader, servers that do not share a store): back off, give up
                    if conflicts >= max_retries:
                        raise
                    if conflicts:
                        sleep(_backoff(e, conflicts))
                    conflicts += 1
                    offset = e.body["error"]["offset"]
                    if offset > total:  # as at the start: another writer made the session something else
                        raise ValueError(f"the session now holds {offset} bytes but the file has only {total}") from e
                    if progress:
                        progress(offset, total)
                    continue
                if isinstance(e, ArmtHTTPError) and e.status not in RETRYABLE_STATUS or failures >= max_retries:
                    raise
                failures += 1
                sleep(_backoff(e, failures))
                offset = _offset(client, session_id, total, sleep, max_retries)
            if progress:
                progress(offset, total)
    if result is not None and result["offset"] == total:
        return result
    return client.get_session(session_id)  # the last answer was lost (the server had stored it) or came earlier


def _check_same_document(client: ArmtClient, session_id: str, f, path: Path, sleep, max_retries: int) -> None:
    """Resuming continues the *same* file: its bytes where the session's last append stands are sent there again,
    a no-op when they are the ones the session holds and a 409 when they are not (another file: adding a second
    document to a session is an append at its offset, not a resume). Retried like the upload itself; a 409 whose
    session moved on meanwhile (another writer) is checked again at the new place."""
    for attempt in range(max_retries + 1):
        info = client.get_session(session_id)
        start, end = info.get("last_append_offset"), info["offset"]
        if start is None:
            return
        f.seek(start)
        try:
            client.append(session_id, start, f.read(end - start))
            return
        except (httpx.TransportError, ArmtHTTPError) as e:
            if isinstance(e, ArmtHTTPError) and e.status == 409 and e.body.get("error", {}).get("offset") == end:
                raise ValueError(f"{path} is not the document session {session_id} holds (its bytes {start}..{end} "
                                 "differ); --session resumes the same file") from None
            retryable = not isinstance(e, ArmtHTTPError) or e.status in RETRYABLE_STATUS or e.status == 409
            if not retryable or attempt == max_retries:
                raise
            sleep(_backoff(e, attempt + 1))


def _backoff(error: Exception, failures: int) -> float:
    hint = getattr(error, "retry_after", None)
    return hint if hint else min(30.0, 0.5 * 2 ** (failures - 1))


def _offset(client: ArmtClient, session_id: str, total: int, sleep=time.sleep, retries: int = 8) -> int:
    for attempt in range(retries + 1):
        try:
            offset = client.get_session(session_id)["offset"]
            break
        except (httpx.TransportError, ArmtHTTPError) as e:
            if isinstance(e, ArmtHTTPError) and e.status not in RETRYABLE_STATUS or attempt == retries:
                raise
            sleep(_backoff(e, attempt + 1))
    if offset > total:
        raise ValueError(f"the session already holds {offset} bytes but the file has only {total}")
    return offset
