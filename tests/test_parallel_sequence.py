"""Sequence parallelism (flagdit.parallel) on the CPU with gloo: Ulysses and ring over groups of 2 and 4 equal
the single-process model, forward and every gradient (fp32 rel-L2 < 1e-5), also with block and selective
activation checkpointing (the collectives run again in the recomputation); a rank saves about its share of the
activations (the ring at sp 4: at most 0.35x of one process); flagdit.sample with the group equals one
process; bad input raises the same ValueError on every rank without a hang. The checks run in one spawned job
(tests/support/parallel_checks.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support.parallel_checks import CASES, WORLD

import flagdit
import flagdit.parallel as fp

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Every rank's record of every check (one job; a rank stuck in a collective times it out)."""
    out = tmp_path_factory.mktemp("parallel")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "support.parallel_checks", str(out)], env=env, capture_output=True,
                          text=True, timeout=420, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


MODEL_CHECKS = [f"sp{size}/{name}" for size, cases in CASES.items() for name in cases] + [
    f"sp{size}/{name}" for size in CASES for name in ("still_works_after", "sampling")
]


@pytest.mark.parametrize("name", MODEL_CHECKS)
def test_sequence_parallel_model_equals_one_process(results, name):
    for rank, record in enumerate(results):
        r = record[name]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert r["out"] < TOLERANCE, (rank, r)
        assert r["grads"] < TOLERANCE, (rank, r)
        assert r["worst_grad"] < TOLERANCE, (rank, r)


def test_the_cases_cover_what_they_claim(results):
    record = results[0]
    for size, cases in CASES.items():
        for name, (strategy, heads, kv_heads, *_) in cases.items():
            # "auto" takes Ulysses where the heads split over the group: the auto cases' 6 and 3 heads do not
            assert strategy != "auto" or heads % size or (kv_heads % size and size % kv_heads)
            assert record[f"sp{size}/{name}"]["strategy"] == strategy.replace("auto", "ring"), name
    assert all(record[f"sp{size}/sampling"]["restored"] for size in CASES)  # sample() left the model as it was
    assert record["sp2/ulysses_gqa_kv_lt_p"]["tokens"] % 2 == 1  # odd token counts: 47 over 2 ranks
    assert record["sp4/ring_gqa_kv_lt_p"]["tokens"] == 29  # with a 3-token sample: rank 3 holds only its copy


# Saved bytes per rank against one process on the same batch (issue 24's target for the ring at sp 4: 0.35).
SAVED_BYTES_RATIO = {4: 0.35, 2: 0.6}


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("size", sorted(CASES))
def test_a_rank_saves_about_its_share_of_the_activations(results, size, strategy):
    for rank, record in enumerate(results):
        r = record[f"sp{size}/{strategy}_saved_bytes"]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert r["ratio"] <= SAVED_BYTES_RATIO[size], (rank, r)


BAD_INPUTS = {
    "group_of_one": "at least 2 ranks",
    "ulysses_heads": r"n_heads \(5\) must be divisible by the sequence-parallel group size",
    "ulysses_kv_heads": r"n_kv_heads \(\d+\) and the sequence-parallel group size \(\d\) must divide one another",
    "strategy_name": "strategy must be one of",
    "sp_not_dividing_world": r"sp \(3\) must divide the world size \(4\)",
    "mesh_without_sp_dim": "needs an 'sp' dimension",
    "too_few_tokens": r"num_tokens \(1\) cannot be split over the sequence-parallel group",
    "different_batches": "were given different batches",
    "other_group_in_context": "over another group",
}


@pytest.mark.parametrize("size", sorted(CASES))
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_on_every_rank(results, size, name):
    for rank, record in enumerate(results):
        r = record[f"sp{size}/{name}"]
        assert r.get("raised"), f"rank {rank}: {r}"
        assert re.search(BAD_INPUTS[name], r["message"]), r["message"]


def test_attention_core_needs_a_sharded_layout():
    x = torch.randn(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="ShardedLayout of a sequence-parallel forward"):
        fp.sequence_parallel_attention(x, x, x, cu, 4)
    with pytest.raises(TypeError, match=r"flagdit\.FlagDiT"):
        fp.parallelize(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="not sequence-parallel"):
        fp.unparallelize(flagdit.FlagDiT("tiny"))
