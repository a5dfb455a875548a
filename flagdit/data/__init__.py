"""Procedurally generated text-to-X data sets for CPU demos and tests, one module per modality.

- :mod:`~flagdit.data.shapes`: images of coloured 2D shapes at several resolutions, and short clips of them
  sliding across the frame ("a red circle on blue", "an orange bar on black moving right");
- :mod:`~flagdit.data.multiview`: small 3D scenes rendered from a ring of cameras ("a red cube beside a blue
  sphere"), the views as frames, with each view's (azimuth, elevation);
- :mod:`~flagdit.data.audio`: synthesized tones, sweeps, chords and noise bursts as log-mel spectrograms
  ("a rising high tone"), and their inversion to a waveform (librosa's Griffin-Lim).

Item ``i`` of seed ``s`` is a pure function of ``(s, i)`` (and the modality), so any process can build any part
of a global batch. Captions become features with :class:`~flagdit.data.text.WordEncoder`.
"""

from __future__ import annotations

import torch

from .audio import make_audio
from .item import MODALITIES, Item, article, check_modality
from .multiview import DEFAULT_VIEWS, make_multiview
from .shapes import make_image, make_video
from .text import VOCAB, WordEncoder

DATASETS = (*MODALITIES, "mixed")
MIXED_CYCLE = MODALITIES  # item i of a mixed data set has modality MIXED_CYCLE[i % 4]


def make_item(
    seed: int, index: int, video_fraction: float = 0.15, *, modality: str = "image", views: int = DEFAULT_VIEWS
) -> Item:
    """Item ``index`` of the data set ``modality`` (one of DATASETS) drawn with ``seed``.

    ``"image"`` is the original shapes data set: images, and a ``video_fraction`` share of short clips.
    ``"mixed"`` cycles through image, video, multiview and audio by index, so every run of four consecutive
    items (and so every global batch of four or more) holds all four modalities. ``views`` is the number of
    cameras of a multi-view item.
    """
    check_modality(modality, DATASETS)
    if not 0.0 <= video_fraction <= 1.0:
        raise ValueError(f"video_fraction must be in [0, 1], got {video_fraction}")
    if modality == "mixed":
        modality = MIXED_CYCLE[index % len(MIXED_CYCLE)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if modality == "image":
        return make_video(g) if float(torch.rand(1, generator=g)) < video_fraction else make_image(g)
    if modality == "video":
        return make_video(g)
    if modality == "multiview":
        return make_multiview(g, views)
    return make_audio(g)


__all__ = ["DATASETS", "MODALITIES", "VOCAB", "Item", "WordEncoder", "article", "check_modality", "make_item"]
