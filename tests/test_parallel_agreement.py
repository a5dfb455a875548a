"""Ranks of a sequence-parallel group that disagree about the model (head counts, width, dtype, strategy) get one
ValueError each, the same on every rank, within seconds (issue 25 item 8): the disagreement travels in the
per-forward all-gather of token counts, before any exchange of a rank-dependent shape could abort gloo or
hang. One spawned gloo job of 2 processes (``python tests/test_parallel_agreement.py OUT_DIR``), bounded by a
short process-group timeout and the subprocess timeout."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# case -> (rank 0's model, rank 1's model): (n_heads, dim, dtype, strategy)
CASES = {
    "heads": ((4, 64, "float32", "ulysses"), (2, 64, "float32", "ulysses")),
    "width": ((4, 64, "float32", "ring"), (4, 128, "float32", "ring")),
    "dtype": ((4, 64, "float32", "ulysses"), (4, 64, "float64", "ulysses")),
    "strategy": ((4, 64, "float32", "ulysses"), (4, 64, "float32", "ring")),
    "agreeing": ((4, 64, "float32", "ring"), (4, 64, "float32", "ring")),
}
EXPECTED = {
    "heads": "n_heads 4, n_kv_heads 4, head_dim 16",
    "width": "head_dim 16, dim 64",
    "dtype": "rank 0: dtype float32; rank 1: dtype float64",
    "strategy": "rank 0: strategy contiguous; rank 1: strategy chunked",
}

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _forward(heads: int, dim: int, dtype: str, strategy: str, group) -> None:
    import flagdit
    import flagdit.parallel as fp
    from flagdit.configs import get_config

    torch.manual_seed(0)
    config = get_config("tiny", dim=dim, n_heads=heads, n_layers=1, cap_feat_dim=24)
    model = flagdit.FlagDiT(config).to(getattr(torch, dtype))
    fp.parallelize(model, group, strategy)
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(3, 4, 6, generator=g, dtype=getattr(torch, dtype))]
    cap = torch.randn(1, 2, 24, generator=g, dtype=getattr(torch, dtype))
    model(x, torch.rand(1, generator=g, dtype=getattr(torch, dtype)), cap, torch.ones(1, 2, dtype=torch.int32))


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    results = {}
    try:
        for name, models in CASES.items():
            start = time.monotonic()
            try:
                _forward(*models[rank], dist.group.WORLD)
                results[name] = {"raised": False}
            except ValueError as e:
                results[name] = {"raised": True, "message": str(e)}
            results[name]["seconds"] = time.monotonic() - start
            dist.barrier()  # every rank left the case: none is stuck in a collective
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("agreement")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=180, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_ranks_that_disagree_about_the_model_raise_the_same_error_within_seconds(results, case):
    messages = {record[case].get("message") for record in results}
    assert all(record[case]["raised"] for record in results), results
    assert len(messages) == 1, messages  # the same words on every rank
    [message] = messages
    assert "disagree about the model" in message and EXPECTED[case] in message, message
    assert all(record[case]["seconds"] < 20 for record in results), results


def test_ranks_that_agree_run(results):
    assert all(not record["agreeing"]["raised"] for record in results), results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(_worker, args=(free, sys.argv[1]), nprocs=WORLD)
