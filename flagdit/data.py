"""A procedurally generated text-to-image/video data set for CPU demos and tests.

Every item is a colored shape (circle, square, diamond, bar) on a colored background, at one of several
resolutions and aspect ratios, or a short clip of the shape sliding across the frame; its caption names what it
shows ("a red circle on blue, moving right"). Pixels are in [-1, 1], 3 channels. Item ``i`` of seed ``s`` is a
pure function of ``(s, i)``, so any process can build any part of a global batch.

Captions are turned into features by :class:`WordEncoder`, a frozen stand-in for a language model: a fixed
random embedding per word plus a sinusoidal position code, ``(B, Lt, dim)`` with a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "purple": (0.6, 0.2, 0.8),
    "orange": (1.0, 0.55, 0.1),
}
SHAPES = ("circle", "square", "diamond", "bar")
MOTIONS = ("left", "right", "up", "down")
IMAGE_SIZES = ((16, 16), (16, 24), (24, 16), (24, 24), (16, 32), (32, 16), (32, 32))
VIDEO_SIZE = (4, 16, 16)  # frames, height, width
VOCAB = ("<pad>", "a", "on", "moving", *COLORS, *SHAPES, *MOTIONS)


@dataclass
class Item:
    pixels: torch.Tensor  # (3, H, W) or (3, F, H, W) in [-1, 1]
    caption: str


def _mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    y = torch.arange(h).float().view(-1, 1) + 0.5
    x = torch.arange(w).float().view(1, -1) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return (dy**2 + dx**2 <= r**2).float()
    if shape == "square":
        return ((dy.abs() <= r) & (dx.abs() <= r)).float()
    if shape == "diamond":
        return (dy.abs() + dx.abs() <= 1.3 * r).float()
    return ((dy.abs() <= r * 0.45) & (dx.abs() <= r * 1.4)).float()  # bar


def _paint(shape, fg, bg, h, w, cy, cx, r) -> torch.Tensor:
    m = _mask(shape, h, w, cy, cx, r)
    fg_t, bg_t = torch.tensor(fg).view(3, 1, 1), torch.tensor(bg).view(3, 1, 1)
    return (m * fg_t + (1 - m) * bg_t) * 2 - 1


def make_item(seed: int, index: int, video_fraction: float = 0.15) -> Item:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))
    uniform = lambda a, b: a + (b - a) * float(torch.rand(1, generator=g))
    names = list(COLORS)
    fg_name = names[pick(len(names))]
    bg_name = names[(names.index(fg_name) + 1 + pick(len(names) - 1)) % len(names)]
    shape = SHAPES[pick(len(SHAPES))]
    fg, bg = COLORS[fg_name], COLORS[bg_name]
    if float(torch.rand(1, generator=g)) < video_fraction:
        f, h, w = VIDEO_SIZE
        motion = MOTIONS[pick(len(MOTIONS))]
        r = uniform(0.15, 0.22) * min(h, w)
        step = (w - 2 * r) / (f - 1)
        frames = []
        for i in range(f):
            pos = r + i * step
            cy, cx = {
                "right": (h / 2, pos),
                "left": (h / 2, w - pos),
                "down": (pos, w / 2),
                "up": (h - pos, w / 2),
            }[motion]
            frames.append(_paint(shape, fg, bg, h, w, cy, cx, r))
        return Item(torch.stack(frames, dim=1), f"a {fg_name} {shape} on {bg_name} moving {motion}")
    h, w = IMAGE_SIZES[pick(len(IMAGE_SIZES))]
    r = uniform(0.2, 0.32) * min(h, w)
    cy, cx = uniform(r, h - r), uniform(r, w - r)
    return Item(_paint(shape, fg, bg, h, w, cy, cx, r), f"a {fg_name} {shape} on {bg_name}")


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

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.zeros(len(captions), self.max_len, self.dim)
        mask = torch.zeros(len(captions), self.max_len, dtype=torch.int32)
        for i, caption in enumerate(captions):
            words = caption.split()[: self.max_len]
            for j, word in enumerate(words):
                if word not in VOCAB:
                    raise ValueError(f"unknown word {word!r}; the vocabulary is {VOCAB}")
                feats[i, j] = self.table[VOCAB.index(word)] + self.pe[j]
                mask[i, j] = 1
        return feats, mask
