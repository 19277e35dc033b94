"""The shipped default model answers QA1 questions from memory: through the engine API and through the service.

Small samples (the measured curves are in the README, from `armt eval`); these catch a broken export, a tokenizer
mismatch between training and serving, or a service prompt layout the model was not trained on.
"""
from __future__ import annotations

import random
import time

import pytest
from fastapi.testclient import TestClient

from model import ArmtModel, default_model_path
from model.tasks import Codec, qa1
from service.http.app import create_app
from service.settings import Settings

SEGMENTS = 8  # half the trained length: the supporting facts are mostly several segments back


@pytest.fixture(scope="module")
def model():
    return ArmtModel.from_pretrained(default_model_path())


def documents(model, n: int, seed: int):
    """(document text, question, answer) from the evaluation-only prose; the question is not in the text."""
    codec = Codec(model.tokenizer)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = qa1(codec, rng, SEGMENTS * model.config.segment_size, "eval")
        text = model.tokenizer.decode(s.ids)
        cut = text.rindex("Where is ")
        out.append((text[:cut].rstrip(), text[cut:text.index("?", cut) + 1], s.answer))
    return out


def test_engine_api_answers_from_memory(model):
    right = 0
    eos = set(model.default_stop_ids())
    for text, question, answer in documents(model, 24, seed=7):
        state = model.ingest(model.new_state(), model.tokenizer.encode(text).ids)
        assert state.segments >= SEGMENTS - 2
        prompt = model.tokenizer.encode(" " + question).ids
        out = [t for t in model.generate(state, prompt, max_new_tokens=4) if t not in eos]
        right += model.tokenizer.decode(out).strip() == answer
    assert right >= 21, f"{right}/24"


@pytest.mark.parametrize("tail", [1, 2])
def test_a_question_a_segment_boundary_would_cut_is_read_whole(model, tail):
    """Pending tail + question longer than a segment: cut where the segment size fell, only the question's last
    `tail` tokens reached the final segment and the model answered 0/24 ('?') and 7/24 (' Mary?'). The question now
    starts a segment of its own (generate's own_segment=True, as the service and `armt generate` ask)."""
    from model.training.batches import document

    codec, S = Codec(model.tokenizer), model.config.segment_size
    rng, right = random.Random(100 + tail), 0
    for _ in range(12):
        d = document(codec, rng, "qa1", 4, 3 * S + tail + 2, 1, "eval")  # + answer + EOS
        a0 = d.answers[-1][0]
        qs = max(i for i in range(a0) if "Where" in model.tokenizer.decode(d.ids[i:a0]))  # the question's start
        state = model.ingest(model.new_state(), d.ids[:qs])
        assert len(state.pending) + a0 - qs == S + tail  # a question the old layout cut
        answer = model.generate(state, d.ids[qs:a0], max_new_tokens=3, own_segment=True)
        right += list(answer) == d.ids[a0 : a0 + 3]
    assert right >= 10, f"{right}/12"


def test_cli_generate_answers_from_a_text_file(model, tmp_path):
    """`armt generate --context FILE`: a file's final newline must not come between the document and the
    question (the model never saw that layout), and the answer prints without its joining space."""
    from typer.testing import CliRunner

    from service.cli import app

    right, runner = 0, CliRunner()
    for text, question, answer in documents(model, 4, seed=11):
        outs = []
        for ending in ("", "\n"):
            (tmp_path / "doc.txt").write_text(text + ending)
            result = runner.invoke(app, ["generate", str(default_model_path()), "--context", str(tmp_path / "doc.txt"),
                                         "--prompt", question, "--max-new-tokens", "4"])
            assert result.exit_code == 0, result.output
            outs.append(result.stdout)
        assert outs[0] == outs[1] and not outs[0].startswith(" ")
        right += outs[0].strip() == answer
    assert right >= 3, f"{right}/4"


def test_service_answers_from_memory_with_chunked_uploads(model, tmp_path):
    settings = Settings(model=default_model_path(), data_dir=tmp_path)
    with TestClient(create_app(settings)) as c:
        for _ in range(600):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        right = 0
        rng = random.Random(3)
        for text, question, answer in documents(model, 12, seed=11):
            sid = c.post("/v1/sessions").json()["id"]
            data, offset = (text + "\n").encode(), 0
            while offset < len(data):
                step = rng.randint(1, 700)
                r = c.post(f"/v1/sessions/{sid}/append", params={"offset": offset}, content=data[offset:offset + step],
                           headers={"Content-Type": "text/plain; charset=utf-8"})
                assert r.status_code == 200, r.text
                offset = r.json()["offset"]
            r = c.post(f"/v1/sessions/{sid}/ask", json={"question": question, "max_new_tokens": 4})
            assert r.status_code == 200, r.text
            right += r.json()["answer"].strip() == answer
        assert right >= 10, f"{right}/12"


def test_evaluation_does_not_depend_on_the_batch_size(model):
    """One document length per batch, from the documents' own generator: armt eval --task qa2 at 2 segments read
    0.391, 0.438 or 0.500 at batch sizes 16, 8 and 1."""
    from model.training import accuracy

    codec = Codec(model.tokenizer)
    rows = [accuracy(model, codec, "qa2", 2, 12, seed=5, batch_size=b) for b in (1, 5, 12)]
    assert rows[0]["correct"] == rows[1]["correct"] == rows[2]["correct"], rows
    assert 0 < rows[0]["correct"] < 12  # a score that could differ (the QA1 model half-answers QA2)
