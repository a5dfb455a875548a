"""benchmarks/results_log.py, the pytest plugin behind the GPU check's results log, on a generated test file:
one record per test as it finishes, benchmark figures, the autotuner's timings from Triton's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flagdit_kernels.bench.results.run_log import read_jsonl, summarize

ROOT = Path(__file__).resolve().parents[1]

TESTS = """
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

def test_bench(benchmark):
    benchmark.extra_info.update(op="rms_norm", shape="8x8", direction="fwd", impl="triton", median_ms=0.5)
    benchmark(lambda: None)
"""

AUTOTUNE = {
    "key": [128, "torch.bfloat16"],
    "configs_timings": [
        [{"kwargs": {"BLOCK_M": 128, "BLOCK_N": 64}, "num_warps": 8, "num_stages": 3, "num_ctas": 1}, [1.5, 1.4, 1.6]],
        [
            {"kwargs": {"BLOCK_M": 64, "BLOCK_N": 64}, "num_warps": 4, "num_stages": 3, "num_ctas": 1},
            [float("inf")] * 3,
        ],
    ],
}


def test_records_per_test_and_autotune_timings(tmp_path):
    (tmp_path / "test_generated.py").write_text(TESTS)
    cache = tmp_path / "triton-cache"
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "_fwd_kernel.autotune.json").write_text(json.dumps(AUTOTUNE))
    log = tmp_path / "results.jsonl"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), PYTHONPATH=f"{ROOT / 'benchmarks'}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "pytest", "-p", "results_log", "--results-jsonl", str(log), "--results-phase", "x"]
    cmd += ["--results-fast-exit", "-q", "-p", "no:cacheprovider", "test_generated.py"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]  # one test failed: the exit status survives the fast exit
    records, bad = read_jsonl(log)
    assert bad == 0 and all(r["phase"] == "x" and r["t"] > 0 for r in records)
    assert records[0]["kind"] == "session" and records[0]["torch"] and records[0]["device"]
    results = {r["test"].split("::")[1]: r for r in records if r["kind"] == "result"}
    assert {k: r["outcome"] for k, r in results.items()} == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_skipped": "skipped",
        "test_bench": "passed",
    }
    assert "one is not two" in results["test_fails"]["message"] and results["test_skipped"]["message"].endswith(
        "not here"
    )
    assert results["test_bench"]["bench"]["median_ms"] == 0.5 and "bench" not in results["test_passes"]
    [tuned] = [r for r in records if r["kind"] == "autotune"]
    assert tuned["kernel"] == "_fwd_kernel" and "128" in tuned["key"]
    assert tuned["timings"][0] == {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
                                   "ms": [1.5, 1.4, 1.6]}  # fmt: skip
    run = summarize(records)
    assert run.lost == [] and run.outcomes["x"]["failed"] == 1 and run.autotune
