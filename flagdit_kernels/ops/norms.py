"""Public RMSNorm family: ``rms_norm``, ``rms_norm_modulate``, ``gated_residual_rms_norm``."""

from __future__ import annotations

import torch

from .. import _dispatch
from .. import reference as ref
from .._validation import check_cu_seqlens, check_per_sample, check_shape, check_tensor

for _op, _fn in (
    ("rms_norm", ref.rms_norm),
    ("rms_norm_modulate", ref.rms_norm_modulate),
    ("gated_residual_rms_norm", ref.gated_residual_rms_norm),
):
    _dispatch.register(_op, "reference", _fn, devices=("cpu", "cuda"))


def _check_norm_inputs(x_name: str, x: object, weight: object, eps: float) -> torch.Tensor:
    check_tensor(x_name, x, min_ndim=1)
    assert isinstance(x, torch.Tensor)
    if x.shape[-1] == 0:
        raise ValueError(f"{x_name} must have a non-empty last (feature) dimension, got {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, device=x.device)
        check_shape("weight", weight, (x.shape[-1],))
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return x


def _check_packed(x_name: str, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    if cu_seqlens is None:
        return
    if x.dim() != 2:
        raise ValueError(f"{x_name} must be packed (T, D) when cu_seqlens is given, got {tuple(x.shape)}")
    check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device, total_name=f"{x_name}.shape[0]")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim: ``round(x * rsqrt(mean(x^2) + eps)) * weight`` (fp32 math, Lumina rounding).

    ``x`` is ``(..., D)`` (any strides in the leading dims); ``weight`` ``(D,)`` or None for no affine.
    """
    _check_norm_inputs("x", x, weight, eps)
    _, fn = _dispatch.resolve("rms_norm", x.device, backend)
    return fn(x, weight, eps)


def rms_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    cu_seqlens: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``rms_norm(x, weight) * (1 + scale) + shift`` with per-sample scale/shift.

    Layouts: padded ``x (B, L, D)`` with ``scale (B, D)``; packed ``x (T, D)`` with ``scale (B, D)`` and
    ``cu_seqlens`` int32 ``(B+1,)``; or any ``scale`` that broadcasts to ``x``.
    """
    _check_norm_inputs("x", x, weight, eps)
    _check_packed("x", x, cu_seqlens)
    check_per_sample("scale", scale, x, cu_seqlens)
    if shift is not None:
        check_per_sample("shift", shift, x, cu_seqlens)
    _, fn = _dispatch.resolve("rms_norm_modulate", x.device, backend)
    return fn(x, weight, scale, shift, eps, cu_seqlens)


def gated_residual_rms_norm(
    residual: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    gate: torch.Tensor,
    eps: float = 1e-5,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + act(gate) * rms_norm(h, weight)``, act = tanh (``tanh_gate``) or identity.

    The Next-DiT sandwich norm. ``gate`` is per sample like ``scale`` in :func:`rms_norm_modulate`.
    """
    _check_norm_inputs("h", h, weight, eps)
    check_tensor("residual", residual, device=h.device)
    check_shape("residual", residual, h.shape)
    _check_packed("h", h, cu_seqlens)
    check_per_sample("gate", gate, h, cu_seqlens)
    _, fn = _dispatch.resolve("gated_residual_rms_norm", h.device, backend)
    return fn(residual, h, weight, gate, eps, tanh_gate, cu_seqlens)
