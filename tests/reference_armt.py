"""An independent, formula-level ARMT reference for the tests. It imports nothing from model/.

It mirrors the research code's structure on purpose (stateful wrappers around the HF blocks, the HF model's own
forward and generate), so that (1) its state_dict *is* the official checkpoint layout, and (2) the engine's
explicit-state implementation is checked against the original way of computing the same thing:
    RefArmt.memory_cell.memory, RefArmt.memory_cell.model.<base with wrapped blocks>, RefArmt.memory_cell.layers.*
"""
from __future__ import annotations

import torch
from torch import nn


def dpfp3(x: torch.Tensor) -> torch.Tensor:
    """DPFP with nu = 3, written element-wise from the paper's definition."""
    xp = torch.cat([torch.clamp(x, min=0), torch.clamp(-x, min=0)], dim=-1)
    n = xp.shape[-1]
    feats = []
    for j in (1, 2, 3):
        idx = [(i - j) % n for i in range(n)]  # roll by j: element i takes element i - j
        feats.append(xp * xp[..., idx])
    return torch.cat(feats, dim=-1)


class RefAssocLayer(nn.Module):
    def __init__(self, layer: nn.Module, d: int, M: int, d_mem: int, version: int):
        super().__init__()
        self.layer = layer
        self.W_mq = nn.Linear(d, d_mem, bias=False)
        self.W_mk = nn.Linear(d, d_mem, bias=False)
        self.W_mv = nn.Linear(d, d, bias=False)
        self.W_mb = nn.Linear(d, 1)
        self.M, self.version = M, version
        self.generate_mode = False
        self.zero_mem()

    def zero_mem(self):
        self.first = True
        self.A = None
        self.z = None

    def phi(self, x):
        f = dpfp3(x)
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.version == 2 else f

    def forward(self, hidden_states, *args, **kwargs):
        if not self.first:
            q = self.phi(self.W_mq(hidden_states))  # [B, T, K]
            num = torch.einsum("btk,bkd->btd", q, self.A)
            den = torch.einsum("btk,bk->bt", q, self.z)[..., None] + 1e-5
            hidden_states = hidden_states + num / den
        out = self.layer(hidden_states, *args, **kwargs)
        if not self.generate_mode:
            h = out[0] if isinstance(out, tuple) else out
            self.write(h[:, -self.M:])
            self.first = False
        return out

    def write(self, m):
        k = self.phi(self.W_mk(m))  # [B, M, K]
        v = self.W_mv(m)
        beta = torch.sigmoid(self.W_mb(m))[..., 0]  # [B, M]
        if self.first:
            self.A = torch.zeros(m.shape[0], k.shape[-1], m.shape[-1])
            self.z = torch.zeros(m.shape[0], k.shape[-1])
            vbar, gamma = torch.zeros_like(v), torch.ones(k.shape[:2])
        else:
            den = torch.einsum("bmk,bk->bm", k, self.z) + 1e-5
            vbar = torch.einsum("bmk,bkd->bmd", k, self.A) / den[..., None]
            k_norm_sq = torch.linalg.norm(k, dim=-1) ** 2 + (1e-5 if self.version == 1 else 0.0)
            gamma = torch.clip(1 - den / k_norm_sq, 0, 1)
        self.A = self.A + torch.einsum("bmk,bmd,bm->bkd", k, v - vbar, beta)
        self.z = self.z + torch.einsum("bm,bmk->bk", gamma, k)


class RefCell(nn.Module):
    def __init__(self, hf_model: nn.Module, M: int, d_mem: int, layers_attr: str, version: int = 1,
                 use_sink: bool = False, wrap_pos: bool = False):
        super().__init__()
        self.model = hf_model
        d = hf_model.get_input_embeddings().embedding_dim
        layers = hf_model
        for attr in layers_attr.split("."):
            layers = getattr(layers, attr)
        for i in range(len(layers)):
            layers[i] = RefAssocLayer(layers[i], d, M, d_mem, version)
        self.layers = layers  # registered twice, as in the research code: the `layers.{i}` aliases
        self.M, self.use_sink, self.wrap_pos = M, use_sink, wrap_pos
        emb_std = hf_model.get_input_embeddings().weight.std()
        self.memory = nn.Parameter(torch.randn(M, d) * emb_std)
        if use_sink:
            self.sink = nn.Parameter(torch.randn(1, d))
        if wrap_pos:
            wpe = hf_model.transformer.wpe
            self.n_pos = wpe.num_embeddings
            grown = nn.Embedding(self.n_pos + M, d)
            with torch.no_grad():
                grown.weight[: self.n_pos] = wpe.weight
            hf_model.transformer.wpe = grown

    def set_mode(self, generate: bool):
        for layer in self.layers:
            layer.generate_mode = generate

    def zero_mem(self):
        for layer in self.layers:
            layer.zero_mem()

    def embeds(self, ids, with_memory: bool):
        x = self.model.get_input_embeddings()(ids)
        B = ids.shape[0]
        parts = ([self.sink.expand(B, -1, -1)] if self.use_sink else []) + [x]
        if with_memory:
            parts.append(self.memory.expand(B, -1, -1))
        return torch.cat(parts, dim=1)

    def segment(self, ids):
        """One read+write segment through the HF model's own forward; logits of the real tokens."""
        x = self.embeds(ids, with_memory=True)
        kwargs = {}
        if self.wrap_pos:
            n = ids.shape[1]
            kwargs["position_ids"] = torch.cat([torch.arange(n), torch.arange(self.n_pos, self.n_pos + self.M)])[None]
            T = x.shape[1]
            kwargs["attention_mask"] = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]  # plain causal
        logits = self.model(inputs_embeds=x, **kwargs).logits
        s = int(self.use_sink)
        return logits[:, s : s + ids.shape[1]]


class RefArmt(nn.Module):
    """Official V1 layout: keys under `memory_cell.`."""

    def __init__(self, cell: RefCell, segment_size: int):
        super().__init__()
        self.memory_cell = cell
        self.segment_size = segment_size

    def segments(self, ids):
        S = self.segment_size
        return [ids[:, i : i + S] for i in range(0, ids.shape[1], S)]

    @torch.no_grad()
    def forward_long(self, ids):
        self.memory_cell.zero_mem()
        out = torch.cat([self.memory_cell.segment(seg) for seg in self.segments(ids)], dim=1)
        return out

    def memory_state(self):
        """(A [L, K, d], z [L, K]) of batch row 0 after the last call."""
        layers = self.memory_cell.layers
        return torch.stack([l.A[0] for l in layers]), torch.stack([l.z[0] for l in layers])

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int, **kwargs):
        """Official generate: all segments but the last read+write, the last read-only through HF generate."""
        cell = self.memory_cell
        cell.zero_mem()
        segs = self.segments(ids)
        for seg in segs[:-1]:
            cell.segment(seg)
        cell.set_mode(True)
        try:
            x = cell.embeds(segs[-1], with_memory=False)
            out = cell.model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                      max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        finally:
            cell.set_mode(False)
        return out[0].tolist()


class RefArmtV2(nn.Module):
    """Official V2 (HF single-file ARMTForCausalLM) layout: keys under `armt.memory_cell.`."""

    def __init__(self, armt: RefArmt):
        super().__init__()
        self.armt = armt
