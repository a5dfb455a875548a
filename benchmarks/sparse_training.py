"""Issue 27's training evidence on the CPU: the tiny video model trained with dense and with tile-sparse
self-attention (a Sliding Tile Attention window, Video Sparse Attention's top-k tiles, or their union), same seed,
data, steps and hyper-parameters, and the dense checkpoint fine-tuned sparse for a few more steps; their loss
curves, a held-out validation loss, and sample film strips side by side.

    python benchmarks/sparse_training.py --runs runs/issue27 --steps 300 --out benchmarks/samples/issue27 \
        --sparse window=2,2,2 --sparse window=2,3,3 --sparse window=2,2,2+top_k=8 --seeds 0,1

Each run is ``flagdit-train --resume`` (a finished run is reused, a killed one continued). ``--sparse`` (repeated)
names the from-scratch sparse configurations, ``window=WT,WH,WW`` and/or ``top_k=K`` joined by ``+``, and
``+coarse`` for Video Sparse Attention's gated coarse branch (config ``coarse_attention``: parameters of its own,
so such a run trains from scratch only); the first configuration is also the fine-tuning one. ``--seeds``: every
from-scratch run (dense and sparse) with each seed (data, noise and initial weights), so a second dense seed shows
the run-to-run spread a sparse gap is judged against; the fine-tuning runs continue the first seed's dense run.
The validation loss is the flow-matching loss of fixed held-out clips (another data seed) at fixed times and noise,
the same for every model; the dense checkpoint is also evaluated and sampled with each sparse attention and no
fine-tuning (what turning sparsity on costs before any training). Prints the Markdown table of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import flagdit_kernels as fk
from flagdit import checkpoint, data
from flagdit.cli import sample as sample_cli
from flagdit.cli import train
from flagdit.flow import training_loss

TILE = (1, 2, 2)  # 4x4x4 tiles of a 4x8x8-patch clip
TRAIN = ["--modality", "video", "--batch-size", "8", "--no-progress", "--threads", "1", "--log-every", "1",
         "--save-every", "50"]  # fmt: skip
VALIDATION_SEED, VALIDATION_ITEMS, VALIDATION_BATCH = 1000, 32, 8
LAST = 50  # training steps averaged for the final training loss


@dataclass(frozen=True)
class Pattern:
    """A sparse configuration: the tile-sparse pattern, and whether the model adds the coarse branch."""

    sparsity: fk.TileSparsity
    coarse: bool = False


def parse_pattern(spec: str) -> Pattern:
    """``window=2,3,3``, ``top_k=8`` or both joined by ``+``, optionally ``+coarse`` -> the Pattern."""
    fields, parts = {}, spec.split("+")
    coarse = parts[-1] == "coarse"
    for part in parts[:-1] if coarse else parts:
        key, _, value = part.partition("=")
        if key not in ("window", "top_k") or key in fields or not re.fullmatch(r"\d+(,\d+)*", value):
            raise argparse.ArgumentTypeError(
                f"expected window=WT,WH,WW and/or top_k=K joined by '+' (then optionally +coarse), got {spec!r}"
            )
        fields[key] = tuple(map(int, value.split(","))) if key == "window" else int(value)
    try:
        return Pattern(fk.TileSparsity(**fields), coarse)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e}") from None


def describe(pattern: Pattern) -> str:
    sparsity = pattern.sparsity
    window = [f"window {','.join(map(str, sparsity.window))}"] if sparsity.window is not None else []
    top_k = [f"top-{sparsity.top_k}"] if sparsity.top_k is not None else []
    return " + ".join(window + top_k + (["coarse"] if pattern.coarse else []))


def _options(pattern: Pattern) -> list[str]:
    """flagdit-train's / flagdit-sample's options of the attention (the coarse branch: training only, its
    checkpoint's config has it)."""
    sparsity = pattern.sparsity
    window = ["--attention-window", ",".join(map(str, sparsity.window))] if sparsity.window is not None else []
    top_k = ["--attention-top-k", str(sparsity.top_k)] if sparsity.top_k is not None else []
    return [*window, *top_k, "--attention-tile", ",".join(map(str, TILE))]


def _training_options(pattern: Pattern) -> list[str]:
    return _options(pattern) + (["--set", "coarse_attention=True"] if pattern.coarse else [])


@dataclass(frozen=True)
class Model:
    """One row of the table: a run's checkpoint, evaluated with ``pattern`` (None: dense)."""

    label: str
    run: str  # its run directory under --runs
    pattern: Pattern | None
    trained: bool  # whether the run trained with that attention (else: its training loss is not this model's)
    seed: int
    strips: bool  # whether it gets film strips (the first seed's models)


@dataclass(frozen=True)
class Run:
    name: str
    options: list[str]
    seed: int
    steps: int
    start_from: str | None = None  # a run directory it continues (copied, then resumed)


def plan(sparse: list[Pattern], seeds: list[int], steps: int, fine_tune: int) -> tuple[list[Run], list[Model]]:
    """The runs to train and the models to evaluate, in table order."""
    runs, models = [], []
    for seed in seeds:
        first = seed == seeds[0]
        suffix, note = ("", "") if seed == 0 else (f"_seed{seed}", f" (seed {seed})")
        runs.append(Run(f"dense{suffix}", [], seed, steps))
        models.append(Model(f"dense{note}", f"dense{suffix}", None, True, seed, first))
        for pattern in sparse:
            name = "sparse_" + re.sub(r"\W+", "_", describe(pattern)).strip("_") + suffix
            runs.append(Run(name, _training_options(pattern), seed, steps))
            models.append(Model(f"sparse {describe(pattern)}{note}", name, pattern, True, seed, first))
        if first:  # the dense weights have no coarse branch
            models += [Model(f"dense, run sparse {describe(p)} (no training)", "dense", p, False, seed, True)
                       for p in sparse if not p.coarse]  # fmt: skip
    if fine_tune:
        tuned = sparse[0]
        if tuned.coarse:
            raise ValueError(f"--fine-tune: the first --sparse ({describe(tuned)}) has the coarse branch, which the "
                             "dense checkpoint has no weights for; put a pattern without +coarse first")  # fmt: skip
        for name, pattern in ((f"dense_then_{runs[1].name}", tuned), ("dense_longer", None)):
            options = _options(pattern) if pattern is not None else []
            runs.append(Run(name, options, seeds[0], steps + fine_tune, start_from="dense"))
            what = f"sparse {describe(pattern)}" if pattern is not None else "dense"
            models.append(Model(f"dense + {fine_tune} steps {what}", name, pattern, True, seeds[0], True))
    return runs, models


def validation_loss(model) -> tuple[float, float]:
    """Mean flow-matching loss over the held-out clips, time k/(n+1) for clip k and noise seeded by k, and the
    attention density (``fk.last_tile_blocks().density``) averaged over every layer's call on them (1.0 dense: a
    top-k pattern's density depends on the queries and keys, a window's does not)."""
    densities = []

    def record(*_) -> None:
        if model.attention_sparsity is not None:
            densities.append(float(fk.last_tile_blocks().density))

    hooks = [layer.register_forward_hook(record) for layer in model.layers]
    encoder = data.WordEncoder(model.config.cap_feat_dim)
    losses = []
    with torch.no_grad():
        for start in range(0, VALIDATION_ITEMS, VALIDATION_BATCH):
            ks = range(start, start + VALIDATION_BATCH)
            items = [data.make_item(VALIDATION_SEED, k, modality="video") for k in ks]
            feats, mask = encoder([item.caption for item in items])
            t = torch.tensor([(k + 1) / (VALIDATION_ITEMS + 1) for k in ks])
            noise = [
                torch.randn(it.latent.shape, generator=torch.Generator().manual_seed(k)) for it, k in zip(items, ks)
            ]
            kwargs = model.conditioning_inputs(["video"] * len(items), [None] * len(items))
            x1 = [item.latent for item in items]
            losses.append(training_loss(model, x1, feats, mask, t=t, x0=noise, reduction="none", **kwargs))
    for hook in hooks:
        hook.remove()
    return float(torch.cat(losses).mean()), sum(densities) / len(densities) if densities else 1.0


def strips(ckpt: Path, out: Path, attention: list[str]) -> Path:
    """flagdit-sample's video film strips (its two default captions) of a checkpoint, with ``attention``."""
    sample_cli.main(["--ckpt", str(ckpt), "--out", str(out), "--modality", "video", "--no-progress", *attention])
    return out.with_name(out.stem + "_video.png")


def side_by_side(panels: dict[str, Path], out: Path) -> None:
    """The panels in one row, each under its label."""
    from PIL import Image, ImageDraw

    images = {label: Image.open(path).convert("RGB") for label, path in panels.items()}
    head, gap = 18, 8
    width = sum(im.width for im in images.values()) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, head + max(im.height for im in images.values())), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), 0
    for label, im in images.items():
        draw.text((x + 4, 3), label, fill=(0, 0, 0))
        canvas.paste(im, (x, head))
        x += im.width + gap
    canvas.save(out)


def loss_plot(logs: dict[str, list[dict]], runs: list[Run], out: Path) -> None:
    """The training-loss curves of the first seed's runs (a continued run from where it leaves dense's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, late) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=120, width_ratios=(1, 1.6))
    for run in runs:
        if run.seed != runs[0].seed:
            continue
        records, ema, smoothed = logs[run.name], None, []
        for r in records:  # from the raw losses: the logged loss_ema starts again where a killed run resumed
            ema = r["loss"] if ema is None else 0.95 * ema + 0.05 * r["loss"]
            smoothed.append(ema)
        start = len(logs[run.start_from]) if run.start_from else 0  # a continued run: after dense's steps
        steps = [r["step"] for r in records[start:]]
        for ax in (whole, late):
            ax.plot(steps, smoothed[start:], label=run.name, linewidth=1)
    whole.set(xlabel="step", ylabel="training loss (EMA 0.95)", title="tiny video model")
    late.set(xlabel="step", title="from step 150, where the runs part", xlim=(150, None), ylim=(0.22, 0.45))
    late.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out)


def train_runs(runs_dir: Path, runs: list[Run]) -> None:
    for run in runs:
        out = runs_dir / run.name
        if run.start_from is not None and not out.exists():
            shutil.copytree(runs_dir / run.start_from, out, ignore=shutil.ignore_patterns(".lock"))
        seed = ["--seed", str(run.seed)]
        train.main([*TRAIN, *seed, "--steps", str(run.steps), "--out", str(out), "--resume", *run.options])


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/issue27"), help="folder of the run directories")
    p.add_argument("--steps", type=int, default=300, help="training steps of each from-scratch run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/samples/issue27"), help="folder of the PNGs")
    p.add_argument("--sparse", type=parse_pattern, action="append", metavar="SPEC",
                   help="a from-scratch sparse configuration, window=WT,WH,WW and/or top_k=K joined by '+', "
                        "then optionally +coarse (repeatable; the first is also fine-tuned; default: "
                        "window=2,2,2)")  # fmt: skip
    p.add_argument(
        "--seeds", type=_list(int), default=[0], metavar="S,...", help="seeds of the from-scratch runs (default: 0)"
    )
    p.add_argument(
        "--fine-tune",
        type=int,
        default=50,
        metavar="STEPS",
        help="steps of the dense checkpoint continued sparse and dense (0: none; default 50)",
    )
    p.add_argument("--no-strips", action="store_true", help="no film strips, curves or side-by-side PNGs")
    args = p.parse_args(argv)
    sparse = args.sparse or [Pattern(fk.TileSparsity(window=(2, 2, 2)))]
    try:
        runs, models = plan(sparse, args.seeds, args.steps, args.fine_tune)
    except ValueError as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    train_runs(args.runs, runs)
    logs = {r.name: [json.loads(line) for line in (args.runs / r.name / "log.jsonl").read_text().splitlines()]
            for r in runs}  # fmt: skip
    results, panels = [], {}
    for m in models:
        ckpt = args.runs / m.run / "ckpt.pt"
        model = checkpoint.model_from_checkpoint(ckpt).eval()
        model.attention_sparsity = m.pattern.sparsity if m.pattern is not None else None
        model.attention_tile = TILE if m.pattern is not None or model.config.coarse_attention else None
        val, density = validation_loss(model)
        trained = [r["loss"] for r in logs[m.run]][-LAST:]
        results.append(Result(m, len(logs[m.run]), density, sum(trained) / len(trained) if m.trained else None, val))
        if m.strips and not args.no_strips:
            stem = re.sub(r"\W+", "_", m.label).strip("_")
            attention = [] if m.pattern is None else _options(m.pattern)
            panels[m.label] = strips(ckpt, args.out / f"{stem}.png", attention)
    if panels:
        side_by_side(panels, args.out / "samples_side_by_side.png")
        loss_plot(logs, runs, args.out / "loss_curves.png")
    print(table(results))
    print()
    print(seed_summary(results, args.steps))


@dataclass(frozen=True)
class Result:
    model: Model
    steps: int
    density: float
    trained: float | None  # mean training loss of its last LAST steps (None: not trained with this attention)
    val: float


def _gaps(results: list[Result]) -> list[tuple[float | None, float]]:
    """Per result: (training gap, validation gap) in percent against the same seed's dense run after the same
    steps (the training gap None where it was not trained with this attention)."""
    dense = {(r.model.seed, r.steps): r for r in results if r.model.pattern is None}
    gaps = []
    for r in results:
        ref = dense[r.model.seed, r.steps]
        train = 100 * (r.trained / ref.trained - 1) if r.trained is not None else None
        gaps.append((train, 100 * (r.val / ref.val - 1)))
    return gaps


def table(results: list[Result]) -> str:
    """The Markdown table of every model."""
    gaps = _gaps(results)
    lines = [
        f"| model | steps | attention density | training loss, mean of its last {LAST} steps | training vs dense "
        "| validation loss | validation vs dense (same seed) after the same steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results):
        train, val = gaps[i]
        trained = "-" if r.trained is None else f"{r.trained:.4f}"
        train = "-" if train is None else f"{train:+.1f}%"
        lines.append(
            f"| {r.model.label} | {r.steps} | {r.density:.3f} | {trained} | {train} | {r.val:.4f} | {val:+.1f}% |"
        )
    return "\n".join(lines)


def seed_summary(results: list[Result], steps: int) -> str:
    """Per from-scratch configuration (dense included), over the seeds: the mean and range of both gaps."""
    gaps = _gaps(results)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if r.model.trained and r.steps == steps:
            name = "dense" if r.model.pattern is None else f"sparse {describe(r.model.pattern)}"
            groups.setdefault(name, []).append(i)
    lines = [
        "| from scratch, each seed against its own dense run | density | seeds | training vs dense: mean (range) "
        "| validation vs dense: mean (range) |",
        "|---|---|---|---|---|",
    ]
    for name, members in groups.items():
        if name == "dense":
            continue
        seeds = ",".join(str(results[i].model.seed) for i in members)
        cells = []
        for k in (0, 1):
            values = [gaps[i][k] for i in members]
            cells.append(f"{sum(values) / len(values):+.1f}% ({min(values):+.1f}% to {max(values):+.1f}%)")
        density = sum(results[i].density for i in members) / len(members)
        lines.append(f"| {name} | {density:.3f} | {seeds} | {cells[0]} | {cells[1]} |")
    dense = [results[i] for i in groups.get("dense", [])]
    if len(dense) > 1:
        lines.append("")
        for what, values in (("training", [r.trained for r in dense]), ("validation", [r.val for r in dense])):
            low, high = min(values), max(values)
            seeds = ",".join(str(r.model.seed) for r in dense)
            lines.append(
                f"dense {what} loss over seeds {seeds}: {low:.4f} to {high:.4f} ({100 * (high / low - 1):.1f}% apart)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
