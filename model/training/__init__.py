"""Training and evaluation: tokenizer + fresh model, curriculum trainer, exact-match evaluation."""
from __future__ import annotations

from pathlib import Path

from ..text import EOS, PAD, train_tokenizer
from .evaluate import accuracy, wilson
from .trainer import TrainConfig, Trainer, write_log

EXTRA_WORDS = ("is", "the", "What", "key", "picked", "up", "got", "grabbed", "took", "dropped", "discarded", "put",
               "down", "left", "to")


def default_tokenizer(vocab_size: int = 3000):
    """Byte-level BPE on the training prose, with every task word forced to one token."""
    from ..tasks import TASK_WORDS
    from ..tasks.prose import train_sentences

    return train_tokenizer(train_sentences(), vocab_size, extra_words=tuple(TASK_WORDS) + EXTRA_WORDS)


def new_model(tokenizer, layers: int = 4, hidden: int = 128, heads: int = 4, ffn: int = 512,
              num_mem_tokens: int = 16, d_mem: int = 32, segment_size: int = 64, seed: int = 0, act: bool = False,
              max_hop: int = 4, act_fixed: bool = False):
    """A fresh LLaMA-style ARMT (version 2: L2-normalised DPFP features) sized by the arguments (ACT optional)."""
    from ..armt import ArmtModel
    from ..config import ArmtConfig
    from ..hf_base import make_config

    base = make_config("llama", vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=tokenizer.token_to_id(EOS), pad_token_id=tokenizer.token_to_id(PAD))
    armt = ArmtConfig(num_mem_tokens=num_mem_tokens, d_mem=d_mem, segment_size=segment_size, armt_version=2,
                      act=act, max_hop=max_hop, act_fixed=act_fixed)
    model = ArmtModel.from_config(base, armt, seed=seed)
    model.tokenizer = tokenizer
    return model


def load_for_training(directory: Path, armt=None, needs_tokenizer: bool = True):
    """An existing local model directory: an ARMT (project format / official layouts), or a plain HF LLaMA / GPT-2
    directory, which gets fresh memory parameters shaped by `armt` (an ArmtConfig; default: the default model's).
    Text tasks need its tokenizer.json; the CA task (token ids are cell values) does not."""
    from ..armt import ArmtModel
    from ..checkpoint import from_base
    from ..config import ArmtConfig, is_armt_directory

    directory = Path(directory)
    if is_armt_directory(directory):
        model = ArmtModel.from_pretrained(directory)
    elif (directory / "config.json").is_file():
        model = from_base(directory, armt or ArmtConfig(num_mem_tokens=16, d_mem=32, segment_size=64, armt_version=2))
    else:
        raise FileNotFoundError(f"{directory} is not an ARMT model directory (no armt_config.json) nor a plain HF "
                                "one (no config.json)")
    if needs_tokenizer and model.tokenizer is None:
        raise ValueError(f"{directory} has no tokenizer.json; training needs one")
    return model


__all__ = ["TrainConfig", "Trainer", "accuracy", "wilson", "default_tokenizer", "new_model", "write_log",
           "load_for_training"]
