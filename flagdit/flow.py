"""Rectified-flow (flow matching) training objective, Lumina-T2X convention.

``x_t = t * x1 + (1 - t) * x0`` with x0 ~ N(0, I) noise at t = 0 and data x1 at t = 1; the model predicts the
velocity ``x1 - x0``. The loss is the mean squared error of each item (items may differ in size), averaged
over the batch.
"""

from __future__ import annotations

import torch

T_DISTS = ("uniform", "logit-normal")


def sample_t(
    n: int,
    t_dist: str = "uniform",
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """n times in (0, 1): uniform, or logit-normal ``sigmoid(N(loc, scale^2))`` (SD3's choice)."""
    if t_dist == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if t_dist == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * scale + loc)
    raise ValueError(f"t_dist must be one of {T_DISTS}, got {t_dist!r}")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return t * x1 + (1 - t) * x0


def training_loss(
    model,
    x1: list[torch.Tensor] | torch.Tensor,
    cap_feats: torch.Tensor,
    cap_mask: torch.Tensor,
    t: torch.Tensor | None = None,
    t_dist: str = "uniform",
    *,
    x0: list[torch.Tensor] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs,
) -> torch.Tensor:
    """Flow-matching loss of ``model`` on data x1 (a list of latents or a ``(B, ...)`` tensor).

    ``t`` ``(B,)`` and the noise ``x0`` are drawn when not given. ``reduction="none"`` returns the per-item
    losses ``(B,)``; ``"mean"`` their mean (a scalar).
    """
    items = list(x1.unbind(0)) if isinstance(x1, torch.Tensor) else list(x1)
    device = items[0].device
    if t is None:
        t = sample_t(len(items), t_dist, device="cpu", generator=generator).to(device)
    if x0 is None:
        x0 = [torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device) for x in items]
    x0 = list(x0.unbind(0)) if isinstance(x0, torch.Tensor) else list(x0)
    tf = t.to(items[0].dtype)
    xt = [interpolate(a, b, tf[i]) for i, (a, b) in enumerate(zip(x0, items))]
    out = model(xt, t, cap_feats, cap_mask, **model_kwargs)
    losses = torch.stack([((b - a) - o).float().pow(2).mean() for a, b, o in zip(x0, items, out)])
    if reduction == "none":
        return losses
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return losses.mean()


def null_caption(cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional caption used for caption dropout and as the default CFG negative: zero features
    with one valid token (an all-masked caption would leave attention and pooling empty)."""
    feats = torch.zeros_like(cap_feats)
    mask = torch.zeros_like(cap_mask)
    mask[:, 0] = 1
    return feats, mask
