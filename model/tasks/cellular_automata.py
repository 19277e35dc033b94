"""1-D cellular automata with random rules: the reasoning-depth benchmark of Beyond Memorization (arXiv 2508.16745).

Width 20, binary cells, radius 2 (a 5-cell neighbourhood), periodic boundary. A rule is a 32-entry lookup table
(a uniformly random 32-bit string): the neighbourhood read as a binary number, leftmost cell most significant,
indexes the table, whose leftmost bit is the output for neighbourhood 00000. Random rules mean nothing can be
memorised: the model has to infer the rule from the orbit it is shown and apply it k times.

A sample is an orbit of 20 states from a random initial state; the first 10 are given and the target is the state
k steps after the last given one (k = 1..4, the "depth of reasoning"). Token layout (the paper's ids, vocab 128):
    O-S:   [SEP s0] [SEP s1] ... [SEP s9] [GEN] t          t = s(9 + k), 20 cells
    O-O:   [SEP s0] ... [SEP s9] [GEN] t1 [SEP] t2 [SEP] t3 [SEP] t4     the next 4 states
    shift: O-S with the shift token for k (106..109) in place of GEN (one model, several horizons: k = None
           draws k per sample, as training does; a fixed k scores one horizon)
Every group is 21 tokens, so an ARMT with 21-token segments reads one state per segment. Target cells are fed as
MASK (no teacher forcing): `Sample.inputs` is what the model reads, `Sample.ids` holds the answers.

Rules are split by a hash of their bits (5% test, 5% validation, 90% train), so the splits never share a rule.
"""
from __future__ import annotations

import hashlib
import random

from .sample import Sample

WIDTH, RADIUS, ORBIT, GIVEN = 20, 2, 20, 10
SEP, GEN, EOS, RULE, MASK = 100, 101, 102, 103, 104
PAD = 127
VOCAB = 128
GROUP = WIDTH + 1  # tokens per state: separator + cells
VARIANTS = ("os", "oo", "shift")
SPLITS = ("train", "validation", "test")


def shift_token(k: int) -> int:
    """The multi-horizon token asking for the state k steps ahead (k = 1..4 -> 106..109)."""
    if not 1 <= k <= 4:
        raise ValueError(f"k must be in 1..4, got {k}")
    return 105 + k


def step(state: list[int], rule: str, radius: int = RADIUS) -> list[int]:
    """The next state: cell i becomes rule[n] where n is cells i-r..i+r (periodic) read as binary, left = MSB."""
    n_cells = len(state)
    if len(rule) != 2 ** (2 * radius + 1) or set(rule) - {"0", "1"}:
        raise ValueError(f"a radius-{radius} rule is a string of {2 ** (2 * radius + 1)} bits, got {rule!r}")
    out = []
    for i in range(n_cells):
        index = 0
        for j in range(i - radius, i + radius + 1):
            index = index * 2 + state[j % n_cells]
        out.append(int(rule[index]))
    return out


def orbit(state: list[int], rule: str, length: int = ORBIT) -> list[list[int]]:
    """state, step(state), step(step(state)), ...: `length` states."""
    states = [list(state)]
    while len(states) < length:
        states.append(step(states[-1], rule))
    return states


def rule_split(rule: str) -> str:
    """Which split a rule belongs to (deterministic in its bits)."""
    bucket = hashlib.sha256(rule.encode()).digest()[0] % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def random_rule(rng: random.Random, split: str) -> str:
    """A uniformly random 32-bit rule of `split` (rejection sampling on the hash split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        rule = format(rng.getrandbits(32), "032b")
        if rule_split(rule) == split:
            return rule


def ca_sample(rng: random.Random, split: str = "train", k: int | None = None, variant: str = "os",
              context: bool = False) -> Sample:
    """One sample; `answers` holds one span per target state (one for O-S and shift, four for O-O).

    k: the horizon, 1..4, for O-S and shift; None is the variant's default: 1 for O-S, a random k per sample for
    shift (drawn from rng). O-O always asks for the next four states and takes k = None only.

    context=True (training only) adds, after the target spans, one span per given state s1..s9: each cell of a
    given state predicted from the states before it (teacher-forced, as in language modelling). That is the same
    one-step rule the k = 1 target asks for, seen nine times per orbit instead of once; the paper trains on the
    target alone.
    """
    k = check_k(k, variant)
    if variant == "shift" and k is None:
        k = rng.randint(1, 4)
    rule = random_rule(rng, split)
    states = orbit([rng.randrange(2) for _ in range(WIDTH)], rule)
    ids: list[int] = []
    for s in states[:GIVEN]:
        ids += [SEP, *s]
    targets = [states[GIVEN - 1 + k]] if variant != "oo" else states[GIVEN : GIVEN + 4]
    sample = Sample([], answer=rule)
    for n, target in enumerate(targets):
        lead = (shift_token(k) if variant == "shift" else GEN) if n == 0 else SEP
        ids.append(lead)
        sample.answers.append(list(range(len(ids), len(ids) + WIDTH)))
        ids += target
    sample.ids = ids
    answer_positions = {p for span in sample.answers for p in span}
    sample.inputs = [MASK if p in answer_positions else t for p, t in enumerate(ids)]
    if context:  # s_i's cells sit at i * GROUP + 1 .. i * GROUP + WIDTH; trained on, not counted in accuracy
        sample.scored = len(sample.answers)
        sample.answers += [list(range(i * GROUP + 1, (i + 1) * GROUP)) for i in range(1, GIVEN)]
    return sample


def check_k(k: int | None, variant: str) -> int | None:
    """k as the variant takes it (see ca_sample), None resolved for O-S; ValueError otherwise."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "oo":
        if k is not None:
            raise ValueError(f"the oo variant predicts the next four states; k does not apply (got {k})")
        return None
    if k is None:
        return 1 if variant == "os" else None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4:
        raise ValueError(f"k must be in 1..4, got {k!r}")
    return k


def sequence_length(variant: str) -> int:
    return GROUP * (GIVEN + (4 if variant == "oo" else 1))
