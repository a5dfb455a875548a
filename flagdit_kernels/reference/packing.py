"""Packing latents of any (C, [F,] H, W) size into one token sequence, with [nextline]/[nextframe] slots.

An item of F frames, H/p patch rows and W/p patch columns becomes, in row-major order, for every frame its
patch rows each closed by a [nextline] slot (when ``nextline``), and a [nextframe] slot between frames
(when ``nextframe``). Patch vectors are (C, ph, pw) ordered by default (Lumina-T2X's patchify); unpack reads
(ph, pw, C) ordered token vectors by default (Lumina-T2X's final layer). ``channels_last`` picks the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._conventions import frames_hw

PATCH, NEXTLINE, NEXTFRAME = 0, 1, 2


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

    @property
    def seqlens(self) -> list[int]:
        return [item_tokens(s, self.patch_size, self.nextline, self.nextframe) for s in self.shapes]


def item_tokens(shape: tuple[int, ...], p: int, nextline: bool, nextframe: bool) -> int:
    f, h, w = frames_hw(shape)
    return f * (h // p) * (w // p + int(nextline)) + (f - 1 if nextframe else 0)


def _item_layout(shape: tuple[int, ...], p: int, nextline: bool, nextframe: bool):
    """Positions (n, 3) and kinds (n,) of one item's tokens, built on the CPU from its shape alone."""
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


def token_layout(shapes: list[tuple[int, ...]], p: int, nextline: bool, nextframe: bool, device):
    """cu_seqlens, max_seqlen, positions, kind and patch_rows for items of the given latent shapes."""
    layouts = [_item_layout(s, p, nextline, nextframe) for s in shapes]
    lengths = [pos.shape[0] for pos, _ in layouts]
    cu = torch.zeros(len(shapes) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    positions = torch.cat([pos for pos, _ in layouts]).to(torch.int32)
    kind = torch.cat([k for _, k in layouts]).to(torch.int8)
    patch_rows = torch.nonzero(kind == PATCH).flatten()
    move = lambda t: t.to(device, non_blocking=True)
    return move(cu), max(lengths), move(positions), move(kind), move(patch_rows)


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
) -> Packed:
    shapes = [tuple(x.shape) for x in latents]
    device = latents[0].device
    cu, max_len, positions, kind, patch_rows = token_layout(shapes, patch_size, nextline, nextframe, device)
    vectors = torch.cat([patchify(x, patch_size, channels_last) for x in latents])
    patches = vectors.new_zeros(kind.shape[0], vectors.shape[1]).index_copy(0, patch_rows, vectors)
    return Packed(patches, cu, max_len, positions, kind, shapes, patch_size, nextline, nextframe, patch_rows)


def unpack(tokens: torch.Tensor, packed: Packed, out_channels: int, channels_last: bool = True) -> list[torch.Tensor]:
    p = packed.patch_size
    vectors = tokens.index_select(0, packed.patch_rows)
    counts = [frames_hw(s)[0] * (frames_hw(s)[1] // p) * (frames_hw(s)[2] // p) for s in packed.shapes]
    return [
        unpatchify(chunk, shape, p, out_channels, channels_last)
        for chunk, shape in zip(vectors.split(counts), packed.shapes)
    ]
