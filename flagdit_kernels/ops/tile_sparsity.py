"""Public 3-D tile-sparse attention description and its reference (``flagdit_kernels/reference/tile_sparsity.py``).

``fk.TileSparsity(window=..., top_k=...)`` describes the pattern; ``fk.tile_sparse_blocks`` builds the key-tile
lists per (head, query tile) on the device from a tile-major pack's :class:`TileLayout` (no host sync);
``fk.tile_sparse_attention`` is the masked reference (any float dtype, float64 included). The op that runs it
on every backend is ``fk.varlen_attention(..., sparsity=, tiles=)`` (reference: this mask; Triton: kernels that
visit only the listed key tiles); :func:`last_tile_blocks` reports what its latest call visited (``density``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_int, check_tensor
from ..reference import tile_sparsity as ref
from ..reference.packing import TileLayout
from ..reference.tile_sparsity import TileBlocks

__all__ = ["TileBlocks", "TileSparsity", "last_tile_blocks", "tile_sparse_attention", "tile_sparse_blocks"]

_last_blocks: TileBlocks | None = None  # what the latest sparse varlen_attention call visited


@dataclass(frozen=True)
class TileSparsity:
    """Which key tiles each query tile of a tile-major pack attends (placeholders stay global, text dense).

    ``window=(wt, wh, ww)``: Sliding Tile Attention, the tiles of a window of that many tiles per axis around
    the query tile (shifted inside the sample's tile grid at its borders). ``top_k=k``: Video Sparse Attention's
    selection, per head the k key tiles whose mean key scores highest against the tile's mean query. Both: the
    union. At least one is required.
    """

    window: tuple[int, int, int] | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.window is None and self.top_k is None:
            raise ValueError("TileSparsity needs window=(wt, wh, ww) and/or top_k=k")
        if self.window is not None:
            if not isinstance(self.window, (tuple, list)) or len(self.window) != 3:
                raise ValueError(f"window must be (frames, rows, cols) of tiles, got {self.window!r}")
            object.__setattr__(
                self, "window", tuple(check_int(f"window[{i}]", w, 1) for i, w in enumerate(self.window))
            )
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)


def check_tiles(tiles: object, q: object) -> int:
    """``tiles`` is a :class:`TileLayout` and q a 3-D tensor on its device (TypeError / ValueError naming them);
    returns the pack's token count."""
    if not isinstance(tiles, TileLayout):
        raise TypeError(
            "tiles must be the TileLayout of a tile-major pack (fk.pack(..., tile=...).tiles), "
            f"got {type(tiles).__name__}"
        )
    check_tensor("q", q, ndim=3, device=tiles.token_tile.device)
    return tiles.token_tile.shape[0]


def _check(q, k, cu_seqlens, tiles, sparsity) -> None:
    if not isinstance(sparsity, TileSparsity):
        raise TypeError(f"sparsity must be a fk.TileSparsity, got {type(sparsity).__name__}")
    total = check_tiles(tiles, q)
    check_tensor("k", k, ndim=3, device=q.device)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if q.shape[0] != total or k.shape[0] != total:
        raise ValueError(f"q and k must have the pack's {total} tokens, got {q.shape[0]} and {k.shape[0]}")
    if k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} must share q's head_dim and divide its heads, q {tuple(q.shape)}")
    if cu_seqlens.shape[0] != tiles.grid.shape[0] + 1:
        raise ValueError(f"cu_seqlens must have {tiles.grid.shape[0] + 1} entries, got {cu_seqlens.shape[0]}")


def last_tile_blocks() -> TileBlocks | None:
    """The :class:`TileBlocks` of the latest ``fk.varlen_attention(..., sparsity=...)`` call of this process (None
    before any): its key-tile lists and ``density``, the fraction of the dense self-attention's query-key pairs
    that call visited (FLOPs visited / dense FLOPs of the self part), a 0-dim float32 tensor on the call's device.
    The call never syncs; reading ``float(density)`` does."""
    return _last_blocks


def blocks_for_call(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tiles: object,
    sparsity: object,
    softmax_scale: float,
    freqs: torch.Tensor | None,
) -> TileBlocks:
    """``varlen_attention``'s block lists: ``sparsity`` and ``tiles`` checked (TypeError / ValueError naming
    them), the lists built from q and k as the attention sees them (rotated by ``freqs``: only top_k reads them)
    and recorded for :func:`last_tile_blocks`. One selection for every backend, so they agree on it."""
    global _last_blocks
    _check(q, k, cu_seqlens, tiles, sparsity)
    q_seen, k_seen = ref.rotated(q, k, freqs) if sparsity.top_k is not None else (q, k)
    blocks = ref.tile_sparse_blocks(q_seen, k_seen, tiles, cu_seqlens, sparsity.window, sparsity.top_k, softmax_scale)
    _last_blocks = blocks
    return blocks


def tile_sparse_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tiles: TileLayout,
    sparsity: TileSparsity,
    softmax_scale: float | None = None,
) -> TileBlocks:
    """Key tiles per (head, query tile) of ``sparsity`` on a tile-major pack, built on q's device with no host
    sync: :class:`TileBlocks` (``keys`` int32 ``(Hb, n_tiles, K)`` ascending global tile indices padded with -1,
    ``counts``, ``density``). q ``(T, H, D)``, k ``(T, Hkv, D)`` as attention sees them (RoPE applied)."""
    _check(q, k, cu_seqlens, tiles, sparsity)
    return ref.tile_sparse_blocks(q, k, tiles, cu_seqlens, sparsity.window, sparsity.top_k, softmax_scale)


def tile_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tiles: TileLayout,
    sparsity: TileSparsity,
    softmax_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_cu_seqlens: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TileBlocks]:
    """``fk.varlen_attention``'s math with the self part restricted to ``sparsity``'s key tiles (placeholders
    global, the gated text branch dense), as the reference: a boolean mask over dense scores. Returns
    ``(out (T, H, D), blocks)``; differentiable in q, k, v (and the text inputs), not through the selection."""
    _check(q, k, cu_seqlens, tiles, sparsity)
    check_tensor("v", v, ndim=3, device=q.device)
    if v.shape != k.shape:
        raise ValueError(f"v must be shaped like k {tuple(k.shape)}, got {tuple(v.shape)}")
    if (text_k is None) != (text_v is None) or (text_k is not None and (text_cu_seqlens is None or gate is None)):
        raise ValueError("text_k, text_v, text_cu_seqlens and gate go together")
    return ref.tile_sparse_attention(
        q, k, v, cu_seqlens, tiles, sparsity.window, sparsity.top_k, softmax_scale,
        text_k=text_k, text_v=text_v, text_cu_seqlens=text_cu_seqlens, gate=gate, freqs=freqs,
    )  # fmt: skip
