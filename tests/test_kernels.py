"""The diagonal executor's step compiled whole by torch.compile (opt-in) gives the eager step's results, and a
document whose last segment has another length compiles nothing new."""
from __future__ import annotations

import random
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from model import ArmtModel
from tests.conftest import VOCAB, build_reference, write_official
from tests.test_diagonal import _close


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"), reason="inductor needs a C++ compiler")
def test_compiled_diagonal_equals_eager(tmp_path):
    ref = build_reference("llama", segment_size=10, value_std=0.05, num_hidden_layers=2)
    model = ArmtModel.from_pretrained(write_official(ref, tmp_path))
    rng = random.Random(0)
    docs = [[rng.randrange(VOCAB - 2) for _ in range(n)] for n in (37, 20)]
    states = [model.new_state(), model.ingest(model.new_state(), [1] * 12)]
    eager = model.ingest_many(states, docs)
    model.compiled_kernels = True
    compiled = model.ingest_many(states, docs)
    for a, b in zip(compiled, eager):
        _close(a.A, b.A)
        _close(a.z, b.z)
    # one document alone (one lane: its last step holds only the short last segment), logits wanted; then one whose
    # last segment has 5 tokens, not 7: the same graphs, never one per length
    for n in (37, 35):
        ids = torch.tensor([docs[0][:n]])
        graphs = counters["stats"]["unique_graphs"]
        _close(model.forward_long(ids, executor="diagonal")[0], model.forward_long(ids, executor="sequential")[0])
    assert counters["stats"]["unique_graphs"] == graphs
