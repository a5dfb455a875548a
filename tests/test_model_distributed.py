"""Distributed training on CPU (gloo, 2 processes): DDP and FSDP2 follow the single-process loss trajectory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--steps", "4", "--batch-size", "4", "--set", "dim=64", "--set", "n_layers=2", "--no-progress",
        "--threads", "1", "--log-every", "1", "--warmup", "1", "--lr", "3e-3"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, launcher: list[str], extra: list[str]) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, *launcher, "-m", "flagdit.train", "--out", str(out), *ARGS, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_and_fsdp_match_single_process(tmp_path):
    single = _run(tmp_path / "one", [], [])
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    for mode in ("ddp", "fsdp"):
        losses = _run(tmp_path / mode, [*torchrun, "--master_port", str(_free_port())], ["--dist", mode])
        assert len(losses) == len(single) == 4
        for a, b in zip(losses, single):
            assert abs(a - b) <= 1e-5 * abs(b), (mode, losses, single)
    assert single[-1] != single[0]  # the weights moved: the trajectories are not trivially equal
