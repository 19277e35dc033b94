"""Trainer: exact resume, checkpoints loadable by the engine, evaluation plumbing (tiny model, a few steps)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from model import ArmtConfig, ArmtModel
from model.tasks import Codec, qa1
from model.training import TrainConfig, Trainer, accuracy, default_tokenizer, new_model, wilson
from model.training.evaluate import score_batch
from model.training.batches import collate
from model.training.objective import losses


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer(600)


def tiny(tokenizer):
    return new_model(tokenizer, layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8, segment_size=32)


def config(**kw):
    base = dict(stages=(0, 1, 2), batch_size=4, aux_batch_size=2, copy_batch_size=2, questions=2, warmup=2,
                heldout=8, checkpoint_every=1e9, minutes=10, seed=3, probe_layer=1,
                decay="steps")
    return TrainConfig(**{**base, **kw})


def test_resume_continues_exactly(tokenizer, tmp_path):
    straight = Trainer(tiny(tokenizer), Codec(tokenizer), config(max_steps=6), tmp_path / "a")
    straight.state.stage_index = 1  # a multi-segment stage: gradients flow through the memory
    straight.run(lambda row: None)

    first = Trainer(tiny(tokenizer), Codec(tokenizer), config(max_steps=6), tmp_path / "b")
    first.state.stage_index = 1
    for _ in range(3):  # interrupted half-way (after its last checkpoint)
        first.step()
    first.save_checkpoint()
    resumed = Trainer(tiny(tokenizer), Codec(tokenizer), config(max_steps=6), tmp_path / "b")
    assert resumed.load_checkpoint()
    resumed.run(lambda row: None)

    assert resumed.state.step == straight.state.step == 6
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_stage_minutes_advance_a_stage_that_does_not_pass(tokenizer, tmp_path):
    """A time-boxed curriculum: the stage moves on after stage_minutes even though accuracy never reaches 2.0."""
    cfg = config(max_steps=3, stages=(1, 2), stage_minutes=1e-9, advance_at=2.0)
    trainer = Trainer(tiny(tokenizer), Codec(tokenizer), cfg, tmp_path)
    rows = []
    trainer.run(rows.append)
    events = [r for r in rows if "event" in r]
    assert [(e["step"], e.get("timed_out"), e["advanced_to"]) for e in events] == [(2, True, 2)]
    assert trainer.stage == 2 and trainer.state.stage_seconds > 0


def test_training_moves_the_memory_and_saves_a_loadable_model(tokenizer, tmp_path):
    model = tiny(tokenizer)
    before = model.W_mv.detach().clone()
    trainer = Trainer(model, Codec(tokenizer), config(max_steps=3, stages=(2,)), tmp_path)
    rows = []
    trainer.run(rows.append)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    assert not torch.equal(before, model.W_mv)  # W_mv starts at 0: only back-propagation through memory moves it
    model.eval().save_pretrained(tmp_path / "model")
    loaded = ArmtModel.from_pretrained(tmp_path / "model")
    ids = Codec(tokenizer).encode(" Mary went to the kitchen. Where is Mary?")
    assert list(loaded.generate(loaded.new_state(), ids, max_new_tokens=3)) == \
        list(model.generate(model.new_state(), ids, max_new_tokens=3))


def test_truncated_backprop_keeps_the_loss_and_cuts_the_gradient_through_earlier_writes(tokenizer):
    """grad_segments=N: the same forward values; the memory write weights get a gradient only through writes in
    the last N segments that a later one of them reads (N=1: none at all, since the last write is read by no one)."""
    model = tiny(tokenizer)
    codec = Codec(tokenizer)
    samples = [qa1(codec, random.Random(i), 3 * 32, "train") for i in range(4)]  # 3 segments of 32
    batch = collate(samples, codec.pad, with_probe=False)
    grads, values = {}, {}
    for n in (0, 2, 1):
        model.zero_grad(set_to_none=True)
        out = losses(model, None, batch, use_probe=False, grad_segments=n)
        out["answer"].backward()
        values[n] = out["answer"].detach()
        grads[n] = model.W_mv.grad
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0)
    torch.testing.assert_close(values[2], values[0], rtol=0, atol=0)
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0 and not torch.equal(grads[2], grads[0])
    assert grads[1] is None or not grads[1].any()


def test_teacher_forced_score_equals_greedy_generation(tokenizer):
    model = tiny(tokenizer)
    codec = Codec(tokenizer)
    rng = random.Random(0)
    samples = [qa1(codec, rng, 100, "eval") for _ in range(6)]
    batch = collate(samples, codec.pad, with_probe=False)
    scored = score_batch(model, batch.ids, [s.answers[-1] for s in samples], executor="sequential")
    greedy = 0
    for s in samples:
        start = s.answers[-1][0]
        out = list(model.generate(model.new_state(), s.ids[:start], max_new_tokens=len(s.answers[-1])))
        greedy += out == s.ids[start:start + len(s.answers[-1])]
    assert scored == greedy
    row = accuracy(model, codec, "qa1", 3, 8, batch_size=4)
    assert row["samples"] == 8 and 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1


def test_wilson_interval():
    lo, hi = wilson(98, 100)
    assert 0.92 < lo < 0.95 and 0.99 < hi <= 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_init_from_a_plain_hf_directory_keeps_its_weights_and_adds_fresh_memory(tokenizer, tmp_path):
    from model.training import load_for_training

    hf = tiny(tokenizer).base.hf
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    armt = ArmtConfig(num_mem_tokens=4, d_mem=8, segment_size=32, armt_version=2)
    model = load_for_training(tmp_path / "hf", armt)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(model.base.hf.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert model.config.segment_size == 32 and model.tokenizer is not None
    assert not model.W_mv.any()  # the research initialisation: the memory starts silent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it when a GPU is lent)")
def test_training_steps_on_cuda(tokenizer, tmp_path):
    """Batches are built on the CPU; the trainer must move them to a CUDA model (and the probe with it)."""
    trainer = Trainer(tiny(tokenizer).to("cuda"), Codec(tokenizer), config(max_steps=2), tmp_path)
    trainer.state.stage_index = 1
    trainer.run(lambda row: None)
    assert trainer.state.step == 2


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """The run continues from its last checkpoint: rows logged after it (before a crash) would come twice."""
    from model.training import write_log

    path = tmp_path / "train_log.jsonl"
    log = write_log(path)
    for step in range(1, 6):
        log({"step": step, "loss": 1.0})
    log = write_log(path, after_step=3)  # resumed from the checkpoint of step 3
    for step in (4, 5, 6):
        log({"step": step, "loss": 0.5})
    steps = [json.loads(row)["step"] for row in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with path.open("a") as f:
        f.write('{"step": 7, "lo')  # a crash mid-row
    write_log(path, after_step=6)({"step": 7, "loss": 0.1})
    assert [json.loads(row)["step"] for row in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_ignores_the_ca_options_of_a_text_run(tokenizer, tmp_path):
    """A text run's checkpoint holds ca_k 1 (the old default; now None): it still resumes. A CA run's does not."""
    from dataclasses import asdict

    trainer = Trainer(tiny(tokenizer), Codec(tokenizer), config(), tmp_path)
    trainer._check_same_run({**asdict(trainer.cfg), "ca_k": 1, "ca_variant": "oo"})
    with pytest.raises(ValueError, match="lr"):
        trainer._check_same_run({**asdict(trainer.cfg), "lr": 1.0})
    trainer.cfg = config(task="ca", ca_k=2)
    with pytest.raises(ValueError, match="ca_k"):
        trainer._check_same_run({**asdict(trainer.cfg), "ca_k": 1})
    trainer.cfg = config(task="ca", ca_variant="oo")  # k None; runs from before saved the ignored default 1
    trainer._check_same_run({**asdict(trainer.cfg), "ca_k": 1})


def test_no_warmup_is_full_rate_from_the_first_step(tokenizer, tmp_path):
    """--warmup 0 divided by zero at the first step."""
    trainer = Trainer(tiny(tokenizer), Codec(tokenizer), config(warmup=0, decay="none"), tmp_path)
    assert trainer.lr_at(0) == trainer.cfg.lr
    with pytest.raises(ValueError, match="warmup"):
        config(warmup=-1)


def test_check_batches_tries_each_stage_at_its_shortest_documents(tokenizer, tmp_path):
    """Segments of 24 tokens with 4 questions: the old check (one batch per stage at a random length) passed, and
    training then stopped minutes in on a short document that did not fit; the shortest ones fail at the check."""
    model = new_model(tokenizer, layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8, segment_size=24)
    trainer = Trainer(model, Codec(tokenizer), config(stages=(1, 2), questions=4), tmp_path)
    with pytest.raises(ValueError, match="no qa1 document fits in 13 tokens"):
        trainer.check_batches()
    Trainer(tiny(tokenizer), Codec(tokenizer), config(), tmp_path).check_batches()  # the usual shapes pass
    short = new_model(tokenizer, layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8, segment_size=12)
    with pytest.raises(ValueError, match="key-gap-value"):  # the auxiliary batch is checked too (was step 1's crash)
        Trainer(short, Codec(tokenizer), config(stages=(0,), questions=1), tmp_path).check_batches()
