"""The warp-specialized attention tiles as a real call compiles them for Hopper (no GPU): Triton's pass must split
the forward (and, on Triton 3.6, the deterministic dk/dv kernel) into a producer and two consumer partitions
with no spill. A structure change that stops the split (an early return, a while loop, a pointer load of q, a
two-loop tail) shows up here; the pass can abort the process, so the compile runs in a child process."""

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

_CODE = """
import json, re
import torch
from flagdit_kernels.bench.compile import compile_report as cr
from flagdit_kernels.triton.attention import autotune as tuning
from flagdit_kernels.triton.attention import launch as va
va.FORWARD.tiles = [tuning.Tile(128, 64, 4, 2, tma=True, ws=True)]
va.DKDV.tiles = [tuning.Tile(32, 128, 4, 1, tma=True, ws=True), tuning.Tile(32, 128, 8, 2, tma=True)]
rows = []
for head_dim, text in ((128, False), (72, True)):
    launches = []
    with va.autotune_mode("0"), cr._captured_launches(90, launches, cr._PTXAS_LOGS):
        cr._call(cr.SHAPES[head_dim], text, False, torch.bfloat16, 90, deterministic=True)
    for launch in launches:
        if launch.fn.__name__ in ("_fwd_kernel", "_bwd_dkdv"):
            ttgir, ptx = launch.kernel.asm["ttgir"], launch.kernel.asm["ptx"]
            rows.append({"kernel": launch.fn.__name__, "head_dim": head_dim, "text": text,
                         "ws_tile": bool(launch.consts.get("WS")), "split": "ttg.warp_specialize" in ttgir,
                         "partition_warps": re.findall(r"partition\\d+\\([^\\n]*\\) num_warps\\((\\d+)\\)", ttgir),
                         "local": ptx.count("ld.local") + ptx.count("st.local"),
                         "triton": list(tuning.TRITON_VERSION)})
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _CODE], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_forward_splits_into_producer_and_two_consumers(rows):
    forward = [r for r in rows if r["kernel"] == "_fwd_kernel"]
    assert {(r["head_dim"], r["text"]) for r in forward} == {(128, False), (72, True)}
    for r in forward:
        assert r["ws_tile"] and r["split"], r
        assert r["partition_warps"] == ["4", "4"], r
        assert r["local"] == 0, r


def test_deterministic_dkdv_splits_where_offered(rows):
    dkdv = {(r["head_dim"], r["text"]): r for r in rows if r["kernel"] == "_bwd_dkdv"}
    offered = dkdv[(128, False)]
    assert offered["ws_tile"] == (tuple(offered["triton"]) == (3, 6)), offered  # the launcher's WS_OK rule
    if offered["ws_tile"]:
        assert offered["split"] and offered["partition_warps"] == ["4", "4"] and offered["local"] == 0, offered
    assert not dkdv[(72, True)]["ws_tile"]  # text and GQA: never offered
