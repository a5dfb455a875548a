"""``flagdit-sample``: images at several resolutions and aspect ratios, and a short video, from a checkpoint of
``flagdit-train``, written as a PNG grid (one row per caption, one column per resolution) and a PNG film strip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .data import WordEncoder
from .sampling import sample
from .train import model_from_checkpoint

DEFAULT_CAPTIONS = (
    "a red circle on blue",
    "a yellow square on purple",
    "a white diamond on green",
    "a orange bar on black",
)
DEFAULT_SIZES = ("16x16", "16x32", "32x16", "24x24", "32x32", "48x48")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flagdit-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/tiny/ckpt.pt")
    p.add_argument("--out", default="runs/tiny/samples.png", help="grid PNG; the video strip goes beside it")
    p.add_argument("--caption", action="append", help="caption (repeatable); words from flagdit.data.VOCAB")
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="HxW pixel sizes (multiples of 2)")
    p.add_argument("--video-caption", default="a green square on white moving right")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--video-size", default="16x16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="midpoint", choices=("euler", "midpoint"))
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def to_image(x: torch.Tensor, scale: int):
    """(3, H, W) in [-1, 1] -> PIL image, upscaled."""
    from PIL import Image

    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def grid(rows: list[list], pad: int = 4, fill=(40, 40, 40)):
    from PIL import Image

    widths = [max(r[i].width for r in rows) for i in range(len(rows[0]))]
    heights = [max(im.height for im in r) for r in rows]
    canvas = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), sum(heights) + pad * (len(heights) + 1)), fill)
    y = pad
    for r, h in zip(rows, heights):
        x = pad
        for im, w in zip(r, widths):
            canvas.paste(im, (x, y))
            x += w + pad
        y += h + pad
    return canvas


def main(argv=None) -> None:
    args = parse_args(argv)
    model = model_from_checkpoint(args.ckpt, backend=args.backend).eval()
    c = model.config
    encoder = WordEncoder(c.cap_feat_dim)
    captions = args.caption or list(DEFAULT_CAPTIONS)
    sizes = [_size(s) for s in args.sizes]
    g = torch.Generator().manual_seed(args.seed)
    common = dict(steps=args.steps, solver=args.solver, shift=args.shift, cfg_scale=args.cfg, generator=g)
    # One packed batch per caption row: every resolution of the row at once.
    rows = []
    for caption in captions:
        feats, mask = encoder([caption] * len(sizes))
        shapes = [(c.in_channels, h, w) for h, w in sizes]
        out = sample(model, shapes, feats, mask, progress=not args.no_progress, **common)
        rows.append([to_image(x, args.scale) for x in out])
        print(f"sampled {caption!r} at {', '.join(args.sizes)}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows).save(out_path)
    h, w = _size(args.video_size)
    feats, mask = encoder([args.video_caption])
    video = sample(model, [(c.in_channels, args.frames, h, w)], feats, mask, progress=not args.no_progress, **common)
    frames = [to_image(video[0][:, f], args.scale) for f in range(args.frames)]
    strip_path = out_path.with_name(out_path.stem + "_video.png")
    grid([frames]).save(strip_path)
    print(f"wrote {out_path} ({len(captions)} captions x {len(sizes)} sizes) and {strip_path} ({args.frames} frames)")


if __name__ == "__main__":
    main()
