"""Rotary embedding tables (1D, 2D alternating, per-axis groups) and QK-norm + RoPE.

Tables follow the Lumina codebases: frequencies and angles in fp32 for 1D (Lumina-T2X) and 2D alternating
(Lumina-Next) positions, fp64 for per-axis groups (Lumina-Image-2.0); cos/sin are stored as fp32.
Norm and rotation compute in fp32, or in fp64 for fp64 inputs (so tests get a true fp64 reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._conventions import QK_NORM_EPS
from .norms import compute_dtype

__all__ = ["apply_rope", "qk_norm_rope", "rope_freqs"]

NormParams = tuple[torch.Tensor | None, torch.Tensor | None]


def _inv_freq(step: int, dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    exponent = torch.arange(0, dim, step, dtype=dtype, device=device)[: dim // step] / dim
    return 1.0 / (theta**exponent)


def rope_freqs(
    head_dim: int,
    positions: torch.Tensor,
    axes_dims: tuple[int, ...] | list[int] | None = None,
    theta: float = 10000.0,
    linear_factor: float = 1.0,
    ntk_factor: float = 1.0,
) -> torch.Tensor:
    theta = theta * ntk_factor
    device = positions.device
    if positions.dim() == 2 and positions.shape[1] == 1 and axes_dims is None:
        positions = positions[:, 0]
    if positions.dim() == 1:
        t = positions.float() / linear_factor
        angles = torch.outer(t, _inv_freq(2, head_dim, theta, torch.float32, device))
    elif axes_dims is None:
        inv = _inv_freq(4, head_dim, theta, torch.float32, device)
        per_axis = [torch.outer(positions[:, a].float() / linear_factor, inv) for a in range(2)]
        angles = torch.stack(per_axis, dim=-1).flatten(1)
    else:
        groups = []
        for a, d in enumerate(axes_dims):
            t = positions[:, a].double() / linear_factor
            groups.append(torch.outer(t, _inv_freq(2, d, theta, torch.float64, device)))
        angles = torch.cat(groups, dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def _broadcast_freqs(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin with a head axis added, so (T|L|B,L, Dh/2) broadcast against x viewed as (..., H, Dh/2)."""
    return freqs[..., 0].to(dtype).unsqueeze(-2), freqs[..., 1].to(dtype).unsqueeze(-2)


def rotate(xf: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on an fp32 (or fp64) tensor (..., H, Dh); returns the same dtype."""
    cos, sin = _broadcast_freqs(freqs, xf.dtype)
    if interleaved:
        pairs = xf.unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    x0, x1 = xf.chunk(2, dim=-1)
    return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    return rotate(x.to(compute_dtype(x.dtype)), freqs, interleaved).to(x.dtype)


def _norm(x: torch.Tensor, params: NormParams, norm: str | None, eps: float) -> torch.Tensor:
    weight, bias = params
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if norm == "layer_norm":
        flat = xf.flatten(-2)
        return F.layer_norm(flat, flat.shape[-1:], w, b, eps).view_as(xf)
    if norm == "rms_norm":
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = out if w is None else out * w
        return out if b is None else out + b
    return xf


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    freqs: torch.Tensor,
    q_norm: NormParams = (None, None),
    k_norm: NormParams = (None, None),
    norm: str | None = "layer_norm",
    eps: float = QK_NORM_EPS,
    interleaved: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = rotate(_norm(q, q_norm, norm, eps), freqs, interleaved).to(q.dtype)
    k_out = rotate(_norm(k, k_norm, norm, eps), freqs, interleaved).to(q.dtype)
    return q_out, k_out
