"""Memory carried across training steps (stateful truncated back-propagation) for associative retrieval.

Why: a retrieval model trained on documents of up to N segments meets, in a document of 1,024 segments, memory
states it never saw in training: the top layer's `A` keeps growing while `z` is fixed after the first segment, and
the read leaves the range seen in training (README "Measured accuracy"). Training on whole 1,024-segment documents
costs a forward pass over the prefix on every step (`--grad-segments`: 18 s a step for 8 documents here). Instead,
each batch row is a stream: one long document read a window (a stage-length document) per training step, its memory
(A, z) handed on, detached, from one step to the next, and the pairs it wrote remembered, so that the questions at
the end of each window ask about any pair of the stream so far (its latest value). Back-propagation stays inside a
window; the forward pass over the prefix is never repeated.

A stream ends after `max_segments` segments and the row starts a new one from empty memory. The first streams end
after a random share of that, so the rows are spread over all ages: at any step the batch holds memories from
empty to `max_segments` segments old, roughly uniformly.
"""
from __future__ import annotations

import random

import torch

from ..tasks import Codec
from ..tasks.remember import PairHistory, remember
from .batches import Batch, collate, stage_length


class Streams:
    def __init__(self, model, batch_size: int, max_segments: int, rng: random.Random):
        self.max_segments = max_segments
        self.A, self.z = model._empty_memory(batch_size)  # [B, L, d_key, d], [B, L, d_key]
        self.first = torch.ones(batch_size, dtype=torch.bool, device=model.device)  # [B]
        self.read = [0] * batch_size  # segments each stream has read
        self.limit = [rng.randint(1, max_segments) for _ in range(batch_size)]  # staggered first lives
        self.history = [PairHistory() for _ in range(batch_size)]

    def batch(self, codec: Codec, rng: random.Random, stage: int, segment_size: int, questions: int,
              ask_past: float) -> Batch:
        """The next window of every stream: `stage` segments (one pair each), questions about the whole stream."""
        n_tokens = stage_length(rng, stage, segment_size)
        samples = [remember(codec, rng, n_tokens, "train", n_pairs=stage, n_questions=questions, ask_past=ask_past,
                            history=h) for h in self.history]
        return collate(samples, codec.pad, with_probe=False)

    def start(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The memory the next window starts from: (A, z, first)."""
        return self.A, self.z, self.first

    def advance(self, memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor], segments: int) -> None:
        """Hand on the memory after a window of `segments` segments; streams past their length start over."""
        A, z, _ = memory  # detached by losses(); cloned because rows that start over are zeroed in place
        self.A, self.z = A.clone(), z.clone()
        self.first = torch.zeros_like(self.first)
        for row in range(len(self.read)):
            self.read[row] += segments
            if self.read[row] >= self.limit[row]:
                self.A[row] = 0
                self.z[row] = 0
                self.first[row] = True
                self.read[row], self.limit[row] = 0, self.max_segments
                self.history[row] = PairHistory()

    def ages(self) -> list[int]:
        return list(self.read)

    def state_dict(self) -> dict:
        return {"A": self.A, "z": self.z, "first": self.first, "read": self.read, "limit": self.limit,
                "history": [(h.value, h.written) for h in self.history]}

    def load_state_dict(self, blob: dict) -> None:
        self.A, self.z, self.first = blob["A"], blob["z"], blob["first"]
        self.read, self.limit = list(blob["read"]), list(blob["limit"])
        self.history = [PairHistory(dict(v), list(w)) for v, w in blob["history"]]
