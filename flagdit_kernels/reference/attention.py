"""Variable-length packed attention with Lumina's zero-initialized tanh-gated text cross-attention.

Per sequence b: ``out = softmax(q_b k_b^T * s) v_b + tanh(gate[h]) * softmax(q_b kt_b^T / sqrt(Dh)) vt_b``,
with RoPE (interleaved) applied to q and k when ``freqs`` is given and never to text keys. Softmax in fp32
(fp64 for fp64 inputs), one rounding to q's dtype at the end. This loops over sequences on the host.
With ``return_lse`` it also returns ``lse (H, T)``: ``logsumexp`` of the scaled self-attention scores of each
query (natural log; the text branch is not part of it), float32 (float64 for float64 inputs).
A boolean ``mask`` over the packed tokens restricts the self scores (tile-sparse attention's definition).
With ``cu_seqlens_k`` the keys are packed by their own offsets (cross-attention); the queries of a sample
without keys get exactly 0 from the self part and an LSE of ``-inf``.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from .rope import rotate

__all__ = ["proportional_scale", "varlen_attention"]


def proportional_scale(seqlen: int, base_seqlen: int, head_dim: int) -> float:
    """Lumina-Next's resolution-extrapolation softmax scale ``sqrt(log_base(seqlen) / head_dim)``."""
    return math.sqrt(math.log(seqlen, base_seqlen) / head_dim)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (Lq, H, D) over k, v (Lk, Hkv, D) with GQA head sharing: (out, lse (H, Lq)).
    Without keys (Lk = 0) the sums are empty: the output is 0 and the LSE -inf, with gradients (zero) as usual.
    ``mask`` (1 or H, Lq, Lk) bool: the scores where it is False are left out (every row keeps one)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v), scores.logsumexp(dim=-1)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_cu_seqlens: torch.Tensor | None = None,
    text_max_seqlen: int | None = None,
    gate: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``mask`` (1 or H, T, T) bool over the packed tokens (self-attention): the self scores where it is False
    are left out (tile-sparse attention: ``tile_sparsity.tile_sparse_mask``); the text branch stays dense."""
    del deterministic, max_seqlen_k  # deterministic anyway; key lengths come from the offsets
    head_dim = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    acc = torch.promote_types(q.dtype, torch.float32)
    if freqs is not None:
        # Rotated q/k are rounded to the input dtype, as the attention kernels see them.
        q = rotate(q.to(acc), freqs, interleaved=True).to(q.dtype)
        k = rotate(k.to(acc), freqs, interleaved=True).to(k.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    with_text = text_k is not None
    if with_text:
        assert text_v is not None and text_cu_seqlens is not None and gate is not None
        tka, tva = text_k.to(acc), text_v.to(acc)
        text_offsets = text_cu_seqlens.tolist()
        text_gate = torch.tanh(gate.to(acc)).view(1, -1, 1)
    offsets = cu_seqlens.tolist()
    key_offsets = offsets if cu_seqlens_k is None else cu_seqlens_k.tolist()
    outputs, lses = [], []
    for b, (start, end) in enumerate(pairwise(offsets)):
        if end == start:
            continue
        qb = qa[start:end]
        k0, k1 = key_offsets[b], key_offsets[b + 1]
        block = None if mask is None else mask[:, start:end, k0:k1]
        out, lse = _attend(qb, ka[k0:k1], va[k0:k1], scale, block)
        if with_text:
            t0, t1 = text_offsets[b], text_offsets[b + 1]
            if t1 > t0:
                out = out + text_gate * _attend(qb, tka[t0:t1], tva[t0:t1], 1.0 / math.sqrt(head_dim))[0]
        outputs.append(out)
        lses.append(lse)
    if not outputs:
        out, lse = q.new_empty(q.shape), qa.new_empty((q.shape[1], 0))
    else:
        out, lse = torch.cat(outputs).to(q.dtype), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out
