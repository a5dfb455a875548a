"""Images and short clips of coloured 2D shapes: a circle, square, diamond or bar on a coloured background, at
one of several resolutions and aspect ratios, or sliding across a 16x16 frame ("a red circle on blue",
"an orange bar on black moving right"). Pixels in [-1, 1], 3 channels.
"""

from __future__ import annotations

import torch

from .item import Item, article

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
WORDS = ("a", "on", "moving", *COLORS, *SHAPES, *MOTIONS)


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


def _draw(g: torch.Generator):
    """Foreground colour, a different background colour, and a shape, drawn from g."""
    names = list(COLORS)
    fg = names[int(torch.randint(len(names), (1,), generator=g))]
    bg = names[(names.index(fg) + 1 + int(torch.randint(len(names) - 1, (1,), generator=g))) % len(names)]
    shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
    return fg, bg, shape


def _uniform(g: torch.Generator, a: float, b: float) -> float:
    return a + (b - a) * float(torch.rand(1, generator=g))


def make_image(g: torch.Generator) -> Item:
    fg, bg, shape = _draw(g)
    h, w = IMAGE_SIZES[int(torch.randint(len(IMAGE_SIZES), (1,), generator=g))]
    r = _uniform(g, 0.2, 0.32) * min(h, w)
    cy, cx = _uniform(g, r, h - r), _uniform(g, r, w - r)
    pixels = _paint(shape, COLORS[fg], COLORS[bg], h, w, cy, cx, r)
    return Item(pixels, f"{article(fg)} {fg} {shape} on {bg}", "image")


def make_video(g: torch.Generator) -> Item:
    fg, bg, shape = _draw(g)
    f, h, w = VIDEO_SIZE
    motion = MOTIONS[int(torch.randint(len(MOTIONS), (1,), generator=g))]
    r = _uniform(g, 0.15, 0.22) * min(h, w)
    step = (w - 2 * r) / (f - 1)
    frames = []
    for i in range(f):
        pos = r + i * step
        cy, cx = {"right": (h / 2, pos), "left": (h / 2, w - pos), "down": (pos, w / 2), "up": (h - pos, w / 2)}[motion]
        frames.append(_paint(shape, COLORS[fg], COLORS[bg], h, w, cy, cx, r))
    return Item(torch.stack(frames, dim=1), f"{article(fg)} {fg} {shape} on {bg} moving {motion}", "video")
