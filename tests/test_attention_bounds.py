"""Unchecked offsets in the Triton attention (tests/support/attention_bounds_cases.py), run in a subprocess: a
kernel that reads or writes out of bounds can take the process down (the interpreter segfaults on it), which must
fail this test, not the whole run."""

from __future__ import annotations

import os
import subprocess
import sys


def test_unchecked_offsets_stay_in_bounds_in_a_subprocess():
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.join(here, "support", "attention_bounds_cases.py"),
    ]
    res = subprocess.run(cmd, cwd=os.path.dirname(here), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
