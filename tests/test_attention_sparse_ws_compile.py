"""The tile-sparse kernels' descriptor loops as a real call compiles them for Hopper (no GPU): on sm_90 the launcher
runs the tile-sparse forward, dk/dv and dq kernels on their warp-specialized tiles by default (fwd._attend_listed,
bwd._dkdv_listed, bwd._dq_listed), and Triton's pass must split each into a producer and two consumer partitions,
every product on wgmma, no CTA-wide barrier in any loop. Two WS loops in a row carrying one state make Triton 3.6's
pass abort (an MLIR dominance assertion), so a structure change shows up here; the compile runs in a child process.
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
from dataclasses import asdict
from flagdit_kernels.bench.compile import compile_report as cr
rows = cr.sparse_report((128,), 90, texts=(False,)) + cr.sparse_report((72,), 90, texts=(True,))
print(json.dumps([asdict(r) for r in rows]))
"""


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compile_rows(_CODE)


def test_sparse_kernels_split_into_producer_and_two_consumers(rows):
    """Dh 128 without text and Dh 72 with text, a window (one list for every head) and per-head lists: each
    kernel on a warp-specialized tile, split, wgmma only, no CTA barrier, no spill access in any loop (dk/dv at
    Dh 128 on its 32x128 default: the 64x128 tile spills there, benchmarks/RESULTS.md issue 27)."""
    kernels = {(r["kernel"], r["head_dim"], r["text"], r["shape"]) for r in rows}
    assert len(kernels) == 12, sorted(kernels)
    for r in rows:
        assert "TMA" in r["config"] and len(r["partitions"]) == 3, r["config"]
        assert [p["warps"] for p in r["partitions"]] == [4, 4, 4], r["partitions"]
        consumers = [loop for loop in r["loops"] if loop["wgmma"] > 0]
        assert len(consumers) >= 2, r["loops"]
        for loop in r["loops"]:
            assert loop["mma_sync"] == 0 and loop["cta_barriers"] == 0, (r["kernel"], loop)
            assert loop["spill_accesses"] == 0, (r["kernel"], loop)
