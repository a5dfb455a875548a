"""One training example of any modality, and the caption helpers every modality shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modality import MODALITIES


@dataclass
class Item:
    """A latent, its caption, and the conditioning its modality needs.

    ``latent`` is ``(C, H, W)`` (image, audio) or ``(C, F, H, W)`` (video frames, multi-view views), values in
    [-1, 1]. ``cameras`` is ``(F, 2)`` float32 (azimuth, elevation) in radians, one row per view, for
    multi-view items and None otherwise.
    """

    latent: torch.Tensor
    caption: str
    modality: str
    cameras: torch.Tensor | None = None


def article(word: str) -> str:
    """The indefinite article for ``word`` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"


def check_modality(modality: str, allowed: tuple[str, ...] = MODALITIES) -> str:
    if modality not in allowed:
        raise ValueError(f"modality must be one of {allowed}, got {modality!r}")
    return modality
