"""Sequence offsets the attention kernels can trust without checking them on the host.

Value checks of ``cu_seqlens`` cost a device-to-host sync, so on the GPU (and in any torch.compile trace) they
are skipped unless asked for. The kernels therefore never read offsets as given: one tiny launch writes a
contiguous copy that is clamped into [0, total], made non-decreasing (a running maximum), and pinned to 0 at
the start and ``total`` at the end. Valid offsets come out unchanged. Bad ones come out as some valid partition
of the tokens, so every kernel stays inside q/k/v/out (every row it touches lies in [0, total)) and every
output row is written by exactly one program: bad offsets give wrong numbers (those of the repaired offsets),
never a wild access or unwritten memory. A non-contiguous ``cu_seqlens`` view is read through its stride.
The forward's repaired copy (one tensor, a row per offsets array) is saved for the backward, which launches it
as it is (launch.py, Problem.offsets_repaired): one repair per training step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _repair(offsets, n, BLOCK: tl.constexpr):
    """``offsets``: (source, source stride, destination, total tokens)."""
    src, stride, dst, total = offsets
    carry = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src + offs * stride, mask=mask, other=0)
        x = tl.minimum(tl.maximum(x, 0), total)
        x = tl.where(offs == 0, 0, x)
        x = tl.where(offs == n - 1, total, x)
        x = tl.maximum(tl.associative_scan(x, 0, _max), carry)  # lanes past n hold the running max: harmless
        tl.store(dst + offs, x, mask=mask)
        carry = tl.max(x, 0)


@triton.jit
def _repair_offsets(first, second, third, n, BLOCK: tl.constexpr):
    """Program i repairs the i-th of up to three offsets arrays of ``n`` entries, each given as (source, source
    stride, destination, total tokens)."""
    pid = tl.program_id(0)
    if pid == 0:
        _repair(first, n, BLOCK)
    elif pid == 1:
        _repair(second, n, BLOCK)
    else:
        _repair(third, n, BLOCK)


def safe_offsets(
    cu_seqlens: torch.Tensor,
    total: int,
    text_cu_seqlens: torch.Tensor | None = None,
    text_total: int = 0,
    cu_seqlens_k: torch.Tensor | None = None,
    k_total: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(repaired, cu_seqlens, text_cu_seqlens, cu_seqlens_k): the given offsets repaired as the module says, in
    one launch, as the rows of one int32 tensor ``repaired`` (cu_seqlens, then text_cu_seqlens if given, then
    cu_seqlens_k if given: what the forward hands its backward, see :func:`rows`) and as those rows. Without
    ``cu_seqlens_k`` (self-attention) the last is the repaired cu_seqlens itself; the offsets arrays must have
    the same length (one sample count). Rows are padded to whole 16 bytes, so each starts 16-byte aligned, as a
    tensor of its own does (Triton marks the pointer so)."""
    given = [(cu_seqlens, total)]
    if text_cu_seqlens is not None:
        given.append((text_cu_seqlens, text_total))
    if cu_seqlens_k is not None:
        given.append((cu_seqlens_k, k_total))
    n = cu_seqlens.numel()
    shape = repaired_shape(n, text_cu_seqlens is not None, cu_seqlens_k is not None)
    # Zeros: the padding is never read, but an output of the forward's custom op must not hold garbage.
    repaired = torch.zeros(shape, dtype=torch.int32, device=cu_seqlens.device)
    # A slot past the given arrays is never read (its program is not launched): the first one stands in.
    slots = [(src, src.stride(0), dst, count) for (src, count), dst in zip(given, repaired, strict=True)]
    slots += slots[:1] * (3 - len(slots))
    _repair_offsets[(len(given),)](*slots, n, BLOCK=min(1024, triton.next_power_of_2(n)))
    cu, text_cu, cu_k = rows(repaired, n, text_cu_seqlens is not None, cu_seqlens_k is not None)
    return repaired, cu, text_cu, cu if cu_k is None else cu_k


def repaired_shape(n: int, has_text: bool, cross: bool) -> tuple[int, int]:
    """The shape of :func:`safe_offsets`'s tensor for ``n`` offsets: a row per offsets array given, each of n
    entries rounded up to 16 bytes."""
    return 1 + has_text + cross, (n + 3) // 4 * 4


def rows(repaired: torch.Tensor, n: int, has_text: bool, cross: bool) -> tuple[torch.Tensor | None, ...]:
    """(cu_seqlens, text_cu_seqlens, cu_seqlens_k), ``n`` entries each, in the rows of a tensor
    :func:`safe_offsets` returned (None for what the call did not give)."""
    return repaired[0, :n], repaired[1, :n] if has_text else None, repaired[-1, :n] if cross else None
