"""The attention kernels as a real call compiles them for Hopper (Triton's NVIDIA backend and bundled ptxas; no GPU):
the compile report (flagdit_kernels.tools.compile_report) at the Lumina-Next 2B shape (Dh 72, GQA 32/8) and the
Flag-DiT shape (Dh 128), with and without text and RoPE, default tiles.

The CPU interpreter never runs Triton's layout, pipelining or PTX passes: this is where a tile that no longer
compiles, a lost vector load or a spill inside a loop shows up without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend",
)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = (
        "import json, dataclasses\n"
        "from flagdit_kernels.tools.compile_report import report\n"
        "rows = report((72, 128), variants=[(False, False), (True, True)])\n"
        "print(json.dumps([dataclasses.asdict(r) for r in rows]))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_kernel_of_a_real_call_compiles(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv"} <= kernels, kernels
    for r in rows:
        assert r["regs"] is not None and r["shared"] <= 232448, r
        assert r["kernel_counts"]["instrs"] > 0, r
