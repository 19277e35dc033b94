"""Bytes -> text -> token-ready pieces, chunk-invariantly; and token ids -> answer text with stop strings.

An append's bytes can end inside a UTF-8 character or inside a word. `Utf8Stream` keeps an incomplete trailing
byte sequence for the next append and reports invalid bytes by their absolute position in the document.
`ReadyText` keeps back the last (unfinished) word: the text before it tokenizes the same whatever follows
(model.text.split_ready), so a document appended in any pieces gives the same tokens as appended whole.

Limit: a stretch longer than MAX_HELD_CHARS characters with no cut point (no whitespace followed by a
non-whitespace character) is force-cut every MAX_HELD_CHARS characters, counted from its start. The cut positions
depend only on the document, so chunk invariance holds, but the tokens at a forced cut differ from tokenizing the
stretch whole. This bounds the text a session keeps in its metadata.
"""
from __future__ import annotations

import re

from model.text import WHITESPACE, split_ready

from .errors import InvalidText

MAX_HELD_CHARS = 65_536

_WS = "".join(sorted(WHITESPACE)).replace("\\", "\\\\").replace("]", "\\]").replace("^", "\\^").replace("-", "\\-")
_CUT = re.compile(f"[{_WS}](?=[^{_WS}])")  # a cut point: whitespace followed by a non-whitespace character
# A stretch between cut points is at most three runs (whitespace, word, whitespace): with no run this long, no
# stretch can exceed MAX_HELD_CHARS and split_ready alone is exact.
_LONG = re.compile(f"[{_WS}]{{{MAX_HELD_CHARS // 3},}}|[^{_WS}]{{{MAX_HELD_CHARS // 3},}}")


class Utf8Stream:
    """Incremental strict UTF-8 decoding that knows the absolute document offset of every byte."""

    def __init__(self, partial: bytes, offset: int) -> None:
        self.partial = partial  # incomplete sequence carried over (at most 3 bytes)
        self.offset = offset  # document offset of the first byte after `partial`

    def feed(self, data: bytes) -> str:
        buf = self.partial + data
        base = self.offset - len(self.partial)
        self.offset += len(data)
        try:
            text, self.partial = buf.decode("utf-8"), b""
            return text
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(buf) - e.start < 4:
                self.partial = buf[e.start:]  # a character cut by the chunk boundary: wait for its rest
                return buf[: e.start].decode("utf-8")
            position = base + e.start
            raise InvalidText(f"invalid UTF-8 at byte {position} of the document ({e.reason})",
                              position=position) from None


class ReadyText:
    """Splits incoming text into pieces that tokenize independently and the held-back unfinished tail."""

    def __init__(self, held: str) -> None:
        self.held = held

    def feed(self, text: str) -> list[str]:
        """Pieces to tokenize one by one (usually one); the rest stays in `self.held`."""
        buf = self.held + text
        if not _LONG.search(buf):  # fast path: no stretch can exceed the limit
            ready, self.held = split_ready(buf)
            return [ready] if ready else []
        return self._feed_slow(buf)

    def _feed_slow(self, buf: str) -> list[str]:
        """Cut point by cut point, force-cutting stretches over MAX_HELD_CHARS; the same cuts as the text
        appended whole (a forced cut is decided only once more than MAX_HELD_CHARS characters are known)."""
        pieces: list[str] = []
        group = start = 0  # start of the current tokenization group / of the current stretch
        cuts: list[int | None] = [m.start() for m in _CUT.finditer(buf) if m.start() > 0]
        for cut in cuts + [None]:
            end = len(buf) if cut is None else cut
            while end - start > MAX_HELD_CHARS:  # tokenized apart from what follows
                start += MAX_HELD_CHARS
                pieces.append(buf[group:start])
                group = start
            if cut is not None:
                start = cut
        if start > group:
            pieces.append(buf[group:start])
        self.held = buf[start:]
        return pieces


class AnswerText:
    """Token ids -> text deltas: never splits a UTF-8 character, trims at the first stop string, drops the one
    space that joins a byte-level model's answer to the question.

    Runs on the engine worker's thread through a callback, so a stop string ends decoding at once. Stop strings are
    searched in the answer as the client gets it (after that one space, before anything else is removed), so a stop
    string at the very start gives an empty answer, as OpenAI's API does.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""  # text already sent
        self.text = ""  # the answer so far (trimmed at a stop string once one is found)
        self.stopped = False
        self._longest = max((len(s) for s in self.stop), default=0)  # a stop string's start waits this long at most

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the new text that is safe to send (maybe empty)."""
        self.ids.append(token_id)
        text = self._decoded()
        if self._trim_at_stop(text):
            return self.flush()
        safe = len(text) - self._stop_prefix(text)
        if safe <= len(self.emitted):
            return ""
        delta = text[len(self.emitted) : safe]
        self.emitted += delta
        return delta

    def flush(self) -> str:
        """The rest of the answer at the end of decoding (a character cut short by the end is dropped)."""
        if not self.stopped:
            self._trim_at_stop(self._decoded())
        delta = self.text[len(self.emitted) :]
        self.emitted = self.text
        return delta

    def _decoded(self) -> str:
        """The answer's text so far, without a last character whose bytes are not all there yet: one U+FFFD for
        byte-level BPE, one per byte (up to 3) for byte-fallback tokenizers (LLaMA-2, Mistral)."""
        text = self.tokenizer.decode(self.ids).removeprefix(" ")  # the space that joined it to the question
        partial = min(3, len(text) - len(text.rstrip("\ufffd")))
        return text[: len(text) - partial]

    def _trim_at_stop(self, text: str) -> bool:
        """self.text = text, cut where a stop string first appears in it, whichever string that is (True then).
        Only the text not sent yet, and a stop string's length before it, can hold a new occurrence."""
        hits = [i for s in self.stop if (i := text.find(s, max(0, len(self.emitted) - len(s)))) >= 0]
        self.text = text[: min(hits)] if hits else text
        self.stopped = self.stopped or bool(hits)
        return bool(hits)

    def _stop_prefix(self, text: str) -> int:
        """How many characters at the end of text could be the start of a stop string (they wait)."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
