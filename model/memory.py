"""The associative memory of ARMT as pure functions on explicit tensors.

Equations (research/armt.md, arXiv 2407.04841), per layer, for hidden states h and memory-token outputs m:
    phi(x)  = DPFP_3(x)                                   (V2: then L2-normalised)
    read:   h <- h + (phi(W_q h) A) / (phi(W_q h) . z + 1e-5)        (skipped on a session's first segment)
    write:  k = phi(W_k m), v = W_v m, beta = sigmoid(W_b m)
            vbar = (k A) / (k . z + 1e-5),  gamma = clip(1 - (k . z + 1e-5) / (|k|^2 [+ 1e-5 in V1]), 0, 1)
            (first segment: vbar = 0, gamma = 1)
            A <- A + sum_i beta_i k_i (v_i - vbar_i)^T,   z <- z + sum_i gamma_i k_i
All M memory tokens are written in one step from the pre-update A and z.

Batch convention: every function takes a leading batch dim B (sessions, or active diagonal cells); projection
weights are either one layer's ([out, in]) or one per batch row ([B, out, in], the diagonal executor's cells at
different layers). The memory math runs in the state's dtype (fp32 by default) whatever the model's dtype, and the
read returns the model's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


def project(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, in] @ W^T: W is [out, in] (shared) or [B, out, in] (per row); b is [out] or [B, out]."""
    y = torch.matmul(x, W.transpose(-1, -2))  # [B, T, out]
    return y if b is None else y + b.unsqueeze(-2)


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection: [..., d] -> [..., 2 * nu * d].

    x' = [relu(x), relu(-x)];  phi = concat_{j=1..nu} (x' * roll(x', j)) along the last dim.
    Each roll is a window of [x', x'] (few kernels matter: this runs before and after every layer; the windows
    stacked in one copy are 1.5-2x faster on a CPU than one index_select gathering the rolls); a roll by j >= n
    (d_mem = 1) is the roll by j mod n.
    """
    xp = torch.cat([x, -x], dim=-1).clamp_min(0)  # [..., n], n = 2d: [relu(x), relu(-x)]
    n = xp.shape[-1]
    xx = torch.cat([xp, xp], dim=-1)  # [..., 2n]: xx[n - j + i] = x'[(i - j) mod n] = roll(x', j)[i]
    rolled = torch.stack([xx[..., n - j % n : 2 * n - j % n] for j in range(1, nu + 1)], dim=-2)  # [..., nu, n]
    return (rolled * xp.unsqueeze(-2)).flatten(-2)  # [..., nu * n]


def feature_map(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """phi used for both queries and keys; V2 L2-normalises the features."""
    phi = dpfp(x)
    return F.normalize(phi, dim=-1, p=2.0) if normalize else phi


def associative_read(
    h: torch.Tensor, W_q: torch.Tensor, A: torch.Tensor, z: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """The memory's contribution to the layer input (add it to h).

    h: [B, T, d] (model dtype); W_q: [d_mem, d] or [B, d_mem, d]; A: [B, d_key, d]; z: [B, d_key]
    -> [B, T, d] in h's dtype.
    """
    return associative_lookup(feature_map(project(h, W_q), normalize), A, z).to(h.dtype)


def associative_lookup(q: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """phi(q) A / (phi(q) . z + eps) from features q [B, T, d_key] -> [B, T, d] in A's dtype (the diagonal
    executor computes the features of several lanes in one projection, then looks up per cell)."""
    q = q.to(A.dtype)
    num = torch.bmm(q, A)  # [B, T, d]
    return num / (_dot(q, z) + EPS)


def _dot(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x [B, T, d_key] . z [B, d_key] -> [B, T, 1]. A multiply and a sum, not bmm: torch's CPU bmm of a batch of
    matrix-vector products is ~4x slower (67 against 12 us for 4 x 80 x 192) than this."""
    return (x * z.unsqueeze(1)).sum(-1, keepdim=True)


def delta_write(
    m: torch.Tensor,
    W_k: torch.Tensor,
    W_v: torch.Tensor,
    W_b: torch.Tensor,
    b_b: torch.Tensor,
    A: torch.Tensor,
    z: torch.Tensor,
    first: torch.Tensor | None,
    *,
    normalize: bool,
    correction: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta-rule write of the M memory-token outputs; returns the new (A, z) (inputs untouched).

    m: [B, M, d]; W_k: [d_mem, d]; W_v: [d, d]; W_b: [1, d]; b_b: [1] (or each with a leading [B]);
    A: [B, d_key, d]; z: [B, d_key];
    first: [B] bool, True where this is the session's first written segment (vbar = 0, gamma = 1); None when no
    row is.
    """
    k = project(m, W_k)  # [B, M, d_mem]
    v = project(m, W_v)  # [B, M, d]
    beta_logit = project(m, W_b, b_b)  # [B, M, 1]
    return delta_update(k, v, beta_logit, A, z, first, normalize=normalize, correction=correction)


def delta_update(
    k_proj: torch.Tensor,
    v: torch.Tensor,
    beta_logit: torch.Tensor,
    A: torch.Tensor,
    z: torch.Tensor,
    first: torch.Tensor | None,
    *,
    normalize: bool,
    correction: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The write from projected memory tokens (W_k m [B, M, d_mem], W_v m [B, M, d], W_b m + b_b [B, M, 1]), so
    that a caller holding the three projections fused in one matmul (the diagonal executor) shares the math."""
    k = feature_map(k_proj, normalize).to(A.dtype)  # [B, M, d_key]
    v = v.to(A.dtype)
    beta = torch.sigmoid(beta_logit).to(A.dtype)  # [B, M, 1]
    denom = _dot(k, z) + EPS  # [B, M, 1]
    vbar = torch.bmm(k, A) / denom  # [B, M, d]
    if correction:
        k_sq = k.pow(2).sum(-1, keepdim=True)  # [B, M, 1]; |k|^2 as torch.linalg.norm(k) ** 2
        if not normalize:
            k_sq = k_sq + EPS  # V1 keeps an epsilon here, V2 does not
        gamma = torch.clamp(1 - denom / k_sq, 0, 1).detach()  # [B, M, 1]; no gradient, as in the paper's code
    else:
        gamma = None  # all ones
    if first is not None:
        not_first = (~first).to(A.dtype).view(-1, 1, 1)  # [B, 1, 1]
        vbar = vbar * not_first
        gamma = (gamma if gamma is not None else 1) * not_first + (1 - not_first)
    A_new = torch.baddbmm(A, (k * beta).transpose(1, 2), v - vbar)  # A + [B, d_key, M] @ [B, M, d]
    z_new = z + (k.sum(dim=1) if gamma is None else (gamma * k).sum(dim=1))  # [B, d_key]
    return A_new, z_new
