"""The diagonal executor's hot functions, eager or fused by torch.compile (opt-in: `model.compiled_kernels`).

On a CPU a diagonal step of a small model spends as long in elementwise work (norms, RoPE, SiLU x up, the DPFP
feature maps, the delta rule's masks) as in its matmuls; inductor fuses those into a few C++ loops. The compiled
functions are specialised per active layer range and shape: a pipeline of L layers compiles about 2L graphs of each
on first use (seconds each; inductor caches them on disk for the next process), after which a step runs the same math
in fewer, fused kernels. Results match the eager functions within float rounding (tests/test_kernels.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .memory import associative_lookup, delta_update, feature_map
from .stacked import StackedBlocks


@dataclass(frozen=True)
class Kernels:
    feature_map: Callable  # (x, normalize) -> phi
    lookup: Callable  # (q, A, z) -> phi(q) A / (phi(q) . z + eps)
    delta_update: Callable  # (k, v, beta_logit, A, z, first, *, normalize, correction) -> (A', z')
    blocks: Callable  # (stacked, h, lo, hi, rope, seq_len) -> h'


EAGER = Kernels(feature_map, associative_lookup, delta_update, StackedBlocks.__call__)
_compiled: Kernels | None = None


def kernels(compiled: bool = False) -> Kernels:
    """The eager functions, or (built once per process) their torch.compile versions."""
    global _compiled
    if not compiled:
        return EAGER
    if _compiled is None:
        from torch import _dynamo

        # one graph per (active layer range, lanes, first-segment mask or not): 2L - 1 ranges per pipeline
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 256)
        fuse = partial(torch.compile, dynamic=False)
        _compiled = Kernels(*(fuse(f) for f in (feature_map, associative_lookup, delta_update,
                                                 StackedBlocks.__call__)))
    return _compiled
