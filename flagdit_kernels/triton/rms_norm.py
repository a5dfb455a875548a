"""Fused RMSNorm kernels: ``rms_norm``, ``rms_norm_modulate`` and ``gated_residual_rms_norm``.

One forward kernel and one backward kernel serve all three ops (``MODE`` picks the epilogue), plus a small
segment-sum kernel that finishes the per-sample parameter gradients. No autograd and no dispatch here:
``flagdit_kernels/ops/norms.py`` wraps these launchers into ``torch.library`` custom ops.

Numerics follow ``flagdit_kernels/reference/norms.py`` (Lumina-T2X): the row's mean square and rstd in fp32,
``x * rstd`` rounded to x's dtype, times the weight in fp32 and rounded again, then the modulation
(``* (1 + scale) + shift``) or the gated residual (``residual + act(gate) * .``) in fp32, rounded once.

Layouts. Rows are addressed through a ``(B, L, D)`` view of x with arbitrary strides on B and L, so strided
leading dims (a slice of a larger buffer, a transposed batch) are read in place; the last dim must have unit
stride (the launchers copy otherwise). A per-sample parameter (scale/shift/gate) is read either

* packed: ``(B, D)`` rows picked by the token's sample, found in the kernel by counting the ``cu_seqlens``
  ends at or below the row index (no host sync), or
* strided: the parameter expanded to x's shape, read at ``b * stride_b + l * stride_l`` (``stride_l == 0``
  for per-sample ``(B, D)`` with padded ``(B, L, D)`` x and for a ``(D,)`` vector).

Backward reductions. ``dweight`` is summed per program into an fp32 ``(programs, D)`` buffer and finished
by one ``sum(0)``. A parameter that is constant along L (per sample) is summed per (program, sample)
segment: a program walks its contiguous block of rows and flushes its accumulator to slot
``program + sample`` whenever the sample changes. ``program + sample`` is strictly increasing along the rows,
so the slots never collide and the buffer has ``programs + samples - 1`` rows; ``_segment_sum_kernel`` then
adds, for each sample, the slots of the programs that overlap it. No atomics anywhere, so the result is
deterministic. A parameter that varies along L (the general broadcast, e.g. the same shape as x) gets its
per-row gradient written out and reduced by ``Tensor.sum_to_size`` (a documented, slower path).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MODE_PLAIN = 0  # y = rms_norm(x) * weight
MODE_MODULATE = 1  # y = rms_norm(x) * weight * (1 + scale) + shift
MODE_GATED = 2  # y = residual + act(gate) * rms_norm(x) * weight

# A forward program normalizes a [ROWS, BLOCK_D] tile; small D packs several rows into one program so the
# tile stays around this many elements (enough loads in flight per SM without spilling registers).
FWD_TILE_ELEMS = 4096
MAX_FWD_ROWS = 16
# A backward program walks its rows in [ROWS, BLOCK_D] tiles of about this many elements: two rows at a time
# for D in 2048..4096 doubles the bytes in flight per program over a row-at-a-time loop.
BWD_TILE_ELEMS = 8192
MAX_BWD_ROWS = 16
# Backward programs per SM on the GPU: each walks a contiguous block of rows and keeps fp32 partial sums of
# the parameter gradients in registers; 2 per SM keeps every SM busy while the partial buffers stay ~1% of
# the row traffic (for D = 2304: 264 x 2304 x 4 B = 2.4 MB vs ~450 MB of x / dy / dx).
BWD_PROGRAMS_PER_SM = 2
# The interpreter runs programs one after the other: a handful is enough and keeps segment crossings tested.
BWD_PROGRAMS_INTERPRETED = 4
SEGMENT_BLOCK = 1024


def _num_warps(block_d: int) -> int:
    # 16-byte accesses: 8 bf16 / 4 fp32 per thread per load; these keep 2-8 vectors per thread per row.
    if block_d >= 8192:
        return 16
    if block_d >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(n_rows: int, device: torch.device) -> tuple[int, int]:
    """(number of backward programs, rows per program)."""
    if device.type == "cuda":
        target = BWD_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    else:
        target = BWD_PROGRAMS_INTERPRETED
    rows_per_prog = triton.cdiv(n_rows, max(1, min(target, n_rows)))
    return triton.cdiv(n_rows, rows_per_prog), rows_per_prog


@triton.jit
def _tanh(g):
    # Portable across Triton 3.6 on the GPU and the CPU interpreter (no libdevice): exp form away from 0, an
    # odd series near 0 where 1 - exp(-2|g|) would cancel (zero-initialized gates live there).
    a = tl.abs(g)
    t = tl.exp(-2.0 * a)
    far = (1.0 - t) / (1.0 + t)
    a2 = a * a
    near = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    r = tl.where(a < 0.125, near, far)
    return tl.where(g < 0, -r, r)


@triton.jit
def _row_tile(rows, row_limit, cmask, L):
    """(row mask, element mask, b, l) of a [ROWS, BLOCK_D] tile of rows of the (B, L, D) view."""
    rmask = rows < row_limit
    mask = rmask[:, None] & cmask[None, :]
    b = rows // L
    l = rows - b * L
    return rmask, mask, b, l


@triton.jit
def _load_rows(ptr, b, l, stride_b, stride_l, cols, mask):
    """The tile's rows of a (B, L, D) tensor with unit D stride, in fp32 (zeros outside ``mask``)."""
    return tl.load(ptr + (b * stride_b + l * stride_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sequence_ends(cu_ptr, n_samples, BLOCK_B: tl.constexpr):
    """cu_seqlens[1:] padded with int32 max (a padding slot is never at or below a row)."""
    bs = tl.arange(0, BLOCK_B)
    return tl.load(cu_ptr + 1 + bs, mask=bs < n_samples, other=2147483647)


@triton.jit
def _sample_of(ends, rows, n_samples):
    """Sample of each packed row: the number of sequence ends at or below it, clamped so that bad offsets can
    never index outside the (B, D) parameters."""
    s = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
    return tl.minimum(s, n_samples - 1)


@triton.jit
def _store_slot(ptr, slot, D, cols, cmask, acc):
    """Writes one (D,) fp32 partial sum to row ``slot`` of a partial-sum buffer."""
    tl.store(ptr + slot.to(tl.int64) * D + cols, acc, mask=cmask)


@triton.jit
def _fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    p1_ptr,  # scale (MODULATE) or gate (GATED)
    p2_ptr,  # shift (MODULATE)
    y_ptr,
    rstd_ptr,
    cu_ptr,
    n_rows,
    D,
    L,
    n_samples,
    eps,
    sx_b,
    sx_l,
    sr_b,
    sr_l,
    s1_b,
    s1_l,
    s2_b,
    s2_l,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_P2: tl.constexpr,
    PACKED: tl.constexpr,
    TANH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    rmask, mask, b, l = _row_tile(rows, n_rows, cmask, L)

    x = _load_rows(x_ptr, b, l, sx_b, sx_l, cols, mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)

    x_dtype = x_ptr.dtype.element_ty
    a = (x * rstd[:, None]).to(x_dtype).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        a = (a * w[None, :]).to(x_dtype).to(tl.float32)

    if MODE == 0:
        y = a
    else:
        if PACKED:
            s = _sample_of(_sequence_ends(cu_ptr, n_samples, BLOCK_B), rows, n_samples).to(tl.int64)
            off1 = s * s1_b
            off2 = s * s2_b
        else:
            off1 = b * s1_b + l * s1_l
            off2 = b * s2_b + l * s2_l
        p1 = tl.load(p1_ptr + off1[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            y = a * (1.0 + p1)
            if HAS_P2:
                y += tl.load(p2_ptr + off2[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            g = _tanh(p1) if TANH else p1
            y = _load_rows(res_ptr, b, l, sr_b, sr_l, cols, mask) + g * a
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    p1_ptr,  # scale or gate (shift's value is not needed for any gradient)
    rstd_ptr,
    cu_ptr,
    dx_ptr,
    dw_ptr,  # (programs, D) fp32 partial sums
    dp1_ptr,  # per-row (rows, D) fp32, or (programs + samples - 1, D) fp32 segment sums
    dp2_ptr,
    n_rows,
    D,
    L,
    n_samples,
    rows_per_prog,
    sdy_b,
    sdy_l,
    sx_b,
    sx_l,
    s1_b,
    s1_l,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_P2: tl.constexpr,
    SEG1: tl.constexpr,  # p1's gradient is summed per sample (segments) rather than written per row
    SEG2: tl.constexpr,
    PACKED: tl.constexpr,
    TANH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program walks rows [pid * rows_per_prog, ...) in [ROWS, BLOCK_D] tiles."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_prog  # int64 rows: the loop variables below inherit it
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x_dtype = x_ptr.dtype.element_ty

    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    p1_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    p2_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if PACKED:
        ends = _sequence_ends(cu_ptr, n_samples, BLOCK_B)
        cur = tl.minimum(tl.sum((ends <= row_start).to(tl.int32), axis=0), n_samples - 1)
    else:
        cur = row_start // L

    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask, mask, b, l = _row_tile(rows, row_end, cmask, L)
        x = _load_rows(x_ptr, b, l, sx_b, sx_l, cols, mask)
        dy = _load_rows(dy_ptr, b, l, sdy_b, sdy_l, cols, mask)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        n = xhat.to(x_dtype).to(tl.float32)  # the rounded normalized value the forward multiplied
        if HAS_W:
            a = (n * w[None, :]).to(x_dtype).to(tl.float32)
        else:
            a = n

        if MODE == 0:
            da = dy
        else:
            if PACKED:
                s = _sample_of(ends, rows, n_samples)
                off1 = s.to(tl.int64) * s1_b
            else:
                s = b
                off1 = b * s1_b + l * s1_l
            p1 = tl.load(p1_ptr + off1[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Masked rows load zeros, so every contribution below is zero there.
            if MODE == 1:
                da = dy * (1.0 + p1)
                g1 = dy * a  # d scale
                g2 = dy  # d shift
            else:
                if TANH:
                    act = _tanh(p1)
                    g1 = dy * a * (1.0 - act * act)  # d gate
                else:
                    act = p1
                    g1 = dy * a
                da = dy * act
                g2 = g1  # unused
            if SEG1 or SEG2:
                # The tile's rows belong to samples s_lo..s_hi (one in the common case). Sum each sample's
                # rows into the running accumulator and flush it to slot (pid + sample) when the sample changes.
                s_lo = tl.min(tl.where(rmask, s, 2147483647), axis=0)
                s_hi = tl.max(tl.where(rmask, s, -1), axis=0)
                for t in range(s_lo, s_hi + 1):
                    if t != cur:
                        if SEG1:
                            _store_slot(dp1_ptr, pid + cur, D, cols, cmask, p1_acc)
                            p1_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                        if SEG2:
                            _store_slot(dp2_ptr, pid + cur, D, cols, cmask, p2_acc)
                            p2_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                        cur = t
                    sel = (s == t)[:, None]
                    if SEG1:
                        p1_acc += tl.sum(tl.where(sel, g1, 0.0), axis=0)
                    if SEG2:
                        p2_acc += tl.sum(tl.where(sel, g2, 0.0), axis=0)
            if not SEG1:
                tl.store(dp1_ptr + rows[:, None] * D + cols[None, :], g1, mask=mask)
            if MODE == 1 and HAS_P2 and not SEG2:
                tl.store(dp2_ptr + rows[:, None] * D + cols[None, :], g2, mask=mask)

        if HAS_W:
            dw_acc += tl.sum(da * n, axis=0)
            dn = da * w[None, :]
        else:
            dn = da
        # d/dx of x * rstd(x): rstd * (dn - xhat * mean(dn * xhat)); the roundings pass gradients straight.
        c = tl.sum(dn * xhat, axis=1) / D
        dx = (dn - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    if HAS_W:
        _store_slot(dw_ptr, pid, D, cols, cmask, dw_acc)
    if SEG1:
        _store_slot(dp1_ptr, pid + cur, D, cols, cmask, p1_acc)
    if SEG2:
        _store_slot(dp2_ptr, pid + cur, D, cols, cmask, p2_acc)


@triton.jit
def _segment_sum_kernel(
    part_ptr,
    out_ptr,
    cu_ptr,
    n_rows,
    D,
    L,
    rows_per_prog,
    n_prog,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[s] = sum of the segment slots ``p + s`` of every program p whose rows overlap sample s."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < D
    if PACKED:
        start = tl.load(cu_ptr + s)
        end = tl.load(cu_ptr + s + 1)
    else:
        start = s * L
        end = start + L
    start = tl.maximum(start, 0)
    end = tl.minimum(end, n_rows)
    p0 = start // rows_per_prog
    # Empty samples (and any nonsense offsets) sum nothing; p stays inside the buffer either way.
    p1 = tl.where(end > start, tl.minimum((end - 1) // rows_per_prog, n_prog - 1), p0 - 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(p0, p1 + 1):
        acc += tl.load(part_ptr + (p + s).to(tl.int64) * D + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + s.to(tl.int64) * D + cols, acc, mask=cmask)


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


class _Param:
    """How the kernels read one per-sample / broadcast parameter, and how its gradient is put back."""

    def __init__(self, p: torch.Tensor, x: torch.Tensor, x3: torch.Tensor, packed: bool):
        self.p = p
        self.packed = packed
        if packed:  # (B, D), validated by the public op
            self.t = p if p.stride(-1) == 1 else p.contiguous()
            self.stride_b, self.stride_l, self.per_row = self.t.stride(0), 0, False
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
        self.stride_b, self.stride_l = t.stride(0), t.stride(1)
        # Constant along L: reduced per sample (segments). Varying along L: per-row gradient + sum_to_size.
        self.per_row = self.stride_l != 0 and x3.shape[1] > 1

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


def _common(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    x3 = _rows_view(x)
    n_rows = x3.shape[0] * x3.shape[1]
    packed = cu_seqlens is not None
    # Rows are addressed as (b, l) = divmod(row, L) in x's (B, L, D) view; packed x is (1, T, D).
    n_samples = cu_seqlens.numel() - 1 if packed else x3.shape[0]
    seq_len = max(x3.shape[1], 1)
    block_b = triton.next_power_of_2(n_samples) if packed else 1
    return x3, n_rows, packed, n_samples, seq_len, block_b


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    mode: int = MODE_PLAIN,
    p1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, rstd)``: y contiguous with x's shape (residual's dtype for GATED), rstd fp32 per row.

    ``p1`` is scale (MODULATE) or gate (GATED), ``p2`` the optional shift.
    """
    x3, n_rows, packed, n_samples, seq_len, block_b = _common(x, cu_seqlens)
    d = x.shape[-1]
    out_dtype = residual.dtype if mode == MODE_GATED else x.dtype
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return y, rstd
    q1 = _Param(p1, x, x3, packed) if p1 is not None else None
    q2 = _Param(p2, x, x3, packed) if p2 is not None else None
    r3 = _rows_view(residual) if residual is not None else x3
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(MAX_FWD_ROWS, FWD_TILE_ELEMS // block_d))
    dummy = x3
    _fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x3,
        r3,
        weight if weight is not None else dummy,
        q1.t if q1 is not None else dummy,
        q2.t if q2 is not None else dummy,
        y,
        rstd,
        cu_seqlens if packed else rstd,
        n_rows,
        d,
        seq_len,
        n_samples,
        float(eps),
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        q1.stride_b if q1 is not None else 0,
        q1.stride_l if q1 is not None else 0,
        q2.stride_b if q2 is not None else 0,
        q2.stride_l if q2 is not None else 0,
        MODE=mode,
        HAS_W=weight is not None,
        HAS_P2=q2 is not None,
        PACKED=packed,
        TANH=bool(tanh_gate),
        ROWS=rows,
        BLOCK_D=block_d,
        BLOCK_B=block_b,
        num_warps=_num_warps(block_d),
    )
    return y, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    mode: int = MODE_PLAIN,
    p1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(dx, dweight, dp1, dp2)`` (None where the input is None), each in its input's dtype/shape.

    The residual's gradient of the GATED op is ``dy`` itself and is not computed here.
    """
    x3, n_rows, packed, n_samples, seq_len, block_b = _common(x, cu_seqlens)
    d = x.shape[-1]
    dev = x.device
    dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
    q1 = _Param(p1, x, x3, packed) if p1 is not None else None
    q2 = _Param(p2, x, x3, packed) if p2 is not None else None
    if n_rows == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)
        return dx, zeros(weight), zeros(p1), zeros(p2)
    dy3 = _rows_view(dy)
    n_prog, rows_per_prog = _bwd_programs(n_rows, dev)
    n_slots = n_prog + n_samples - 1

    def grad_buffer(q: _Param | None) -> torch.Tensor:
        if q is None:
            return rstd  # never touched
        return torch.empty((n_rows if q.per_row else n_slots, d), device=dev, dtype=torch.float32)

    dw_part = torch.empty((n_prog, d), device=dev, dtype=torch.float32) if weight is not None else rstd
    dp1, dp2 = grad_buffer(q1), grad_buffer(q2)
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(MAX_BWD_ROWS, BWD_TILE_ELEMS // block_d))
    dummy = x3
    _bwd_kernel[(n_prog,)](
        dy3,
        x3,
        weight if weight is not None else dummy,
        q1.t if q1 is not None else dummy,
        rstd,
        cu_seqlens if packed else rstd,
        dx,
        dw_part,
        dp1,
        dp2,
        n_rows,
        d,
        seq_len,
        n_samples,
        rows_per_prog,
        dy3.stride(0),
        dy3.stride(1),
        x3.stride(0),
        x3.stride(1),
        q1.stride_b if q1 is not None else 0,
        q1.stride_l if q1 is not None else 0,
        MODE=mode,
        HAS_W=weight is not None,
        HAS_P2=q2 is not None,
        SEG1=q1 is not None and not q1.per_row,
        SEG2=mode == MODE_MODULATE and q2 is not None and not q2.per_row,
        PACKED=packed,
        TANH=bool(tanh_gate),
        ROWS=rows,
        BLOCK_D=block_d,
        BLOCK_B=block_b,
        num_warps=_num_warps(rows * block_d),
    )

    def finish(q: _Param | None, buf: torch.Tensor) -> torch.Tensor | None:
        if q is None:
            return None
        if q.per_row:
            return q.grad_from_rows(buf, x)
        out = torch.empty((n_samples, d), device=dev, dtype=torch.float32)
        _segment_sum_kernel[(n_samples, triton.cdiv(d, SEGMENT_BLOCK))](
            buf,
            out,
            cu_seqlens if packed else out,
            n_rows,
            d,
            seq_len,
            rows_per_prog,
            n_prog,
            PACKED=packed,
            BLOCK=SEGMENT_BLOCK,
        )
        return q.grad_from_samples(out, x)

    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    return dx, dweight, finish(q1, dp1), finish(q2, dp2)
