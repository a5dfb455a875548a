"""The norm family's fused kernels: ``rms_norm``, ``rms_norm_modulate``, ``gated_residual_rms_norm`` and
``layer_norm_modulate``.

One forward kernel and one backward kernel serve every op: ``NORM`` picks the normalisation (RMSNorm or
LayerNorm; its math is shared with the QK-norm kernel through ``_helpers.py``) and ``MODE`` the epilogue
(plain, modulate, gated), plus a small segment-sum kernel that finishes the per-sample parameter gradients.
No autograd and no dispatch here: ``flagdit_kernels/ops/norms.py`` wraps these launchers into
``torch.library`` custom ops.

Numerics follow ``flagdit_kernels/reference/norms.py``. RMSNorm (Lumina-T2X): the row's mean square and rstd
in fp32, ``x * rstd`` rounded to x's dtype, times the weight in fp32 and rounded again. LayerNorm (torch's
``layer_norm``): mean, centred variance and rstd in fp32, ``xhat * weight + bias`` in fp32 and rounded once.
Then the modulation (``* (1 + scale) + shift``) or the gated residual (``residual + act(gate) * .``) in fp32,
rounded once. rstd is the one statistic saved for the backward; LayerNorm's backward recomputes the row mean
from x (it reads the row anyway).

Layouts. Rows are addressed through a ``(B, L, D)`` view of x with arbitrary strides on B and L, so strided
leading dims (a slice of a larger buffer, a transposed batch) are read in place; the last dim must have unit
stride (the launchers copy otherwise). Kernels take such a view as one ``(pointer, stride_b, stride_l)``
tuple. A per-sample parameter (scale/shift/gate) is read either

* packed: ``(B, D)`` rows picked by the token's sample, read per row from the row-sample index the launcher
  builds from ``cu_seqlens`` (on the device, no host sync; see Samples), or
* strided: the parameter expanded to x's shape, read at ``b * stride_b + l * stride_l`` (``stride_l == 0``
  for per-sample ``(B, D)`` with padded ``(B, L, D)`` x and for a ``(D,)`` vector).

Samples. The launchers find every row's sample once per launch with the reference's own rule
(``reference.norms.token_sample_index``: ``torch.searchsorted`` of the row over ``cu_seqlens[1:]``, a few small
device ops, no host sync) and the kernels read it per row (4 bytes a row, prefetched with the row), clamped
to ``[0, B)``. Neither the kernels' work per row, their registers nor their binaries depend on the number of
samples (``n_samples`` is not specialized); an in-kernel search per row was tried and dropped: the pipeliner
prefetches its index loads too (128 registers at 8 steps, a compile that did not finish at 31).

Bad offsets. Whatever ``cu_seqlens`` holds (its values are not checked on the GPU), a row's sample is what
that search finds, clamped to ``[0, B)``, in the forward and in every backward reduction alike and on the
reference too; for any offsets it never decreases along the rows (a binary search is monotone in the value
it looks for), and rows are clamped to ``[0, T)``: no kernel reads or writes outside its tensors, every row's
gradient lands in the sample its forward used, and the per-sample gradient slots start zeroed, so no result
holds memory nothing wrote.

Backward reductions. ``dweight`` (and LayerNorm's ``dbias``) is summed per program into an fp32
``(programs, D)`` buffer and finished by one ``sum(0)``. A parameter that is constant along L (per sample)
is summed per (program, sample) segment: a program walks its contiguous block of rows and flushes its
accumulator to slot
``program + sample`` whenever the sample changes, and records the first and last sample it saw.
``program + sample`` is strictly increasing along the rows (samples never decrease along them), so the slots
never collide and the buffer has ``programs + samples - 1`` rows; ``_segment_sum_kernel`` then adds, for
each sample, the slots of the programs whose first..last range holds it (found by binary searches over the
programs' records, so its work too is independent of the number of samples). No atomics anywhere, so the
result is deterministic. A parameter that varies along L (the general broadcast, e.g. the same shape as x) gets its
per-row gradient written out and reduced by ``Tensor.sum_to_size`` (a documented, slower path).

Grids. Both kernels are persistent: as many programs as the GPU holds at once for the compiled variant
(``_helpers.persistent_grid``: SMs x resident programs, read from the kernel's registers and shared memory),
so there is no second, partial wave. A forward program takes every programs-th tile; a backward program walks
one contiguous block of rows (so its partial sums stay a few percent of the row traffic). Both row loops
prefetch the next tiles with cp.async (``tl.range(num_stages=...)``), except the backward of small-D tiles
that may span samples (its inner loop over samples keeps the pipeliner off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.norms import token_sample_index
from ._helpers import (
    NORM_LAYER,
    NORM_RMS,
    centered,
    norm_input_grad,
    num_warps,
    persistent_grid,
    tanh,
    whole_vectors,
)

# The epilogue a kernel applies to the normalized rows (constexpr MODE).
MODE_PLAIN = tl.constexpr(0)  # y = rms_norm(x) * weight
MODE_MODULATE = tl.constexpr(1)  # y = rms_norm(x) * weight * (1 + scale) + shift
MODE_GATED = tl.constexpr(2)  # y = residual + act(gate) * rms_norm(x) * weight
# The normalisation (constexpr NORM): NORM_RMS or NORM_LAYER (from _helpers.py, the QK-norm kernel's codes).

# A forward program normalizes a [ROWS, BLOCK_D] tile; small D packs several rows into one program so the
# tile stays around this many elements (enough loads in flight per SM without spilling registers).
FWD_TILE_ELEMS = 4096
MAX_FWD_ROWS = 16
# A backward program walks its rows in [ROWS, BLOCK_D] tiles of about this many elements (one row from D =
# 2048 up), 16 warps for 4096: small programs, so that two are resident per SM and their loads overlap.
BWD_TILE_ELEMS = 4096
MAX_BWD_ROWS = 16
# Values per warp of a tile: 16-byte accesses move 8 bf16 per thread, so 512 values are 2 vectors per thread
# (the forward) and 256 one vector (the backward, which keeps x, dy, the weight and the weight-gradient sums
# of its columns in registers: 8 columns per thread keep it at 64 registers, two programs per SM).
FWD_ELEMS_PER_WARP = 512
BWD_ELEMS_PER_WARP = 256
# Tiles in flight per program: the persistent loops prefetch the next tiles' rows (x, dy, the per-sample
# parameter rows) into shared memory with cp.async, so the bytes in flight per SM are not bounded by registers.
FWD_STAGES = 3
BWD_STAGES = 3
# The interpreter runs programs one after the other: a handful is enough and keeps chunk and segment crossings
# tested.
FWD_PROGRAMS_INTERPRETED = 3
BWD_PROGRAMS_INTERPRETED = 4
# A segment-sum program adds up about this many (sample, column) values: many samples per program for small D.
SEGMENT_TILE = 4096


@triton.jit
def _row_tile(rows, row_limit, cmask, L):
    """(row mask, element mask, b, l) of a [ROWS, BLOCK_D] tile of rows of the (B, L, D) view."""
    rmask = rows < row_limit
    mask = rmask[:, None] & cmask[None, :]
    b = rows // L
    l = rows - b * L
    return rmask, mask, b, l


@triton.jit
def _load_rows(view, b, l, cols, mask):
    """The tile's rows of a ``(pointer, stride_b, stride_l)`` view with unit D stride, fp32, zeros outside
    ``mask``."""
    ptr, stride_b, stride_l = view
    return tl.load(ptr + (b * stride_b + l * stride_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _vector_view(view, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """A ``(pointer, stride_b, stride_l)`` view whose strides are, when ALIGNED (checked on the host), marked as
    whole 16-byte vectors (VEC elements), so that its rows load as 16-byte vectors (a row stride such as 72 or
    1000 is not divisible by 16, which is all the JIT can mark)."""
    ptr, stride_b, stride_l = view
    if ALIGNED:
        stride_b, stride_l = whole_vectors(stride_b, VEC), whole_vectors(stride_l, VEC)
    return ptr, stride_b, stride_l


@triton.jit
def _search_step(ptr, stride, n, value, found, step):
    """One step of a branchless binary search for how many of the ``n`` sorted values ``ptr[0], ptr[stride],
    ...`` are <= ``value``: takes ``step`` more where the value there is still <= ``value`` (loading only inside
    the ``n`` values). Steps are powers of two, largest first. For unsorted values the count stays in [0, n]
    and never decreases as ``value`` grows (where two values first go different ways, the larger takes the
    step)."""
    cand = found + step
    inside = cand <= n
    probe = tl.load(ptr + (cand - 1) * stride, mask=inside, other=0)
    return tl.where(inside & (probe <= value), cand, found)


@triton.jit
def _sample_of(row_sample, rows, rmask, n_samples):
    """Sample of each packed row (or of one row) from the launcher's row-sample index, clamped so that bad
    offsets can never index outside the (B, D) parameters (see Bad offsets)."""
    found = tl.load(row_sample + rows, mask=rmask, other=0)
    return tl.minimum(found, n_samples - 1)


@triton.jit
def _param_offsets(param, rows, rmask, b, l, row_sample, n_samples, PACKED: tl.constexpr):
    """(row offsets of a per-sample / broadcast parameter view for the tile's rows, sample of each row)."""
    _, stride_b, stride_l = param
    if PACKED:
        s = _sample_of(row_sample, rows, rmask, n_samples).to(tl.int64)
        off = s * stride_b
    else:
        s = b
        off = b * stride_b + l * stride_l
    return off, s


@triton.jit
def _centered_rows(xv, mask, D, NORM: tl.constexpr):
    """The rows the norm scales: x for RMSNorm, x minus its row mean for LayerNorm (zeros outside ``mask``)."""
    if NORM == NORM_LAYER:
        mean = (tl.sum(xv, axis=1) / D)[:, None]
    else:
        mean = 0.0
    return centered(xv, mean, mask, NORM)


@triton.jit
def _norm_out(xhat, w, bias, HAS_W: tl.constexpr, HAS_B: tl.constexpr, NORM: tl.constexpr, x_dtype: tl.constexpr):
    """The norm's output in fp32, rounded where the reference rounds: RMSNorm round(round(xhat) * weight)
    (Lumina), LayerNorm round(xhat * weight + bias) (torch's layer_norm)."""
    if NORM == NORM_LAYER:
        if HAS_W:
            xhat = xhat * w
        if HAS_B:
            xhat = xhat + bias
        return xhat.to(x_dtype).to(tl.float32)
    n = xhat.to(x_dtype).to(tl.float32)
    if HAS_W:
        n = (n * w).to(x_dtype).to(tl.float32)
    return n


@triton.jit
def _fwd_tile(x, residual, weight, bias, p1, p2, y_ptr, rstd_ptr, row_sample, rows, cols, cmask, n_rows, D, L,
              n_samples, eps, NORM: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              HAS_P2: tl.constexpr, PACKED: tl.constexpr, TANH: tl.constexpr):  # fmt: skip
    """Normalizes one [ROWS, BLOCK_D] tile of rows, applies the MODE epilogue and stores y and rstd."""
    rmask, mask, b, l = _row_tile(rows, n_rows, cmask, L)
    xc = _centered_rows(_load_rows(x, b, l, cols, mask), mask, D, NORM)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    # The weight and bias are loaded only now: live across the row reduction they would cost registers.
    w = tl.load(weight + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_W else None
    bv = tl.load(bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_B else None
    out = _norm_out(xc * rstd[:, None], w, bv, HAS_W, HAS_B, NORM, x[0].dtype.element_ty)
    if MODE != MODE_PLAIN:
        off1, _ = _param_offsets(p1, rows, rmask, b, l, row_sample, n_samples, PACKED)
        pv = tl.load(p1[0] + off1[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == MODE_MODULATE:
            out = out * (1.0 + pv)
            if HAS_P2:
                off2, _ = _param_offsets(p2, rows, rmask, b, l, row_sample, n_samples, PACKED)
                out += tl.load(p2[0] + off2[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            g = tanh(pv) if TANH else pv
            out = _load_rows(residual, b, l, cols, mask) + g * out
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_samples"])  # one binary for every sample count
def _fwd_kernel(
    x,  # (ptr, stride_b, stride_l) views of (B, L, D) tensors with unit D stride
    residual,
    weight,  # (D,) pointers
    bias,  # LayerNorm's
    p1,  # scale (MODULATE) or gate (GATED) view
    p2,  # shift (MODULATE) view
    y_ptr,  # contiguous output
    rstd_ptr,
    row_sample,  # (rows,) sample of every packed row when PACKED (see Samples)
    n_rows,
    D,
    L,
    n_samples,
    eps,
    NORM: tl.constexpr,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_P2: tl.constexpr,
    PACKED: tl.constexpr,
    TANH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    ALIGNED: tl.constexpr,  # D, the row strides and the pointers are whole 16-byte vectors (VEC elements)
    VEC: tl.constexpr,
):
    """Persistent: program p normalizes tiles p, p + programs, ...; the loop prefetches the next tiles."""
    if ALIGNED:
        D = whole_vectors(D, VEC)
    x, residual = _vector_view(x, ALIGNED, VEC), _vector_view(residual, ALIGNED, VEC)
    p1, p2 = _vector_view(p1, ALIGNED, VEC), _vector_view(p2, ALIGNED, VEC)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS  # int64: row * D offsets overflow int32
        _fwd_tile(
            x, residual, weight, bias, p1, p2, y_ptr, rstd_ptr, row_sample, rows, cols, cmask, n_rows, D, L,
            n_samples, eps, NORM, MODE, HAS_W, HAS_B, HAS_P2, PACKED, TANH,
        )  # fmt: skip


@triton.jit
def _epilogue_grads(dy, a, pv, MODE: tl.constexpr, TANH: tl.constexpr):
    """(d a, d p1, d p2) per element: the gradients through the MODE epilogue of ``a`` (the normalized rows);
    the parameter gradients are not used in MODE_PLAIN, d p2 only in MODE_MODULATE."""
    d_p1 = dy * a
    d_p2 = dy
    if MODE == MODE_PLAIN:
        da = dy
    elif MODE == MODE_MODULATE:
        da = dy * (1.0 + pv)  # d scale = dy * a, d shift = dy
    elif TANH:
        act = tanh(pv)
        da = dy * act
        d_p1 = d_p1 * (1.0 - act * act)  # d gate
    else:
        da = dy * pv
    return da, d_p1, d_p2


@triton.jit
def _input_grads(da, xhat, rstd, w, dw_acc, db_acc, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 NORM: tl.constexpr, x_dtype: tl.constexpr):  # fmt: skip
    """(dx, dw_acc, db_acc): the gradient through the affine and the norm, and the weight / bias gradient sums
    updated (the weight multiplies round(xhat) in RMSNorm, xhat in LayerNorm). The roundings pass gradients
    straight."""
    if HAS_W:
        dw_acc += da * (xhat if NORM == NORM_LAYER else xhat.to(x_dtype).to(tl.float32))
        dn = da * w
    else:
        dn = da
    if HAS_B:
        db_acc += da
    if NORM == NORM_LAYER:
        mean_dn = (tl.sum(dn, axis=1) / D)[:, None]
    else:
        mean_dn = 0.0
    mean_dn_xhat = (tl.sum(dn * xhat, axis=1) / D)[:, None]
    return norm_input_grad(dn, xhat, rstd[:, None], mean_dn, mean_dn_xhat, NORM), dw_acc, db_acc


@triton.jit
def _store_slot(ptr, slot, D, cols, cmask, acc):
    """Writes the column sums of a [ROWS, BLOCK_D] accumulator, one (D,) fp32 partial sum, to row ``slot`` of
    a partial-sum buffer."""
    tl.store(ptr + slot.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _for_sample(acc, cur, t, ptr, pid, D, cols, cmask, SEG: tl.constexpr):
    """The accumulator for sample ``t``: ``acc`` while t is the current sample ``cur``, else a zeroed one after
    writing ``acc`` to slot ``pid + cur``."""
    if SEG:  # noqa: SIM102 (a constexpr gate around a runtime test)
        if t != cur:
            _store_slot(ptr, pid + cur, D, cols, cmask, acc)
            acc = tl.zeros_like(acc)
    return acc


@triton.jit
def _flush_segments(acc1, acc2, cur, s, rmask, g1, g2, dp1_ptr, dp2_ptr, pid, D, cols, cmask,
                    SEG1: tl.constexpr, SEG2: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Adds the tile's per-element parameter gradients (g1, g2) to the running per-sample sums (acc1, acc2)
    of sample ``cur``; where the tile's rows reach later samples, flushes the sums to slot ``pid + sample``
    first. The tile's rows belong to samples s_lo..s_hi (one in the common case). Returns (acc1, acc2, cur).
    A one-row tile takes a path without a loop: a loop here would keep the pipeliner off the row loop."""
    s_lo = tl.min(tl.where(rmask, s, 2147483647), axis=0)
    s_hi = tl.max(tl.where(rmask, s, -1), axis=0)
    if ROWS == 1:  # one row, one sample: no selection
        acc1 = _for_sample(acc1, cur, s_lo, dp1_ptr, pid, D, cols, cmask, SEG1)
        acc2 = _for_sample(acc2, cur, s_lo, dp2_ptr, pid, D, cols, cmask, SEG2)
        if SEG1:
            acc1 += g1
        if SEG2:
            acc2 += g2
        return acc1, acc2, s_lo
    # Only the samples the tile's rows have (at most ROWS): empty samples between them keep their zeroed slots.
    t = s_lo
    while t <= s_hi:
        acc1 = _for_sample(acc1, cur, t, dp1_ptr, pid, D, cols, cmask, SEG1)
        acc2 = _for_sample(acc2, cur, t, dp2_ptr, pid, D, cols, cmask, SEG2)
        cur = t
        sel = (s == t)[:, None]
        if SEG1:
            acc1 += tl.where(sel, g1, 0.0)
        if SEG2:
            acc2 += tl.where(sel, g2, 0.0)
        t = tl.min(tl.where(rmask & (s > t), s, s_hi + 1), axis=0)
    return acc1, acc2, cur


@triton.jit(do_not_specialize=["n_samples", "rows_per_prog"])
def _bwd_kernel(
    dy,  # (ptr, stride_b, stride_l) views like the forward's
    x,
    weight,
    bias,  # LayerNorm's (the modulation's scale gradient needs the norm's output)
    p1,  # scale or gate (shift's value is not needed for any gradient)
    rstd_ptr,
    row_sample,
    dx_ptr,
    dw_ptr,  # (programs, D) fp32 partial sums
    db_ptr,
    dp1_ptr,  # per-row (rows, D) fp32, or (programs + samples - 1, D) fp32 segment sums
    dp2_ptr,
    seen_ptr,  # int32 (programs, 2): the first and last sample of each program's rows, when SEG1 or SEG2
    n_rows,
    D,
    L,
    n_samples,
    rows_per_prog,
    NORM: tl.constexpr,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_P2: tl.constexpr,
    SEG1: tl.constexpr,  # p1's gradient is summed per sample (segments) rather than written per row
    SEG2: tl.constexpr,
    PACKED: tl.constexpr,
    TANH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    ALIGNED: tl.constexpr,  # as in the forward
    VEC: tl.constexpr,
):
    """One program walks rows [pid * rows_per_prog, ...) in [ROWS, BLOCK_D] tiles. Its partial sums are kept
    in the tile's own shape and layout (reduced over rows only when written), so accumulating costs no data
    movement between threads."""
    if ALIGNED:
        D = whole_vectors(D, VEC)
    dy, x, p1 = _vector_view(dy, ALIGNED, VEC), _vector_view(x, ALIGNED, VEC), _vector_view(p1, ALIGNED, VEC)
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_prog  # int64 rows: the loop variables below inherit it
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x_dtype = x[0].dtype.element_ty

    w = tl.load(weight + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_W else None
    bv = tl.load(bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] if HAS_B else None
    dw_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    if PACKED:
        cur = _sample_of(row_sample, row_start, row_start < n_rows, n_samples).to(tl.int64)
    else:
        cur = row_start // L
    first = cur

    for r0 in tl.range(row_start, row_end, ROWS, num_stages=STAGES):
        rows = r0 + tl.arange(0, ROWS)
        rmask, mask, b, l = _row_tile(rows, row_end, cmask, L)
        xv = _load_rows(x, b, l, cols, mask)
        g = _load_rows(dy, b, l, cols, mask)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = _centered_rows(xv, mask, D, NORM) * rstd[:, None]

        if MODE == MODE_PLAIN:
            da = g
        else:
            off1, s = _param_offsets(p1, rows, rmask, b, l, row_sample, n_samples, PACKED)
            pv = tl.load(p1[0] + off1[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Masked rows load zeros, so every contribution below is zero there.
            da, g1, g2 = _epilogue_grads(g, _norm_out(xhat, w, bv, HAS_W, HAS_B, NORM, x_dtype), pv, MODE, TANH)
        out, dw_acc, db_acc = _input_grads(da, xhat, rstd, w, dw_acc, db_acc, D, HAS_W, HAS_B, NORM, x_dtype)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], out.to(dx_ptr.dtype.element_ty), mask=mask)

        if MODE != MODE_PLAIN:
            if SEG1 or SEG2:
                acc1, acc2, cur = _flush_segments(
                    acc1, acc2, cur, s, rmask, g1, g2, dp1_ptr, dp2_ptr, pid, D, cols, cmask, SEG1, SEG2, ROWS
                )
            if not SEG1:
                tl.store(dp1_ptr + rows[:, None] * D + cols[None, :], g1, mask=mask)
            if MODE == MODE_MODULATE and HAS_P2 and not SEG2:
                tl.store(dp2_ptr + rows[:, None] * D + cols[None, :], g2, mask=mask)

    if HAS_W:
        _store_slot(dw_ptr, pid, D, cols, cmask, dw_acc)
    if HAS_B:
        _store_slot(db_ptr, pid, D, cols, cmask, db_acc)
    if SEG1:
        _store_slot(dp1_ptr, pid + cur, D, cols, cmask, acc1)
    if SEG2:
        _store_slot(dp2_ptr, pid + cur, D, cols, cmask, acc2)
    if SEG1 or SEG2:
        tl.store(seen_ptr + 2 * pid, first.to(tl.int32))
        tl.store(seen_ptr + 2 * pid + 1, cur.to(tl.int32))


@triton.jit(do_not_specialize=["n_samples", "n_prog", "prog_steps"])
def _segment_sum_kernel(part_ptr, out_ptr, seen_ptr, D, n_samples, n_prog, prog_steps,
                        SAMPLES: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """out[s] = sum of the segment slots ``p + s`` of every program p whose rows reach sample s, for a block of
    SAMPLES samples and BLOCK columns (SAMPLES x BLOCK is about SEGMENT_TILE: small D sums many samples a program).

    Programs' (first, last) samples never decrease with p, so those programs are a run found by two binary
    searches over the programs' records (``prog_steps`` steps: log2 of the programs, not of the samples): from
    the first program whose last sample is >= s to the last one whose first sample is <= s (an empty run for a
    sample no row has). Each sample sums its slots in program order: deterministic.
    """
    s = tl.program_id(0) * SAMPLES + tl.arange(0, SAMPLES)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    smask = s < n_samples
    mask = smask[:, None] & (cols < D)[None, :]
    p0 = tl.zeros_like(s)  # programs whose last sample is < s
    p1 = tl.zeros_like(s)  # programs whose first sample is <= s
    for k in range(prog_steps):
        step = 1 << (prog_steps - 1 - k)
        p0 = _search_step(seen_ptr + 1, 2, n_prog, s - 1, p0, step)
        p1 = _search_step(seen_ptr, 2, n_prog, s, p1, step)
    acc = tl.zeros([SAMPLES, BLOCK], dtype=tl.float32)
    for p in range(tl.min(tl.where(smask, p0, n_prog), axis=0), tl.max(tl.where(smask, p1, 0), axis=0)):
        take = mask & ((p >= p0) & (p < p1))[:, None]
        acc += tl.load(part_ptr + (p + s).to(tl.int64)[:, None] * D + cols[None, :], mask=take, other=0.0)
    tl.store(out_ptr + s.to(tl.int64)[:, None] * D + cols[None, :], acc, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch helpers: strided (B, L, D) views, parameter layouts, buffers.


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """A ``(B, L, D)`` view of ``t`` (no copy when the last dim has unit stride and the leading dims except
    the last one can be merged; otherwise a contiguous copy)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        t = t.contiguous()
    d = t.shape[-1]
    if t.dim() == 1:
        return t.view(1, 1, d)
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, t.shape[-2], d)
    except RuntimeError:
        return t.reshape(-1, t.shape[-2], d)


def _view(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The kernels' ``(pointer, stride_b, stride_l)`` of a (B, L, D) view."""
    return t, t.stride(0), t.stride(1)


class _Param:
    """How the kernels read one per-sample / broadcast parameter, and how its gradient is put back."""

    def __init__(self, p: torch.Tensor, x: torch.Tensor, x3: torch.Tensor, packed: bool):
        self.p = p
        self.packed = packed
        if packed:  # (B, D), validated by the public op
            self.t = p if p.stride(-1) == 1 else p.contiguous()
            self.view, self.per_row = (self.t, self.t.stride(0), 0), False
            return
        # Padded (B, L, D) x with (B, D): one row per sample. Anything else broadcasts to x as it is.
        self.pe = p.unsqueeze(1) if (x.dim() == 3 and p.dim() == 2) else p
        full = self.pe.expand(x.shape)
        if full.stride(-1) != 1:
            full = self.pe.contiguous().expand(x.shape)
        try:
            t = full.view(x3.shape)
        except RuntimeError:  # a broadcast pattern the (B, L) view cannot express: materialize it
            t = full.reshape(x3.shape)
        self.t = t
        self.view = _view(t)
        # Constant along L: reduced per sample (segments). Varying along L: per-row gradient + sum_to_size.
        self.per_row = t.stride(1) != 0 and x3.shape[1] > 1

    def grad_from_rows(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g`` is (rows, D) fp32, one gradient row per x row."""
        return self._finish(g.view(x.shape).sum_to_size(self.pe.shape))

    def grad_from_samples(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g`` is (samples, D) fp32: packed samples, or the B of x's (B, L, D) view."""
        if self.packed:
            return self._finish(g)
        shape = (*x.shape[:-2], 1, x.shape[-1]) if x.dim() >= 2 else x.shape
        return self._finish(g.view(shape).sum_to_size(self.pe.shape))

    def _finish(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(self.p.shape).to(self.p.dtype).contiguous()


def _param_view(q: _Param | None, dummy: torch.Tensor) -> tuple:
    return q.view if q is not None else (dummy, 0, 0)


def _common(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    x3 = _rows_view(x)
    n_rows = x3.shape[0] * x3.shape[1]
    packed = cu_seqlens is not None
    # Rows are addressed as (b, l) = divmod(row, L) in x's (B, L, D) view; packed x is (1, T, D).
    n_samples = cu_seqlens.numel() - 1 if packed else x3.shape[0]
    seq_len = max(x3.shape[1], 1)
    return x3, n_rows, packed, n_samples, seq_len


def _row_samples(cu_seqlens: torch.Tensor | None, n_rows: int, dummy: torch.Tensor) -> torch.Tensor:
    """The sample of every packed row (see Samples), or ``dummy`` when not packed."""
    return token_sample_index(cu_seqlens, n_rows) if cu_seqlens is not None else dummy


def _aligned(d: int, views: list[tuple], tensors: list[torch.Tensor | None], vec: int) -> bool:
    """Whether the kernels should tell the compiler that D and every view's row strides are whole 16-byte
    vectors (``vec`` elements of x's dtype) and every tensor 16-byte aligned: true when they are, unless all of
    them are multiples of 16 elements, which the JIT marks by itself (the extra marks then only cost registers)."""
    values = [d, *(stride for view in views for stride in view[1:])]
    if any(v % vec for v in values) or any(t.data_ptr() % 16 for t in tensors if t is not None):
        return False
    return any(v % 16 for v in values)


def _tile(d: int, tile_elems: int, max_rows: int, per_warp: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) of a [ROWS, BLOCK_D] tile of about ``tile_elems`` values."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(max_rows, tile_elems // block_d))
    return block_d, rows, num_warps(rows * block_d, per_warp, 4, 16)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    norm: int = NORM_RMS,
    bias: torch.Tensor | None = None,
    mode: int = MODE_PLAIN,
    p1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, rstd)``: y contiguous with x's shape (residual's dtype for GATED), rstd fp32 per row.

    ``norm`` is NORM_RMS or NORM_LAYER (``bias``: LayerNorm's only). ``p1`` is scale (MODULATE) or gate
    (GATED), ``p2`` the optional shift.
    """
    x3, n_rows, packed, n_samples, seq_len = _common(x, cu_seqlens)
    d = x.shape[-1]
    out_dtype = residual.dtype if mode == MODE_GATED else x.dtype
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return y, rstd
    q1 = _Param(p1, x, x3, packed) if p1 is not None else None
    q2 = _Param(p2, x, x3, packed) if p2 is not None else None
    r3 = _rows_view(residual) if residual is not None else x3
    block_d, rows, warps = _tile(d, FWD_TILE_ELEMS, MAX_FWD_ROWS, FWD_ELEMS_PER_WARP)
    views = [_view(x3), _view(r3), _param_view(q1, x3), _param_view(q2, x3)]
    vec = 16 // x.element_size()
    args = (
        views[0], views[1], weight if weight is not None else x3, bias if bias is not None else x3, views[2], views[3],
        y, rstd, _row_samples(cu_seqlens, n_rows, rstd), n_rows, d, seq_len, n_samples, float(eps),
    )  # fmt: skip
    flags = dict(
        NORM=norm, MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, HAS_P2=q2 is not None,
        PACKED=packed, TANH=bool(tanh_gate), ROWS=rows, BLOCK_D=block_d, STAGES=FWD_STAGES,
        ALIGNED=_aligned(d, views, [x3, r3, weight, bias, y, *(v[0] for v in views[2:])], vec), VEC=vec,
        num_warps=warps,
    )  # fmt: skip
    n_prog, _ = persistent_grid(_fwd_kernel, args, flags, triton.cdiv(n_rows, rows), x.device, FWD_PROGRAMS_INTERPRETED)
    _fwd_kernel[(n_prog,)](*args, **flags)
    return y, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    norm: int = NORM_RMS,
    bias: torch.Tensor | None = None,
    mode: int = MODE_PLAIN,
    p1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(dx, dweight, dp1, dp2, dbias)`` (None where the input is None), each in its input's
    dtype/shape.

    The residual's gradient of the GATED op is ``dy`` itself and is not computed here.
    """
    x3, n_rows, packed, n_samples, seq_len = _common(x, cu_seqlens)
    d = x.shape[-1]
    dev = x.device
    dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
    q1 = _Param(p1, x, x3, packed) if p1 is not None else None
    q2 = _Param(p2, x, x3, packed) if p2 is not None else None
    if n_rows == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)
        return dx, zeros(weight), zeros(p1), zeros(p2), zeros(bias)
    dy3 = _rows_view(dy)
    block_d, rows, warps = _tile(d, BWD_TILE_ELEMS, MAX_BWD_ROWS, BWD_ELEMS_PER_WARP)
    seg1 = q1 is not None and not q1.per_row
    seg2 = mode == MODE_MODULATE and q2 is not None and not q2.per_row
    views = [_view(dy3), _view(x3), _param_view(q1, x3)]
    vec = 16 // x.element_size()
    row_sample = _row_samples(cu_seqlens, n_rows, rstd)
    flags = dict(
        NORM=norm, MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, HAS_P2=q2 is not None, SEG1=seg1,
        SEG2=seg2, PACKED=packed, TANH=bool(tanh_gate), ROWS=rows, BLOCK_D=block_d, STAGES=BWD_STAGES,
        ALIGNED=_aligned(d, views, [dy3, x3, weight, bias, dx, views[2][0]], vec), VEC=vec, num_warps=warps,
    )  # fmt: skip

    def args(dw_part, db_part, dp1, dp2, seen: torch.Tensor, rows_per_prog: int):
        return (
            views[0], views[1], weight if weight is not None else x3, bias if bias is not None else x3, views[2],
            rstd, row_sample, dx, dw_part, db_part, dp1, dp2, seen, n_rows, d, seq_len, n_samples, rows_per_prog,
        )  # fmt: skip

    # Sized from the compiled kernel; its warm-up takes any buffers (rstd) in place of the partial sums.
    placeholder = (rstd, rstd, rstd, rstd, rstd.view(torch.int32), n_rows)
    n_prog, rows_per_prog = persistent_grid(
        _bwd_kernel, args(*placeholder), flags, n_rows, dev, BWD_PROGRAMS_INTERPRETED
    )

    def grad_buffer(q: _Param | None) -> torch.Tensor:
        if q is None:
            return rstd  # never touched
        if q.per_row:
            return torch.empty((n_rows, d), device=dev, dtype=torch.float32)
        # Zeroed: with offsets that disagree with the rows, the segment sums may read slots no program wrote.
        return torch.zeros((n_prog + n_samples - 1, d), device=dev, dtype=torch.float32)

    def affine_buffer(param: torch.Tensor | None) -> torch.Tensor:
        return torch.empty((n_prog, d), device=dev, dtype=torch.float32) if param is not None else rstd

    dw_part, db_part = affine_buffer(weight), affine_buffer(bias)
    dp1, dp2 = grad_buffer(q1), grad_buffer(q2)
    seen = torch.empty((n_prog, 2), device=dev, dtype=torch.int32) if seg1 or seg2 else placeholder[4]
    _bwd_kernel[(n_prog,)](*args(dw_part, db_part, dp1, dp2, seen, rows_per_prog), **flags)

    def finish(q: _Param | None, buf: torch.Tensor) -> torch.Tensor | None:
        if q is None:
            return None
        if q.per_row:
            return q.grad_from_rows(buf, x)
        out = torch.empty((n_samples, d), device=dev, dtype=torch.float32)
        block = min(triton.next_power_of_2(d), SEGMENT_TILE)
        samples = SEGMENT_TILE // block
        grid = (triton.cdiv(n_samples, samples), triton.cdiv(d, block))
        _segment_sum_kernel[grid](
            buf, out, seen, d, n_samples, n_prog, n_prog.bit_length(), SAMPLES=samples, BLOCK=block, num_warps=8
        )
        return q.grad_from_samples(out, x)

    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, finish(q1, dp1), finish(q2, dp2), dbias
