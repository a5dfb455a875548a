"""Public ``tile_coarse_attention``: Video Sparse Attention's coarse stage over a tile-major pack.

A tile-sparse pattern hides most of a sample from each query tile; VSA adds, gated, the attention among the tiles'
mean queries, keys and values, so every token still sees a summary of its whole sample. The means are a
``(n_tiles, H, D)`` pack of their own (a sample's tiles are its sequence), attended by ``fk.varlen_attention``
on whichever backend it picks, so this runs wherever that does; at 64-token tiles it costs about 1/4096 of the
dense self-attention's FLOPs. Reference: ``reference/tile_sparsity.tile_coarse_attention``.
"""

from __future__ import annotations

import functools

import torch

from .._validation import check_same_dtype, check_tensor
from ..reference import tile_sparsity as ref
from ..reference.packing import TileLayout
from .attention import varlen_attention
from .rope import check_freqs
from .tile_sparsity import check_tiles

__all__ = ["tile_coarse_attention"]


def tile_coarse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: TileLayout,
    softmax_scale: float | None = None,
    *,
    freqs: torch.Tensor | None = None,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """Each patch token's share of its sample's coarse attention: the attention of its tile's mean query over
    the mean keys and values of the sample's tiles (placeholder tokens excluded from the means and given zeros).

    q ``(T, H, Dh)``, k / v ``(T, Hkv, Dh)`` over the tile-major pack ``tiles`` describes
    (``fk.pack(..., tile=...).tiles``); ``freqs`` rotates q and k first (RoPE, as ``fk.varlen_attention``
    does); ``softmax_scale`` defaults to ``1/sqrt(Dh)``. Returns ``(T, H, Dh)`` in q's dtype, differentiable in
    q, k and v. ``backend`` / ``prefer`` choose the backend of the attention over the means. A model adds the
    result, gated, to its tile-sparse attention output (VSA's ``out = out_fine + gate * out_coarse``).
    """
    total = check_tiles(tiles, q)
    for name, x in (("k", k), ("v", v)):
        check_tensor(name, x, ndim=3, device=q.device)
        check_same_dtype(name, x, "q", q)
    if q.shape[0] != total:
        raise ValueError(f"q must have the pack's {total} tokens (tiles.token_tile), got {q.shape[0]}")
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must both be ({total}, Hkv, {q.shape[2]}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if freqs is not None:
        check_freqs(freqs, "q", q)
    attention = functools.partial(varlen_attention, backend=backend, prefer=prefer)
    return ref.tile_coarse_attention(q, k, v, tiles, softmax_scale, freqs, attention=attention)
