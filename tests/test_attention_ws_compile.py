"""The warp-specialized attention tiles as a real call compiles them for Hopper (no GPU): Triton's pass must split
the forward and the default backward (dk/dv and dq kernels) into a producer and two consumer partitions with no
spill, and the backward's loops must run every product as wgmma (no mma.sync) with no spill access and no CTA-wide
barrier. A structure change that stops the split (an early return, a while loop, a pointer load of q, a two-loop
tail, a branch on text keys, a row vector loaded by pointer in dq) shows up here; the pass can abort the process,
so the compile runs in a child process.
"""

from __future__ import annotations

import importlib.util

import pytest
from support.compile_subprocess import compile_rows

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
rows = []
for head_dim, text in ((128, False), (128, True), (72, True)):
    launches = []
    with va.autotune_mode("0"), cr._captured_launches(90, launches, cr._PTXAS_LOGS):
        cr._call(cr.SHAPES[head_dim], text, False, torch.bfloat16, 90)
    for launch in launches:
        fits = launch.kernel.metadata.shared <= cr.SHARED_LIMIT  # else the launcher takes the next tile
        if launch.fn.__name__ in ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq") and fits:
            ttgir, ptx = launch.kernel.asm["ttgir"], launch.kernel.asm["ptx"]
            row = cr._row(cr.SHAPES[head_dim], text, False, launch, cr._PTXAS_LOGS)
            rows.append({"kernel": launch.fn.__name__, "head_dim": head_dim, "text": text,
                         "ws_tile": bool(launch.consts.get("WS")), "split": "ttg.warp_specialize" in ttgir,
                         "partition_warps": re.findall(r"partition\\d+\\([^\\n]*\\) num_warps\\((\\d+)\\)", ttgir),
                         "local": ptx.count("ld.local") + ptx.count("st.local"), "loops": row.loops,
                         "triton": list(tuning.TRITON_VERSION)})
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compile_rows(_CODE)


def test_forward_splits_into_producer_and_two_consumers(rows):
    forward = [r for r in rows if r["kernel"] == "_fwd_kernel"]
    assert {(r["head_dim"], r["text"]) for r in forward} == {(128, False), (128, True), (72, True)}
    for r in forward:
        assert r["ws_tile"] and r["split"], r
        assert r["partition_warps"] == ["4", "4"], r
        assert r["local"] == 0, r


def test_default_backward_splits_into_producer_and_two_consumers(rows):
    """The default backward on sm_90 (no tile forced): dk/dv and dq kernels, both split, self keys only and with
    text, GQA 4 at Dh 72 (the 64 + 16 column split); every loop that computes runs its products as wgmma."""
    backward = {(r["kernel"], r["head_dim"], r["text"]): r for r in rows if r["kernel"] != "_fwd_kernel"}
    configs = {(128, False), (128, True), (72, True)}
    assert set(backward) == {(k, *c) for k in ("_bwd_dkdv", "_bwd_dq") for c in configs}, sorted(backward)
    for r in backward.values():
        assert r["ws_tile"] and r["split"], r
        assert r["partition_warps"] == ["4", "4"], r
        assert r["local"] == 0, r
        consumers = [loop for loop in r["loops"] if loop["wgmma"] > 0]
        # One loop per consumer partition and key kind (dq: self keys, then text keys).
        assert len(consumers) == (4 if r["kernel"] == "_bwd_dq" and r["text"] else 2), r
        for loop in r["loops"]:
            assert loop["mma_sync"] == 0 and loop["spill_accesses"] == 0 and loop["cta_barriers"] == 0, r
