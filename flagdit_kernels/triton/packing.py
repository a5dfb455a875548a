"""Triton pack / unpack: latents of any (C, [F,] H, W) size <-> packed token rows, one launch per batch.

The latents of a batch are separate tensors, so a single launch cannot take them as kernel arguments. Instead
the host writes a small int64 *item table* (``item_table``): per item its first packed token, its first
segment (below), the raw address of its latent (``tensor.data_ptr()``), its (C, F, H, W) element strides and
its patch grid. The kernels load an item's address from the table and turn it into a typed pointer
(``int64.to(tl.pointer_type(...))``), so every item is reached from one program grid.

Work unit: a *segment*, up to ``R_TILE`` consecutive patch rows of one frame of one item times up to
``T_TILE`` consecutive patches of each (the columns ``[t0, t0 + T_TILE)``), times a block of ``BLOCK_C``
channels; the grid is (segments of the batch, channel blocks). Wide items get one row per segment, narrow ones
several, so every program moves a tile of about ``TILE_ELEMS`` elements. A program finds its item by a binary
search over the table's segment column (``LOG2_ITEMS`` scalar loads, L1 hits) and its (frame, r0, t0) by
division, so everything it derives from the table is a scalar. On the latent side a segment is, per channel,
``R_TILE * P`` latent rows of ``T_TILE * P`` contiguous elements along W: loaded (pack) or stored (unpack) as
``(BLOCK_C, R_TILE * P, T_TILE * P)`` tiles that vectorize to 16-byte accesses when the host has checked the
alignment (``ALIGNED``: 16-byte base addresses, C/F/H strides and W multiples of 16 bytes, unit W stride; the
kernel gets ``tl.multiple_of`` hints, which a pointer built from an integer cannot carry otherwise). On the
token side a segment is ``R_TILE * T_TILE`` rows of ``BLOCK_C * P * P`` elements, contiguous per row.
``tl.reshape`` / ``tl.permute`` between the two orders make the compiler stage the transpose through shared
memory, so both sides are coalesced.

Placeholder rows ([nextline] after each patch row, [nextframe] between frames) hold zeros in pack's output;
the segments at the end of their rows write them, and the layout outputs (kind, positions, patch_rows,
cu_seqlens). Unpack never reads them. Token positions follow ``csrc/token_layout.h``; :func:`token_index` is
its Triton twin (a placeholder's position is the place it would have as a patch: (f, r, W/p) for [nextline],
(f, H/p, 0) for [nextframe]). Tile-major packs (``TILED``) reuse the same segments: only the token index of each
patch and slot changes, so a segment's token rows are scattered (each row still one contiguous store).

Bounds: every index a program uses comes from the table the host built from the tensors themselves, the item
search is clamped to the table, and every load and store is masked by the real extents (channels, patch size,
row length), so no launch reads or writes outside its tensors; each output element is written by exactly one
program.
"""

from __future__ import annotations

import array

import torch
import triton
import triton.language as tl

# Rows of the item table (an int64 (ITEM_FIELDS, B + 1) tensor; START and SEGMENT also hold the batch's totals
# in the B + 1-th column). tl.constexpr so that kernels may read them as globals.
START, SEGMENT, ADDR, STRIDE_C, STRIDE_F, STRIDE_H, STRIDE_W, FRAMES, PATCH_ROWS, PATCH_COLS, PATCH_START = (
    tl.constexpr(i) for i in range(11)
)
ITEM_FIELDS = 11
# Token kinds, as in flagdit_kernels/reference/packing.py (PATCH, NEXTLINE, NEXTFRAME).
KIND_PATCH, KIND_NEXTLINE, KIND_NEXTFRAME = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Elements a program moves: 8 KiB of bf16 in registers plus one shared-memory transpose.
TILE_ELEMS = 4096
# Elements of one token a program covers (more channels: more programs along the grid's channel axis).
MAX_VECTOR_ELEMS = 256
# Entries of cu_seqlens written per step by the program that fills it in.
CU_BLOCK = tl.constexpr(128)


@triton.jit
def token_index(start, frame, row, col, grid, tiling, NEXTLINE: tl.constexpr, NEXTFRAME: tl.constexpr,
                TILED: tl.constexpr):  # fmt: skip
    """Packed index of the token at position (frame, row, col) of an item ``grid`` = (first token, patch rows,
    patch cols, frames) (csrc/token_layout.h). Raster order: frames of rows of patches, each row closed by a
    [nextline] slot at col == patch cols, frames separated by a [nextframe] slot at (frame, patch rows, 0).
    TILED: the patches tile-major (``tiling`` = (frames, rows, cols) per tile, edge tiles partial), then the
    placeholder slots in raster order."""
    start, patch_rows, patch_cols, frames = grid
    if TILED:
        tile_t, tile_h, tile_w = tiling
        per_frame = patch_rows * NEXTLINE + NEXTFRAME  # placeholder slots of a frame
        slot = frames * patch_rows * patch_cols + frame * per_frame + tl.where(row == patch_rows, per_frame - 1, row)
        a = frame // tile_t
        b = row // tile_h
        c = col // tile_w
        tf = tl.minimum(tile_t, frames - a * tile_t)
        hb = tl.minimum(tile_h, patch_rows - b * tile_h)
        wc = tl.minimum(tile_w, patch_cols - c * tile_w)
        patch = (
            a * tile_t * patch_rows * patch_cols
            + b * tile_h * patch_cols * tf
            + c * tile_w * tf * hb
            + ((frame - a * tile_t) * hb + row - b * tile_h) * wc
            + col
            - c * tile_w
        )
        return start + tl.where((row == patch_rows) | (col == patch_cols), slot, patch)
    else:
        row_len = patch_cols + NEXTLINE
        return start + frame * (patch_rows * row_len + NEXTFRAME) + row * row_len + col


@triton.jit
def _find_item(column, value, n_items, LOG2_ITEMS: tl.constexpr):
    """The last item i with column[i] <= value (a branch-free binary search over a non-decreasing column);
    in [0, n_items) whatever ``value`` is."""
    item = value * 0
    for k in tl.static_range(LOG2_ITEMS - 1, -1, -1):
        cand = item + (1 << k)
        ok = cand < n_items
        first = tl.load(column + tl.minimum(cand, n_items - 1))
        item = tl.where(ok & (first <= value), cand, item)
    return item


@triton.jit
def _segment(table, stride, n_items, R_TILE: tl.constexpr, T_TILE: tl.constexpr, LOG2_ITEMS: tl.constexpr):
    """This program's segment: (item, its grid (first token, patch rows, patch cols, frames), frame, first row
    r0, first column t0, rows and columns of patches in the segment)."""
    seg = tl.program_id(0)
    item = _find_item(table + SEGMENT * stride, seg, n_items, LOG2_ITEMS)
    rows = tl.load(table + PATCH_ROWS * stride + item)
    cols = tl.load(table + PATCH_COLS * stride + item)
    grid = (tl.load(table + START * stride + item), rows, cols, tl.load(table + FRAMES * stride + item))
    col_tiles = tl.cdiv(cols, T_TILE)
    row_tiles = tl.cdiv(rows, R_TILE)
    local = seg - tl.load(table + SEGMENT * stride + item)
    block = local // col_tiles  # (frame, row block), frame-major
    t0 = (local - block * col_tiles) * T_TILE
    frame = block // row_tiles
    r0 = (block - frame * row_tiles) * R_TILE
    return item, grid, frame, r0, t0, tl.minimum(rows - r0, R_TILE), tl.minimum(cols - t0, T_TILE)


@triton.jit
def _latent_tile(table, stride, item, frame, r0, t0, nrows, ncols, ch, cmask, elem,
                 P: tl.constexpr, P_BLOCK: tl.constexpr, R_TILE: tl.constexpr, T_TILE: tl.constexpr,
                 FLAT_W: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """Pointers and mask of the segment's latent tile: ``(BLOCK_C, R_TILE * P, T_TILE * P)`` latent rows and
    columns when FLAT_W (unit W stride, P a power of two: the last dim runs along W), else ``(BLOCK_C, R_TILE,
    P_BLOCK, T_TILE, P_BLOCK)`` in (c, patch row, ph, patch col, pw) order. ``VEC``: elements of a 16-byte
    vector (ALIGNED promises 16-byte base addresses and C / F / H strides, W and T_TILE * P in whole vectors)."""
    addr = tl.load(table + ADDR * stride + item)
    s_c = tl.load(table + STRIDE_C * stride + item)
    s_f = tl.load(table + STRIDE_F * stride + item)
    s_h = tl.load(table + STRIDE_H * stride + item)
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
        s_c = tl.multiple_of(s_c, VEC)
        s_f = tl.multiple_of(s_f, VEC)
        s_h = tl.multiple_of(s_h, VEC)
    base = addr.to(tl.pointer_type(elem))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    base += frame * s_f + (r0 * P) * s_h
    c_off = ch.to(tl.int64) * s_c
    if FLAT_W:
        hh = tl.arange(0, R_TILE * P)  # latent rows of the segment
        w = tl.arange(0, T_TILE * P)
        n_w = ncols * P
        if ALIGNED:
            n_w = tl.multiple_of(n_w, VEC)
        ptrs = base + c_off[:, None, None] + (hh * s_h)[None, :, None] + (t0 * P + w)[None, None, :]
        mask = cmask[:, None, None] & (hh < nrows * P)[None, :, None] & (w < n_w)[None, None, :]
    else:
        s_w = tl.load(table + STRIDE_W * stride + item)
        rr = tl.arange(0, R_TILE)
        t = tl.arange(0, T_TILE)
        pp = tl.arange(0, P_BLOCK)
        h_off = (rr * P)[:, None] + pp[None, :]  # (R_TILE, P_BLOCK) latent rows
        w_off = ((t0 + t) * P)[:, None] + pp[None, :]  # (T_TILE, P_BLOCK) latent columns
        ptrs = (
            base
            + c_off[:, None, None, None, None]
            + (h_off * s_h)[None, :, :, None, None]
            + (w_off.to(tl.int64) * s_w)[None, None, None, :, :]
        )
        r_ok = (rr < nrows)[:, None] & (pp < P)[None, :]
        c_ok = (t < ncols)[:, None] & (pp < P)[None, :]
        mask = cmask[:, None, None, None, None] & r_ok[None, :, :, None, None] & c_ok[None, None, None, :, :]
    return ptrs, mask


@triton.jit
def _token_tile(tokens, ok, c0, ch, cmask, channels, row_stride, col_stride,
                P: tl.constexpr, P_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                FLAT_ROWS: tl.constexpr, FULL_C: tl.constexpr):  # fmt: skip
    """Element offsets and mask of this channel block's part of the token rows ``tokens`` (those with ``ok``
    set): ``(N, BLOCK_C * P * P)`` when FLAT_ROWS (the part is one contiguous run), else ``(N, ., ., .)`` in the
    vector order ((ph, pw, c) when CHANNELS_LAST, else (c, ph, pw))."""
    base = tokens.to(tl.int64) * row_stride
    if FLAT_ROWS:
        run = tl.arange(0, BLOCK_C * P * P)
        # Channels-first: the block's run starts at c0 * P * P; channels-last: the block holds every channel.
        offs = base[:, None] + (run + c0 * (P * P))[None, :].to(tl.int64) * col_stride
        if FULL_C:  # the block holds exactly the channels: no column mask, so the row run vectorizes
            mask = ok[:, None] & (run >= 0)[None, :]
        else:
            mask = ok[:, None] & (run < (channels - c0) * (P * P))[None, :]
    else:
        ph = tl.arange(0, P_BLOCK)
        pw = tl.arange(0, P_BLOCK)
        p_ok = (ph < P)[:, None] & (pw < P)[None, :]
        if CHANNELS_LAST:
            vec = (ph * (P * channels))[:, None, None] + (pw * channels)[None, :, None] + ch[None, None, :]
            v_ok = p_ok[:, :, None] & cmask[None, None, :]
        else:
            vec = (ch * (P * P))[:, None, None] + (ph * P)[None, :, None] + pw[None, None, :]
            v_ok = cmask[:, None, None] & p_ok[None, :, :]
        offs = base[:, None, None, None] + (vec.to(tl.int64) * col_stride)[None, :, :, :]
        mask = ok[:, None, None, None] & v_ok[None, :, :, :]
    return offs, mask


@triton.jit
def _to_token_rows(vals, R_TILE: tl.constexpr, T_TILE: tl.constexpr, BLOCK_C: tl.constexpr, P: tl.constexpr,
                   P_BLOCK: tl.constexpr, FLAT_W: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                   FLAT_ROWS: tl.constexpr):  # fmt: skip
    """A latent tile (see :func:`_latent_tile`) as the segment's R_TILE * T_TILE token rows in vector order."""
    if FLAT_W:
        vals = tl.reshape(vals, (BLOCK_C, R_TILE, P, T_TILE, P))
    if CHANNELS_LAST:
        vals = tl.permute(vals, (1, 3, 2, 4, 0))  # (patch row, patch col, ph, pw, c)
        vals = tl.reshape(vals, (R_TILE * T_TILE, P_BLOCK, P_BLOCK, BLOCK_C))
    else:
        vals = tl.permute(vals, (1, 3, 0, 2, 4))  # (patch row, patch col, c, ph, pw)
        vals = tl.reshape(vals, (R_TILE * T_TILE, BLOCK_C, P_BLOCK, P_BLOCK))
    if FLAT_ROWS:
        vals = tl.reshape(vals, (R_TILE * T_TILE, BLOCK_C * P * P))
    return vals


@triton.jit
def _to_latent_tile(vals, R_TILE: tl.constexpr, T_TILE: tl.constexpr, BLOCK_C: tl.constexpr, P: tl.constexpr,
                    P_BLOCK: tl.constexpr, FLAT_W: tl.constexpr, CHANNELS_LAST: tl.constexpr):  # fmt: skip
    """The inverse of :func:`_to_token_rows`."""
    if CHANNELS_LAST:
        vals = tl.reshape(vals, (R_TILE, T_TILE, P_BLOCK, P_BLOCK, BLOCK_C))
        vals = tl.permute(vals, (4, 0, 2, 1, 3))  # (c, patch row, ph, patch col, pw)
    else:
        vals = tl.reshape(vals, (R_TILE, T_TILE, BLOCK_C, P_BLOCK, P_BLOCK))
        vals = tl.permute(vals, (2, 0, 3, 1, 4))
    if FLAT_W:
        vals = tl.reshape(vals, (BLOCK_C, R_TILE * P, T_TILE * P))
    return vals


@triton.jit
def _patch_tokens(grid, tiling, frame, r0, t0, nrows, ncols, R_TILE: tl.constexpr, T_TILE: tl.constexpr,
                  NEXTLINE: tl.constexpr, NEXTFRAME: tl.constexpr, TILED: tl.constexpr):  # fmt: skip
    """The segment's patch tokens, row-major: (token indices, in-segment mask, their rows, their columns)."""
    i = tl.arange(0, R_TILE * T_TILE)
    row = r0 + i // T_TILE
    col = t0 + i % T_TILE
    ok = (i // T_TILE < nrows) & (i % T_TILE < ncols)
    return token_index(grid[0], frame, row, col, grid, tiling, NEXTLINE, NEXTFRAME, TILED), ok, row, col


@triton.jit
def _placeholder_slots(grid, tiling, frame, r0, nrows, last, R_TILE: tl.constexpr, NEXTLINE: tl.constexpr,
                       NEXTFRAME: tl.constexpr, TILED: tl.constexpr):  # fmt: skip
    """The placeholder slots a segment closes, as (tokens, mask, rows, cols, kinds) of 2 * R_TILE slots: slot i
    < R_TILE is the [nextline] slot of row r0 + i, at (frame, r0 + i, cols); slot R_TILE the frame's
    [nextframe] slot at (frame, rows, 0), closed by the segment holding the frame's last row unless the frame is
    the item's last. Only the segments at the end of their rows (``last``) close any."""
    _, rows, cols, frames = grid
    i = tl.arange(0, 2 * R_TILE)
    is_frame_slot = i == R_TILE
    slot_row = tl.where(is_frame_slot, rows, r0 + i)
    slot_col = tl.where(is_frame_slot, 0, cols)
    frame_ends = ((r0 + nrows == rows) & (frame < frames - 1)).to(tl.int32)
    wanted = tl.where(is_frame_slot, frame_ends * NEXTFRAME, (i < nrows).to(tl.int32) * NEXTLINE) != 0
    tok = token_index(grid[0], frame, slot_row, slot_col, grid, tiling, NEXTLINE, NEXTFRAME, TILED)
    slot_kind = tl.where(is_frame_slot, KIND_NEXTFRAME, KIND_NEXTLINE).to(tl.int8)
    # where() rather than `&`: the interpreter mis-types a scalar bool combined with a vector.
    return tok, tl.where(wanted, last, False), slot_row, slot_col, slot_kind


@triton.jit
def _store_positions(positions, tok, frame, row, col, ok):
    pos = positions + tok.to(tl.int64) * 3
    tl.store(pos, frame.to(tl.int32), mask=ok)
    tl.store(pos + 1, row.to(tl.int32), mask=ok)
    tl.store(pos + 2, col.to(tl.int32), mask=ok)


@triton.jit
def _write_layout(patch_start, grid, frame, patches, slots, positions, kind, patch_rows):
    """kind, positions and patch_rows of the segment's patch tokens and of the placeholder slots it closes, each
    given as (token indices, mask, rows, cols[, kinds]); ``patch_start`` is the item's first patch index."""
    _, rows, cols, _ = grid
    tokens, ok, row, col = patches
    tl.store(kind + tokens, tl.full(tokens.shape, KIND_PATCH, tl.int8), mask=ok)
    _store_positions(positions, tokens, frame + 0 * col, row, col, ok)
    tl.store(patch_rows + patch_start + (frame * rows + row) * cols + col, tokens.to(tl.int64), mask=ok)
    slot_tokens, slot_ok, slot_row, slot_col, slot_kind = slots
    tl.store(kind + slot_tokens, slot_kind, mask=slot_ok)
    _store_positions(positions, slot_tokens, frame + 0 * slot_row, slot_row, slot_col, slot_ok)


@triton.jit
def pack_kernel(
    table,  # int64 (ITEM_FIELDS, n_items + 1), see module docstring
    out,  # (total_tokens, C * P * P) token rows
    positions,  # int32 (total_tokens, 3), written when WRITE_LAYOUT
    kind,  # int8 (total_tokens,), written when WRITE_LAYOUT
    patch_rows,  # int64 (patch tokens,), written when WRITE_LAYOUT
    cu_seqlens,  # int32 (n_items + 1,), written when WRITE_LAYOUT
    n_items,
    channels,
    out_row_stride,
    tile_t,  # the tile-major order's tile (patches), read when TILED
    tile_h,
    tile_w,
    P: tl.constexpr,
    P_BLOCK: tl.constexpr,
    R_TILE: tl.constexpr,
    T_TILE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_ITEMS: tl.constexpr,
    NEXTLINE: tl.constexpr,
    NEXTFRAME: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FLAT_W: tl.constexpr,
    FLAT_ROWS: tl.constexpr,
    FULL_C: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    TILED: tl.constexpr,
    WRITE_LAYOUT: tl.constexpr,
):
    stride = n_items + 1
    item, grid, frame, r0, t0, nrows, ncols = _segment(table, stride, n_items, R_TILE, T_TILE, LOG2_ITEMS)
    c0 = tl.program_id(1) * BLOCK_C
    ch = c0 + tl.arange(0, BLOCK_C)
    cmask = ch < channels

    src, load_mask = _latent_tile(
        table, stride, item, frame, r0, t0, nrows, ncols, ch, cmask, out.dtype.element_ty, P, P_BLOCK, R_TILE,
        T_TILE, FLAT_W, ALIGNED, VEC,
    )  # fmt: skip
    vals = tl.load(src, mask=load_mask, other=0.0)
    vals = _to_token_rows(vals, R_TILE, T_TILE, BLOCK_C, P, P_BLOCK, FLAT_W, CHANNELS_LAST, FLAT_ROWS)
    tiling = (tile_t, tile_h, tile_w)
    tokens, ok, row, col = _patch_tokens(
        grid, tiling, frame, r0, t0, nrows, ncols, R_TILE, T_TILE, NEXTLINE, NEXTFRAME, TILED
    )
    dst, store_mask = _token_tile(
        tokens, ok, c0, ch, cmask, channels, out_row_stride, 1, P, P_BLOCK, BLOCK_C, CHANNELS_LAST, FLAT_ROWS,
        FULL_C,
    )  # fmt: skip
    tl.store(out + dst, vals, mask=store_mask)

    # The segments at the end of their rows write zeros over the placeholder rows they close.
    slots = _placeholder_slots(
        grid, tiling, frame, r0, nrows, t0 + T_TILE >= grid[2], R_TILE, NEXTLINE, NEXTFRAME, TILED
    )
    dst, store_mask = _token_tile(
        slots[0], slots[1], c0, ch, cmask, channels, out_row_stride, 1, P, P_BLOCK, BLOCK_C, CHANNELS_LAST,
        FLAT_ROWS, FULL_C,
    )  # fmt: skip
    tl.store(out + dst, tl.zeros(dst.shape, out.dtype.element_ty), mask=store_mask)

    if WRITE_LAYOUT:  # noqa: SIM102 (a constexpr gate: the stores below are compiled only when asked for)
        if tl.program_id(1) == 0:
            patch_start = tl.load(table + PATCH_START * stride + item)
            _write_layout(patch_start, grid, frame, (tokens, ok, row, col), slots, positions, kind, patch_rows)
            if tl.program_id(0) == 0:  # cu_seqlens = the table's start column, total included
                for i0 in range(0, stride, CU_BLOCK):
                    i = i0 + tl.arange(0, CU_BLOCK)
                    starts = tl.load(table + START * stride + i, mask=i < stride)
                    tl.store(cu_seqlens + i, starts.to(tl.int32), mask=i < stride)


@triton.jit
def unpack_kernel(
    table,  # int64 (ITEM_FIELDS, n_items + 1), addresses and strides of the output latents
    tokens_ptr,  # (total_tokens, C * P * P) token rows, any strides
    n_items,
    channels,
    row_stride,
    col_stride,
    tile_t,  # the tile-major order's tile (patches), read when TILED
    tile_h,
    tile_w,
    P: tl.constexpr,
    P_BLOCK: tl.constexpr,
    R_TILE: tl.constexpr,
    T_TILE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_ITEMS: tl.constexpr,
    NEXTLINE: tl.constexpr,
    NEXTFRAME: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FLAT_W: tl.constexpr,
    FLAT_ROWS: tl.constexpr,
    FULL_C: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    TILED: tl.constexpr,
):
    stride = n_items + 1
    item, grid, frame, r0, t0, nrows, ncols = _segment(table, stride, n_items, R_TILE, T_TILE, LOG2_ITEMS)
    c0 = tl.program_id(1) * BLOCK_C
    ch = c0 + tl.arange(0, BLOCK_C)
    cmask = ch < channels

    # Token side: the segment's patch rows (placeholder rows are neither read nor written).
    tiling = (tile_t, tile_h, tile_w)
    tokens, ok, _, _ = _patch_tokens(grid, tiling, frame, r0, t0, nrows, ncols, R_TILE, T_TILE, NEXTLINE, NEXTFRAME,
                                     TILED)  # fmt: skip
    src, load_mask = _token_tile(
        tokens, ok, c0, ch, cmask, channels, row_stride, col_stride, P, P_BLOCK, BLOCK_C, CHANNELS_LAST, FLAT_ROWS,
        FULL_C,
    )  # fmt: skip
    vals = tl.load(tokens_ptr + src, mask=load_mask, other=0.0)
    vals = _to_latent_tile(vals, R_TILE, T_TILE, BLOCK_C, P, P_BLOCK, FLAT_W, CHANNELS_LAST)
    dst, store_mask = _latent_tile(
        table, stride, item, frame, r0, t0, nrows, ncols, ch, cmask, tokens_ptr.dtype.element_ty, P, P_BLOCK,
        R_TILE, T_TILE, FLAT_W, ALIGNED, VEC,
    )  # fmt: skip
    tl.store(dst, vals, mask=store_mask)


# ----------------------------------------------------------------------------------------------- host launchers


def _cfhw_strides(t) -> tuple[int, int, int, int]:
    """Element strides of a latent as (C, F, H, W); a (C, H, W) latent gets frame stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (t.stride(0), 0, t.stride(1), t.stride(2))


def _check_tiling(fhw, patch_size: int) -> None:
    """Every item's H and W are positive multiples of the patch size and F >= 1: otherwise rows of an unpacked
    latent would stay unwritten (the public ops check this first; the launchers never trust it)."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    for i, (f, h, w) in enumerate(fhw):
        if f < 1 or h < patch_size or w < patch_size or h % patch_size or w % patch_size:
            raise ValueError(
                f"item {i} has (F, H, W) = ({f}, {h}, {w}); F must be >= 1 and H, W positive multiples of "
                f"patch_size={patch_size}"
            )


def _check_tile(tile) -> tuple[int, int, int]:
    """The token order's tile: empty (raster order, returned as zeros) or three positive patch counts."""
    if len(tile) == 0:
        return (0, 0, 0)
    if len(tile) != 3 or any(int(t) < 1 for t in tile):
        raise ValueError(f"tile must be empty (raster order) or (frames, rows, cols) of positive sizes, got {tile}")
    return tuple(int(t) for t in tile)


def _aligned(latents, vec: int) -> bool:
    """Whether every latent allows 16-byte accesses along W: 16-byte aligned base, unit W stride, C / F / H
    strides and W in whole 16-byte vectors (``vec`` elements)."""
    for t in latents:
        s_c, s_f, s_h, s_w = _cfhw_strides(t)
        if t.data_ptr() % 16 or s_w != 1 or s_c % vec or s_f % vec or s_h % vec or t.shape[-1] % vec:
            return False
    return True


def _blocks(channels: int, patch_size: int, max_rows: int, max_cols: int) -> tuple[int, int, int, int]:
    """(P_BLOCK, BLOCK_C, R_TILE, T_TILE): tiles of at most TILE_ELEMS elements, each token contributing at most
    MAX_VECTOR_ELEMS (channel, ph, pw) elements; a segment spans up to T_TILE patches of a row (at most the
    widest row) and as many rows as the tile has room for (at most the tallest item)."""
    p_block = triton.next_power_of_2(patch_size)
    block_c = min(triton.next_power_of_2(channels), max(1, MAX_VECTOR_ELEMS // (p_block * p_block)))
    tokens = max(1, TILE_ELEMS // (block_c * p_block * p_block))
    t_tile = min(tokens, triton.next_power_of_2(max_cols))
    r_tile = max(1, min(tokens // t_tile, triton.next_power_of_2(max_rows)))
    return p_block, block_c, r_tile, t_tile


def item_table(latents, fhw, patch_size: int, nextline: bool, nextframe: bool, r_tile: int, t_tile: int, device):
    """The int64 item table for tensors ``latents`` (their addresses and strides) of frame/height/width ``fhw``.

    Returns ``(table, total_tokens, total_patches, total_segments)``. Built from shapes alone on the host (no
    device sync) and sent to the device in one small copy.
    """
    n = len(fhw)
    cols = [[0] * (n + 1) for _ in range(ITEM_FIELDS)]
    starts, segs, addrs, s_c, s_f, s_h, s_w, frames, rows, pcols, pstarts = cols
    start = seg = patches = 0
    for i, (t, (f, h, w)) in enumerate(zip(latents, fhw)):
        starts[i], segs[i], pstarts[i], addrs[i] = start, seg, patches, t.data_ptr()
        s_c[i], s_f[i], s_h[i], s_w[i] = _cfhw_strides(t)
        frames[i], rows[i], pcols[i] = f, h // patch_size, w // patch_size
        start += f * rows[i] * (pcols[i] + int(nextline)) + (f - 1 if nextframe else 0)
        seg += f * triton.cdiv(rows[i], r_tile) * triton.cdiv(pcols[i], t_tile)
        patches += f * rows[i] * pcols[i]
    starts[n], segs[n] = start, seg
    # array -> frombuffer is several times cheaper than torch.tensor(list) on this launch-bound path. The copy
    # goes through pinned memory so that it is asynchronous for certain (a pageable source may make the
    # driver wait for the stream); PyTorch's pinned allocator keeps the block until the copy has run.
    host = torch.frombuffer(array.array("q", [v for col in cols for v in col]), dtype=torch.int64)
    if torch.device(device).type == "cpu":
        return host.clone(), start, patches, seg
    return host.pin_memory().to(device, non_blocking=True), start, patches, seg


def _flags(latents, fhw, patch_size: int, channels: int, channels_last: bool, nextline: bool, nextframe: bool):
    """The tiling and specialization constexprs shared by both kernels."""
    p_block, block_c, r_tile, t_tile = _blocks(
        channels, patch_size, max(h // patch_size for _, h, _ in fhw), max(w // patch_size for _, _, w in fhw)
    )
    pow2 = p_block == patch_size
    unit_w = all(_cfhw_strides(t)[3] == 1 for t in latents)
    vec = 16 // latents[0].element_size()
    return dict(
        P=patch_size,
        P_BLOCK=p_block,
        R_TILE=r_tile,
        T_TILE=t_tile,
        BLOCK_C=block_c,
        LOG2_ITEMS=max(0, (len(fhw) - 1).bit_length()),
        NEXTLINE=int(nextline),
        NEXTFRAME=int(nextframe),
        CHANNELS_LAST=channels_last,
        FLAT_W=pow2 and unit_w,
        # A block's part of a token row is one contiguous run (no padding inside the tile's vector).
        FLAT_ROWS=pow2 and (not channels_last or block_c == channels),
        FULL_C=block_c == channels,
        ALIGNED=pow2 and unit_w and (t_tile * patch_size) % vec == 0 and _aligned(latents, vec),
        VEC=vec,
    )


def pack(latents, fhw, patch_size, nextline, nextframe, channels_last, tile=(), *, with_layout):
    """Launches :func:`pack_kernel` once for the batch, in raster order (``tile`` empty) or tile-major order.
    Returns ``patches`` or, with ``with_layout``, ``(patches, positions, kind, patch_rows, cu_seqlens)``."""
    _check_tiling(fhw, patch_size)
    tile = _check_tile(tile)
    x0 = latents[0]
    channels = x0.shape[0]
    flags = _flags(latents, fhw, patch_size, channels, channels_last, nextline, nextframe)
    table, total, n_patches, n_segments = item_table(
        latents, fhw, patch_size, nextline, nextframe, flags["R_TILE"], flags["T_TILE"], x0.device
    )
    out = torch.empty(total, channels * patch_size * patch_size, device=x0.device, dtype=x0.dtype)
    if with_layout:
        positions = torch.empty(total, 3, device=x0.device, dtype=torch.int32)
        kind = torch.empty(total, device=x0.device, dtype=torch.int8)
        patch_rows = torch.empty(n_patches, device=x0.device, dtype=torch.int64)
        cu = torch.empty(len(fhw) + 1, device=x0.device, dtype=torch.int32)
    else:
        positions = kind = patch_rows = cu = out  # unused: WRITE_LAYOUT=False compiles those stores away
    grid = (n_segments, triton.cdiv(channels, flags["BLOCK_C"]))
    pack_kernel[grid](
        table, out, positions, kind, patch_rows, cu, len(fhw), channels, out.stride(0), *tile, **flags,
        TILED=tile[0] > 0, WRITE_LAYOUT=with_layout,
    )  # fmt: skip
    return (out, positions, kind, patch_rows, cu) if with_layout else out


def unpack(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last, tile=()):
    """Launches :func:`unpack_kernel` once for the batch; ``item_shapes`` holds (ndim, F, H, W) per item and
    ``tile`` the token order (empty: raster). Returns new contiguous latents, one per item."""
    dims = [tuple(item_shapes[i : i + 4]) for i in range(0, len(item_shapes), 4)]
    fhw = [(f, h, w) for _, f, h, w in dims]
    _check_tiling(fhw, patch_size)
    tile = _check_tile(tile)
    outs = [
        torch.empty((channels, f, h, w) if nd == 4 else (channels, h, w), device=tokens.device, dtype=tokens.dtype)
        for nd, f, h, w in dims
    ]
    flags = _flags(outs, fhw, patch_size, channels, channels_last, nextline, nextframe)
    table, total, _, n_segments = item_table(
        outs, fhw, patch_size, nextline, nextframe, flags["R_TILE"], flags["T_TILE"], tokens.device
    )
    if total != tokens.shape[0]:
        raise ValueError(f"tokens has {tokens.shape[0]} rows but the item shapes give {total} tokens")
    if tokens.shape[1] != channels * patch_size * patch_size:
        raise ValueError(f"tokens must have {channels * patch_size**2} columns, got {tokens.shape[1]}")
    grid = (n_segments, triton.cdiv(channels, flags["BLOCK_C"]))
    unpack_kernel[grid](
        table, tokens, len(fhw), channels, tokens.stride(0), tokens.stride(1), *tile, **flags, TILED=tile[0] > 0
    )
    return outs
