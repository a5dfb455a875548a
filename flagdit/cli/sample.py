"""flagdit-sample: samples of every modality a flagdit-train checkpoint learned, written as pictures and sound.

Outputs, beside --out (default runs/tiny/samples.png): image -> OUT, a grid with one row per caption and one
column per size; video -> OUT_video.png, one film strip per caption; multiview -> OUT_views.png, the views of
each caption placed around a ring as their cameras sit around the object (seen from above, azimuth 0 at the
bottom); audio -> OUT_audio_K.wav per caption (Griffin-Lim from the log-mel latent) and OUT_audio.png, their
spectrograms (low frequencies at the bottom). By default the modalities of the checkpoint's training data are
sampled (an image run, which holds short clips too, gives the grid and the strip; a mixed run all four).

Captions use the words of flagdit.data.VOCAB, any case. Every argument is checked before any sampling starts
(captions, sizes against the limits below, every output path), so a mistake is one line on stderr and costs
nothing; --debug shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_training_checkpoint, model_from_state
from ..data import DATASETS, WordEncoder, audio, multiview
from ..modality import MODALITIES
from ..sample_outputs import grid, spectrogram_image, to_image, view_ring
from ..sampling import SOLVERS, sample
from . import args as ca

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
# Limits named up front instead of a MemoryError after minutes: tokens in one sample (the packed attention of a
# sample is quadratic in them), pixels per side of a latent and of an upscaled picture, sizes per grid row,
# frames per clip.
MAX_TOKENS = 8192
MAX_SIDE = 1024
MAX_PICTURE_SIDE = 4096
MAX_SIZES = 16
MAX_FRAMES = 64
MAX_SCALE = 16


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = ca.ArgumentParser(prog="flagdit-sample", description=__doc__, formatter_class=ca.HelpFormatter)
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
    p.add_argument("--frames", type=ca.bounded_int(1, MAX_FRAMES), default=4, help="video frames")
    p.add_argument("--video-size", type=ca.size, default=(16, 16), metavar="HxW",
                   help="video frame size (default: 16x16)")  # fmt: skip
    p.add_argument("--view-caption", action="append", metavar="TEXT",
                   help="multi-view caption, repeatable (default: three built-in captions)")  # fmt: skip
    p.add_argument("--views", type=ca.bounded_int(1, multiview.MAX_VIEWS), default=None,
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
    p.add_argument("--scale", type=ca.bounded_int(1, MAX_SCALE), default=4,
                   help="nearest-neighbour upscaling of the PNGs")  # fmt: skip
    p.add_argument("--seed", type=ca.seed, default=0, help="seed of the initial noise")
    p.add_argument("--backend", default=None, choices=_backends(),
                   help="flagdit_kernels backend for every op that has it (default: the fastest per op)")  # fmt: skip
    ca.add_attention_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p


def _backends() -> tuple[str, ...]:
    import flagdit_kernels as fk

    return fk.BACKENDS


def trained_args(ckpt: dict, path) -> dict:
    """The training arguments stored in a checkpoint that sampling reads (the data set, its views)."""
    args = ckpt.get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: its args is a {type(args).__name__}, not a dict")
    if args.get("modality", "image") not in DATASETS:
        raise CheckpointError(f"{path}: its args name the data set {args.get('modality')!r}, not one of {DATASETS}")
    views = args.get("views", multiview.DEFAULT_VIEWS)
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= multiview.MAX_VIEWS:
        raise CheckpointError(f"{path}: its args hold views={views!r}, not an int in [1, {multiview.MAX_VIEWS}]")
    return args


def trained_tile(train_args: dict, path) -> tuple[int, int, int] | None:
    """The --attention-tile a run trained with (None: the default tile)."""
    tile = train_args.get("attention_tile")
    if tile is None:
        return None
    if not isinstance(tile, (list, tuple)) or len(tile) != 3 or not all(isinstance(n, int) and n >= 1 for n in tile):
        raise CheckpointError(f"{path}: its args hold attention_tile={tile!r}, not three ints >= 1")
    return tuple(tile)


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
        cond = self.model.conditioning_inputs([modality] * len(shapes), cameras or [None] * len(shapes))
        return sample(self.model, shapes, feats, mask, steps=a.steps, solver=a.solver, shift=a.shift,
                      cfg_scale=a.cfg, generator=self.generator, progress=not a.no_progress, **cond)  # fmt: skip


def _check_sizes(p: argparse.ArgumentParser, option: str, sizes, patch: int, scale: int) -> None:
    if len(sizes) > MAX_SIZES:
        p.error(f"{option}: {len(sizes)} sizes; at most {MAX_SIZES} per grid row")
    for h, w in sizes:
        if max(h, w) > MAX_SIDE:
            p.error(f"{option}: {h}x{w} is larger than {MAX_SIDE} pixels on a side")
        if h % patch or w % patch:
            p.error(f"{option}: {h}x{w} is not a multiple of the model's patch size {patch}")
        if max(h, w) * scale > MAX_PICTURE_SIDE:
            p.error(f"{option} {h}x{w} with --scale {scale}: pictures of more than {MAX_PICTURE_SIDE} pixels a side")


def tokens(shape: tuple[int, ...], config) -> int:
    """Packed tokens of one ``(C, [F,] H, W)`` latent under ``config`` (patches, [nextline] and [nextframe])."""
    f, h, w = (1, *shape[-2:]) if len(shape) == 3 else shape[-3:]
    rows, cols = h // config.patch_size, w // config.patch_size + int(config.nextline)
    return f * rows * cols + (f - 1) * int(config.nextframe)


def _check_tokens(p: argparse.ArgumentParser, option: str, shape: tuple[int, ...], config) -> None:
    n = tokens(shape, config)
    if n > MAX_TOKENS:
        p.error(f"{option}: one sample of shape {shape} is {n} tokens, more than the {MAX_TOKENS} one sample may hold")


def output_problem(paths: list[Path]) -> str | None:
    """Why one of the files sampling will write cannot be written, checked before any work: a directory in the
    way, an unknown picture format, a folder that cannot be created or written."""
    from PIL import Image

    formats = Image.registered_extensions()
    for path in paths:
        if path.is_dir():
            return f"{path} is a directory, not a file"
        if path.suffix.lower() not in formats and path.suffix.lower() != ".wav":
            return f"{path}: no picture format for the extension {path.suffix or '(none)'!r}; use .png"
        if path.exists() and not os.access(path, os.W_OK):
            return f"{path} exists and is not writable"
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return f"cannot create {path.parent}: {folder} is not a directory"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write {path}: {folder} is not writable"
    return None


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    ca.run_main("flagdit-sample", lambda: _main(p, args), args.debug, (NotImplementedError,))


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = ca.backend_problem(args.backend, "cpu")  # the checkpoint's model is built on the CPU
    if problem:
        p.error(problem)
    if not Path(args.ckpt).is_file():
        p.error(f"--ckpt: no such file {args.ckpt}")
    try:
        ckpt = load_training_checkpoint(args.ckpt)
        model = model_from_state(ckpt, backend=args.backend, path=args.ckpt).eval()
        # Not stored in the weights: any checkpoint, dense-trained or not, samples with the attention asked for.
        model.attention_sparsity, model.attention_tile = ca.attention_settings(args)
        train_args = trained_args(ckpt, args.ckpt)
        if model.config.coarse_attention and args.attention_tile is None:
            model.attention_tile = trained_tile(train_args, args.ckpt)  # the coarse gates learned those tiles
    except (ValueError, RuntimeError, OSError) as e:
        p.error(f"--ckpt: {e}")
    c = model.config
    if c.in_channels < VISUAL_CHANNELS:
        p.error(f"--ckpt: the model takes {c.in_channels} channels; these data sets need {VISUAL_CHANNELS}")
    if args.modality is None:
        modalities = trained_modalities(train_args)
    else:
        modalities = list(MODALITIES) if args.modality == "mixed" else [args.modality]
    out = Path(args.out)
    beside = lambda suffix: out.with_name(out.stem + suffix)
    encoder, outputs, views, frames = WordEncoder(c.cap_feat_dim), [], None, None
    if "image" in modalities:
        _check_sizes(p, "--sizes", args.sizes, c.patch_size, args.scale)
        for h, w in args.sizes:
            _check_tokens(p, "--sizes", (VISUAL_CHANNELS, h, w), c)
        outputs.append(out)
    if "video" in modalities:
        _check_sizes(p, "--video-size", [args.video_size], c.patch_size, args.scale)
        _check_tokens(p, "--frames/--video-size", (VISUAL_CHANNELS, args.frames, *args.video_size), c)
        outputs.append(beside("_video.png"))
    if "multiview" in modalities:
        _check_sizes(p, "--view-size", [args.view_size], c.patch_size, args.scale)
        views = args.views or int(train_args.get("views", multiview.DEFAULT_VIEWS))
        _check_tokens(p, "--views/--view-size", (VISUAL_CHANNELS, views, *args.view_size), c)
        outputs.append(beside("_views.png"))
    if "audio" in modalities:
        try:
            frames = audio.frames_for(args.duration, c.patch_size)
        except ValueError as e:
            p.error(f"--duration: {e}")
        _check_tokens(p, f"--duration {args.duration:g}", (1, audio.N_MELS, frames), c)
        if frames * args.scale > MAX_PICTURE_SIDE:
            p.error(f"--duration {args.duration:g} with --scale {args.scale}: a spectrogram wider than "
                    f"{MAX_PICTURE_SIDE} pixels")  # fmt: skip
        n_clips = len(args.audio_caption or DEFAULT_CAPTIONS["audio"])
        outputs += [beside("_audio.png"), *(beside(f"_audio_{k}.wav") for k in range(n_clips))]
    for option in ("caption", "video_caption", "view_caption", "audio_caption"):
        for caption in getattr(args, option) or ():
            try:
                encoder.words(caption)
            except ValueError as e:
                p.error(f"--{option.replace('_', '-')}: {e}")
    problem = output_problem(outputs)
    if problem:
        p.error(f"--out: {problem}")
    run = Sampler(model, args)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    print(f"wrote {'; '.join(written)} (attention {ca.describe_attention(model)})")


if __name__ == "__main__":
    main()
