"""Token sampling as pure functions, and the decode loop over the final (read-only) segment.

Official generate semantics (research/armt.md): every segment of pending tail + prompt except the last is read
and written; the last is read but not written, without memory tokens; decoding continues inside that segment with
a KV cache and reads the (now fixed) memory at every layer of every new token.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_p < 1 keeps the smallest set of tokens with that much probability."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):  # what torch.manual_seed takes
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")


def greedy(logits: torch.Tensor) -> int:
    """logits [V] -> the most likely token id (ties: lowest id, as torch.argmax)."""
    return int(torch.argmax(logits, dim=-1))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of probs [V] outside the nucleus of mass top_p (the top token always stays)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # mass before this token already >= p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V]."""
    if params.temperature == 0:
        return greedy(logits)
    # float64 and shifted by the max: a tiny temperature (even 5e-324, which is 0 in float32) then sends the other
    # logits to -inf and the top one stays 0, never 0/0 or inf - inf = nan.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def decode_final_segment(
    model, final_ids: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first: torch.Tensor, params: SamplingParams,
    act=None,
) -> Iterator[int]:
    """Prefill the final segment final_ids [1, n] (read, no write) and decode token by token.

    A [1, L, d_key, d], z [1, L, d_key] are the memory after every written segment; they are only read.
    ACT models (`act`) re-run the segment for every new token instead of keeping a KV cache (see decode_act).
    """
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    if act is not None:
        yield from decode_act(model, final_ids, A, z, first, params, act, generator)
        return
    cache = model.base.new_cache()
    # never yield inside no_grad: grad mode is per thread, and a caller holding a half-read iterator would find
    # gradients switched off in its own code until the iterator ends
    with torch.no_grad():
        x, positions, _ = model.segment_inputs(final_ids, with_memory=False)  # [1, n', d], [1, n']
        next_pos = positions.shape[1]
        h, _, _ = model.run_layers(x, positions, A, z, first, write=False, cache=cache)
        logits = model.base.head(h[:, -1:])  # [1, 1, V]
    for step in range(params.max_new_tokens):
        token = sample(logits[0, -1].cpu(), params, generator)
        yield token
        if token in params.stop_token_ids or step == params.max_new_tokens - 1:
            return
        with torch.no_grad():
            ids = torch.tensor([[token]], device=final_ids.device)
            pos = torch.tensor([[next_pos + step]], device=final_ids.device)
            h, _, _ = model.run_layers(model.base.embed(ids), pos, A, z, first, write=False, cache=cache)
            logits = model.base.head(h)  # [1, 1, V]


def decode_act(model, final_ids, A, z, first, params: SamplingParams, act, generator) -> Iterator[int]:
    """Decode for ACT models: every hop of a layer attends to the other tokens' states at the same hop, so a cache
    would need one entry per (layer, hop) and tokens that halted early would have none for later hops. The final
    segment is short, so it is simply run again over (segment + tokens so far) for each new token; a token's
    output depends only on earlier tokens (causal attention, per-token halting), so this is the exact result.
    The hop statistics count each position once, as a cached decode would: a re-run counts only its new token.
    """
    ids = final_ids
    for step in range(params.max_new_tokens):
        with torch.no_grad():
            x, positions, _ = model.segment_inputs(ids, with_memory=False)  # [1, n', d], [1, n']
            if act.stats is not None:
                act.stats.skip = x.shape[1] - 1 if step else 0  # the earlier positions were counted already
            try:
                h, _, _ = model.run_layers(x, positions, A, z, first, write=False, act=act)
            finally:
                if act.stats is not None:
                    act.stats.skip = 0
            logits = model.base.head(h[:, -1:])  # [1, 1, V]
        token = sample(logits[0, -1].cpu(), params, generator)
        yield token
        if token in params.stop_token_ids or step == params.max_new_tokens - 1:
            return
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)  # [1, n + 1]
