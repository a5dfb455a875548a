"""Tile helpers shared by the varlen attention kernels (fwd.py, bwd.py).

Head dim in two column chunks: D0 = the largest power of two <= Dh, D1 = the power of two covering the rest
(0 when Dh is a power of two), so Dh 72 runs as 64 + 16 (80 columns, not 128), 96 as 64 + 32 and 48 as 32 + 16.
Every tile is a pair (x0, x1); every matmul over the head dim is two dots into one accumulator, every matmul
producing head-dim columns writes two accumulators. With D1 == 0 the second chunk is a dead dummy.

Loops over keys (or queries) run the full tiles without row masks and then at most one masked tail tile
(MASK_* constexpr), so the common path carries no per-element masking. Argument lists stay compact (fmt: off).
"""

import triton
import triton.language as tl

# LSEs are stored in natural log (the public unit); scores run in log2 units inside the loops.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# fmt: off


@triton.jit
def aligned(stride, VEC: tl.constexpr):
    """``stride``, a multiple of VEC elements (VEC = 16 bytes when the launcher found every tensor 16-byte aligned,
    else 1), written so that Triton's alignment analysis knows it: an integer argument is only known divisible
    when it is divisible by 16, so a head stride of 72 would turn every load of a Dh-72 tile into 2-byte accesses
    (no cp.async, no pipelining). tl.multiple_of does not attach to a scalar argument; this shift pair does."""
    if VEC > 1:
        stride = stride // VEC * VEC
    return stride


@triton.jit
def aligned_view(view, VEC: tl.constexpr):
    """A ``(pointer, token stride, head stride)`` view of a (T, H, Dh) tensor with both strides through
    ``aligned``: how every kernel takes its (T, H, Dh) tensors."""
    ptr, stride_t, stride_h = view
    return ptr, aligned(stride_t, VEC), aligned(stride_h, VEC)


@triton.jit
def head_rows(view, start, head):
    """The pointer to row ``start`` (int64) of head ``head`` of a view."""
    ptr, stride_t, stride_h = view
    return ptr + start * stride_t + head * stride_h


@triton.jit
def shifted(view, start, head):
    """The view moved to row ``start`` of head ``head`` (its rows and heads counted from there)."""
    _, stride_t, stride_h = view
    return head_rows(view, start, head), stride_t, stride_h


@triton.jit
def segment(cu, b):
    """(start, length) of sequence b of a cu_seqlens array, both int32. Callers widen start to int64 only where
    they build offsets, after any early exit (widening first cost a register and a few spilled bytes)."""
    start = tl.load(cu + b)
    return start, tl.load(cu + b + 1) - start


@triton.jit
def tile_of(pid, cu, n_seqs, BLOCK: tl.constexpr, steps=0, FIXED_STEPS: tl.constexpr = False):
    """(sequence b, tile m) of program ``pid`` of a grid of total // BLOCK + n_seqs programs over the sequences of
    cu_seqlens ``cu`` (non-decreasing, 0 to total), each tile BLOCK rows of one sequence, no host sync needed.

    Sequence b owns the programs from first(b) = cu[b] // BLOCK + b up to first(b + 1); that is
    floor(cu[b+1] / BLOCK) - floor(cu[b] / BLOCK) + 1 >= cdiv(len_b, BLOCK) programs, so every tile has one, and
    at most one program per sequence is left over (it finds m * BLOCK >= len_b and returns): on a packed batch
    at most n_seqs programs idle, instead of every block past each sequence's end of a cdiv(max_seqlen, BLOCK)
    x n_seqs grid (59% of the benchmark batch's). b is the last sequence with first(b) <= pid, by bisection
    over cu (first is non-decreasing): log2(n_seqs) dependent scalar loads at the start of a program.

    FIXED_STEPS: the same bisection as a counted loop of ``steps`` = ceil(log2(n_seqs)) branch-free halvings
    (from the host: a shape), for kernels Triton warp-specializes: its pass (3.6) fails on any scf.while."""
    lo = 0
    hi = n_seqs
    if FIXED_STEPS:
        for _ in range(steps):
            mid = (lo + hi) // 2
            right = tl.load(cu + mid) // BLOCK + mid <= pid
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if tl.load(cu + mid) // BLOCK + mid <= pid:
                lo = mid
            else:
                hi = mid
    return lo, pid - (tl.load(cu + lo) // BLOCK + lo)


@triton.jit
def tile_rows(start, n, MASKED: tl.constexpr, R: tl.constexpr):
    """(rows as int64, mask) of the R rows from ``start``: rows < n for a tail tile, a constant all-true mask
    (folded away by the compiler) for a full tile."""
    offs = start + tl.arange(0, R)
    if MASKED:
        mask = offs < n
    else:
        mask = tl.full([R], 1, tl.int1)
    return offs.to(tl.int64), mask


@triton.jit
def loop_tile(start, n, MASKED: tl.constexpr, R: tl.constexpr):
    """(rows 0..R-1 as int32, mask) of the tile ``start``..``start + R`` of a loop over ``n`` rows, rows counted
    from ``start``: callers shift their base pointers by ``start`` rows (one 64-bit scalar product per tile), so
    the per-element offsets ``rows * stride`` are loop-invariant and computed once instead of once per tile."""
    offs = tl.arange(0, R)
    if MASKED:
        mask = offs < n - start
    else:
        mask = tl.full([R], 1, tl.int1)
    return offs, mask


@triton.jit
def _load_chunk(base, rows, row_mask, stride_t, R: tl.constexpr, COL0: tl.constexpr, W: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, W)
    mask = row_mask[:, None]
    if COL0 + W > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_tile(base, rows, row_mask, stride_t, R: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
              D1: tl.constexpr):
    """(R, D0) and (R, D1) chunks of rows ``rows`` (row indices relative to ``base``), zero outside the masks."""
    x0 = _load_chunk(base, rows, row_mask, stride_t, R, 0, D0, HEAD_DIM)
    if D1 > 0:
        x1 = _load_chunk(base, rows, row_mask, stride_t, R, D0, D1, HEAD_DIM)
    else:
        x1 = zeros_chunk(R, 0).to(x0.dtype)  # dummy, never used
    return x0, x1


@triton.jit
def zeros_chunk(R: tl.constexpr, W: tl.constexpr):
    """fp32 zeros for a second-chunk accumulator; a (R, 16) dummy when there is no second chunk."""
    if W > 0:
        z = tl.zeros([R, W], dtype=tl.float32)
    else:
        z = tl.zeros([R, 16], dtype=tl.float32)
    return z


@triton.jit
def zeros_tile(R: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """An fp32 (R, head dim) accumulator pair of zeros."""
    return tl.zeros([R, D0], dtype=tl.float32), zeros_chunk(R, D1)


@triton.jit
def store_tile(base, rows, row_mask, stride_t, x0, x1, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """Stores both chunks (unit head-dim stride: only our own outputs are written)."""
    cols = tl.arange(0, D0)
    tl.store(base + rows[:, None] * stride_t + cols[None, :], x0.to(base.dtype.element_ty), mask=row_mask[:, None])
    if D1 > 0:
        cols = D0 + tl.arange(0, D1)
        tl.store(base + rows[:, None] * stride_t + cols[None, :], x1.to(base.dtype.element_ty),
                 mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def scores(a0, a1, b0, b1, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """a @ b^T over the head dim, chunk by chunk into one fp32 accumulator."""
    s = tl.dot(a0, tl.trans(b0), input_precision=DOT_PREC)
    if D1 > 0:
        s = tl.dot(a1, tl.trans(b1), s, input_precision=DOT_PREC)
    return s


@triton.jit
def row_source(base, length, stride_t, TMA: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr,
               D0: tl.constexpr, D1: tl.constexpr):
    """What load_rows reads a sequence's rows (keys, values, queries, ...) from, or the dq buffer is added to:
    two tensor descriptors (one per column chunk, shaped to the sequence, so the copy engine does the bounds) or
    the base pointer twice."""
    if TMA:
        src0 = tl.make_tensor_descriptor(base, shape=[length, HEAD_DIM], strides=[stride_t, 1], block_shape=[R, D0])
        if D1 > 0:
            src1 = tl.make_tensor_descriptor(base, shape=[length, HEAD_DIM], strides=[stride_t, 1],
                                             block_shape=[R, D1])
        else:
            src1 = src0
    else:
        src0 = base
        src1 = base
    return src0, src1


@triton.jit
def load_rows(src0, src1, start, rows, mask, stride_t, TMA: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr,
              D0: tl.constexpr, D1: tl.constexpr):
    """The R rows from ``start`` of a row_source (``rows``, ``mask``: 0..R-1 and which are inside the sequence).
    With TMA, ``src0`` / ``src1`` are tensor descriptors of the two column chunks (the copy engine zero-fills rows
    past the sequence and columns past the head dim, and no thread computes addresses); else ``src0`` is the
    sequence's base pointer."""
    if TMA:
        x0 = src0.load([start, 0])
        if D1 > 0:
            x1 = src1.load([start, D0])
        else:
            x1 = zeros_chunk(R, 0).to(x0.dtype)  # dummy, never used
    else:
        x0, x1 = load_tile(src0 + tl.cast(start, tl.int64) * stride_t, rows, mask, stride_t, R, HEAD_DIM, D0, D1)
    return x0, x1


@triton.jit
def load_kv_pair(k_src0, k_src1, v_src0, v_src1, stride_kt, stride_vt, start_n, k_len, MASK_N: tl.constexpr,
                 TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                 D1: tl.constexpr):
    """The key and value tiles of the BLOCK_N keys from ``start_n``, and the key mask."""
    rows, n_mask = loop_tile(start_n, k_len, MASK_N, BLOCK_N)
    k0, k1 = load_rows(k_src0, k_src1, start_n, rows, n_mask, stride_kt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    v0, v1 = load_rows(v_src0, v_src1, start_n, rows, n_mask, stride_vt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    return k0, k1, v0, v1, n_mask


@triton.jit
def query_tile(q, start, seq_len, pid_m, h, T, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, DESC: tl.constexpr = False):
    """Block ``pid_m`` of the queries of head h in the sequence starting at token ``start`` (int64) of the view
    ``q``: (rows, mask, the q chunks, offsets into (H, T) LSE-shaped arrays). DESC: q through tensor descriptors
    (what Triton's warp specialization needs: with a pointer load of q its pass asserts in WSLowerToken, 3.6)."""
    _, stride_qt, _ = q
    rows, m_mask = tile_rows(pid_m * BLOCK_M, seq_len, True, BLOCK_M)
    base = head_rows(q, start, h)
    if DESC:
        src0, src1 = row_source(base, tl.maximum(seq_len, 1), stride_qt, True, BLOCK_M, HEAD_DIM, D0, D1)
        q0, q1 = load_rows(src0, src1, pid_m * BLOCK_M, rows, m_mask, stride_qt, True, BLOCK_M, HEAD_DIM, D0, D1)
    else:
        q0, q1 = load_tile(base, rows, m_mask, stride_qt, BLOCK_M, HEAD_DIM, D0, D1)
    return rows, m_mask, q0, q1, h.to(tl.int64) * T + start + rows
