"""A training / evaluation sample as token ids with answer spans and probe targets, and how documents are built.

Documents are assembled at the token level from independently tokenized pieces (" " + sentence): with the
project's byte-level tokenizer that equals tokenizing the joined text (model/text.py), and it tells us exactly
where each fact and answer sits.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..text import EOS, PAD
from .prose import sentences


@dataclass
class Sample:
    ids: list[int]
    answers: list[list[int]] = field(default_factory=list)  # per question: positions of its answer tokens
    probes: list[tuple[int, int]] = field(default_factory=list)  # (position, token the probe should name there)
    answer: str = ""  # the last question's answer as text
    inputs: list[int] | None = None  # what the model reads, when it differs from ids (masked targets)
    scored: int | None = None  # answer spans that count in accuracy: the first `scored` (None: all)

    def __len__(self) -> int:
        return len(self.ids)


class DoesNotFit(ValueError):
    """The facts and questions asked for need more tokens than the document has. Callers retry with fewer facts;
    any other ValueError (a task word the tokenizer splits, say) is a real error and must reach the user."""


class Codec:
    """Tokenizer wrapper with a cache (the same sentences are encoded again and again)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.token_to_id(EOS)
        self.pad = tokenizer.token_to_id(PAD)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tokenizer.encode(text).ids
        return ids

    def word(self, word: str) -> int:
        """The single token of " word" (names, places, objects must be one token each)."""
        ids = self.encode(" " + word)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {word!r} into {len(ids)} tokens; retrain it with the task words")
        return ids[0]


@dataclass
class Piece:
    """A sentence of a document with probe targets at token offsets inside it."""

    ids: list[int]
    probes: list[tuple[int, int]] = field(default_factory=list)  # (offset in ids, target token)


def fact_piece(codec: Codec, text: str, probe_pairs: list[tuple[str, str]]) -> Piece:
    """" " + text, with the probe at the last occurrence of each word naming its partner word."""
    ids = codec.encode(" " + text)
    probes = []
    for at, target in probe_pairs:
        token = codec.word(at)
        probes.append((len(ids) - 1 - ids[::-1].index(token), codec.word(target)))
    return Piece(ids, probes)


def prose_pieces(codec: Codec, rng: random.Random, split: str, budget: int) -> list[list[int]]:
    """Consecutive prose sentences from a random place, exactly `budget` tokens (the first one cut at its start)."""
    if budget <= 0:
        return []
    pool = sentences(split)
    i = rng.randrange(len(pool))
    out, total = [], 0
    while total < budget:
        ids = codec.encode(" " + pool[i % len(pool)])
        out.append(ids)
        total += len(ids)
        i += 1
    excess = total - budget
    while excess >= len(out[0]):  # the last sentence overshot by more than the first one holds
        excess -= len(out.pop(0))
    out[0] = out[0][excess:]
    return out


def assemble(codec: Codec, rng: random.Random, split: str | None, facts: list[Piece],
             questions: list[tuple[Piece, str]], n_tokens: int) -> Sample:
    """Facts (in order) at random sentence boundaries of prose, then each question followed by its answer + EOS.

    The whole sample is exactly n_tokens long when prose is used (facts and questions must fit).
    """
    qa = [(q, codec.encode(" " + a) + [codec.eos], a) for q, a in questions]
    fixed = sum(len(f.ids) for f in facts) + sum(len(q.ids) + len(a) for q, a, _ in qa)
    if split is not None and fixed > n_tokens:
        raise DoesNotFit(f"{len(facts)} facts and {len(qa)} questions need {fixed} tokens, more than {n_tokens}")
    prose = prose_pieces(codec, rng, split, n_tokens - fixed) if split is not None else []
    slots = sorted(rng.randint(0, len(prose)) for _ in facts)  # fact j goes before prose piece slots[j]
    sample, fact_i = Sample([]), 0
    for k in range(len(prose) + 1):
        while fact_i < len(facts) and slots[fact_i] == k:
            _append(sample, facts[fact_i])
            fact_i += 1
        if k < len(prose):
            sample.ids.extend(prose[k])
    for q, a_ids, a_text in qa:
        _append(sample, q)
        sample.answers.append(list(range(len(sample.ids), len(sample.ids) + len(a_ids))))
        sample.ids.extend(a_ids)
        sample.answer = a_text
    return sample


def _append(sample: Sample, piece: Piece) -> None:
    start = len(sample.ids)
    sample.ids.extend(piece.ids)
    sample.probes.extend((start + off, tok) for off, tok in piece.probes)
