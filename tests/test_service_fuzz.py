"""Schemathesis against the service's own OpenAPI schema, on a real `armt serve` (uvicorn on 127.0.0.1): every
generated request, valid and invalid (positive and negative modes), must get a non-5xx answer that matches the
schema (status declared, body valid, content type declared). Paths naming a well-formed session id are pointed
at a real session of the caller, so that appends and questions reach the engine instead of stopping at a 404.

The cases run with the tenant's bearer key, so auth is part of every case; the number of cases run is asserted
(>= 500).
"""
from __future__ import annotations

import os
import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.service_helpers import Server

KEY = "fuzz-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
# Per operation and mode; operations without inputs stop early (hypothesis finds nothing new to try). CI runs a
# fixed sequence (derandomized); a longer exploration: ARMT_FUZZ_EXAMPLES=300 ARMT_FUZZ_RANDOM=1 pytest ... -s
EXAMPLES = int(os.environ.get("ARMT_FUZZ_EXAMPLES", "40"))
DERANDOMIZE = not os.environ.get("ARMT_FUZZ_RANDOM")
MIN_CASES = 500


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("fuzz-data"), ARMT_API_KEYS=f"{KEY}=fuzzer",
                 ARMT_MAX_APPEND_BYTES="4096", ARMT_APPEND_CHUNK_BYTES="1024", ARMT_MAX_NEW_TOKENS_LIMIT="4",
                 ARMT_DEFAULT_MAX_NEW_TOKENS="4", ARMT_MAX_QUESTION_CHARS="2000").start()
    yield srv
    srv.stop()
    log = srv.log.read_text(errors="replace")
    assert "Traceback" not in log, srv.log_tail()


def real_session(url: str) -> str:
    """A fresh session of the fuzzing tenant holding a few words (each case may delete or extend its own)."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        sid = http.post("/v1/sessions").json()["id"]
        r = http.post(f"/v1/sessions/{sid}/append", params={"offset": 0}, content=b"Mary went to the garden. ",
                      headers={"Content-Type": "text/plain; charset=utf-8"})
        assert r.status_code == 200, r.text
    return sid


def point_at_real_session(case, url: str) -> None:
    """Well-formed session ids (path or chat body) name a real session; malformed ones stay as generated."""
    if HEX_ID.match(str((case.path_parameters or {}).get("session_id", ""))):
        case.path_parameters["session_id"] = real_session(url)
    if isinstance(case.body, dict) and HEX_ID.match(str(case.body.get("session_id", ""))):
        case.body["session_id"] = real_session(url)


def excluded(operation) -> list:
    """The chat endpoint refuses (422) some schema-valid bodies by design: the last user message is the question,
    so a conversation without one (or with a blank or over-long one) cannot be asked; no schema says that."""
    return [positive_data_acceptance] if operation.path == "/v1/chat/completions" else []


def fuzz_operation(operation, mode, url: str) -> int:
    """Run EXAMPLES generated cases of one operation in one mode; returns how many ran (raises the first failure,
    shrunk by hypothesis)."""
    ran = [0]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def run(case):
        point_at_real_session(case, url)
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and case.path.endswith("/ask"):
            case.body.pop("max_hop", None)  # the fuzzed model has no ACT: a max_hop is a documented 422
        case.call_and_validate(headers=AUTH, timeout=60, excluded_checks=excluded(operation))
        ran[0] += 1

    try:
        run()
    except Unsatisfiable:  # negative mode of an operation without inputs: nothing can be made invalid
        assert mode == GenerationMode.NEGATIVE and ran[0] == 0
    return ran[0]


def test_generated_requests_get_no_5xx_and_match_the_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    counts, failures = {}, {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            name = f"{operation.label} [{mode.value}]"
            try:
                counts[name] = fuzz_operation(operation, mode, fuzz_server.url)
            except (Exception, FailureGroup) as e:  # collect every operation's failures, then report them all
                failures[name] = f"{type(e).__name__}: {e}"[:3000]
    total = sum(counts.values())
    print(f"schemathesis: {total} cases over {len(operations)} operations: {counts}")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert total >= MIN_CASES, counts
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
