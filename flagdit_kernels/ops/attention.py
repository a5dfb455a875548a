"""Public ``varlen_attention`` (packed self-attention + zero-init gated text cross-attention)."""

from __future__ import annotations

import torch

from .. import _dispatch
from .. import reference as ref
from .._validation import check_cu_seqlens, check_shape, check_tensor
from .rope import check_freqs

SUPPORTED_HEAD_DIMS = "multiples of 8 from 16 to 256"

_dispatch.register("varlen_attention", "reference", ref.varlen_attention, devices=("cpu", "cuda"))


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 8 or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def _check_text(q, text_k, text_v, text_cu_seqlens, text_max_seqlen, gate, num_seqs: int, hkv: int):
    given = [x is not None for x in (text_k, text_v, text_cu_seqlens, gate)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("text_k, text_v, text_cu_seqlens and gate must be given together")
    check_tensor("text_k", text_k, ndim=3, device=q.device)
    check_tensor("text_v", text_v, ndim=3, device=q.device)
    for name, t in (("text_k", text_k), ("text_v", text_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.shape[1:] != (hkv, q.shape[-1]):
            raise ValueError(f"{name} must be (Tt, {hkv}, {q.shape[-1]}) like k, got {tuple(t.shape)}")
    if text_v.shape[0] != text_k.shape[0]:
        raise ValueError(f"text_v has {text_v.shape[0]} tokens but text_k has {text_k.shape[0]}")
    check_cu_seqlens("text_cu_seqlens", text_cu_seqlens, text_k.shape[0], q.device, total_name="text_k.shape[0]")
    if text_cu_seqlens.numel() != num_seqs + 1:
        raise ValueError(
            f"text_cu_seqlens must have {num_seqs + 1} entries (one text sequence per sample), "
            f"got {text_cu_seqlens.numel()}"
        )
    if text_max_seqlen is not None and (not isinstance(text_max_seqlen, int) or text_max_seqlen < 0):
        raise ValueError(f"text_max_seqlen must be a non-negative int, got {text_max_seqlen!r}")
    check_tensor("gate", gate, ndim=1, device=q.device)
    check_shape("gate", gate, (q.shape[1],))


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_cu_seqlens: torch.Tensor | None = None,
    text_max_seqlen: int | None = None,
    gate: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Non-causal attention within each packed sequence, plus Lumina's gated text cross-attention.

    q ``(T, H, Dh)``, k/v ``(T, Hkv, Dh)`` with ``H % Hkv == 0``; ``cu_seqlens`` int32 ``(B+1,)``;
    ``max_seqlen`` the longest sequence (a Python int, so kernels need no host sync). With ``freqs``
    ``(T, Dh/2, 2)`` RoPE (interleaved) is applied to q and k first. With ``text_k``/``text_v`` ``(Tt, Hkv, Dh)``
    packed by ``text_cu_seqlens`` and ``gate (H,)``: ``out += tanh(gate[h]) * softmax(q k_t^T / sqrt(Dh)) v_t``
    per sample; a sample without text tokens adds exactly 0. Returns ``(T, H, Dh)`` in q's dtype.
    """
    check_tensor("q", q, ndim=3)
    check_tensor("k", k, ndim=3, device=q.device)
    check_tensor("v", v, ndim=3, device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    _check_head_dim(q.shape[-1])
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be (T, Hkv, Dh) = ({q.shape[0]}, Hkv, {q.shape[2]}), got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device, total_name="q.shape[0]")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    _check_text(q, text_k, text_v, text_cu_seqlens, text_max_seqlen, gate, cu_seqlens.numel() - 1, k.shape[1])
    if freqs is not None:
        check_freqs(freqs, "q", q)
    _, fn = _dispatch.resolve("varlen_attention", q.device, backend)
    return fn(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        softmax_scale,
        text_k=text_k,
        text_v=text_v,
        text_cu_seqlens=text_cu_seqlens,
        text_max_seqlen=text_max_seqlen,
        gate=gate,
        freqs=freqs,
    )


def proportional_scale(seqlen: int, base_seqlen: int, head_dim: int) -> float:
    """Lumina's softmax scale for resolution extrapolation: ``sqrt(log(seqlen, base_seqlen) / head_dim)``."""
    if not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive int, got {seqlen!r}")
    if not isinstance(base_seqlen, int) or base_seqlen < 2:
        raise ValueError(f"base_seqlen must be an int >= 2, got {base_seqlen!r}")
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return ref.proportional_scale(seqlen, base_seqlen, head_dim)
