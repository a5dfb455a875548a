"""Distributed training on CPU (gloo): DDP and FSDP2, with and without sequence parallelism (--sp 2 and 4, ring
and Ulysses, with activation checkpointing), follow the single-process loss trajectory on the same global
batch."""

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


def _run(out: Path, launcher: list[str], extra: list[str], args: list[str] = ARGS) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, *launcher, "-m", "flagdit.cli.train", "--out", str(out), *args, *extra]
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


# 12 steps of mixed-length batches (half of the items short clips: image and video token counts in one batch)
LONG_ARGS = ["--steps", "12", "--batch-size", "4", "--set", "dim=64", "--set", "n_layers=2", "--no-progress",
             "--threads", "1", "--log-every", "1", "--warmup", "2", "--lr", "3e-3",
             "--video-fraction", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def single_long(tmp_path_factory) -> list[float]:
    losses = _run(tmp_path_factory.mktemp("one_long"), [], [], LONG_ARGS)
    assert len(losses) == 12 and losses[-1] != losses[0]
    return losses


@pytest.mark.parametrize(
    ("mode", "processes", "sp", "strategy", "checkpointing"),
    [
        ("fsdp", 4, 4, "ring", "block"),
        ("fsdp", 4, 4, "ulysses", "selective"),
        ("fsdp", 4, 2, "ring", "selective"),  # a 2 x 2 mesh
        ("ddp", 2, 2, "ulysses", "block"),
    ],
)
def test_sequence_parallel_with_checkpointing_equals_one_process_over_12_steps(
    tmp_path, single_long, mode, processes, sp, strategy, checkpointing
):
    extra = ["--dist", mode, "--sp", str(sp), "--sp-strategy", strategy, "--activation-checkpointing", checkpointing]
    losses = _run(tmp_path, _torchrun(processes), extra, LONG_ARGS)
    what = f"{mode} x{processes} --sp {sp} {strategy} {checkpointing}"
    assert len(losses) == len(single_long), (what, losses, single_long)
    for a, b in zip(losses, single_long):
        assert abs(a - b) <= 1e-6 * abs(b), (what, losses, single_long)


BF16_PROBE = """
import json, os, torch, torch.distributed as dist
from flagdit.configs import get_config
from flagdit.model import FlagDiT
from flagdit.cli.distributed import wrap
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = wrap(FlagDiT(get_config("tiny", dim=64, n_layers=2)), "fsdp", torch.device("cpu"), bf16=True)
seen = {}
def probe(layer, args):
    seen["weight"] = str(layer.attention.wq.weight.dtype)
    seen["residual"] = str(args[0].dtype)
    seen["freqs"] = str(args[1].freqs.dtype)
model.layers[0].register_forward_pre_hook(probe)
out = model([torch.randn(3, 6, 8)], torch.rand(1), torch.randn(1, 4, 64), torch.ones(1, 4))
out[0].float().square().sum().backward()
p = model.layers[0].attention.wq.weight
seen.update(param=str(p.dtype), grad=str(p.grad.dtype), output=str(out[0].dtype))
torch.manual_seed(0)
ddp = wrap(FlagDiT(get_config("tiny", dim=64, n_layers=2)), "ddp", torch.device("cpu"), bf16=True)
def probe_ddp(layer, args, output):
    seen["ddp_residual"] = str(output.dtype)
    seen["ddp_wq_out"] = str(layer.attention.wq(args[0][:1]).dtype)
ddp.module.layers[0].register_forward_hook(probe_ddp)
with torch.autocast("cpu", dtype=torch.bfloat16):  # flagdit-train's --bf16 under DDP
    out = ddp([torch.randn(3, 6, 8)], torch.rand(1), torch.randn(1, 4, 64), torch.ones(1, 4))
out[0].float().square().sum().backward()
seen["ddp_grad"] = str(ddp.module.layers[0].attention.wq.weight.grad.dtype)
print(json.dumps(seen))
dist.destroy_process_group()
"""


def test_bf16_policies_compute_in_bf16_and_keep_fp32_weights_and_gradients():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", BF16_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "weight": "torch.bfloat16",  # gathered for compute in bf16
        "residual": "torch.bfloat16",  # the residual stream follows the weights
        "freqs": "torch.float32",  # inputs are not cast: the RoPE table stays fp32
        "param": "torch.float32",  # the sharded master weights the optimizer steps
        "grad": "torch.float32",  # reduce-scattered in fp32
        "output": "torch.bfloat16",
        # DDP: fp32 weights, gradients and all-reduce; autocast computes the matmuls in bf16, the residual
        # stream stays fp32
        "ddp_residual": "torch.float32",
        "ddp_wq_out": "torch.bfloat16",
        "ddp_grad": "torch.float32",
    }, seen
