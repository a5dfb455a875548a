"""The attention kernels as a real call compiles them for Hopper (Triton's NVIDIA backend and bundled ptxas; no GPU):
the compile report (flagdit_kernels.bench.compile.compile_report) at the Lumina-Next 2B shape (Dh 72, GQA 32/8) and the
Flag-DiT shape (Dh 128), packed 16624 tokens, with and without text and RoPE, default tiles.

The CPU interpreter never runs Triton's layout, pipelining or PTX passes: this is where a tile that no longer
compiles, a spill inside a hot loop, a lost vector load at Dh 72, a backward loop with a matmul too many or
a grid with idle programs shows up without a GPU. On sm_90 the default backward is the warp-specialized pair
(dk/dv, then dq; tests/test_attention_ws_compile.py checks the split itself).
"""

from __future__ import annotations

import importlib.util

import pytest
from support.compile_subprocess import compile_rows

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend",
)

ATTENTION = ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_preprocess", "_bwd_dq_postprocess")
N_SEQS = 5  # the packed benchmark batch


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    code = (
        "import json, dataclasses\n"
        "from flagdit_kernels.bench.compile.compile_report import report\n"
        "rows = report((72, 128), variants=[(False, False), (True, True)])\n"
        "print(json.dumps([dataclasses.asdict(r) for r in rows]))\n"
    )
    return compile_rows(code)


def _label(r: dict) -> str:
    return f"{r['kernel']} {r['config']} Dh{r['head_dim']} text={r['text']} rope={r['rope']}"


def test_every_kernel_of_a_real_call_compiles_and_fits(rows):
    launched = [r for r in rows if r["fits"]]
    assert {r["kernel"] for r in launched} >= set(ATTENTION), {r["kernel"] for r in launched}
    for r in launched:
        assert r["regs"] is not None and r["kernel_counts"]["instrs"] > 0, _label(r)


def test_no_default_tile_spills_inside_its_loop(rows):
    for r in rows:
        if r["fits"] and r["kernel"] in ATTENTION:
            assert r["local_in_loops"] == 0, f"local-memory accesses in a loop of {_label(r)}"


def test_dh72_keeps_vector_loads(rows):
    # A head stride of 72 is not divisible by 16: without the kernels' alignment hints every load of a Dh-72 tile
    # becomes a 2-byte access, with no cp.async and so no pipelined loop.
    for r in rows:
        if r["fits"] and r["head_dim"] == 72 and r["kernel"] in ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq"):
            assert all(loop["global_2B"] == 0 for loop in r["loops"]), f"2-byte accesses in {_label(r)}"
            # (A warp-specialized kernel loads in its producer's loop, not in the consumers' matmul loop.)
            loads = sum(loop["cp_async"] + loop["tma_loads"] + loop["global_16B"] for loop in r["loops"])
            assert loads > 0, f"no 16-byte / async loads in {_label(r)}"


def test_backward_loops_run_no_extra_matmul(rows):
    # The sm_90 default: dk/dv runs four matmuls (S^T, dV, dP^T, dK), dq three (S, dP, dQ) plus the two products
    # that bring the rows' LSE and delta in (bwd._dq_tile_ws).
    for r in rows:
        chunks = 2 if r["head_dim"] == 72 else 1  # 72 = 64 + 16: every matmul over or into the head dim is two dots
        if r["fits"] and r["kernel"] == "_bwd_dkdv":
            assert r["loop_dots"] == 4 * chunks, _label(r)
        if r["fits"] and r["kernel"] == "_bwd_dq":
            assert r["loop_dots"] == 3 * chunks + 2, _label(r)


def test_grids_launch_only_tiles_that_hold_tokens(rows):
    for r in rows:
        if r["fits"] and r["kernel"] in ("_fwd_kernel", "_bwd_dkdv"):
            heads = r["grid"][1]
            kinds = 2 if r["kernel"] == "_bwd_dkdv" and r["text"] else 1  # text key tiles and self key tiles
            assert r["programs"] - r["useful_programs"] <= N_SEQS * heads * kinds, _label(r)
