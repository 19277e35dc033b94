"""Associative retrieval ("remember", ARMT paper) and the key-gap-value auxiliary task used in training.

remember: a stream of key-value pairs " key 37 is 82." and, at the end, " What is key 37?" -> " 82": the memory
must hold every pair it read, the latest value of a repeated key wins.
key-gap-value (training aid, research/default-model-recipe.md): within one segment, keys drawn from the task's
name tokens, each followed by a gap of 2-6 random tokens and a value token; a final key asks for its latest value.
It exercises the same "bind a value to the key a few tokens back" step that QA needs.
"""
from __future__ import annotations

import random

from .babi import PEOPLE, PLACES
from .sample import Codec, Piece, Sample, assemble


def remember(codec: Codec, rng: random.Random, n_tokens: int, split: str | None = None,
             n_keys: int = 100, n_questions: int = 1) -> Sample:
    """Pairs until the document (with its question) reaches about n_tokens; asks about keys that were written."""
    value: dict[int, int] = {}
    facts: list[Piece] = []
    used = 0
    budget = n_tokens - 12 * n_questions
    while True:
        key, val = rng.randrange(n_keys), rng.randrange(n_keys)
        ids = codec.encode(f" key {key} is {val}.")
        if used + len(ids) > budget and facts:
            break
        facts.append(Piece(ids))
        value[key] = val
        used += len(ids)
    asked = rng.sample(sorted(value), min(n_questions, len(value)))
    questions = [(Piece(codec.encode(f" What is key {k}?")), str(value[k])) for k in asked]
    return assemble(codec, rng, None, facts, questions, n_tokens)


def key_gap_value(codec: Codec, rng: random.Random, n_tokens: int) -> Sample:
    """One-segment auxiliary sample; probes at every value name its key."""
    keys = [codec.word(p) for p in PEOPLE]
    values = [codec.word(p) for p in PLACES]
    filler_hi = codec.tokenizer.get_vocab_size()
    sample, latest = Sample([]), {}
    while len(sample.ids) + 10 < n_tokens - 2:
        key, gap = rng.choice(keys), rng.randint(2, 6)
        val = rng.choice(values)
        sample.ids.append(key)
        sample.ids.extend(rng.randrange(2, filler_hi) for _ in range(gap))  # ids 0, 1 are EOS and PAD
        sample.probes.append((len(sample.ids), key))
        sample.ids.append(val)
        latest[key] = val
    key = rng.choice(sorted(latest))
    sample.probes.append((len(sample.ids), key))
    sample.ids.append(key)
    sample.answers.append([len(sample.ids)])
    sample.ids.append(latest[key])
    return sample


def copy_half(codec: Codec, rng: random.Random, n_tokens: int, split: str = "train") -> Sample:
    """A stretch of prose followed by its own repeat; predict the repeat (teaches induction / copy heads)."""
    from .sample import prose_pieces

    half = n_tokens // 2
    ids = [t for piece in prose_pieces(codec, rng, split, half) for t in piece]
    sample = Sample(ids + ids)
    sample.answers = [[p] for p in range(half + 1, 2 * half)]
    return sample
