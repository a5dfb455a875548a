"""Ring attention over a chunked token shard: key/value blocks travel around the group, merged by log-sum-exp.

Every rank holds the same number of rows of every sample (:mod:`.sharding`, chunked), so its queries and any
rank's key/value block share one local layout. In ``P`` steps each rank attends with its queries over the
block it holds (``fk.varlen_attention(..., return_lse=True)``), while that block is already on its way to
the next rank (:class:`~.collectives.RingShift`, started before the step's attention and waited for after
it); the partial results merge by log-sum-exp. All of it is plain autograd: the kernel is differentiable
through ``out`` and ``lse``, and the shift's backward returns each block's gradient to where it came from.

Copies. Where a sample's length is not a multiple of P, the ranks holding fewer of its tokens fill their
chunk with a copy of one of them. A query meeting that block sees the copied key twice: with ``e`` the copy's
weight ``exp(s q.k_c)`` and ``o, lse`` the block's result, ``a = e / exp(lse) = exp(s q.k_c - lse)`` (at
most 1/2, since the original is in the same block) and the result without the copy is
``(o - a v_c) / (1 - a)`` with ``lse + log(1 - a)``: exact, and no cancellation worse than a factor 2. A
block holding nothing but a copy of a sample is left out of that sample's merge (its LSE set to a value
whose weight is 0).

Text. The gated text branch attends the same queries over the sample's caption, a separate softmax outside
the merge: it is added once, after it, by PyTorch's ``scaled_dot_product_attention`` per sample (the kernel
computes self and text together, so its text part alone is not exposed; the caption is short).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import flagdit_kernels as fk

from .collectives import RingShift
from .sharding import TokenShard

# The LSE given to a block that holds no key of a query's sample: exp(NO_KEYS - lse) is exactly 0 for any
# real lse, and merging two such blocks stays finite.
NO_KEYS = -1.0e30


def _merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, block_lse: torch.Tensor):
    """Attention over the union of two key sets from the two partial results (``(N, H, Dh)`` in the LSE's
    precision, lse ``(H, N)``)."""
    merged = torch.logaddexp(lse, block_lse)
    w_out = torch.exp(lse - merged).T.unsqueeze(-1)
    w_block = torch.exp(block_lse - merged).T.unsqueeze(-1)
    return out * w_out + o * w_block, merged


def _without_copies(o, lse, q, k, v, shard: TokenShard, origin: int, scale: float):
    """The block of rank ``origin`` as if its copied rows were not there (see the module docstring)."""
    layout = shard.layout
    sample = layout.sample_index
    o = o.to(lse.dtype)  # fp32 (fp64 for fp64 inputs), like the kernel's statistics
    if shard.padded_any[origin]:
        has_copy = shard.padded[origin][sample]  # (N,)
        copy_row = layout.cu_seqlens.long()[1:][sample] - 1  # a chunk's copy is its last row
        group = q.shape[1] // k.shape[1]
        k_copy = k.index_select(0, copy_row).to(o.dtype).repeat_interleave(group, 1)
        v_copy = v.index_select(0, copy_row).to(o.dtype).repeat_interleave(group, 1)
        score = (q.to(o.dtype) * k_copy).sum(-1).T * scale  # (H, N)
        a = torch.where(has_copy, torch.exp(score - lse), 0.0)
        o = (o - a.T.unsqueeze(-1) * v_copy) / (1 - a).T.unsqueeze(-1)
        lse = lse + torch.log1p(-a)
    if shard.empty_any[origin]:
        lse = torch.where(shard.empty[origin][sample], NO_KEYS, lse)
    return o, lse


def _text_attention(q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, shard: TokenShard) -> torch.Tensor:
    """Each sample's local queries over its caption tokens (scale 1/sqrt(Dh), GQA); zero without a caption."""
    rows = [0, *torch.tensor(shard.chunk_rows).cumsum(0).tolist()]
    texts = shard.text_offsets
    parts = []
    for b in range(len(shard.chunk_rows)):
        r0, r1, t0, t1 = rows[b], rows[b + 1], texts[b], texts[b + 1]
        if r1 == r0:
            continue
        if t1 == t0:
            parts.append(q.new_zeros((r1 - r0, *q.shape[1:])))
            continue
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q[r0:r1], text_k[t0:t1], text_v[t0:t1]))
        parts.append(F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(parts)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: TokenShard,
    softmax_scale: float | None,
    text: dict,
    **attention_kwargs,
) -> torch.Tensor:
    """Attention of this rank's rows ``(N, H, Dh)`` over their samples' keys on every rank (see the module
    docstring). ``text``: the kernel's text keywords or empty; their offsets are the shard's host copy (the
    captions the shard was built with). ``attention_kwargs`` (backend, prefer, deterministic) go to each
    block's kernel call."""
    sp = shard.sp
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kv = torch.stack([k, v])
    out = lse = None
    for step in range(sp.size):
        origin = (sp.rank - step) % sp.size
        shift = RingShift(kv, sp.group) if step < sp.size - 1 else None
        o, block_lse = fk.varlen_attention(
            q, kv[0], kv[1], shard.layout, None, scale, return_lse=True, **attention_kwargs
        )
        o, block_lse = _without_copies(o, block_lse, q, kv[0], kv[1], shard, origin, scale)
        out, lse = (o, block_lse) if out is None else _merge(out, lse, o, block_lse)
        if shift is not None:
            kv = shift.wait()
    if text.get("text_k") is not None:
        o_text = _text_attention(q, text["text_k"], text["text_v"], shard).to(out.dtype)
        out = out + torch.tanh(text["gate"].to(out.dtype)).view(1, -1, 1) * o_text
    return out.to(q.dtype)
