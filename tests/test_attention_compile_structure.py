"""The compile report's structure keys (flagdit_kernels.bench.compile.compile_report: engine, partitions, per-loop wgmma
shapes and waits, barriers, TMA, spills, EX2) read from real sm_90 compiles on the CPU: the Triton forward and
the Gluon forward (triton/attention/gluon_fwd.py, which only ever runs on a GPU, so its compile is all the evidence
there is without one), on whichever Triton is installed (3.6 and 3.9 both compile them).

The parsers are also checked on SASS lines whose meaning is known (a barrier with a thread count is a named
barrier of one partition, not a CTA-wide one).
"""

from __future__ import annotations

import pytest
from support.compile_subprocess import compile_rows, compiler_unavailable

from flagdit_kernels.bench.compile.sass import barriers, count_classes, wgmma_shapes, wgmma_waits

KEYS = ("wgmma", "wgmma_shapes", "wgmma_wait_pending", "cta_barriers", "tma_loads", "cp_async", "global_16B",
        "global_2B", "mma_sync", "spill_accesses", "ex2")  # fmt: skip


def test_sass_parsers_on_known_lines():
    instrs = list(enumerate([
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0",
        "HGMMA.64x64x16.F32.BF16 R88, R152, gdesc[UR12], R88, gsb0",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "BAR.SYNC.DEFER_BLOCKING 0x2, 0x80",
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",
        "MUFU.EX2 R3, R3",
        "LDL.64 R2, [R1+0x8]",
        "UTMALDG.2D [UR8], [UR4]",
    ]))  # fmt: skip
    assert wgmma_shapes(instrs) == {"64x128x16": 2, "64x64x16": 1}
    assert wgmma_waits(instrs) == [0, 1]
    assert barriers(instrs) == (1, 1)
    c = count_classes(instrs)
    assert (c["hgmma"], c["mma_sync"], c["ex2"], c["local"], c["tma_load"]) == (3, 1, 1, 1, 1)


needs_compiler = pytest.mark.skipif(compiler_unavailable() is not None, reason=str(compiler_unavailable()))


@needs_compiler
def test_triton_forward_structure():
    rows = compile_rows(
        "import json, dataclasses\n"
        "from flagdit_kernels.bench.compile.compile_report import report\n"
        "rows = [r for r in report((64,), variants=[(False, False)]) if r.kernel == '_fwd_kernel']\n"
        "print(json.dumps([dataclasses.asdict(r) for r in rows]))\n"
    )
    assert rows
    for r in rows:
        assert r["engine"] == "triton"
        # No warp specialization: one default partition, the launch's warps and ptxas's registers.
        assert r["partitions"] == [{"name": "default", "warps": 8, "registers": r["regs"]}]
        hot = max(r["loops"], key=lambda loop: loop["wgmma"])
        assert set(KEYS) <= set(hot)
        assert hot["wgmma"] > 0 and hot["mma_sync"] == 0
        assert sum(hot["wgmma_shapes"].values()) == hot["wgmma"]
        assert all(shape.startswith("64x") for shape in hot["wgmma_shapes"])
        assert hot["ex2"] > 0 and hot["spill_accesses"] == 0
        # Triton's forward waits each wgmma to zero and synchronizes the CTA in its loop (issue 22's baseline).
        assert hot["wgmma_wait_pending"] == 0 and hot["cta_barriers"] > 0


@needs_compiler
def test_gluon_forward_structure():
    """The Gluon forward at Dh 64 and 128, with and without text: a producer partition (1 warp, few registers)
    that issues the TMA loads, two consumer partitions (the default one and a 4-warp worker) each with its own
    key loop of wgmmas waiting with one group in flight (ptxas did not serialize them), no CTA-wide barrier and
    no spill in any loop or anywhere else (the lazy rescale's branch and the tail tile's cleaned V copy keep all
    of that). Dh 72 and 96 have no Gluon config: Gluon register tensors are powers of two, so neither can be one
    80- or 96-wide product, and they are not offered rather than padded."""
    rows = compile_rows(
        "import json, dataclasses\n"
        "from flagdit_kernels.bench.compile.compile_report import gluon_report\n"
        "rows = gluon_report((64, 72, 96, 128))\n"
        "print(json.dumps([dataclasses.asdict(r) for r in rows]))\n"
    )
    assert {(r["head_dim"], r["text"]) for r in rows} == {(64, False), (64, True), (128, False), (128, True)}
    for r in rows:
        label = f"{r['config']} Dh{r['head_dim']} text={r['text']}"
        assert r["engine"] == "gluon" and r["kernel"] == "_gluon_fwd_kernel", label
        # Consumer 0 (the default partition), consumer 1, the producer.
        assert [(p["warps"], p["registers"]) for p in r["partitions"]] == [(4, 240), (4, 240), (1, 24)], label
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["fits"], label
        consumers = [loop for loop in r["loops"] if loop["wgmma"] > 0]
        producers = [loop for loop in r["loops"] if loop["tma_loads"] > 0]
        # One key loop per consumer and key range (text keys, then self keys).
        assert len(consumers) == (4 if r["text"] else 2), label
        assert producers and all(loop["wgmma"] == 0 for loop in producers), label
        for loop in r["loops"]:
            assert loop["cta_barriers"] == 0 and loop["spill_accesses"] == 0 and loop["mma_sync"] == 0, label
        for loop in consumers:
            assert loop["ex2"] > 0 and loop["tma_loads"] == 0, label
            assert loop["wgmma_wait_pending"] == 1 and loop["wgmma_waits"] == [0, 1], label
            # The lazy rescale's warp-uniform skip survived ptxas: one warp vote per key step.
            assert loop["warp_votes"] == 1, label
        assert all(loop["warp_votes"] == 0 for loop in producers), label
        assert r["ptxas_notes"] == [] and 1 in r["ptx_wgmma_waits"], label
