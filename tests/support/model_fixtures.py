"""Small Flag-DiT models for the model tests: a config that runs in seconds on a CPU (also one with every
modality, and a batch for it), and weights made random everywhere, so that no zero-initialized layer hides an
error."""

from __future__ import annotations

import torch

import flagdit
from flagdit.data import multiview
from flagdit.modality import MODALITIES


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


def any_modality_config(**kw):
    """A small config with every modality's embedding and the camera conditioning."""
    return small_config(n_modalities=len(MODALITIES), camera_cond=True, **kw)


def modality_inputs(seed=0):
    """A batch of three modalities for :func:`any_modality_config`: an image, a 4-view multiview item with its
    cameras and a one-channel audio latent, with captions and their masks."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, 6, 8, generator=g), torch.randn(3, 4, 6, 6, generator=g), torch.randn(1, 8, 10, generator=g)]
    cameras = [None, multiview.ring_cameras(4, 0.3, start=0.7), None]
    cap = torch.randn(3, 4, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    return xs, torch.rand(3, generator=g), cap, mask, ["image", "multiview", "audio"], cameras
