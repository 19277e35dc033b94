"""The inference-time compute knob through the service: `max_hop` on ask for ACT models, hops reported in the
answer and in armt_act_hops; a clear 422 where it does not apply."""
from __future__ import annotations

import json

import pytest

from service.settings import Settings
from tests.service_helpers import build_tiny_model, document
from tests.test_service_http import append, assert_error, new, sse, start


@pytest.fixture(scope="module")
def act_client(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("act-model"), act=True)
    client = start(Settings(model=model_dir, data_dir=tmp_path_factory.mktemp("act-data")))
    yield client
    client.__exit__(None, None, None)


def test_max_hop_is_reported_and_measured(act_client):
    c = act_client
    sid = new(c)
    append(c, sid, 0, document(500).encode())
    one = c.post(f"/v1/sessions/{sid}/ask", json={"question": "What?", "max_new_tokens": 4, "max_hop": 1}).json()
    assert one["mean_hops"] == 1.0
    three = c.post(f"/v1/sessions/{sid}/ask", json={"question": "What?", "max_new_tokens": 4, "max_hop": 3}).json()
    assert 1.0 <= three["mean_hops"] <= 3.0
    default = c.post(f"/v1/sessions/{sid}/ask", json={"question": "What?", "max_new_tokens": 4}).json()
    assert 1.0 <= default["mean_hops"] <= 4.0  # the model's configured max_hop (4)
    events = sse(c, f"/v1/sessions/{sid}/ask", {"question": "What?", "max_new_tokens": 4, "max_hop": 1,
                                               "stream": True})
    assert [json.loads(d) for name, d in events if name == "done"] == [one]
    metrics = c.get("/metrics").text
    assert "armt_act_hops_count 4.0" in metrics and 'armt_act_hops_bucket{le="1.0"}' in metrics
    assert_error(c.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_hop": 0}), 422, "invalid_request")
    assert_error(c.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_hop": 65}), 422, "invalid_request")


def test_max_hop_on_a_model_without_act_is_422(tiny_model_dir, tmp_path):
    c = start(Settings(model=tiny_model_dir, data_dir=tmp_path))
    try:
        sid = new(c)
        r = c.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_hop": 2})
        assert "adaptive computation time" in assert_error(r, 422, "invalid_request")["message"]
        plain = c.post(f"/v1/sessions/{sid}/ask", json={"question": "q", "max_new_tokens": 2}).json()
        assert plain["mean_hops"] is None
    finally:
        c.__exit__(None, None, None)
