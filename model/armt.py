"""ArmtModel: a Hugging Face LLaMA / GPT-2 whose every block carries an associative memory.

The memory parameters of all layers are stored stacked ([L, ...]) so that executors can slice a range of layers
at once; the memory *state* (A, z) never lives on the module: it is passed in and returned (MemoryState).
This file holds the model and its one-segment forward; executors (sequential, diagonal) loop over segments, and
the public engine API (forward_long / new_state / ingest / generate) is `model.engine.ArmtEngineMixin`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .act import ActRun, halting_loop
from .config import ArmtConfig
from .engine import ArmtEngineMixin
from .hf_base import BaseAdapter
from .memory import associative_read, delta_write


class ArmtModel(ArmtEngineMixin, nn.Module):
    compiled_kernels: bool = False  # True: the diagonal executor runs each step as a torch.compile'd graph (kernels.py)
    cuda_graphs: bool = False  # True (CUDA only): the diagonal executor replays its block steps from CUDA graphs

    def __init__(self, base: BaseAdapter, config: ArmtConfig, fingerprint: str = "untrained"):
        super().__init__()
        self.base = base
        self.config = config
        self.fingerprint = fingerprint
        self.fingerprints: tuple[str, ...] = (fingerprint,)  # states written under any of these are this model's
        L, d, M, d_mem = base.n_layers, base.d_model, config.num_mem_tokens, config.d_mem
        if config.wrap_pos and base.kind != "gpt2":
            raise ValueError("armt config: wrap_pos applies only to GPT-2 bases (learned position table)")
        if config.wrap_pos and config.use_sink:
            raise ValueError("armt config: wrap_pos and use_sink cannot be combined")
        dtype = base.hf.get_input_embeddings().weight.dtype
        self.memory = nn.Parameter(torch.zeros(M, d, dtype=dtype))  # [M, d] memory-token embeddings
        self.W_mq = nn.Parameter(torch.zeros(L, d_mem, d, dtype=dtype))  # per-layer query projection
        self.W_mk = nn.Parameter(torch.zeros(L, d_mem, d, dtype=dtype))  # per-layer key projection
        self.W_mv = nn.Parameter(torch.zeros(L, d, d, dtype=dtype))  # per-layer value projection
        self.W_mb = nn.Parameter(torch.zeros(L, 1, d, dtype=dtype))  # per-layer write-strength gate
        self.b_mb = nn.Parameter(torch.zeros(L, 1, dtype=dtype))
        self.sink = nn.Parameter(torch.zeros(1, d, dtype=dtype)) if config.use_sink else None
        self.act_w = nn.Parameter(torch.zeros(L, 1, d, dtype=dtype)) if config.act else None  # halting units
        self.act_b = nn.Parameter(torch.zeros(L, 1, dtype=dtype)) if config.act else None
        self._check_positions()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "ArmtModel":
        """Load a directory: the project format or an official ARMT layout (see model.checkpoint)."""
        from .checkpoint import from_pretrained

        return from_pretrained(path, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, base_config, armt_config: ArmtConfig, dtype=torch.float32, seed: int = 0) -> "ArmtModel":
        """A fresh random model over an HF config (for training and tests)."""
        from .checkpoint import create

        return create(base_config, armt_config, dtype=dtype, seed=seed)

    def save_pretrained(self, path) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path)

    def reset_memory_parameters(self, generator: torch.Generator | None = None) -> None:
        """The research code's initialisation: memory ~ randn * std(embeddings), W_mv = 0, linear defaults."""
        d = self.base.d_model
        bound = 1 / math.sqrt(d)  # nn.Linear's default uniform bound for fan_in = d
        with torch.no_grad():
            std = self.base.hf.get_input_embeddings().weight.float().std().item()  # a float: noise is drawn on
            # the CPU (a CPU generator), then copied to the model's device
            self.memory.copy_(torch.randn(self.memory.shape, generator=generator) * std)
            for p in (self.W_mq, self.W_mk, self.W_mb, self.b_mb):
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
            self.W_mv.zero_()
            if self.sink is not None:
                self.sink.copy_(torch.randn(self.sink.shape, generator=generator))
            if self.act_w is not None:  # the research code's halting unit: nn.Linear init, bias 1 (p ~ 0.73)
                self.act_w.copy_(torch.rand(self.act_w.shape, generator=generator) * 2 * bound - bound)
                self.act_b.fill_(1.0)

    def _check_positions(self) -> None:
        limit = self.base.max_positions
        if limit is None:
            return
        cfg = self.config
        needed = cfg.segment_size if cfg.wrap_pos else cfg.segment_size + cfg.num_mem_tokens + int(cfg.use_sink)
        if needed > limit:
            raise ValueError(
                f"segment of {cfg.segment_size} tokens + {cfg.num_mem_tokens} memory tokens needs {needed} "
                f"positions but the GPT-2 base has n_positions={limit}"
            )

    def stacked_blocks(self):
        """The blocks' weights stacked over layers for the diagonal executor (cached, see `_derived`)."""
        return self._derived("stacked", list(self.base.blocks.parameters()), self.base.stacked_weights)

    def block_graphs(self, lanes: int, width: int):
        """CUDA graphs of the diagonal step for `lanes` lanes of width T' (model/graphs.py; cached, see `_derived`)."""
        from .diagonal import pipeline_rope
        from .graphs import BlockGraphs

        build = lambda: BlockGraphs(self.stacked_blocks(), pipeline_rope(self, lanes, width))  # noqa: E731
        return self._derived(("graphs", lanes, width), list(self.base.blocks.parameters()), build)

    def _apply(self, fn, *args, **kwargs):
        """Module.to / .cuda / .float etc.: the derived tensors of the old device or dtype are dropped with the
        move, not kept alive until the next diagonal run rebuilds them (twice the block weights for a
        float32 -> float64 -> float32 round trip)."""
        self.__dict__.pop("_derived_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def drop_block_graphs(self) -> None:
        """Forget the captured CUDA graphs (and the memory they set aside); the next diagonal step captures again."""
        cache = self.__dict__.get("_derived_cache", {})
        for name in [n for n in cache if isinstance(n, tuple) and n[0] == "graphs"]:
            del cache[name]

    def fused_write(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The write's three projections (W_mk, W_mv, W_mb + b_mb) as one batched matmul for the diagonal
        executor: (W [L, d, d_mem + d + 1], bias [L, d_mem + d + 1], zero but for the gate's). Cached."""

        def build():
            W = torch.cat([self.W_mk, self.W_mv, self.W_mb], dim=1).detach()  # [L, d_mem + d + 1, d]
            bias = torch.cat([W.new_zeros(W.shape[0], W.shape[1] - 1), self.b_mb.detach()], dim=1)  # [L, ...]
            return W.transpose(1, 2).contiguous(), bias  # [L, d, d_mem + d + 1]

        return self._derived("fused_write", [self.W_mk, self.W_mv, self.W_mb, self.b_mb], build)

    def read_query(self) -> torch.Tensor:
        """W_mq transposed for the diagonal executor's read, a plain batched matmul: [L, d, d_mem]. Cached."""
        return self._derived("read_query", [self.W_mq], lambda: self.W_mq.detach().transpose(1, 2).contiguous())

    def _derived(self, name: str, params: list[torch.Tensor], build):
        """`build()` once per weight version: rebuilt when one of `params` changed in place (optimizer step, load)
        or moved, detected through the tensors' version counters and storage."""
        key = (self.device, self.dtype, sum(p._version for p in params), tuple(p.data_ptr() for p in params))
        cache = self.__dict__.setdefault("_derived_cache", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, build())
        return cache[name][1]

    @property
    def device(self) -> torch.device:
        return self.memory.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory.dtype

    @property
    def n_layers(self) -> int:
        return self.base.n_layers

    # ------------------------------------------------------------------ one segment
    def segment_inputs(self, ids: torch.Tensor, with_memory: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Embeddings and positions of one segment: [sink] + tokens (+ memory tokens).

        ids: [B, n] -> (x [B, n', d], position_ids [1, n'], offset of the first real token).
        Positions restart at 0 in every segment; with GPT-2 `wrap_pos` the memory tokens take the M rows
        appended to the position table instead of continuing after the real tokens.
        """
        B, n = ids.shape
        parts = [self.base.embed(ids)]  # [B, n, d]
        if self.sink is not None:
            parts.insert(0, self.sink.expand(B, -1, -1))  # [B, 1, d]
        M = self.config.num_mem_tokens if with_memory else 0
        if M:
            parts.append(self.memory.expand(B, -1, -1))  # [B, M, d]
        x = torch.cat(parts, dim=1)  # [B, n', d]
        n_real = x.shape[1] - M
        positions = torch.arange(x.shape[1], device=ids.device)
        if M and self.config.wrap_pos:
            table = self.base.max_positions
            positions = torch.cat([positions[:n_real], torch.arange(table, table + M, device=ids.device)])
        return x, positions.unsqueeze(0), int(self.sink is not None)

    def run_layers(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        A: torch.Tensor,
        z: torch.Tensor,
        first: torch.Tensor,
        write: bool,
        cache=None,
        taps: dict | None = None,
        act: ActRun | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All blocks over one segment with the memory read before and write after each.

        `taps`, if given, maps layer index -> None and receives each such block's output (training probes).
        With ACT (config.act) each layer is read + block re-applied per model/act.py (`act` overrides max_hop and
        collects hops); the write happens once, from the layer's final output.

        x: [B, T, d]; A: [B, L, d_key, d]; z: [B, L, d_key]; first: [B] bool (no read; vbar = 0 on write).
        With `write`, the last M positions are the memory tokens and are written into every layer's memory.
        Returns (final hidden [B, T, d], A', z'); A and z are not modified in place.
        """
        cfg = self.config
        if cfg.act and act is None:
            act = ActRun.for_model(cfg)
        if act is not None and cache is not None:
            raise ValueError("ACT re-runs each block per hop, which a KV cache cannot follow; decode without one")
        h, ctx = self.base.begin(x, position_ids, cache)
        # decided on the host once per segment: no read when no row has memory yet, no masks when every row has
        n_first = int(first.sum())  # one host sync
        any_first, reads = n_first > 0, n_first < first.numel()
        keep = (~first).to(h.dtype).view(-1, 1, 1) if any_first and reads else None  # [B, 1, 1]: 0 = no read yet
        write_first = first if any_first else None
        A_out, z_out = [], []
        for layer in range(self.n_layers):
            A_l, z_l = A[:, layer], z[:, layer]  # [B, d_key, d], [B, d_key]

            def step(h_in: torch.Tensor, layer=layer, A_l=A_l, z_l=z_l) -> torch.Tensor:
                if reads:
                    y = associative_read(h_in, self.W_mq[layer], A_l, z_l, cfg.normalize_phi)  # [B, T, d]
                    h_in = h_in + (y if keep is None else y * keep)
                return self.base.block(layer, h_in, ctx)

            h = step(h) if act is None else halting_loop(step, h, self.act_w[layer], self.act_b[layer], act, layer)
            if taps is not None and layer in taps:
                taps[layer] = h
            if write and cfg.num_mem_tokens:
                m = h[:, -cfg.num_mem_tokens :]  # [B, M, d] memory-token outputs
                A_l, z_l = delta_write(
                    m, self.W_mk[layer], self.W_mv[layer], self.W_mb[layer], self.b_mb[layer], A_l, z_l, write_first,
                    normalize=cfg.normalize_phi, correction=cfg.correction,
                )
            A_out.append(A_l)
            z_out.append(z_l)
        return h, torch.stack(A_out, dim=1), torch.stack(z_out, dim=1)  # [B, L, d_key, d], [B, L, d_key]

    def segment_forward(
        self, ids: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first: torch.Tensor, want_logits: bool,
        act: ActRun | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Read + write one segment ids [B, n]: (logits [B, n, V] or None, A', z')."""
        x, pos, offset = self.segment_inputs(ids, with_memory=True)
        h, A, z = self.run_layers(x, pos, A, z, first, write=True, act=act)
        logits = self.base.head(h[:, offset : offset + ids.shape[1]]) if want_logits else None
        return logits, A, z
