"""Exact-match evaluation against document length, with Wilson confidence intervals.

A question counts as answered when greedy decoding would produce exactly the answer tokens and then EOS. That is
measured teacher-forced: argmax at every answer position equals the answer token (the first position is exactly
greedy's first token; each next one is greedy's next token given the previous ones were right). Whole segments
before the last run through the (fast, no-grad) executor; the last segment gives logits.
"""
from __future__ import annotations

import math
import random

import torch

from ..tasks import Codec
from .batches import collate, document, stage_length


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def score_batch(model, ids: torch.Tensor, answers: list[list[int]], executor: str = "diagonal",
                memory: bool = True) -> int:
    """How many rows answer correctly; ids [B, T] with every row's answer span in its last segment.

    memory=False is the no-memory baseline: the same network sees only the last segment (empty memory).
    """
    B, T = ids.shape
    S = model.config.segment_size
    cut = ((T - 1) // S) * S
    if min(a[0] for a in answers) <= cut:
        raise ValueError("evaluation needs every answer inside the last segment")
    A, z = model._empty_memory(B)
    first = torch.ones(B, dtype=torch.bool, device=model.device)
    if cut and memory:
        _, A, z = model._executor(executor)(model, ids[:, :cut], A, z, first, False)
        first = torch.zeros_like(first)
    logits, _, _ = model.segment_forward(ids[:, cut:], A, z, first, True)  # [B, T - cut, V]
    pred = logits.argmax(-1)  # [B, T - cut]
    correct = 0
    for row, span in enumerate(answers):
        correct += all(int(pred[row, t - 1 - cut]) == int(ids[row, t]) for t in span)
    return correct


def accuracy(model, codec: Codec, task: str, segments: int, n_samples: int, split: str = "eval", seed: int = 0,
             batch_size: int = 16, dense: bool = False, executor: str = "diagonal", distinct: bool = False,
             memory: bool = True) -> dict:
    """Exact match on n_samples fresh documents of `segments` segments (one question each, at the end).

    Document i is drawn from its own generator (seed, i), its length included: the documents, and so the score,
    do not depend on batch_size (one length per batch, drawn from a shared generator, made them do so)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    S, stage = model.config.segment_size, 0 if dense else segments
    kw = {"distinct": True} if distinct else {}

    def doc(i: int):
        rng = random.Random(f"{seed}:{i}")
        return document(codec, rng, task, stage, stage_length(rng, stage, S), 1, split, **kw)

    was_training = model.training
    model.eval()
    correct = done = 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        samples = [doc(done + i) for i in range(b)]
        batch = collate(samples, codec.pad, with_probe=False)
        correct += score_batch(model, batch.ids.to(model.device), [s.answers[-1] for s in samples], executor,
                               memory)
        done += b
    model.train(was_training)
    lo, hi = wilson(correct, done)
    return {"task": task, "memory": memory, "segments": segments, "tokens": segments * S, "samples": done,
            "correct": correct, "accuracy": correct / done, "ci95": [round(lo, 4), round(hi, 4)]}
