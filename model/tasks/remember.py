"""Associative retrieval ("remember", ARMT paper) and the key-gap-value auxiliary task used in training.

remember: key-value pairs " key river is table." spread through prose, one per segment on average as in the
paper's task (one pair per segment, curriculum 1..200 pairs), and at the end " What is key river?" -> " table":
the memory must hold every pair it read, the latest value of a repeated key wins. Keys and values are two disjoint
sets of 100 single-token words of the model's own tokenizer (numbers split into 2-3 byte-level tokens, which made
a pair a 7-9 token pattern to bind), so a 64-segment document holds about 48 distinct keys, and no answer can be
guessed from the last segment unless its pair happens to be there.
key-gap-value (training aid, research/default-model-recipe.md): within one segment, keys drawn from the task's
name tokens, each followed by a gap of 2-6 random tokens and a value token; a final key asks for its latest value.
It exercises the same "bind a value to the key a few tokens back" step that QA needs.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from .babi import DROPS, GRABS, MOVES, PEOPLE, PLACES, TASK_WORDS
from .prose import train_sentences
from .sample import Codec, Piece, Sample, assemble, fact_piece

TOKENS_PER_PAIR = 64  # one pair per default-model segment when the caller does not say how many
N_WORDS = 100  # keys, and values
KGV_MIN_TOKENS = 13  # key_gap_value writes a pair while 10 more tokens fit before the question (2 tokens)


@dataclass
class PairHistory:
    """What one long document (a training stream read window by window) has written so far."""

    value: dict[str, str] = field(default_factory=dict)  # key -> latest value
    written: list[str] = field(default_factory=list)  # keys in writing order


def remember(codec: Codec, rng: random.Random, n_tokens: int, split: str = "train", n_pairs: int | None = None,
             n_questions: int = 1, ask_past: float = 0.0, history: PairHistory | None = None) -> Sample:
    """n_pairs pairs (default one per TOKENS_PER_PAIR tokens) at random sentence boundaries of `split`'s prose,
    then questions about keys that were written; exactly n_tokens long. The name-binding probe at each value
    names its key (as for QA facts). ask_past (training only): the probability that the question is about a pair
    drawn uniformly from all but the last one written. Trained on uniform questions, a model stops at answering
    from the last segment (the no-memory level); trained on questions about the first pair only, it learns to
    repeat the first value it wrote whatever the key. Questions about any earlier pair need the memory and the
    key both."""
    keys, values = pair_words(codec)
    n_pairs = n_pairs or max(1, n_tokens // TOKENS_PER_PAIR)
    history = history if history is not None else PairHistory()
    value, written = history.value, history.written
    facts: list[Piece] = []
    for _ in range(n_pairs):
        key, val = rng.choice(keys), rng.choice(values)
        facts.append(fact_piece(codec, f"key {key} is {val}.", [(val, key)]))
        value[key] = val
        written.append(key)
    asked = rng.sample(sorted(value), min(n_questions, len(value)))
    if ask_past and rng.random() < ask_past and len(written) > 1:
        chosen = written[rng.randrange(len(written) - 1)]
        asked = [chosen] + [k for k in asked if k != chosen][: n_questions - 1]
    questions = [(Piece(codec.encode(f" What is key {k}?")), value[k]) for k in asked]
    return assemble(codec, rng, split, facts, questions, n_tokens)


def pair_words(codec: Codec) -> tuple[list[str], list[str]]:
    """(keys, values): the 2 x N_WORDS most frequent whole words of the training prose (lowercase, 4+ letters) that
    the tokenizer keeps as one token, task words left out, dealt alternately; fixed for a given tokenizer."""
    cached = codec.__dict__.get("_pair_words")
    if cached is None:
        taken = {w.lower() for phrase in TASK_WORDS + MOVES + GRABS + DROPS for w in phrase.split()} | {"key", "what"}
        counts = Counter(w for line in train_sentences() for w in line.split() if len(w) >= 4 and w.isalpha()
                         and w.islower() and w not in taken)
        words = [w for w, _ in counts.most_common(4 * N_WORDS) if len(codec.encode(" " + w)) == 1][: 2 * N_WORDS]
        if len(words) < 2 * N_WORDS:
            raise ValueError(f"the tokenizer has only {len(words)} single-token words for the remember task")
        cached = codec.__dict__["_pair_words"] = (words[0::2], words[1::2])
    return cached


def key_gap_value(codec: Codec, rng: random.Random, n_tokens: int) -> Sample:
    """One-segment auxiliary sample; probes at every value name its key."""
    if n_tokens < KGV_MIN_TOKENS:
        raise ValueError(f"a key-gap-value sample needs segments of at least {KGV_MIN_TOKENS} tokens, got {n_tokens} "
                         "(or train without the auxiliary batch)")
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
