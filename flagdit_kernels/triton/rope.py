"""Rotary embedding kernels: ``apply_rope`` and fused QK-norm + RoPE + cast (forward and backward).

Layout shared by every kernel in this file:

- x is viewed as ``(B, L, H, Dh)`` with arbitrary strides (a packed ``(T, H, Dh)`` input is B=1, L=T), so q/k
  sliced from a fused QKV projection are read in place, without a hidden ``.contiguous()``. Even the last
  dim may be strided (Triton specializes a unit stride, so the common case costs nothing). Kernels take such
  a view as one ``(pointer, stride_b, stride_l, stride_h, stride_d)`` tuple. Outputs and input gradients are
  freshly allocated and contiguous.
- freqs holds float32 (cos, sin) per token and rotary pair: ``(L, Dh/2, 2)`` shared by the batch (batch
  stride 0) or ``(B, L, Dh/2, 2)``; any per-token rows work, which is what packed varlen sequences need.
  Kernels take it as ``(pointer, stride_b, stride_l)``.
- Programs work on pair tiles ``(BLOCK_H, BLOCK_P)``: column p holds the first (x0) and second (x1) member
  of rotary pair p of each head. Pairs are adjacent ``(2p, 2p+1)`` (interleaved: Lumina's complex multiply;
  loaded as contiguous rows and split in registers) or halves ``(p, p + Dh/2)`` (rotate-half: Llama/HF;
  two contiguous loads). Every element is read once, with vectorized loads. BLOCK_P is Dh/2 rounded up to a
  power of two; masks cover head dims such as 48, 72, 120 (HALF = Dh/2 is a compile-time constant, so the
  masks are too).
- Alignment: head rows of a fused projection sit at strides such as 72 elements, which the JIT cannot tell
  from any other stride not divisible by 16; when the host has checked that every row of every view starts on
  a 16-byte boundary (``ALIGNED``), the kernels say so with ``tl.multiple_of`` and load 16-byte vectors.
- Math in fp32; stores cast to the output's dtype. The rotation by -angle (the transpose, used for the
  backward pass) is the same kernel with sin negated.
- qk_norm_rope grids are persistent: (token chunks, head blocks) with as many programs as the GPU holds at once
  for the compiled variant (``_helpers.persistent_grid``), each walking one chunk of tokens with its norm
  weights (and, backward, its weight-gradient partial sums) in registers and the next token's rows in flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import (
    NORM_LAYER,
    NORM_NONE,
    NORM_RMS,
    centered,
    norm_input_grad,
    num_warps,
    persistent_grid,
    rotate_pairs,
    whole_vectors,
)

# Norm codes (constexpr NORM in the kernels, shared with the norm family: triton/_helpers.py).
NORM_CODES = {None: NORM_NONE, "none": NORM_NONE, "layer_norm": NORM_LAYER, "rms_norm": NORM_RMS}

# apply_rope: rotary pairs per program (x 2 elements); one program handles heads of one token. 2048 pairs =
# one H32 Dh128 token row: big enough to amortize the freqs load and index math, small enough for registers.
ROPE_TILE_PAIRS = 2048
# qk_norm_rope, per-head or no norm: pairs per program when heads are split into blocks.
QK_TILE_PAIRS = 2048
# LayerNorm across heads needs a whole padded token row (H x BLOCK_P pairs) in one program's registers.
# 8192 pairs (16384 fp32 values) is about the most 16 warps hold without spilling badly (H64 Dh256).
MAX_ROW_PAIRS = 8192
# qk_norm_rope programs prefetch the next token's rows (cp.async) while they normalize the current one.
QK_STAGES = tl.constexpr(2)
# Under the CPU interpreter: a few programs, so chunking and partial sums are still exercised.
INTERPRETER_PROGRAMS = 3


@triton.jit
def _rows(view, b, l, h, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """(heads, 1) pointers to the start of heads ``h`` of token (b, l) of a ``(ptr, s_b, s_l, s_h, s_d)``
    view, and its element stride along Dh."""
    ptr, s_b, s_l, s_h, s_d = view
    if ALIGNED:
        s_b, s_l, s_h = whole_vectors(s_b, VEC), whole_vectors(s_l, VEC), whole_vectors(s_h, VEC)
    return ptr + b * s_b + l * s_l + (h * s_h)[:, None], s_d


@triton.jit
def _load_pairs(view, b, l, h, row_mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr,
                ALIGNED: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """fp32 pair tiles (x0, x1), each (heads, BLOCK_P), of heads ``h`` of token (b, l) of a view.

    Interleaved pairs are loaded as one contiguous row segment and split in registers, so loads stay
    vectorized (a stride-2 gather would issue one 2-byte load per element); halves are two contiguous loads.
    """
    row_ptrs, col_stride = _rows(view, b, l, h, ALIGNED, VEC)
    return _load_pair_rows(row_ptrs, col_stride, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _load_pair_rows(row_ptrs, col_stride, row_mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                    BLOCK_P: tl.constexpr):  # fmt: skip
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_P)
        x = tl.load(row_ptrs + (d * col_stride)[None, :], mask=row_mask & (d < 2 * HALF)[None, :], other=0.0)
        x = tl.reshape(x.to(tl.float32), (x.shape[0], BLOCK_P, 2))
        x0, x1 = tl.split(x)
    else:
        p = tl.arange(0, BLOCK_P)
        mask = row_mask & (p < HALF)[None, :]
        x0 = tl.load(row_ptrs + (p * col_stride)[None, :], mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(row_ptrs + ((p + HALF) * col_stride)[None, :], mask=mask, other=0.0).to(tl.float32)
    return x0, x1


@triton.jit
def _store_pairs(row_ptrs, y0, y1, row_mask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stores pair tiles (rows, BLOCK_P) into unit-stride rows starting at ``row_ptrs`` (rows, 1), cast to
    the destination's dtype."""
    dtype = row_ptrs.dtype.element_ty
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_P)
        y = tl.reshape(tl.join(y0, y1), (y0.shape[0], 2 * BLOCK_P))
        tl.store(row_ptrs + d[None, :], y.to(dtype), mask=row_mask & (d < 2 * HALF)[None, :])
    else:
        p = tl.arange(0, BLOCK_P)
        mask = row_mask & (p < HALF)[None, :]
        tl.store(row_ptrs + p[None, :], y0.to(dtype), mask=mask)
        tl.store(row_ptrs + (p + HALF)[None, :], y1.to(dtype), mask=mask)


@triton.jit
def _load_cos_sin(freqs, b, l, HALF: tl.constexpr, BLOCK_P: tl.constexpr, ALIGNED: tl.constexpr):
    """(cos, sin) of token (b, l) as (1, BLOCK_P) fp32 rows; padding pairs read 0 (their data is masked)."""
    f_ptr, s_b, s_l = freqs
    if ALIGNED:  # fp32 rows on 16-byte boundaries: 4 values a vector
        s_b, s_l = whole_vectors(s_b, 4), whole_vectors(s_l, 4)
    d = tl.arange(0, 2 * BLOCK_P)
    f = tl.load(f_ptr + b * s_b + l * s_l + d, mask=d < 2 * HALF, other=0.0)
    cos, sin = tl.split(tl.reshape(f, (BLOCK_P, 2)))
    return cos[None, :], sin[None, :]


@triton.jit
def _head_masks(h, H, HALF: tl.constexpr, BLOCK_P: tl.constexpr):
    """(row_mask, mask): real heads (BLOCK_H, 1), and real heads x real pairs (BLOCK_H, BLOCK_P)."""
    row_mask = (h < H)[:, None]
    return row_mask, row_mask & (tl.arange(0, BLOCK_P) < HALF)[None, :]


@triton.jit
def _rope_kernel(
    x,  # (ptr, s_b, s_l, s_h, s_d) view of (B, L, H, Dh)
    freqs,  # (ptr, s_b, s_l)
    out_ptr,  # contiguous (B, L, H, Dh)
    L,
    H,
    HALF: tl.constexpr,
    INVERSE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out = rotate(x) for one token and BLOCK_H heads; INVERSE rotates by -angle. Grid (tokens, head blocks)."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // L
    l = tok % L
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = (h < H)[:, None]
    cos, sin = _load_cos_sin(freqs, b, l, HALF, BLOCK_P, ALIGNED)
    if INVERSE:
        sin = -sin
    x0, x1 = _load_pairs(x, b, l, h, row_mask, HALF, INTERLEAVED, BLOCK_P, ALIGNED, VEC)
    y0, y1 = rotate_pairs(x0, x1, cos, sin)
    o_rows = out_ptr + tok * (H * 2 * HALF) + (h * 2 * HALF)[:, None]
    _store_pairs(o_rows, y0, y1, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _load_params(ptr, h, row_mask, HALF: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_P: tl.constexpr):  # fmt: skip
    """A norm parameter as (BLOCK_H, BLOCK_P) fp32 pair tiles: LayerNorm's span the row (H*Dh), RMSNorm's
    one head (Dh, the same for every head)."""
    if NORM == NORM_LAYER:
        rows = ptr + (h * 2 * HALF)[:, None]
    else:
        rows = ptr + (h * 0)[:, None]
    return _load_pair_rows(rows, 1, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _normalize(x0, x1, mask, n_row, D, eps, NORM: tl.constexpr):
    """(xhat0, xhat1, rstd): LayerNorm over the whole tile (n_row real values) or RMSNorm per head (row)."""
    if NORM == NORM_LAYER:
        mean = tl.sum(tl.sum(x0 + x1, axis=1), axis=0) / n_row
        xc0, xc1 = centered(x0, mean, mask, NORM), centered(x1, mean, mask, NORM)
        rstd = tl.rsqrt(tl.sum(tl.sum(xc0 * xc0 + xc1 * xc1, axis=1), axis=0) / n_row + eps)
        return xc0 * rstd, xc1 * rstd, rstd
    else:
        # Masked (padding) heads and pairs hold zeros, so they add nothing to the per-head sums.
        rstd = tl.rsqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)[:, None]
        return x0 * rstd, x1 * rstd, rstd


@triton.jit
def _qk_fwd_rows(
    x,  # (ptr, s_b, s_l, s_h, s_d) view of q or k
    out_ptr,
    w_ptr,
    bias_ptr,
    freqs,
    start,
    end,
    L,
    H,
    h0,
    eps,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Norm + RoPE + cast for tokens [start, end) of one tensor (q or k), heads [h0, h0 + BLOCK_H)."""
    h = h0 + tl.arange(0, BLOCK_H)
    D = 2 * HALF
    row_mask, mask = _head_masks(h, H, HALF, BLOCK_P)
    # Parameters stay in registers across the token loop.
    if HAS_W:
        w0, w1 = _load_params(w_ptr, h, row_mask, HALF, NORM, INTERLEAVED, BLOCK_P)
    if HAS_B:
        b0, b1 = _load_params(bias_ptr, h, row_mask, HALF, NORM, INTERLEAVED, BLOCK_P)
    for t in tl.range(start, end, num_stages=QK_STAGES):
        bi = t // L
        li = t % L
        x0, x1 = _load_pairs(x, bi, li, h, row_mask, HALF, INTERLEAVED, BLOCK_P, ALIGNED, VEC)
        cos, sin = _load_cos_sin(freqs, bi, li, HALF, BLOCK_P, ALIGNED)
        if NORM != NORM_NONE:
            x0, x1, _ = _normalize(x0, x1, mask, H * D, D, eps, NORM)
        if HAS_W:
            x0 = x0 * w0
            x1 = x1 * w1
        if HAS_B:
            x0 = x0 + b0
            x1 = x1 + b1
        y0, y1 = rotate_pairs(x0, x1, cos, sin)
        _store_pairs(out_ptr + t * (H * D) + (h * D)[:, None], y0, y1, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit(do_not_specialize=["tokens_per_prog"])
def _qk_norm_rope_fwd_kernel(
    q,  # (ptr, s_b, s_l, s_h, s_d) views
    k,
    freqs,  # (ptr, s_b, s_l)
    qo_ptr,
    ko_ptr,
    qw_ptr,
    qb_ptr,
    kw_ptr,
    kb_ptr,
    n_tokens,
    tokens_per_prog,
    L,
    HQ,
    HK,
    NQB,
    eps,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_QB: tl.constexpr,
    HAS_KW: tl.constexpr,
    HAS_KB: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Grid (token chunks, NQB q head blocks + k head blocks): q and k in one launch."""
    # int64 token indices: offsets of large activations overflow int32.
    start = tl.program_id(0).to(tl.int64) * tokens_per_prog
    end = tl.minimum(start + tokens_per_prog, n_tokens)
    blk = tl.program_id(1)
    if blk < NQB:
        _qk_fwd_rows(
            q, qo_ptr, qw_ptr, qb_ptr, freqs, start, end, L, HQ, blk * BLOCK_HQ, eps,
            HALF, NORM, HAS_QW, HAS_QB, INTERLEAVED, ALIGNED, VEC, BLOCK_HQ, BLOCK_P,
        )  # fmt: skip
    else:
        _qk_fwd_rows(
            k, ko_ptr, kw_ptr, kb_ptr, freqs, start, end, L, HK, (blk - NQB) * BLOCK_HK, eps,
            HALF, NORM, HAS_KW, HAS_KB, INTERLEAVED, ALIGNED, VEC, BLOCK_HK, BLOCK_P,
        )  # fmt: skip


@triton.jit
def _qk_bwd_rows(
    x,  # (ptr, s_b, s_l, s_h, s_d) view of the forward input
    dy,  # view of the output gradient
    dx_ptr,
    w_ptr,
    freqs,
    dw_ptr,
    db_ptr,
    part_row,
    start,
    end,
    L,
    H,
    h0,
    eps,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """dx for tokens [start, end) of one tensor, and this program's partial sums of dweight / dbias.

    With n = norm(x) * w + b and y = R n (R the rotation): dn = R^T dy, dw = sum dn * xhat, db = sum dn,
    and dx is the norm's backward of g = dn * w, with mean/rstd recomputed from x (nothing saved forward).
    """
    h = h0 + tl.arange(0, BLOCK_H)
    D = 2 * HALF
    row_mask, mask = _head_masks(h, H, HALF, BLOCK_P)
    if HAS_W:
        w0, w1 = _load_params(w_ptr, h, row_mask, HALF, NORM, INTERLEAVED, BLOCK_P)
    acc_w0 = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    acc_w1 = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    acc_b0 = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    acc_b1 = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    for t in tl.range(start, end, num_stages=QK_STAGES):
        bi = t // L
        li = t % L
        dy0, dy1 = _load_pairs(dy, bi, li, h, row_mask, HALF, INTERLEAVED, BLOCK_P, ALIGNED, VEC)
        cos, sin = _load_cos_sin(freqs, bi, li, HALF, BLOCK_P, ALIGNED)
        # Rotate the upstream gradient back by -angle (R^T).
        dn0, dn1 = rotate_pairs(dy0, dy1, cos, -sin)
        if NORM == NORM_NONE:
            dx0 = dn0
            dx1 = dn1
        else:
            x0, x1 = _load_pairs(x, bi, li, h, row_mask, HALF, INTERLEAVED, BLOCK_P, ALIGNED, VEC)
            xh0, xh1, rstd = _normalize(x0, x1, mask, H * D, D, eps, NORM)
            if HAS_W:
                acc_w0 += dn0 * xh0
                acc_w1 += dn1 * xh1
                g0 = dn0 * w0
                g1 = dn1 * w1
            else:
                g0 = dn0
                g1 = dn1
            if NORM == NORM_LAYER:
                n_row = H * D
                mean_g = tl.sum(tl.sum(g0 + g1, axis=1), axis=0) / n_row
                mean_gx = tl.sum(tl.sum(g0 * xh0 + g1 * xh1, axis=1), axis=0) / n_row
            else:
                mean_g = 0.0
                mean_gx = (tl.sum(g0 * xh0 + g1 * xh1, axis=1) / D)[:, None]
            dx0 = norm_input_grad(g0, xh0, rstd, mean_g, mean_gx, NORM)
            dx1 = norm_input_grad(g1, xh1, rstd, mean_g, mean_gx, NORM)
        if HAS_B:
            acc_b0 += dn0
            acc_b1 += dn1
        _store_pairs(dx_ptr + t * (H * D) + (h * D)[:, None], dx0, dx1, row_mask, HALF, INTERLEAVED, BLOCK_P)

    if HAS_W:
        _store_param_partials(dw_ptr, acc_w0, acc_w1, part_row, h, row_mask, H, HALF, NORM, INTERLEAVED, BLOCK_P)
    if HAS_B:
        _store_param_partials(db_ptr, acc_b0, acc_b1, part_row, h, row_mask, H, HALF, NORM, INTERLEAVED, BLOCK_P)


@triton.jit
def _store_param_partials(
    ptr,
    acc0,
    acc1,
    part_row,
    h,
    row_mask,
    H,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Writes one program's partial sums of a norm parameter's gradient to partial row ``part_row``.

    LayerNorm params span the row: one partial row of H*Dh per program. RMSNorm params are shared by all heads,
    so the head block is reduced here and a partial row holds Dh values.
    """
    D = 2 * HALF
    if NORM == NORM_LAYER:
        _store_pairs(ptr + part_row * (H * D) + (h * D)[:, None], acc0, acc1, row_mask, HALF, INTERLEAVED, BLOCK_P)
    else:
        one_row = tl.full((1, 1), 1, tl.int1)
        zero = tl.zeros((1, 1), dtype=tl.int32)
        sum0 = tl.sum(acc0, axis=0, keep_dims=True)
        sum1 = tl.sum(acc1, axis=0, keep_dims=True)
        _store_pairs(ptr + part_row * D + zero, sum0, sum1, one_row, HALF, INTERLEAVED, BLOCK_P)


@triton.jit(do_not_specialize=["tokens_per_prog"])
def _qk_norm_rope_bwd_kernel(
    q,  # (ptr, s_b, s_l, s_h, s_d) views of the forward inputs and the output gradients
    k,
    dqo,
    dko,
    freqs,  # (ptr, s_b, s_l)
    dq_ptr,
    dk_ptr,
    qw_ptr,
    kw_ptr,
    dqw_ptr,
    dqb_ptr,
    dkw_ptr,
    dkb_ptr,
    n_tokens,
    tokens_per_prog,
    L,
    HQ,
    HK,
    NQB,
    NKB,
    eps,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_QB: tl.constexpr,
    HAS_KW: tl.constexpr,
    HAS_KB: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Grid (token chunks, NQB + NKB head blocks). Partial-sum rows are indexed (program, head block)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * tokens_per_prog
    end = tl.minimum(start + tokens_per_prog, n_tokens)
    blk = tl.program_id(1)
    if blk < NQB:
        _qk_bwd_rows(
            q, dqo, dq_ptr, qw_ptr, freqs, dqw_ptr, dqb_ptr, pid * NQB + blk, start, end, L, HQ, blk * BLOCK_HQ, eps,
            HALF, NORM, HAS_QW, HAS_QB, INTERLEAVED, ALIGNED, VEC, BLOCK_HQ, BLOCK_P,
        )  # fmt: skip
    else:
        kblk = blk - NQB
        _qk_bwd_rows(
            k, dko, dk_ptr, kw_ptr, freqs, dkw_ptr, dkb_ptr, pid * NKB + kblk, start, end, L, HK, kblk * BLOCK_HK,
            eps, HALF, NORM, HAS_KW, HAS_KB, INTERLEAVED, ALIGNED, VEC, BLOCK_HK, BLOCK_P,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Launch helpers (shape bookkeeping only; validation lives in flagdit_kernels.ops.rope).


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """(T, H, Dh) -> a (1, T, H, Dh) view; (B, L, H, Dh) unchanged. Never copies."""
    return x.unsqueeze(0) if x.dim() == 3 else x


def _freqs_table(freqs: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The kernels' ``(pointer, stride_b, stride_l)`` of an fp32 table with contiguous (pair, cos/sin) dims;
    batch stride 0 when one (L, Dh/2, 2) table is shared by the batch. Copies only a table that is fp64 or
    oddly strided."""
    f = freqs.to(torch.float32)
    if f.stride(-1) != 1 or f.stride(-2) != 2:
        f = f.contiguous()
    if f.dim() == 3:
        return f, 0, f.stride(0)
    return f, f.stride(0), f.stride(1)


def _view(x4: torch.Tensor) -> tuple:
    """The kernels' ``(pointer, stride_b, stride_l, stride_h, stride_d)`` of a (B, L, H, Dh) view."""
    return (x4, *x4.stride())


def _aligned(views: list[tuple], freqs: tuple) -> bool:
    """Whether the kernels should tell the compiler that every head row of every view, and every freqs row,
    starts on a 16-byte boundary: true when they do (aligned base pointers, unit Dh stride, B / L / H strides in
    whole 16-byte vectors), unless every stride is a multiple of 16, which the JIT marks by itself (the extra
    marks then only cost registers)."""
    strides = []
    for t, *st in views:
        vec = 16 // t.element_size()
        if t.data_ptr() % 16 or st[3] != 1 or any(v % vec for v in st[:3]):
            return False
        strides += st[:3]
    f, *f_strides = freqs
    if f.data_ptr() % 16 or any(v % 4 for v in f_strides):
        return False
    return any(v % 16 for v in strides + f_strides)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool = True, inverse: bool = False) -> torch.Tensor:
    """Rotates x (``(T, H, Dh)`` or ``(B, L, H, Dh)``, any strides) by freqs; ``inverse`` rotates by -angle.

    Returns a new contiguous tensor in x's dtype.
    """
    x4 = _as_4d(x)
    B, L, H, D = x4.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_tokens = B * L
    if n_tokens == 0 or H == 0:
        return out
    f = _freqs_table(freqs)
    half = D // 2
    block_p = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, ROPE_TILE_PAIRS // block_p))
    grid = (n_tokens, triton.cdiv(H, block_h))
    view = _view(x4)
    _rope_kernel[grid](
        view, f, out, L, H,
        HALF=half, INVERSE=inverse, INTERLEAVED=interleaved, ALIGNED=_aligned([view], f), VEC=16 // x.element_size(),
        BLOCK_H=block_h, BLOCK_P=block_p, num_warps=num_warps(block_h * block_p, 256, 1, 8),
    )  # fmt: skip
    return out


def _head_block(heads: int, block_p: int, norm_code: int) -> int:
    full = triton.next_power_of_2(heads)
    if norm_code == NORM_LAYER:
        if full * block_p > MAX_ROW_PAIRS:
            raise ValueError(
                f"qk_norm_rope (triton): LayerNorm across heads keeps a whole token row in one program; "
                f"{heads} heads of head_dim {2 * block_p} or less pad to {2 * full * block_p} values, over the "
                f"limit of {2 * MAX_ROW_PAIRS}; use backend='reference' for rows this wide."
            )
        return full
    return min(full, max(1, QK_TILE_PAIRS // block_p))


def _qk_geometry(q4: torch.Tensor, k4: torch.Tensor, norm_code: int) -> dict:
    B, L, HQ, D = q4.shape
    HK = k4.shape[2]
    half = D // 2
    block_p = triton.next_power_of_2(half)
    block_hq = _head_block(HQ, block_p, norm_code)
    block_hk = _head_block(HK, block_p, norm_code)
    return dict(
        n_tokens=B * L, L=L, HQ=HQ, HK=HK, half=half, block_p=block_p, block_hq=block_hq, block_hk=block_hk,
        nqb=triton.cdiv(HQ, block_hq), nkb=triton.cdiv(HK, block_hk),
    )  # fmt: skip


def _token_chunks(kernel, args: tuple, flags: dict, g: dict, device: torch.device) -> tuple[int, int]:
    """(token chunks, tokens per chunk) of a persistent qk_norm_rope launch: as many programs as the GPU holds
    for this compiled variant, each of the NQB + NKB head blocks of a chunk being one program."""
    blocks = g["nqb"] + g["nkb"]
    n_prog, _ = persistent_grid(kernel, args, flags, g["n_tokens"] * blocks, device, INTERPRETER_PROGRAMS * blocks)
    per_chunk = triton.cdiv(g["n_tokens"], max(1, min(g["n_tokens"], n_prog // blocks)))
    return triton.cdiv(g["n_tokens"], per_chunk), per_chunk


def qk_norm_rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    freqs: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    norm: str | None,
    eps: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused norm + RoPE + cast of q and k in one launch; returns contiguous (q_out, k_out) in q's dtype."""
    code = NORM_CODES[norm]
    q4, k4 = _as_4d(q), _as_4d(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    g = _qk_geometry(q4, k4, code)
    if g["n_tokens"] == 0:
        return q_out, k_out
    f = _freqs_table(freqs)
    views = (_view(q4), _view(k4))
    tile = max(g["block_hq"], g["block_hk"]) * g["block_p"]
    flags = dict(
        HALF=g["half"], NORM=code, HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
        HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, INTERLEAVED=interleaved,
        ALIGNED=_aligned(list(views), f), VEC=16 // q.element_size(),
        BLOCK_HQ=g["block_hq"], BLOCK_HK=g["block_hk"], BLOCK_P=g["block_p"], num_warps=num_warps(tile, 256, 2, 16),
    )  # fmt: skip

    def args(per_chunk: int) -> tuple:
        # Absent parameters: any valid pointer; the HAS_* flags keep the kernel from touching it.
        return (
            *views, f, q_out, k_out,
            q if q_weight is None else q_weight, q if q_bias is None else q_bias,
            q if k_weight is None else k_weight, q if k_bias is None else k_bias,
            g["n_tokens"], per_chunk, g["L"], g["HQ"], g["HK"], g["nqb"], eps,
        )  # fmt: skip

    n_chunks, per_chunk = _token_chunks(_qk_norm_rope_fwd_kernel, args(g["n_tokens"]), flags, g, q.device)
    _qk_norm_rope_fwd_kernel[(n_chunks, g["nqb"] + g["nkb"])](*args(per_chunk), **flags)
    return q_out, k_out


def qk_norm_rope_bwd(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    freqs: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    norm: str | None,
    eps: float,
    interleaved: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
]:
    """(dq, dk, dq_weight, dq_bias, dk_weight, dk_bias); a gradient is None where the parameter is None.

    dq/dk are contiguous in q's/k's dtype; parameter gradients are summed in fp32 over per-program partial
    rows, then cast to the parameter's dtype.
    """
    code = NORM_CODES[norm]
    q4, k4 = _as_4d(q), _as_4d(k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    g = _qk_geometry(q4, k4, code)
    n_tokens, half = g["n_tokens"], g["half"]
    params = (q_weight, q_bias, k_weight, k_bias)
    if n_tokens == 0:
        return dq, dk, *(None if p is None else torch.zeros_like(p) for p in params)
    f = _freqs_table(freqs)
    views = (_view(q4), _view(k4), _view(_as_4d(dq_out)), _view(_as_4d(dk_out)))
    tile = max(g["block_hq"], g["block_hk"]) * g["block_p"]
    flags = dict(
        HALF=half, NORM=code, HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
        HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, INTERLEAVED=interleaved,
        ALIGNED=_aligned(list(views), f), VEC=16 // q.element_size(),
        BLOCK_HQ=g["block_hq"], BLOCK_HK=g["block_hk"], BLOCK_P=g["block_p"], num_warps=num_warps(tile, 128, 4, 16),
    )  # fmt: skip

    def args(parts: list[torch.Tensor | None], per_chunk: int) -> tuple:
        return (
            *views, f, dq, dk,
            q if q_weight is None else q_weight, q if k_weight is None else k_weight,
            *(dq if t is None else t for t in parts),
            n_tokens, per_chunk, g["L"], g["HQ"], g["HK"], g["nqb"], g["nkb"], eps,
        )  # fmt: skip

    # The warm-up that reads the kernel's registers takes the fp32 freqs table in place of the fp32 partial sums
    # (not sized yet): the same specialization as the launch.
    warm = [None if p is None else f[0] for p in params]
    n_chunks, per_chunk = _token_chunks(_qk_norm_rope_bwd_kernel, args(warm, n_tokens), flags, g, q.device)

    def partial(param: torch.Tensor | None, n_blocks: int) -> torch.Tensor | None:
        if param is None:
            return None
        if code == NORM_LAYER:
            return torch.empty((n_chunks, param.numel()), dtype=torch.float32, device=q.device)
        return torch.empty((n_chunks * n_blocks, 2 * half), dtype=torch.float32, device=q.device)

    parts = [partial(q_weight, g["nqb"]), partial(q_bias, g["nqb"]), partial(k_weight, g["nkb"]),
             partial(k_bias, g["nkb"])]  # fmt: skip
    _qk_norm_rope_bwd_kernel[(n_chunks, g["nqb"] + g["nkb"])](*args(parts, per_chunk), **flags)
    return dq, dk, *(None if p is None else part.sum(0).to(p.dtype) for part, p in zip(parts, params))
