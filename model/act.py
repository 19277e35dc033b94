"""Adaptive computation time (ACT) for one ARMT layer: re-apply the layer to its own output until it halts.

Beyond Memorization (research/beyond-memorization.md) gives every ARMT layer Graves' ACT: the layer (memory read +
block) runs up to `max_hop` times on its own output; after hop n a halting unit p_n = sigmoid(w . y_n + b) per
token says how much of the remaining probability mass to stop with. A token halts at the first hop where its
accumulated p would pass `threshold` (1 - eps), or at `max_hop`, and spends what is left there (the remainder R).
Its output is the halting-weighted mix of its hop outputs. The weights always sum to 1 (forced halt at max_hop), so
`max_hop = 1` is exactly the plain layer, and a model trained with ACT can be run with another `max_hop` at
inference. Ponder cost (Graves): N + R per token, N = hops used, added to the loss as tau * mean.
Fixed-computation mode (FCT) applies the layer exactly `max_hop` times and keeps the last output.

The memory is read at every hop (inside `step`) and written once, after the loop, by the caller.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ActStats:
    """Hops actually used, per layer, averaged over every token that went through the layer (so the figures do not
    depend on how the tokens were batched or split into calls)."""

    hop_sums: dict[int, float] = field(default_factory=dict)  # layer -> sum over tokens of hops used
    remainder_sums: dict[int, float] = field(default_factory=dict)  # layer -> sum over tokens of the remainder R
    tokens: dict[int, int] = field(default_factory=dict)  # layer -> tokens counted
    max_hops: int = 0  # most hops any token used
    skip: int = 0  # positions at the start of each call not to count (decode_act's re-run of a counted prefix)

    def add(self, layer: int, n_updates: torch.Tensor, remainder: torch.Tensor | None = None) -> None:
        """n_updates: hops used per token [B, T]; remainder: the probability each spent at its last hop [B, T]
        (None: 0, fixed-computation mode)."""
        n_updates = n_updates[..., self.skip :]  # [B, T - skip]
        if n_updates.numel() == 0:
            return
        self.hop_sums[layer] = self.hop_sums.get(layer, 0.0) + float(n_updates.double().sum())
        if remainder is not None:
            self.remainder_sums[layer] = (self.remainder_sums.get(layer, 0.0)
                                          + float(remainder[..., self.skip :].double().sum()))
        self.tokens[layer] = self.tokens.get(layer, 0) + n_updates.numel()
        self.max_hops = max(self.max_hops, int(n_updates.max()))

    @property
    def hops_per_layer(self) -> list[float]:
        return [self.hop_sums[layer] / self.tokens[layer] for layer in sorted(self.hop_sums)]

    @property
    def mean_hops(self) -> float:
        per_layer = self.hops_per_layer
        return sum(per_layer) / len(per_layer) if per_layer else 0.0

    @property
    def mean_remainder(self) -> float:
        """The mean remainder R over tokens and layers (Graves' ponder cost is hops + R)."""
        counted = sum(self.tokens.values())
        return sum(self.remainder_sums.values()) / counted if counted else 0.0


@dataclass
class ActRun:
    """The ACT settings of one forward call (the config's, each overridable: the inference-time compute knobs of
    Beyond Memorization, max_hop, the halting threshold 1 - epsilon and fixed-computation mode) and what it
    collects."""

    max_hop: int
    threshold: float
    fixed: bool
    stats: ActStats | None = None
    ponder: list[torch.Tensor] | None = None  # training: per layer call, mean N + R over tokens (differentiable)

    @classmethod
    def for_model(cls, config, max_hop: int | None = None, stats: ActStats | None = None, ponder: bool = False,
                  threshold: float | None = None, fixed: bool | None = None) -> "ActRun | None":
        """None for models without ACT (then every override must be None too)."""
        if not config.act:
            for name, value in (("max_hop", max_hop), ("act_threshold", threshold), ("act_fixed", fixed)):
                if value is not None:
                    raise ValueError(f"{name} applies only to models trained with adaptive computation time "
                                     "(act=true)")
            return None
        hops = config.max_hop if max_hop is None else max_hop
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
            raise ValueError(f"max_hop must be an integer >= 1, got {max_hop!r}")
        threshold = config.act_threshold if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"act_threshold must be a number in (0, 1], got {threshold!r}")
        fixed = config.act_fixed if fixed is None else fixed
        if not isinstance(fixed, bool):
            raise ValueError(f"act_fixed must be true or false, got {fixed!r}")
        return cls(hops, float(threshold), fixed, stats, [] if ponder else None)

    def ponder_cost(self) -> torch.Tensor:
        return torch.stack(self.ponder).mean() if self.ponder else torch.zeros(())


def halting_loop(step: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 run: ActRun, layer: int) -> torch.Tensor:
    """ACT over `step` from h [B, T, d]; w [1, d], b [1] the layer's halting unit. Returns the mixed output.

    Every token goes through every executed hop (attention needs the whole segment at each hop); a halted token's
    later hops get weight 0. The loop stops early once every token has halted.
    """
    B, T, _ = h.shape
    if run.fixed:
        for _ in range(run.max_hop):
            h = step(h)
        _record(run, layer, torch.full((B, T), float(run.max_hop), device=h.device), torch.zeros(B, T))
        return h
    acc = h.new_zeros(B, T, dtype=torch.float32)  # accumulated halting probability of still-running tokens
    remainder = torch.zeros_like(acc)
    n_updates = torch.zeros_like(acc)
    running = torch.ones(B, T, dtype=torch.bool, device=h.device)
    out = torch.zeros_like(h)
    y = h
    for hop in range(1, run.max_hop + 1):
        y = step(y)
        p = torch.sigmoid((y @ w.t()).squeeze(-1).float() + b.float())  # [B, T]
        halt = running & ((acc + p >= run.threshold) | (hop == run.max_hop))
        cont = running & ~halt
        weight = torch.where(halt, 1 - acc, torch.where(cont, p, torch.zeros_like(p)))  # [B, T]
        out = out + weight.to(y.dtype).unsqueeze(-1) * y
        remainder = torch.where(halt, 1 - acc, remainder)
        acc = acc + torch.where(cont, p, torch.zeros_like(p))
        n_updates = n_updates + running.float()
        running = cont
        if not bool(running.any()):
            break
    _record(run, layer, n_updates, remainder)
    return out


def _record(run: ActRun, layer: int, n_updates: torch.Tensor, remainder: torch.Tensor) -> None:
    if run.stats is not None:
        run.stats.add(layer, n_updates.detach(), None if run.fixed else remainder.detach())
    if run.ponder is not None:
        run.ponder.append((n_updates + remainder.to(n_updates.device)).mean())
