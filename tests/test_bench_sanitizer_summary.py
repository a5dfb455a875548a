"""benchmarks/sanitizer_summary.py reads compute-sanitizer's logs (memcheck, racecheck) into one record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sanitizer_summary

MEMCHECK = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 2 bytes
=========     at _fwd_kernel+0x1b30 in /repo/flagdit_kernels/triton/varlen_attention.py:450
=========     by thread (32,0,0) in block (1,0,0)
=========     Address 0x7f1c3e000400 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2c8b6a] in libcuda.so.1
========= Invalid __global__ write of size 16 bytes
=========     at void flagdit::rms_norm_kernel<c10::BFloat16, 8>(const T1 *, int)+0x120 in /r/rms_norm_cuda.cu:88
=========     by thread (0,0,0) in block (7,0,0)
========= ERROR SUMMARY: 2 errors
"""
RACECHECK = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at _bwd_dkdv+0x2a0 in /repo/varlen_attention.py:712
=========     and Read access at _bwd_dkdv+0x300 in /repo/varlen_attention.py:715 [16 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


def test_memcheck_counts_and_kernels():
    out = sanitizer_summary.summarize(MEMCHECK, "memcheck")
    assert out["errors"] == 2 and out["reports"] == 2
    assert out["kernels"] == {"_fwd_kernel": 1, "flagdit::rms_norm_kernel<c10::BFloat16, 8>": 1}


def test_racecheck_counts():
    out = sanitizer_summary.summarize(RACECHECK, "racecheck")
    assert (out["errors"], out["warnings"], out["reports"]) == (1, 0, 1)
    assert out["kernels"] == {"_bwd_dkdv": 2}


def test_a_log_without_summary_is_no_count(tmp_path, capsys):
    log, jsonl = tmp_path / "memcheck.log", tmp_path / "r.jsonl"
    log.write_text(MEMCHECK.rsplit("=========", 1)[0])  # the tool was killed before its summary
    assert sanitizer_summary.main([str(log), "--tool", "memcheck", "--rc", "124", "--jsonl", str(jsonl)]) == 0
    record = json.loads(jsonl.read_text())
    assert record["kind"] == "sanitizer" and record["errors"] is None and record["rc"] == 124
    assert "did not run to its end" in record["note"] and record["reports"] == 2
    sanitizer_summary.main([str(tmp_path / "missing.log"), "--tool", "racecheck", "--jsonl", str(jsonl)])
    assert len(jsonl.read_text().splitlines()) == 2
