"""Batches for training and evaluation: samples of one length collated into tensors, and the curriculum stages.

A stage is a number of segments (0 = the dense stage: several facts packed into one segment with little prose).
All documents of a batch have the same length (prose fills them exactly), chosen at random within the stage so
that questions land anywhere in the last segment, as they do when a user's document ends mid-segment.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..tasks import Codec, DoesNotFit, Sample, generate, key_gap_value
from ..tasks.remember import copy_half


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    answer_pos: torch.Tensor  # [N] flat positions (row * T + t) of answer tokens
    answer_question: torch.Tensor  # [N] which question (0..Q-1) each answer token belongs to
    n_questions: int
    probe_pos: torch.Tensor  # [P] flat positions for the probe
    probe_target: torch.Tensor  # [P] token ids the probe should name
    inputs: torch.Tensor | None = None  # [B, T] what the model reads when it differs from ids (masked targets)
    scored: torch.Tensor | None = None  # [Q] bool: questions that count in accuracy (None: all)

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    def to(self, device) -> "Batch":
        """The batch's tensors on `device` (batches are built on the CPU; a CUDA model reads them there)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Batch(**moved)


def collate(samples: list[Sample], pad: int, with_probe: bool) -> Batch:
    """Pad at the end (after every answer, so pads are never attended to by a scored position)."""
    T = max(len(s) for s in samples)
    ids = torch.full((len(samples), T), pad, dtype=torch.int64)  # [B, T]
    a_pos, a_q, p_pos, p_tgt, scored, q = [], [], [], [], [], 0
    for row, s in enumerate(samples):
        ids[row, : len(s)] = torch.tensor(s.ids)
        for n, span in enumerate(s.answers):
            a_pos.extend(row * T + t for t in span)
            a_q.extend([q] * len(span))
            scored.append(s.scored is None or n < s.scored)
            q += 1
        if with_probe:
            p_pos.extend(row * T + t for t, _ in s.probes)
            p_tgt.extend(tok for _, tok in s.probes)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    inputs = None
    if samples[0].inputs is not None:
        inputs = ids.clone()
        for row, s in enumerate(samples):
            inputs[row, : len(s)] = torch.tensor(s.inputs)
    counted = None if all(scored) else torch.tensor(scored, dtype=torch.bool)  # [Q]
    return Batch(ids, as_long(a_pos), as_long(a_q), q, as_long(p_pos), as_long(p_tgt), inputs, counted)


def stage_length(rng: random.Random, stage: int, segment_size: int) -> int:
    """Document length for a stage: one segment for the dense stage, else in (n - 1/2, n] segments."""
    if stage == 0:
        return segment_size
    return stage * segment_size - rng.randrange(max(1, segment_size // 2))


def shortest_length(stage: int, segment_size: int) -> int:
    """The shortest document stage_length draws: where facts and questions are likeliest not to fit."""
    return segment_size if stage == 0 else stage * segment_size - (max(1, segment_size // 2) - 1)


def task_batch(codec: Codec, rng: random.Random, task: str, stage: int, batch_size: int, segment_size: int,
               questions: int, split: str = "train", with_probe: bool = True, n_tokens: int | None = None,
               **kw) -> Batch:
    """batch_size documents of one length: n_tokens, or one drawn for the stage."""
    n_tokens = n_tokens if n_tokens is not None else stage_length(rng, stage, segment_size)
    samples = [document(codec, rng, task, stage, n_tokens, questions, split, **kw) for _ in range(batch_size)]
    return collate(samples, codec.pad, with_probe)


def document(codec: Codec, rng: random.Random, task: str, stage: int, n_tokens: int, questions: int,
             split: str, **kw) -> Sample:
    """One document: 2-5 facts (QA2: 4-8; the dense stage: 4-7), fewer when facts and questions overflow it."""
    if task == "remember":  # one pair per segment; the dense stage packs 4-7 pairs (and questions) in one
        n_pairs = rng.randint(*DENSE_FACTS) if stage == 0 else stage
        return generate(task, codec, rng, n_tokens, split, n_pairs=n_pairs, n_questions=questions, **kw)
    lo, hi = DENSE_FACTS if stage == 0 else FACTS.get(task, (2, 5))
    for n_facts in range(rng.randint(lo, hi), 0, -1):
        try:
            return generate(task, codec, rng, n_tokens, split, n_facts=n_facts, n_questions=questions, **kw)
        except DoesNotFit:  # fewer facts; other errors (a task word the tokenizer splits) are the user's to see
            continue
    raise DoesNotFit(f"no {task} document fits in {n_tokens} tokens")


FACTS = {"qa1": (2, 5), "qa2": (4, 8)}
DENSE_FACTS = (4, 7)  # facts (or remember's pairs) in the one segment of the dense stage


def aux_batch(codec: Codec, rng: random.Random, batch_size: int, segment_size: int, copy: int = 0) -> Batch:
    """key-gap-value samples (+ `copy` prose-repeat samples), one segment each."""
    samples = [key_gap_value(codec, rng, segment_size) for _ in range(batch_size)]
    samples += [copy_half(codec, rng, segment_size) for _ in range(copy)]
    return collate(samples, codec.pad, with_probe=True)
