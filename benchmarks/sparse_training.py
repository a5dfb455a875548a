"""Issue 27's training evidence on the CPU: the tiny video model trained with dense and with tile-sparse (a Sliding
Tile Attention window) self-attention, same seed, data, steps and hyper-parameters, and the dense
checkpoint fine-tuned sparse for a few more steps; their loss curves, a held-out validation loss, and sample film
strips side by side.

    python benchmarks/sparse_training.py --runs runs/issue27 --steps 300 --out benchmarks/samples/issue27

Each run is ``flagdit-train --resume`` (a finished run is reused, a killed one continued). The validation loss is
the flow-matching loss of fixed held-out clips (another data seed) at fixed times and noise, the same for every
model; the dense checkpoint is also evaluated and sampled with the sparse attention and no fine-tuning (what
turning sparsity on costs before any training). Prints the Markdown table of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

import flagdit_kernels as fk
from flagdit import checkpoint, data
from flagdit.cli import sample as sample_cli
from flagdit.cli import train
from flagdit.flow import training_loss

TILE = (1, 2, 2)  # 4x4x4 tiles of a 4x8x8-patch clip
WINDOW = (2, 2, 2)  # 8 of the 64 key tiles per query tile
FINE_TUNE = 50  # sparse steps after the dense run, from its checkpoint


def _options(window: tuple[int, int, int]) -> list[str]:
    return ["--attention-window", ",".join(map(str, window)), "--attention-tile", ",".join(map(str, TILE))]


# run directory -> its flagdit-train options; the last two continue dense's checkpoint for FINE_TUNE steps
RUNS = {"dense": [], "sparse": _options(WINDOW), "dense_then_sparse": _options(WINDOW), "dense_longer": []}
CONTINUED = ("dense_then_sparse", "dense_longer")
# (label, run directory, the window the model runs with (None: dense), whether the run trained that attention)
MODELS = (
    ("dense", "dense", None, True),
    ("sparse 2,2,2", "sparse", WINDOW, True),
    ("dense, run sparse 2,2,2", "dense", WINDOW, False),
    (f"dense + {FINE_TUNE} steps sparse 2,2,2", "dense_then_sparse", WINDOW, True),
    (f"dense + {FINE_TUNE} steps dense", "dense_longer", None, True),
)
TRAIN = ["--modality", "video", "--batch-size", "8", "--no-progress", "--threads", "1", "--log-every", "1",
         "--save-every", "50", "--seed", "0"]  # fmt: skip
VALIDATION_SEED, VALIDATION_ITEMS, VALIDATION_BATCH = 1000, 32, 8
LAST = 50  # training steps averaged for the final training loss


def validation_loss(model) -> float:
    """Mean flow-matching loss over the held-out clips, time k/(n+1) for clip k and noise seeded by k."""
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
    return float(torch.cat(losses).mean())


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


def loss_plot(logs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    for name, records in logs.items():
        records = records[-FINE_TUNE:] if name in CONTINUED else records  # after dense's steps
        ax.plot([r["step"] for r in records], [r["loss_ema"] for r in records], label=f"{name} (EMA 0.95)")
    ax.set(xlabel="step", ylabel="training loss", title="tiny video model: dense vs tile-sparse attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def train_runs(runs: Path, steps: int) -> None:
    for name, options in RUNS.items():
        total = steps
        if name in CONTINUED:
            total += FINE_TUNE
            if not (runs / name).exists():
                shutil.copytree(runs / "dense", runs / name, ignore=shutil.ignore_patterns(".lock"))
        train.main([*TRAIN, "--steps", str(total), "--out", str(runs / name), "--resume", *options])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/issue27"), help="folder of the run directories")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/samples/issue27"), help="folder of the PNGs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_runs(args.runs, args.steps)
    logs = {n: [json.loads(line) for line in (args.runs / n / "log.jsonl").read_text().splitlines()] for n in RUNS}
    results, panels = [], {}
    for label, run, window, own in MODELS:
        ckpt = args.runs / run / "ckpt.pt"
        model = checkpoint.model_from_checkpoint(ckpt).eval()
        if window is not None:
            model.attention_sparsity, model.attention_tile = fk.TileSparsity(window=window), TILE
        val = validation_loss(model)
        density = float(fk.last_tile_blocks().density) if window is not None else 1.0
        trained = [r["loss"] for r in logs[run]][-LAST:]
        trained = f"{sum(trained) / len(trained):.4f}" if own else "-"
        results.append((label, len(logs[run]), density, trained, val))
        stem = re.sub(r"\W+", "_", label).strip("_")
        panels[label] = strips(ckpt, args.out / f"{stem}.png", [] if window is None else _options(window))
    dense_at = {steps: val for _, steps, density, _, val in results if density == 1.0}  # dense after that many steps
    rows = [f"| {label} | {steps} | {density:.3f} | {trained} | {val:.4f} | {100 * (val / dense_at[steps] - 1):+.1f}% |"
            for label, steps, density, trained, val in results]  # fmt: skip
    side_by_side(panels, args.out / "samples_side_by_side.png")
    loss_plot(logs, args.out / "loss_curves.png")
    print(
        f"| model | steps | attention density | training loss, mean of its last {LAST} steps | validation loss "
        "| validation vs dense after the same steps |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
