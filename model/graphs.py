"""CUDA graphs of the diagonal executor's block step, one per group of active layers (opt-in: `model.cuda_graphs`).

A diagonal step of a small model launches a few dozen kernels of microseconds each; on a GPU the launches, not the
math, then set the pace. A CUDA graph records one step's kernels once and replays them with a single launch. A
step's shapes depend only on its active layer range (lo, hi), the lanes and the padded segment width T', so a
document of at least L segments needs 2L - 1 graphs (filling, full, draining); shorter ones add ranges of their own,
up to L(L + 1) / 2 in all. Each is captured on first use and kept with the model's stacked weights (rebuilt when the
weights change, see ArmtModel._derived), holding its own input and output buffers ([G, P*T', d] each).

A replay reads its input from a static buffer and writes a static output. The pipeline copies each step's input in
and consumes the output (memory write, next layer's input, logits) before the next replay of any graph, which is
what makes one memory pool shared by all the graphs safe. Only the blocks are captured: the memory read and write
around them stay eager (their masks are decided per step on the host).
"""
from __future__ import annotations

import torch

from .stacked import StackedBlocks


class BlockGraphs:
    """StackedBlocks(h, lo, hi, rope, T') replayed from CUDA graphs keyed by (lo, hi, shape of h)."""

    def __init__(self, stacked: StackedBlocks, rope: torch.Tensor | None):
        self.stacked = stacked
        self.rope = rope  # static [1, P*T', hd/2, 2] (LLaMA) or None: the graphs read it by address
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, h: torch.Tensor, lo: int, hi: int, seq_len: int) -> torch.Tensor:
        """h [G, P*T', d] -> block outputs [G, P*T', d]: a static tensor, valid until the next call."""
        key = (lo, hi, tuple(h.shape), h.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(h, lo, hi, seq_len)
        static_in, graph, static_out = self.graphs[key]
        static_in.copy_(h)
        graph.replay()
        return static_out

    def _capture(self, h: torch.Tensor, lo: int, hi: int, seq_len: int):
        static_in = h.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS workspaces and other lazy setup
            for _ in range(2):
                self.stacked(static_in, lo, hi, self.rope, seq_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.stacked(static_in, lo, hi, self.rope, seq_len)
        return static_in, graph, static_out
