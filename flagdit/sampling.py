"""ODE sampling of a flow-matching Flag-DiT: Euler or midpoint from t = 0 (noise) to t = 1 (data).

Times are spaced uniformly, then shifted ``t' = t / (t + s - s t)`` (s > 1 spends more steps near the noise
end, Lumina-Next's time shifting). Classifier-free guidance runs the conditional and the negative caption in
one packed batch: ``v = v_neg + cfg_scale * (v_cond - v_neg)``. The captions do not change between steps, so
their pooled embedding and every block's text keys/values are computed once (:meth:`FlagDiT.encode_text`).
Long contexts: ``sp_group`` spreads every step's tokens over a sequence-parallel group (``flagdit.parallel``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .flow import null_caption
from .model import TextContext

SOLVERS = ("euler", "midpoint")


def shifted_times(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """``steps + 1`` times from 0 to 1 with the time shift applied."""
    t = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    if shift != 1.0:
        t = t / (t + shift - shift * t)
    return t.float()


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, length - x.shape[1])) if x.dim() == 3 else F.pad(x, (0, length - x.shape[1]))


def _concat_captions(a_feats, a_mask, b_feats, b_mask):
    length = max(a_feats.shape[1], b_feats.shape[1])
    feats = torch.cat([_pad_to(a_feats, length), _pad_to(b_feats.to(a_feats), length)])
    mask = torch.cat([_pad_to(a_mask, length), _pad_to(b_mask.to(a_mask), length)])
    return feats, mask


@torch.no_grad()
def sample(
    model,
    shapes: list[tuple[int, ...]],
    cap_feats: torch.Tensor,
    cap_mask: torch.Tensor,
    neg_feats: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    steps: int = 30,
    solver: str = "euler",
    shift: float = 4.0,
    cfg_scale: float = 4.0,
    generator: torch.Generator | None = None,
    *,
    noise: list[torch.Tensor] | None = None,
    progress: bool = False,
    modality: list[str | int] | None = None,
    cameras: list[torch.Tensor | None] | None = None,
    sp_group=None,
    sp_strategy: str = "auto",
    **model_kwargs,
) -> list[torch.Tensor]:
    """Generates one latent per shape ``(C, [F,] H, W)`` for the captions ``(B, Lt, cap_feat_dim)``.

    ``neg_feats`` / ``neg_mask`` default to :func:`flagdit.flow.null_caption`; ``cfg_scale == 1`` skips the
    negative branch. ``noise`` replaces the initial Gaussian draw. ``modality`` / ``cameras`` (one entry per
    shape, see :meth:`flagdit.FlagDiT.forward`) condition both branches of the guidance. ``model_kwargs``
    (``base_seqlen``, ``linear_factor``, ``ntk_factor``) go to every model call. ``sp_group`` (a ProcessGroup
    or DeviceMesh, as :func:`flagdit.parallel.parallelize` takes; call on every rank of it) runs the model
    sequence-parallel with ``sp_strategy``, every rank from the group's first rank's noise, and returns the
    same latents on every rank.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b = len(shapes)
    if cap_feats.shape[0] != b:
        raise ValueError(f"{b} shapes but {cap_feats.shape[0]} captions")
    per_item = {}
    for name, value in (("modality", modality), ("cameras", cameras)):
        if value is not None:
            if len(value) != b:
                raise ValueError(f"{name} must have one entry per shape ({b}), got {len(value)}")
            per_item[name] = list(value)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if noise is None:
        noise = [torch.randn(s, generator=generator, dtype=torch.float32).to(device, dtype) for s in shapes]
    x = [n.to(device, dtype) for n in noise]
    parallel = contextlib.nullcontext
    if sp_group is not None:
        from .parallel import sequence_parallel
        from .parallel import sp_group as validated

        group = validated(sp_group).group
        x = [xi.clone() for xi in x]
        for xi in x:  # one starting point for the whole group, whatever each rank's generator drew
            dist.broadcast(xi, group=group, group_src=0)
        parallel = functools.partial(sequence_parallel, model, sp_group, sp_strategy)
    guided = cfg_scale != 1.0
    if guided:
        if neg_feats is None:
            neg_feats, neg_mask = null_caption(cap_feats, cap_mask)
        feats, mask = _concat_captions(cap_feats, cap_mask, neg_feats, neg_mask)
    else:
        feats, mask = cap_feats, cap_mask
    text: TextContext = model.encode_text(feats.to(device), mask.to(device), cache_kv=True)
    if guided:  # the negative branch is the same items again
        per_item = {name: value + value for name, value in per_item.items()}

    def velocity(x: list[torch.Tensor], t: float) -> list[torch.Tensor]:
        batch = x + x if guided else x
        tt = torch.full((len(batch),), t, device=device, dtype=torch.float32)
        with parallel():
            v = model(batch, tt, text=text, **per_item, **model_kwargs)
        if not guided:
            return v
        return [vn + cfg_scale * (vc - vn) for vc, vn in zip(v[:b], v[b:])]

    times = shifted_times(steps, shift).tolist()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"sampling ({solver})", leave=False)
    for i in it:
        t0, t1 = times[i], times[i + 1]
        dt = t1 - t0
        v = velocity(x, t0)
        if solver == "midpoint":
            mid = [xi + 0.5 * dt * vi for xi, vi in zip(x, v)]
            v = velocity(mid, t0 + 0.5 * dt)
        x = [xi + dt * vi for xi, vi in zip(x, v)]
    return x
