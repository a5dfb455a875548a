"""Ring attention over a chunked token shard: key/value blocks travel around the group, merged by log-sum-exp.

Every rank holds the same number of rows of every sample (:mod:`.sharding`, chunked), so its queries and any
rank's key/value block share one local layout. In ``P`` steps each rank attends with its queries over the
block it holds (``fk.varlen_attention(..., return_lse=True)``), while that block is already on its way to
the next rank (:class:`~.collectives.RingHop`, posted before the step's kernels and waited for after them);
the partial results merge by log-sum-exp.

Backward. A custom autograd function (:class:`_RingAttention`): the forward keeps only this rank's q, k, v,
the merged output and its LSE, O(T/P) per block. The backward sends the key/value blocks around the ring
again; at each step it recomputes that block's (out, lse) with autograd (the kernel's forward and the copy
correction below: the public op, so every backend works) and differentiates it with the cotangents the merge
gives it, ``w d_out`` and ``w (d_out . (o_j - out))`` with ``w = exp(lse_j - lse)``. dq stays home in fp32;
each block's dk/dv, summed in fp32, travel with the ring one hop behind the blocks and are home after
``P`` hops. Every hop is posted before the step's kernels and waited for only when its data is needed. The
recomputed forward is the price of going through the public op (a backward kernel that took the merged
out/lse, as ring-flash-attn does, would skip it).

Copies. Where a sample's length is not a multiple of P, the ranks holding fewer of its tokens fill their
chunk with a copy of one of them. A query meeting that block sees the copied key twice: with ``e`` the copy's
weight ``exp(s q.k_c)`` and ``o, lse`` the block's result, ``a = e / exp(lse) = exp(s q.k_c - lse)`` (at
most 1/2, since the original is in the same block) and the result without the copy is
``(o - a v_c) / (1 - a)`` with ``lse + log(1 - a)``: exact, and no cancellation worse than a factor 2. A
block holding nothing but a copy of a sample is left out of that sample's merge (its LSE set to a value
whose weight is 0).

Text. The gated text branch attends the same queries over the sample's caption, a separate softmax outside
the merge: it is added once, after it, by one call of the fused kernel with zero values for the self part
(whose output is then exactly 0; the kernel computes self and text together and does not expose the text
part alone). That call spends one local block's self-attention, 1/P of the ring's.
"""

from __future__ import annotations

import math

import torch

import flagdit_kernels as fk

from .collectives import RingHop
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


class _RingAttention(torch.autograd.Function):
    """Self-attention of this rank's queries over every rank's key/value block (the module docstring); saves
    only this rank's q, k, v, the merged output and its LSE."""

    @staticmethod
    def forward(ctx, q, k, v, shard: TokenShard, scale: float, attention_kwargs: dict):
        sp = shard.sp
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(sp.size):
            hop = RingHop(kv, sp.group) if step < sp.size - 1 else None  # the next block travels meanwhile
            o, block_lse = _block(q, kv, shard, (sp.rank - step) % sp.size, scale, attention_kwargs)
            out, lse = (o, block_lse) if out is None else _merge(out, lse, o, block_lse)
            if hop is not None:
                kv = hop.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shard, ctx.scale, ctx.attention_kwargs = shard, scale, attention_kwargs
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        shard, scale, kwargs = ctx.shard, ctx.scale, ctx.attention_kwargs
        sp = shard.sp
        d_out = d_out.to(lse.dtype)
        # The merged output's gradient reaches block j's (o_j, lse_j) through the weights w_j = exp(lse_j - lse):
        # d o_j = w_j d_out and d lse_j = w_j (d_out . (o_j - out)).
        d_out_dot_out = (d_out * out.to(lse.dtype)).sum(-1).T  # (H, N)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        kv = torch.stack([k, v])
        d_kv = arriving = None
        for step in range(sp.size):
            hop = RingHop(kv, sp.group) if step < sp.size - 1 else None  # posted before this step's kernels
            with torch.enable_grad():
                q_, kv_ = q.detach().requires_grad_(), kv.detach().requires_grad_()
                o, block_lse = _block(q_, kv_, shard, (sp.rank - step) % sp.size, scale, kwargs)
                w = torch.exp(block_lse.detach() - lse)
                d_o = w.T.unsqueeze(-1) * d_out
                d_lse = w * ((d_out * o.detach()).sum(-1).T - d_out_dot_out)
                dq_step, d_kv_step = torch.autograd.grad((o, block_lse), (q_, kv_), (d_o, d_lse))
            dq += dq_step
            # This block's dk/dv, summed in fp32 by the ranks that held it before, arrive from the previous
            # rank (posted at the end of the last step, waited only now); mine are added and they travel on.
            d_kv = d_kv_step.to(lse.dtype) if arriving is None else arriving.wait() + d_kv_step
            arriving = RingHop(d_kv, sp.group, tag=1)
            if hop is not None:
                kv = hop.wait()
        d_kv = arriving.wait()  # after P hops, every rank's dk/dv are back home
        return dq.to(q.dtype), d_kv[0].to(k.dtype), d_kv[1].to(v.dtype), None, None, None


def _block(q: torch.Tensor, kv: torch.Tensor, shard: TokenShard, origin: int, scale: float, kwargs: dict):
    """The attention of q over the key/value block of rank ``origin`` without its copies: (out, lse), fp32."""
    o, lse = fk.varlen_attention(q, kv[0], kv[1], shard.layout, None, scale, return_lse=True, **kwargs)
    return _without_copies(o, lse, q, kv[0], kv[1], shard, origin, scale)


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
    docstring). ``text``: the kernel's text keywords or empty. ``attention_kwargs`` (backend, prefer,
    deterministic) go to each kernel call."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = _RingAttention.apply(q, k, v, shard, scale, attention_kwargs)
    if text.get("text_k") is not None:
        # The text branch alone from the fused kernel: with zero values its self part is exactly 0 (and its
        # keys, detached, get no gradient), so the result is tanh(gate) * softmax(q k_t^T / sqrt(Dh)) v_t.
        out = out + fk.varlen_attention(
            q, k.detach(), torch.zeros_like(v), shard.layout, None, scale, **text, **attention_kwargs
        )
    return out
