"""Diagonal batching (Sivtsov et al. 2025): every (layer l, segment s) cell with l + s = t runs as one step.

Cell (l, s) needs only layer l-1's output for segment s and layer l's memory after segment s-1, so segments enter
a pipeline one per step and move down one layer per step: at step t, slot l holds the segment that entered at
t - l. One step is one batched call over the active layers (model/stacked.py), the memory read and write batched
over the same cells. Several sessions share the pipeline: their segment streams enter back to back, a new
session's first segment right behind the previous one's last (no drain); each cell reads and writes its own
session's memory, so every session gets exactly what it would get alone.

Segments are padded to one length T' = sink + segment_size + M: a short segment is laid out as
[sink, n real tokens, M memory tokens, pads], so causal attention keeps the pads invisible to every real and
memory token, and positions stay 0..T'-1 for every cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import associative_read, delta_update
from .sequential import split_segments


@dataclass
class Stream:
    """One session's work: tokens to write from memory (A [L, d_key, d], z [L, d_key])."""

    ids: torch.Tensor  # [T] int64
    A: torch.Tensor
    z: torch.Tensor
    first: bool  # nothing written into this memory yet


@dataclass
class Entry:
    """One segment in the pipeline."""

    stream: int
    start: int
    end: int
    first: bool


class DiagonalPipeline:
    def __init__(self, model, streams: list[Stream], want_logits: bool):
        self.model, self.streams, self.want_logits = model, streams, want_logits
        cfg = model.config
        self.M, self.sink = cfg.num_mem_tokens, int(cfg.use_sink)
        self.width = self.sink + cfg.segment_size + self.M  # T'
        self.entries = self._entries()
        self.stacked = model.stacked_blocks()
        self.W_write, self.b_write = model.fused_write()  # [L, d, d_mem + d + 1], [L, d_mem + d + 1]
        self.write_split = [model.W_mk.shape[1], model.W_mv.shape[1], 1]
        self.A = torch.stack([s.A for s in streams]).to(model.device)  # [N, L, d_key, d]
        self.z = torch.stack([s.z for s in streams]).to(model.device)  # [N, L, d_key]
        L, d = model.n_layers, model.base.d_model
        self.H = torch.zeros(L, self.width, d, device=model.device, dtype=model.dtype)  # slot l: input to layer l
        positions = torch.arange(self.width, device=model.device).unsqueeze(0)  # [1, T']
        self.rope = model.base.rope(self.H[:1], positions)
        self.logits = [[] for _ in streams]

    def _entries(self) -> list[Entry]:
        entries = []
        for i, stream in enumerate(self.streams):
            for j, (start, end) in enumerate(split_segments(stream.ids.shape[0], self.model.config.segment_size)):
                entries.append(Entry(i, start, end, stream.first and j == 0))
        return entries

    def run(self) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
        """Returns (per-stream logits [T, V] or None, A [N, L, d_key, d], z [N, L, d_key])."""
        E, L = len(self.entries), self.model.n_layers
        for t in range(E + L - 1):
            lo, hi = max(0, t - E + 1), min(L - 1, t)  # active layers lo..hi; cell at layer l holds entry t - l
            if t < E:
                self.H[0] = self._layer0_input(self.entries[t])
            cells = [self.entries[t - layer] for layer in range(lo, hi + 1)]
            out = self._step(cells, lo, hi + 1)  # [G, T', d]
            if hi == L - 1 and self.want_logits:
                self._collect_logits(cells[-1], out[-1])
            top = min(hi, L - 2)  # outputs of layers lo..top feed layers lo+1..top+1 at the next step
            if top >= lo:
                self.H[lo + 1 : top + 2] = out[: top - lo + 1]
        logits = [torch.cat(parts) if parts else None for parts in self.logits]
        return logits, self.A, self.z

    def _layer0_input(self, entry: Entry) -> torch.Tensor:
        ids = self.streams[entry.stream].ids[entry.start : entry.end].unsqueeze(0)  # [1, n]
        x, positions, _ = self.model.segment_inputs(ids, with_memory=True)  # [1, n', d]
        h = self.model.base.position_input(x, positions)[0]  # [n', d]
        if h.shape[0] < self.width:  # short segment: pads after the memory tokens
            h = torch.cat([h, h.new_zeros(self.width - h.shape[0], h.shape[1])])
        return h  # [T', d]

    def _step(self, cells: list[Entry], lo: int, hi: int) -> torch.Tensor:
        """Read, block and write for the cells at layers lo..hi-1 (one batched call each)."""
        m, cfg = self.model, self.model.config
        # decided on the host (no device sync): masks only when some cell is its session's first segment
        n_first = sum(c.first for c in cells)
        first = torch.tensor([c.first for c in cells], device=m.device) if n_first else None  # [G] bool
        index = self._memory_index(cells, lo, hi)
        A, z = self.A[index], self.z[index]  # [G, d_key, d], [G, d_key]
        h = self.H[lo:hi]  # [G, T', d]
        if n_first < len(cells):  # some cell reads
            y = associative_read(h, m.W_mq[lo:hi], A, z, cfg.normalize_phi)  # [G, T', d]
            h = h + (y if first is None else y * (~first).to(h.dtype).view(-1, 1, 1))
        h = self.stacked(h, lo, hi, self.rope)
        if self.M:
            mem = self._memory_outputs(cells, h)  # [G, M, d]
            kvb = torch.baddbmm(self.b_write[lo:hi].unsqueeze(1), mem, self.W_write[lo:hi])  # [G, M, d_mem+d+1]
            k, v, beta_logit = kvb.split(self.write_split, dim=-1)
            A, z = delta_update(k, v, beta_logit, A, z, first, normalize=cfg.normalize_phi,
                                correction=cfg.correction)
            self.A[index] = A
            self.z[index] = z
        return h

    def _memory_index(self, cells: list[Entry], lo: int, hi: int):
        """Where the cells' memories live in A [N, L, ...]: a plain slice when one session fills the step (the
        common case, no gather), else (session ids [G], layer ids [G]) for advanced indexing."""
        first_stream = cells[0].stream
        if all(c.stream == first_stream for c in cells):
            return (first_stream, slice(lo, hi))
        device = self.model.device
        return (torch.tensor([c.stream for c in cells], device=device), torch.arange(lo, hi, device=device))

    def _memory_outputs(self, cells: list[Entry], h: torch.Tensor) -> torch.Tensor:
        starts = [self.sink + c.end - c.start for c in cells]
        if len(set(starts)) == 1:
            return h[:, starts[0] : starts[0] + self.M]
        return torch.stack([h[g, s : s + self.M] for g, s in enumerate(starts)])

    def _collect_logits(self, entry: Entry, h: torch.Tensor) -> None:
        n = entry.end - entry.start
        logits = self.model.base.head(h[self.sink : self.sink + n].unsqueeze(0))[0]  # [n, V]
        self.logits[entry.stream].append(logits)


def run_streams(model, streams: list[Stream], want_logits: bool = False):
    """Several sessions through one shared pipeline; see DiagonalPipeline.run."""
    return DiagonalPipeline(model, streams, want_logits).run()


def run_diagonal(
    model, ids: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first: torch.Tensor, want_logits: bool, act=None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The executor interface (as run_sequential): rows of ids [B, T] become B streams in one pipeline.

    ACT models never come here (their hop counts differ per layer and token; the engine runs them sequentially).
    """
    if act is not None or model.config.act:
        raise ValueError("the diagonal executor does not run ACT models; use executor='sequential'")
    streams = [Stream(ids[b], A[b], z[b], bool(first[b])) for b in range(ids.shape[0])]
    logits, A_out, z_out = run_streams(model, streams, want_logits)
    return (torch.stack(logits) if want_logits else None), A_out, z_out  # [B, T, V]
