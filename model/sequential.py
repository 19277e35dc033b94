"""The sequential executor: the reference order, one segment after another through all layers.

Every faster executor (diagonal batching) must reproduce exactly what this produces.
"""
from __future__ import annotations

import torch


def split_segments(length: int, segment_size: int) -> list[tuple[int, int]]:
    """Left split of [0, length) into segments of `segment_size`; the remainder is the last, shorter one."""
    return [(start, min(start + segment_size, length)) for start in range(0, length, segment_size)]


def run_sequential(
    model, ids: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first: torch.Tensor, want_logits: bool, act=None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Read + write every segment of ids [B, T] in order, starting from memory (A [B, L, d_key, d], z).

    `first` [B] marks sessions that have written nothing yet; `act` (model/act.py) for ACT models.
    Returns (logits [B, T, V] or None, A', z').
    """
    logits = []
    for start, end in split_segments(ids.shape[1], model.config.segment_size):
        seg_logits, A, z = model.segment_forward(ids[:, start:end], A, z, first, want_logits, act)
        first = torch.zeros_like(first)
        if want_logits:
            logits.append(seg_logits)
    return (torch.cat(logits, dim=1) if want_logits else None), A, z  # [B, T, V]
