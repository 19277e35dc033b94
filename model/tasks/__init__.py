"""Synthetic tasks for training and evaluation: BABILong-style QA1/QA2 in real prose, associative retrieval."""
from .babi import PEOPLE, PLACES, TASK_WORDS, make, qa1, qa2
from .remember import key_gap_value, remember
from .sample import Codec, DoesNotFit, Sample

TASK_NAMES = ("qa1", "qa2", "remember")


def generate(task: str, codec: Codec, rng, n_tokens: int, split: str | None = "train", **kw) -> Sample:
    """One sample of `task` with (about) n_tokens tokens; deterministic in `rng`."""
    if task == "remember":
        return remember(codec, rng, n_tokens, split or "train", **kw)
    return make(task, codec, rng, n_tokens, split, **kw)


__all__ = ["Codec", "DoesNotFit", "Sample", "PEOPLE", "PLACES", "TASK_WORDS", "TASK_NAMES", "generate", "qa1", "qa2",
           "remember", "key_gap_value"]
