"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's whole orchestration on the CPU (Triton interpreted,
small shapes, the dry-run plan), with a hung benchmark case.

Proves what a real GPU window depends on: every test and benchmark leaves a JSON line as it finishes; the
phases stay inside their budgets, which add up to at most the deadline; a case that hangs is stopped by the
per-case watchdog, only that case is lost, and its phase goes on with the next case in a new process; the merge
and ``flagdit-bench report`` read the log (also one cut off mid-line) into the report and the per-op record; at
most 8 files come back. (``--sanitize`` adds two processes, too slow for CI: tests/test_bench_sanitizer_summary.py
checks how its logs are read.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flagdit_kernels.bench.results import record, report
from flagdit_kernels.bench.results.run_log import read_jsonl, summarize

ROOT = Path(__file__).resolve().parents[1]
STALLED = "benchmarks/test_ops.py::test_op[pack[mixed-4items-0.2MiB]-fwd-python loop]"
AFTER_STALL = "benchmarks/test_ops.py::test_op[unpack[mixed-4items-0.2MiB]-fwd-cpu]"

pytestmark = [
    pytest.mark.skipif(
        shutil.which("bash") is None
        or shutil.which("timeout") is None
        or not list(ROOT.glob("flagdit_kernels/_C*.so")),
        reason="needs bash, coreutils' timeout and the built extension",
    ),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, gpu_check.sh itself is the check"),
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, FLAGDIT_RESULTS_STALL=STALLED.replace("[", "?").replace("]", "?"))
    env["PYTHON"] = sys.executable
    env.pop("FLAGDIT_KERNELS_AUTOTUNE", None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records, bad = read_jsonl(out / "results.jsonl")
    return out, proc.stdout, records, bad


def test_every_phase_ran_inside_its_budget(dry_run):
    _, _, records, bad = dry_run
    assert bad == 0
    plan = next(r for r in records if r["kind"] == "plan")
    assert plan["budget_sum_s"] <= plan["deadline_s"]
    phases = [r for r in records if r["kind"] == "phase"]
    assert {p["name"] for p in phases} == {"smoke", "warm", "attention", "bench", "tests"}
    for p in phases:
        assert p["elapsed_s"] <= p["limit_s"] + 12, p  # the limit, plus timeout's grace before a KILL
        assert p["limit_s"] <= p["budget_s"], p
    assert all(p["rc"] == 0 for p in phases if p["name"] != "bench"), phases
    build = [r for r in records if r["kind"] == "build"]
    assert len(build) == 1 and build[0]["rc"] == 0


def test_a_hung_case_loses_only_itself(dry_run):
    _, _, records, _ = dry_run
    assert [r["test"] for r in records if r["kind"] == "hung"] == [STALLED]
    interrupted = [r for r in records if r["kind"] == "interrupted"]
    assert [r["in_flight"] for r in interrupted] == [STALLED]
    bench = [p for p in records if p["kind"] == "phase" and p["name"] == "bench"]
    assert len(bench) == 2 and bench[-1]["rc"] == 0  # stopped, then resumed in a new process
    run = summarize(records)
    assert run.lost == [("bench", STALLED)]
    results = {r["test"]: r for r in records if r["kind"] == "result"}
    assert STALLED not in results
    assert results[AFTER_STALL]["outcome"] == "passed" and results[AFTER_STALL]["bench"]["median_ms"] > 0
    starts = [r["t"] for r in records if r["kind"] == "start" and r["test"] in (STALLED, AFTER_STALL)]
    assert starts == sorted(starts) and len(starts) == 2  # the next case ran after the stalled one, once


def test_tests_left_records(dry_run):
    _, _, records, _ = dry_run
    run = summarize(records)
    for phase in ("smoke", "tests"):
        assert run.outcomes[phase]["passed"] >= 1 and not run.outcomes[phase].get("failed"), phase
    smoke = [r["test"] for r in records if r["kind"] == "result" and r["phase"] == "smoke"]
    assert smoke[0].startswith("tests/test_smoke_gluon.py"), smoke[:3]  # the Gluon kernels first (skipped here)
    sessions = [r for r in records if r["kind"] == "session"]
    assert sessions and all(s["torch"] and s["interpreter"] for s in sessions)


def test_report_and_record(dry_run):
    out, stdout, _, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    text = (out / "report.md").read_text()
    assert "## Run" in text and STALLED in text
    rows = {r.key: r for r in record.parse((out / "RESULTS.md").read_text())}
    measured = rows[("pack", "mixed-4items-0.2MiB", "fwd")]
    assert measured.measured.startswith("cpu ") and "torch" in measured.run
    assert rows[("rms_norm", "32768x4096", "fwd")].measured == record.NOT_MEASURED  # kept from the repo's file
    assert "## Summary" in stdout and "## Run" in stdout  # what the device tool's output tail shows


def test_merge_reads_a_log_cut_off_mid_line(dry_run, tmp_path, capsys):
    out, _, _, _ = dry_run
    cut = tmp_path / "cut.jsonl"
    text = (out / "results.jsonl").read_text()
    cut.write_text(text + text.splitlines()[-1][:40])  # the last write broken off by a kill
    assert report.main([str(cut), "--md", str(tmp_path / "r.md"), "--png", ""]) == 0
    assert "1 unreadable line(s)" in (tmp_path / "r.md").read_text()
