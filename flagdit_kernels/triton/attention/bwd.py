"""Backward kernels of the varlen attention.

* ``_bwd_preprocess``: ``delta_self = rowsum(dO * o_self) - dlse`` with ``o_self = out - tg * o_text``,
  ``r = rowsum(dO * o_text)``, ``delta_text = tg * r``; the caller sums ``r`` per head for d tanh(gate). Rows
  of a sample without text (text LSE -inf) take tg = 0: the forward added nothing there, whatever the gate.
* ``_bwd_dkdv``: one program per (key block, sample, kv head) loops over the GQA group's query heads and the
  sample's query blocks; one launch covers the text key blocks (dO scaled by tg, first in the grid) and the
  self key blocks. Per (key block, query block) pair it runs the backward's five matmuls: S^T = K Q^T,
  dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and, with ATOMIC_DQ, dQ += dS K, added to an fp32 dq buffer with
  atomics (FlashAttention-2/3's scheme: the scores are computed once for dk, dv and dq).
* ``_bwd_dq`` (the deterministic path, ``deterministic=True``): one program per (query block, head) loops over
  self keys (pointer or descriptor loads, as for the forward), then text keys, recomputing P and dP (seven
  matmuls in all with the dk/dv kernel), and writes its dq block alone, so every sum runs in a fixed order.
* Warp-specialized (WS tiles; the sm_90 default, see launch.py): ``_dkdv_ws`` runs the dk/dv kernel's query
  loop as one ``tl.range(..., warp_specialize=True)`` over the GQA group's (head, query tile) pairs with q and dO
  through 3-D descriptors, text / self keys picked by selects, no dq; ``_bwd_dq`` then runs the forward's WS shape,
  the rows' LSE and delta entering as a product with a tile of tf32 terms written by the preprocess (STATS_*).
* ``_bwd_dq_postprocess``: the fp32 dq buffer times its unit, rotated back by RoPE when the call has it, rounded
  once to q's dtype.

The scale rides on dS instead of K: the Triton tutorial pre-scales K by softmax_scale * log2(e) so that the
scores come out in log2 units and dS K lands in dq ready-scaled. Here the dk/dv loop computes p with one FMA per
score (exp2(s * c - lse * log2(e)), c = softmax_scale * log2(e), the same issue slot as the tutorial's subtract)
and dS * c with one FMA per score too (p * (dP * c * tanh - delta * c), delta scaled once per row), so dQ += dS K
and dK += dS^T Q come out in units of log2(e) (times ln 2 once at the end) for self and text keys alike, and K
itself is never rewritten: multiplying the loaded key tile in registers turned it into a register operand of
both matmuls it feeds and spilled (compile report: 64x128 tile at D128, 348 B of spill, 22 local accesses per
loop). q and k are the rotated ones when the call has RoPE.
"""

import os

import triton
import triton.language as tl

from . import sparse
from .tiles import (
    LN2,
    LOG2E,
    aligned,
    aligned_view,
    head_rows,
    load_kv_pair,
    load_rows,
    load_tile,
    loop_tile,
    query_tile,
    row_source,
    scores,
    segment,
    shifted,
    store_tile,
    tile_of,
    tile_rows,
    zeros_chunk,
    zeros_tile,
)

# Triton's interpreter has no descriptor reduce-add: there the TMA tiles add dq with pointer atomics (the
# descriptor loads still run), so CPU tests cover everything but the copy engine's add itself.
_TMA_REDUCE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

# fmt: off


# The row statistics tile of the warp-specialized dq kernel (_bwd_dq with WS), per (head, token) 16 fp32: each
# quantity as three tf32-exact terms (_tf32_terms) from its column on, zeros after the last.
STATS_WIDTH = tl.constexpr(16)
LSE_COL = tl.constexpr(0)  # -lse * log2(e) / qk_scale: adds to the raw scores, so that exp2(s * qk_scale) = p
DELTA_COL = tl.constexpr(3)  # -delta
TEXT_LSE_COL = tl.constexpr(6)  # -lse_text * log2(e) / text_qk_scale
R_COL = tl.constexpr(9)  # -r: the text branch's dS is tanh(gate) * p * (dP - r)


@triton.jit
def _tf32_terms(x):
    """Three fp32 numbers of at most 11 significant bits each (tf32-exact: a tf32 product keeps them whole) that
    sum to x exactly: the leading bits of x, of the rest, and the last two bits."""
    t1 = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    rest = x - t1
    t2 = (rest.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return t1, t2, rest - t2


@triton.jit
def _put_terms(tile, cols, COL: tl.constexpr, x):
    """tile with x's three tf32 terms in columns COL, COL + 1, COL + 2 (x finite, else 0)."""
    t1, t2, t3 = _tf32_terms(tl.where((x == x) & (tl.abs(x) < float("inf")), x, 0.0))
    tile = tl.where(cols == COL, t1[:, None], tile)
    tile = tl.where(cols == COL + 1, t2[:, None], tile)
    return tl.where(cols == COL + 2, t3[:, None], tile)


@triton.jit
def _bwd_preprocess(
    dout, out,  # (pointer, token stride, head stride) views (tiles.py)
    o_text, tanh_gate, lse, lse_text, dlse, delta, delta_text, r, stats,  # o_text laid out as out; the rest (H, T)
    T, qk_scale, text_qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_DLSE: tl.constexpr,
    VEC: tl.constexpr, BLOCK_T: tl.constexpr, HAS_STATS: tl.constexpr = False,
):
    """Per (token, head): delta_self = sum_d dO * o_self - dlse, and with text r = sum_d dO * o_text,
    delta_text = tg * r.

    A gradient g_i on lse_i = log sum_j exp(s_ij) adds g_i * P_ij to dS_ij (d lse_i / d s_ij = P_ij), so
    dS_ij = P_ij * (dP_ij - delta_i + g_i): the kernels use delta_i - g_i and need nothing else.

    HAS_STATS: also the row statistics tile of the warp-specialized dq kernel (STATS_WIDTH columns per row)."""
    DO, stride_dot, stride_doh = aligned_view(dout, VEC)
    OUT, stride_ot, stride_oh = aligned_view(out, VEC)
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = rows < T
    offs_d = tl.arange(0, BLOCK_D)
    mask = t_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    o_off = rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    o_self = tl.load(OUT + o_off, mask=mask, other=0.0).to(tl.float32)
    out_off = h.to(tl.int64) * T + rows
    if HAS_TEXT:
        # Per row: a NaN or infinite gate never reaches a sample without text (o_text = 0, r = 0 there).
        has_text = tl.load(lse_text + out_off, mask=t_mask, other=float("-inf")) > float("-inf")
        tg = tl.where(has_text, tl.load(tanh_gate + h), 0.0)
        ot = tl.load(o_text + o_off, mask=mask, other=0.0).to(tl.float32)
        o_self = o_self - tg[:, None] * ot  # out = o_self + tg * o_text
        r_rows = tl.sum(do * ot, 1)
        tl.store(r + out_off, r_rows, mask=t_mask)
        tl.store(delta_text + out_off, tg * r_rows, mask=t_mask)
    delta_rows = tl.sum(do * o_self, 1)
    if HAS_DLSE:
        delta_rows -= tl.load(dlse + out_off, mask=t_mask, other=0.0)
    tl.store(delta + out_off, delta_rows, mask=t_mask)
    if HAS_STATS:
        cols = tl.arange(0, STATS_WIDTH)[None, :]
        tile = tl.zeros([BLOCK_T, STATS_WIDTH], dtype=tl.float32)
        lse_rows = tl.load(lse + out_off, mask=t_mask, other=0.0)
        tile = _put_terms(tile, cols, LSE_COL, lse_rows * (-LOG2E / qk_scale))
        tile = _put_terms(tile, cols, DELTA_COL, -delta_rows)
        if HAS_TEXT:
            lse_t = tl.load(lse_text + out_off, mask=t_mask, other=0.0)
            tile = _put_terms(tile, cols, TEXT_LSE_COL, lse_t * (-LOG2E / text_qk_scale))
            tile = _put_terms(tile, cols, R_COL, -r_rows)
        tl.store(stats + out_off[:, None] * STATS_WIDTH + cols, tile, mask=t_mask[:, None])


@triton.jit
def _dkdv_products(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q0, q1, do0, do1, lse, delta, m_mask, qk_scale, do_scale,
                   MASK_M: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """The four dk/dv products of one query tile: dv += (do_scale * p)^T dO and dk += ds^T q, with transposed
    scores (keys x queries) so nothing big is transposed. lse in log2 units, delta times qk_scale. Returns the
    accumulators and ds^T (times qk_scale, see _bwd_dkdv) for dq."""
    p_t = tl.exp2(tl.fma(scores(k0, k1, q0, q1, D1, DOT_PREC), qk_scale, -lse[None, :]))
    if MASK_M:
        p_t = tl.where(m_mask[None, :], p_t, 0.0)
    # Folding do_scale into p keeps a single dv accumulator across the GQA group (a per-head one would spill).
    pg = (p_t * do_scale).to(do0.dtype)
    dv0 = tl.dot(pg, do0, dv0, input_precision=DOT_PREC)
    if D1 > 0:
        dv1 = tl.dot(pg, do1, dv1, input_precision=DOT_PREC)
    dp_t = scores(v0, v1, do0, do1, D1, DOT_PREC)
    ds_t = (p_t * tl.fma(dp_t, qk_scale * do_scale, -delta[None, :])).to(q0.dtype)
    dk0 = tl.dot(ds_t, q0, dk0, input_precision=DOT_PREC)
    if D1 > 0:
        dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1, ds_t


@triton.jit
def _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_src0, q_src1, do_src0, do_src1, dq_dst0, dq_dst1, lse_ptr,
               delta_ptr, stride_qt, stride_dot, stride_dqt, start_m, q_len, qk_scale, do_scale,
               ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr, MASK_M: tl.constexpr, BLOCK_M: tl.constexpr,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """_dkdv_products over the BLOCK_M queries from ``start_m``; with ATOMIC_DQ also dq += ds k into the fp32 dq
    buffer. do_scale = tanh(gate[h]) for text keys, 1 for self keys."""
    rows, m_mask = loop_tile(start_m, q_len, MASK_M, BLOCK_M)
    shift = tl.cast(start_m, tl.int64)
    q0, q1 = load_rows(q_src0, q_src1, start_m, rows, m_mask, stride_qt, TMA, BLOCK_M, HEAD_DIM, D0, D1)
    do0, do1 = load_rows(do_src0, do_src1, start_m, rows, m_mask, stride_dot, TMA, BLOCK_M, HEAD_DIM, D0, D1)
    lse = tl.load(lse_ptr + shift + rows, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + shift + rows, mask=m_mask, other=0.0) * qk_scale
    dk0, dk1, dv0, dv1, ds_t = _dkdv_products(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q0, q1, do0, do1, lse, delta,
                                              m_mask, qk_scale, do_scale, MASK_M, D1, DOT_PREC)
    if ATOMIC_DQ:
        ds = tl.trans(ds_t)
        dq0 = tl.dot(ds, k0, input_precision=DOT_PREC)
        if TMA and _TMA_REDUCE:
            # The copy engine adds the tile from shared memory (FlashAttention-3's dq path): no per-thread
            # addresses; rows past the sequence and columns past the head dim are dropped by the descriptor.
            dq_dst0.atomic_add([start_m, 0], dq0)
            if D1 > 0:
                dq_dst1.atomic_add([start_m, D0], tl.dot(ds, k1, input_precision=DOT_PREC))
        else:
            # Relaxed: the adds of different programs commute, and nothing reads the buffer before the kernel ends.
            dq_rows = dq_dst0 + (shift + rows[:, None]) * stride_dqt
            cols = tl.arange(0, D0)
            tl.atomic_add(dq_rows + cols[None, :], dq0, mask=m_mask[:, None], sem="relaxed")
            if D1 > 0:
                cols = D0 + tl.arange(0, D1)
                tl.atomic_add(dq_rows + cols[None, :], tl.dot(ds, k1, input_precision=DOT_PREC),
                              mask=m_mask[:, None] & (cols < HEAD_DIM)[None, :], sem="relaxed")
    return dk0, dk1, dv0, dv1


@triton.jit
def _group_source(view, GROUP, length, R: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                  D1: tl.constexpr):
    """Tensor descriptors (one per column chunk) of the rows of a GQA group's ``GROUP`` query heads, one
    sequence (``view``: from its first row of the group's first head): (head, row, column), so one loop can
    walk every (head, query tile) of the group."""
    base, stride_t, stride_h = view
    src0 = tl.make_tensor_descriptor(base, shape=[GROUP, length, HEAD_DIM], strides=[stride_h, stride_t, 1],
                                     block_shape=[1, R, D0])
    if D1 > 0:
        src1 = tl.make_tensor_descriptor(base, shape=[GROUP, length, HEAD_DIM], strides=[stride_h, stride_t, 1],
                                         block_shape=[1, R, D1])
    else:
        src1 = src0
    return src0, src1


@triton.jit
def _group_rows(src0, src1, g, start, R: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """The R rows from ``start`` of head ``g`` of a _group_source (rows past the sequence zero-filled)."""
    x0 = tl.reshape(src0.load([g, start, 0]), [R, D0])
    if D1 > 0:
        x1 = tl.reshape(src1.load([g, start, D0]), [R, D1])
    else:
        x1 = zeros_chunk(R, 0).to(x0.dtype)  # dummy, never used
    return x0, x1


@triton.jit
def _dkdv_group_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_src0, q_src1, do_src0, do_src1, g, start, end, lse_base,
                      delta_base, gate, is_text, T, qk_scale, HAS_TEXT: tl.constexpr, BLOCK_M: tl.constexpr,
                      D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """One step of the warp-specialized dk/dv loops (_dkdv_ws, _dkdv_listed): query rows [start, end) of head g
    of the group, at most BLOCK_M, through _group_source descriptors; rows past ``end`` masked."""
    q0, q1 = _group_rows(q_src0, q_src1, g, start, BLOCK_M, D0, D1)
    do0, do1 = _group_rows(do_src0, do_src1, g, start, BLOCK_M, D0, D1)
    rows, m_mask = loop_tile(start, end, True, BLOCK_M)
    offs = g.to(tl.int64) * T + start + rows
    lse = tl.load(lse_base + offs, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(delta_base + offs, mask=m_mask, other=0.0) * qk_scale
    do_scale = 1.0
    if HAS_TEXT:
        do_scale = tl.where(is_text, tl.load(gate + g), 1.0)
    dk0, dk1, dv0, dv1, _ = _dkdv_products(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q0, q1, do0, do1, lse, delta, m_mask,
                                           qk_scale, do_scale, True, D1, DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_ws(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q, dout, lse_base, delta_base, gate, is_text, GROUP, T, q_len,
             qk_scale, HAS_TEXT: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
             D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv of one key tile over every (query head of the GQA group, query tile) pair, in the shape Triton's
    warp specialization splits on sm_90 (as the forward's, fwd._attend): ONE loop, the sequence's tail tile
    masked inside it (the descriptors zero-fill rows past the sequence), q and dO through tensor descriptors, no
    branch in it. ``q``, ``dout`` (views), ``*_base``: from the group's first head at the sequence's first query;
    ``gate``: its tanh(gate)."""
    q_rows = tl.maximum(q_len, 1)  # descriptors need a row; with q_len == 0 the loop never loads
    q_src0, q_src1 = _group_source(q, GROUP, q_rows, BLOCK_M, HEAD_DIM, D0, D1)
    do_src0, do_src1 = _group_source(dout, GROUP, q_rows, BLOCK_M, HEAD_DIM, D0, D1)
    n_m = tl.cdiv(q_len, BLOCK_M)
    for i in tl.range(0, GROUP * n_m, warp_specialize=True):
        g = i // n_m
        start_m = (i - g * n_m) * BLOCK_M
        dk0, dk1, dv0, dv1 = _dkdv_group_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_src0, q_src1, do_src0, do_src1,
                                               g, start_m, q_len, lse_base, delta_base, gate, is_text, T, qk_scale,
                                               HAS_TEXT, BLOCK_M, D0, D1, DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_listed(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q, dout, lse_base, delta_base, gate, is_text, GROUP, T, q_len,
                 first_query, table, CU, n_seqs, hk, b, tile, qk_scale, HAS_TEXT: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv of one tile-sparse key tile (or a placeholder or text key tile: ``tile`` -1, no list), _dkdv_ws's
    shape: ONE loop over (query head of the GQA group, block), the blocks those of sparse.flat_block (the query
    tiles of the transposed list in chunks of BLOCK_M rows, then the rest: the sample's placeholder rows, or all of
    its rows for a placeholder or text key tile), q and dO through 3-D descriptors built once per sample
    (``q``, ``dout``: views from the group's first head at the sample's first query ``first_query``, ``q_len``
    rows), each block addressed by its row offset, partial tiles masked in the loop. Per-head lists (top_k) differ
    in length: every head walks the group's longest, its own past its count padding (masked)."""
    q_rows = tl.maximum(q_len, 1)  # descriptors need a row; with q_len == 0 the loop never loads
    q_src0, q_src1 = _group_source(q, GROUP, q_rows, BLOCK_M, HEAD_DIM, D0, D1)
    do_src0, do_src1 = _group_source(dout, GROUP, q_rows, BLOCK_M, HEAD_DIM, D0, D1)
    most = 0
    for g in range(GROUP):
        count, _ = sparse.listed(table, n_seqs, hk * GROUP + g, tile)
        most = tl.maximum(most, count)
    chunks, n_listed, r_first, r_len, per_head = sparse.flat_loop(table, CU, n_seqs, b, tile, most, q_len, BLOCK_M)
    for i in tl.range(0, GROUP * per_head, warp_specialize=True):
        g = i // per_head
        j = i - g * per_head
        count, entries = sparse.listed(table, n_seqs, hk * GROUP + g, tile)
        first, rows = sparse.flat_block(table, entries, count, chunks, n_listed, r_first, r_len, j, BLOCK_M)
        off = (first - first_query).to(tl.int32)  # descriptor offsets are 32-bit
        dk0, dk1, dv0, dv1 = _dkdv_group_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_src0, q_src1, do_src0, do_src1,
                                               g, off, off + rows, lse_base, delta_base, gate, is_text, T, qk_scale,
                                               HAS_TEXT, BLOCK_M, D0, D1, DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_heads(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q, dout, dq_acc, tanh_gate, lse_base, delta_base, is_text, hk,
                GROUP, T, q_start, q_len, qk_scale, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv of one key tile, head by head of the GQA group (``q``, ``dout``, ``dq_acc``: views): the full query
    tiles, then the masked tail."""
    stride_qt, stride_dot, stride_dqt = q[1], dout[1], dq_acc[1]
    m_full = (q_len // BLOCK_M) * BLOCK_M
    # Descriptors of a sequence's query rows need at least one row; with q_len == 0 (a text key tile of a sample
    # without queries) the loop below never loads through them, and dk = dv = 0 is stored.
    q_rows = tl.maximum(q_len, 1)
    for g in range(GROUP):
        h = hk * GROUP + g
        do_scale = 1.0
        if is_text:
            do_scale = tl.load(tanh_gate + h)  # the text branch sees dO * tanh(gate[h])
        q_src0, q_src1 = row_source(head_rows(q, q_start, h), q_rows, stride_qt, TMA, BLOCK_M, HEAD_DIM, D0, D1)
        do_src0, do_src1 = row_source(head_rows(dout, q_start, h), q_rows, stride_dot, TMA, BLOCK_M, HEAD_DIM, D0,
                                      D1)
        dq_dst0, dq_dst1 = row_source(head_rows(dq_acc, q_start, h), q_rows, stride_dqt,
                                      TMA and ATOMIC_DQ and _TMA_REDUCE, BLOCK_M, HEAD_DIM, D0, D1)
        lse_ptr = lse_base + h.to(tl.int64) * T + q_start
        delta_ptr = delta_base + h.to(tl.int64) * T + q_start
        for start_m in range(0, m_full, BLOCK_M):
            dk0, dk1, dv0, dv1 = _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_src0, q_src1, do_src0, do_src1,
                                            dq_dst0, dq_dst1, lse_ptr, delta_ptr, stride_qt, stride_dot, stride_dqt,
                                            start_m, q_len, qk_scale, do_scale, ATOMIC_DQ, TMA, False, BLOCK_M,
                                            HEAD_DIM, D0, D1, DOT_PREC)
        if m_full < q_len:
            dk0, dk1, dv0, dv1 = _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_src0, q_src1, do_src0, do_src1,
                                            dq_dst0, dq_dst1, lse_ptr, delta_ptr, stride_qt, stride_dot, stride_dqt,
                                            m_full, q_len, qk_scale, do_scale, ATOMIC_DQ, TMA, True, BLOCK_M,
                                            HEAD_DIM, D0, D1, DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _bwd_dkdv(
    q, k, v, text_k, text_v, dout, dq_acc,  # (pointer, token stride, head stride) views (tiles.py)
    dkv, text_dkv,  # (dk pointer, dv pointer, token stride, head stride) of the key and text key gradients
    tanh_gate, lse, lse_text, delta, delta_text,  # the per-(head, token) ones (H, T) fp32
    offsets,  # (cu_seqlens, text_cu_seqlens, cu_seqlens_k) as offsets.py repaired them
    sparse_table,  # (LISTS, n_tiles, list_heads, list_width, volume) of the transposed lists (sparse.py)
    qk_scale, text_qk_scale, T, T_TEXT, GROUP, n_seqs, bisect_steps,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TEXT: tl.constexpr, DOT_PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, TMA_OK: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, WS_OK: tl.constexpr = False, WS: tl.constexpr = False, SPARSE: tl.constexpr = False,
):
    """dk, dv of one block of keys for one kv head, summed over the GQA group's query heads in a fixed order,
    and with ATOMIC_DQ this block's share of dq. Self keys and text keys share the launch (grid: T_TEXT // BLOCK_N +
    n_seqs text key tiles, then Tk // BLOCK_N + n_seqs self key tiles over the key offsets KCU (CU itself for
    self-attention), then kv heads). (A separate text launch has
    only batch * Hkv programs, each looping over all of its sample's queries: on a long sample it runs as long as
    a self key block, on an idle GPU.) Both kinds run the same code on run-time pointers and scales, so the loop
    is compiled once; what only the epilogue needs is selected after the loop, so it holds no registers in it."""
    q = aligned_view(q, VEC)
    K, stride_kt, stride_kh = aligned_view(k, VEC)
    V, stride_vt, stride_vh = aligned_view(v, VEC)
    TK, stride_tkt, stride_tkh = aligned_view(text_k, VEC)
    TV, stride_tvt, stride_tvh = aligned_view(text_v, VEC)
    dout = aligned_view(dout, VEC)
    DK, DV, stride_dkt, stride_dkh = dkv
    DTK, DTV, stride_dtkt, stride_dtkh = text_dkv
    stride_dkt, stride_dkh = aligned(stride_dkt, VEC), aligned(stride_dkh, VEC)
    stride_dtkt, stride_dtkh = aligned(stride_dtkt, VEC), aligned(stride_dtkh, VEC)
    dq_acc = aligned_view(dq_acc, 4)  # the fp32 dq buffer, contiguous
    CU, TCU, KCU = offsets
    tl.static_assert(TMA_OK or not TMA)  # TMA: dq added through tensor descriptors, where the launcher allows it
    # WS: the query loop in the shape Triton warp-specializes (_dkdv_ws): a counted bisection and no early
    # return, k / v through descriptors, one masked loop over the group's (head, query tile) pairs; dq is left to
    # _bwd_dq (the pass fails on a loop with an atomic or descriptor reduce-add in it, Triton 3.6).
    tl.static_assert((TMA and WS_OK and not ATOMIC_DQ) or not WS)
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if HAS_TEXT:
        n_text = T_TEXT // BLOCK_N + n_seqs
        is_text = pid < n_text
    else:
        n_text = 0
        is_text = False  # a compile-time constant: no text branch compiled at all
    if HAS_TEXT and WS:
        # Selects, not a branch: Triton 3.6's pass splits no loop of a kernel that picks these in an scf.if.
        k_ptr, v_ptr, cu_k = tl.where(is_text, TK, K), tl.where(is_text, TV, V), tl.where(is_text, TCU, KCU)
        lse_base, delta_base = tl.where(is_text, lse_text, lse), tl.where(is_text, delta_text, delta)
        stride_kt, stride_kh = tl.where(is_text, stride_tkt, stride_kt), tl.where(is_text, stride_tkh, stride_kh)
        stride_vt, stride_vh = tl.where(is_text, stride_tvt, stride_vt), tl.where(is_text, stride_tvh, stride_vh)
        qk_scale = tl.where(is_text, text_qk_scale, qk_scale)
        pid = tl.where(is_text, pid, pid - n_text)
    elif is_text:
        k_ptr, v_ptr, lse_base, delta_base, cu_k = TK, TV, lse_text, delta_text, TCU
        stride_kt, stride_kh = stride_tkt, stride_tkh
        stride_vt, stride_vh = stride_tvt, stride_tvh
        qk_scale = text_qk_scale
    else:
        k_ptr, v_ptr, lse_base, delta_base, cu_k = K, V, lse, delta, KCU
        pid -= n_text
    # SPARSE: self key tiles of the transposed lists (sparse.py); descriptors only in the WS shape (_dkdv_listed).
    tl.static_assert(not (SPARSE and TMA and not WS))
    if SPARSE and WS:
        # Selects, as above: a key tile chunk (tile >= 0), a placeholder key chunk (-1), or a text key tile (-1).
        tile_pid = pid
        if HAS_TEXT:
            tile_pid = tl.where(is_text, 0, pid)  # a text pid may lie past the tile programs
        b, tile, k_start, k_len = sparse.program(tile_pid, sparse_table, CU, n_seqs, tl.cdiv(sparse_table[4], BLOCK_N),
                                                 BLOCK_N, bisect_steps, True)
        pid_n = b * 0
        if HAS_TEXT:
            b_text, pid_text = tile_of(pid, cu_k, n_seqs, BLOCK_N, bisect_steps, True)
            t_start, t_len = segment(cu_k, b_text)
            b, tile, pid_n = tl.where(is_text, b_text, b), tl.where(is_text, -1, tile), tl.where(is_text, pid_text, 0)
            k_start, k_len = tl.where(is_text, t_start, k_start), tl.where(is_text, t_len, k_len)
    elif SPARSE:
        if is_text:
            b, pid_n = tile_of(pid, cu_k, n_seqs, BLOCK_N)
            k_start, k_len = segment(cu_k, b)
            tile = b * 0 - 1
        else:
            b, tile, k_start, k_len = sparse.program(pid, sparse_table, CU, n_seqs, tl.cdiv(sparse_table[4], BLOCK_N),
                                                     BLOCK_N)
            pid_n = b * 0
    else:
        b, pid_n = tile_of(pid, cu_k, n_seqs, BLOCK_N, bisect_steps, WS)
        k_start, k_len = segment(cu_k, b)
    q_start, q_len = segment(CU, b)
    if WS:
        q_len = tl.where(pid_n * BLOCK_N < k_len, q_len, 0)  # an idle program: no query loop, nothing stored
    elif pid_n * BLOCK_N >= k_len:
        return
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)
    n_rows, n_mask = tile_rows(pid_n * BLOCK_N, k_len, True, BLOCK_N)
    k_base = k_ptr + k_start * stride_kt + hk * stride_kh
    v_base = v_ptr + k_start * stride_vt + hk * stride_vh
    if WS:
        k_rows = tl.maximum(k_len, 1)
        k_src0, k_src1 = row_source(k_base, k_rows, stride_kt, True, BLOCK_N, HEAD_DIM, D0, D1)
        v_src0, v_src1 = row_source(v_base, k_rows, stride_vt, True, BLOCK_N, HEAD_DIM, D0, D1)
        k0, k1 = load_rows(k_src0, k_src1, pid_n * BLOCK_N, n_rows, n_mask, stride_kt, True, BLOCK_N, HEAD_DIM, D0,
                           D1)
        v0, v1 = load_rows(v_src0, v_src1, pid_n * BLOCK_N, n_rows, n_mask, stride_vt, True, BLOCK_N, HEAD_DIM, D0,
                           D1)
    else:
        k0, k1 = load_tile(k_base, n_rows, n_mask, stride_kt, BLOCK_N, HEAD_DIM, D0, D1)
        v0, v1 = load_tile(v_base, n_rows, n_mask, stride_vt, BLOCK_N, HEAD_DIM, D0, D1)
    dk0, dk1 = zeros_tile(BLOCK_N, D0, D1)
    dv0, dv1 = zeros_tile(BLOCK_N, D0, D1)
    if SPARSE and WS:
        h0 = hk * GROUP
        dk0, dk1, dv0, dv1 = _dkdv_listed(dk0, dk1, dv0, dv1, k0, k1, v0, v1, shifted(q, q_start, h0),
                                          shifted(dout, q_start, h0), lse_base + h0.to(tl.int64) * T + q_start,
                                          delta_base + h0.to(tl.int64) * T + q_start, tanh_gate + h0, is_text, GROUP, T,
                                          q_len, q_start, sparse_table, CU, n_seqs, hk, b, tile, qk_scale, HAS_TEXT,
                                          BLOCK_M, HEAD_DIM, D0, D1, DOT_PREC)
    elif SPARSE:
        # Tile-sparse self keys: per query head of the group, the same loop over each query run that visits this
        # key tile (the transposed lists, sparse.py); a text key tile keeps its whole sample (one run).
        for g in range(GROUP):
            h = hk * GROUP + g
            n_runs = tl.where(is_text, 1, sparse.run_count(sparse_table, n_seqs, h, tile))
            for j in range(n_runs):
                q_first, q_rows = sparse.run(sparse_table, CU, n_seqs, h, b, tile, j)
                q_first = tl.where(is_text, q_start, q_first.to(tl.int64))
                q_rows = tl.where(is_text, q_len, q_rows)
                dk0, dk1, dv0, dv1 = _dkdv_heads(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q, dout, dq_acc, tanh_gate,
                                                 lse_base, delta_base, is_text, h, 1, T, q_first, q_rows, qk_scale,
                                                 ATOMIC_DQ, TMA, BLOCK_M, HEAD_DIM, D0, D1, DOT_PREC)
    elif WS:
        h0 = hk * GROUP
        dk0, dk1, dv0, dv1 = _dkdv_ws(dk0, dk1, dv0, dv1, k0, k1, v0, v1, shifted(q, q_start, h0),
                                      shifted(dout, q_start, h0), lse_base + h0.to(tl.int64) * T + q_start,
                                      delta_base + h0.to(tl.int64) * T + q_start, tanh_gate + h0, is_text, GROUP, T,
                                      q_len, qk_scale, HAS_TEXT, BLOCK_M, HEAD_DIM, D0, D1, DOT_PREC)
    else:
        dk0, dk1, dv0, dv1 = _dkdv_heads(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q, dout, dq_acc, tanh_gate, lse_base,
                                         delta_base, is_text, hk, GROUP, T, q_start, q_len, qk_scale, ATOMIC_DQ, TMA,
                                         BLOCK_M, HEAD_DIM, D0, D1, DOT_PREC)
    if HAS_TEXT and WS:
        dk_ptr, dv_ptr = tl.where(is_text, DTK, DK), tl.where(is_text, DTV, DV)
        stride_dkt, stride_dkh = tl.where(is_text, stride_dtkt, stride_dkt), tl.where(is_text, stride_dtkh, stride_dkh)
    elif is_text:
        dk_ptr, dv_ptr, stride_dkt, stride_dkh = DTK, DTV, stride_dtkt, stride_dtkh
    else:
        dk_ptr, dv_ptr = DK, DV
    out_base = k_start * stride_dkt + hk * stride_dkh
    # dk accumulated ds * qk_scale = ds * scale * log2(e): times ln 2 is the gradient, for self and text keys.
    store_tile(dk_ptr + out_base, n_rows, n_mask, stride_dkt, dk0 * LN2, dk1 * LN2, HEAD_DIM, D0, D1)
    store_tile(dv_ptr + out_base, n_rows, n_mask, stride_dkt, dv0, dv1, HEAD_DIM, D0, D1)


@triton.jit
def _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_src0, k_src1, v_src0, v_src1, stride_kt, stride_vt,
             start_n, k_len, qk_scale, MASK_N: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq (unscaled) += p * (dp - delta) @ k over BLOCK_N keys; p recomputed from the saved LSE and
    dp = do_scale * dO v^T (do_scale = tanh(gate) for the text branch)."""
    k0, k1, v0, v1, n_mask = load_kv_pair(k_src0, k_src1, v_src0, v_src1, stride_kt, stride_vt, start_n, k_len,
                                          MASK_N, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    p = tl.exp2(tl.fma(scores(q0, q1, k0, k1, D1, DOT_PREC), qk_scale, -lse[:, None]))
    if MASK_N:
        p = tl.where(n_mask[None, :], p, 0.0)
    dp = scores(do0, do1, v0, v1, D1, DOT_PREC) * do_scale
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
    if D1 > 0:
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _dq_tile_ws(dq0, dq1, q0, q1, do0, do1, stats, pick_lse, pick_delta, do_scale, k_src0, k_src1, v_src0, v_src1,
                start_n, k_len, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """_dq_tile for the warp-specialized loop (descriptor loads, the tail masked): the row statistics enter as a
    product, stats @ pick_* (pick_*: ones in the three rows of the quantity's terms), which starts the score and
    dP accumulators: -lse / qk_scale and -delta broadcast over the keys by the tensor cores (exact: tf32 terms
    times 1), since Triton 3.6's pass cannot split a loop whose consumers use row vectors loaded by pointer."""
    k0, k1, v0, v1, n_mask = load_kv_pair(k_src0, k_src1, v_src0, v_src1, 0, 0, start_n, k_len, True, True, BLOCK_N,
                                          HEAD_DIM, D0, D1)
    s = tl.dot(stats, pick_lse, input_precision="tf32")
    s = tl.dot(q0, tl.trans(k0), s, input_precision=DOT_PREC)
    if D1 > 0:
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
    p = tl.where(n_mask[None, :], tl.exp2(s * qk_scale), 0.0)
    dp = tl.dot(stats, pick_delta, input_precision="tf32")
    dp = tl.dot(do0, tl.trans(v0), dp, input_precision=DOT_PREC)
    if D1 > 0:
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
    ds = ((p * do_scale) * dp).to(k0.dtype)
    dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
    if D1 > 0:
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _picker(COL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(STATS_WIDTH, BLOCK_N) fp32: ones in rows COL..COL + 2, so stats @ it is the column's quantity on every key."""
    rows = tl.arange(0, STATS_WIDTH)[:, None]
    ones = tl.where((rows >= COL) & (rows < COL + 3), 1.0, 0.0)
    return tl.broadcast_to(ones, [STATS_WIDTH, BLOCK_N])


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_base, v_base, stride_kt, stride_vt, k_len,
              qk_scale, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
              D1: tl.constexpr, DOT_PREC: tl.constexpr, WS: tl.constexpr = False, STATS_COL: tl.constexpr = 0):
    """dq over ``k_len`` keys: full tiles, then the masked tail. WS (with TMA): one loop over every key tile with
    the tail masked inside it, ``tl.range(..., warp_specialize=True)`` (fwd._attend's WS shape); ``lse`` is then
    the row statistics tile, its LSE terms from column STATS_COL and delta's (or r's) three columns later."""
    tl.static_assert(TMA or not WS)
    # Descriptors need at least one row; with k_len == 0 (cross-attention) the loop never loads through them.
    k_rows = tl.maximum(k_len, 1)
    k_src0, k_src1 = row_source(k_base, k_rows, stride_kt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    v_src0, v_src1 = row_source(v_base, k_rows, stride_vt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    if WS:
        pick_lse, pick_delta = _picker(STATS_COL, BLOCK_N), _picker(STATS_COL + 3, BLOCK_N)
        for start_n in tl.range(0, k_len, BLOCK_N, warp_specialize=True):
            dq0, dq1 = _dq_tile_ws(dq0, dq1, q0, q1, do0, do1, lse, pick_lse, pick_delta, do_scale, k_src0, k_src1,
                                   v_src0, v_src1, start_n, k_len, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    else:
        n_full = (k_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq0, dq1 = _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_src0, k_src1, v_src0, v_src1,
                                stride_kt, stride_vt, start_n, k_len, qk_scale, False, TMA, BLOCK_N, HEAD_DIM, D0, D1,
                                DOT_PREC)
        if n_full < k_len:
            dq0, dq1 = _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_src0, k_src1, v_src0, v_src1,
                                stride_kt, stride_vt, n_full, k_len, qk_scale, True, TMA, BLOCK_N, HEAD_DIM, D0, D1,
                                DOT_PREC)
    return dq0, dq1


@triton.jit
def _dq_listed(dq0, dq1, q0, q1, do0, do1, stats, k_base, v_base, stride_kt, stride_vt, k_len, first_key, table, CU,
               n_seqs, h, b, tile, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """Tile-sparse self keys of the warp-specialized dq kernel, fwd._attend_listed's shape: ONE loop over the
    program's key blocks (sparse.flat_block) through descriptors built once per sample (``k_base`` at its first
    key ``first_key``, ``k_len`` rows), each block addressed by its row offset, partial tiles masked in the loop.
    ``stats``: the row statistics tile (see _dq_inner)."""
    k_rows = tl.maximum(k_len, 1)
    k_src0, k_src1 = row_source(k_base, k_rows, stride_kt, True, BLOCK_N, HEAD_DIM, D0, D1)
    v_src0, v_src1 = row_source(v_base, k_rows, stride_vt, True, BLOCK_N, HEAD_DIM, D0, D1)
    pick_lse, pick_delta = _picker(LSE_COL, BLOCK_N), _picker(DELTA_COL, BLOCK_N)
    count, entries = sparse.listed(table, n_seqs, h, tile)
    chunks, n_listed, r_first, r_len, n_blocks = sparse.flat_loop(table, CU, n_seqs, b, tile, count, k_len, BLOCK_N)
    for i in tl.range(0, n_blocks, warp_specialize=True):
        first, rows = sparse.flat_block(table, entries, count, chunks, n_listed, r_first, r_len, i, BLOCK_N)
        off = (first - first_key).to(tl.int32)  # descriptor offsets are 32-bit
        dq0, dq1 = _dq_tile_ws(dq0, dq1, q0, q1, do0, do1, stats, pick_lse, pick_delta, 1.0, k_src0, k_src1, v_src0,
                               v_src1, off, off + rows, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    return dq0, dq1


@triton.jit
def _bwd_dq(
    q, k, v, text_k, text_v, dout, dq_acc,  # (pointer, token stride, head stride) views (tiles.py)
    tanh_gate, lse, lse_text, delta, delta_text, stats,  # the per-(head, token) ones (H, T) fp32 (stats: see WS)
    offsets,  # (cu_seqlens, text_cu_seqlens, cu_seqlens_k) as offsets.py repaired them
    sparse_table,  # (LISTS, n_tiles, list_heads, list_width, volume): the forward's (sparse.py)
    qk_scale, text_qk_scale, sm_scale, text_scale, T, GROUP, n_seqs, bisect_steps,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TEXT: tl.constexpr, DOT_PREC: tl.constexpr,
    TMA_OK: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
    WS_OK: tl.constexpr = False, WS: tl.constexpr = False, SPARSE: tl.constexpr = False,
):
    """dq of one block of queries for one head (self keys through tensor descriptors with TMA, then text keys)
    into the fp32 dq buffer, in the buffer's unit: log2(e) times dq. SPARSE: the forward's tile-sparse programs
    and key runs (sparse.py), pointer loads; with WS its listed key blocks in the WS shape (_dq_listed).

    WS: the shape Triton 3.6 warp-specializes on sm_90, as the forward's (fwd._fwd_kernel): a counted bisection
    and no early return, q / dO / keys / text keys and the row statistics (STATS, written by _bwd_preprocess)
    through descriptors, one masked loop per key kind (_dq_inner)."""
    tl.static_assert(TMA_OK or not TMA)
    tl.static_assert((TMA and WS_OK) or not WS)
    tl.static_assert(not (SPARSE and TMA and not WS))  # sparse descriptors only in the WS shape
    q, k, v = aligned_view(q, VEC), aligned_view(k, VEC), aligned_view(v, VEC)
    text_k, text_v, dout = aligned_view(text_k, VEC), aligned_view(text_v, VEC), aligned_view(dout, VEC)
    dq_acc = aligned_view(dq_acc, 4)  # fp32
    stride_dot = dout[1]
    CU, TCU, KCU = offsets
    # The forward's grid. WS: the (at most one per sequence) idle program runs with no keys and stores nothing.
    b, pid_m, tile, h, hk, start, seq_len, live = sparse.query_program(CU, n_seqs, GROUP, bisect_steps, sparse_table,
                                                                       SPARSE, WS, BLOCK_M)
    if not WS:  # noqa: SIM102 (a constexpr branch: a WS kernel must hold no return at all)
        if not live:
            return
    start = start.to(tl.int64)
    rows, m_mask, q0, q1, lse_off = query_tile(q, start, seq_len, pid_m, h, T, BLOCK_M, HEAD_DIM, D0, D1, WS)
    do_base = head_rows(dout, start, h)
    if WS:
        seq_rows = tl.maximum(seq_len, 1)
        do_src0, do_src1 = row_source(do_base, seq_rows, stride_dot, True, BLOCK_M, HEAD_DIM, D0, D1)
        do0, do1 = load_rows(do_src0, do_src1, pid_m * BLOCK_M, rows, m_mask, stride_dot, True, BLOCK_M, HEAD_DIM,
                             D0, D1)
        stats_src = tl.make_tensor_descriptor(stats + (h.to(tl.int64) * T + start) * STATS_WIDTH,
                                              shape=[seq_rows, STATS_WIDTH], strides=[STATS_WIDTH, 1],
                                              block_shape=[BLOCK_M, STATS_WIDTH])
        lse_rows = stats_src.load([pid_m * BLOCK_M, 0])  # the row statistics tile (see _dq_inner)
        delta_rows = lse_rows
    else:
        do0, do1 = load_tile(do_base, rows, m_mask, stride_dot, BLOCK_M, HEAD_DIM, D0, D1)
        lse_rows = tl.load(lse + lse_off, mask=m_mask, other=0.0) * LOG2E
        delta_rows = tl.load(delta + lse_off, mask=m_mask, other=0.0)
    dq0, dq1 = zeros_tile(BLOCK_M, D0, D1)
    if SPARSE and WS:
        k_start, k_len = segment(KCU, b)
        k_start = k_start.to(tl.int64)
        k_len = tl.where(live, k_len, 0)
        dq0, dq1 = _dq_listed(dq0, dq1, q0, q1, do0, do1, lse_rows, head_rows(k, k_start, hk),
                              head_rows(v, k_start, hk), k[1], v[1], k_len, k_start, sparse_table, CU, n_seqs, h, b,
                              tile, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    elif SPARSE:  # the same loop over each key run of the query tile
        for j in range(sparse.run_count(sparse_table, n_seqs, h, tile)):
            k_start, k_len = sparse.run(sparse_table, CU, n_seqs, h, b, tile, j)
            k_start = k_start.to(tl.int64)
            dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse_rows, delta_rows, 1.0, head_rows(k, k_start, hk),
                                 head_rows(v, k_start, hk), k[1], v[1], k_len, qk_scale, False, BLOCK_N, HEAD_DIM, D0,
                                 D1, DOT_PREC, WS, LSE_COL)
    else:
        k_start, k_len = segment(KCU, b)  # KCU is CU for self-attention; a sample without keys adds nothing
        k_start = k_start.to(tl.int64)
        if WS:
            k_len = tl.where(live, k_len, 0)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse_rows, delta_rows, 1.0, head_rows(k, k_start, hk),
                             head_rows(v, k_start, hk), k[1], v[1], k_len, qk_scale, TMA, BLOCK_N, HEAD_DIM, D0, D1,
                             DOT_PREC, WS, LSE_COL)
    if HAS_TEXT:
        t_start, t_len = segment(TCU, b)
        t_start = t_start.to(tl.int64)
        if WS:
            t_len = tl.where(live, t_len, 0)
        else:
            lse_rows = tl.load(lse_text + lse_off, mask=m_mask, other=0.0) * LOG2E
            delta_rows = tl.load(delta_text + lse_off, mask=m_mask, other=0.0)
        # One accumulator pair for both branches: dq = ts * (self * sm / ts + text), scaled once at the end.
        dq0 = dq0 * (sm_scale / text_scale)
        dq1 = dq1 * (sm_scale / text_scale)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse_rows, delta_rows, tl.load(tanh_gate + h),
                             head_rows(text_k, t_start, hk), head_rows(text_v, t_start, hk), text_k[1], text_v[1],
                             t_len, text_qk_scale, WS, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC, WS, TEXT_LSE_COL)
        unit = text_scale * LOG2E
    else:
        unit = sm_scale * LOG2E
    store_tile(head_rows(dq_acc, start, h), rows, m_mask, dq_acc[1], dq0 * unit, dq1 * unit, HEAD_DIM, D0, D1)


@triton.jit
def _bwd_dq_postprocess(
    dq_acc, dq,  # (pointer, token stride, head stride) views (tiles.py)
    freqs,  # (pointer, token stride) of the RoPE table
    T, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, VEC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dq = scale * the fp32 buffer, rotated by -angle when ROPE (the buffer holds the gradient of the rotated q;
    the rotation is orthogonal, so its transpose maps it back), rounded once to q's dtype."""
    DQ_ACC, stride_at, stride_ah = aligned_view(dq_acc, 4)
    DQ, stride_dqt, stride_dqh = aligned_view(dq, VEC)
    FREQS, stride_ft = freqs
    h = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < HEAD_DIM)[None, :]
    dq = tl.load(DQ_ACC + rows[:, None] * stride_at + h * stride_ah + cols[None, :], mask=mask, other=0.0) * scale
    if ROPE:
        # freqs (T, Dh/2, 2), contiguous: the (cos, sin) of pair i sit at columns 2i, 2i + 1, like the pair itself.
        f = tl.load(FREQS + rows[:, None] * stride_ft + cols[None, :], mask=mask, other=0.0)
        cos, sin = tl.split(tl.reshape(f, (BLOCK_T, BLOCK_D // 2, 2)))
        x0, x1 = tl.split(tl.reshape(dq, (BLOCK_T, BLOCK_D // 2, 2)))
        dq = tl.reshape(tl.join(x0 * cos + x1 * sin, x1 * cos - x0 * sin), (BLOCK_T, BLOCK_D))
    tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + cols[None, :], dq.to(DQ.dtype.element_ty), mask=mask)
