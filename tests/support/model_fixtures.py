"""Small Flag-DiT models for the model tests: a config that runs in seconds on a CPU, and weights made random
everywhere, so that no zero-initialized layer hides an error."""

from __future__ import annotations

import torch

import flagdit


def small_config(variant="flag", **kw):
    base = dict(in_channels=3, dim=64, n_layers=2, n_heads=4, multiple_of=16, cap_feat_dim=16, variant=variant)
    if variant == "next":
        base.update(n_kv_heads=2, nextline=False)
    base.update(kw)
    return flagdit.FlagDiTConfig(**base)


def randomized(model, seed=0):
    """Random weights everywhere, also where the model zero-initializes (gates, adaLN, final layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model
