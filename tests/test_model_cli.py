"""``flagdit-train`` / ``flagdit-sample`` entry points, checkpoint resume, and the data set."""

from __future__ import annotations

import json

import torch

from flagdit import data, train
from flagdit.sample_cli import main as sample_main

SMALL = ["--set", "dim=64", "--set", "n_layers=2", "--batch-size", "4", "--warmup", "1", "--lr", "3e-3",
         "--no-progress", "--threads", "1", "--log-every", "1"]  # fmt: skip


def test_resume_continues_the_same_trajectory(tmp_path):
    straight = train.train(train.parse_args([*SMALL, "--out", str(tmp_path / "a"), "--steps", "4"]))
    first = train.train(train.parse_args([*SMALL, "--out", str(tmp_path / "b"), "--steps", "2"]))
    rest = train.train(train.parse_args([*SMALL, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"]))
    assert len(straight) == 4 and len(first) == 2 and len(rest) == 2
    assert first + rest == straight
    ckpt = train.load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["dim"] == 64
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_sample_cli_writes_grid_and_video_strip(tmp_path):
    from PIL import Image

    train.train(train.parse_args([*SMALL, "--out", str(tmp_path), "--steps", "1"]))
    out = tmp_path / "grid.png"
    sample_main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out), "--sizes", "8x8", "8x16", "--steps", "2",
                 "--caption", "a red circle on blue", "--video-caption", "a red bar on white moving up", "--frames", "3", "--video-size", "8x8", "--scale", "2",
                 "--no-progress"])  # fmt: skip
    grid = Image.open(out)
    strip = Image.open(tmp_path / "grid_video.png")
    assert grid.size == (4 + 16 + 4 + 32 + 4, 4 + 16 + 4)
    assert strip.size == (4 + 3 * (16 + 4), 4 + 16 + 4)


def test_procedural_items_are_deterministic_and_varied():
    a, b = data.make_item(0, 5), data.make_item(0, 5)
    assert torch.equal(a.latent, b.latent) and a.caption == b.caption
    items = [data.make_item(1, i) for i in range(40)]
    shapes = {tuple(it.latent.shape) for it in items}
    assert len(shapes) >= 4 and any(len(s) == 4 for s in shapes)  # several sizes, and videos
    assert all(it.latent.min() >= -1 and it.latent.max() <= 1 for it in items)
    enc = data.WordEncoder(16)
    feats, mask = enc([items[0].caption, "a red circle"])
    assert feats.shape == (2, 8, 16) and mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert feats[1, 3:].abs().sum() == 0
