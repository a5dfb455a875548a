"""Tile-sparse iteration of the varlen attention kernels: which rows a program owns and which key (or query)
runs it visits, over a tile-major pack (``fk.pack(..., tile=...)``, DESIGN.md: Tile-sparse attention).

A 3-D tile is a contiguous run of tokens, so a tile-sparse pattern is, per (head, tile), a list of whole runs.
:func:`lists` packs everything the kernels read into one int32 tensor, built on the device with no host sync:

    [ranges (n_tiles, 2) | tile sample (n_tiles) | patch_end (B) | placeholder offsets (B + 1)
     | run counts (heads, n_tiles) | runs (heads, n_tiles, width, 2) | counts (heads, n_tiles)
     | lists (heads, n_tiles, width)]

:func:`table_sections` is the one place the code says where each section starts: the kernels' helpers read the
table through it (jitted: :data:`sections`), the host through its plain Python body (:func:`transposed_lists`).

``lists[h % heads, t, :counts]`` are the tiles program tile t visits for head h: the key tiles of query tile t
(forward, dq) or, transposed (:func:`transposed`), the query tiles that list key tile t (dk / dv). ``heads`` is
1 (a window: the same for every head) or the query heads (top_k). The pointer loops read ``runs``: the lists'
stretches of consecutive tiles as (first, last) tile (:func:`runs`), each one contiguous run of tokens; the
descriptor loops (sm_90) read the tile lists themselves (:func:`listed`, :func:`flat_block`), which also stay
for the backward's transpose.

Programs (:func:`program`): first one per BLOCK rows of each sample's placeholder run (the grid of ``tile_of``
over the placeholder offsets), then ``chunks = cdiv(tile volume, BLOCK)`` per tile (BLOCK rows each, the tile's
last chunk masked by its range). Runs (:func:`run`): a tile program visits its listed tiles, then (:func:`rest`)
the sample's placeholder run (placeholders are attended by every token of their sample); a placeholder program
visits its whole sample (placeholders attend densely). Every run holds at least one row, except a sample's empty
placeholder run (then its loop does not run); every tile lists itself (a window) or k >= 1 tiles (top_k), so no
row is left without keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .tiles import segment, tile_of

# fmt: off


def lists(tiles, cu_seqlens: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(table, sizes): the kernels' table (module docstring) of a TileLayout and per-(head, tile) lists
    (``keys`` int32 ``(heads, n_tiles, width)`` ascending, -1 after ``counts`` ``(heads, n_tiles)``), built on
    their device with no host sync, and its host sizes [n_tiles, heads, width, tile volume, placeholder tokens,
    most tiles of a sample]."""
    cu = cu_seqlens.to(torch.int32)
    slots = cu[1:] - tiles.patch_end
    slot_cu = torch.cat([cu.new_zeros(1), slots.cumsum(0, dtype=torch.int32)])
    run_counts, run_pairs = runs(keys)
    parts = (tiles.ranges, tiles.sample, tiles.patch_end, slot_cu, run_counts, run_pairs, counts, keys)  # in order
    table = torch.cat([p.reshape(-1).to(torch.int32) for p in parts])
    heads, n_tiles, width = keys.shape
    return table, [n_tiles, heads, width, math.prod(tiles.tile), tiles.placeholders, tiles.max_tiles]


def runs(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (heads, n_tiles), pairs (heads, n_tiles, K, 2)): each list's maximal stretches of consecutive
    tiles as (first, last) tile, -1 padded. Consecutive tiles of a sample are adjacent token runs (tile-major
    order), so one stretch is one contiguous key run: a window's row of tiles is one loop, not one per tile."""
    valid = keys >= 0
    edge = keys.new_full((*keys.shape[:-1], 1), -2)
    starts = valid & (keys != torch.cat([edge, keys[..., :-1]], dim=-1) + 1)
    ends = valid & (torch.cat([keys[..., 1:], edge], dim=-1) != keys + 1)
    width = keys.shape[-1]
    pairs = []
    for marks in (starts, ends):  # the k-th start (end) goes to slot k; the rest to a dropped slot
        slot = torch.where(marks, marks.long().cumsum(-1) - 1, width)
        out = keys.new_full((*keys.shape[:-1], width + 1), -1)
        pairs.append(out.scatter_(-1, slot, keys)[..., :width])
    return starts.sum(-1, dtype=torch.int32), torch.stack(pairs, dim=-1)


def transposed_lists(table: torch.Tensor, sizes: list) -> tuple[torch.Tensor, list]:
    """The table of :func:`lists` with every tile's list replaced by the tiles that list it (dk / dv)."""
    n_tiles, heads, width, volume, placeholders, most = sizes
    # The per-head sections come last and their sizes do not depend on B: offsets of a table with no samples
    *_, run_counts_at, _, _, lists_at, end = table_sections((0, n_tiles, heads, width, volume), 0)
    shared = table.numel() - (end - run_counts_at)  # the tile and sample sections, which the transpose keeps
    keys = table[table.numel() - (end - lists_at) :].view(heads, n_tiles, width)
    t_keys, t_counts = transposed(keys, most)
    run_counts, run_pairs = runs(t_keys)
    parts = (table[:shared], run_counts, run_pairs, t_counts, t_keys)
    return torch.cat([p.reshape(-1) for p in parts]), [n_tiles, heads, most, volume, placeholders, most]


def transposed(keys: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lists, counts) of the query tiles that list each key tile, per head (ascending, -1 after ``counts``):
    ``keys`` int32 ``(heads, n_tiles, K)`` padded with -1; ``width`` a host bound on any tile's count (the most
    tiles of a sample). One sort and scatters on the device, no host sync."""
    heads, n, _ = keys.shape
    device = keys.device
    valid = keys >= 0
    head = torch.arange(heads, device=device).view(-1, 1, 1)
    query = torch.arange(n, device=device).view(1, -1, 1)
    group = head * n + keys.long()  # (head, key tile) of every entry
    big = heads * n * n
    order = torch.where(valid, group * n + query, big).flatten().sort().values  # valid first, by group then query
    t_counts = torch.zeros(heads * n, dtype=torch.int64, device=device)
    t_counts.scatter_add_(0, torch.where(valid, group, 0).flatten(), valid.flatten().long())
    first = t_counts.cumsum(0) - t_counts
    ok = order < big
    group_of = torch.where(ok, order // n, heads * n)  # invalid entries go to a dummy row
    rank = torch.arange(order.numel(), device=device) - torch.cat([first, first.new_zeros(1)])[group_of]
    table = torch.full((heads * n + 1, width), -1, dtype=torch.int32, device=device)
    table[group_of, torch.where(ok, rank, 0)] = torch.where(ok, order % n, -1).to(torch.int32)
    return table[:-1].view(heads, n, width), t_counts.view(heads, n).to(torch.int32)


def table_sections(table, n_seqs):
    """Where each section of the kernels' table (module docstring) starts, in order, and where it ends: (ranges,
    tile sample, patch_end, placeholder offsets, run counts, runs, counts, lists, end). ``table``: the kernels'
    ``(LISTS, n_tiles, list heads, list width, tile volume)``, LISTS the table's pointer in a kernel (through
    :data:`sections`) or 0 on the host (offsets); ``n_seqs``: the table's B."""
    LISTS, n_tiles, heads, width, _ = table
    tile_sample = LISTS + 2 * n_tiles
    patch_end = tile_sample + n_tiles
    slot_cu = patch_end + n_seqs
    run_counts = slot_cu + n_seqs + 1
    run_pairs = run_counts + heads * n_tiles
    list_counts = run_pairs + heads * n_tiles * width * 2
    list_tiles = list_counts + heads * n_tiles
    end = list_tiles + heads * n_tiles * width
    return LISTS, tile_sample, patch_end, slot_cu, run_counts, run_pairs, list_counts, list_tiles, end


sections = triton.jit(table_sections)  # the same description, for the kernels


def grid_programs(n_tiles: int, volume: int, placeholders: int, samples: int, block: int) -> int:
    """Programs along the rows of a sparse launch: ``tile_of``'s cover of the placeholder runs (at most one idle
    program per sample), then ``cdiv(volume, block)`` per tile."""
    return n_tiles * triton.cdiv(volume, block) + placeholders // block + samples


@triton.jit
def program(pid, table, CU, n_seqs, chunks, BLOCK: tl.constexpr, steps=0, WS: tl.constexpr = False):
    """(sample b, tile (-1: a placeholder program), first row, rows) of program ``pid`` (module docstring) of a
    launch of BLOCK-row programs over ``table`` (the kernels' ``(LISTS, n_tiles, list heads, list width, tile
    volume)``; ``chunks`` = cdiv(tile volume, BLOCK)). Rows <= 0: an idle program (the caller returns). The
    placeholder programs come first: each visits its whole sample, the longest work of the launch, so it starts
    in the first wave rather than trailing the last.

    WS: the same, branch-free (both kinds computed, masked loads, selects) and with ``tile_of``'s counted
    bisection of ``steps`` halvings: Triton 3.6's warp-specialization pass fails on a while loop anywhere in the
    kernel and on values picked by an scf.if (fwd._attend)."""
    ranges, tile_sample, patch_end, slot_cu, _, _, _, _, _ = sections(table, n_seqs)
    slot_programs = tl.load(slot_cu + n_seqs) // BLOCK + n_seqs  # tile_of's cover of the placeholder runs
    if WS:
        is_slot = pid < slot_programs
        b_slot, m = tile_of(pid, slot_cu, n_seqs, BLOCK, steps, True)
        t = tl.where(is_slot, 0, pid - slot_programs)
        tile = t // chunks
        b = tl.where(is_slot, b_slot, tl.load(tile_sample + tile))
        start = tl.where(is_slot, tl.load(patch_end + b) + m * BLOCK,
                         tl.load(ranges + 2 * tile) + (t - tile * chunks) * BLOCK)
        end = tl.where(is_slot, tl.load(CU + b + 1), tl.load(ranges + 2 * tile + 1))
        tile = tl.where(is_slot, -1, tile)
    elif pid < slot_programs:
        b, m = tile_of(pid, slot_cu, n_seqs, BLOCK)
        tile = b * 0 - 1
        start = tl.load(patch_end + b) + m * BLOCK
        end = tl.load(CU + b + 1)
    else:
        pid -= slot_programs
        tile = pid // chunks
        b = tl.load(tile_sample + tile)
        start = tl.load(ranges + 2 * tile) + (pid - tile * chunks) * BLOCK
        end = tl.load(ranges + 2 * tile + 1)
    return b, tile, start, end - start


@triton.jit
def query_program(CU, n_seqs, GROUP, bisect_steps, table, SPARSE: tl.constexpr, WS: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """(sample b, query tile m, sparse tile, query head, kv head, first row, rows, live) of a program of the
    forward's grid (also dq's): the tile-sparse table's (:func:`program`; m = 0, its rows are the chunk), or one
    program per BLOCK_M rows of each sequence (``tile_of``: T // BLOCK_M + n_seqs programs, at most one idle per
    sequence). ``live`` is False for an idle program; the caller returns then, except WS: Triton's
    warp-specialization pass (3.6) fails on an early return and on a while loop anywhere in the kernel, so a WS
    program bisects in fixed steps and an idle one runs with its rows masked (no keys, nothing stored)."""
    h = tl.program_id(1)
    if SPARSE:
        b, tile, start, seq_len = program(tl.program_id(0), table, CU, n_seqs, tl.cdiv(table[4], BLOCK_M), BLOCK_M,
                                          bisect_steps, WS)
        pid_m = 0
        live = seq_len > 0
    else:
        b, pid_m = tile_of(tl.program_id(0), CU, n_seqs, BLOCK_M, bisect_steps, WS)
        tile = -1
        start, seq_len = segment(CU, b)
        live = pid_m * BLOCK_M < seq_len
    return b, pid_m, tile, h, h // GROUP, start, seq_len, live


@triton.jit
def run_count(table, n_seqs, h, tile):
    """How many runs a program of ``tile`` visits for head h: its listed stretches of tiles plus the placeholder
    run, or 1 (its whole sample) for a placeholder program."""
    _, n_tiles, heads, _, _ = table
    _, _, _, _, run_counts, _, _, _, _ = sections(table, n_seqs)
    is_tile = tile >= 0
    stretches = tl.load(run_counts + (h % heads) * n_tiles + tile, mask=is_tile, other=0)
    return tl.where(is_tile, stretches + 1, 1)


@triton.jit
def run(table, CU, n_seqs, h, b, tile, j):
    """(first row, rows) of run j of a program of ``tile`` in sample b for head h (see run_count)."""
    _, n_tiles, heads, width, _ = table
    ranges, _, _, _, run_counts, run_pairs, _, _, _ = sections(table, n_seqs)
    row = (h % heads) * n_tiles + tile
    is_tile = tile >= 0
    stretch = is_tile & (j < tl.load(run_counts + row, mask=is_tile, other=0))  # else the last run: rest
    pair = run_pairs + (row * width + j) * 2
    first_tile = tl.load(pair, mask=stretch, other=0)
    last_tile = tl.load(pair + 1, mask=stretch, other=0)
    rest_first, rest_len = rest(table, CU, n_seqs, b, tile)
    first = tl.where(stretch, tl.load(ranges + 2 * first_tile), rest_first)
    end = tl.where(stretch, tl.load(ranges + 2 * last_tile + 1), rest_first + rest_len)
    return first, end - first


@triton.jit
def listed(table, n_seqs, h, tile):
    """(count, first entry) of the tiles a program of ``tile`` lists for head h (the table's ``lists``, not its
    runs): the flat loops of the descriptor kernels walk them tile by tile. Count 0 for a placeholder program."""
    _, n_tiles, heads, width, _ = table
    _, _, _, _, _, _, list_counts, list_tiles, _ = sections(table, n_seqs)
    is_tile = tile >= 0
    row = (h % heads) * n_tiles + tl.maximum(tile, 0)
    return tl.load(list_counts + row, mask=is_tile, other=0), list_tiles + row * width


@triton.jit
def flat_loop(table, CU, n_seqs, b, tile, count, length, BLOCK: tl.constexpr):
    """The bounds of a descriptor kernel's ONE loop (see flat_block) for a program of ``tile`` in sample b that
    walks ``count`` listed tiles: (chunks per tile, n_listed = count * chunks, the rest run's first row and rows,
    the loop's block count). ``length``: the rows the program's descriptors cover; 0 (an idle program) visits no
    block."""
    chunks = tl.cdiv(table[4], BLOCK)
    rest_first, rest_len = rest(table, CU, n_seqs, b, tile)
    n_listed = count * chunks
    return chunks, n_listed, rest_first, rest_len, tl.where(length > 0, n_listed + tl.cdiv(rest_len, BLOCK), 0)


@triton.jit
def flat_block(table, entries, count, chunks, n_listed, rest_first, rest_len, i, BLOCK: tl.constexpr):
    """(first row, rows) of block i of a descriptor kernel's ONE loop over a program's blocks: first its listed
    tiles (see listed) in ``chunks`` = cdiv(tile volume, BLOCK) chunks of BLOCK rows each, i < count * chunks;
    then padding up to ``n_listed`` (rows 0; dk / dv's heads walk the longest list of the GQA group); then the rest
    run (see rest) in blocks of BLOCK rows. Rows may exceed BLOCK (the caller masks to BLOCK) and are <= 0 for
    padding and for a chunk past a partial tile's end: a fully masked block, which follows the tile's first chunk
    (it holds a row). One loop, not one per kind: Triton 3.6's warp-specialization pass fails (an MLIR dominance
    assertion) on two such loops in a row whose second carries the first's state."""
    ranges = table[0]  # the table's first section (table_sections)
    in_list = i < count * chunks
    slot = tl.where(in_list, i, 0) // chunks
    t = tl.load(entries + slot, mask=in_list, other=0)
    first = tl.where(in_list, tl.load(ranges + 2 * t) + (i - slot * chunks) * BLOCK,
                     rest_first + (i - n_listed) * BLOCK)
    end = tl.where(in_list, tl.load(ranges + 2 * t + 1), tl.where(i < n_listed, first, rest_first + rest_len))
    return first, end - first


@triton.jit
def rest(table, CU, n_seqs, b, tile):
    """(first row, rows) of what a program visits besides its listed tiles (see run): the sample's placeholder
    run for a tile program, the whole sample for a placeholder program."""
    _, _, patch_end, _, _, _, _, _, _ = sections(table, n_seqs)
    first = tl.where(tile >= 0, tl.load(patch_end + b), tl.load(CU + b))
    return first, tl.load(CU + b + 1) - first
