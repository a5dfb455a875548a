"""Sequence offsets the attention kernels can trust without checking them on the host.

Value checks of ``cu_seqlens`` cost a device-to-host sync, so on the GPU (and in any torch.compile trace) they
are skipped unless asked for. The kernels therefore never read offsets as given: one tiny launch writes a
contiguous copy that is clamped into [0, total], made non-decreasing (a running maximum), and pinned to 0 at
the start and ``total`` at the end. Valid offsets come out unchanged. Bad ones come out as some valid partition
of the tokens, so every kernel stays inside q/k/v/out (every row it touches lies in [0, total)) and every
output row is written by exactly one program: bad offsets give wrong numbers (those of the repaired offsets),
never a wild access or unwritten memory. A non-contiguous ``cu_seqlens`` view is read through its stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _repair(src, stride, dst, n, total, BLOCK: tl.constexpr):
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
def _repair_offsets(CU, CU_OUT, n, stride, total, TCU, TCU_OUT, stride_t, text_total, KCU, KCU_OUT, stride_k,
                    k_total, BLOCK: tl.constexpr):  # fmt: skip
    """Program 0 repairs cu_seqlens (total tokens ``total``), program 1 text_cu_seqlens (``text_total``),
    program 2 cu_seqlens_k (``k_total``)."""
    pid = tl.program_id(0)
    if pid == 0:
        _repair(CU, stride, CU_OUT, n, total, BLOCK)
    elif pid == 1:
        _repair(TCU, stride_t, TCU_OUT, n, text_total, BLOCK)
    else:
        _repair(KCU, stride_k, KCU_OUT, n, k_total, BLOCK)


def safe_offsets(
    cu_seqlens: torch.Tensor,
    total: int,
    text_cu_seqlens: torch.Tensor | None = None,
    text_total: int = 0,
    cu_seqlens_k: torch.Tensor | None = None,
    k_total: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(cu_seqlens, text_cu_seqlens, cu_seqlens_k) repaired as the module says, int32 and contiguous, in one
    launch. Without ``cu_seqlens_k`` (self-attention) the third is the repaired cu_seqlens itself; the offsets
    arrays must have the same length (one sample count)."""
    n = cu_seqlens.numel()
    dev = cu_seqlens.device
    cu = torch.empty(n, dtype=torch.int32, device=dev)
    has_text, cross = text_cu_seqlens is not None, cu_seqlens_k is not None
    # Program 1 also runs for cross-attention without text: it then repairs cu_seqlens into a scratch copy.
    tcu = torch.empty(n, dtype=torch.int32, device=dev) if has_text or cross else cu
    kcu = torch.empty(n, dtype=torch.int32, device=dev) if cross else cu
    text_src = text_cu_seqlens if has_text else cu_seqlens
    k_src = cu_seqlens_k if cross else cu_seqlens
    block = min(1024, triton.next_power_of_2(n))
    _repair_offsets[(3 if cross else 2 if has_text else 1,)](
        cu_seqlens, cu, n, cu_seqlens.stride(0), total, text_src, tcu, text_src.stride(0), text_total,
        k_src, kcu, k_src.stride(0), k_total, BLOCK=block,
    )  # fmt: skip
    return cu, tcu if has_text else None, kcu
