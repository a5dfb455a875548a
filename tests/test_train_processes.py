"""flagdit-train as separate processes: a second run on one --out is refused while the first holds it, and a run
killed with SIGKILL at any moment (checkpointing every step) leaves a checkpoint that loads, verifies and
resumes, with a log that never repeats a step."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from isolated import ROOT

from flagdit import checkpoint

pytest.importorskip("librosa", reason="flagdit-train's data sets import librosa")

ARGS = ["--set", "dim=64", "--set", "n_layers=1", "--batch-size", "2", "--warmup", "1", "--no-progress",
        "--threads", "1", "--log-every", "1", "--save-every", "1"]  # fmt: skip


def _train(out, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "flagdit.cli.train", *ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _logged_steps(out) -> list[int]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return steps


def test_a_second_process_on_one_directory_is_refused_then_a_kill_loses_nothing(tmp_path):
    first = _train(tmp_path, "--steps", "400")
    _wait_for(lambda: len(_logged_steps(tmp_path)) >= 3, first)
    second = _train(tmp_path, "--steps", "400", "--resume")
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0 and "is in use by another flagdit-train" in err, err
    # Kill the first run at an arbitrary moment (it writes a checkpoint after every step).
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ckpt.pt.")) == [
        ".lock",
        "ckpt.pt",
        "log.jsonl",
    ]  # a temporary file of a write in flight may remain; never a torn ckpt.pt
    killed_at = checkpoint.load_training_checkpoint(tmp_path / "ckpt.pt")["step"]  # verifies the checksum
    assert killed_at >= 3
    resumed = _train(tmp_path, "--steps", str(killed_at + 2), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _logged_steps(tmp_path) == list(range(1, killed_at + 3))  # cut back to the checkpoint, no repeats
    assert checkpoint.load_training_checkpoint(tmp_path / "ckpt.pt")["step"] == killed_at + 2
