"""The cellular-automata reasoning task in the trainer: batches, a fresh model sized like the paper's, evaluation.

One model per (architecture, k): a 4-layer, hidden-128 LLaMA-style base over the 128-token CA vocabulary, either
plain (one segment holds the whole 231-token sample, no memory tokens: full attention, the paper's transformer
baseline) or ARMT (21-token segments, one state each, 16 memory tokens), with or without ACT. Scores are the
paper's: exact match of the whole 20-cell state, and per-cell accuracy, on rules never seen in training.
"""
from __future__ import annotations

import random

import torch

from ..act import ActRun, ActStats
from ..tasks.cellular_automata import EOS, GROUP, PAD, VOCAB, WIDTH, ca_sample, check_k, sequence_length
from .batches import Batch, collate
from .evaluate import wilson


def ca_batch(rng: random.Random, batch_size: int, k: int | None, variant: str, split: str = "train",
             context: bool = False) -> Batch:
    """context: also train on the given states, scored apart from the target (training's --ca-context)."""
    samples = [ca_sample(rng, split, k, variant, context) for _ in range(batch_size)]
    return collate(samples, PAD, with_probe=False)


def new_ca_model(arch: str = "armt", layers: int = 4, hidden: int = 128, heads: int = 4, ffn: int = 512,
                 num_mem_tokens: int = 16, d_mem: int = 32, act: bool = False, max_hop: int = 4,
                 act_fixed: bool = False, variant: str = "os", seed: int = 0):
    """arch "armt": 21-token segments (one state each); "plain": the whole sample in one segment, no memory."""
    from ..armt import ArmtModel
    from ..config import ArmtConfig
    from ..hf_base import make_config

    if arch not in ("armt", "plain"):
        raise ValueError(f"arch must be armt or plain, got {arch!r}")
    base = make_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)
    plain = arch == "plain"
    armt = ArmtConfig(num_mem_tokens=0 if plain else num_mem_tokens, d_mem=d_mem,
                      segment_size=sequence_length(variant) if plain else GROUP, armt_version=2,
                      act=act, max_hop=max_hop, act_fixed=act_fixed)
    model = ArmtModel.from_config(base, armt, seed=seed)
    model.tokenizer = None
    return model


@torch.no_grad()
def ca_accuracy(model, k: int | None = None, variant: str = "os", n_samples: int = 512, split: str = "test",
                seed: int = 0, batch_size: int = 64, max_hop: int | None = None, act_threshold: float | None = None,
                act_fixed: bool | None = None) -> dict:
    """Exact match (all 20 cells of a target state) and cell accuracy on fresh orbits of `split`'s rules.

    k as ca_sample takes it: shift with k = None scores a random mix of horizons (training's held-out check), a
    fixed k one horizon. O-O (k = None) scores each of its four horizons separately (`exact_by_horizon`);
    `exact` is then the first one's. ACT models: max_hop, act_threshold and act_fixed override the configured
    ones (model/act.py); the row gets the mean hops per layer and the mean remainder.
    """
    k = check_k(k, variant)
    check_fits(model, variant)
    ActRun.for_model(model.config, max_hop, threshold=act_threshold, fixed=act_fixed)  # bad overrides: now
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    stats = ActStats() if model.config.act else None
    exact = cells = done = 0
    per_horizon: list[int] = []
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        batch = ca_batch(rng, b, k, variant, split)
        logits, _ = model.forward_long(batch.inputs.to(model.device), max_hop=max_hop, act_stats=stats,
                                       act_threshold=act_threshold, act_fixed=act_fixed)
        pred = logits.argmax(-1).reshape(-1).cpu()  # [B * T]: position p predicts token p + 1
        hit = pred[batch.answer_pos - 1] == batch.ids.reshape(-1)[batch.answer_pos]  # [N]
        per_state = hit.reshape(-1, WIDTH).all(-1).reshape(b, -1)  # [B, states per sample]
        if not per_horizon:
            per_horizon = [0] * per_state.shape[1]
        for j in range(per_state.shape[1]):
            per_horizon[j] += int(per_state[:, j].sum())
        exact += int(per_state[:, 0].sum())
        cells += int(hit.reshape(b, -1, WIDTH)[:, 0].sum())
        done += b
    model.train(was_training)
    lo, hi = wilson(exact, done)
    row = {"task": "ca", "variant": variant, "k": k, "split": split, "samples": done, "correct": exact,
           "accuracy": exact / done, "ci95": [round(lo, 4), round(hi, 4)], "cell_accuracy": cells / (done * WIDTH),
           "max_hop": max_hop, "act_threshold": act_threshold, "act_fixed": act_fixed}
    if variant == "oo":
        row["exact_by_horizon"] = [c / done for c in per_horizon]
    if stats is not None:
        row["mean_hops"] = round(stats.mean_hops, 3)
        row["hops_per_layer"] = [round(x, 3) for x in stats.hops_per_layer]
        row["mean_remainder"] = round(stats.mean_remainder, 4)
    return row


def check_fits(model, variant: str) -> None:
    """ValueError for a model without memory tokens whose segment is shorter than a sample: its later segments
    would see none of the given states (a plain model holds the whole sample of the variant it was made for)."""
    if model.base.vocab_size != VOCAB or getattr(model, "tokenizer", None) is not None:
        raise ValueError(f"not a cellular-automata model: it has a tokenizer or a vocabulary of "
                         f"{model.base.vocab_size} (CA models have {VOCAB} ids and no tokenizer; armt train --task ca)")
    if model.config.num_mem_tokens == 0 and sequence_length(variant) > model.config.segment_size:
        raise ValueError(f"this model has no memory tokens and {model.config.segment_size}-token segments: a "
                         f"{variant!r} sample ({sequence_length(variant)} tokens) does not fit in one segment")
