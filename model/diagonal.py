"""Diagonal batching (Sivtsov et al. 2025): every (layer l, segment s) cell with l + s = t runs as one step.

Cell (l, s) needs only layer l-1's output for segment s and layer l's memory after segment s-1, so segments enter
a pipeline one per step and move down one layer per step: at step t, slot l holds the segment that entered at
t - l. One step is one batched call over the active layers (model/stacked.py), the memory read and write batched
over the same cells.

Several sessions share the pipeline in `lanes`: P sessions' segments travel side by side, so a step holds up to
L x P cells, and cells of one layer share that layer's weights (a linear layer is one [P*T', in] @ [in, out] matmul
per layer: P times the rows for the same weight traffic). Within a lane, sessions follow back to back, a new
session's first segment right behind the previous one's last (no drain); sessions are spread over the lanes by
their segment counts (longest first). Each cell reads and writes its own session's memory, so every session gets
exactly what it would get alone. A lane whose queue is shorter than the longest idles at the end of the pipeline:
its cells still compute (the batch stays rectangular) but never read memory and write only their own lane slot.

Segments are padded to one length T' = sink + segment_size + M: a short segment is laid out as
[sink, n real tokens, M memory tokens, pads], so causal attention keeps the pads invisible to every real and
memory token, and positions stay 0..T'-1 for every cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .heap import keep_freed_heap
from .kernels import StepInputs, StepShape, step_function
from .sequential import split_segments
from .stacked import rotary

# Sessions side by side, per device type. On a 2-core CPU (measured side by side, small preset, 8 x 4, 16 x 4 and
# 4 x 16 segments) 4 lanes are 1.1-1.5x faster than 1, and 8 within 10% of 4 either way; the compute-bound medium
# preset is within 10% for 1 to 8 (README "Performance"). On a GPU, lanes are what fills the device (the activation
# buffer is L x lanes x T' x d); that default is not measured yet.
LANES = {"cpu": 4, "cuda": 16}


def lane_count(device: torch.device, n_streams: int, max_lanes: int | None = None) -> int:
    """How many sessions run side by side: max_lanes (default: LANES of the device type), at most one per stream."""
    return max(1, min(max_lanes or LANES.get(device.type, 1), n_streams))

# Segments of a lane whose layer-0 inputs (embedding, sink and memory rows) are built in one call: per segment, the
# handful of small ops cost ~0.18 ms of a ~4 ms step on the small preset (2-core CPU).
PREFETCH = 16


@dataclass
class Stream:
    """One session's work: tokens to write from memory (A [L, d_key, d], z [L, d_key])."""

    ids: torch.Tensor  # [T] int64
    A: torch.Tensor
    z: torch.Tensor
    first: bool  # nothing written into this memory yet


@dataclass
class Entry:
    """One segment in the pipeline: segment `index` of `n` of its stream, tokens [start, end)."""

    stream: int
    start: int
    end: int
    index: int
    n: int
    first: bool  # the session's first written segment (no read, vbar = 0, gamma = 1)


class DiagonalPipeline:
    def __init__(self, model, streams: list[Stream], want_logits: bool, max_lanes: int | None = None):
        self.model, self.streams, self.want_logits = model, streams, want_logits
        cfg, dev = model.config, model.device
        self.M, self.sink = cfg.num_mem_tokens, int(cfg.use_sink)
        self.width = self.sink + cfg.segment_size + self.M  # T'
        if model.base.rope_depends_on_length(self.width):  # one rotation table serves every cell of a step
            raise ValueError(f"the diagonal executor rotates every segment as {self.width} positions, and this "
                             "model's RoPE scaling (dynamic or longrope) would rotate a shorter last segment "
                             "differently; use executor='sequential'")
        if dev.type == "cpu":
            keep_freed_heap()  # its temporaries would otherwise be page-faulted in again every step (model/heap.py)
        self.lanes = self._lanes(lane_count(dev, len(streams), max_lanes))  # per lane: its entries in order
        self.stacked = model.stacked_blocks()
        self.step = step_function(model.compiled_kernels)
        self.W_write, self.b_write = model.fused_write()  # [L, d, d_mem + d + 1], [L, d_mem + d + 1]
        self.write_split = (model.W_mk.shape[1], model.W_mv.shape[1], 1)
        self.W_qT = model.read_query()  # [L, d, d_mem]
        L, P, d = model.n_layers, len(self.lanes), model.base.d_model
        # results, and the memory each (layer, lane) slot is working on (loaded when a session's segment arrives)
        self.A = torch.stack([s.A for s in streams]).to(dev)  # [N, L, d_key, d]
        self.z = torch.stack([s.z for s in streams]).to(dev)  # [N, L, d_key]
        self.A_slot = self.A.new_zeros(L, P, *self.A.shape[2:])  # [L, P, d_key, d]
        self.z_slot = self.z.new_zeros(L, P, self.z.shape[-1])  # [L, P, d_key]
        self.H = torch.zeros(L, P, self.width, d, device=dev, dtype=model.dtype)  # slot l: input to layer l
        self.rope, self.blocks = None, None  # the stacked blocks' rotation, or their CUDA graphs' replay:
        if model.cuda_graphs and dev.type == "cuda":
            self.blocks = model.block_graphs(P, self.width)  # (h, lo, hi, T') -> h'
            self.step = step_function(False)  # the graphs replace the blocks, which a compiled step would trace
        else:
            self.rope = pipeline_rope(model, P, self.width)
        self.logits = [[] for _ in streams]
        self.ready: list[tuple[int, torch.Tensor] | None] = [None] * P  # per lane: (first entry, inputs [k, T', d])
        self.device_copies: dict[tuple, torch.Tensor] = {}  # see _on_device
        self.views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (lo, hi) -> see _views

    def _lanes(self, n_lanes: int) -> list[list[Entry]]:
        """Streams spread over lanes, longest first onto the least loaded lane; a lane's streams keep their order."""
        seg = self.model.config.segment_size
        spans = [split_segments(s.ids.shape[0], seg) for s in self.streams]
        load, members = [0] * n_lanes, [[] for _ in range(n_lanes)]
        for i in sorted(range(len(spans)), key=lambda i: -len(spans[i])):
            p = load.index(min(load))
            members[p].append(i)
            load[p] += len(spans[i])
        return [[Entry(i, a, b, j, len(spans[i]), self.streams[i].first and j == 0)
                 for i in sorted(lane) for j, (a, b) in enumerate(spans[i])] for lane in members]

    def run(self) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
        """Returns (per-stream logits [T, V] or None, A [N, L, d_key, d], z [N, L, d_key])."""
        E, L = max(len(lane) for lane in self.lanes), self.model.n_layers
        for t in range(E + L - 1):
            lo, hi = max(0, t - E + 1), min(L - 1, t)  # active layers lo..hi; cell (l, p) holds lane p's entry t - l
            for p, lane in enumerate(self.lanes):
                if t < len(lane):
                    self.H[0, p] = self._layer0(p, t)
            cells = [[self._entry(p, t - layer) for p in range(len(self.lanes))] for layer in range(lo, hi + 1)]
            out = self._step(cells, lo, hi + 1)  # [G, P, T', d]
            if hi == L - 1 and self.want_logits:
                for p, entry in enumerate(cells[-1]):
                    if entry is not None:
                        self._collect_logits(entry, out[-1, p])
            top = min(hi, L - 2)  # outputs of layers lo..top feed layers lo+1..top+1 at the next step
            if top >= lo:
                self.H[lo + 1 : top + 2] = out[: top - lo + 1]
        logits = [torch.cat(parts) if parts else None for parts in self.logits]
        return logits, self.A, self.z

    def _entry(self, lane: int, k: int) -> Entry | None:
        entries = self.lanes[lane]
        return entries[k] if 0 <= k < len(entries) else None

    def _layer0(self, p: int, t: int) -> torch.Tensor:
        """Layer 0's input [T', d] for lane p's entry t, from inputs built PREFETCH entries at a time."""
        ready = self.ready[p]
        if ready is None or not ready[0] <= t < ready[0] + ready[1].shape[0]:
            ready = self.ready[p] = (t, self._layer0_inputs(self.lanes[p][t : t + PREFETCH]))
        return ready[1][t - ready[0]]

    def _layer0_inputs(self, entries: list[Entry]) -> torch.Tensor:
        """Inputs [k, T', d] of the leading full-length entries in one call (k >= 1: a short one alone)."""
        seg = self.model.config.segment_size
        k = next((i for i, e in enumerate(entries) if e.end - e.start != seg), len(entries))
        if k == 0:
            return self._layer0_input(entries[0]).unsqueeze(0)  # [1, T', d]
        ids = torch.stack([self.streams[e.stream].ids[e.start : e.end] for e in entries[:k]])  # [k, seg]
        x, positions, _ = self.model.segment_inputs(ids, with_memory=True)  # [k, T', d], [1, T']
        return self.model.base.position_input(x, positions)  # [k, T', d]

    def _layer0_input(self, entry: Entry) -> torch.Tensor:
        ids = self.streams[entry.stream].ids[entry.start : entry.end].unsqueeze(0)  # [1, n]
        x, positions, _ = self.model.segment_inputs(ids, with_memory=True)  # [1, n', d]
        h = self.model.base.position_input(x, positions)[0]  # [n', d]
        if h.shape[0] < self.width:  # short segment: pads after the memory tokens
            h = torch.cat([h, h.new_zeros(self.width - h.shape[0], h.shape[1])])
        return h  # [T', d]

    def _step(self, cells: list[list[Entry | None]], lo: int, hi: int) -> torch.Tensor:
        """Read, block and write for the cells at layers lo..hi-1 of every lane (one batched call each)."""
        cfg = self.model.config
        G, P, T = hi - lo, len(self.lanes), self.width
        self._move_memories(cells, lo, load=True)
        flat = [e for row in cells for e in row]  # G*P cells, layer-major: cell g*P + p is (lo + g, lane p)
        # decided on the host (no device sync): masks only when some cell must not read (a session's first
        # segment, or an idle lane slot, which also writes as if first so that its stale memory stays inert)
        blank = tuple(e is None or e.first for e in flat)
        n_blank = sum(blank)
        views = self._views(lo, hi)
        shape = StepShape(lo, hi, P, T, self.M, self.sink + cfg.segment_size, self.write_split, cfg.normalize_phi,
                          cfg.correction, reads=n_blank < len(flat))
        first = self._on_device(("first", blank), lambda: torch.tensor(blank)) if n_blank else None  # [G*P]
        inputs = StepInputs(views["H"], views["A"], views["z"], views["W_q"], views["W_write"], views["b_write"],
                            first, self._memory_rows(flat))
        h, A, z = self.step(shape, inputs, self.stacked, self.rope, self.blocks)  # [G, P*T', d]
        if self.M:
            views["A"].copy_(A)
            views["z"].copy_(z)
        self._move_memories(cells, lo, load=False)
        return h.view(G, P, T, -1)

    def _views(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """The slot buffers and memory weights of layers lo..hi-1, sliced once per range (a pipeline has at most
        2L - 1): memories A [G*P, d_key, d] and z [G*P, d_key], inputs H [G, P*T', d] (a layer's lanes share its
        weights), W_q^T [G, d, d_mem], the fused write [G, d, d_mem + d + 1] and its bias [G, 1, d_mem + d + 1]."""
        if (lo, hi) not in self.views:
            G, P = hi - lo, len(self.lanes)
            self.views[lo, hi] = {
                "A": self.A_slot[lo:hi].flatten(0, 1), "z": self.z_slot[lo:hi].flatten(0, 1),
                "H": self.H[lo:hi].view(G, P * self.width, -1), "W_q": self.W_qT[lo:hi],
                "W_write": self.W_write[lo:hi], "b_write": self.b_write[lo:hi].unsqueeze(1)}
        return self.views[lo, hi]

    def _on_device(self, key: tuple, make) -> torch.Tensor:
        """The device copy of a small host tensor make(), made once per key (a pipeline sees few blank-cell
        patterns and memory-row layouts: filling, session boundaries, idle lanes, short segments). On a GPU it goes
        through pinned memory, asynchronously: a plain copy from pageable memory would wait for every kernel
        queued so far."""
        if key not in self.device_copies:
            t = make()
            if self.model.device.type == "cuda":
                t = t.pin_memory()
            self.device_copies[key] = t.to(self.model.device, non_blocking=True)
        return self.device_copies[key]

    def _move_memories(self, cells: list[list[Entry | None]], lo: int, load: bool) -> None:
        """A session's memory enters its lane slot with its first segment here and leaves with its last: copies at
        session boundaries only, never a gather per step."""
        for g, row in enumerate(cells):
            layer = lo + g
            for p, e in enumerate(row):
                if e is None:
                    continue
                if load and e.index == 0:
                    self.A_slot[layer, p] = self.A[e.stream, layer]
                    self.z_slot[layer, p] = self.z[e.stream, layer]
                elif not load and e.index == e.n - 1:
                    self.A[e.stream, layer] = self.A_slot[layer, p]
                    self.z[e.stream, layer] = self.z_slot[layer, p]

    def _memory_rows(self, flat: list[Entry | None]) -> torch.Tensor | None:
        """None when every cell's M memory-token rows follow a full segment (idle cells count as full), else the
        rows of each cell [G*P, M] (a short segment's memory tokens follow its last real token). Never the short
        offset as a number: a compiled step would take it as a constant and compile again for every length."""
        full = self.sink + self.model.config.segment_size
        starts = [self.sink + e.end - e.start if e is not None else full for e in flat]
        if all(start == full for start in starts):
            return None
        return self._on_device(("rows", *starts), lambda: torch.tensor(starts).unsqueeze(1) + torch.arange(self.M))

    def _collect_logits(self, entry: Entry, h: torch.Tensor) -> None:
        n = entry.end - entry.start
        logits = self.model.base.head(h[self.sink : self.sink + n].unsqueeze(0))[0]  # [n, V]
        self.logits[entry.stream].append(logits)


def pipeline_rope(model, lanes: int, width: int) -> torch.Tensor | None:
    """The rotation of every row of a step, positions 0..T'-1 in each lane: [1, P*T', hd/2, 2], or None for
    GPT-2 (learned positions, added at layer 0)."""
    positions = torch.arange(width, device=model.device).repeat(lanes).unsqueeze(0)  # [1, P*T']
    dummy = torch.zeros(1, 1, device=model.device, dtype=model.dtype)  # rope only reads x's device and dtype
    rope = model.base.rope(dummy, positions)  # (cos, sin) [1, P*T', hd] or None
    return rotary(rope) if rope is not None else None


def run_streams(model, streams: list[Stream], want_logits: bool = False, max_lanes: int | None = None):
    """Several sessions through one shared pipeline, up to max_lanes (default: LANES of the device) side by side."""
    return DiagonalPipeline(model, streams, want_logits, max_lanes).run()


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
