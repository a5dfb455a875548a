"""flagdit-sample: samples of every modality a flagdit-train checkpoint learned, written as pictures and sound.

Outputs, beside --out (default runs/tiny/samples.png): image -> OUT, a grid with one row per caption and one
column per size; video -> OUT_video.png, one film strip per caption; multiview -> OUT_views.png, the views of
each caption placed around a ring as their cameras sit around the object (seen from above, azimuth 0 at the
bottom); audio -> OUT_audio_K.wav per caption (Griffin-Lim from the log-mel latent) and OUT_audio.png, their
spectrograms (low frequencies at the bottom). By default the modalities of the checkpoint's training data are
sampled (an image run, which holds short clips too, gives the grid and the strip; a mixed run all four).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from . import cli_args as ca
from .checkpoint import load_training_checkpoint, model_from_state
from .data import DATASETS, WordEncoder, audio, multiview
from .modality import MODALITIES
from .sample_outputs import grid, spectrogram_image, to_image, view_ring
from .sampling import SOLVERS, sample
from .train import conditioning

DEFAULT_CAPTIONS = {
    "image": (
        "a red circle on blue",
        "a yellow square on purple",
        "a white diamond on green",
        "an orange bar on black",
    ),
    "video": ("a green square on white moving right", "a red circle on black moving down"),
    "multiview": ("a red cube beside a blue sphere", "a yellow cylinder", "a green sphere beside a white cube"),
    "audio": ("a rising high tone", "a low tone", "a high major chord", "a low noise burst"),
}
DEFAULT_SIZES = ("16x16", "16x32", "32x16", "24x24", "32x32", "48x48")
VISUAL_CHANNELS = 3


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flagdit-sample", description=__doc__, formatter_class=ca.HelpFormatter)
    p.add_argument("--ckpt", default="runs/tiny/ckpt.pt", help="checkpoint written by flagdit-train")
    p.add_argument("--out", default="runs/tiny/samples.png", help="image grid PNG; the other outputs go beside it")
    p.add_argument("--modality", choices=DATASETS,
                   help="what to sample; mixed is all four (default: the checkpoint's training data)")  # fmt: skip
    p.add_argument(
        "--caption",
        action="append",
        metavar="TEXT",
        help="image caption, repeatable (default: four built-in captions); words of flagdit.data.VOCAB",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=ca.size,
        default=[ca.size(s) for s in DEFAULT_SIZES],
        metavar="HxW",
        help=f"image sizes in pixels, multiples of the patch size (default: {' '.join(DEFAULT_SIZES)})",
    )
    p.add_argument("--video-caption", action="append", metavar="TEXT",
                   help="video caption, repeatable (default: two built-in captions)")  # fmt: skip
    p.add_argument("--frames", type=ca.positive_int, default=4, help="video frames")
    p.add_argument("--video-size", type=ca.size, default=(16, 16), metavar="HxW",
                   help="video frame size (default: 16x16)")  # fmt: skip
    p.add_argument("--view-caption", action="append", metavar="TEXT",
                   help="multi-view caption, repeatable (default: three built-in captions)")  # fmt: skip
    p.add_argument("--views", type=ca.positive_int, default=None,
                   help="cameras on the ring (default: the checkpoint's --views)")  # fmt: skip
    p.add_argument("--view-size", type=ca.size, default=(16, 16), metavar="HxW", help="view size (default: 16x16)")
    p.add_argument("--elevation", type=ca.finite_float, default=25.0, help="camera elevation in degrees")
    p.add_argument("--audio-caption", action="append", metavar="TEXT",
                   help="audio caption, repeatable (default: four built-in captions)")  # fmt: skip
    p.add_argument("--duration", type=ca.positive_float, default=1.0, help="audio clip length in seconds")
    p.add_argument("--griffin-lim-iters", type=ca.positive_int, default=audio.GRIFFIN_LIM_ITERS,
                   help="Griffin-Lim iterations of the waveform reconstruction")  # fmt: skip
    p.add_argument("--steps", type=ca.positive_int, default=20, help="ODE solver steps")
    p.add_argument("--solver", default="midpoint", choices=SOLVERS,
                   help="ODE solver; midpoint evaluates the model twice per step")  # fmt: skip
    p.add_argument("--shift", type=ca.positive_float, default=1.0, help="time shift s of t' = t / (t + s - s t)")
    p.add_argument("--cfg", type=ca.finite_float, default=3.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--scale", type=ca.positive_int, default=4, help="nearest-neighbour upscaling of the PNGs")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--backend", default=None, choices=_backends(),
                   help="flagdit_kernels backend for every op that has it (default: the fastest per op)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _backends() -> tuple[str, ...]:
    import flagdit_kernels as fk

    return fk.BACKENDS


def trained_modalities(train_args: dict) -> list[str]:
    """The modalities a run's data held: mixed -> all; image -> image, plus video when it had clips."""
    data = train_args.get("modality", "image")
    if data == "mixed":
        return list(MODALITIES)
    if data == "image" and train_args.get("video_fraction", 0.15) > 0:
        return ["image", "video"]
    return [data]


class Sampler:
    """Runs the sampler for one modality's captions and shapes, with the conditioning the model takes."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.encoder = WordEncoder(model.config.cap_feat_dim)
        self.generator = torch.Generator().manual_seed(args.seed)

    def __call__(self, modality: str, captions: list[str], shapes: list[tuple], cameras=None) -> list[torch.Tensor]:
        a = self.args
        feats, mask = self.encoder(captions)
        device = next(self.model.parameters()).device
        cond = conditioning(self.model.config, [modality] * len(shapes), cameras or [None] * len(shapes), device)
        return sample(self.model, shapes, feats, mask, steps=a.steps, solver=a.solver, shift=a.shift,
                      cfg_scale=a.cfg, generator=self.generator, progress=not a.no_progress, **cond)  # fmt: skip


def _check_sizes(p: argparse.ArgumentParser, option: str, sizes, patch: int) -> None:
    for h, w in sizes:
        if h % patch or w % patch:
            p.error(f"{option}: {h}x{w} is not a multiple of the model's patch size {patch}")


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if not Path(args.ckpt).is_file():
        p.error(f"--ckpt: no such file {args.ckpt}")
    try:
        ckpt = load_training_checkpoint(args.ckpt)
        model = model_from_state(ckpt, backend=args.backend).eval()
    except (ValueError, RuntimeError, OSError) as e:
        p.error(f"--ckpt: {e}")
    c = model.config
    if c.in_channels < VISUAL_CHANNELS:
        p.error(f"--ckpt: the model takes {c.in_channels} channels; these data sets need {VISUAL_CHANNELS}")
    train_args = ckpt.get("args", {})
    if args.modality is None:
        modalities = trained_modalities(train_args)
    else:
        modalities = list(MODALITIES) if args.modality == "mixed" else [args.modality]
    _check_sizes(p, "--sizes", args.sizes, c.patch_size)
    _check_sizes(p, "--video-size", [args.video_size], c.patch_size)
    _check_sizes(p, "--view-size", [args.view_size], c.patch_size)
    frames = None
    if "audio" in modalities:
        try:
            frames = audio.frames_for(args.duration, c.patch_size)
        except ValueError as e:
            p.error(f"--duration: {e}")
    run = Sampler(model, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    beside = lambda suffix: out.with_name(out.stem + suffix)
    written = []
    if "image" in modalities:
        captions = args.caption or list(DEFAULT_CAPTIONS["image"])
        rows = []
        for caption in captions:  # one packed batch per row: every size at once
            shapes = [(VISUAL_CHANNELS, h, w) for h, w in args.sizes]
            rows.append([to_image(x, args.scale) for x in run("image", [caption] * len(shapes), shapes)])
        grid(rows).save(out)
        written.append(f"{out} ({len(captions)} captions x {len(args.sizes)} sizes)")
    if "video" in modalities:
        captions = args.video_caption or list(DEFAULT_CAPTIONS["video"])
        h, w = args.video_size
        clips = run("video", captions, [(VISUAL_CHANNELS, args.frames, h, w)] * len(captions))
        grid([[to_image(clip[:, f], args.scale) for f in range(args.frames)] for clip in clips]).save(
            beside("_video.png")
        )
        written.append(f"{beside('_video.png')} ({len(captions)} clips x {args.frames} frames)")
    if "multiview" in modalities:
        captions = args.view_caption or list(DEFAULT_CAPTIONS["multiview"])
        views = args.views or int(train_args.get("views", multiview.DEFAULT_VIEWS))
        cameras = multiview.ring_cameras(views, math.radians(args.elevation))
        h, w = args.view_size
        scenes = run("multiview", captions, [(VISUAL_CHANNELS, views, h, w)] * len(captions), [cameras] * len(captions))
        rings = [view_ring([to_image(s[:, v], args.scale) for v in range(views)], cameras) for s in scenes]
        grid([rings]).save(beside("_views.png"))
        written.append(f"{beside('_views.png')} ({len(captions)} scenes x {views} views)")
    if "audio" in modalities:
        captions = args.audio_caption or list(DEFAULT_CAPTIONS["audio"])
        clips = run("audio", captions, [(1, audio.N_MELS, frames)] * len(captions))
        for k, clip in enumerate(clips):
            audio.write_wav(beside(f"_audio_{k}.wav"), audio.latent_to_waveform(clip, args.griffin_lim_iters))
        grid([[spectrogram_image(clip, args.scale)] for clip in clips]).save(beside("_audio.png"))
        seconds = audio.samples_for(frames) / audio.SAMPLE_RATE
        written.append(f"{beside('_audio.png')} and {len(clips)} WAVs of {seconds:.2f} s ({beside('_audio_K.wav')})")
    print("wrote " + "; ".join(written))


if __name__ == "__main__":
    main()
