"""Gluon forward of the varlen attention for Hopper (sm_90): warp-specialized, persistent, TMA-fed.

NOT A DEFAULT. Gluon kernels never run under the interpreter and no GPU has run this one yet: the attention
autotuner offers it only on sm_90 devices with FLAGDIT_KERNELS_GLUON=1, and only after it matched the Triton
forward on the same inputs there (candidates.py); nothing Gluon becomes a default without a passing
GPU record (benchmarks/gpu_check.sh runs tests/test_smoke_gluon.py first; benchmarks/RESULTS.md). What is proven
without a GPU is that it compiles for sm_90 on Triton 3.6 and 3.9, with the structure the compile shows
(tests/test_attention_compile_structure.py; ``flagdit-bench compile-report --gluon``).

Same contract as ``_fwd_kernel`` (fwd.py): packed q ``(T, H, D)``, k/v ``(T, Hkv, D)`` split by
``cu_seqlens``, GQA by ``h // GROUP``, Lumina's gated text keys per sample; writes ``out``, ``o_text`` and the
natural-log LSEs ``(H, T)`` fp32 that the Triton backward reads.

Structure (one CTA per SM, 9 warps in three partitions of ``gl.warp_specialize``):
  * producer (1 warp, 24 registers): TMA loads of each work item's two Q tiles and of every K/V tile into a
    ``STAGES``-deep shared-memory ring, each slot guarded by mbarriers (K ready, V ready, slot free);
  * two consumers (4 warps each, one warpgroup, 240 registers): each owns 64 of the 128 query rows of a work item
    and runs the online softmax over the same K/V slots (a slot is free once both consumers are done with it).
    Within a consumer (FA3's intra-warpgroup overlap), QK^T of tile j and PV of tile j-1 are issued together
    and the softmax of tile j runs while that PV is in flight (``warpgroup_mma_wait(1)``); between the
    consumers, ping-pong: they take turns issuing their wgmmas (an mbarrier token), so one's softmax runs under
    the other's matmuls. Only the first and last key tiles are masked, outside the loop;
  * the work items are (128-query tile, head) pairs over real tiles only (no program per empty tile): the
    launcher orders the sequences longest first (a device-side argsort, no host sync) and every CTA strides over
    the items, heads innermost, so heads sharing a KV head (GQA) read the same keys close together in time.
The text keys of a sample run through the same ring before its self keys, with their own softmax; ``o_text``
is written to memory (the backward reads it) and read back by the same threads for ``out = o_self +
tanh(gate[h]) * o_text`` (exactly 0 for a sample without text).

The output is rescaled lazily (FA4): a row keeps its running max until a tile raises it by more than 2^8
(RESCALE_THRESHOLD in log2 units), which is exact (acc, l and the LSE share the stale max, which cancels in
acc / l; P stays <= 256), and a warp none of whose rows moved skips the accumulator products (_rescale: a vote and
a warp-uniform branch in inline PTX, since Gluon's branches are uniform over the whole partition only).

Not here, against the FA3 plan of issue 22: the QK^T of tile j+1 is not
issued before the softmax of tile j (that order carries a wgmma in flight over the loop's back edge, and ptxas
then serializes every wgmma of the kernel: its C7514 note); head dims that are not powers of two (72, 96) are
not offered (Gluon register tensors are powers of two, so D72 cannot run as one 80-wide product here); 128-key
tiles (they spill).

A key tile past the end of a key range is read from the next sequence's rows (TMA zero-fills only past the end of
the whole tensor): its scores are masked and its P columns zeroed, and its V is copied, rows past the range
zeroed, into a tile of the consumer's own before the PV product (_clean_tail, once per key range, outside the
loop), so a non-finite value in a neighbour's keys or values never reaches this sequence's results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Triton 3.6 names the TMA load async_copy_global_to_shared; 3.9 renamed it async_load (the old name raises).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# A barrier of the calling partition's warps (a named barrier inside gl.warp_specialize): 3.6 names it
# thread_barrier, 3.9 barrier.
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

LN2 = gl.constexpr(0.6931471805599453)
# Query rows of a work item: two consumers of 64 rows (the wgmma M of one warpgroup).
BLOCK_M = 128
# Registers a thread of each worker partition asks for (setmaxnreg): the producer only issues copies.
PRODUCER_REGS = gl.constexpr(24)
CONSUMER_REGS = gl.constexpr(240)
# log2 of the factor a row's max may grow by before its output is rescaled (FA4's lazy rescale): P <= 256.
RESCALE_THRESHOLD = gl.constexpr(8.0)


@gluon.jit
def _work_item(w, H, ORDER, TILE_CUM, CU, n_seqs, BLOCK_M: gl.constexpr):
    """(sequence b, query tile m, head h, sequence start, length) of work item ``w``: items are (tile, head)
    with heads innermost, the tiles of the sequences in ORDER (longest first) numbered by TILE_CUM (their prefix
    sums of cdiv(len, BLOCK_M)); the sequence is the last position i with TILE_CUM[i] <= tile, by bisection."""
    t = w // H
    h = w % H
    lo = 0
    hi = n_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if gl.load(TILE_CUM + mid) <= t:
            lo = mid
        else:
            hi = mid
    b = gl.load(ORDER + lo)
    start = gl.load(CU + b)
    return b, t - gl.load(TILE_CUM + lo), h, start, gl.load(CU + b + 1) - start


# ----------------------------------------------------------------------------------------------------------------
# Producer: one warp issuing TMA copies
# ----------------------------------------------------------------------------------------------------------------


@gluon.jit
def _produce_keys(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, kv_free, row0, col, n_keys, it,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Copies cdiv(n_keys, BLOCK_N) K and V tiles (rows from row0, columns col..col+D) into the ring from slot
    counter ``it`` on; returns the counter after them."""
    for j in range(gl.cdiv(n_keys, BLOCK_N)):
        slot = it % STAGES
        # Wait for both consumers to release the slot (a fresh barrier passes the first wait at parity 1).
        mbarrier.wait(kv_free.index(slot), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        _tma_load(k_desc, [row0 + j * BLOCK_N, col], k_ready.index(slot), k_ring.index(slot))
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        _tma_load(v_desc, [row0 + j * BLOCK_N, col], v_ready.index(slot), v_ring.index(slot))
        it += 1
    return it


@gluon.jit
def _producer(q_desc, k_desc, v_desc, tk_desc, tv_desc, q_smem, k_ring, v_ring, q_ready, q_free, k_ready, v_ready,
              kv_free, ORDER, TILE_CUM, CU, TCU, H, GROUP, n_seqs, n_items,
              HEAD_DIM: gl.constexpr, HAS_TEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):  # fmt: skip
    ROWS: gl.constexpr = BLOCK_M // 2
    it = 0
    n_done = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        if w < gl.load(TILE_CUM + n_seqs) * H:
            b, m, h, start, seq_len = _work_item(w, H, ORDER, TILE_CUM, CU, n_seqs, BLOCK_M)
            kv_col = (h // GROUP) * HEAD_DIM
            for c in gl.static_range(2):
                mbarrier.wait(q_free.index(c), (n_done & 1) ^ 1)
                mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
                _tma_load(q_desc, [start + m * BLOCK_M + c * ROWS, h * HEAD_DIM], q_ready.index(c), q_smem.index(c))
            if HAS_TEXT:
                t_start = gl.load(TCU + b)
                it = _produce_keys(tk_desc, tv_desc, k_ring, v_ring, k_ready, v_ready, kv_free, t_start, kv_col,
                                   gl.load(TCU + b + 1) - t_start, it, BLOCK_N, STAGES)  # fmt: skip
            it = _produce_keys(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, kv_free, start, kv_col, seq_len, it,
                               BLOCK_N, STAGES)  # fmt: skip
            n_done += 1


# ----------------------------------------------------------------------------------------------------------------
# Consumers: one warpgroup each, 64 query rows
# ----------------------------------------------------------------------------------------------------------------


@gluon.jit
def _take_turn(turns, turn, C: gl.constexpr):
    """Waits until consumer ``C`` may issue its wgmmas (ping-pong: the two consumers take turns, so one issues
    its matmuls while the other runs its softmax); returns the turn counter after this one."""
    mbarrier.wait(turns.index(C), turn & 1)
    return turn + 1


@gluon.jit
def _pass_turn(turns, C: gl.constexpr):
    """Hands the turn to the other consumer once ``C``'s wgmmas are issued."""
    mbarrier.arrive(turns.index(1 - C), count=1)


@gluon.jit
def _keep(x):
    """x, through an empty inline asm whose output is tied to its input register: no instruction, but x's
    registers stay allocated up to here (for an operand an asynchronous wgmma may still be reading)."""
    return gl.inline_asm_elementwise("", "=r,0", [x], dtype=x.dtype, is_pure=False, pack=2)


@gluon.constexpr_function
def _rescale_asm(n):
    """PTX multiplying a thread's ``n`` accumulator elements by their rows' alpha, skipped by a warp-uniform
    branch when no row of the warp has alpha != 1. Operands: $0..$n-1 the outputs (tied to the inputs
    $n..$2n-1), $2n..$3n-1 each element's alpha. Elements 0 and 2 hold the thread's two rows: in the wgmma
    accumulator layout (64 rows over 4 warps) register bit 0 steps one column, bit 1 eight rows."""
    a = 2 * n
    products = "\n".join(f"mul.f32 ${i}, ${i}, ${a + i};" for i in range(n))
    return (
        "{\n.reg .pred %lazy_row, %lazy_warp;\n"
        f"setp.neu.f32 %lazy_row, ${a}, 0f3F800000;\n"
        f"setp.neu.or.f32 %lazy_row, ${a + 2}, 0f3F800000, %lazy_row;\n"
        "vote.sync.any.pred %lazy_warp, %lazy_row, -1;\n"
        "@!%lazy_warp bra.uni lazy_rescale_done_${:uid};\n"
        f"{products}\n"
        "lazy_rescale_done_${:uid}:\n}"
    )


@gluon.constexpr_function
def _rescale_constraints(n):
    return ",".join(["=f"] * n + [str(i) for i in range(n)] + ["f"] * n)


@gluon.jit
def _rescale(acc, alpha):
    """acc * alpha[:, None] for one warpgroup's (64, HEAD_DIM) accumulator, a warp at a time: a warp none of whose
    16 rows has alpha != 1 (the lazy rescale keeps the max of most rows) skips the products."""
    N: gl.constexpr = acc.shape[0] * acc.shape[1] // 128  # elements per thread
    gl.static_assert(acc.shape[0] == 64)
    a, acc = gl.broadcast(gl.expand_dims(alpha, 1), acc)
    return gl.inline_asm_elementwise(_rescale_asm(N), _rescale_constraints(N), [acc, a], dtype=gl.float32,
                                     is_pure=True, pack=N)  # fmt: skip


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, n_valid, MASK: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax update of one score tile (log2 units, scale folded into one FMA per score): returns
    (p, alpha, m_new, l_new). Only the last tile of a key range is MASKed (keys at or past ``n_valid``)."""
    if MASK:
        cols = gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < n_valid, 0), s, float("-inf"))
    # Every tile holds at least one real key, so the grown max is finite. Lazy rescale: a row keeps its stale max
    # unless the new one exceeds it by more than RESCALE_THRESHOLD (the first tile always moves it off -inf), so
    # alpha is exactly 1 for most rows and tiles and _rescale skips them. Exact: p <= 2^RESCALE_THRESHOLD, and
    # acc, l and the LSE all use the same max, which cancels in acc / l.
    m_grown = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_new = gl.where(m_grown - m_i > RESCALE_THRESHOLD, m_grown, m_i)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(gl.fma(s, qk_scale, -gl.expand_dims(m_new, 1)))
    if MASK:
        p = gl.where(gl.expand_dims(cols < n_valid, 0), p, 0.0)  # -inf * 0 is NaN with a zero scale
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _issue_qk(q, k_ring, k_ready, it, dead, STAGES: gl.constexpr):
    """Waits for K tile ``it`` and issues S = Q K^T asynchronously into the registers of ``dead`` (a tile whose
    values are no longer needed: use_acc=False ignores them)."""
    slot = it % STAGES
    mbarrier.wait(k_ready.index(slot), (it // STAGES) & 1)
    return warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), dead, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(acc, p16, v_ring, v_ready, it, STAGES: gl.constexpr):
    """Waits for V tile ``it`` and issues acc += P V asynchronously (``p16``: P in the dot-operand layout, which
    must stay live until the wgmma retires)."""
    slot = it % STAGES
    mbarrier.wait(v_ready.index(slot), (it // STAGES) & 1)
    return warpgroup_mma(p16, v_ring.index(slot), acc, is_async=True)


@gluon.jit
def _clean_tail(v_ring, v_ready, v_tail, it, n_valid, STAGES: gl.constexpr):
    """``v_tail``, holding V tile ``it`` with its rows at or past ``n_valid`` zeroed: a key tile that runs past
    the end of its key range was read from the next sequence's rows (TMA zero-fills only past the end of the
    tensor), and a non-finite value there would give 0 * inf = NaN in the PV product even with P zero there.
    ``v_tail`` belongs to this consumer; the PV that read it last was waited for before."""
    BLOCK_N: gl.constexpr = v_tail.shape[0]
    HEAD_DIM: gl.constexpr = v_tail.shape[1]
    # 16-byte rows of 8 elements per thread; one warpgroup (4 warps) covers the tile.
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
    slot = it % STAGES
    mbarrier.wait(v_ready.index(slot), (it // STAGES) & 1)
    v = v_ring.index(slot).load(layout)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    v = gl.where(gl.expand_dims(rows < n_valid, 1), v, gl.zeros_like(v))
    _partition_barrier()  # every warp of this consumer is past the wgmma that read v_tail before
    v_tail.store(v)
    fence_async_shared()  # the generic-proxy stores before the wgmma's async-proxy reads
    _partition_barrier()  # the whole tile is written before any warp issues the wgmma
    return v_tail


@gluon.jit
def _step(acc, m_i, l_i, p, q, k_ring, v_ring, k_ready, v_ready, kv_free, turns, turn, it, n_valid, qk_scale,
          C: gl.constexpr, MASK: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr,
          orow_layout: gl.constexpr):  # fmt: skip
    """One key tile ``it`` (FA3's intra-warpgroup overlap): QK^T of this tile and PV of the previous one (its P
    in ``p``) are issued together; the wait for the scores leaves the PV in flight, so this tile's softmax runs
    under it; then the PV is waited for, its slot released, and acc rescaled. The two wgmmas are issued in
    consumer ``C``'s turn (_take_turn). Returns (acc, m_i, l_i, p, turn)."""
    p16 = gl.convert_layout(p.to(v_ring.dtype), p_layout)
    turn = _take_turn(turns, turn, C)
    s = _issue_qk(q, k_ring, k_ready, it, p, STAGES)  # p is dead now: its registers take the scores
    acc = _issue_pv(acc, p16, v_ring, v_ready, it - 1, STAGES)
    _pass_turn(turns, C)
    s = warpgroup_mma_wait(1, deps=[s])
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, n_valid, MASK, s_layout)
    acc = warpgroup_mma_wait(0, deps=[acc])
    p16 = _keep(p16)
    mbarrier.arrive(kv_free.index((it + STAGES - 1) % STAGES), count=1)
    acc = _rescale(acc, gl.convert_layout(alpha, orow_layout))
    return acc, m_i, l_i, p, turn


@gluon.jit
def _consume_keys(q, k_ring, v_ring, v_tail, k_ready, v_ready, kv_free, turns, turn, n_keys, qk_scale, it,
                  C: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Online softmax of the Q tile ``q`` (shared memory) over cdiv(n_keys, BLOCK_N) >= 1 ring slots from ``it``:
    returns (acc, m_i, l_i, it, turn). Each tile after the first is a _step: the softmax of tile j runs while the PV
    wgmma of tile j-1 is in flight (a wait with one group outstanding).

    Written for ptxas, which serializes every wgmma of the kernel when it cannot prove that no other instruction
    touches the registers of one in flight: nothing is in flight across a loop back edge (ptxas loses the order
    of groups there: issuing QK^T of tile j+1 before the softmax of tile j, with the PV of j-1 carried over the
    back edge, is serialized whole, C7514); the QK^T accumulator takes the registers of the previous tile's fp32
    P (dead once converted for its PV) instead of a zero fill; each P operand is kept live (_keep) until the wait
    that retires its PV.
    Only the first tile (it may be the only one) and the last are masked, outside the loop."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    n_tiles = gl.cdiv(n_keys, BLOCK_N)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
    p = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    # Tile 0 (masked: it may be the only one, and holds fewer than BLOCK_N keys then).
    turn = _take_turn(turns, turn, C)
    s = _issue_qk(q, k_ring, k_ready, it, p, STAGES)
    _pass_turn(turns, C)
    s = warpgroup_mma_wait(0, deps=[s])
    p, _, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, n_keys, True, s_layout)  # acc is 0: no rescale
    for j in range(1, n_tiles - 1):
        acc, m_i, l_i, p, turn = _step(acc, m_i, l_i, p, q, k_ring, v_ring, k_ready, v_ready, kv_free, turns, turn,
                                       it + j, BLOCK_N, qk_scale, C, False, STAGES, s_layout, p_layout,
                                       orow_layout)  # fmt: skip
    if n_tiles > 1:
        acc, m_i, l_i, p, turn = _step(acc, m_i, l_i, p, q, k_ring, v_ring, k_ready, v_ready, kv_free, turns, turn,
                                       it + n_tiles - 1, n_keys - (n_tiles - 1) * BLOCK_N, qk_scale, C, True, STAGES,
                                       s_layout, p_layout, orow_layout)  # fmt: skip
    # The PV of the last tile, from a copy of its V without the rows past the key range.
    last = it + n_tiles - 1
    p16 = gl.convert_layout(p.to(v_ring.dtype), p_layout)
    v_last = _clean_tail(v_ring, v_ready, v_tail.index(C), last, n_keys - (n_tiles - 1) * BLOCK_N, STAGES)
    turn = _take_turn(turns, turn, C)
    acc = warpgroup_mma(p16, v_last, acc, is_async=True)
    _pass_turn(turns, C)
    acc = warpgroup_mma_wait(0, deps=[acc])
    p16 = _keep(p16)
    mbarrier.arrive(kv_free.index(last % STAGES), count=1)
    return acc, gl.convert_layout(m_i, orow_layout), gl.convert_layout(l_i, orow_layout), last + 1, turn


@gluon.jit
def _consumer(c: gl.constexpr, q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns,
              TGATE, OUT, OTEXT, LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items,
              stride_ot, stride_oh,
              HEAD_DIM: gl.constexpr, HAS_TEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Consumer ``c`` (0: the default partition, 1: a worker): rows c*64 .. c*64+63 of every work item."""
    ROWS: gl.constexpr = BLOCK_M // 2
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)
    dtype: gl.constexpr = k_ring.dtype
    it = 0
    n_done = 0
    turn = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        if w < gl.load(TILE_CUM + n_seqs) * H:
            b, m, h, start, seq_len = _work_item(w, H, ORDER, TILE_CUM, CU, n_seqs, BLOCK_M)
            q = q_smem.index(c)
            mbarrier.wait(q_ready.index(c), n_done & 1)
            local = m * BLOCK_M + c * ROWS + gl.arange(0, ROWS, layout=orow_layout)
            row_ok = local < seq_len
            rows = (start + local).to(gl.int64)
            o_offs = gl.expand_dims(rows * stride_ot + h * stride_oh, 1) + gl.expand_dims(
                gl.arange(0, HEAD_DIM, layout=ocol_layout), 0
            )
            o_mask = gl.expand_dims(row_ok, 1)
            lse_offs = h.to(gl.int64) * T + rows
            if HAS_TEXT:
                t_len = gl.load(TCU + b + 1) - gl.load(TCU + b)
                o_t = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
                # -inf marks rows without text for the Triton backward, which then applies no gate there.
                lse_t = gl.full([ROWS], float("-inf"), gl.float32, layout=orow_layout)
                if t_len > 0:
                    acc_t, m_t, l_t, it, turn = _consume_keys(q, k_ring, v_ring, v_tail, k_ready, v_ready, kv_free,
                                                              turns, turn, t_len, text_qk_scale, it, c, ROWS, BLOCK_N,
                                                              HEAD_DIM, STAGES, num_warps)  # fmt: skip
                    o_t = acc_t / gl.expand_dims(l_t, 1)
                    lse_t = (m_t + gl.log2(l_t)) * LN2
                # Parked in memory (the backward reads it) and read back below by these same threads.
                gl.store(OTEXT + o_offs, o_t.to(dtype), mask=o_mask)
                gl.store(LSE_T + lse_offs, lse_t, mask=row_ok)
            acc, m_i, l_i, it, turn = _consume_keys(q, k_ring, v_ring, v_tail, k_ready, v_ready, kv_free, turns, turn,
                                                    seq_len, qk_scale, it, c, ROWS, BLOCK_N, HEAD_DIM, STAGES,
                                                    num_warps)  # fmt: skip
            # Every QK^T of this item is done: the producer may load the next Q tile.
            mbarrier.arrive(q_free.index(c), count=1)
            out = acc / gl.expand_dims(l_i, 1)
            gl.store(LSE + lse_offs, (m_i + gl.log2(l_i)) * LN2, mask=row_ok)
            if HAS_TEXT:
                # Nothing is added for a sample without text, whatever the gate (NaN * 0 would be NaN).
                gate = gl.where(t_len > 0, gl.load(TGATE + h), 0.0)
                out = out + gate * gl.load(OTEXT + o_offs, mask=o_mask, other=0.0).to(gl.float32)
            gl.store(OUT + o_offs, out.to(dtype), mask=o_mask)
            n_done += 1


@gluon.jit
def _consumer1(q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns, TGATE, OUT, OTEXT,
               LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items, stride_ot,
               stride_oh, HEAD_DIM: gl.constexpr, HAS_TEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr):  # fmt: skip
    _consumer(1, q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns, TGATE, OUT, OTEXT,
              LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items, stride_ot,
              stride_oh, HEAD_DIM, HAS_TEXT, BLOCK_M, BLOCK_N, STAGES, 4)  # fmt: skip


@gluon.jit
def _consumer0(q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns, TGATE, OUT, OTEXT,
               LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items, stride_ot,
               stride_oh, HEAD_DIM: gl.constexpr, HAS_TEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr):  # fmt: skip
    _consumer(0, q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns, TGATE, OUT, OTEXT,
              LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items, stride_ot,
              stride_oh, HEAD_DIM, HAS_TEXT, BLOCK_M, BLOCK_N, STAGES, 4)  # fmt: skip


@gluon.jit
def _gluon_fwd_kernel(
    q_desc, k_desc, v_desc, tk_desc, tv_desc, TGATE, OUT, OTEXT, LSE, LSE_T, ORDER, TILE_CUM, CU, TCU,
    qk_scale, text_qk_scale, T, H, GROUP, n_seqs, n_items, stride_ot, stride_oh,
    HEAD_DIM: gl.constexpr, HAS_TEXT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    BLOCK_M: gl.constexpr = 128
    # A consumer holds two slots at a time (the PV of tile j-1, the QK^T of tile j) and frees j-1 in that step.
    gl.static_assert(STAGES >= 2)
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M // 2, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    v_tail = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)  # one per consumer
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_free.index(i), count=1)
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_free.index(i), count=2)  # both consumers read every slot
    fence_async_shared()
    mbarrier.arrive(turns.index(0), count=1)  # consumer 0 issues first

    # The argument tuples are written out in the call: a tuple bound to a name first turns its constexprs into
    # runtime values.
    # fmt: off
    gl.warp_specialize(
        [
            (_consumer0, (q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns, TGATE, OUT,
                          OTEXT, LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items,
                          stride_ot, stride_oh, HEAD_DIM, HAS_TEXT, BLOCK_M, BLOCK_N, STAGES)),
            (_consumer1, (q_smem, k_ring, v_ring, v_tail, q_ready, q_free, k_ready, v_ready, kv_free, turns, TGATE, OUT,
                          OTEXT, LSE, LSE_T, ORDER, TILE_CUM, CU, TCU, qk_scale, text_qk_scale, T, H, n_seqs, n_items,
                          stride_ot, stride_oh, HEAD_DIM, HAS_TEXT, BLOCK_M, BLOCK_N, STAGES)),
            (_producer, (q_desc, k_desc, v_desc, tk_desc, tv_desc, q_smem, k_ring, v_ring, q_ready, q_free, k_ready,
                         v_ready, kv_free, ORDER, TILE_CUM, CU, TCU, H, GROUP, n_seqs, n_items, HEAD_DIM, HAS_TEXT,
                         BLOCK_M, BLOCK_N, STAGES)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

HEAD_DIMS = (64, 128)


def supported(q: torch.Tensor, *kv: torch.Tensor | None) -> bool:
    """Whether this kernel takes these (T, H, D) tensors: bf16/fp16, D in HEAD_DIMS, each tensor readable as a
    (T, H * D) matrix by TMA (head dim contiguous, heads adjacent, 16-byte aligned base and token stride)."""
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in HEAD_DIMS:
        return False
    return all(t is None or t.numel() == 0 or _as_matrix(t) is not None for t in (q, *kv))


def _as_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` (T, H, D) as a (T, H * D) view over the same memory, or None if TMA cannot read it so."""
    T, H, D = t.shape
    if t.stride(2) != 1 or (H > 1 and t.stride(1) != D) or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    return t.as_strided((T, H * D), (t.stride(0), 1))


def _descriptor(t: torch.Tensor, rows: int):
    m = _as_matrix(t)
    block = [rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(m, list(m.shape), list(m.stride()), block, layout)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@dataclass(frozen=True)
class GluonConfig:
    """A launch configuration of the Gluon forward: keys per tile and depth of the K/V ring."""

    block_n: int
    stages: int

    def __str__(self) -> str:
        return f"gluon {BLOCK_M}x{self.block_n}/ws(4+4+1)/s{self.stages}"


# Chosen from the sm_90 compile (no GPU has timed them): 64-key tiles, rings that fit 227 KB of shared memory
# with the two 64-row Q tiles. 128-key tiles spill in the consumers (scores, the previous P and the output
# accumulator live together: 40-1320 bytes on Triton 3.9, 0-168 on 3.6), so they are not offered.
CONFIGS = {64: [GluonConfig(64, 4), GluonConfig(64, 2)], 128: [GluonConfig(64, 3), GluonConfig(64, 2)]}


def schedule(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ORDER, TILE_CUM): the sequences longest first, and the prefix sums of their query tiles (int32, B + 1),
    computed on the device without a host sync; TILE_CUM[B] is the number of real tiles."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    order = torch.argsort(lens, descending=True, stable=True)
    tiles = (lens[order] + BLOCK_M - 1) // BLOCK_M
    cum = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=lens.device)
    cum[1:] = tiles.cumsum(0)
    return order.to(torch.int32), cum


def item_bound(T: int, batch: int, heads: int) -> int:
    """An upper bound on the work items (real query tiles x heads), known without a host sync: each sequence has
    at most one partial tile. A program past the real items (TILE_CUM[B] * heads) skips them at one load."""
    return (T // BLOCK_M + batch) * heads


def launch(
    config: GluonConfig,
    q,
    k,
    v,
    tk,
    tv,
    tg,
    out,
    ot,
    lse,
    lt,
    cu,
    tcu,
    qk_scale,
    text_qk_scale,
    T,
    group,
    batch,
    has_text: bool,
    programs: int,
) -> None:
    """One launch over the whole batch, arguments as ``_fwd_kernel``'s launcher passes them (tk/tv/tcu stand-ins
    without text); ``programs``: the persistent grid (the SM count)."""
    H, D = q.shape[1], q.shape[2]
    order, tile_cum = schedule(cu)
    n_items = item_bound(T, batch, H)
    _gluon_fwd_kernel[(max(1, min(programs, n_items)),)](
        _descriptor(q, BLOCK_M // 2), _descriptor(k, config.block_n), _descriptor(v, config.block_n),
        _descriptor(tk, config.block_n), _descriptor(tv, config.block_n), tg, out, ot, lse, lt, order, tile_cum,
        cu, tcu, qk_scale, text_qk_scale, T, H, group, batch, n_items, out.stride(0), out.stride(1),
        HEAD_DIM=D, HAS_TEXT=has_text, BLOCK_N=config.block_n, STAGES=config.stages, num_warps=4,
    )  # fmt: skip


def offer(tuned, grid, args: tuple, consts: dict, regime: dict, offered: list, reset) -> bool:
    """Runs this kernel for a launch of the Triton forward ``tuned`` (a TunedKernel of ``_fwd_kernel``; its
    arguments are read by the kernel's parameter names) if these tensors suit it and it was chosen for the regime
    (candidates.choose: verified against the Triton kernel on these inputs first); True if it ran."""
    from .. import _helpers
    from . import candidates as verification

    if "seq_k" in regime:  # cross-attention (keys packed by their own offsets): not implemented here
        return False
    a = dict(zip(tuned.fn.arg_names, args))
    has_text = bool(consts["HAS_TEXT"])
    # (T, H, Dh) tensors come as (tensor, token stride, head stride) views; this kernel reads them whole.
    q, k, v, tk, tv, out = (a[name][0] for name in ("q", "k", "v", "text_k", "text_v", "out"))
    if not supported(q, k, v, tk, tv):
        return False
    programs = _helpers.device_limits(q.device)[0]
    cu, tcu, _ = a["offsets"]

    def run(config: GluonConfig) -> None:
        launch(config, q, k, v, tk, tv, a["tanh_gate"], out, a["o_text"], a["lse"], a["lse_text"], cu, tcu,
               a["qk_scale"], a["text_qk_scale"], a["T"], a["GROUP"], a["n_seqs"], has_text, programs)  # fmt: skip

    def reference() -> None:
        tile = tuned._tuned(grid, args, consts, regime, offered, reset)
        reset()
        tuned._run(tile, grid, args, consts)

    candidates = {str(c): (lambda c=c: run(c)) for c in CONFIGS[q.shape[-1]]}
    outputs = [out, a["lse"]] + ([a["o_text"], a["lse_text"]] if has_text else [])
    key = "gluon forward " + tuned.key(consts, regime)
    choice = verification.choose(key, reference, candidates, outputs, verification.TOLERANCE[q.dtype])
    if choice == verification.TRITON:
        return False
    candidates[choice]()
    return True
