"""One diagonal step's math (memory read, blocks, memory write), eager or compiled whole by torch.compile (opt-in:
`model.compiled_kernels`).

On a CPU a diagonal step of a small model spends about as long in elementwise work (norms, RoPE, SiLU x up, the DPFP
feature maps, the delta rule) and in Python between ops as in its matmuls. Compiled as one graph, inductor fuses the
elementwise work into a few C++ loops around the matmuls and the step runs without the Python in between (`python -m
bench.compile_ab`, small preset, 64 segments, 2-core CPU: 1.19-1.36x faster than eager in four runs, against 1.16x
when the read, the blocks and the write were compiled as separate functions). The graph is specialised per StepShape
(the active layer range, lanes, whether some cell reads) and per mask layout (whether some cell must not read,
whether some cell's segment is short), never per segment length: a document through a pipeline of L layers compiles
about 2L graphs on first use (seconds each; inductor caches them on disk for the next process).
Results match the eager step within float rounding (tests/test_kernels.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .memory import associative_lookup, delta_update, feature_map
from .stacked import StackedBlocks


@dataclass(frozen=True)
class StepShape:
    """What a step's code depends on besides its tensors. Under torch.compile: one graph per distinct value, and
    per presence of StepInputs.first and .mem_rows (None or a tensor)."""

    lo: int  # active layers lo..hi-1 (G = hi - lo cells per lane)
    hi: int
    lanes: int  # P
    width: int  # T' rows per cell
    M: int  # memory tokens
    mem_start: int  # the row where a full segment's memory tokens start (sink + segment_size)
    write_split: tuple[int, int, int]  # (d_mem, d, 1): the fused write projection's columns
    normalize: bool  # ARMT V2: L2-normalised features
    correction: bool  # gamma correction of z
    reads: bool  # some cell reads memory (False while only sessions' first segments are in the pipeline)


@dataclass
class StepInputs:
    """A step's tensors. h [G, P*T', d] (a layer's lanes share its weights), memories A [G*P, d_key, d] and
    z [G*P, d_key], W_q^T [G, d, d_mem], the fused write [G, d, d_mem + d + 1] and its bias
    [G, 1, d_mem + d + 1]; first [G*P] bool (cells that must not read: a session's first segment, an idle lane
    slot) or None; mem_rows: None when every cell's M memory tokens start at StepShape.mem_start, else per cell
    [G*P, M] int64 row indices (short segments put them earlier)."""

    h: torch.Tensor
    A: torch.Tensor
    z: torch.Tensor
    W_q: torch.Tensor
    W_write: torch.Tensor
    b_write: torch.Tensor
    first: torch.Tensor | None
    mem_rows: torch.Tensor | None


def diagonal_step(shape: StepShape, x: StepInputs, stacked: StackedBlocks, rope: torch.Tensor | None,
                  blocks: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read, blocks and write of every cell of a step -> (h' [G, P*T', d], A', z'); the inputs are left as they
    were. blocks(h, lo, hi, T') replaces the stacked blocks (CUDA graphs); rope as StackedBlocks takes it."""
    G, P, T, h = shape.hi - shape.lo, shape.lanes, shape.width, x.h
    if shape.reads:
        q = feature_map(torch.bmm(h, x.W_q), shape.normalize)  # [G, P*T', d_key]
        y = associative_lookup(q.view(G * P, T, -1), x.A, x.z).to(h.dtype)  # [G*P, T', d]
        if x.first is not None:
            y = y * (~x.first).to(h.dtype).view(-1, 1, 1)
        h = h + y.view(G, P * T, -1)
    if blocks is None:
        h = stacked(h, shape.lo, shape.hi, rope, T)  # [G, P*T', d]
    else:
        h = blocks(h, shape.lo, shape.hi, T)
    if not shape.M:
        return h, x.A, x.z
    cells = h.view(G * P, T, -1)  # [G*P, T', d]
    if x.mem_rows is None:
        mem = cells[:, shape.mem_start : shape.mem_start + shape.M]  # [G*P, M, d]
    else:
        mem = cells.gather(1, x.mem_rows.unsqueeze(-1).expand(-1, -1, cells.shape[-1]))  # [G*P, M, d]
    kvb = torch.baddbmm(x.b_write, mem.reshape(G, P * shape.M, -1), x.W_write)  # [G, P*M, d_mem + d + 1]
    k, v, beta_logit = kvb.view(G * P, shape.M, -1).split(shape.write_split, dim=-1)
    A, z = delta_update(k, v, beta_logit, x.A, x.z, x.first, normalize=shape.normalize, correction=shape.correction)
    return h, A, z


_compiled: Callable | None = None


def step_function(compiled: bool = False) -> Callable:
    """diagonal_step, or (built once per process) its torch.compile version."""
    global _compiled
    if not compiled:
        return diagonal_step
    if _compiled is None:
        from torch import _dynamo

        # one graph per StepShape and mask layout: 2L - 1 layer ranges per pipeline (up to L(L+1)/2), times lane
        # counts, times (first mask, short rows) present or not; past the limit dynamo would run the step eagerly
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 4096)
        _compiled = torch.compile(diagonal_step, dynamic=False)
    return _compiled
