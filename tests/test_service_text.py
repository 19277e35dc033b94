"""Chunk-invariant text handling of the service (no model): UTF-8 across chunk cuts, held-back words, forced cuts
of long stretches, answer detokenization with stop strings."""
from __future__ import annotations

import random
import re

import pytest

from service.core import textstream as ts
from service.core.errors import InvalidText
from tests.service_helpers import corpus


def feed_all(doc: bytes, cuts: list[int], offset: int = 0) -> tuple[str, bytes]:
    stream, out, prev = ts.Utf8Stream(b"", offset), [], 0
    for cut in cuts + [len(doc)]:
        out.append(stream.feed(doc[prev:cut]))
        prev = cut
    return "".join(out), stream.partial


def test_utf8_cut_anywhere_decodes_the_same():
    doc = "Zoë 東京 🙂🚀 naïve".encode()
    for cut in range(len(doc) + 1):
        text, partial = feed_all(doc, [cut])
        assert text == doc.decode() and partial == b""


def test_utf8_incomplete_tail_is_kept_for_the_next_append():
    stream = ts.Utf8Stream(b"", 0)
    assert stream.feed("a🙂".encode()[:3]) == "a"
    assert stream.partial == "🙂".encode()[:2]
    assert stream.feed("🙂".encode()[2:]) == "🙂"


@pytest.mark.parametrize("bad, position", [(b"ab\xffcd", 2), (b"abc\xe2\x82(", 3), (b"\xed\xa0\x80", 0)])
def test_invalid_utf8_names_the_absolute_byte(bad, position):
    stream = ts.Utf8Stream(b"", 1000)
    with pytest.raises(InvalidText) as info:
        stream.feed(bad)
    assert info.value.extra["position"] == 1000 + position
    assert str(1000 + position) in info.value.message


def test_invalid_byte_after_a_carried_partial_sequence():
    stream = ts.Utf8Stream(b"", 10)
    stream.feed(b"ab\xe2")  # bytes 10, 11, 12 (12 starts a 3-byte character)
    with pytest.raises(InvalidText) as info:
        stream.feed(b"x")  # byte 13 is not a continuation byte: the sequence starting at 12 is invalid
    assert info.value.extra["position"] == 12


def run(doc: str, sizes: list[int]) -> tuple[list[str], str]:
    ready, out, i = ts.ReadyText(""), [], 0
    for size in sizes:
        out += ready.feed(doc[i : i + size])
        i += size
    return out, ready.held


def test_ready_text_matches_whole_document_on_real_text():
    doc = "".join(corpus()[:3])
    rng = random.Random(0)
    whole, held = run(doc, [len(doc)])
    sizes = [rng.randrange(1, 200) for _ in range(len(doc))]
    pieces, held2 = run(doc, sizes)
    assert held == held2 and "".join(whole) == "".join(pieces)
    assert held.startswith(tuple(ts.WHITESPACE))  # the held-back text is the last word with its space


def test_forced_cuts_do_not_depend_on_chunking(monkeypatch):
    limit = 12
    monkeypatch.setattr(ts, "MAX_HELD_CHARS", limit)
    monkeypatch.setattr(ts, "_LONG", re.compile(f"[{ts._WS}]{{{limit // 3},}}|[^{ts._WS}]{{{limit // 3},}}"))
    rng = random.Random(1)
    for _ in range(300):
        doc = "".join(rng.choice(["a", "b", " ", "\n", "xyzxyzxyzxyzxyzxyz", "é", "    "])
                      for _ in range(rng.randrange(1, 80)))
        whole, held = run(doc, [len(doc)])
        pieces, held2 = run(doc, [rng.randrange(1, 15) for _ in range(len(doc))])
        assert held == held2 and len(held) <= limit
        cuts = {m.start() for m in ts._CUT.finditer(doc)}
        bounds = {sum(map(len, pieces[: i + 1])) for i in range(len(pieces))}
        whole_bounds = {sum(map(len, whole[: i + 1])) for i in range(len(whole))}
        assert whole_bounds <= bounds  # every forced cut of the whole text is a cut of the chunked one
        assert bounds <= cuts | whole_bounds  # and the chunked one only adds safe cut points


class FakeTokenizer:
    """Byte tokens: id = byte value (so a multi-byte character takes several tokens)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_answer_text_never_splits_a_character():
    answer = ts.AnswerText(FakeTokenizer(), ())
    deltas = [answer.add(b) for b in "é🙂x".encode()]
    assert "".join(deltas) + answer.flush() == "é🙂x"
    assert all("\ufffd" not in d for d in deltas)


def test_answer_text_trims_at_a_stop_string_across_tokens():
    answer = ts.AnswerText(FakeTokenizer(), ("END",))
    sent = ""
    for b in "hello ENDworld".encode():
        sent += answer.add(b)
        if answer.stopped:
            break
    assert answer.stopped and sent + answer.flush() == "hello " and answer.text == "hello "
    assert "E" not in sent  # a stop string's start is held back until it is known not to be one


@pytest.mark.parametrize("stop", [("bc", "abc"), ("abc", "bc")])
def test_answer_ends_at_the_stop_string_that_appears_first_whatever_its_place_in_the_list(stop):
    """Both complete with the same token (here its last byte; a real token can hold two stop strings)."""
    answer = ts.AnswerText(FakeTokenizer(), stop)
    sent = ""
    for b in "xx abc yy".encode():
        sent += answer.add(b)
        if answer.stopped:
            break
    assert answer.stopped and sent + answer.flush() == "xx " == answer.text


def _answer(stop: tuple[str, ...], text: bytes) -> tuple[ts.AnswerText, list[str]]:
    """Feed byte tokens until a stop string ends the answer; the deltas include flush()'s."""
    answer = ts.AnswerText(FakeTokenizer(), stop)
    deltas = []
    for b in text:
        deltas.append(answer.add(b))
        if answer.stopped:
            break
    return answer, deltas + [answer.flush()]


class PieceTokenizer:
    """Token i = PIECES[i], several bytes each, as BPE tokens are."""

    PIECES = [b"Paris", b'"\xe2\x80']  # the default tokenizer has '"' + 2 bytes of a curly quote as one token

    def decode(self, ids):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_a_stop_string_in_a_token_that_ends_inside_a_character_is_found():
    """The stop string waited for the character to complete; when decoding ended first (end-of-text, length), the
    answer kept 'Paris"\\ufffd'. Now it ends the answer at that token."""
    answer = ts.AnswerText(PieceTokenizer(), ('"',))
    sent = answer.add(0) + answer.add(1)
    assert answer.stopped and answer.text == "Paris" == sent + answer.flush()


def test_a_length_cut_inside_a_character_drops_it():
    answer, deltas = _answer((), "caf\u00e9".encode()[:-1])
    assert not answer.stopped and "".join(deltas) == "caf" == answer.text


@pytest.mark.parametrize("text, stop, expected, stopped", [
    ("\nkitchen\nfoo", ("\n",), "", True),  # a stop string at the very start: an empty answer (leading \n kept)
    (" garden now", (" garden",), "garden now", False),  # the joining space is not part of the answer
    ("  garden", (" garden",), "", True),  # only one space is removed
    (" hello", (), "hello", False),
])
def test_only_the_joining_space_is_removed_before_stop_strings_are_searched(text, stop, expected, stopped):
    answer, deltas = _answer(stop, text.encode())
    assert answer.text == expected == "".join(deltas) and answer.stopped == stopped


def test_only_text_that_could_start_a_stop_string_waits():
    """All text waited for max(len(stop)) - 1 characters: with a 40-character stop string, the whole answer came at
    the end."""
    answer = ts.AnswerText(FakeTokenizer(), ("Z" * 40, "ab!"))
    sent = [answer.add(b) for b in b"hello worlda"]
    assert "".join(sent) == "hello world"  # the final "a" may start "ab!"
    assert sent[4] == "o" and answer.flush() == "a"


class ByteFallbackTokenizer:
    """Byte tokens decoded the way a byte-fallback tokenizer does: one U+FFFD per byte of an unfinished character."""

    def decode(self, ids):
        text = bytes(ids).decode("utf-8", errors="ignore")
        complete = len(text.encode())
        return text + "\ufffd" * (len(ids) - complete)


def test_a_byte_fallback_tokenizer_streams_whole_characters():
    """A 3-byte character decoded as 'x\\ufffd\\ufffd' midway: one U+FFFD was held back, the other streamed, and
    the character itself was then skipped (the stream read '5\\ufffd.' where the answer was '5\\u20ac.')."""
    answer = ts.AnswerText(ByteFallbackTokenizer(), ())
    sent = "".join(answer.add(b) for b in "5\u20ac.".encode()) + answer.flush()
    assert sent == "5\u20ac." == answer.text
