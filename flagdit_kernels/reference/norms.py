"""The norm family: RMSNorm and its DiT fusions as Lumina-T2X computes them, and LayerNorm's adaLN.

RMSNorm normalizes in fp32 and rounds to the input dtype before the weight multiply; LayerNorm computes
``xhat * weight + bias`` in fp32 (torch's ``layer_norm``) and rounds once. The modulation and the gated
residual are applied in fp32 to the rounded norm output and rounded once more at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._conventions import EPS, LAYER_NORM_EPS

__all__ = ["gated_residual_rms_norm", "layer_norm_modulate", "rms_norm", "rms_norm_modulate"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, fp64 stays fp64 (so float64 references and gradcheck are exact)."""
    return torch.promote_types(dtype, torch.float32)


def token_sample_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sample index of every packed token, found on the device (no host sync): the number of sequence ends at
    or below it, clamped to ``[0, B)`` so that offsets nobody checked never index outside a ``(B, D)`` tensor."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    found = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True, out_int32=True)
    return found.clamp_(max=cu_seqlens.shape[0] - 2)


def per_token(t: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Broadcasts a per-sample ``(B, D)`` tensor to x's tokens (packed or padded layout). A packed token's
    sample is found from ``cu_seqlens``, as every backend finds it (a layout's ``sample_index`` is not read)."""
    if cu_seqlens is not None:
        return t[token_sample_index(cu_seqlens, x.shape[0])]
    if x.dim() == 3 and t.dim() == 2:
        return t.unsqueeze(1)
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = EPS) -> torch.Tensor:
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is None:
        return normed
    return (normed.to(acc) * weight.to(acc)).to(x.dtype)


def rms_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    eps: float = EPS,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    acc = compute_dtype(x.dtype)
    out = rms_norm(x, weight, eps).to(acc) * (1 + per_token(scale, x, cu_seqlens).to(acc))
    if shift is not None:
        out = out + per_token(shift, x, cu_seqlens).to(acc)
    return out.to(x.dtype)


def gated_residual_rms_norm(
    residual: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    gate: torch.Tensor,
    eps: float = EPS,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    acc = compute_dtype(h.dtype)
    g = per_token(gate, h, cu_seqlens).to(acc)
    if tanh_gate:
        g = torch.tanh(g)
    return (residual.to(acc) + g * rms_norm(h, weight, eps).to(acc)).to(residual.dtype)


def layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = LAYER_NORM_EPS,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(x) [* weight + bias] * (1 + scale) + shift``: the adaLN-LayerNorm of DiT final layers."""
    acc = compute_dtype(x.dtype)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    normed = F.layer_norm(x.to(acc), (x.shape[-1],), w, b, eps).to(x.dtype)
    out = normed.to(acc) * (1 + per_token(scale, x, cu_seqlens).to(acc))
    if shift is not None:
        out = out + per_token(shift, x, cu_seqlens).to(acc)
    return out.to(x.dtype)
