"""BABILong-style tasks: bAbI facts hidden in real prose, a question at the end (research/armt.md).

QA1 (single supporting fact): people move between places; "Where is X?" -> the place of X's latest move.
QA2 (two supporting facts): people pick up and drop objects; "Where is the O?" -> where the object is now (with
the person who carries it, or where it was dropped), which needs both the object fact and the carrier's move.
Every generator is a pure function of its `random.Random`, so a seed fixes the data.
"""
from __future__ import annotations

import random

from .sample import Codec, DoesNotFit, Piece, Sample, assemble, fact_piece

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
OBJECTS = ("football", "apple", "milk")
GRABS = ("picked up", "got", "grabbed", "took")
DROPS = ("dropped", "discarded", "put down", "left")
TASK_WORDS = PEOPLE + PLACES + OBJECTS + ("Where", "moved", "went", "journeyed", "travelled", "back")


def move_piece(codec: Codec, rng: random.Random, person: str, place: str) -> Piece:
    return fact_piece(codec, f"{person} {rng.choice(MOVES)} the {place}.", [(place, person)])


def question_piece(codec: Codec, rng: random.Random, subject: str, probe_target: str) -> Piece:
    """ " Where is X?" (one time in five on a new line instead) with the probe at "?" naming X.

    The newline variant also teaches "Where" without its leading space, which is what a caller gets who tokenizes
    the question on its own; the service always puts one space.
    """
    ids = codec.encode(f"{chr(10) if rng.random() < 0.2 else ' '}Where is {subject}?")
    return Piece(ids, [(len(ids) - 1, codec.word(probe_target))])


def qa1(codec: Codec, rng: random.Random, n_tokens: int, split: str | None = "train",
        n_facts: int | None = None, n_questions: int = 1, distinct: bool = False) -> Sample:
    """A QA1 document of n_tokens: 2-5 moves in prose (or n_facts), then questions about people who moved.

    The last question is about a random mover; earlier ones (training) about other movers. `distinct`: every
    person moves at most once (no "latest move" to find; an easier start for training).
    """
    n_facts = n_facts if n_facts is not None else rng.randint(2, 5)
    people = rng.sample(PEOPLE, min(n_facts, len(PEOPLE))) if distinct else None
    n_facts = len(people) if distinct else n_facts
    where: dict[str, str] = {}
    facts = []
    for i in range(n_facts):
        person, place = people[i] if distinct else rng.choice(PEOPLE), rng.choice(PLACES)
        where[person] = place
        facts.append(move_piece(codec, rng, person, place))
    asked = rng.sample(sorted(where), min(n_questions, len(where)))
    questions = [(question_piece(codec, rng, p, p), where[p]) for p in asked]
    return assemble(codec, rng, split, facts, questions, n_tokens)


def qa2(codec: Codec, rng: random.Random, n_tokens: int, split: str | None = "train",
        n_facts: int | None = None, n_questions: int = 1) -> Sample:
    """A QA2 document: moves, pick-ups and drops; "Where is the O?" for objects whose place is known (facts drawn
    again until some object has one: falling back to a person's place made 11-17% of QA2 questions QA1 ones)."""
    n_facts = n_facts if n_facts is not None else rng.randint(4, 8)
    if n_facts < 2:
        raise DoesNotFit("a QA2 document needs at least 2 facts (a move and a pick-up)")
    while True:
        facts, place = _qa2_facts(codec, rng, n_facts)
        if place:
            break
    asked = rng.sample(sorted(place), min(n_questions, len(place)))
    questions = [(question_piece(codec, rng, f"the {o}", o), place[o]) for o in asked]
    return assemble(codec, rng, split, facts, questions, n_tokens)


def _qa2_facts(codec: Codec, rng: random.Random, n_facts: int) -> tuple[list[Piece], dict[str, str]]:
    """n_facts random QA2 facts and where each object they placed ends up (object -> place)."""
    at: dict[str, str] = {}  # person -> place
    holder: dict[str, str] = {}  # object -> person carrying it
    dropped: dict[str, str] = {}  # object -> place where it lies
    facts: list[Piece] = []
    while len(facts) < n_facts:
        person = rng.choice(PEOPLE)
        carried = [o for o, p in holder.items() if p == person]
        free = [o for o in OBJECTS if o not in holder]
        action = rng.random()
        if person not in at or action < 0.4:
            at[person] = rng.choice(PLACES)
            facts.append(move_piece(codec, rng, person, at[person]))
        elif carried and action < 0.7:
            obj = rng.choice(carried)
            del holder[obj]
            dropped[obj] = at[person]
            facts.append(fact_piece(codec, f"{person} {rng.choice(DROPS)} the {obj}.", [(obj, person)]))
        elif free:
            obj = rng.choice(free)
            holder[obj] = person
            dropped.pop(obj, None)
            facts.append(fact_piece(codec, f"{person} {rng.choice(GRABS)} the {obj}.", [(obj, person)]))
    return facts, {o: at[p] for o, p in holder.items()} | dropped


TASKS = {"qa1": qa1, "qa2": qa2}


def make(task: str, codec: Codec, rng: random.Random, n_tokens: int, split: str | None = "train", **kw) -> Sample:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)} (and 'remember')")
    return TASKS[task](codec, rng, n_tokens, split, **kw)
