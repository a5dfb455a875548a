"""3-D tile-sparse attention over a tile-major pack: which key tiles each query tile visits, and the masked
attention that is its definition.

On a pack made with ``fk.pack(..., tile=...)`` each 3-D tile of patches is a contiguous run of tokens
(:class:`~flagdit_kernels.reference.packing.TileLayout`), so a tile-sparse pattern is, per (head, query tile), a
list of whole key tiles. Two patterns, usable together (their union):

- ``window=(wt, wh, ww)`` (Sliding Tile Attention): the key tiles of a ``wt x wh x ww`` window of the sample's
  tile grid centred on the query tile and shifted inside the grid at its borders (so every query tile of a grid
  at least as large as the window sees the same number of key tiles); the same for every head.
- ``top_k=k`` (Video Sparse Attention's selection): per head, the ``k`` key tiles of the sample whose mean key
  scores highest against the query tile's mean query (``softmax_scale`` applied; GQA: a query head uses its kv
  head's keys). The selection is not differentiable: gradients reach q and k through the fine attention over the
  selected tiles only (a straight-through choice), and through :func:`tile_coarse_attention` where a model adds it.

:func:`tile_coarse_attention` is VSA's coarse stage: attention among the tiles' mean queries, keys and values,
broadcast back to every token of the query tile. It gives each token a summary of its whole sample that a sparse
pattern would otherwise hide; a model adds it, gated, to the tile-sparse output (``flagdit``'s
``coarse_attention``).

Placeholder tokens ([nextline] / [nextframe]) are global: they attend to their whole sample and every query of
the sample attends to them. Attention never crosses samples. Block lists are built on the device from the
layout with no host synchronization; the attention here is the float64-capable reference (a host loop over
samples, like ``reference.attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import varlen_attention
from .packing import TileLayout
from .rope import rotate


@dataclass
class TileBlocks:
    """Key tiles per (head, query tile): ``keys`` int32 ``(Hb, n_tiles, K)`` global tile indices (into the
    :class:`TileLayout`'s tables), ascending, padded with -1 after the ``counts`` int32 ``(Hb, n_tiles)`` valid
    ones; ``Hb`` is 1 (window only: the same for every head, broadcast) or the query heads. ``density`` (0-dim
    float32 on the device): the fraction of the dense self-attention's query-key score pairs that the pattern
    visits (placeholder rows and columns included, averaged over heads)."""

    keys: torch.Tensor
    counts: torch.Tensor
    density: torch.Tensor


def _compact(keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid entries first, ascending and without repeats; -1 after them. Returns (keys, counts)."""
    big = torch.iinfo(torch.int32).max
    keys = torch.where(valid, keys, big).sort(dim=-1).values
    repeat = torch.zeros_like(valid)
    repeat[..., 1:] = keys[..., 1:] == keys[..., :-1]
    keys = torch.where(repeat, big, keys).sort(dim=-1).values
    valid = keys != big
    return torch.where(valid, keys, -1).to(torch.int32), valid.sum(-1).to(torch.int32)


def _window_keys(tiles: TileLayout, window: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (1, n_tiles, wt*wh*ww), valid) of the STA window around every query tile."""
    grid = tiles.grid.long()[tiles.sample.long()]  # (n_tiles, 3) tiles per axis of each tile's sample
    size = torch.tensor(window, device=grid.device)
    start = torch.minimum(tiles.coords.long() - size // 2, grid - size).clamp(min=0)  # shifted inside the grid
    offs = torch.stack(
        torch.meshgrid(*(torch.arange(w, device=grid.device) for w in window), indexing="ij"), dim=-1
    ).view(-1, 3)  # (K, 3)
    key = start[:, None, :] + offs[None, :, :]  # (n_tiles, K, 3)
    valid = (key < grid[:, None, :]).all(-1)
    local = (key[..., 0] * grid[:, None, 1] + key[..., 1]) * grid[:, None, 2] + key[..., 2]
    first = tiles.cu_tiles.long()[tiles.sample.long()]
    return (first[:, None] + local)[None], valid[None]


def _tile_means(x: torch.Tensor, tiles: TileLayout) -> torch.Tensor:
    """(n_tiles, heads, D) mean of x's rows over each tile (placeholder rows excluded); differentiable."""
    n_tiles = tiles.ranges.shape[0]
    is_patch = tiles.token_tile >= 0
    index = tiles.token_tile.long().clamp(min=0)
    sums = x.new_zeros(n_tiles, *x.shape[1:]).index_add(0, index, x * is_patch.view(-1, 1, 1).to(x.dtype))
    sizes = (tiles.ranges[:, 1] - tiles.ranges[:, 0]).to(x.dtype)
    return sums / sizes.view(-1, 1, 1)


def _top_k_keys(
    q: torch.Tensor, k: torch.Tensor, tiles: TileLayout, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (H, n_tiles, k'), valid) of the VSA selection, k' = min(top_k, most tiles of a sample)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    q_mean = _tile_means(q.to(acc), tiles)
    k_mean = _tile_means(k.to(acc), tiles).repeat_interleave(group, dim=1)
    n_samples, width = tiles.grid.shape[0], tiles.max_tiles
    sample = tiles.sample.long()
    local = torch.arange(sample.shape[0], device=sample.device) - tiles.cu_tiles.long()[sample]
    padded = lambda m: m.new_zeros(n_samples, width, *m.shape[1:]).index_put_((sample, local), m)
    scores = torch.einsum("bqhd,bkhd->bhqk", padded(q_mean), padded(k_mean)) * scale  # (B, H, width, width)
    count = (tiles.cu_tiles[1:] - tiles.cu_tiles[:-1]).long()
    present = torch.arange(width, device=sample.device)[None, :] < count[:, None]  # (B, width)
    scores = scores.masked_fill(~present[:, None, None, :], float("-inf"))
    best = scores.topk(min(top_k, width), dim=-1)  # (B, H, width, k')
    keys = best.indices[sample, :, local] + tiles.cu_tiles.long()[sample].view(-1, 1, 1)  # (n_tiles, H, k')
    valid = best.values[sample, :, local] > float("-inf")
    return keys.transpose(0, 1), valid.transpose(0, 1)


def tile_sparse_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    tiles: TileLayout,
    cu_seqlens: torch.Tensor,
    window: tuple[int, int, int] | None = None,
    top_k: int | None = None,
    softmax_scale: float | None = None,
) -> TileBlocks:
    """The key tiles of every (head, query tile) for ``window`` and / or ``top_k`` (see the module docstring),
    on q's device with no host synchronization. q ``(T, H, D)`` and k ``(T, Hkv, D)`` as the attention sees them
    (after RoPE); only ``top_k`` reads them."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    with torch.no_grad():
        parts = []
        if window is not None:
            parts.append(_window_keys(tiles, window))
        if top_k is not None:
            parts.append(_top_k_keys(q.detach(), k.detach(), tiles, top_k, scale))
        heads = max(p[0].shape[0] for p in parts)
        keys = torch.cat([p[0].expand(heads, -1, -1) for p in parts], dim=-1)
        valid = torch.cat([p[1].expand(heads, -1, -1) for p in parts], dim=-1)
        keys, counts = _compact(keys, valid)
        return TileBlocks(keys, counts, _density(tiles, cu_seqlens, keys))


def _density(tiles: TileLayout, cu_seqlens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Visited query-key pairs over the dense self-attention's, averaged over heads (see :class:`TileBlocks`)."""
    sizes = (tiles.ranges[:, 1] - tiles.ranges[:, 0]).double()
    key_sizes = torch.where(keys >= 0, sizes[keys.long().clamp(min=0)], 0.0).sum(-1)  # (Hb, n_tiles)
    tile_pairs = (sizes * key_sizes).sum(-1)  # (Hb,)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    slots = lengths - (tiles.patch_end - cu_seqlens[:-1]).double()  # placeholder tokens per sample
    global_pairs = (2 * slots * lengths - slots * slots).sum()  # their rows and columns
    return ((tile_pairs + global_pairs) / (lengths * lengths).sum()).mean().float()


def tile_sparse_mask(tiles: TileLayout, cu_seqlens: torch.Tensor, blocks: TileBlocks) -> torch.Tensor:
    """The boolean ``(Hb, T, T)`` mask (query, key) equivalent to ``blocks``: same sample, and a placeholder on
    either side or the key's tile listed for the query's tile."""
    n_tiles, total = tiles.ranges.shape[0], tiles.token_tile.shape[0]
    heads = blocks.keys.shape[0]
    listed = torch.zeros(heads, n_tiles, n_tiles + 1, dtype=torch.bool, device=blocks.keys.device)
    listed.scatter_(2, torch.where(blocks.keys >= 0, blocks.keys.long(), n_tiles), True)
    listed = listed[..., :n_tiles]
    rows = torch.arange(total, device=cu_seqlens.device)
    sample = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    same = sample[:, None] == sample[None, :]
    tile = tiles.token_tile.long()
    slot = tile < 0
    tile_ok = listed[:, tile.clamp(min=0)][:, :, tile.clamp(min=0)]
    return same & (slot[:, None] | slot[None, :] | tile_ok)


def tile_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tiles: TileLayout,
    window: tuple[int, int, int] | None = None,
    top_k: int | None = None,
    softmax_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_cu_seqlens: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TileBlocks]:
    """``reference.varlen_attention`` with the self part masked by :func:`tile_sparse_mask` (the gated text
    branch dense). Returns ``(out, blocks)``."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_seen, k_seen = rotated(q, k, freqs)
    blocks = tile_sparse_blocks(q_seen, k_seen, tiles, cu_seqlens, window, top_k, scale)
    out = varlen_attention(
        q, k, v, cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), scale, text_k=text_k, text_v=text_v,
        text_cu_seqlens=text_cu_seqlens, gate=gate, freqs=freqs, mask=tile_sparse_mask(tiles, cu_seqlens, blocks),
    )  # fmt: skip
    return out, blocks


def rotated(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the attention sees them: rotated by RoPE (interleaved, fp32 math, rounded to their dtype) with
    ``freqs``, as ``varlen_attention`` rotates them; the top-k selection reads these."""
    if freqs is None:
        return q, k
    acc = torch.promote_types(q.dtype, torch.float32)
    return (
        rotate(q.to(acc), freqs, interleaved=True).to(q.dtype),
        rotate(k.to(acc), freqs, interleaved=True).to(k.dtype),
    )


def tile_coarse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: TileLayout,
    softmax_scale: float | None = None,
    freqs: torch.Tensor | None = None,
    attention=varlen_attention,
) -> torch.Tensor:
    """VSA's coarse stage over a tile-major pack: every patch token gets the attention of its tile's mean query
    over the mean keys and values of its sample's tiles; placeholder rows get zeros. ``(T, H, D)`` in q's dtype,
    differentiable in q, k and v (through the means). q and k are rotated by ``freqs`` first, as the attention
    sees them. The means are taken in float32 (float64 stays) and rounded to q's dtype; ``attention`` (called
    like ``reference.varlen_attention``) attends them: the ops pass ``fk.varlen_attention``."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)
    q_seen, k_seen = rotated(q, k, freqs)
    means = [_tile_means(x.to(acc), tiles).to(q.dtype) for x in (q_seen, k_seen, v)]
    coarse = attention(*means, tiles.cu_tiles, tiles.max_tiles, scale)  # (n_tiles, H, D)
    is_patch = (tiles.token_tile >= 0).view(-1, 1, 1)
    return coarse[tiles.token_tile.long().clamp(min=0)] * is_patch.to(coarse.dtype)
