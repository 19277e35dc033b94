"""Adaptive computation time: hop 1 is the plain layer exactly, fixed mode runs exactly max_hop, the halting
arithmetic by hand, max_hop at inference, stats, save/load, decoding without a KV cache, the CA trainer."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from model import ArmtConfig, ArmtModel
from model.act import ActRun, ActStats, halting_loop
from tests.conftest import tiny_config

CFG = ArmtConfig(num_mem_tokens=4, d_mem=8, segment_size=10, armt_version=2)


def pair(max_hop: int = 1, fixed: bool = False, bias: float | None = None, kind: str = "llama"):
    """A plain model and the same weights with ACT on (random non-zero memory weights, W_mv included)."""
    plain = ArmtModel.from_config(tiny_config(kind), CFG, seed=1)
    with torch.no_grad():
        plain.W_mv.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    act = ArmtModel.from_config(tiny_config(kind), replace(CFG, act=True, max_hop=max_hop, act_fixed=fixed), seed=1)
    state = {k: v for k, v in plain.state_dict().items()}
    missing = act.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["act_b", "act_w"]
    if bias is not None:
        with torch.no_grad():
            act.act_b.fill_(bias)
    return plain.eval(), act.eval()


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_hop_is_the_plain_layer_exactly(kind):
    plain, act = pair(max_hop=1, kind=kind)
    x = ids(35)  # 4 segments, the last one short: memory is read and written
    want, want_states = plain.forward_long(x)
    got, got_states = act.forward_long(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_states, want_states):
        torch.testing.assert_close(a.A, b.A, rtol=0, atol=0)


def test_certain_halting_unit_stops_after_one_hop_and_equals_the_plain_layer():
    plain, act = pair(max_hop=4, bias=30.0)  # p = 1: every token halts at its first hop
    stats = ActStats()
    got, _ = act.forward_long(ids(25), act_stats=stats)
    torch.testing.assert_close(got, plain.forward_long(ids(25))[0], rtol=0, atol=0)
    assert stats.mean_hops == 1.0 and stats.max_hops == 1


def test_fixed_mode_runs_exactly_max_hop():
    calls = []
    h = torch.randn(2, 5, 8)
    run = ActRun(max_hop=3, threshold=0.9, fixed=True, stats=ActStats())
    out = halting_loop(lambda x: calls.append(1) or x * 2 + 1, h, torch.zeros(1, 8), torch.zeros(1), run, 0)
    assert len(calls) == 3
    torch.testing.assert_close(out, ((h * 2 + 1) * 2 + 1) * 2 + 1)
    assert run.stats.mean_hops == 3.0
    _, act = pair(max_hop=3, fixed=True)
    stats = ActStats()
    act.forward_long(ids(25), act_stats=stats)
    assert stats.hops_per_layer == [3.0, 3.0, 3.0]


def test_halting_weights_by_hand():
    # p = sigmoid(logit(0.4)) = 0.4 at every hop: hop 1 weight .4 (acc .4), hop 2 .4 (acc .8), hop 3 would pass
    # 0.9, so the token halts there with the remainder .2: out = h + .4*1 + .4*2 + .2*3, N = 3, R = .2.
    h = torch.randn(1, 3, 4)
    b = torch.tensor([torch.logit(torch.tensor(0.4)).item()])
    run = ActRun(max_hop=5, threshold=0.9, fixed=False, stats=ActStats(), ponder=[])
    out = halting_loop(lambda x: x + 1, h, torch.zeros(1, 4), b, run, 0)
    torch.testing.assert_close(out, h + 1.8)
    torch.testing.assert_close(run.ponder_cost(), torch.tensor(3.2))
    assert run.stats.max_hops == 3
    run2 = ActRun(max_hop=2, threshold=0.9, fixed=False)  # forced halt at max_hop: weights .4 and .6
    torch.testing.assert_close(halting_loop(lambda x: x + 1, h, torch.zeros(1, 4), b, run2, 0), h + 1.6)


def test_max_hop_at_inference_and_its_errors():
    plain, act = pair(max_hop=4, bias=-30.0)  # p = 0: every token runs to the limit
    for hops in (1, 2, 4):
        stats = ActStats()
        act.forward_long(ids(25), max_hop=hops, act_stats=stats)
        assert stats.max_hops == hops and stats.mean_hops == hops
    with pytest.raises(ValueError, match="max_hop"):
        plain.forward_long(ids(5), max_hop=2)
    with pytest.raises(ValueError, match="max_hop"):
        act.forward_long(ids(5), max_hop=0)


def test_generate_and_ingest_on_act_models():
    plain, act = pair(max_hop=1)
    state = plain.ingest(plain.new_state(), ids(27)[0])
    act_state = act.ingest(act.new_state(), ids(27)[0], executor="diagonal")  # ACT always runs sequentially
    torch.testing.assert_close(act_state.A, state.A, rtol=0, atol=0)
    prompt = [5, 6, 7]
    want = list(plain.generate(state, prompt, max_new_tokens=8, stop_token_ids=[]))
    stats = ActStats()
    got = list(act.generate(act_state, prompt, max_new_tokens=8, stop_token_ids=[], act_stats=stats))
    assert got == want and stats.max_hops == 1
    _, act3 = pair(max_hop=3, bias=-30.0)
    assert len(list(act3.generate(act3.new_state(), prompt, max_new_tokens=3, stop_token_ids=[], max_hop=2))) == 3
    assert act3.ingest_many([act3.new_state()], [ids(20)[0]])[0].segments == 2


def test_max_hop_applies_to_the_answer_segment_only():
    """generate writes the segments before the final one as ingest would (the configured limit); max_hop is the
    answer's own compute. And the session's text appended in any pieces gives the same answer."""
    _, act = pair(max_hop=3, bias=-1.0)
    doc, prompt = ids(40)[0].tolist(), ids(25, seed=1)[0].tolist()  # segments of 10: no pending tail
    state = act.ingest(act.new_state(), doc)
    kw = {"max_new_tokens": 4, "stop_token_ids": [], "max_hop": 1}
    got = list(act.generate(state, prompt, **kw))  # writes prompt[:20] itself
    assert got == list(act.generate(act.ingest(state, prompt[:20]), prompt[20:], **kw))
    doc = ids(47)[0].tolist()
    answers = [list(act.generate(act.ingest(act.ingest(act.new_state(), doc[:cut]), doc[cut:]), [5, 6], **kw))
               for cut in (0, 23, 30, 40)]
    assert all(a == answers[0] for a in answers), answers


def test_act_config_round_trip(tmp_path):
    _, act = pair(max_hop=3, bias=0.5)
    act.save_pretrained(tmp_path / "act")
    loaded = ArmtModel.from_pretrained(tmp_path / "act")
    assert loaded.config.act and loaded.config.max_hop == 3
    torch.testing.assert_close(loaded.act_b, act.act_b)
    torch.testing.assert_close(loaded.forward_long(ids(25))[0], act.forward_long(ids(25))[0])
    assert "max_hop" not in CFG.to_dict() and "act" not in CFG.to_dict()  # old models keep their exact config
    with pytest.raises(ValueError, match="max_hop"):
        replace(CFG, act=True, max_hop=0)


def test_ca_training_steps_with_act(tmp_path):
    from model.training import TrainConfig, Trainer
    from model.training.reasoning import ca_accuracy, new_ca_model

    model = new_ca_model("armt", layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8, act=True,
                         max_hop=2)
    before = model.act_w.detach().clone()
    cfg = TrainConfig(task="ca", stages=(1,), batch_size=4, aux_batch_size=0, copy_batch_size=0, probe_weight=0.0,
                      warmup=1, max_steps=2, checkpoint_every=1e9, decay="steps", heldout=8)
    rows = []
    Trainer(model, None, cfg, tmp_path).run(rows.append)
    assert len(rows) == 2 and 1.0 <= rows[-1]["ponder"] <= 3.0 and 0 <= rows[-1]["cell_acc"] <= 1
    assert not torch.equal(before, model.act_w)  # the ponder cost and the mix train the halting unit
    row = ca_accuracy(model, n_samples=8, batch_size=4, max_hop=1, seed=random.randrange(100))
    assert row["mean_hops"] == 1.0 and row["samples"] == 8 and 0 <= row["cell_accuracy"] <= 1


def test_hop_statistics_do_not_depend_on_batching():
    """Each call's mean counted as much as any other: the same orbits gave 2.41, 2.44 or 2.46 mean hops at batch
    sizes 1, 4 and 8. Now every token counts once."""
    from model.training.reasoning import ca_accuracy, new_ca_model

    model = new_ca_model("armt", layers=2, hidden=32, heads=2, ffn=64, num_mem_tokens=4, d_mem=8, act=True,
                         max_hop=4)
    with torch.no_grad():  # tokens halting at different hops
        model.act_w.normal_(0, 4, generator=torch.Generator().manual_seed(0))
        model.act_b.fill_(0.3)
    rows = [ca_accuracy(model, n_samples=9, batch_size=bs, seed=3) for bs in (1, 4, 9)]
    assert 1.5 < rows[0]["mean_hops"] < 3.5
    for row in rows[1:]:
        assert row["hops_per_layer"] == pytest.approx(rows[0]["hops_per_layer"], abs=2e-3)


def test_answer_hops_count_each_position_once():
    """An ACT answer re-runs its final segment for every new token; only the new token of a re-run is counted."""
    _, act = pair(max_hop=3, bias=0.0)
    prompt = [5, 6, 7, 8]
    tokens = []
    for n in (1, 4):
        stats = ActStats()
        list(act.generate(act.new_state(), prompt, max_new_tokens=n, stop_token_ids=[], act_stats=stats))
        tokens.append(stats.tokens[0])
        assert set(stats.tokens.values()) == {tokens[-1]}  # every layer
    assert tokens[1] == tokens[0] + 3


def test_threshold_and_fixed_mode_are_inference_knobs():
    """Beyond Memorization's test-time compute knobs besides max_hop: epsilon (the threshold 1 - eps) and
    fixed-computation mode; the stats log the remainders."""
    plain, act = pair(max_hop=4, bias=torch.logit(torch.tensor(0.4)).item())
    with torch.no_grad():
        act.act_w.zero_()  # p = 0.4 at every hop and token
    for kwargs, hops, remainder in (({}, 3.0, 0.2), ({"act_threshold": 0.5}, 2.0, 0.6),
                                    ({"act_threshold": 1.0}, 3.0, 0.2), ({"act_fixed": True}, 4.0, 0.0),
                                    ({"act_fixed": True, "max_hop": 2}, 2.0, 0.0)):
        stats = ActStats()
        act.forward_long(ids(25), act_stats=stats, **kwargs)
        assert stats.mean_hops == pytest.approx(hops) and stats.mean_remainder == pytest.approx(remainder), kwargs
    stats = ActStats()
    list(act.generate(act.new_state(), [5, 6, 7], max_new_tokens=2, stop_token_ids=[], act_stats=stats,
                      act_threshold=0.5))
    assert stats.mean_hops == pytest.approx(2.0)
    for model, kwargs in ((plain, {"act_threshold": 0.5}), (plain, {"act_fixed": False}), (act, {"act_threshold": 0}),
                          (act, {"act_threshold": 1.5}), (act, {"act_fixed": 1})):
        with pytest.raises(ValueError, match="act_"):
            model.forward_long(ids(5), **kwargs)
