"""Text conventions shared by training, evaluation, the CLI and the service: tokenizer, chunk cuts, prompts.

The default model's tokenizer is byte-level BPE (GPT-2 pre-tokenizer regex, no prefix space), so any UTF-8 text
encodes, and the token sequence of a text is the concatenation of the tokens of its pre-tokenizer pieces. A piece
never spans a point where a whitespace character is followed by a non-whitespace one, so cutting the text just
before such a whitespace character gives tokens that do not depend on the cut: `split_ready` finds that point, and
the service holds back the unfinished tail of each upload until more text (or a question) arrives.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
# Unicode White_Space, what the tokenizer's regex calls \s (Python's str.isspace also counts U+001C-U+001F).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                       "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3000, extra_words: Iterable[str] = ()):
    """Byte-level BPE over `texts` (plus `extra_words`, each repeated so that it merges into one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    boost = [" " + " ".join(extra_words)] * 2000 if extra_words else []
    tok.train_from_iterator(list(texts) + boost, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def split_ready(text: str) -> tuple[str, str]:
    """(ready, held): `ready` tokenizes the same whatever follows; `held` waits for more text.

    The cut is before the last whitespace character that is followed by a non-whitespace one, so that a word (and
    the space that joins it to the previous word) is never split. Text with no such point is held whole.
    """
    for i in range(len(text) - 2, -1, -1):
        if text[i] in WHITESPACE and text[i + 1] not in WHITESPACE:
            return text[:i], text[i:]
    return "", text


def question_text(question: str) -> str:
    """How a question follows the document: one space, then the question as asked (trimmed)."""
    return " " + question.strip()


def answer_text(answer: str) -> str:
    """How an answer follows its question in training data: one space, then the answer (then EOS)."""
    return " " + answer.strip()
