"""Triton pack / unpack: latents of any (C, [F,] H, W) size <-> packed token rows, one launch per batch.

The latents of a batch are separate tensors, so a single launch cannot take them as kernel arguments. Instead
the host writes a small int64 *item table* (``item_table``): per item its first packed token, the raw address
of its latent (``tensor.data_ptr()``), its (C, F, H, W) element strides and its patch grid. The kernels load
an item's address from the table and turn it into a typed pointer (``int64.to(tl.pointer_type(...))``), so
every item is reached from one program grid over (token blocks, channel blocks). Each token finds its item by
a branch-free binary search over the table's start column (``LOG2_ITEMS`` steps, table reads hit L1).

Memory order: a block holds ``BLOCK_T`` consecutive tokens; consecutive patch tokens of a patch row read
consecutive latent columns, so the latent side of a tile is laid out as ``(C, ph, token, pw)`` (last two dims
contiguous along W) and the token side as ``(token, vector element)``; ``tl.permute`` between the two lets the
compiler stage the transpose through shared memory so that both the latent reads and the token-row writes
are coalesced.
"""

from __future__ import annotations

import array

import torch
import triton
import triton.language as tl

# Rows of the item table (an int64 (ITEM_FIELDS, B + 1) tensor; only START uses the B + 1-th column).
# tl.constexpr so that kernels may read them as globals (compiled Triton rejects plain module ints; the
# interpreter does not notice).
START, ADDR, STRIDE_C, STRIDE_F, STRIDE_H, STRIDE_W, PATCH_ROWS, PATCH_COLS, PATCH_START = (
    tl.constexpr(i) for i in range(9)
)
ITEM_FIELDS = 9


@triton.jit
def _find_item(starts, tokens, n_items, LOG2_ITEMS: tl.constexpr):
    """Index of the item owning each token: the last i with starts[i] <= token (binary search, no branches)."""
    item = tl.zeros_like(tokens)
    for k in tl.static_range(LOG2_ITEMS - 1, -1, -1):
        cand = item + (1 << k)
        ok = cand < n_items
        first = tl.load(starts + cand, mask=ok, other=0)
        item = tl.where(ok & (first <= tokens), cand, item)
    return item


@triton.jit
def _token_places(table, n_items, tokens, LOG2_ITEMS: tl.constexpr, NEXTLINE: tl.constexpr, NEXTFRAME: tl.constexpr):
    """Item, (frame, row, col), patch flag and nextframe flag of each token (csrc/token_layout.h `locate`)."""
    stride = n_items + 1
    item = _find_item(table + START * stride, tokens, n_items, LOG2_ITEMS)
    # Token counts fit in int32 (the element offsets computed later are int64).
    rows = tl.load(table + PATCH_ROWS * stride + item).to(tl.int32)
    cols = tl.load(table + PATCH_COLS * stride + item).to(tl.int32)
    local = tokens - tl.load(table + START * stride + item).to(tl.int32)
    row_len = cols + NEXTLINE
    frame_len = rows * row_len
    frame = local // (frame_len + NEXTFRAME)
    in_frame = local - frame * (frame_len + NEXTFRAME)
    row = in_frame // row_len
    col = in_frame - row * row_len
    is_patch = (in_frame < frame_len) & (col < cols)
    is_frame_slot = in_frame == frame_len
    return item, local, frame, row, col, cols, rows, is_patch, is_frame_slot


@triton.jit
def _token_block(total_tokens, BLOCK_T: tl.constexpr):
    """This program's BLOCK_T tokens and their in-range mask; out-of-range tokens are clamped to the last token
    so that the item-table lookups stay in bounds (their loads and stores are masked off)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tokens < total_tokens
    return tl.where(in_range, tokens, total_tokens - 1), in_range


@triton.jit
def _latent_tile(
    table, stride, item, frame, row, col, live, ch, ph, pw, channels, elem, P: tl.constexpr, UNIT_W: tl.constexpr
):
    """Pointers and mask of the (BLOCK_C, P_BLOCK, BLOCK_T, P_BLOCK) latent tile in (c, ph, token, pw) order that
    holds the patches of tokens with ``live`` set (each token's item gives its latent's address and strides)."""
    base = tl.load(table + ADDR * stride + item).to(tl.pointer_type(elem))
    s_c = tl.load(table + STRIDE_C * stride + item)
    s_f = tl.load(table + STRIDE_F * stride + item)
    s_h = tl.load(table + STRIDE_H * stride + item)
    token_off = frame.to(tl.int64) * s_f + (row * P).to(tl.int64) * s_h  # (BLOCK_T,)
    if UNIT_W:
        w_off = (col * P)[None, None, :, None] + pw[None, None, None, :]
    else:
        s_w = tl.load(table + STRIDE_W * stride + item)
        w_off = ((col * P)[None, None, :, None] + pw[None, None, None, :]).to(tl.int64) * s_w[None, None, :, None]
    ptrs = (
        base[None, None, :, None]
        + ch[:, None, None, None].to(tl.int64) * s_c[None, None, :, None]
        + ph[None, :, None, None].to(tl.int64) * s_h[None, None, :, None]
        + token_off[None, None, :, None]
        + w_off
    )
    mask = (
        live[None, None, :, None]
        & (ch < channels)[:, None, None, None]
        & (ph < P)[None, :, None, None]
        & (pw < P)[None, None, None, :]
    )
    return ptrs, mask


@triton.jit
def _vector_tile(rows_ok, ch, ph, pw, channels, P: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Element offsets within a token row, as a (1, ., ., .) tile in the row's vector order ((ph, pw, c) when
    CHANNELS_LAST, else (c, ph, pw)), and the (BLOCK_T, ., ., .) mask of those elements in rows ``rows_ok``."""
    if CHANNELS_LAST:
        vec = ph[None, :, None, None] * (P * channels) + pw[None, None, :, None] * channels + ch[None, None, None, :]
        mask = (
            rows_ok[:, None, None, None]
            & (ph < P)[None, :, None, None]
            & (pw < P)[None, None, :, None]
            & (ch < channels)[None, None, None, :]
        )
    else:
        vec = ch[None, :, None, None] * (P * P) + ph[None, None, :, None] * P + pw[None, None, None, :]
        mask = (
            rows_ok[:, None, None, None]
            & (ch < channels)[None, :, None, None]
            & (ph < P)[None, None, :, None]
            & (pw < P)[None, None, None, :]
        )
    return vec, mask


@triton.jit
def pack_kernel(
    table,  # int64 (ITEM_FIELDS, n_items + 1), see module docstring
    out,  # (total_tokens, C * P * P) token rows
    positions,  # int32 (total_tokens, 3), written when WRITE_LAYOUT
    kind,  # int8 (total_tokens,), written when WRITE_LAYOUT
    patch_rows,  # int64 (patch tokens,), written when WRITE_LAYOUT
    cu_seqlens,  # int32 (n_items + 1,), written when WRITE_LAYOUT
    n_items,
    total_tokens,
    channels,
    out_row_stride,
    P: tl.constexpr,
    P_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_ITEMS: tl.constexpr,
    NEXTLINE: tl.constexpr,
    NEXTFRAME: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    UNIT_W: tl.constexpr,
    FLAT_ROWS: tl.constexpr,
    WRITE_LAYOUT: tl.constexpr,
):
    pid_c = tl.program_id(1)
    tokens, in_range = _token_block(total_tokens, BLOCK_T)
    item, local, frame, row, col, cols, rows, is_patch, is_frame_slot = _token_places(
        table, n_items, tokens, LOG2_ITEMS, NEXTLINE, NEXTFRAME
    )
    stride = n_items + 1

    # Latent side: a (BLOCK_C, P_BLOCK, BLOCK_T, P_BLOCK) tile in (c, ph, token, pw) order.
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ph = tl.arange(0, P_BLOCK)
    pw = tl.arange(0, P_BLOCK)
    src, load_mask = _latent_tile(
        table, stride, item, frame, row, col, is_patch & in_range, ch, ph, pw, channels, out.dtype.element_ty, P, UNIT_W
    )
    # Placeholder rows read nothing and are written as zeros.
    vals = tl.load(src, mask=load_mask, other=0.0)

    # Token side: rows of (C, ph, pw) or (ph, pw, C) ordered vectors.
    row_base = tokens.to(tl.int64) * out_row_stride
    if FLAT_ROWS:
        # This block's part of every token row is one contiguous run of BLOCK_C * P * P elements: store it as
        # 2-D (token, run) so that the compiler sees the contiguity (4-D offsets hide it) and vectorizes.
        if CHANNELS_LAST:
            vals = tl.permute(vals, (2, 1, 3, 0))  # (token, ph, pw, c); here BLOCK_C == channels
        else:
            vals = tl.permute(vals, (2, 0, 1, 3))  # (token, c, ph, pw)
        vals = tl.reshape(vals, (BLOCK_T, BLOCK_C * P * P))
        run = tl.arange(0, BLOCK_C * P * P)
        dst = row_base[:, None] + pid_c * (BLOCK_C * P * P) + run[None, :]
        store_mask = in_range[:, None] & (run < (channels - pid_c * BLOCK_C) * (P * P))[None, :]
    else:
        if CHANNELS_LAST:
            vals = tl.permute(vals, (2, 1, 3, 0))  # (token, ph, pw, c)
        else:
            vals = tl.permute(vals, (2, 0, 1, 3))  # (token, c, ph, pw)
        vec, store_mask = _vector_tile(in_range, ch, ph, pw, channels, P, CHANNELS_LAST)
        dst = row_base[:, None, None, None] + vec
    tl.store(out + dst, vals, mask=store_mask)

    if WRITE_LAYOUT:  # noqa: SIM102 (a constexpr gate: the stores below are compiled only when asked for)
        if pid_c == 0:
            # kind: 0 patch, 1 nextline, 2 nextframe; a placeholder's position is (frame, row, col) as located.
            k = tl.where(is_patch, 0, tl.where(is_frame_slot, 2, 1)).to(tl.int8)
            tl.store(kind + tokens, k, mask=in_range)
            pos = positions + tokens.to(tl.int64) * 3
            tl.store(pos, frame.to(tl.int32), mask=in_range)
            tl.store(pos + 1, row.to(tl.int32), mask=in_range)
            tl.store(pos + 2, col.to(tl.int32), mask=in_range)
            patch_index = tl.load(table + PATCH_START * stride + item) + (frame * rows + row) * cols + col
            tl.store(patch_rows + patch_index, tokens.to(tl.int64), mask=in_range & is_patch)
            # cu_seqlens: the first token of every item writes its start; the last token writes the total.
            tl.store(cu_seqlens + item, tokens, mask=in_range & (local == 0))
            tl.store(cu_seqlens + n_items + 0 * tokens, tokens + 1, mask=in_range & (tokens == total_tokens - 1))


@triton.jit
def unpack_kernel(
    table,  # int64 (ITEM_FIELDS, n_items + 1), addresses and strides of the output latents
    tokens_ptr,  # (total_tokens, C * P * P) token rows, any strides
    n_items,
    total_tokens,
    channels,
    row_stride,
    col_stride,
    P: tl.constexpr,
    P_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    LOG2_ITEMS: tl.constexpr,
    NEXTLINE: tl.constexpr,
    NEXTFRAME: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    UNIT_W: tl.constexpr,
    FLAT_ROWS: tl.constexpr,
):
    pid_c = tl.program_id(1)
    tokens, in_range = _token_block(total_tokens, BLOCK_T)
    item, _, frame, row, col, _, _, is_patch, _ = _token_places(table, n_items, tokens, LOG2_ITEMS, NEXTLINE, NEXTFRAME)
    stride = n_items + 1
    live = in_range & is_patch  # placeholder rows are dropped: neither read nor written
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ph = tl.arange(0, P_BLOCK)
    pw = tl.arange(0, P_BLOCK)
    row_base = tokens.to(tl.int64) * row_stride

    # Token side: read rows in their vector order, then permute to the latent tile order (c, ph, token, pw).
    if FLAT_ROWS:
        # One contiguous run per token row for this block (see pack_kernel): a 2-D load the compiler vectorizes.
        run = tl.arange(0, BLOCK_C * P * P)
        mask = live[:, None] & (run < (channels - pid_c * BLOCK_C) * (P * P))[None, :]
        cols = (pid_c * (BLOCK_C * P * P) + run).to(tl.int64) * col_stride
        vals = tl.load(tokens_ptr + row_base[:, None] + cols[None, :], mask=mask)
        if CHANNELS_LAST:
            vals = tl.permute(tl.reshape(vals, (BLOCK_T, P, P, BLOCK_C)), (3, 1, 0, 2))
        else:
            vals = tl.permute(tl.reshape(vals, (BLOCK_T, BLOCK_C, P, P)), (1, 2, 0, 3))
    else:
        vec, mask = _vector_tile(live, ch, ph, pw, channels, P, CHANNELS_LAST)
        vals = tl.load(tokens_ptr + row_base[:, None, None, None] + vec.to(tl.int64) * col_stride, mask=mask)
        if CHANNELS_LAST:
            vals = tl.permute(vals, (3, 1, 0, 2))
        else:
            vals = tl.permute(vals, (1, 2, 0, 3))

    dst, store_mask = _latent_tile(
        table, stride, item, frame, row, col, live, ch, ph, pw, channels, tokens_ptr.dtype.element_ty, P, UNIT_W
    )
    tl.store(dst, vals, mask=store_mask)


# ----------------------------------------------------------------------------------------------- host launchers


def _cfhw_strides(t) -> tuple[int, int, int, int]:
    """Element strides of a latent as (C, F, H, W); a (C, H, W) latent gets frame stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (t.stride(0), 0, t.stride(1), t.stride(2))


def item_table(latents, fhw, patch_size: int, nextline: bool, nextframe: bool, device):
    """The int64 item table for tensors ``latents`` (their addresses and strides) of frame/height/width ``fhw``.

    Returns ``(table, total_tokens, total_patches, unit_w)``; ``unit_w`` says every latent has W stride 1.
    Built from shapes alone on the host (no device sync) and sent to the device in one small copy.
    """
    n = len(fhw)
    cols = [[0] * (n + 1) for _ in range(ITEM_FIELDS)]
    starts, addrs, s_c, s_f, s_h, s_w, rows, pcols, pstarts = cols
    start = patches = 0
    for i, (t, (f, h, w)) in enumerate(zip(latents, fhw)):
        starts[i], pstarts[i], addrs[i] = start, patches, t.data_ptr()
        s_c[i], s_f[i], s_h[i], s_w[i] = _cfhw_strides(t)
        rows[i], pcols[i] = h // patch_size, w // patch_size
        start += f * rows[i] * (pcols[i] + int(nextline)) + (f - 1 if nextframe else 0)
        patches += f * rows[i] * pcols[i]
    starts[n] = start
    unit_w = all(v == 1 for v in s_w[:n])
    # array -> frombuffer is several times cheaper than torch.tensor(list) on this launch-bound path. The copy
    # goes through pinned memory so that it is asynchronous for certain (a pageable source may make the
    # driver wait for the stream); PyTorch's pinned allocator keeps the block until the copy has run.
    host = torch.frombuffer(array.array("q", [v for col in cols for v in col]), dtype=torch.int64)
    if torch.device(device).type == "cpu":
        return host.clone(), start, patches, unit_w
    table = host.pin_memory().to(device, non_blocking=True)
    return table, start, patches, unit_w


def _blocks(channels: int, patch_size: int) -> tuple[int, int, int]:
    """(P_BLOCK, BLOCK_C, BLOCK_T): tiles of 4096 elements (8 KiB bf16: registers plus one shared-memory
    transpose), each token contributing at most 256 (channel, ph, pw) elements (more channels: more programs
    along the grid's channel axis), up to 256 tokens. Patch sizes above 64 make the tile larger than that."""
    p_block = triton.next_power_of_2(patch_size)
    block_c = min(triton.next_power_of_2(channels), max(1, 256 // (p_block * p_block)))
    block_t = max(1, min(256, 4096 // (block_c * p_block * p_block)))
    return p_block, block_c, block_t


def _flat_rows(channels: int, patch_size: int, p_block: int, block_c: int, channels_last: bool) -> bool:
    """Whether a block's part of a token row is one contiguous run (no padding inside the tile's vector)."""
    return p_block == patch_size and (not channels_last or block_c == channels)


def _log2_items(n: int) -> int:
    return max(0, (n - 1).bit_length())


def pack(latents, fhw, patch_size, nextline, nextframe, channels_last, with_layout):
    """Launches :func:`pack_kernel` once for the batch. Returns ``patches`` or, with ``with_layout``,
    ``(patches, positions, kind, patch_rows, cu_seqlens)``."""
    x0 = latents[0]
    channels = x0.shape[0]
    table, total, n_patches, unit_w = item_table(latents, fhw, patch_size, nextline, nextframe, x0.device)
    out = torch.empty(total, channels * patch_size * patch_size, device=x0.device, dtype=x0.dtype)
    if with_layout:
        positions = torch.empty(total, 3, device=x0.device, dtype=torch.int32)
        kind = torch.empty(total, device=x0.device, dtype=torch.int8)
        patch_rows = torch.empty(n_patches, device=x0.device, dtype=torch.int64)
        cu = torch.empty(len(fhw) + 1, device=x0.device, dtype=torch.int32)
    else:
        positions = kind = patch_rows = cu = out  # unused: WRITE_LAYOUT=False compiles those stores away
    p_block, block_c, block_t = _blocks(channels, patch_size)
    grid = (triton.cdiv(total, block_t), triton.cdiv(channels, block_c))
    pack_kernel[grid](
        table,
        out,
        positions,
        kind,
        patch_rows,
        cu,
        len(fhw),
        total,
        channels,
        out.stride(0),
        P=patch_size,
        P_BLOCK=p_block,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        LOG2_ITEMS=_log2_items(len(fhw)),
        NEXTLINE=int(nextline),
        NEXTFRAME=int(nextframe),
        CHANNELS_LAST=channels_last,
        UNIT_W=unit_w,
        FLAT_ROWS=_flat_rows(channels, patch_size, p_block, block_c, channels_last),
        WRITE_LAYOUT=with_layout,
    )
    return (out, positions, kind, patch_rows, cu) if with_layout else out


def unpack(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last):
    """Launches :func:`unpack_kernel` once for the batch; ``item_shapes`` holds (ndim, F, H, W) per item.
    Returns new contiguous latents, one per item."""
    dims = [tuple(item_shapes[i : i + 4]) for i in range(0, len(item_shapes), 4)]
    outs = [
        torch.empty((channels, f, h, w) if nd == 4 else (channels, h, w), device=tokens.device, dtype=tokens.dtype)
        for nd, f, h, w in dims
    ]
    fhw = [(f, h, w) for _, f, h, w in dims]
    table, total, _, _ = item_table(outs, fhw, patch_size, nextline, nextframe, tokens.device)
    if total != tokens.shape[0]:
        raise ValueError(f"tokens has {tokens.shape[0]} rows but the item shapes give {total} tokens")
    p_block, block_c, block_t = _blocks(channels, patch_size)
    grid = (triton.cdiv(total, block_t), triton.cdiv(channels, block_c))
    unpack_kernel[grid](
        table,
        tokens,
        len(fhw),
        total,
        channels,
        tokens.stride(0),
        tokens.stride(1),
        P=patch_size,
        P_BLOCK=p_block,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        LOG2_ITEMS=_log2_items(len(fhw)),
        NEXTLINE=int(nextline),
        NEXTFRAME=int(nextframe),
        CHANNELS_LAST=channels_last,
        UNIT_W=True,
        # A strided column view keeps the 4-D path: the 2-D one would gain nothing there and recomputes
        # per-token table reads in its layout.
        FLAT_ROWS=_flat_rows(channels, patch_size, p_block, block_c, channels_last) and tokens.stride(1) == 1,
    )
    return outs
