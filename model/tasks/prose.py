"""Real English prose for filler, from sources every CPython install carries (offline, PSF licence).

- train: the topics of Python's language reference as `pydoc` ships them (`pydoc_data.topics`);
- eval:  the docstrings of a fixed list of standard-library modules (read with `ast`, never imported).
The two are disjoint texts by different means and styles, so evaluation measures filler the model never saw.
Text is cut into sentences; lines that look like code (few letters) are dropped, whitespace runs become one space.
"""
from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

EVAL_MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "collections/__init__", "concurrent/futures/_base", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "email/message", "enum", "fractions", "functools", "heapq",
    "http/client", "http/server", "inspect", "ipaddress", "json/__init__", "logging/__init__", "mailbox",
    "multiprocessing/pool", "optparse", "pathlib", "pickle", "queue", "random", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest/case", "urllib/request", "uuid", "zipfile", "difflib", "doctest", "pdb", "sched", "selectors",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences_of(text: str) -> list[str]:
    """Prose sentences of a text: whitespace normalised, 4-60 words, mostly letters (code and tables dropped)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            letters = sum(c.isalpha() for c in sentence)
            if 4 <= len(words) <= 60 and letters >= 0.7 * len(sentence) and sentence[-1] in ".!?":
                out.append(sentence)
    return out


@lru_cache(maxsize=None)
def train_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(s for key in sorted(topics) for s in sentences_of(topics[key]))


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


@lru_cache(maxsize=None)
def eval_sentences() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in EVAL_MODULES:
        path = stdlib / f"{name}.py"
        if path.is_file():
            for doc in _docstrings(path):
                out.extend(sentences_of(doc))
    seen = set(train_sentences())
    shared = _train_runs()
    # de-duplicated, disjoint from train (also near copies: pdb's docstrings repeat the reference's debugger
    # section with other markup), order kept
    return tuple(s for s in dict.fromkeys(out) if s not in seen and not _runs(s) & shared)


RUN = 8  # words: a run this long shared with the training prose makes a sentence a near copy


def _runs(sentence: str) -> set[tuple[str, ...]]:
    """The sentence's runs of RUN words, lower-cased, markup and punctuation stripped."""
    words = re.sub(r"[^a-z0-9 ]+", " ", sentence.lower()).split()
    return {tuple(words[i : i + RUN]) for i in range(len(words) - RUN + 1)}


@lru_cache(maxsize=None)
def _train_runs() -> frozenset[tuple[str, ...]]:
    return frozenset(run for s in train_sentences() for run in _runs(s))


def sentences(split: str) -> tuple[str, ...]:
    if split == "train":
        return train_sentences()
    if split == "eval":
        return eval_sentences()
    raise ValueError(f"prose split must be 'train' or 'eval', got {split!r}")
