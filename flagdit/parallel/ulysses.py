"""Ulysses attention over a contiguous token shard: all-to-all to heads, attention over the whole batch, back.

Each rank holds ``(N_r, H, Dh)`` queries and ``(N_r, Hkv, Dh)`` keys/values of its run of the packed tokens
(:mod:`.sharding`, contiguous). One ``all_to_all_single`` turns them into the whole batch's ``T`` tokens for
this rank's ``H / P`` query heads and the key/value heads those read; ``fk.varlen_attention`` runs on them
with the batch's own offsets, this rank's slice of the text keys/values and of ``gate`` (the gated text
branch is per head, and the caption's keys/values are small and replicated, never sequence-sharded); a
second all-to-all returns ``(N_r, H, Dh)``. Both are differentiable, so the backward is the same two
exchanges reversed around the kernel's backward.

GQA: with ``Hkv >= P`` each rank reads its own ``Hkv / P`` kv heads. With ``Hkv < P`` the ``P / Hkv`` ranks
whose query heads share a kv head each receive a copy of that head and no other: the send buffer repeats a
kv head once per rank that reads it (the all-to-all moves ``P`` kv-head slices instead of ``Hkv``, the least
any rank can receive); autograd sums the copies' gradients.
"""

from __future__ import annotations

import torch

import flagdit_kernels as fk

from .collectives import all_to_all
from .sharding import TokenShard


def check_heads(n_heads: int, n_kv_heads: int, size: int) -> None:
    """The head counts Ulysses can split over a group of ``size`` ranks, else a ``ValueError`` naming the rule."""
    if n_heads % size:
        raise ValueError(
            f"n_heads ({n_heads}) must be divisible by the sequence-parallel group size ({size}) for Ulysses, "
            "which gives each rank n_heads / size query heads; use strategy='ring'"
        )
    if n_kv_heads % size and size % n_kv_heads:
        raise ValueError(
            f"n_kv_heads ({n_kv_heads}) and the sequence-parallel group size ({size}) must divide one another for "
            "Ulysses, so that each rank's query heads read whole kv heads; use strategy='ring'"
        )


def kv_heads_read(rank: int, size: int, n_kv_heads: int) -> list[int]:
    """The kv heads the query heads of ``rank`` read: its ``n_kv_heads / size`` slice, or the one head it
    shares with ``size / n_kv_heads - 1`` other ranks."""
    if n_kv_heads >= size:
        per_rank = n_kv_heads // size
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    return [rank // (size // n_kv_heads)]


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: TokenShard,
    softmax_scale: float | None,
    text: dict,
    **attention_kwargs,
) -> torch.Tensor:
    """``fk.varlen_attention`` of this rank's rows ``(N_r, H, Dh)`` over the whole batch (see the module
    docstring). ``text``: the kernel's text keywords (``text_k``, ``text_v``, ``text_cu_seqlens``,
    ``text_max_seqlen``, ``gate``) or empty; ``attention_kwargs`` (backend, prefer, deterministic) go to the
    kernel call."""
    sp = shard.sp
    size, rank = sp.size, sp.rank
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    check_heads(heads, kv_heads, size)
    q_per_rank = heads // size
    read = [kv_heads_read(dest, size, kv_heads) for dest in range(size)]
    kv_per_rank = len(read[0])
    if kv_heads < size:  # copies of each kv head, one per rank that reads it
        index = torch.tensor([h for heads_of in read for h in heads_of], device=k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)
    # Rows grouped by destination: (P, N_r, q + 2 kv heads of that rank, Dh), one all-to-all for q, k and v.
    send = torch.cat(
        [
            q.reshape(n, size, q_per_rank, dim),
            k.reshape(n, size, kv_per_rank, dim),
            v.reshape(n, size, kv_per_rank, dim),
        ],
        dim=2,
    ).transpose(0, 1)
    recv = all_to_all(send.reshape(size * n, -1, dim), [n] * size, shard.rank_rows, sp.group)
    q_all, k_all, v_all = recv.split([q_per_rank, kv_per_rank, kv_per_rank], dim=1)
    if text.get("text_k") is not None:  # this rank's heads of the caption's keys/values and of the gate
        mine = slice(read[rank][0], read[rank][-1] + 1)
        text = text | dict(text_k=text["text_k"][:, mine], text_v=text["text_v"][:, mine],
                           gate=text["gate"][rank * q_per_rank : (rank + 1) * q_per_rank])  # fmt: skip
    out = fk.varlen_attention(q_all, k_all, v_all, shard.batch, None, softmax_scale, **text, **attention_kwargs)
    back = all_to_all(out, shard.rank_rows, [n] * size, sp.group)  # (P * N_r, H / P, Dh), rank i's heads first
    return back.view(size, n, q_per_rank, dim).transpose(0, 1).reshape(n, heads, dim)
