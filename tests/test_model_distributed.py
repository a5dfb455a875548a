"""Distributed training on CPU (gloo): DDP and FSDP2, with and without sequence parallelism (--sp 2), follow the
single-process loss trajectory on the same global batch."""

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


pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[float]:
    losses = _run(tmp_path_factory.mktemp("one"), [], [])
    assert len(losses) == 4 and losses[-1] != losses[0]  # the weights moved: equal trajectories are not trivial
    return losses


def _torchrun(processes: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]  # fmt: skip


def _assert_same(losses: list[float], single: list[float], what: str) -> None:
    assert len(losses) == len(single), (what, losses, single)
    for a, b in zip(losses, single):
        assert abs(a - b) <= 1e-5 * abs(b), (what, losses, single)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_and_fsdp_match_single_process(tmp_path, single, mode):
    _assert_same(_run(tmp_path, _torchrun(2), ["--dist", mode]), single, mode)


@pytest.mark.parametrize(
    ("mode", "processes", "strategy"),
    [("ddp", 2, "ulysses"), ("fsdp", 4, "ring")],  # fsdp x4: a 2 x 2 mesh, two groups of 2, sharded over all 4
)
def test_sequence_parallel_training_matches_single_process(tmp_path, single, mode, processes, strategy):
    extra = ["--dist", mode, "--sp", "2", "--sp-strategy", strategy]
    _assert_same(_run(tmp_path, _torchrun(processes), extra), single, f"{mode} x{processes} --sp 2 {strategy}")
