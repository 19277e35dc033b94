"""Decoder blocks of several *different layers* applied at once: the compute kernel of diagonal batching.

Each block's weights are stacked once over layers as [L, in, out]; a call runs layers lo..hi-1 on a batch of G =
hi - lo cells (cell g is at layer lo + g) by slicing the stack, so every linear layer is one batched matmul and
attention takes the cells as its batch dimension (each cell attends causally within its own segment).
Written from the HF LLaMA / GPT-2 definitions; checked against the HF blocks through the sequential executor.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors]).contiguous()


@dataclass
class StackedBlocks:
    kind: str  # "llama" | "gpt2"
    w: dict  # name -> [L, ...] tensors
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    act: Callable[[torch.Tensor], torch.Tensor]
    scales: list[float]  # per-layer softmax scale (differs per layer only with GPT-2 inverse-layer-idx scaling)

    def __post_init__(self):
        # the scales on the device too, for a step whose layers differ (a CUDA graph allows no host copy)
        self.w["scale"] = torch.tensor(self.scales, device=self.w["qkv"].device)  # [L] fp32
        # every weight sliced to every active layer range once (L(L+1)/2 ranges): a step then slices nothing, and
        # the per-cell norm weights [G, d] come as [G, 1, d], ready to broadcast over a cell's rows
        L = len(self.scales)
        self.ranges = {(lo, hi): {name: t[lo:hi].unsqueeze(1) if name.startswith("ln") else t[lo:hi]
                                  for name, t in self.w.items()}
                       for lo in range(L) for hi in range(lo + 1, L + 1)}

    def __call__(
        self, h: torch.Tensor, lo: int, hi: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """h [G, R, d] with G = hi - lo cells at layers lo..hi-1 -> block outputs [G, R, d].

        A layer's R rows may hold several lanes' segments of seq_len tokens each (R = lanes x seq_len): they share
        the layer's weights in every matmul and attend only within their own segment.
        rope: rotary((cos, sin)) [1, R, hd/2, 2] (LLaMA), None (GPT-2).
        """
        if self.kind == "llama":
            return _llama_blocks(self, h, lo, hi, rope, seq_len)
        return _gpt2_blocks(self, h, lo, hi, seq_len)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int,
                  seq_len: int | None = None) -> torch.Tensor:
        """q [G, R, Hq, hd], k/v [G, R, Hkv, hd] (rotated already) of layers lo..hi-1 -> [G, R, Hq*hd]; each run
        of seq_len rows (default all R) is one causal sequence."""
        G, R = q.shape[:2]
        T = seq_len or R
        scales = self.scales[lo:hi]
        softmax_scale = scales[0]
        if any(s != softmax_scale for s in scales):  # fold each layer's own scale into its queries
            q = q * self.ranges[lo, hi]["scale"].to(q.dtype).view(G, 1, 1, 1)
            softmax_scale = 1.0
        # [G, R, H, hd] -> [G * R/T, H, T, hd]: one attention batch row per (layer, lane) cell
        q, k, v = (x.reshape(-1, T, *x.shape[2:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale,
                                             enable_gqa=self.n_kv_heads != self.n_heads)  # [G * R/T, Hq, T, hd]
        return out.transpose(1, 2).reshape(G, R, self.n_heads * self.head_dim)  # [G, R, Hq*hd]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [G, T, in] @ w [G, in, out] (+ b [G, out]) (+ residual [G, T, out], added by the matmul when there is no
    bias: one kernel and one allocation fewer)."""
    if b is None:
        return torch.bmm(x, w) if residual is None else torch.baddbmm(residual, x, w)
    y = torch.baddbmm(b.unsqueeze(1), x, w)
    return y if residual is None else residual + y


def _llama_blocks(sb: StackedBlocks, h: torch.Tensor, lo: int, hi: int, rope, seq_len: int | None) -> torch.Tensor:
    w, G, T = sb.ranges[lo, hi], h.shape[0], h.shape[1]  # w: layers lo..hi-1 of each weight; biases may be absent
    x = _rms_norm(h, w["ln1"], sb.eps)
    qkv = _linear(x, w["qkv"], w.get("qkv_b"))  # [G, T, (Hq + 2 Hkv) hd]
    nq, nkv = sb.n_heads * sb.head_dim, sb.n_kv_heads * sb.head_dim
    # queries and keys rotated in one pass (same positions): [G, T, Hq + Hkv, hd]
    qk = _apply_rope(qkv[..., : nq + nkv].view(G, T, sb.n_heads + sb.n_kv_heads, sb.head_dim), rope)
    q, k = qk.split([sb.n_heads, sb.n_kv_heads], dim=2)  # [G, T, Hq, hd], [G, T, Hkv, hd]
    v = qkv[..., nq + nkv :].view(G, T, sb.n_kv_heads, sb.head_dim)  # [G, T, Hkv, hd]
    h = _linear(sb.attention(q, k, v, lo, hi, seq_len), w["o"], w.get("o_b"), residual=h)
    x = _rms_norm(h, w["ln2"], sb.eps)
    # gate and up as two matmuls, not one into [G, T, 2 ff] split in halves: the halves are strided views, and on a
    # CPU act(gate) * up over them cost ~0.5 ms of a ~3 ms small-preset step against ~0.1 ms on contiguous tensors
    gate, up = _linear(x, w["gate"], w.get("gate_b")), _linear(x, w["up"], w.get("up_b"))  # [G, T, ff] each
    return _linear(sb.act(gate).mul_(up), w["down"], w.get("down_b"), residual=h)  # act's output is ours to write


def rotary(rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """HF's (cos, sin) [1, T, hd] -> the rotation of each pair, (cos, sin) [1, T, hd/2, 2] (what _apply_rope takes).

    HF rotates each head's pairs (i, i + hd/2) by the angle whose cos/sin sit at i and i + hd/2 (equal halves);
    stack_llama interleaves q's and k's columns so that pair i is adjacent, (2i, 2i + 1), and one complex multiply
    rotates it (~30 us for a 4-cell step against ~80 for HF's mul / rotate_half / mul / add). q . k is unchanged
    by a permutation applied to both, so attention is the same. Stored real, so that torch.compile (which
    generates no code for complex numbers) can take the same tensor.
    """
    cos, sin = rope
    half = cos.shape[-1] // 2
    return torch.stack([_complex_part(x[..., :half]) for x in (cos, sin)], dim=-1)  # [1, T, hd/2, 2]


def _apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [G, T, H, hd] with interleaved pairs; rot [1, T, hd/2, 2] (rotary) -> rotated [G, T, H, hd] in x's dtype."""
    pairs = _complex_part(x).unflatten(-1, (-1, 2))  # [G, T, H, hd/2, 2]
    rot = rot.unsqueeze(2)  # [1, T, 1, hd/2, 2]
    if torch.compiler.is_compiling():  # real arithmetic, fused by inductor: (a + ib)(c + is)
        a, b, c, s = pairs[..., 0], pairs[..., 1], rot[..., 0], rot[..., 1]
        out = torch.stack([a * c - b * s, b * c + a * s], dim=-1)  # [G, T, H, hd/2, 2]
    else:  # one complex multiply (views, no copies)
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rot))
    return out.flatten(-2).to(x.dtype)  # [G, T, H, hd]


def _complex_part(x: torch.Tensor) -> torch.Tensor:
    """x as the real type of a complex one: float32 and float64 as they are, half types in float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _interleave_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows [H * hd, ...] of a q or k projection (or bias [H * hd]), each head's order 0, hd/2, 1, hd/2 + 1, ...:
    the layout _apply_rope rotates with one complex multiply."""
    hd = w.shape[0] // n_heads
    order = torch.arange(hd, device=w.device).view(2, hd // 2).T.flatten()  # [hd]: 0, hd/2, 1, hd/2 + 1, ...
    return w.unflatten(0, (n_heads, hd))[:, order].flatten(0, 1)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm with per-cell weights [G, 1, d]: normalise in fp32 (one fused op, the same values as HF's four),
    scale in the input dtype."""
    return weight * F.rms_norm(h.float(), h.shape[-1:], eps=eps).to(h.dtype)


def _layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.layer_norm with per-cell weight and bias [G, 1, d]."""
    return F.layer_norm(h, h.shape[-1:], eps=eps) * weight + bias


def _gpt2_blocks(sb: StackedBlocks, h: torch.Tensor, lo: int, hi: int, seq_len: int | None) -> torch.Tensor:
    w = sb.ranges[lo, hi]  # layers lo..hi-1 of each weight
    x = _layer_norm(h, w["ln1"], w["ln1_b"], sb.eps)
    G, T = h.shape[:2]
    qkv = _linear(x, w["qkv"], w["qkv_b"]).view(G, T, 3, sb.n_heads, sb.head_dim)  # [G, T, 3, H, hd]
    q, k, v = qkv.unbind(2)  # [G, T, H, hd] each
    h = h + _linear(sb.attention(q, k, v, lo, hi, seq_len), w["o"], w["o_b"])
    x = _layer_norm(h, w["ln2"], w["ln2_b"], sb.eps)
    x = sb.act(_linear(x, w["fc"], w["fc_b"]))
    return h + _linear(x, w["proj"], w["proj_b"])


def stack_llama(blocks, config) -> StackedBlocks:
    """HF LlamaDecoderLayers -> StackedBlocks (nn.Linear weights [out, in] transposed to [in, out])."""
    attn = [b.self_attn for b in blocks]
    mlp = [b.mlp for b in blocks]
    qp = lambda w: _interleave_pairs(w, config.num_attention_heads)  # noqa: E731  (pairs for _apply_rope)
    kp = lambda w: _interleave_pairs(w, config.num_key_value_heads)  # noqa: E731
    w = {
        "ln1": _stack([b.input_layernorm.weight for b in blocks]),
        "ln2": _stack([b.post_attention_layernorm.weight for b in blocks]),
        "qkv": _stack([torch.cat([qp(a.q_proj.weight), kp(a.k_proj.weight), a.v_proj.weight]).T for a in attn]),
        "o": _stack([a.o_proj.weight.T for a in attn]),
        "gate": _stack([m.gate_proj.weight.T for m in mlp]),
        "up": _stack([m.up_proj.weight.T for m in mlp]),
        "down": _stack([m.down_proj.weight.T for m in mlp]),
    }
    if attn[0].q_proj.bias is not None:
        w["qkv_b"] = _stack([torch.cat([qp(a.q_proj.bias), kp(a.k_proj.bias), a.v_proj.bias]) for a in attn])
    if attn[0].o_proj.bias is not None:
        w["o_b"] = _stack([a.o_proj.bias for a in attn])
    if mlp[0].gate_proj.bias is not None:
        w["gate_b"] = _stack([m.gate_proj.bias for m in mlp])
        w["up_b"] = _stack([m.up_proj.bias for m in mlp])
        w["down_b"] = _stack([m.down_proj.bias for m in mlp])
    head_dim = attn[0].head_dim
    return StackedBlocks("llama", w, config.num_attention_heads, config.num_key_value_heads, head_dim,
                         config.rms_norm_eps, mlp[0].act_fn, [float(a.scaling) for a in attn])


def stack_gpt2(blocks, config) -> StackedBlocks:
    """HF GPT2Blocks -> StackedBlocks (Conv1D weights are [in, out] already)."""
    w = {
        "ln1": _stack([b.ln_1.weight for b in blocks]), "ln1_b": _stack([b.ln_1.bias for b in blocks]),
        "ln2": _stack([b.ln_2.weight for b in blocks]), "ln2_b": _stack([b.ln_2.bias for b in blocks]),
        "qkv": _stack([b.attn.c_attn.weight for b in blocks]), "qkv_b": _stack([b.attn.c_attn.bias for b in blocks]),
        "o": _stack([b.attn.c_proj.weight for b in blocks]), "o_b": _stack([b.attn.c_proj.bias for b in blocks]),
        "fc": _stack([b.mlp.c_fc.weight for b in blocks]), "fc_b": _stack([b.mlp.c_fc.bias for b in blocks]),
        "proj": _stack([b.mlp.c_proj.weight for b in blocks]), "proj_b": _stack([b.mlp.c_proj.bias for b in blocks]),
    }
    head_dim = config.n_embd // config.n_head
    return StackedBlocks("gpt2", w, config.n_head, config.n_head, head_dim, config.layer_norm_epsilon,
                         blocks[0].mlp.act, [float(b.attn.scaling) for b in blocks])
