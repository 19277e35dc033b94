"""SIGKILL at 21 moments (7 during appends, 7 inside a state write, 7 during a streamed question) while documents
stream into a real `armt serve`; after each restart every session equals a never-killed reference server's,
in-flight appends retried as a client would are applied exactly once, and every upload resumes to its end.
The script behind it (bench/crash_harness.py, `--kills 100`) is what the README's figures come from."""
from __future__ import annotations

import asyncio

from bench.crash_harness import run, summary

KILLS, SESSIONS = 21, 2


def test_sigkill_at_21_moments_loses_corrupts_and_duplicates_nothing(tiny_model_dir, tmp_path):
    report = asyncio.run(run(tiny_model_dir, tmp_path, kills=KILLS, sessions=SESSIONS, seed=7, save_delay=0.05))
    print(summary(report))
    assert report["problems"] == [], report["problems"]
    assert report["corrupt"] == report["lost_acknowledged"] == report["duplicates"] == 0
    assert report["unexpected_answers"] == 0
    assert report["kills_by_mode"] == {"append": 7, "save": 7, "ask": 7}
    assert report["inside_state_write"] == 7  # each save kill found the temporary file: the write was cut off
    assert report["session_checks"] == KILLS * SESSIONS
    assert report["retries"] >= 7 and report["retries"] == report["committed_answer_lost"] + report["not_committed"]
    assert report["completed_documents"] == SESSIONS
