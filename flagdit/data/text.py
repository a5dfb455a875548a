"""Caption features for the procedural data sets: :class:`WordEncoder`, a frozen stand-in for a language model
(a fixed random vector per word plus a sinusoidal position code, ``(B, Lt, dim)`` with a mask). Words are read
lower-cased; a word outside :data:`VOCAB` or a caption of more than ``max_len`` words is a ``ValueError``."""

from __future__ import annotations

import math

import torch

from . import audio, multiview, shapes

# New words go at the end: the encoder's random table is drawn in this order, so existing words keep their
# vectors (and trained checkpoints their meaning) when the vocabulary grows.
VOCAB = tuple(dict.fromkeys(("<pad>", *shapes.WORDS, "an", *multiview.WORDS, *audio.WORDS)))


class WordEncoder:
    """Frozen caption features: a fixed random vector per word + a sinusoidal position code."""

    def __init__(self, dim: int, max_len: int = 8, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.max_len = dim, max_len
        self.table = torch.randn(len(VOCAB), dim, generator=g)
        pos = torch.arange(max_len).float().unsqueeze(1)
        freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2).float() / dim)
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        self.pe = 0.5 * pe

    def words(self, caption: str) -> list[str]:
        """The caption's words, lower-cased (the vocabulary is lower-case, so "A red circle" reads as "a red
        circle"); a ``ValueError`` naming the caption for more than ``max_len`` words or a word not in VOCAB."""
        if not isinstance(caption, str):
            raise TypeError(f"a caption must be a str, got {type(caption).__name__}")
        words = caption.lower().split()
        if len(words) > self.max_len:
            raise ValueError(f"caption {caption!r} has {len(words)} words; the encoder takes at most {self.max_len}")
        unknown = [w for w in words if w not in VOCAB]
        if unknown:
            raise ValueError(
                f"caption {caption!r}: {', '.join(map(repr, unknown))} not in the vocabulary ({' '.join(VOCAB[1:])})"
            )
        return words

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.zeros(len(captions), self.max_len, self.dim)
        mask = torch.zeros(len(captions), self.max_len, dtype=torch.int32)
        for i, caption in enumerate(captions):
            for j, word in enumerate(self.words(caption)):
                feats[i, j] = self.table[VOCAB.index(word)] + self.pe[j]
                mask[i, j] = 1
        return feats, mask
