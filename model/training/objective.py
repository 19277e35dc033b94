"""The training forward (back-propagation through the memory across all segments) and the losses.

Runs the sequential order segment by segment with autograd on: the diagonal executor has no backward pass, and
the sequential one is the reference order, so training sees exactly the computation served later.

Name-binding probe (from the team's first CPU recipe): a linear head, training only, reads one layer's output
through a LayerNorm without learned weights and names, at each place token of a fact, the person it belongs to
(at "?" the subject asked about; in the key-gap-value task the key before each value). It teaches the step
answer-only supervision did not find: the place token collecting which name it belongs to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..act import ActRun
from ..sequential import split_segments
from .batches import Batch

Memory = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # A [B, L, d_key, d], z [B, L, d_key], first [B] bool


class Probe(nn.Module):
    def __init__(self, d_model: int, vocab: int, layer: int):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(d_model, vocab)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(F.layer_norm(h, h.shape[-1:]))  # [N, V]


def hidden_states(model, ids: torch.Tensor, probe_layer: int | None, act: ActRun | None = None,
                  grad_segments: int = 0, memory: Memory | None = None):
    """ids [B, T] -> (last block output [B, T, d], probe layer output [B, T, d] or None, memory after the last
    segment), from empty memory or from `memory` (A [B, L, d_key, d], z [B, L, d_key], first [B]: a carried stream).

    Every segment is read and written (the official forward); memory tokens are stripped from the outputs.
    `act` (ACT models) collects the ponder cost. grad_segments > 0 truncates back-propagation to the last
    grad_segments segments: the ones before run without autograd (their outputs and the memory they hand on are
    constants). That is how a model meets the memory states of thousands of segments in training (the read of a
    long-run A is what fails beyond the trained length) at the price of a forward pass over the prefix.
    """
    B = ids.shape[0]
    if memory is None:
        A, z = model._empty_memory(B)
        first = torch.ones(B, dtype=torch.bool, device=ids.device)
    else:
        A, z, first = memory
    finals, probes = [], []
    segments = split_segments(ids.shape[1], model.config.segment_size)
    cut = len(segments) - grad_segments if 0 < grad_segments < len(segments) else 0
    for i, (start, end) in enumerate(segments):
        x, pos, off = model.segment_inputs(ids[:, start:end], with_memory=True)
        taps = {probe_layer: None} if probe_layer is not None else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= cut):
            h, A, z = model.run_layers(x, pos, A, z, first, write=True, taps=taps, act=act)
        first = torch.zeros_like(first)
        n = end - start
        finals.append(h[:, off : off + n])  # [B, n, d]
        if taps is not None:
            probes.append(taps[probe_layer][:, off : off + n])
    final = torch.cat(finals, dim=1)  # [B, T, d]
    return final, (torch.cat(probes, dim=1) if probes else None), (A, z, first)


def losses(model, probe: Probe | None, batch: Batch, use_probe: bool, grad_segments: int = 0,
           memory: Memory | None = None) -> dict:
    """Answer cross-entropy (+ probe cross-entropy, + ACT ponder cost) and per-question exact match for one batch.

    The model reads `batch.inputs` where given (masked targets), else the ids themselves (teacher forcing);
    grad_segments, memory: see hidden_states; out["memory"] is the memory after the batch, detached.
    """
    batch = batch.to(model.device)
    ids = batch.ids
    act = ActRun.for_model(model.config, ponder=True)
    reads = batch.inputs if batch.inputs is not None else ids
    probe_layer = probe.layer if (probe is not None and use_probe) else None
    final, tapped, (A, z, first) = hidden_states(model, reads, probe_layer, act, grad_segments, memory)
    d = final.shape[-1]
    flat = final.reshape(-1, d)  # [B*T, d]
    logits = model.base.head(flat[batch.answer_pos - 1])  # [N, V]: position p is predicted from p - 1
    targets = ids.reshape(-1)[batch.answer_pos]  # [N]
    out = {"answer": F.cross_entropy(logits.float(), targets), "memory": (A.detach(), z.detach(), first)}
    hit = (logits.argmax(-1) == targets).float()  # [N]
    wrong = torch.zeros(batch.n_questions, device=hit.device).index_add_(0, batch.answer_question, 1 - hit)  # [Q]
    counted = batch.scored if batch.scored is not None else torch.ones_like(wrong, dtype=torch.bool)  # [Q]
    out["correct"], out["questions"] = int(((wrong == 0) & counted).sum()), int(counted.sum())
    cell_counted = counted[batch.answer_question]  # [N]: the loss takes every span, the scores the counted ones
    out["cells_correct"], out["cells"] = int(hit[cell_counted].sum()), int(cell_counted.sum())
    if act is not None:
        out["ponder"] = act.ponder_cost()
    if tapped is not None and batch.probe_pos.numel():
        probe_logits = probe(tapped.reshape(-1, d)[batch.probe_pos])  # [P, V]
        out["probe"] = F.cross_entropy(probe_logits.float(), batch.probe_target)
    return out
