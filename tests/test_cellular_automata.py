"""Cellular automata task: hand-computed orbits, the token layout, rule-disjoint splits, determinism."""
from __future__ import annotations

import random

import pytest

from model.tasks.cellular_automata import (GEN, MASK, SEP, ca_sample, orbit, random_rule, rule_split,
                                           sequence_length, shift_token, step)

APPENDIX_RULE = "01011111100100000101111011111100"  # Beyond Memorization, appendix example


def ones(*positions: int, width: int = 20) -> list[int]:
    return [int(i in positions) for i in range(width)]


def test_step_by_hand_with_the_appendix_rule():
    # A single live cell at 10: cell 8 sees 00001 (rule[1] = 1), 9 sees 00010 (rule[2] = 0), 10 sees 00100
    # (rule[4] = 1), 11 sees 01000 (rule[8] = 1), 12 sees 10000 (rule[16] = 0), every other 00000 (rule[0] = 0).
    assert step(ones(10), APPENDIX_RULE) == ones(8, 10, 11)
    # Next: 6 sees 00001 -> 1, 7: 00010 -> 0, 8: 00101 (5) -> 1, 9: 01011 (11) -> 1, 10: 10110 (22) -> 1,
    # 11: 01100 (12) -> 0, 12: 11000 (24) -> 1, 13: 10000 (16) -> 0.
    assert orbit(ones(10), APPENDIX_RULE, 3) == [ones(10), ones(8, 10, 11), ones(6, 8, 9, 10, 12)]


def test_periodic_boundary():
    # The live cell at 0 is seen by cells 18, 19 (wrapping right) and 1, 2.
    assert step(ones(0), APPENDIX_RULE) == ones(18, 0, 1)


def test_structured_rules():
    identity = "".join(str((n >> 2) & 1) for n in range(32))  # output = centre cell
    right_shift = "".join(str((n >> 3) & 1) for n in range(32))  # output = left neighbour: pattern moves right
    state = ones(0, 3, 4, 19)
    assert step(state, identity) == state
    assert step(state, right_shift) == ones(1, 4, 5, 0)


def test_step_rejects_bad_rules():
    with pytest.raises(ValueError):
        step(ones(1), "0101")
    with pytest.raises(ValueError):
        step(ones(1), "2" * 32)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_one_state_layout(k):
    s = ca_sample(random.Random(k), "train", k=k, variant="os")
    assert len(s.ids) == len(s.inputs) == sequence_length("os") == 231
    given = [s.ids[21 * i + 1 : 21 * i + 21] for i in range(10)]
    assert all(s.ids[21 * i] == SEP for i in range(10)) and s.ids[210] == GEN
    assert orbit(given[0], s.answer, 10) == given  # the orbit really follows the sample's rule
    assert s.answers == [list(range(211, 231))]
    assert s.ids[211:] == orbit(given[-1], s.answer, k + 1)[-1]  # the state k steps after s9
    assert s.inputs[211:] == [MASK] * 20 and s.inputs[:211] == s.ids[:211]  # targets never fed


def test_context_spans_score_the_given_states_without_changing_the_sample():
    plain = ca_sample(random.Random(3), "train", k=2)
    s = ca_sample(random.Random(3), "train", k=2, context=True)
    assert s.ids == plain.ids and s.inputs == plain.inputs  # same orbit, targets still masked, context fed
    assert s.answers[0] == plain.answers[0] and len(s.answers) == 1 + 9  # target first: evaluation reads span 0
    for i, span in enumerate(s.answers[1:], start=1):
        assert s.ids[span[0] - 1] == SEP and [s.ids[p] for p in span] == orbit(s.ids[1:21], s.answer, i + 1)[-1]
        assert all(s.inputs[p] == s.ids[p] for p in span)


def test_all_states_and_shift_layouts():
    oo = ca_sample(random.Random(1), "train", variant="oo")
    assert len(oo.ids) == sequence_length("oo") == 294 and len(oo.answers) == 4
    last_given = oo.ids[190:210]
    for j, span in enumerate(oo.answers):
        assert [oo.ids[p] for p in span] == orbit(last_given, oo.answer, j + 2)[-1]
        assert all(oo.inputs[p] == MASK for p in span)
    sh = ca_sample(random.Random(2), "train", variant="shift")
    k = sh.ids[210] - 105
    assert sh.ids[210] == shift_token(k) and sh.ids[211:] == orbit(sh.ids[190:210], sh.answer, k + 1)[-1]


def test_shift_horizon_is_the_one_asked_for():
    """The shift variant drew a random k whatever k was asked (a score "at k = 2" mixed all four horizons)."""
    for k in (1, 2, 3, 4):
        for seed in range(5):
            s = ca_sample(random.Random(seed), "test", k=k, variant="shift")
            assert s.ids[210] == shift_token(k) and s.ids[211:] == orbit(s.ids[190:210], s.answer, k + 1)[-1]
    drawn = {ca_sample(random.Random(seed), "test", k=None, variant="shift").ids[210] - 105 for seed in range(40)}
    assert drawn == {1, 2, 3, 4}
    assert ca_sample(random.Random(0), "test").ids == ca_sample(random.Random(0), "test", k=1).ids  # O-S: k 1
    for k, variant in ((99, "shift"), (0, "os"), (None, "xx"), (2, "oo"), (True, "os")):
        with pytest.raises(ValueError):
            ca_sample(random.Random(0), "test", k=k, variant=variant)


def test_splits_are_rule_disjoint_and_deterministic():
    rng = random.Random(0)
    for split in ("train", "validation", "test"):
        assert all(rule_split(random_rule(rng, split)) == split for _ in range(50))
    a = [ca_sample(random.Random(7), "test", 2).ids for _ in range(2)]
    assert a[0] == a[1]
    assert ca_sample(random.Random(7), "test", 2).ids != ca_sample(random.Random(8), "test", 2).ids
    counts = {s: 0 for s in ("train", "validation", "test")}
    for n in range(4000):
        counts[rule_split(format(n * 2654435761 % 2**32, "032b"))] += 1
    assert 100 < counts["test"] < 320 and 100 < counts["validation"] < 320  # about 5% each


def test_context_spans_are_trained_on_but_only_the_target_is_scored():
    """--ca-context's nine teacher-forced spans join the loss; the logged accuracy (and the curriculum gate that
    reads it) stays the target's, as evaluation has it."""
    import torch

    from model.training.objective import losses
    from model.training.reasoning import ca_batch, new_ca_model

    model = new_ca_model("armt", layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8)
    plain, context = (ca_batch(random.Random(5), 3, 1, "os", context=c) for c in (False, True))
    assert context.n_questions == 3 * 10 and context.scored.tolist() == ([True] + [False] * 9) * 3
    with torch.no_grad():
        a, b = losses(model, None, plain, False), losses(model, None, context, False)
    assert (b["questions"], b["cells"]) == (3, 3 * 20) and (b["correct"], b["cells_correct"]) == (a["correct"],
                                                                                                a["cells_correct"])
    assert not torch.equal(a["answer"], b["answer"])  # the context spans are in the loss
