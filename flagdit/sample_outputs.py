"""Pictures of sampled latents: image grids, film strips, view rings and spectrograms (PIL images)."""

from __future__ import annotations

import math

import numpy as np
import torch

PAD, FILL = 4, (40, 40, 40)
# A dark-to-bright colour ramp (black, purple, red, orange, pale yellow) for spectrograms.
_RAMP = np.array([(0, 0, 4), (80, 18, 123), (182, 54, 121), (251, 136, 97), (252, 253, 191)], dtype=np.float64)


def to_image(x: torch.Tensor, scale: int):
    """(3, H, W) in [-1, 1] -> PIL image, upscaled ``scale`` times (nearest neighbour)."""
    from PIL import Image

    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def spectrogram_image(latent: torch.Tensor, scale: int):
    """(1, mels, frames) log-mel latent in [-1, 1] -> PIL image, low frequencies at the bottom."""
    from PIL import Image

    level = ((latent[0].float().clamp(-1, 1) + 1) / 2).flip(0).cpu().numpy() * (len(_RAMP) - 1)
    low = np.clip(np.floor(level).astype(int), 0, len(_RAMP) - 2)
    frac = (level - low)[..., None]
    rgb = (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def grid(rows: list[list]):
    """Images laid out in rows (columns as wide as their widest image), on a dark background."""
    from PIL import Image

    n_cols = max(len(r) for r in rows)
    widths = [max(r[i].width for r in rows if i < len(r)) for i in range(n_cols)]
    heights = [max(im.height for im in r) for r in rows]
    size = (sum(widths) + PAD * (n_cols + 1), sum(heights) + PAD * (len(rows) + 1))
    canvas = Image.new("RGB", size, FILL)
    y = PAD
    for r, h in zip(rows, heights):
        x = PAD
        for im, w in zip(r, widths):
            canvas.paste(im, (x, y))
            x += w + PAD
        y += h + PAD
    return canvas


def view_ring(views: list, cameras: torch.Tensor):
    """Views placed around a circle as their cameras sit around the object, seen from above: azimuth 0 (the
    camera on +z) at the bottom, azimuth 90 degrees (+x) on the right."""
    from PIL import Image

    w, h = views[0].width, views[0].height
    radius = max(w, h, len(views) * (max(w, h) + PAD) / (2 * math.pi))
    side = int(2 * radius + max(w, h) + 2 * PAD)
    canvas = Image.new("RGB", (side, side), FILL)
    for im, azimuth in zip(views, cameras[:, 0].tolist()):
        cx, cy = side / 2 + radius * math.sin(azimuth), side / 2 + radius * math.cos(azimuth)
        canvas.paste(im, (round(cx - w / 2), round(cy - h / 2)))
    return canvas
