"""Engine semantics: chunk invariance, generate on copies, state round trips, sampling and input errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from model import ArmtModel, MemoryState, StateMismatchError
from model.generation import SamplingParams, sample, top_p_filter
from tests.conftest import VOCAB, build_reference, write_official


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    ref = build_reference(request.param, segment_size=10)
    return ArmtModel.from_pretrained(write_official(ref, tmp_path_factory.mktemp(request.param)))


def _doc(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB - 2) for _ in range(n)]


def test_chunked_ingest_equals_one_shot(model):
    doc = _doc(97)
    whole = model.ingest(model.new_state(), doc)
    rng = random.Random(1)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, len(doc)), 6))
        state = model.new_state()
        for a, b in zip([0] + cuts, cuts + [len(doc)]):
            state = model.ingest(state, doc[a:b])
        assert state.pending == whole.pending == doc[90:]
        assert (state.segments, state.tokens) == (whole.segments, whole.tokens) == (9, 97)
        assert_close(state.A, whole.A, atol=0, rtol=0)
        assert_close(state.z, whole.z, atol=0, rtol=0)
        assert state.digest() == whole.digest()


def test_ingest_of_whole_segments_matches_forward_long(model):
    doc = _doc(60)
    _, full = model.forward_long(torch.tensor([doc]))
    state = model.ingest(model.new_state(), doc)
    assert state.pending == [] and state.segments == 6
    assert_close(state.A, full.A, atol=1e-6, rtol=1e-6)


def test_generate_never_mutates_state(model):
    state = model.ingest(model.new_state(), _doc(45))
    before = state.digest()
    first = list(model.generate(state, _doc(7, 2), max_new_tokens=6))
    again = list(model.generate(state, _doc(7, 2), max_new_tokens=6))
    assert state.digest() == before
    assert first == again and len(first) == 6


def test_a_half_read_generate_leaves_gradients_on_for_the_caller(model):
    """Grad mode is per thread: an iterator suspended inside no_grad would switch gradients off in the caller."""
    tokens = model.generate(model.ingest(model.new_state(), _doc(45)), _doc(7, 2), max_new_tokens=6)
    next(tokens)
    next(tokens)
    assert torch.is_grad_enabled()
    tokens.close()


def test_generate_from_pending_only(model):
    state = model.ingest(model.new_state(), _doc(25))
    assert len(list(model.generate(state, [], max_new_tokens=3))) == 3
    with pytest.raises(ValueError, match="nothing to continue"):
        model.generate(model.new_state(), [], max_new_tokens=3)


def test_save_load_round_trip_gives_identical_next_logits(model, tmp_path):
    state = model.ingest(model.new_state(), _doc(73))
    state.save(tmp_path / "s.safetensors")
    loaded = MemoryState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint)
    assert loaded.digest() == state.digest()
    nxt = _doc(20, 9)
    a, b = model.ingest(state, nxt), model.ingest(loaded, nxt)
    assert_close(a.A, b.A, atol=0, rtol=0)
    q = _doc(5, 4)
    assert list(model.generate(a, q, max_new_tokens=5)) == list(model.generate(b, q, max_new_tokens=5))


def test_state_of_another_model_is_refused(model, tmp_path):
    state = model.ingest(model.new_state(), _doc(30))
    state.fingerprint = "0123456789abcdef"
    state.save(tmp_path / "s.safetensors")
    with pytest.raises(StateMismatchError, match="0123456789abcdef"):
        MemoryState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint)
    with pytest.raises(StateMismatchError):
        model.ingest(MemoryState.load(tmp_path / "s.safetensors"), [1, 2])


def test_state_size_is_constant(model):
    short = model.ingest(model.new_state(), _doc(20))
    long = model.ingest(model.new_state(), _doc(400))
    L, d = model.n_layers, model.base.d_model
    assert short.nbytes == long.nbytes == 4 * (L * model.config.d_key * d + L * model.config.d_key)


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a state")
    with pytest.raises(ValueError, match="cannot read memory state"):
        MemoryState.load(path)


def _tampered(model, tmp_path, **change):
    """A saved state of `model` with some of its parts replaced (tensors, or metadata keys; None drops one)."""
    from safetensors.torch import save_file

    state = model.ingest(model.new_state(), _doc(15))
    tensors = {"A": state.A, "z": state.z, "pending": torch.tensor(state.pending, dtype=torch.int64)}
    meta = state.metadata()
    for key, value in change.items():
        target = tensors if key in tensors else meta
        if value is None:
            del target[key]
        else:
            target[key] = value
    path = tmp_path / "state.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"armt": json.dumps(meta)})
    return path


@pytest.mark.parametrize("change,match", [
    ({"fingerprint": None}, "lacks fingerprint"),
    ({"z": None}, "lacks z"),
    ({"A": torch.zeros(2, 3, 4, dtype=torch.float16)}, "float32"),
    ({"A": torch.zeros(2, 3, 4, dtype=torch.float64)}, r"float32 \(or both float64\)"),  # z float32
    ({"A": torch.zeros(2, 3)}, r"A must be \[L, d_key, d\]"),
    ({"pending": torch.tensor([4, -3])}, "non-negative"),
    ({"segments": "many"}, "integers"),
    ({"segments": -3}, "integers >= 0"),  # loaded, and ingest went on counting from -3
    ({"tokens_written": 1.5}, "integers >= 0"),  # silently cut to 1
])
def test_a_malformed_state_file_is_a_clear_error(model, tmp_path, change, match):
    path = _tampered(model, tmp_path, **change)
    for read in (lambda: MemoryState.load(path), lambda: MemoryState.from_bytes(path.read_bytes())):
        with pytest.raises(ValueError, match=match):
            read()


def test_a_float64_model_keeps_float64_memory_and_takes_float32_states(tmp_path):
    """A float64 model (the rounding-free reference of exactness checks) keeps its memory in float64, its states
    save and load, and a float32 state is promoted when used (a float32 model rounds a float64 one)."""
    model = ArmtModel.from_pretrained(write_official(build_reference("llama", segment_size=10), tmp_path))
    ids = list(range(1, 38))
    state32 = model.ingest(model.new_state(), ids)  # 3 segments written, 7 tokens pending
    exact = model.to(torch.float64)
    state64 = exact.ingest(exact.new_state(), ids)
    assert state64.A.dtype == state64.z.dtype == torch.float64 == exact.new_state().A.dtype
    path = tmp_path / "state64.safetensors"
    state64.save(path)
    loaded = MemoryState.load(path)
    torch.testing.assert_close(loaded.A, state64.A, rtol=0, atol=0)
    more = exact.ingest(state32, ids)  # float32 state, float64 memory math from here
    assert more.A.dtype == torch.float64 and (more.segments, len(more.pending)) == (7, 4)
    short = [exact.ingest(state32, [1, 2]), *exact.ingest_many([state32], [[1, 2]])]  # nothing written: same dtype
    assert [(s.A.dtype, s.z.dtype, s.segments) for s in short] == [(torch.float64, torch.float64, 3)] * 2
    exact.stacked_blocks()  # derived float64 tensors, dropped by the cast back
    back = exact.to(torch.float32)
    assert "_derived_cache" not in back.__dict__
    assert back.ingest(loaded, ids).A.dtype == back.ingest(loaded, [1]).A.dtype == torch.float32


def test_a_memory_that_overflowed_round_trips(model, tmp_path):
    """A model whose memory overflows on a long document (untrained weights do) writes inf / NaN: what the engine
    wrote, a store must read back. Refused at load, such a session answered 200 on the replica that had it cached
    and 503 on every other (found by a Redis outage test)."""
    state = model.ingest(model.new_state(), _doc(25))
    state.A[0, 0, 0], state.z[-1, -1] = float("nan"), float("inf")
    state.save(tmp_path / "s.safetensors")
    loaded = MemoryState.load(tmp_path / "s.safetensors", fingerprint=model.fingerprint)
    assert loaded.digest() == state.digest() and torch.isnan(loaded.A[0, 0, 0])


@pytest.mark.parametrize("change,match", [
    ({"A": torch.zeros(2, 6, 8), "z": torch.zeros(2, 6)}, "this model needs"),
    ({"pending": torch.tensor([5000])}, "outside the vocabulary"),
    ({"pending": torch.arange(1, 11)}, "10 pending tokens"),  # a whole segment unwritten: generate crashed on it
])
def test_a_state_that_does_not_fit_the_model_is_refused(model, tmp_path, change, match):
    state = MemoryState.load(_tampered(model, tmp_path, **change), fingerprint=model.fingerprint)
    for use in (lambda: model.ingest(state, [1]), lambda: model.generate(state, [1])):
        with pytest.raises(ValueError, match=match):
            use()


@pytest.mark.parametrize("bad,match", [
    ([], "empty"),
    ([1, VOCAB], f"token id {VOCAB}, outside the vocabulary"),
    ([-1, 2], "token id -1"),
    (torch.tensor([1.0, 2.0]), "integer dtype"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
    ([[1, 2], [3]], "integer token ids"),
    ([1.7, 2.2], "integer dtype"),  # never truncated to [1, 2]
    (np.array([1.5, 2.5]), "integer dtype"),
    ([True, False], "integer dtype"),
    (torch.zeros(0, 3, dtype=torch.long), "B >= 1"),
])
def test_bad_inputs_are_value_errors(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.forward_long(bad)


def test_integer_arrays_and_empty_lists_are_ids(model):
    state = model.ingest(model.new_state(), np.array([3, 4, 5], dtype=np.int32))
    assert state.pending == [3, 4, 5] and model.ingest(state, []).pending == [3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_ids_are_ids(model, dtype):
    """Pre-tokenised data often comes as uint16: torch has no min/max for it, and the range check crashed."""
    assert model.ingest(model.new_state(), torch.tensor([3, 4, 5], dtype=dtype)).pending == [3, 4, 5]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.ingest(model.new_state(), torch.tensor([3, VOCAB], dtype=dtype))
    if dtype == torch.uint64:  # 2**64 - 1 is no id either (it is -1 as int64)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.ingest(model.new_state(), torch.tensor([2**64 - 1], dtype=dtype))


def test_a_misspelt_executor_is_an_error_at_once(model):
    state = model.new_state()
    for call in (lambda: model.ingest(state, [1, 2], executor="bogus"),  # nothing would be written yet
                 lambda: model.generate(state, [1, 2], executor="bogus"),  # raised by the call, not by next()
                 lambda: model.forward_long([1, 2], executor="bogus")):
        with pytest.raises(ValueError, match="unknown executor 'bogus'"):
            call()


def test_sampling_params_are_checked(model):
    state = model.ingest(model.new_state(), _doc(15))
    for kwargs, match in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"temperature": float("inf")}, "finite"),
                          ({"temperature": "0.5"}, "temperature must be a number"), ({"seed": "x"}, "seed"),
                          ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"seed": 2**64}, "seed")]:
        with pytest.raises(ValueError, match=match):
            model.generate(state, [1], **kwargs)


def test_gpt2_decode_beyond_position_table_is_refused(tmp_path):
    model = ArmtModel.from_pretrained(write_official(build_reference("gpt2", segment_size=10), tmp_path))
    with pytest.raises(ValueError, match="n_positions=128"):
        model.generate(model.new_state(), [1, 2, 3], max_new_tokens=200)


def test_stop_tokens_end_the_stream(model):
    state = model.ingest(model.new_state(), _doc(31))
    free = list(model.generate(state, [3, 4], max_new_tokens=8, stop_token_ids=[]))
    stop = free[2]
    cut = list(model.generate(state, [3, 4], max_new_tokens=8, stop_token_ids=[stop]))
    assert cut == free[: free.index(stop) + 1]


def test_seeded_sampling_is_reproducible(model):
    state = model.ingest(model.new_state(), _doc(31))
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7, stop_token_ids=[])
    assert list(model.generate(state, [5], **kw)) == list(model.generate(state, [5], **kw))


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert_close(top_p_filter(probs, 0.7), torch.tensor([0.5, 0.3, 0.0, 0.0]))
    assert_close(top_p_filter(probs, 0.1), torch.tensor([0.5, 0.0, 0.0, 0.0]))
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert sample(logits, SamplingParams(temperature=0.0), None) == 1


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e308])
def test_extreme_temperatures_sample_without_nan(temperature):
    """A temperature that is 0 in float32 (5e-324, schema-valid: `temperature >= 0`) gave nan probabilities and a
    crash in multinomial, a 500; tiny ones now pick the top token, huge ones sample almost uniformly."""
    logits = torch.tensor([0.0, 5.0, 1.0, -2.0])
    generator = torch.Generator().manual_seed(0)
    token = sample(logits, SamplingParams(temperature=temperature, top_p=0.5), generator)
    assert token == 1 if temperature < 1 else 0 <= token < 4


def test_a_cast_keeps_rope_in_fp32(tmp_path):
    """model.to(bf16) rotates by the same angles as loading in bf16: HF keeps RoPE's inverse frequencies in fp32 when
    it builds or loads in a dtype, and a cast must not round them (at position ~1000 that is ~1 rad)."""
    ref = build_reference("llama", segment_size=10)
    loaded = ArmtModel.from_pretrained(write_official(ref, tmp_path), dtype=torch.bfloat16)
    cast = ArmtModel.from_pretrained(write_official(ref, tmp_path)).to(torch.bfloat16)
    positions = torch.arange(0, 4000, 7).unsqueeze(0)  # [1, T]
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    for got, want in zip(cast.base.rope(x, positions), loaded.base.rope(x, positions)):
        assert_close(got, want, rtol=0, atol=0)
    assert cast.base.hf.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_prompt_of_its_own_segment_is_answered_as_if_the_tail_were_written_first(model):
    """own_segment=True: pending tail (7 tokens) + prompt (5) > a segment (10): the tail is written alone, then the
    prompt is the final segment, which is what generating from a state with the tail written gives. The default
    layout cuts at the segment size, as the official generate (tests/test_official_checkpoints.py)."""
    doc, prompt = _doc(27), _doc(5, seed=1)
    state = model.ingest(model.new_state(), doc)
    assert len(state.pending) == 7
    kw = {"max_new_tokens": 6, "stop_token_ids": []}
    tail_written = model.forward_long(torch.tensor([doc]))[1]  # every segment written, the short last one too
    tail_written = MemoryState(tail_written.A, tail_written.z, model.fingerprint, segments=3, tokens_written=27)
    want = list(model.generate(tail_written, prompt, **kw))
    assert list(model.generate(state, prompt, own_segment=True, **kw)) == want
    official = list(model.generate(state, prompt, **kw))
    assert official == list(model.generate(model.ingest(state, prompt[:3]), prompt[3:], **kw))


def test_states_of_a_batch_own_their_memory(model):
    """forward_long over B rows and ingest_many over N sessions hand out one state per row; a view into the batch
    tensor kept all B (N) memories alive with each state the service caches."""
    def owned(state):
        return state.A.untyped_storage().nbytes() == state.A.nbytes and state.z.untyped_storage().nbytes() == \
            state.z.nbytes

    _, states = model.forward_long(torch.tensor([_doc(25, seed) for seed in range(3)]))
    many = model.ingest_many([model.new_state() for _ in range(3)], [_doc(25, seed) for seed in range(3)])
    assert all(owned(s) for s in states + many)
