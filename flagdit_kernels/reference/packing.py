"""Packing latents of any (C, [F,] H, W) size into one token sequence, with [nextline]/[nextframe] slots.

An item of F frames, H/p patch rows and W/p patch columns becomes, in row-major order, for every frame its
patch rows each closed by a [nextline] slot (when ``nextline``), and a [nextframe] slot between frames
(when ``nextframe``). Patch vectors are (C, ph, pw) ordered by default (Lumina-T2X's patchify); unpack reads
(ph, pw, C) ordered token vectors by default (Lumina-T2X's final layer). ``channels_last`` picks the order.

Tile-major order (``tile=(tt, th, tw)``): an item's patch tokens come tile by tile, a tile being ``tt`` frames x
``th`` patch rows x ``tw`` patch columns (edge tiles partial), tiles in (frame, row, col) raster order and
patches in raster order inside a tile; then all its placeholder slots, in the order raster packing gives them.
Every token keeps its (frame, row, col) position, so non-causal attention with RoPE sees the same sample.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .._conventions import frames_hw

__all__ = ["Packed", "TileLayout", "pack", "tile_layout", "token_layout", "unpack"]

PATCH, NEXTLINE, NEXTFRAME = 0, 1, 2


@dataclass
class TileLayout:
    """The 3-D tiles of a tile-major pack, for tile-sparse attention: all tensors on the pack's device, built
    from the item shapes on the host (no device sync) and copied over with the rest of the layout."""

    tile: tuple[int, int, int]  # (frames, rows, cols) of patches per tile
    grid: torch.Tensor  # int32 (B, 3): tiles of each item along (frames, rows, cols)
    cu_tiles: torch.Tensor  # int32 (B+1,): item b's tiles are cu_tiles[b]:cu_tiles[b+1] (raster order)
    ranges: torch.Tensor  # int32 (n_tiles, 2): [first, end) packed token rows of each tile
    coords: torch.Tensor  # int32 (n_tiles, 3): (frame, row, col) tile coordinate of each tile in its item
    sample: torch.Tensor  # int32 (n_tiles,): the item of each tile
    patch_end: torch.Tensor  # int32 (B,): first placeholder row of each item (= its end without placeholders)
    token_tile: torch.Tensor  # int32 (T,): the tile of each token, -1 for placeholders
    max_tiles: int  # most tiles of one item (python int)
    placeholders: int  # placeholder tokens of the whole pack (python int: sizes the sparse kernels' grids)


@dataclass
class Packed:
    """A batch packed into one token sequence (see module docstring)."""

    patches: torch.Tensor  # (T, C*p*p), zeros at placeholder rows
    cu_seqlens: torch.Tensor  # int32 (B+1,)
    max_seqlen: int
    positions: torch.Tensor  # int32 (T, 3): (frame, row, col)
    kind: torch.Tensor  # int8 (T,): 0 patch, 1 nextline, 2 nextframe
    shapes: list[tuple[int, ...]]  # each item's latent shape, as given
    patch_size: int
    nextline: bool = True
    nextframe: bool = True
    patch_rows: torch.Tensor = field(default=None)  # int64 (N,): packed row of every patch token, in order
    tile: tuple[int, int, int] | None = None  # tile-major order's (frames, rows, cols); None: raster order
    tiles: TileLayout | None = None  # the tiles of a tile-major pack

    @property
    def seqlens(self) -> list[int]:
        return [item_tokens(s, self.patch_size, self.nextline, self.nextframe) for s in self.shapes]


def item_tokens(shape: tuple[int, ...], p: int, nextline: bool, nextframe: bool) -> int:
    f, h, w = frames_hw(shape)
    return f * (h // p) * (w // p + int(nextline)) + (f - 1 if nextframe else 0)


def tile_major_order(f: int, hp: int, wp: int, tile: tuple[int, int, int]) -> torch.Tensor:
    """Raster patch indices of an (f, hp, wp) patch grid in tile-major order: a stable sort by tile (in raster
    order over the tile grid), patches keeping their raster order inside a tile."""
    fr, r, c = torch.meshgrid(torch.arange(f), torch.arange(hp), torch.arange(wp), indexing="ij")
    tt, th, tw = tile
    n_h, n_w = -(-hp // th), -(-wp // tw)
    tile_of = ((fr // tt) * n_h + r // th) * n_w + c // tw
    return torch.sort(tile_of.flatten(), stable=True).indices


def _item_layout(shape: tuple[int, ...], p: int, nextline: bool, nextframe: bool, tile=None):
    """Positions (n, 3) and kinds (n,) of one item's tokens, and the token index of each of its patches in raster
    patch order (n_patches,), built on the CPU from its shape alone."""
    positions, kinds = _raster_layout(shape, p, nextline, nextframe)
    is_patch = kinds == PATCH
    if tile is None:
        return positions, kinds, torch.nonzero(is_patch).flatten()
    f, h, w = frames_hw(shape)
    order = tile_major_order(f, h // p, w // p, tile)
    slots = ~is_patch
    positions = torch.cat([positions[is_patch][order], positions[slots]])
    kinds = torch.cat([torch.full((order.numel(),), PATCH), kinds[slots]])
    return positions, kinds, torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))


def _raster_layout(shape: tuple[int, ...], p: int, nextline: bool, nextframe: bool):
    """Positions (n, 3) and kinds (n,) of one item's tokens in raster order."""
    f, h, w = frames_hw(shape)
    hp, wp = h // p, w // p
    row_len = wp + int(nextline)
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(hp), torch.arange(row_len), indexing="ij"), dim=-1)
    kinds = torch.where(grid[..., 2] == wp, NEXTLINE, PATCH).view(f, -1)
    grid = grid.view(f, -1, 3)
    if nextframe and f > 1:
        slot = torch.stack([torch.arange(f), torch.full((f,), hp), torch.zeros(f, dtype=torch.long)], dim=-1)
        grid = torch.cat([grid, slot.view(f, 1, 3)], dim=1).flatten(0, 1)[:-1]
        kinds = torch.cat([kinds, torch.full((f, 1), NEXTFRAME)], dim=1).flatten()[:-1]
    return grid.reshape(-1, 3), kinds.flatten()


def token_layout(shapes: list[tuple[int, ...]], p: int, nextline: bool, nextframe: bool, device, tile=None):
    """cu_seqlens, max_seqlen, positions, kind and patch_rows for items of the given latent shapes."""
    layouts = [_item_layout(s, p, nextline, nextframe, tile) for s in shapes]
    lengths = [pos.shape[0] for pos, _, _ in layouts]
    cu = torch.zeros(len(shapes) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    positions = torch.cat([pos for pos, _, _ in layouts]).to(torch.int32)
    kind = torch.cat([k for _, k, _ in layouts]).to(torch.int8)
    patch_rows = torch.cat([rows + start for (_, _, rows), start in zip(layouts, cu.tolist())])
    move = lambda t: t.to(device, non_blocking=True)
    return move(cu), max(lengths), move(positions), move(kind), move(patch_rows)


def tile_layout(shapes: list[tuple[int, ...]], p: int, nextline: bool, nextframe: bool, tile, device) -> TileLayout:
    """The :class:`TileLayout` of a tile-major pack of items of these latent shapes, from the shapes alone."""
    tt, th, tw = tile
    grids, coords, sizes, samples, starts, patch_end, start = [], [], [], [], [], [], 0
    for b, shape in enumerate(shapes):
        f, h, w = frames_hw(shape)
        hp, wp = h // p, w // p
        n_t, n_h, n_w = -(-f // tt), -(-hp // th), -(-wp // tw)
        a, r, c = (g.flatten() for g in torch.meshgrid(*map(torch.arange, (n_t, n_h, n_w)), indexing="ij"))
        extent = lambda i, step, total: torch.clamp(total - i * step, max=step)
        grids.append((n_t, n_h, n_w))
        coords.append(torch.stack([a, r, c], dim=1))
        sizes.append(extent(a, tt, f) * extent(r, th, hp) * extent(c, tw, wp))
        samples.append(torch.full((a.numel(),), b))
        starts.append(start)
        patch_end.append(start + f * hp * wp)
        start += item_tokens(shape, p, nextline, nextframe)
    counts = [len(s) for s in sizes]
    cu_tiles = torch.tensor([0, *itertools.accumulate(counts)])
    sample = torch.cat(samples)
    ends = torch.cat([first + s.cumsum(0) for first, s in zip(starts, sizes)])
    sizes = torch.cat(sizes)
    move = lambda t: t.to(torch.int32).to(device, non_blocking=True)
    ranges = move(torch.stack([ends - sizes, ends], dim=1))
    # The tile of every token, on the device: the first tile ending after it, if the token is inside it.
    rows = torch.arange(start, device=ranges.device, dtype=torch.int32)
    tile_of = torch.searchsorted(ranges[:, 1].contiguous(), rows, right=True).clamp(max=ranges.shape[0] - 1)
    inside = (rows >= ranges[tile_of, 0]) & (rows < ranges[tile_of, 1])
    token_tile = torch.where(inside, tile_of.to(torch.int32), -1)
    return TileLayout(
        tile=(tt, th, tw),
        grid=move(torch.tensor(grids)),
        cu_tiles=move(cu_tiles),
        ranges=ranges,
        coords=move(torch.cat(coords)),
        sample=move(sample),
        patch_end=move(torch.tensor(patch_end)),
        token_tile=token_tile,
        max_tiles=max(counts),
        placeholders=start - sum(end - first for end, first in zip(patch_end, starts)),  # tokens less patches
    )


def patchify(latent: torch.Tensor, p: int, channels_last: bool) -> torch.Tensor:
    """(C, [F,] H, W) -> (F*H/p*W/p, C*p*p) patch vectors in row-major order."""
    x = latent if latent.dim() == 4 else latent.unsqueeze(1)
    c, f, h, w = x.shape
    x = x.reshape(c, f, h // p, p, w // p, p)
    order = (1, 2, 4, 3, 5, 0) if channels_last else (1, 2, 4, 0, 3, 5)
    return x.permute(order).reshape(f * (h // p) * (w // p), c * p * p)


def unpatchify(vectors: torch.Tensor, shape: tuple[int, ...], p: int, channels: int, channels_last: bool):
    """Inverse of :func:`patchify` for an item of latent ``shape`` with ``channels`` output channels."""
    f, h, w = frames_hw(shape)
    hp, wp = h // p, w // p
    if channels_last:
        x = vectors.reshape(f, hp, wp, p, p, channels).permute(5, 0, 1, 3, 2, 4)
    else:
        x = vectors.reshape(f, hp, wp, channels, p, p).permute(3, 0, 1, 4, 2, 5)
    x = x.reshape(channels, f, h, w)
    return x if len(shape) == 4 else x.squeeze(1)


def pack(
    latents: list[torch.Tensor],
    patch_size: int,
    nextline: bool = True,
    nextframe: bool = True,
    channels_last: bool = False,
    tile: tuple[int, int, int] | None = None,
) -> Packed:
    shapes = [tuple(x.shape) for x in latents]
    device = latents[0].device
    cu, max_len, positions, kind, patch_rows = token_layout(shapes, patch_size, nextline, nextframe, device, tile)
    vectors = torch.cat([patchify(x, patch_size, channels_last) for x in latents])
    patches = vectors.new_zeros(kind.shape[0], vectors.shape[1]).index_copy(0, patch_rows, vectors)
    tiles = None if tile is None else tile_layout(shapes, patch_size, nextline, nextframe, tile, device)
    return Packed(
        patches, cu, max_len, positions, kind, shapes, patch_size, nextline, nextframe, patch_rows, tile, tiles
    )


def unpack(tokens: torch.Tensor, packed: Packed, out_channels: int, channels_last: bool = True) -> list[torch.Tensor]:
    p = packed.patch_size
    vectors = tokens.index_select(0, packed.patch_rows)
    counts = [frames_hw(s)[0] * (frames_hw(s)[1] // p) * (frames_hw(s)[2] // p) for s in packed.shapes]
    return [
        unpatchify(chunk, shape, p, out_channels, channels_last)
        for chunk, shape in zip(vectors.split(counts), packed.shapes)
    ]
