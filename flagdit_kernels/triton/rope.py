"""Rotary embedding kernels: ``apply_rope`` and fused QK-norm + RoPE + cast (forward and backward).

Layout shared by every kernel in this file:

- x is viewed as ``(B, L, H, Dh)`` with arbitrary strides (a packed ``(T, H, Dh)`` input is B=1, L=T), so q/k
  sliced from a fused QKV projection are read in place, without a hidden ``.contiguous()``. Even the last
  dim may be strided (Triton specializes a unit stride, so the common case costs nothing). Outputs and input
  gradients are freshly allocated and contiguous.
- freqs holds float32 (cos, sin) per token and rotary pair: ``(L, Dh/2, 2)`` shared by the batch (batch
  stride 0) or ``(B, L, Dh/2, 2)``; any per-token rows work, which is what packed varlen sequences need.
- Programs work on pair tiles ``(BLOCK_H, BLOCK_P)``: column p holds the first (x0) and second (x1) member
  of rotary pair p of each head. Pairs are adjacent ``(2p, 2p+1)`` (interleaved: Lumina's complex multiply;
  loaded as contiguous rows and split in registers) or halves ``(p, p + Dh/2)`` (rotate-half: Llama/HF;
  two contiguous loads). Every element is read once, with vectorized loads. BLOCK_P is Dh/2 rounded up to a
  power of two; masks cover head dims such as 48, 72, 120.
- Math in fp32; stores cast to the output's dtype. The rotation by -angle (the transpose, used for the
  backward pass) is the same kernel with sin negated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Norm codes (constexpr in the kernels).
NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2
NORM_CODES = {None: NORM_NONE, "none": NORM_NONE, "layer_norm": NORM_LAYER, "rms_norm": NORM_RMS}

# apply_rope: rotary pairs per program (x 2 elements); one program handles heads of one token. 2048 pairs =
# one H32 Dh128 token row: big enough to amortize the freqs load and index math, small enough for registers.
ROPE_TILE_PAIRS = 2048
# qk_norm_rope, per-head or no norm: pairs per program when heads are split into blocks.
QK_TILE_PAIRS = 2048
# LayerNorm across heads needs a whole padded token row (H x BLOCK_P pairs) in one program's registers.
# 8192 pairs (16384 fp32 values) is about the most 16 warps hold without spilling badly (H64 Dh256).
MAX_ROW_PAIRS = 8192
# Persistent-style grids for qk_norm_rope: each program walks a contiguous chunk of tokens, keeping the norm
# weights (and, backward, the weight-gradient partial sums) in registers across tokens.
FWD_PROGRAMS_PER_SM = 4
BWD_PROGRAMS_PER_SM = 2
# Under the CPU interpreter: a few programs, so chunking and partial sums are still exercised.
INTERPRETER_PROGRAMS = 3


@triton.jit
def _load_pairs(row_ptrs, col_stride, row_mask, HALF, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
    """fp32 pair tiles (x0, x1), each (rows, BLOCK_P), of rows starting at ``row_ptrs`` (rows, 1).

    Interleaved pairs are loaded as one contiguous row segment and split in registers, so loads stay
    vectorized (a stride-2 gather would issue one 2-byte load per element); halves are two contiguous loads.
    """
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
def _store_pairs(row_ptrs, y0, y1, row_mask, HALF, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
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
def _load_cos_sin(f_row, HALF, BLOCK_P: tl.constexpr):
    """(cos, sin) of one token as (1, BLOCK_P) fp32 rows; padding pairs read 0 (their data is masked)."""
    d = tl.arange(0, 2 * BLOCK_P)
    f = tl.load(f_row + d, mask=d < 2 * HALF, other=0.0)
    cos, sin = tl.split(tl.reshape(f, (BLOCK_P, 2)))
    return cos[None, :], sin[None, :]


@triton.jit
def _head_rows(ptr, b, l, s_b, s_l, h, s_h):
    """(heads, 1) pointers to the start of heads ``h`` of token (b, l) in a strided (B, L, H, Dh) tensor."""
    return ptr + b * s_b + l * s_l + (h * s_h)[:, None]


@triton.jit
def _rotate(x0, x1, cos, sin):
    """Rotates each pair (x0, x1) by its angle; pass -sin to rotate by -angle (the transpose)."""
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


@triton.jit
def _head_masks(h, H, HALF, BLOCK_P: tl.constexpr):
    """(row_mask, mask): real heads (BLOCK_H, 1), and real heads x real pairs (BLOCK_H, BLOCK_P)."""
    row_mask = (h < H)[:, None]
    return row_mask, row_mask & (tl.arange(0, BLOCK_P) < HALF)[None, :]


@triton.jit
def _rope_kernel(
    x_ptr,
    f_ptr,
    out_ptr,
    L,
    H,
    HALF,
    sx_b,
    sx_l,
    sx_h,
    sx_d,
    sf_b,
    sf_l,
    INVERSE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out = rotate(x) for one token and BLOCK_H heads; INVERSE rotates by -angle. Grid (tokens, head blocks)."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // L
    l = tok % L
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = (h < H)[:, None]
    cos, sin = _load_cos_sin(f_ptr + b * sf_b + l * sf_l, HALF, BLOCK_P)
    if INVERSE:
        sin = -sin
    x0, x1 = _load_pairs(_head_rows(x_ptr, b, l, sx_b, sx_l, h, sx_h), sx_d, row_mask, HALF, INTERLEAVED, BLOCK_P)
    y0, y1 = _rotate(x0, x1, cos, sin)
    o_rows = out_ptr + tok * (H * 2 * HALF) + (h * 2 * HALF)[:, None]
    _store_pairs(o_rows, y0, y1, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _load_params(ptr, h, row_mask, HALF, NORM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
    """A norm parameter as (BLOCK_H, BLOCK_P) fp32 pair tiles: LayerNorm's span the row (H*Dh), RMSNorm's
    one head (Dh, the same for every head)."""
    if NORM == 1:
        rows = ptr + (h * 2 * HALF)[:, None]
    else:
        rows = ptr + (h * 0)[:, None]
    return _load_pairs(rows, 1, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _normalize(x0, x1, mask, n_row, D, eps, NORM: tl.constexpr):
    """(xhat0, xhat1, rstd): LayerNorm over the whole tile (n_row real values) or RMSNorm per head (row)."""
    if NORM == 1:
        mean = tl.sum(tl.sum(x0 + x1, axis=1), axis=0) / n_row
        xc0 = tl.where(mask, x0 - mean, 0.0)
        xc1 = tl.where(mask, x1 - mean, 0.0)
        var = tl.sum(tl.sum(xc0 * xc0 + xc1 * xc1, axis=1), axis=0) / n_row
        rstd = tl.rsqrt(var + eps)
        return xc0 * rstd, xc1 * rstd, rstd
    else:
        # Masked (padding) heads and pairs hold zeros, so they add nothing to the per-head sums.
        rstd = tl.rsqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)[:, None]
        return x0 * rstd, x1 * rstd, rstd


@triton.jit
def _qk_fwd_rows(
    x_ptr,
    out_ptr,
    w_ptr,
    bias_ptr,
    f_ptr,
    start,
    end,
    L,
    H,
    HALF,
    h0,
    sx_b,
    sx_l,
    sx_h,
    sx_d,
    sf_b,
    sf_l,
    eps,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    INTERLEAVED: tl.constexpr,
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
    for t in range(start, end):
        bi = t // L
        li = t % L
        x0, x1 = _load_pairs(_head_rows(x_ptr, bi, li, sx_b, sx_l, h, sx_h), sx_d, row_mask, HALF, INTERLEAVED, BLOCK_P)
        cos, sin = _load_cos_sin(f_ptr + bi * sf_b + li * sf_l, HALF, BLOCK_P)
        if NORM != 0:
            x0, x1, _ = _normalize(x0, x1, mask, H * D, D, eps, NORM)
        if HAS_W:
            x0 = x0 * w0
            x1 = x1 * w1
        if HAS_B:
            x0 = x0 + b0
            x1 = x1 + b1
        y0, y1 = _rotate(x0, x1, cos, sin)
        _store_pairs(out_ptr + t * (H * D) + (h * D)[:, None], y0, y1, row_mask, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    q_ptr,
    k_ptr,
    f_ptr,
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
    HALF,
    NQB,
    sq_b,
    sq_l,
    sq_h,
    sq_d,
    sk_b,
    sk_l,
    sk_h,
    sk_d,
    sf_b,
    sf_l,
    eps,
    NORM: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_QB: tl.constexpr,
    HAS_KW: tl.constexpr,
    HAS_KB: tl.constexpr,
    INTERLEAVED: tl.constexpr,
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
            q_ptr, qo_ptr, qw_ptr, qb_ptr, f_ptr, start, end, L, HQ, HALF, blk * BLOCK_HQ,
            sq_b, sq_l, sq_h, sq_d, sf_b, sf_l, eps,
            NORM, HAS_QW, HAS_QB, INTERLEAVED, BLOCK_HQ, BLOCK_P,
        )  # fmt: skip
    else:
        _qk_fwd_rows(
            k_ptr, ko_ptr, kw_ptr, kb_ptr, f_ptr, start, end, L, HK, HALF, (blk - NQB) * BLOCK_HK,
            sk_b, sk_l, sk_h, sk_d, sf_b, sf_l, eps,
            NORM, HAS_KW, HAS_KB, INTERLEAVED, BLOCK_HK, BLOCK_P,
        )  # fmt: skip


@triton.jit
def _qk_bwd_rows(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    f_ptr,
    dw_ptr,
    db_ptr,
    part_row,
    start,
    end,
    L,
    H,
    HALF,
    h0,
    sx_b,
    sx_l,
    sx_h,
    sx_d,
    sy_b,
    sy_l,
    sy_h,
    sy_d,
    sf_b,
    sf_l,
    eps,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    INTERLEAVED: tl.constexpr,
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
    for t in range(start, end):
        bi = t // L
        li = t % L
        dy0, dy1 = _load_pairs(
            _head_rows(dy_ptr, bi, li, sy_b, sy_l, h, sy_h), sy_d, row_mask, HALF, INTERLEAVED, BLOCK_P
        )
        cos, sin = _load_cos_sin(f_ptr + bi * sf_b + li * sf_l, HALF, BLOCK_P)
        # Rotate the upstream gradient back by -angle (R^T).
        dn0, dn1 = _rotate(dy0, dy1, cos, -sin)
        if NORM == 0:
            dx0 = dn0
            dx1 = dn1
        else:
            x0, x1 = _load_pairs(
                _head_rows(x_ptr, bi, li, sx_b, sx_l, h, sx_h), sx_d, row_mask, HALF, INTERLEAVED, BLOCK_P
            )
            xh0, xh1, rstd = _normalize(x0, x1, mask, H * D, D, eps, NORM)
            if HAS_W:
                acc_w0 += dn0 * xh0
                acc_w1 += dn1 * xh1
                g0 = dn0 * w0
                g1 = dn1 * w1
            else:
                g0 = dn0
                g1 = dn1
            if NORM == 1:
                n_row = H * D
                mean_g = tl.sum(tl.sum(g0 + g1, axis=1), axis=0) / n_row
                mean_gx = tl.sum(tl.sum(g0 * xh0 + g1 * xh1, axis=1), axis=0) / n_row
                dx0 = rstd * (g0 - mean_g - xh0 * mean_gx)
                dx1 = rstd * (g1 - mean_g - xh1 * mean_gx)
            else:
                mean_gx = (tl.sum(g0 * xh0 + g1 * xh1, axis=1) / D)[:, None]
                dx0 = rstd * (g0 - xh0 * mean_gx)
                dx1 = rstd * (g1 - xh1 * mean_gx)
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
    HALF,
    NORM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Writes one program's partial sums of a norm parameter's gradient to partial row ``part_row``.

    LayerNorm params span the row: one partial row of H*Dh per program. RMSNorm params are shared by all heads,
    so the head block is reduced here and a partial row holds Dh values.
    """
    D = 2 * HALF
    if NORM == 1:
        _store_pairs(ptr + part_row * (H * D) + (h * D)[:, None], acc0, acc1, row_mask, HALF, INTERLEAVED, BLOCK_P)
    else:
        one_row = tl.full((1, 1), 1, tl.int1)
        zero = tl.zeros((1, 1), dtype=tl.int32)
        sum0 = tl.sum(acc0, axis=0, keep_dims=True)
        sum1 = tl.sum(acc1, axis=0, keep_dims=True)
        _store_pairs(ptr + part_row * D + zero, sum0, sum1, one_row, HALF, INTERLEAVED, BLOCK_P)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    q_ptr,
    k_ptr,
    dqo_ptr,
    dko_ptr,
    f_ptr,
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
    HALF,
    NQB,
    NKB,
    sq_b,
    sq_l,
    sq_h,
    sq_d,
    sk_b,
    sk_l,
    sk_h,
    sk_d,
    sdq_b,
    sdq_l,
    sdq_h,
    sdq_d,
    sdk_b,
    sdk_l,
    sdk_h,
    sdk_d,
    sf_b,
    sf_l,
    eps,
    NORM: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_QB: tl.constexpr,
    HAS_KW: tl.constexpr,
    HAS_KB: tl.constexpr,
    INTERLEAVED: tl.constexpr,
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
            q_ptr, dqo_ptr, dq_ptr, qw_ptr, f_ptr, dqw_ptr, dqb_ptr, pid * NQB + blk,
            start, end, L, HQ, HALF, blk * BLOCK_HQ,
            sq_b, sq_l, sq_h, sq_d, sdq_b, sdq_l, sdq_h, sdq_d, sf_b, sf_l, eps,
            NORM, HAS_QW, HAS_QB, INTERLEAVED, BLOCK_HQ, BLOCK_P,
        )  # fmt: skip
    else:
        kblk = blk - NQB
        _qk_bwd_rows(
            k_ptr, dko_ptr, dk_ptr, kw_ptr, f_ptr, dkw_ptr, dkb_ptr, pid * NKB + kblk,
            start, end, L, HK, HALF, kblk * BLOCK_HK,
            sk_b, sk_l, sk_h, sk_d, sdk_b, sdk_l, sdk_h, sdk_d, sf_b, sf_l, eps,
            NORM, HAS_KW, HAS_KB, INTERLEAVED, BLOCK_HK, BLOCK_P,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Launch helpers (shape bookkeeping only; validation lives in flagdit_kernels.ops.rope).


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """(T, H, Dh) -> a (1, T, H, Dh) view; (B, L, H, Dh) unchanged. Never copies."""
    return x.unsqueeze(0) if x.dim() == 3 else x


def _freqs_table(freqs: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """fp32 table with contiguous (pair, cos/sin) dims and its (batch, token) strides; batch stride 0 when
    one (L, Dh/2, 2) table is shared by the batch. Copies only a table that is fp64 or oddly strided."""
    f = freqs.to(torch.float32)
    if f.stride(-1) != 1 or f.stride(-2) != 2:
        f = f.contiguous()
    if f.dim() == 3:
        return f, 0, f.stride(0)
    return f, f.stride(0), f.stride(1)


def _num_warps(pairs: int, per_warp: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, pairs // per_warp))


def _programs(n_tokens: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(number of token chunks, tokens per chunk) for the persistent-style qk_norm_rope grids."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:
        target = INTERPRETER_PROGRAMS
    per_prog = triton.cdiv(n_tokens, max(1, min(n_tokens, target)))
    return triton.cdiv(n_tokens, per_prog), per_prog


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
    f, sf_b, sf_l = _freqs_table(freqs)
    half = D // 2
    block_p = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, ROPE_TILE_PAIRS // block_p))
    grid = (n_tokens, triton.cdiv(H, block_h))
    _rope_kernel[grid](
        x4, f, out, L, H, half, *x4.stride(), sf_b, sf_l,
        INVERSE=inverse, INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_P=block_p,
        num_warps=_num_warps(block_h * block_p, 256, 1, 8),
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
    f, sf_b, sf_l = _freqs_table(freqs)
    n_progs, per_prog = _programs(g["n_tokens"], q.device, FWD_PROGRAMS_PER_SM)
    tile = max(g["block_hq"], g["block_hk"]) * g["block_p"]
    # Absent parameters: any valid pointer; the HAS_* flags keep the kernel from touching it.
    _qk_norm_rope_fwd_kernel[(n_progs, g["nqb"] + g["nkb"])](
        q4, k4, f, q_out, k_out,
        q if q_weight is None else q_weight, q if q_bias is None else q_bias,
        q if k_weight is None else k_weight, q if k_bias is None else k_bias,
        g["n_tokens"], per_prog, g["L"], g["HQ"], g["HK"], g["half"], g["nqb"],
        *q4.stride(), *k4.stride(), sf_b, sf_l, eps,
        NORM=code, HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
        HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, INTERLEAVED=interleaved,
        BLOCK_HQ=g["block_hq"], BLOCK_HK=g["block_hk"], BLOCK_P=g["block_p"],
        num_warps=_num_warps(tile, 256, 2, 16),
    )  # fmt: skip
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
    dq4, dk4 = _as_4d(dq_out), _as_4d(dk_out)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    g = _qk_geometry(q4, k4, code)
    n_tokens, half = g["n_tokens"], g["half"]
    D = 2 * half
    n_progs, per_prog = (0, 1) if n_tokens == 0 else _programs(n_tokens, q.device, BWD_PROGRAMS_PER_SM)

    def partial(param: torch.Tensor | None, n_blocks: int) -> torch.Tensor | None:
        if param is None:
            return None
        if code == NORM_LAYER:
            return torch.empty((n_progs, param.numel()), dtype=torch.float32, device=q.device)
        return torch.empty((n_progs * n_blocks, D), dtype=torch.float32, device=q.device)

    parts = [partial(q_weight, g["nqb"]), partial(q_bias, g["nqb"]), partial(k_weight, g["nkb"]),
             partial(k_bias, g["nkb"])]  # fmt: skip
    if n_tokens > 0:
        f, sf_b, sf_l = _freqs_table(freqs)
        tile = max(g["block_hq"], g["block_hk"]) * g["block_p"]
        _qk_norm_rope_bwd_kernel[(n_progs, g["nqb"] + g["nkb"])](
            q4, k4, dq4, dk4, f, dq, dk,
            q if q_weight is None else q_weight, q if k_weight is None else k_weight,
            *(dq if t is None else t for t in parts),
            n_tokens, per_prog, g["L"], g["HQ"], g["HK"], half, g["nqb"], g["nkb"],
            *q4.stride(), *k4.stride(), *dq4.stride(), *dk4.stride(), sf_b, sf_l, eps,
            NORM=code, HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
            HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, INTERLEAVED=interleaved,
            BLOCK_HQ=g["block_hq"], BLOCK_HK=g["block_hk"], BLOCK_P=g["block_p"],
            num_warps=_num_warps(tile, 128, 4, 16),
        )  # fmt: skip
    grads = []
    for part, param in zip(parts, (q_weight, q_bias, k_weight, k_bias)):
        grads.append(None if param is None else part.sum(0).to(param.dtype))
    return dq, dk, *grads
