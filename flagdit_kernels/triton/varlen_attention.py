"""Flash-attention over packed variable-length sequences with Lumina's gated text cross-attention fused in.

Layout (flash-attn varlen convention): q ``(T, H, Dh)``, k/v ``(T, Hkv, Dh)``, sequences delimited by
``cu_seqlens`` (int32, ``(B+1,)``); text keys/values ``(Tt, Hkv, Dh)`` delimited per sample by
``text_cu_seqlens``. Tensors are read through their token and head strides, so q/k/v may be views of one fused
QKV projection (not copied); the head dim is read as contiguous (a tensor whose head dim is not is copied).

Forward, one program per (block of BLOCK_M queries of one sequence, query head):
  1. load the q tile (rotating it by RoPE in registers when ``freqs`` is given), rounded to the input dtype
     like the reference;
  2. online softmax with scale 1/sqrt(Dh) over the sample's text keys (never rotated); ``o_text`` is written
     to memory (the backward needs it) and read back in step 4, so it holds no registers during step 3;
  3. online softmax (fp32, exp2 with log2(e) folded into the scale) over the sequence's keys, rotated as loaded
     (pointer loads, or tensor descriptors / the copy engine where the autotuner picks them on sm_90+);
  4. write ``o_self + tanh(gate[h]) * o_text`` and both log-sum-exps (natural log, the public ``lse`` unit).
The grid is (``cdiv(max_seqlen, BLOCK_M)`` blocks, heads, samples); blocks past a sequence's
end return at once (cheap next to a real block), so no host sync is needed beyond the Python int max_seqlen.

Backward (deterministic, no atomics):
  * ``_bwd_preprocess``: ``delta_self = rowsum(dO * o_self)`` with ``o_self = out - tg * o_text``,
    ``r = rowsum(dO * o_text)``, ``delta_text = tg * r``; the caller sums ``r`` per head for d tanh(gate).
  * ``_bwd_dkdv``: one program per (key block, sample, kv head) loops over the GQA group's query heads and the
    sample's query blocks; one launch covers the text key blocks (dO scaled by tg, first in the grid) and the
    self key blocks (rotated; dk is rotated back by the inverse RoPE before it is written).
  * ``_bwd_dq``: one program per (query block, head) loops over self keys (pointer or descriptor loads, as for
    the forward), then text keys; dq is rotated back.

Head dims that are not powers of two run as two power-of-two column chunks (72 = 64 + 16 padded to 80, 96 = 64 + 32,
48 = 32 + 16) with masked loads, so the padding costs at most a few columns instead of the next power of two.
Row offsets are int64 so T * H * Dh may exceed 2^31.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

LOG2E = 1.4426950408889634
# The same constants for kernels: LSEs are stored in natural log (the public unit), scores run in log2 units.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(1 / LOG2E)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------------------
# Autotuning. On the GPU the configs below are ordinary flash-attention tiles that compile with Triton 3.6 and
# newer; the pruner drops tiles too big for the head dim (registers / shared memory). Results are cached on disk
# (Triton's cache dir), keyed by head dim, variant, dtypes, Triton version and GPU arch, so tuning is paid once
# per machine. FLAGDIT_KERNELS_AUTOTUNE=0 skips tuning and launches the first config that fits: one compile per
# variant and no benchmarking (the GPU test suite runs this way). FLAGDIT_KERNELS_AUTOTUNE=compile runs every
# config once without timing it: it fills Triton's on-disk cache, so processes warming it in parallel
# (``python -m flagdit_kernels.bench.warm``) spare a later tuning run the compiles. The interpreter always runs
# one small tile.
# --------------------------------------------------------------------------------------------------------------

AUTOTUNE_MODE = "0" if INTERPRETED else os.environ.get("FLAGDIT_KERNELS_AUTOTUNE", "1")
if AUTOTUNE_MODE not in ("0", "1", "compile"):
    raise ValueError(f"FLAGDIT_KERNELS_AUTOTUNE must be 0, 1 or compile, got {AUTOTUNE_MODE!r}")


@contextlib.contextmanager
def autotune_mode(mode: str) -> Iterator[None]:
    """Launches inside use ``mode`` (as FLAGDIT_KERNELS_AUTOTUNE would), e.g. "compile" for every config."""
    global AUTOTUNE_MODE
    saved, AUTOTUNE_MODE = AUTOTUNE_MODE, mode
    try:
        yield
    finally:
        AUTOTUNE_MODE = saved


def _cfg(bm: int, bn: int, warps: int, stages: int, **flags) -> triton.Config:
    """A tile; ``flags`` are the kernel's other tuned constexprs (TMA: keys and values through tensor descriptors,
    for the forward and dq kernels)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **flags}, num_warps=warps, num_stages=stages)


if INTERPRETED:
    FWD_CONFIGS = [_cfg(32, 32, 4, 1, TMA=False)]
    DQ_CONFIGS = [_cfg(32, 32, 4, 1, TMA=False)]
    DKDV_CONFIGS = [_cfg(32, 32, 4, 1)]
else:
    # Chosen from ptxas register/spill reports for sm_90 (Triton 3.6 and 3.9, bf16, Dh 128; no GPU was available
    # to time them), first the untuned default: 8 warps (two warpgroups) for 128-row tiles (4 warps spill the
    # 128-row fp32 accumulator); small query tiles for dk/dv (dk and dv accumulators plus k and v stay resident
    # for a whole program). Each extra config costs a compile (seconds) the first time a variant is tuned.
    # The forward also tries the copy engine (TMA) for keys and values: no address arithmetic in the loop and
    # 188 instead of 230 registers at 128x64 (Triton 3.6, sm_90, D128). Triton's warp specialization (tl.range(...,
    # warp_specialize=True)) was tried too: 3.6 does not split this loop on sm_90 (a kernel with work after the
    # loop, our tail tile, is left unspecialized, and one variant crashed its pass manager), so it is not offered.
    FWD_CONFIGS = [
        _cfg(128, 64, 8, 3, TMA=False),
        _cfg(128, 128, 8, 2, TMA=False),
        _cfg(128, 64, 8, 4, TMA=False),
        _cfg(64, 64, 4, 3, TMA=False),
        _cfg(64, 32, 4, 2, TMA=False),
        _cfg(128, 64, 8, 3, TMA=True),
        _cfg(128, 128, 8, 2, TMA=True),
    ]
    DQ_CONFIGS = [
        _cfg(128, 64, 8, 2, TMA=False),
        _cfg(128, 32, 8, 3, TMA=False),
        _cfg(64, 64, 4, 2, TMA=False),
        _cfg(64, 32, 4, 2, TMA=False),
        _cfg(128, 64, 8, 2, TMA=True),
    ]
    DKDV_CONFIGS = [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(16, 128, 8, 2)]


def _prune(configs, named_args, **kwargs):
    """Keeps tiles whose q/k/v/acc footprint fits for this head dim (256 needs small tiles), and descriptor
    (TMA) tiles only where the launcher found the tensors fit descriptors (TMA_OK)."""
    args = {**named_args, **kwargs}
    block_d = args.get("D0", 128) + args.get("D1", 0)
    usable = [c for c in configs if args.get("TMA_OK", False) or not c.kwargs.get("TMA", False)]
    keep = [c for c in usable if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * block_d <= 128 * 128]
    return keep or [min(usable, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _autotune(configs, key):
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _prune}, cache_results=True
    )


def _launch(kernel, grid, *args, **consts) -> None:
    """Launches an autotuned kernel as AUTOTUNE_MODE says: tuned ("1"), with the first config that fits this head
    dim and the card ("0", the interpreter), or once with every config that fits ("compile")."""
    if AUTOTUNE_MODE == "1":
        kernel[grid](*args, **consts)
        return
    error = None
    for config in _prune(kernel.configs, consts):
        try:
            kernel.fn[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        except (OutOfResources, PTXASError) as exc:
            error = exc  # the card cannot hold this tile (shared memory, registers): the autotuner skips it too
            continue
        if AUTOTUNE_MODE == "0":
            return
    if AUTOTUNE_MODE == "0" and error is not None:
        raise error


# --------------------------------------------------------------------------------------------------------------
# Helpers. Kernel argument lists stay compact (fmt: off): one line per group of strides.
#
# Head dim in two column chunks: D0 = the largest power of two <= Dh, D1 = the power of two covering the rest
# (0 when Dh is a power of two), so Dh 72 runs as 64 + 16 (80 columns, not 128), 96 as 64 + 32 and 48 as 32 + 16.
# Every tile is a pair (x0, x1); every matmul over the head dim is two dots into one accumulator, every matmul
# producing head-dim columns writes two accumulators. With D1 == 0 the second chunk is a dead dummy.
#
# Loops over keys (or queries) run the full tiles without row masks and then at most one masked tail tile
# (MASK_* constexpr), so the common path carries no per-element masking.
# --------------------------------------------------------------------------------------------------------------

# fmt: off


@triton.jit
def _rotate(x, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc,
            INVERSE: tl.constexpr, R: tl.constexpr, COL0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Interleaved RoPE of an (R, W) chunk holding head-dim columns [COL0, COL0 + W): pairs (2i, 2i+1) rotate by
    the angle of (token, i). ``rows`` are token indices (int64) into freqs ``(T, Dh/2, 2)`` = (cos, sin), relative
    to ``f_ptr``. ``INVERSE`` rotates by -angle (the transpose: maps a gradient back). Returns fp32."""
    offs_i = COL0 // 2 + tl.arange(0, W // 2)
    mask = row_mask[:, None] & (offs_i[None, :] < HEAD_DIM // 2)
    ptrs = f_ptr + rows[:, None] * stride_ft + offs_i[None, :] * stride_fi
    cos = tl.load(ptrs, mask=mask, other=0.0)
    sin = tl.load(ptrs + stride_fc, mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (R, W // 2, 2)))
    return tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (R, W))


@triton.jit
def _rotate_back(x0, x1, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc,
                 R: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """Both chunks of a gradient with respect to rotated q or k, rotated by -angle: the gradient of the
    unrotated input (the rotation is orthogonal). Returns fp32."""
    x0 = _rotate(x0, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc, True, R, 0, D0, HEAD_DIM)
    if D1 > 0:
        x1 = _rotate(x1, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc, True, R, D0, D1, HEAD_DIM)
    return x0, x1


@triton.jit
def _aligned(stride, VEC: tl.constexpr):
    """``stride``, a multiple of VEC elements (VEC = 16 bytes when the launcher found every tensor 16-byte aligned,
    else 1), written so that Triton's alignment analysis knows it: an integer argument is only known divisible
    when it is divisible by 16, so a head stride of 72 would turn every load of a Dh-72 tile into 2-byte accesses
    (no cp.async, no pipelining). tl.multiple_of does not attach to a scalar argument; this shift pair does."""
    if VEC > 1:
        stride = stride // VEC * VEC
    return stride


@triton.jit
def _segment(cu, b):
    """(start, length) of sequence b of a cu_seqlens array, both int32. Callers widen start to int64 only where
    they build offsets, after any early exit (widening first cost a register and a few spilled bytes)."""
    start = tl.load(cu + b)
    return start, tl.load(cu + b + 1) - start


@triton.jit
def _query_heads(GROUP):
    """(sample, query head, kv head) of a program of a (blocks, heads, batch) grid: heads and samples on the
    second and third axes (each up to 65535), not folded into one that batch * heads could overflow."""
    h = tl.program_id(1)
    return tl.program_id(2), h, h // GROUP


@triton.jit
def _tile_rows(start, n, MASKED: tl.constexpr, R: tl.constexpr):
    """(rows as int64, mask) of the R rows from ``start``: rows < n for a tail tile, a constant all-true mask
    (folded away by the compiler) for a full tile."""
    offs = start + tl.arange(0, R)
    if MASKED:
        mask = offs < n
    else:
        mask = tl.full([R], 1, tl.int1)
    return offs.to(tl.int64), mask


@triton.jit
def _loop_tile(start, n, MASKED: tl.constexpr, R: tl.constexpr):
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
def _load_chunk(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                ROPE: tl.constexpr, R: tl.constexpr, COL0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, W)
    mask = row_mask[:, None]
    if COL0 + W > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, :]
    x = tl.load(base + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
    return _rope_chunk(x, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc, ROPE, R, COL0, W, HEAD_DIM)


@triton.jit
def _rope_chunk(x, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc,
                ROPE: tl.constexpr, R: tl.constexpr, COL0: tl.constexpr, W: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A loaded chunk, rotated when ROPE in fp32 and rounded back to its dtype, as the reference rounds its
    rotated q/k."""
    if ROPE:
        x = _rotate(x, f_ptr, rows, row_mask, stride_ft, stride_fi, stride_fc, False, R, COL0, W, HEAD_DIM).to(x.dtype)
    return x


@triton.jit
def _load_tile(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
               ROPE: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """(R, D0) and (R, D1) chunks of rows ``rows`` (row indices relative to ``base``), zero outside the masks."""
    x0 = _load_chunk(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                     ROPE, R, 0, D0, HEAD_DIM)
    if D1 > 0:
        x1 = _load_chunk(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                         ROPE, R, D0, D1, HEAD_DIM)
    else:
        x1 = _zeros_chunk(R, 0).to(x0.dtype)  # dummy, never used
    return x0, x1


@triton.jit
def _zeros_chunk(R: tl.constexpr, W: tl.constexpr):
    """fp32 zeros for a second-chunk accumulator; a (R, 16) dummy when there is no second chunk."""
    if W > 0:
        z = tl.zeros([R, W], dtype=tl.float32)
    else:
        z = tl.zeros([R, 16], dtype=tl.float32)
    return z


@triton.jit
def _zeros_tile(R: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """An fp32 (R, head dim) accumulator pair of zeros."""
    return tl.zeros([R, D0], dtype=tl.float32), _zeros_chunk(R, D1)


@triton.jit
def _store_tile(base, rows, row_mask, stride_t, x0, x1, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr):
    """Stores both chunks (unit head-dim stride: only our own outputs are written)."""
    cols = tl.arange(0, D0)
    tl.store(base + rows[:, None] * stride_t + cols[None, :], x0.to(base.dtype.element_ty), mask=row_mask[:, None])
    if D1 > 0:
        cols = D0 + tl.arange(0, D1)
        tl.store(base + rows[:, None] * stride_t + cols[None, :], x1.to(base.dtype.element_ty),
                 mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _scores(a0, a1, b0, b1, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """a @ b^T over the head dim, chunk by chunk into one fp32 accumulator."""
    s = tl.dot(a0, tl.trans(b0), input_precision=DOT_PREC)
    if D1 > 0:
        s = tl.dot(a1, tl.trans(b1), s, input_precision=DOT_PREC)
    return s


@triton.jit
def _load_kv_tile(src0, src1, start_n, rows, n_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                  TMA: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                  D1: tl.constexpr):
    """The R key or value rows from ``start_n`` (``f_ptr`` already shifted there). With TMA, ``src0`` / ``src1``
    are tensor descriptors of the two column chunks (the copy engine zero-fills rows past the sequence and
    columns past the head dim, and no thread computes addresses); else ``src0`` is the sequence's base pointer."""
    if TMA:
        x0 = _rope_chunk(src0.load([start_n, 0]), f_ptr, rows, n_mask, stride_ft, stride_fi, stride_fc,
                         ROPE, R, 0, D0, HEAD_DIM)
        if D1 > 0:
            x1 = _rope_chunk(src1.load([start_n, D0]), f_ptr, rows, n_mask, stride_ft, stride_fi, stride_fc,
                             ROPE, R, D0, D1, HEAD_DIM)
        else:
            x1 = _zeros_chunk(R, 0).to(x0.dtype)  # dummy, never used
    else:
        x0, x1 = _load_tile(src0 + tl.cast(start_n, tl.int64) * stride_t, rows, n_mask, stride_t, f_ptr,
                            stride_ft, stride_fi, stride_fc, ROPE, R, HEAD_DIM, D0, D1)
    return x0, x1


@triton.jit
def _kv_source(base, length, stride_t, TMA: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr,
               D0: tl.constexpr, D1: tl.constexpr):
    """What _load_kv_tile reads a sequence's keys or values from: two tensor descriptors (one per column chunk,
    shaped to the sequence, so the copy engine does the bounds) or the base pointer twice."""
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
def _load_kv_pair(k_src0, k_src1, v_src0, v_src1, f_ptr, stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
                  start_n, k_len, MASK_N: tl.constexpr, ROPE_K: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """The key tile (rotated when ROPE_K) and value tile of the BLOCK_N keys from ``start_n``, and the key mask."""
    rows, n_mask = _loop_tile(start_n, k_len, MASK_N, BLOCK_N)
    f_ptr = f_ptr + tl.cast(start_n, tl.int64) * stride_ft
    k0, k1 = _load_kv_tile(k_src0, k_src1, start_n, rows, n_mask, stride_kt, f_ptr, stride_ft, stride_fi, stride_fc,
                           TMA, ROPE_K, BLOCK_N, HEAD_DIM, D0, D1)
    v0, v1 = _load_kv_tile(v_src0, v_src1, start_n, rows, n_mask, stride_vt, f_ptr, stride_ft, stride_fi, stride_fc,
                           TMA, False, BLOCK_N, HEAD_DIM, D0, D1)
    return k0, k1, v0, v1, n_mask


@triton.jit
def _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1, f_ptr,
                 stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
                 start_n, k_len, qk_scale,
                 MASK_N: tl.constexpr, ROPE_K: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over BLOCK_N keys (scores in log2 units)."""
    k0, k1, v0, v1, n_mask = _load_kv_pair(k_src0, k_src1, v_src0, v_src1, f_ptr, stride_kt, stride_vt, stride_ft,
                                           stride_fi, stride_fc, start_n, k_len, MASK_N, ROPE_K, TMA, BLOCK_N,
                                           HEAD_DIM, D0, D1)
    s = _scores(q0, q1, k0, k1, D1, DOT_PREC)
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
def _attend(q0, q1, k_base, v_base, f_ptr,
            stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
            k_len, qk_scale,
            ROPE_K: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax of q's attention over ``k_len`` keys (full tiles, then the tail), from a fresh state.
    Returns (acc0, acc1, m_i, l_i): unnormalized output chunks, running max and sum (log2 units)."""
    k_src0, k_src1 = _kv_source(k_base, k_len, stride_kt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    v_src0, v_src1 = _kv_source(v_base, k_len, stride_vt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    acc0, acc1 = _zeros_tile(BLOCK_M, D0, D1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = (k_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1, f_ptr,
                                            stride_kt, stride_vt, stride_ft, stride_fi, stride_fc, start_n, k_len,
                                            qk_scale, False, ROPE_K, TMA, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    if n_full < k_len:
        acc0, acc1, m_i, l_i = _attend_tile(acc0, acc1, m_i, l_i, q0, q1, k_src0, k_src1, v_src0, v_src1, f_ptr,
                                            stride_kt, stride_vt, stride_ft, stride_fi, stride_fc, n_full, k_len,
                                            qk_scale, True, ROPE_K, TMA, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _query_tile(Q, FREQS, start, seq_len, pid_m, h, T, stride_qt, stride_qh, stride_ft, stride_fi, stride_fc,
                ROPE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr):
    """Block ``pid_m`` of the queries of head h in the sequence starting at token ``start`` (int64): (rows,
    mask, the sequence's freqs pointer, the q chunks rotated when ROPE, offsets into (H, T) LSE-shaped arrays)."""
    rows, m_mask = _tile_rows(pid_m * BLOCK_M, seq_len, True, BLOCK_M)
    f_ptr = FREQS + start * stride_ft
    q0, q1 = _load_tile(Q + start * stride_qt + h * stride_qh, rows, m_mask, stride_qt,
                        f_ptr, stride_ft, stride_fi, stride_fc, ROPE, BLOCK_M, HEAD_DIM, D0, D1)
    return rows, m_mask, f_ptr, q0, q1, h.to(tl.int64) * T + start + rows


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


@_autotune(FWD_CONFIGS, key=["HEAD_DIM", "HAS_TEXT", "ROPE", "DOT_PREC", "TMA_OK"])
@triton.jit
def _fwd_kernel(
    Q, K, V, TK, TV, TGATE, FREQS, OUT, OTEXT, LSE, LSE_T, CU, TCU,
    qk_scale, text_qk_scale, T, GROUP,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_tkt, stride_tkh,
    stride_tvt, stride_tvh,
    stride_ot, stride_oh,
    stride_ft, stride_fi, stride_fc,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TEXT: tl.constexpr, ROPE: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA_OK: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):
    # TMA_OK: the launcher found K and V fit tensor descriptors (16-byte aligned base and strides, sm_90+).
    tl.static_assert(TMA_OK or not TMA)
    stride_qt, stride_qh = _aligned(stride_qt, VEC), _aligned(stride_qh, VEC)
    stride_kt, stride_kh = _aligned(stride_kt, VEC), _aligned(stride_kh, VEC)
    stride_vt, stride_vh = _aligned(stride_vt, VEC), _aligned(stride_vh, VEC)
    stride_tkt, stride_tkh = _aligned(stride_tkt, VEC), _aligned(stride_tkh, VEC)
    stride_tvt, stride_tvh = _aligned(stride_tvt, VEC), _aligned(stride_tvh, VEC)
    stride_ot, stride_oh = _aligned(stride_ot, VEC), _aligned(stride_oh, VEC)
    pid_m = tl.program_id(0)
    b, h, hk = _query_heads(GROUP)
    start, seq_len = _segment(CU, b)
    if pid_m * BLOCK_M >= seq_len:
        return
    start = start.to(tl.int64)
    rows, m_mask, f_ptr, q0, q1, lse_off = _query_tile(Q, FREQS, start, seq_len, pid_m, h, T, stride_qt, stride_qh,
                                                       stride_ft, stride_fi, stride_fc, ROPE, BLOCK_M, HEAD_DIM,
                                                       D0, D1)
    o_base = start * stride_ot + h * stride_oh

    # The text branch runs first and parks its result in OTEXT (the backward needs it anyway), so nothing of it
    # stays live in registers during the long self loop (keeping it costs ~50-75 registers a thread at 128-row
    # tiles); it is read back for the final sum.
    if HAS_TEXT:
        t_start, t_len = _segment(TCU, b)
        t_start = t_start.to(tl.int64)
        acc0, acc1, m_t, l_t = _attend(q0, q1, TK + t_start * stride_tkt + hk * stride_tkh,
                                       TV + t_start * stride_tvt + hk * stride_tvh, f_ptr,
                                       stride_tkt, stride_tvt, stride_ft, stride_fi,
                                       stride_fc, t_len, text_qk_scale, False, False, BLOCK_M, BLOCK_N,
                                       HEAD_DIM, D0, D1, DOT_PREC)
        # A sample without text tokens: l_t == 0 and acc == 0, so o_text is exactly 0 (never 0/0).
        has = l_t > 0
        l_safe = tl.where(has, l_t, 1.0)
        tl.store(LSE_T + lse_off, tl.where(has, (m_t + tl.log2(l_safe)) * _LN2, 0.0), mask=m_mask)
        _store_tile(OTEXT + o_base, rows, m_mask, stride_ot, acc0 / l_safe[:, None], acc1 / l_safe[:, None],
                    HEAD_DIM, D0, D1)

    acc0, acc1, m_i, l_i = _attend(q0, q1, K + start * stride_kt + hk * stride_kh,
                                   V + start * stride_vt + hk * stride_vh, f_ptr,
                                   stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
                                   seq_len, qk_scale, ROPE, TMA, BLOCK_M, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    tl.store(LSE + lse_off, (m_i + tl.log2(l_i)) * _LN2, mask=m_mask)
    out0 = acc0 / l_i[:, None]
    out1 = acc1 / l_i[:, None]
    if HAS_TEXT:
        # Other threads of this program stored these elements: a CTA barrier makes their writes visible.
        tl.debug_barrier()
        tg = tl.load(TGATE + h)
        ot0, ot1 = _load_tile(OTEXT + o_base, rows, m_mask, stride_ot, f_ptr, stride_ft, stride_fi, stride_fc,
                              False, BLOCK_M, HEAD_DIM, D0, D1)
        out0 = out0 + tg * ot0.to(tl.float32)
        if D1 > 0:
            out1 = out1 + tg * ot1.to(tl.float32)
    _store_tile(OUT + o_base, rows, m_mask, stride_ot, out0, out1, HEAD_DIM, D0, D1)


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    DO, OUT, OTEXT, TGATE, DLSE, DELTA, DELTA_T, R, T,
    stride_dot, stride_doh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_DLSE: tl.constexpr,
    VEC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per (token, head): delta_self = sum_d dO * o_self - dlse, and with text r = sum_d dO * o_text,
    delta_text = tg * r.

    A gradient g_i on lse_i = log sum_j exp(s_ij) adds g_i * P_ij to dS_ij (d lse_i / d s_ij = P_ij), so
    dS_ij = P_ij * (dP_ij - delta_i + g_i): the kernels use delta_i - g_i and need nothing else."""
    stride_dot, stride_doh = _aligned(stride_dot, VEC), _aligned(stride_doh, VEC)
    stride_ot, stride_oh = _aligned(stride_ot, VEC), _aligned(stride_oh, VEC)
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
        tg = tl.load(TGATE + h)
        o_text = tl.load(OTEXT + o_off, mask=mask, other=0.0).to(tl.float32)
        o_self = o_self - tg * o_text  # out = o_self + tg * o_text
        r = tl.sum(do * o_text, 1)
        tl.store(R + out_off, r, mask=t_mask)
        tl.store(DELTA_T + out_off, tg * r, mask=t_mask)
    delta = tl.sum(do * o_self, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + out_off, mask=t_mask, other=0.0)
    tl.store(DELTA + out_off, delta, mask=t_mask)


@triton.jit
def _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_src0, k_src1, v_src0, v_src1, f_ptr,
             stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
             start_n, k_len, qk_scale,
             MASK_N: tl.constexpr, ROPE_K: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq (unscaled) += p * (dp - delta) @ k over BLOCK_N keys; p recomputed from the saved LSE and
    dp = do_scale * dO v^T (do_scale = tanh(gate) for the text branch)."""
    k0, k1, v0, v1, n_mask = _load_kv_pair(k_src0, k_src1, v_src0, v_src1, f_ptr, stride_kt, stride_vt, stride_ft,
                                           stride_fi, stride_fc, start_n, k_len, MASK_N, ROPE_K, TMA, BLOCK_N,
                                           HEAD_DIM, D0, D1)
    p = tl.exp2(tl.fma(_scores(q0, q1, k0, k1, D1, DOT_PREC), qk_scale, -lse[:, None]))
    if MASK_N:
        p = tl.where(n_mask[None, :], p, 0.0)
    dp = _scores(do0, do1, v0, v1, D1, DOT_PREC) * do_scale
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
    if D1 > 0:
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_base, v_base, f_ptr,
              stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
              k_len, qk_scale,
              ROPE_K: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    k_src0, k_src1 = _kv_source(k_base, k_len, stride_kt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    v_src0, v_src1 = _kv_source(v_base, k_len, stride_vt, TMA, BLOCK_N, HEAD_DIM, D0, D1)
    n_full = (k_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_src0, k_src1, v_src0, v_src1, f_ptr,
                            stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
                            start_n, k_len, qk_scale, False, ROPE_K, TMA, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    if n_full < k_len:
        dq0, dq1 = _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, do_scale, k_src0, k_src1, v_src0, v_src1, f_ptr,
                            stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
                            n_full, k_len, qk_scale, True, ROPE_K, TMA, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    return dq0, dq1


@_autotune(DQ_CONFIGS, key=["HEAD_DIM", "HAS_TEXT", "ROPE", "DOT_PREC", "TMA_OK"])
@triton.jit
def _bwd_dq(
    Q, K, V, TK, TV, TGATE, FREQS, DO, DQ, LSE, LSE_T, DELTA, DELTA_T, CU, TCU,
    qk_scale, text_qk_scale, sm_scale, text_scale, T, GROUP,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_tkt, stride_tkh,
    stride_tvt, stride_tvh,
    stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_ft, stride_fi, stride_fc,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TEXT: tl.constexpr, ROPE: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA_OK: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):
    """dq of one block of queries for one head: self keys (rotated; through tensor descriptors with TMA), then
    text keys; rotated back at the end."""
    tl.static_assert(TMA_OK or not TMA)
    stride_qt, stride_qh = _aligned(stride_qt, VEC), _aligned(stride_qh, VEC)
    stride_kt, stride_kh = _aligned(stride_kt, VEC), _aligned(stride_kh, VEC)
    stride_vt, stride_vh = _aligned(stride_vt, VEC), _aligned(stride_vh, VEC)
    stride_tkt, stride_tkh = _aligned(stride_tkt, VEC), _aligned(stride_tkh, VEC)
    stride_tvt, stride_tvh = _aligned(stride_tvt, VEC), _aligned(stride_tvh, VEC)
    stride_dot, stride_doh = _aligned(stride_dot, VEC), _aligned(stride_doh, VEC)
    stride_dqt, stride_dqh = _aligned(stride_dqt, VEC), _aligned(stride_dqh, VEC)
    pid_m = tl.program_id(0)
    b, h, hk = _query_heads(GROUP)
    start, seq_len = _segment(CU, b)
    if pid_m * BLOCK_M >= seq_len:
        return
    start = start.to(tl.int64)
    rows, m_mask, f_ptr, q0, q1, lse_off = _query_tile(Q, FREQS, start, seq_len, pid_m, h, T, stride_qt, stride_qh,
                                                       stride_ft, stride_fi, stride_fc, ROPE, BLOCK_M, HEAD_DIM,
                                                       D0, D1)
    do0, do1 = _load_tile(DO + start * stride_dot + h * stride_doh, rows, m_mask, stride_dot,
                          f_ptr, stride_ft, stride_fi, stride_fc, False, BLOCK_M, HEAD_DIM, D0, D1)
    lse = tl.load(LSE + lse_off, mask=m_mask, other=0.0) * _LOG2E
    delta = tl.load(DELTA + lse_off, mask=m_mask, other=0.0)
    dq0, dq1 = _zeros_tile(BLOCK_M, D0, D1)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, 1.0, K + start * stride_kt + hk * stride_kh,
                         V + start * stride_vt + hk * stride_vh, f_ptr,
                         stride_kt, stride_vt, stride_ft, stride_fi, stride_fc,
                         seq_len, qk_scale, ROPE, TMA, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
    if HAS_TEXT:
        t_start, t_len = _segment(TCU, b)
        t_start = t_start.to(tl.int64)
        lse_t = tl.load(LSE_T + lse_off, mask=m_mask, other=0.0) * _LOG2E
        delta_t = tl.load(DELTA_T + lse_off, mask=m_mask, other=0.0)
        # One accumulator pair for both branches: dq = ts * (self * sm / ts + text), scaled once at the end.
        dq0 = dq0 * (sm_scale / text_scale)
        dq1 = dq1 * (sm_scale / text_scale)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse_t, delta_t, tl.load(TGATE + h),
                             TK + t_start * stride_tkt + hk * stride_tkh, TV + t_start * stride_tvt + hk * stride_tvh,
                             f_ptr, stride_tkt, stride_tvt, stride_ft, stride_fi, stride_fc,
                             t_len, text_qk_scale, False, False, BLOCK_N, HEAD_DIM, D0, D1, DOT_PREC)
        dq0 = dq0 * text_scale
        dq1 = dq1 * text_scale
    else:
        dq0 = dq0 * sm_scale
        dq1 = dq1 * sm_scale
    if ROPE:
        dq0, dq1 = _rotate_back(dq0, dq1, f_ptr, rows, m_mask, stride_ft, stride_fi, stride_fc,
                                BLOCK_M, HEAD_DIM, D0, D1)
    _store_tile(DQ + start * stride_dqt + h * stride_dqh, rows, m_mask, stride_dqt, dq0, dq1, HEAD_DIM, D0, D1)


@triton.jit
def _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr, delta_ptr, f_ptr,
               stride_qt, stride_dot, stride_ft, stride_fi, stride_fc,
               start_m, q_len, qk_scale, do_scale,
               MASK_M: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               D0: tl.constexpr, D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """dv += (do_scale * p)^T dO, dk (unscaled) += ds^T q over BLOCK_M queries, with transposed scores
    (keys x queries) so nothing big is transposed. do_scale = tanh(gate[h]) for text keys, 1 for self keys."""
    rows, m_mask = _loop_tile(start_m, q_len, MASK_M, BLOCK_M)
    shift = tl.cast(start_m, tl.int64)
    f_ptr = f_ptr + shift * stride_ft
    q0, q1 = _load_tile(q_base + shift * stride_qt, rows, m_mask, stride_qt, f_ptr, stride_ft, stride_fi, stride_fc,
                        ROPE, BLOCK_M, HEAD_DIM, D0, D1)
    do0, do1 = _load_tile(do_base + shift * stride_dot, rows, m_mask, stride_dot, f_ptr, stride_ft, stride_fi,
                          stride_fc, False, BLOCK_M, HEAD_DIM, D0, D1)
    lse = tl.load(lse_ptr + shift + rows, mask=m_mask, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + shift + rows, mask=m_mask, other=0.0)
    p_t = tl.exp2(tl.fma(_scores(k0, k1, q0, q1, D1, DOT_PREC), qk_scale, -lse[None, :]))
    if MASK_M:
        p_t = tl.where(m_mask[None, :], p_t, 0.0)
    # Folding do_scale into p keeps a single dv accumulator across the GQA group (a per-head one would spill).
    pg = (p_t * do_scale).to(do0.dtype)
    dv0 = tl.dot(pg, do0, dv0, input_precision=DOT_PREC)
    if D1 > 0:
        dv1 = tl.dot(pg, do1, dv1, input_precision=DOT_PREC)
    dp_t = _scores(v0, v1, do0, do1, D1, DOT_PREC) * do_scale
    ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
    dk0 = tl.dot(ds_t, q0, dk0, input_precision=DOT_PREC)
    if D1 > 0:
        dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _load_keys(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc, is_text,
               ROPE: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """A key tile: rotated when ROPE, except text keys (``is_text``, a run-time flag), which are never rotated."""
    if ROPE:
        if is_text:
            x0, x1 = _load_tile(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                                False, R, HEAD_DIM, D0, D1)
        else:
            x0, x1 = _load_tile(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                                True, R, HEAD_DIM, D0, D1)
    else:
        x0, x1 = _load_tile(base, rows, row_mask, stride_t, f_ptr, stride_ft, stride_fi, stride_fc,
                            False, R, HEAD_DIM, D0, D1)
    return x0, x1


@_autotune(DKDV_CONFIGS, key=["HEAD_DIM", "HAS_TEXT", "ROPE", "DOT_PREC"])
@triton.jit
def _bwd_dkdv(
    Q, K, V, TK, TV, TGATE, FREQS, DO, DK, DV, DTK, DTV, LSE, LSE_T, DELTA, DELTA_T, CU, TCU,
    qk_scale, text_qk_scale, sm_scale, text_scale, T, GROUP, text_max_seqlen,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_tkt, stride_tkh,
    stride_tvt, stride_tvh,
    stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dtkt, stride_dtkh,
    stride_ft, stride_fi, stride_fc,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TEXT: tl.constexpr, ROPE: tl.constexpr,
    DOT_PREC: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one block of keys for one kv head, summed over the GQA group's query heads in a fixed order
    (deterministic). Self keys and text keys share the launch: the first cdiv(text_max_seqlen, BLOCK_N) key blocks
    of the grid are the sample's text keys. (A separate text launch has only batch * Hkv programs, each looping
    over all of its sample's queries: on a long sample it runs as long as a self key block, on an idle GPU.)
    Both kinds run the same code on run-time pointers and scales, so the loop is compiled once; what only the
    epilogue needs is selected after the loop, so it does not occupy registers during it."""
    stride_qt, stride_qh = _aligned(stride_qt, VEC), _aligned(stride_qh, VEC)
    stride_kt, stride_kh = _aligned(stride_kt, VEC), _aligned(stride_kh, VEC)
    stride_vt, stride_vh = _aligned(stride_vt, VEC), _aligned(stride_vh, VEC)
    stride_tkt, stride_tkh = _aligned(stride_tkt, VEC), _aligned(stride_tkh, VEC)
    stride_tvt, stride_tvh = _aligned(stride_tvt, VEC), _aligned(stride_tvh, VEC)
    stride_dot, stride_doh = _aligned(stride_dot, VEC), _aligned(stride_doh, VEC)
    stride_dkt, stride_dkh = _aligned(stride_dkt, VEC), _aligned(stride_dkh, VEC)
    stride_dtkt, stride_dtkh = _aligned(stride_dtkt, VEC), _aligned(stride_dtkh, VEC)
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    if HAS_TEXT:
        n_text = tl.cdiv(text_max_seqlen, BLOCK_N)
        is_text = pid_n < n_text
    else:
        n_text = 0
        is_text = False  # a compile-time constant: no text branch compiled at all
    if is_text:
        k_ptr, v_ptr, lse_base, delta_base, cu_k = TK, TV, LSE_T, DELTA_T, TCU
        stride_kt, stride_kh = stride_tkt, stride_tkh
        stride_vt, stride_vh = stride_tvt, stride_tvh
        qk_scale = text_qk_scale
    else:
        k_ptr, v_ptr, lse_base, delta_base, cu_k = K, V, LSE, DELTA, CU
        pid_n -= n_text
    k_start, k_len = _segment(cu_k, b)
    if pid_n * BLOCK_N >= k_len:
        return
    q_start, q_len = _segment(CU, b)
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)
    n_rows, n_mask = _tile_rows(pid_n * BLOCK_N, k_len, True, BLOCK_N)
    f_ptr = FREQS + q_start * stride_ft  # self keys share the queries' token positions
    k0, k1 = _load_keys(k_ptr + k_start * stride_kt + hk * stride_kh, n_rows, n_mask, stride_kt,
                        f_ptr, stride_ft, stride_fi, stride_fc, is_text, ROPE, BLOCK_N, HEAD_DIM, D0, D1)
    v0, v1 = _load_tile(v_ptr + k_start * stride_vt + hk * stride_vh, n_rows, n_mask, stride_vt,
                        f_ptr, stride_ft, stride_fi, stride_fc, False, BLOCK_N, HEAD_DIM, D0, D1)
    dk0, dk1 = _zeros_tile(BLOCK_N, D0, D1)
    dv0, dv1 = _zeros_tile(BLOCK_N, D0, D1)
    m_full = (q_len // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        do_scale = 1.0
        if is_text:
            do_scale = tl.load(TGATE + h)  # the text branch sees dO * tanh(gate[h])
        q_base = Q + q_start * stride_qt + h * stride_qh
        do_base = DO + q_start * stride_dot + h * stride_doh
        lse_ptr = lse_base + h.to(tl.int64) * T + q_start
        delta_ptr = delta_base + h.to(tl.int64) * T + q_start
        for start_m in range(0, m_full, BLOCK_M):
            dk0, dk1, dv0, dv1 = _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr, delta_ptr,
                                            f_ptr, stride_qt, stride_dot, stride_ft,
                                            stride_fi, stride_fc, start_m, q_len, qk_scale, do_scale,
                                            False, ROPE, BLOCK_M, HEAD_DIM, D0, D1, DOT_PREC)
        if m_full < q_len:
            dk0, dk1, dv0, dv1 = _dkdv_tile(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_ptr, delta_ptr,
                                            f_ptr, stride_qt, stride_dot, stride_ft,
                                            stride_fi, stride_fc, m_full, q_len, qk_scale, do_scale,
                                            True, ROPE, BLOCK_M, HEAD_DIM, D0, D1, DOT_PREC)
    if is_text:
        dk_ptr, dv_ptr, stride_dkt, stride_dkh, sm_scale = DTK, DTV, stride_dtkt, stride_dtkh, text_scale
    else:
        dk_ptr, dv_ptr = DK, DV
    dk0 = dk0 * sm_scale
    dk1 = dk1 * sm_scale
    if ROPE:  # noqa: SIM102 - a compile-time test outside the run-time one: no rotation code without RoPE
        if not is_text:
            dk0, dk1 = _rotate_back(dk0, dk1, f_ptr, n_rows, n_mask, stride_ft, stride_fi, stride_fc,
                                    BLOCK_N, HEAD_DIM, D0, D1)
    out_base = k_start * stride_dkt + hk * stride_dkh
    _store_tile(dk_ptr + out_base, n_rows, n_mask, stride_dkt, dk0, dk1, HEAD_DIM, D0, D1)
    _store_tile(dv_ptr + out_base, n_rows, n_mask, stride_dkt, dv0, dv1, HEAD_DIM, D0, D1)


# fmt: on

# --------------------------------------------------------------------------------------------------------------


# Launchers (plain tensors in, plain tensors out; autograd lives in flagdit_kernels/ops/attention.py)
# --------------------------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _chunks(head_dim: int) -> dict:
    """Head-dim chunks D0 (largest power of two <= Dh) and D1 (power of two >= 16 covering the rest, or 0)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return {"D0": max(d0, 16), "D1": max(16, triton.next_power_of_2(rest)) if rest else 0}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs promise fp32 accuracy (DESIGN.md: rel-L2 < 1e-4), which TF32 cannot give.
    return "ieee" if dtype == torch.float32 else "tf32"


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The tiles the autotuner chose so far in this process, per kernel: {tuning key: config}, for reports."""
    kernels = {"forward": _fwd_kernel, "dq": _bwd_dq, "dk/dv": _bwd_dkdv}
    return {name: {str(key): str(config) for key, config in k.cache.items()} for name, k in kernels.items()}


def _rows(*tensors: torch.Tensor) -> tuple[int, ...]:
    """(token stride, head stride) of each (T, H, Dh) tensor, whose head dim the kernels read as contiguous; 0
    for a dim of size 1 (never stepped along, and an odd stride there would cost the vector width)."""
    return tuple(stride if size > 1 else 0 for t in tensors for size, stride in zip(t.shape[:2], t.stride()[:2]))


def _vector_width(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every (T, H, Dh) tensor starts 16-byte aligned and its token and head strides
    are multiples of 16 bytes (contiguous tensors at any head dim that is a multiple of 8, and views of a fused
    QKV projection), so the kernels may tell Triton so; else 1."""
    size = tensors[0].element_size()
    vec = 16 // size
    for t in tensors:
        if t.data_ptr() % 16 or any(s % vec for s in _rows(t)):
            return 1
    return vec


def _unit_head_dim(*tensors: torch.Tensor | None) -> list:
    """The tensors with a contiguous head dim (stride 1), copied only where needed: the kernels read 16-byte
    vectors along it. Views of a fused QKV projection keep stride 1 and are not copied."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors]


_ASSUMED_CAPABILITY: tuple[int, int] | None = None


@contextlib.contextmanager
def assume_capability(capability: tuple[int, int]) -> Iterator[None]:
    """Launch decisions inside are taken as for a GPU of this compute capability, whatever device the tensors
    are on: for the compile report, which compiles for a GPU this machine does not have."""
    global _ASSUMED_CAPABILITY
    saved, _ASSUMED_CAPABILITY = _ASSUMED_CAPABILITY, capability
    try:
        yield
    finally:
        _ASSUMED_CAPABILITY = saved


def _capability(device: torch.device) -> tuple[int, int] | None:
    if _ASSUMED_CAPABILITY is not None:
        return _ASSUMED_CAPABILITY
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _descriptor_ready(*tensors: torch.Tensor) -> bool:
    """Whether the forward may read these (T, H, Dh) tensors through tensor descriptors: a GPU with the copy
    engine (sm_90+), 16-byte aligned data and token/head strides (views of a fused QKV projection are), and a
    Triton with device-side descriptors. Sets Triton's scratch allocator (descriptors are built in global
    memory) unless the application set its own."""
    if INTERPRETED or not hasattr(tl, "make_tensor_descriptor"):
        return False
    capability = _capability(tensors[0].device)
    if capability is None or capability[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * size) % 16 or (t.stride(1) * size) % 16:
            return False
    if tensors[0].device.type == "cuda":
        _ensure_scratch_allocator()
    return True


def _ensure_scratch_allocator() -> None:
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _freq_args(freqs: torch.Tensor | None, q: torch.Tensor):
    if freqs is None:
        return q, (0, 0, 0)  # never dereferenced: ROPE is a constexpr False
    return freqs, tuple(freqs.stride())


def _text_pointers(text_k, text_v, text_cu_seqlens, k, v, cu_seqlens):
    """(text_k, text_v, text_cu_seqlens) to launch with. Without text, or with zero text tokens in the whole
    batch, the kernels never dereference them (HAS_TEXT is a constexpr; every text length is 0), but Triton must
    not be handed an empty or absent tensor's null pointer: the self-attention tensors stand in."""
    has_text = text_k is not None
    tk = text_k if has_text and text_k.numel() else k
    tv = text_v if has_text and text_v.numel() else v
    return tk, tv, text_cu_seqlens if has_text else cu_seqlens


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    text_k: torch.Tensor | None,
    text_v: torch.Tensor | None,
    text_cu_seqlens: torch.Tensor | None,
    tanh_gate: torch.Tensor | None,
    freqs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, o_text, lse_self, lse_text)``; LSEs are fp32 ``(H, T)`` in natural log; o_text and
    lse_text are empty without text. ``tanh_gate`` is fp32 ``(H,)`` (the gate already through tanh)."""
    q, k, v, text_k, text_v = _unit_head_dim(q, k, v, text_k, text_v)
    T, H, D = q.shape
    h_kv = k.shape[1]
    batch = cu_seqlens.numel() - 1
    has_text = text_k is not None
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    o_text = torch.empty((T, H, D) if has_text else (0,), dtype=q.dtype, device=q.device)
    lse_t = torch.empty((H, T) if has_text else (0,), dtype=torch.float32, device=q.device)
    if T == 0 or max_seqlen == 0:
        return out, o_text, lse, lse_t
    tk, tv, tcu = _text_pointers(text_k, text_v, text_cu_seqlens, k, v, cu_seqlens)
    tg = tanh_gate if has_text else lse
    ot = o_text if has_text else out
    lt = lse_t if has_text else lse
    f, f_strides = _freq_args(freqs, q)
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), H, batch)
    _launch(
        _fwd_kernel, grid,
        q, k, v, tk, tv, tg, f, out, ot, lse, lt, cu_seqlens, tcu,
        softmax_scale * LOG2E, LOG2E / math.sqrt(D), T, H // h_kv,
        *_rows(q, k, v, tk, tv, out),
        *f_strides,
        HEAD_DIM=D, **_chunks(D), HAS_TEXT=has_text, ROPE=freqs is not None,
        DOT_PREC=_dot_precision(q.dtype), TMA_OK=_descriptor_ready(k, v), VEC=_vector_width(q, k, v, tk, tv, out),
    )  # fmt: skip
    return out, o_text, lse, lse_t


def backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    o_text: torch.Tensor,
    lse: torch.Tensor,
    lse_t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    text_k: torch.Tensor | None,
    text_v: torch.Tensor | None,
    text_cu_seqlens: torch.Tensor | None,
    text_max_seqlen: int,
    tanh_gate: torch.Tensor | None,
    freqs: torch.Tensor | None,
):
    """Returns ``(dq, dk, dv, d_text_k, d_text_v, d_tanh_gate)`` (the text ones None without text); ``dlse`` is
    the gradient of the self-attention LSE, fp32 ``(H, T)``, or None.
    d_tanh_gate is fp32 ``(H,)``: per-token partial sums written by the preprocess kernel, summed per head."""
    dout, q, k, v, text_k, text_v = _unit_head_dim(dout, q, k, v, text_k, text_v)
    T, H, D = q.shape
    h_kv = k.shape[1]
    batch = cu_seqlens.numel() - 1
    has_text = text_k is not None
    dev = q.device
    dq = torch.empty((T, H, D), dtype=q.dtype, device=dev)
    dk = torch.empty((T, h_kv, D), dtype=k.dtype, device=dev)
    dv = torch.empty((T, h_kv, D), dtype=v.dtype, device=dev)
    dtk = torch.zeros(text_k.shape, dtype=text_k.dtype, device=dev) if has_text else None
    dtv = torch.zeros(text_v.shape, dtype=text_v.dtype, device=dev) if has_text else None
    delta = torch.empty((H, T), dtype=torch.float32, device=dev)
    delta_t = torch.empty((H, T), dtype=torch.float32, device=dev) if has_text else delta
    r = torch.empty((H, T), dtype=torch.float32, device=dev) if has_text else delta
    if T == 0 or max_seqlen == 0:
        dgate = torch.zeros(H, dtype=torch.float32, device=dev) if has_text else None
        return dq, dk, dv, dtk, dtv, dgate
    block_d = _block_d(D)
    tg = tanh_gate if has_text else delta
    ot = o_text if has_text else out
    block_t = 32 if INTERPRETED else 64
    if dlse is not None:
        dlse = dlse.contiguous()
    _bwd_preprocess[(triton.cdiv(T, block_t), H)](
        dout, out, ot, tg, delta if dlse is None else dlse, delta, delta_t, r, T,
        *_rows(dout, out),
        HEAD_DIM=D, BLOCK_D=block_d, HAS_TEXT=has_text, HAS_DLSE=dlse is not None, VEC=_vector_width(dout, out, ot),
        BLOCK_T=block_t,
    )  # fmt: skip
    f, f_strides = _freq_args(freqs, q)
    tk, tv, tcu = _text_pointers(text_k, text_v, text_cu_seqlens, k, v, cu_seqlens)
    prec = _dot_precision(q.dtype)
    text_scale = 1.0 / math.sqrt(D)
    rope = freqs is not None
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), H, batch)
    _launch(
        _bwd_dq, grid,
        q, k, v, tk, tv, tg, f, dout, dq, lse, lse_t if has_text else lse, delta, delta_t, cu_seqlens, tcu,
        softmax_scale * LOG2E, text_scale * LOG2E, softmax_scale, text_scale, T, H // h_kv,
        *_rows(q, k, v, tk, tv, dout, dq),
        *f_strides,
        HEAD_DIM=D, **_chunks(D), HAS_TEXT=has_text, ROPE=rope, DOT_PREC=prec, TMA_OK=_descriptor_ready(k, v),
        VEC=_vector_width(q, k, v, tk, tv, dout, dq),
    )  # fmt: skip
    # Text key blocks first in the grid (program ids are dispatched in order): they run alongside the self ones.
    text_len = text_max_seqlen if has_text else 0
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]) + triton.cdiv(text_len, meta["BLOCK_N"]),
                         h_kv, batch)  # fmt: skip
    dtk_, dtv_ = (dtk, dtv) if has_text and text_k.numel() else (dk, dv)
    _launch(
        _bwd_dkdv, grid,
        q, k, v, tk, tv, tg, f, dout, dk, dv, dtk_, dtv_, lse, lse_t if has_text else lse, delta, delta_t,
        cu_seqlens, tcu,
        softmax_scale * LOG2E, text_scale * LOG2E, softmax_scale, text_scale, T, H // h_kv, text_len,
        *_rows(q, k, v, tk, tv, dout, dk, dtk_), *f_strides,
        HEAD_DIM=D, **_chunks(D), HAS_TEXT=has_text, ROPE=rope, DOT_PREC=prec,
        VEC=_vector_width(q, k, v, tk, tv, dout, dk, dtk_),
    )  # fmt: skip
    dgate = r.sum(dim=1) if has_text else None
    return dq, dk, dv, dtk, dtv, dgate
