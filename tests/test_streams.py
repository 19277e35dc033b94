"""Memory carried across training steps (model/training/streams.py): a window read from carried memory is the same
computation as reading the whole document; streams age, start over, and resume exactly."""
from __future__ import annotations

import random
import re

import pytest
import torch

from model.tasks import Codec
from model.tasks.remember import PairHistory, remember
from model.training import TrainConfig, Trainer, default_tokenizer, new_model
from model.training.objective import hidden_states


@pytest.fixture(scope="module")
def codec():
    return Codec(default_tokenizer(3000))  # the remember task needs 200 single-token words


def tiny(codec):
    return new_model(codec.tokenizer, layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8,
                     segment_size=32, seed=1)


def test_remember_with_history_asks_about_the_whole_stream(codec):
    assert remember(codec, random.Random(5), 256).ids == remember(codec, random.Random(5), 256,
                                                                  history=PairHistory()).ids
    crossed = 0
    for seed in range(20):
        rng, history = random.Random(seed), PairHistory()
        first = codec.tokenizer.decode(remember(codec, rng, 128, n_pairs=2, history=history).ids)
        second = remember(codec, rng, 128, n_pairs=2, ask_past=1.0, history=history)
        text = first + codec.tokenizer.decode(second.ids)
        pairs = re.findall(r" key ([a-z]+) is ([a-z]+)\.", text)
        assert [k for k, _ in pairs] == history.written and dict(pairs) == history.value
        asked = text.rsplit("What is key ", 1)[1].split("?")[0]
        assert asked in history.written[:-1] and second.answer == history.value[asked]
        crossed += asked not in codec.tokenizer.decode(second.ids).split("What is")[0]
    assert crossed  # some questions are about a pair only an earlier window holds


def test_a_window_from_carried_memory_equals_reading_the_whole_document(codec):
    model = tiny(codec).eval()
    with torch.no_grad():
        model.W_mv.normal_(0, 0.1)
    ids = torch.randint(2, 3000, (2, 5 * 32))
    with torch.no_grad():
        whole, _, (A, z, _) = hidden_states(model, ids, None)
        head, _, memory = hidden_states(model, ids[:, : 2 * 32], None)
        tail, _, (A2, z2, _) = hidden_states(model, ids[:, 2 * 32 :], None, memory=memory)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(A2, A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-6)


def config(**kw):
    base = dict(task="remember", stages=(1, 2), batch_size=3, aux_batch_size=2, copy_batch_size=1, questions=1,
                warmup=2, heldout=4, checkpoint_every=1e9, minutes=10, seed=3, probe_layer=1, decay="steps",
                ask_past=0.8, stream_max=5, replay=0.0)
    return TrainConfig(**{**base, **kw})


def test_streams_carry_memory_age_and_start_over(codec, tmp_path):
    trainer = Trainer(tiny(codec), Codec(codec.tokenizer), config(), tmp_path)
    trainer.state.stage_index = 1  # the last stage streams
    streams = trainer.streams
    assert streams.first.all() and not streams.A.any()
    for _ in range(4):
        limit, read, pairs = list(streams.limit), streams.ages(), [len(h.written) for h in streams.history]
        row = trainer.step()
        assert row["stream_age"] == round(sum(read) / 3, 1)
        for r in range(3):
            if read[r] + 2 >= limit[r]:  # this window ended the stream: empty memory, a new full-length stream
                assert streams.first[r] and not streams.A[r].any() and not streams.z[r].any()
                assert streams.ages()[r] == 0 and streams.limit[r] == 5 and streams.history[r].written == []
            else:  # carried: the window's memory and its two pairs (one per segment) are kept
                assert not streams.first[r] and streams.z[r].any()
                assert streams.ages()[r] == read[r] + 2 and len(streams.history[r].written) == pairs[r] + 2
    trainer.state.stage_index = 0  # an earlier stage (or a replay of one) leaves the streams alone
    before = streams.A.clone(), streams.ages()
    trainer.step()
    assert torch.equal(streams.A, before[0]) and streams.ages() == before[1]


def test_stream_training_resumes_exactly(codec, tmp_path):
    straight = Trainer(tiny(codec), Codec(codec.tokenizer), config(max_steps=4), tmp_path / "a")
    straight.state.stage_index = 1
    straight.run(lambda row: None)
    first = Trainer(tiny(codec), Codec(codec.tokenizer), config(max_steps=4), tmp_path / "b")
    first.state.stage_index = 1
    for _ in range(2):
        first.step()
    first.save_checkpoint()
    resumed = Trainer(tiny(codec), Codec(codec.tokenizer), config(max_steps=4), tmp_path / "b")
    assert resumed.load_checkpoint()
    resumed.run(lambda row: None)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed.streams.A, straight.streams.A, rtol=0, atol=0)
    assert resumed.streams.ages() == straight.streams.ages()
    assert [h.value for h in resumed.streams.history] == [h.value for h in straight.streams.history]


def test_streams_are_for_the_remember_task(codec, tmp_path):
    with pytest.raises(ValueError, match="remember"):
        Trainer(tiny(codec), Codec(codec.tokenizer), config(task="qa1"), tmp_path)
