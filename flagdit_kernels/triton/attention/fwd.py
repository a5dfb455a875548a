"""Forward kernel of the varlen attention: packed self-attention plus Lumina's gated text cross-attention.

One program per (block of BLOCK_M queries of one sequence, query head):
  1. load the q tile (already rotated by RoPE when the call has ``freqs``: the launcher rotates q and k once);
  2. online softmax with scale 1/sqrt(Dh) over the sample's text keys; ``o_text`` is written to memory (the
     backward needs it) and read back in step 4, so it holds no registers during step 3;
  3. online softmax (fp32, exp2 with log2(e) folded into the scale) over the sequence's keys, or with
     cross-attention the sample's keys by their own offsets (``cu_seqlens_k``; any number, 0 included) (pointer
     loads, or tensor descriptors / the copy engine where the autotuner picks them on sm_90+);
  4. write ``o_self + tanh(gate[h]) * o_text`` and both log-sum-exps (natural log, the public ``lse`` unit).
"""

import triton
import triton.language as tl

from . import sparse
from .tiles import (
    LN2,
    aligned_view,
    head_rows,
    load_kv_pair,
    load_tile,
    query_tile,
    row_source,
    scores,
    segment,
    store_tile,
    zeros_tile,
)

# fmt: off


@triton.jit
def _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1, stride_kt, stride_vt, start_n, k_len,
                 qk_scale, MASK_N: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over BLOCK_N keys (scores in log2 units)."""
    k0, k1, v0, v1, n_mask = load_kv_pair(k_src0, k_src1, v_src0, v_src1, stride_kt, stride_vt, start_n, k_len,
                                          MASK_N, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    s = scores(q0, q1, k0, k1, D1, DOT_PREC)
    if MASK_N:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    # The scale (>= 0, checked by the caller) is applied to the row max and folded into one FMA per score,
    # instead of a multiply and a subtract: the softmax's CUDA-core work competes with the matmuls for issue slots.
    # Every tile holds at least one real key, so m_new is finite and no row ever computes -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))  # explicit: Triton 3.10 stops fusing mul + sub by default
    if MASK_N:
        p = tl.where(n_mask[None, :], p, 0.0)  # -inf * 0 is NaN when the scale is 0 (proportional scale, 1 token)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
    if D1 > 0:
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attend(q0, q1, k_base, v_base, stride_kt, stride_vt, k_len, qk_scale, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr,
            WS: tl.constexpr = False):
    """Online softmax of q's attention over ``k_len`` keys (full tiles, then the tail), from a fresh state.
    Returns (acc0, acc1, m_i, l_i): unnormalized output chunks, running max and sum (log2 units).

    WS (with TMA): the shape Triton's warp specialization splits on sm_90 (Triton 3.6): one loop over every key
    tile, the tail masked inside it (the descriptors zero-fill rows past the sequence; their scores are masked),
    ``tl.range(..., warp_specialize=True)``, so the pass gives the descriptor loads to a producer warp and the
    matmuls and softmax to consumer warpgroups. (A full-tile loop plus a tail step keeps the pass from splitting
    any loop of the kernel.) The interpreter ignores warp_specialize: the numbers are those of the two loops."""
    tl.static_assert(TMA or not WS)
    acc0, acc1 = zeros_tile(BLOCK_M, D0, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WS:
        # Descriptors need at least one row; with k_len == 0 (cross-attention) the loop never loads through them.
        k_rows = tl.maximum(k_len, 1)
        k_src0, k_src1 = row_source(k_base, k_rows, stride_kt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
        v_src0, v_src1 = row_source(v_base, k_rows, stride_vt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
        for start_n in tl.range(0, k_len, BLOCK_N, warp_specialize=True):
            acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1,
                                                stride_kt, stride_vt, start_n, k_len, qk_scale, True, TMA, BLOCK_N,
                                                HEAD_DIM, D0, D1, DOT_PREC)
        return acc0, acc1, m_i, l_i
    return _attend_keys(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt, k_len, qk_scale, TMA,
                        BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)


@triton.jit
def _attend_keys(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_kt, stride_vt, k_len, qk_scale,
                 TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                 D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """The online-softmax state carried over ``k_len`` more keys from ``k_base``: full tiles, then the tail."""
    # Descriptors need at least one row; with k_len == 0 (cross-attention) the loop never loads through them.
    k_rows = tl.maximum(k_len, 1)
    k_src0, k_src1 = row_source(k_base, k_rows, stride_kt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    v_src0, v_src1 = row_source(v_base, k_rows, stride_vt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    n_full = (k_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1,
                                            stride_kt, stride_vt, start_n, k_len, qk_scale, False, TMA, BLOCK_N,
                                            HEAD_DIM, D0, D1, DOT_PREC)
    if n_full < k_len:
        acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1,
                                            stride_kt, stride_vt, n_full, k_len, qk_scale, True, TMA, BLOCK_N,
                                            HEAD_DIM, D0, D1, DOT_PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _attend_runs(q0, q1, k, v, hk, table, CU, n_seqs, h, b, tile, qk_scale, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Tile-sparse self keys: the same online softmax, carried over the key runs sparse.run lists (``table``:
    the kernel's sparse table; ``k``, ``v``: views)."""
    acc0, acc1 = zeros_tile(BLOCK_M, D0, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(sparse.run_count(table, n_seqs, h, tile)):
        first, k_len = sparse.run(table, CU, n_seqs, h, b, tile, j)
        first = first.to(tl.int64)
        acc0, acc1, m_i, l_i = _attend_keys(acc0, acc1, m_i, l_i, q0, q1, head_rows(k, first, hk),
                                            head_rows(v, first, hk), k[1], v[1], k_len, qk_scale, False, BLOCK_N,
                                            HEAD_DIM, D0, D1, DOT_PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _attend_listed(q0, q1, k_base, v_base, stride_kt, stride_vt, k_len, first_key, table, CU, n_seqs, h, b, tile,
                   qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                   D1: tl.constexpr, DOT_PREC: tl.constexpr, WS: tl.constexpr):
    """Tile-sparse self keys through tensor descriptors: ONE loop over the program's key blocks (sparse.flat_block:
    its listed tiles in chunks of BLOCK_N keys, a partial tile's masked in the loop, then the rest: the placeholder
    run, or the whole sample for a placeholder program). The K and V descriptors are built once, at the sample's
    first key ``first_key`` with its ``k_len`` keys as rows (rows past the sample zero-fill), and every block is
    addressed by its row offset in the sample, so one copy pipeline runs across the tiles (the pointer path,
    _attend_runs, restarts its cp.async pipeline at each run). WS: ``tl.range(..., warp_specialize=True)``,
    _attend's shape. A fully masked block (past a partial tile's end) follows the tile's first block, so the
    running max is finite there (qk_scale > 0: the launcher's condition for this path)."""
    acc0, acc1 = zeros_tile(BLOCK_M, D0, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_rows = tl.maximum(k_len, 1)
    k_src0, k_src1 = row_source(k_base, k_rows, stride_kt, True, BLOCK_N, HEAD_DIM, D0, D1)
    v_src0, v_src1 = row_source(v_base, k_rows, stride_vt, True, BLOCK_N, HEAD_DIM, D0, D1)
    count, entries = sparse.listed(table, n_seqs, h, tile)
    chunks, n_listed, r_first, r_len, n_blocks = sparse.flat_loop(table, CU, n_seqs, b, tile, count, k_len, BLOCK_N)
    for i in tl.range(0, n_blocks, warp_specialize=WS):
        first, rows = sparse.flat_block(table, entries, count, chunks, n_listed, r_first, r_len, i, BLOCK_N)
        off = (first - first_key).to(tl.int32)  # descriptor offsets are 32-bit
        acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1,
                                            stride_kt, stride_vt, off, off + rows, qk_scale, True, True, BLOCK_N,
                                            HEAD_DIM, D0, D1, DOT_PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _fwd_kernel(
    q, k, v, text_k, text_v, out,  # (pointer, token stride, head stride) of each (T, H, Dh) tensor (tiles.py)
    o_text, tanh_gate, lse, lse_text,  # o_text laid out as out; the LSEs fp32 (H, T)
    offsets,  # (cu_seqlens, text_cu_seqlens, cu_seqlens_k) as offsets.py repaired them
    sparse_table,  # (LISTS, n_tiles, list_heads, list_width, volume): a tile-sparse call's table (sparse.py)
    qk_scale, text_qk_scale, T, GROUP, n_seqs, bisect_steps,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TEXT: tl.constexpr, DOT_PREC: tl.constexpr,
    TMA_OK: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
    WS_OK: tl.constexpr = False, WS: tl.constexpr = False, SPARSE: tl.constexpr = False,
):
    # TMA_OK: the launcher found K and V fit tensor descriptors (16-byte aligned base and strides, sm_90+).
    # WS: the loops in the shape Triton warp-specializes (see _attend); q, keys, values, text keys and values
    # through descriptors, which WS_OK says the launcher found possible (sm_90, aligned tensors).
    tl.static_assert(TMA_OK or not TMA)
    tl.static_assert((TMA and WS_OK) or not WS)
    # SPARSE: tile-sparse self keys over a tile-major pack (sparse.py: sparse_table): pointer loads over the key
    # runs, or with TMA (and WS) descriptor loads in one loop over the listed key blocks (_attend_listed).
    q, k, v = aligned_view(q, VEC), aligned_view(k, VEC), aligned_view(v, VEC)
    text_k, text_v, out = aligned_view(text_k, VEC), aligned_view(text_v, VEC), aligned_view(out, VEC)
    OUT, stride_ot, stride_oh = out
    CU, TCU, KCU = offsets
    # One program per (query tile, head) over the tiles that hold tokens: grid (T // BLOCK_M + n_seqs, H).
    b, pid_m, tile, h, hk, start, seq_len, live = sparse.query_program(CU, n_seqs, GROUP, bisect_steps, sparse_table,
                                                                       SPARSE, WS, BLOCK_M)
    if not WS:  # noqa: SIM102 (a constexpr branch: a WS kernel must hold no return at all)
        if not live:
            return
    start = start.to(tl.int64)
    rows, m_mask, q0, q1, lse_off = query_tile(q, start, seq_len, pid_m, h, T, BLOCK_M, HEAD_DIM, D0, D1, WS)
    o_base = start * stride_ot + h * stride_oh  # of the tile in out and in o_text

    # The text branch runs first and parks its result in o_text (the backward needs it anyway), so nothing of it
    # stays live in registers during the long self loop (keeping it costs ~50-75 registers a thread at 128-row
    # tiles); it is read back for the final sum.
    if HAS_TEXT:
        t_start, t_len = segment(TCU, b)
        t_start = t_start.to(tl.int64)
        if WS:
            t_len = tl.where(live, t_len, 0)
        # (WS: text keys through descriptors in the same one-loop shape, else the pass splits no loop at all.)
        acc0, acc1, m_t, l_t = _attend(q0, q1, head_rows(text_k, t_start, hk), head_rows(text_v, t_start, hk),
                                       text_k[1], text_v[1], t_len, text_qk_scale, WS, BLOCK_M, BLOCK_N, HEAD_DIM,
                                       D0, D1, DOT_PREC, WS)
        # A sample without text tokens: l_t == 0 and acc == 0, so o_text is exactly 0 (never 0/0), and its text
        # LSE is -inf, which tells the backward's preprocess that no gate applies to these rows.
        has = l_t > 0
        l_safe = tl.where(has, l_t, 1.0)
        tl.store(lse_text + lse_off, tl.where(has, (m_t + tl.log2(l_safe)) * LN2, float("-inf")), mask=m_mask)
        store_tile(o_text + o_base, rows, m_mask, stride_ot, acc0 / l_safe[:, None], acc1 / l_safe[:, None],
                   HEAD_DIM, D0, D1)

    # Self keys: the sequence's own (KCU is CU) or, for cross-attention, the sample's keys by their offsets.
    k_start, k_len = segment(KCU, b)
    k_start = k_start.to(tl.int64)
    if WS:
        k_len = tl.where(live, k_len, 0)
    if SPARSE and TMA:
        acc0, acc1, m_i, l_i = _attend_listed(q0, q1, head_rows(k, k_start, hk), head_rows(v, k_start, hk), k[1], v[1],
                                              k_len, k_start, sparse_table, CU, n_seqs, h, b, tile, qk_scale, BLOCK_M,
                                              BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC, WS)
    elif SPARSE:
        acc0, acc1, m_i, l_i = _attend_runs(q0, q1, k, v, hk, sparse_table, CU, n_seqs, h, b, tile, qk_scale,
                                            BLOCK_M, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    else:
        acc0, acc1, m_i, l_i = _attend(q0, q1, head_rows(k, k_start, hk), head_rows(v, k_start, hk), k[1], v[1],
                                       k_len, qk_scale, TMA, BLOCK_M, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC, WS)
    # A sample without keys (cross-attention): l_i == 0 and acc == 0, so the self part is exactly 0 and its LSE
    # is -inf (m_i = -inf), which merges right by log-sum-exp.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(lse + lse_off, tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * LN2, float("-inf")), mask=m_mask)
    out0 = acc0 / l_safe[:, None]
    out1 = acc1 / l_safe[:, None]
    if HAS_TEXT:
        # Other threads of this program stored these elements: a CTA barrier makes their writes visible.
        tl.debug_barrier()
        # Nothing is added for a sample without text, whatever the gate (a NaN gate times o_text = 0 is NaN).
        tg = tl.where(t_len > 0, tl.load(tanh_gate + h), 0.0)
        ot0, ot1 = load_tile(o_text + o_base, rows, m_mask, stride_ot, BLOCK_M, HEAD_DIM, D0, D1)
        out0 = out0 + tg * ot0.to(tl.float32)
        if D1 > 0:
            out1 = out1 + tg * ot1.to(tl.float32)
    store_tile(OUT + o_base, rows, m_mask, stride_ot, out0, out1, HEAD_DIM, D0, D1)
