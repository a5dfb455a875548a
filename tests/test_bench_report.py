"""flagdit-bench report on synthetic pytest-benchmark JSON shaped like benchmarks/test_ops.py's extra_info."""

from __future__ import annotations

import json

import pytest

from flagdit_kernels.bench.results import report

COPY, MATMUL = 4257.0, 796.0


def _bench(op, shape, direction, impl, ms, gbytes=0.0, tflop=0.0):
    gbps = gbytes / ms * 1e3 if gbytes else None
    tflops = tflop / ms * 1e3 if tflop else None
    return {
        "group": f"{op}[{shape}]-{direction}",
        "name": f"test_op[{op}[{shape}]-{direction}-{impl}]",
        "stats": {"median": ms * 1.1e-3, "mean": ms * 1.2e-3},  # wall clock: extra_info's median wins
        "extra_info": {
            "op": op,
            "shape": shape,
            "direction": direction,
            "impl": impl,
            "median_ms": ms,
            "GBps": gbps,
            "TFLOPs": tflops,
            "pct_of_copy": 100 * gbps / COPY if gbps else None,
            "pct_of_matmul": 100 * tflops / MATMUL if tflops else None,
            "copy_GBps": COPY,
            "matmul_TFLOPs": MATMUL,
            "device": "NVIDIA H200",
        },
    }


def synthetic() -> dict:
    norm_gb = 2 * 32768 * 4096 * 2 / 1e9
    attn_tf = 4 * 2 * 32 * 4096 * 4096 * 128 / 1e12
    rows = [
        _bench("rms_norm", "32768x4096", "fwd", "triton", norm_gb / 3800 * 1e3, gbytes=norm_gb),
        _bench("rms_norm", "32768x4096", "fwd", "cuda", norm_gb / 3900 * 1e3, gbytes=norm_gb),
        _bench("rms_norm", "32768x4096", "fwd", "reference", norm_gb / 300 * 1e3, gbytes=norm_gb),
        _bench("rms_norm", "32768x4096", "fwd", "lumina eager", norm_gb / 319 * 1e3, gbytes=norm_gb),
        _bench("rms_norm", "32768x4096", "fwd", "torch.compile", norm_gb / 2081 * 1e3, gbytes=norm_gb),
        _bench("rms_norm", "32768x4096", "fwd", "F.rms_norm", norm_gb / 3416 * 1e3, gbytes=norm_gb),
        _bench("varlen_attention", "B2 H32 L4096 D128", "fwd", "triton", attn_tf / 420 * 1e3, tflop=attn_tf),
        _bench("varlen_attention", "B2 H32 L4096 D128", "fwd", "SDPA flash", attn_tf / 355 * 1e3, tflop=attn_tf),
        _bench("varlen_attention", "B2 H32 L4096 D128", "fwd", "SDPA cuDNN", attn_tf / 305 * 1e3, tflop=attn_tf),
        _bench("diffusers_lumina_next", "2B 1024px B2", "fwd", "fk patched", 80.0, tflop=29.3),
        _bench("diffusers_lumina_next", "2B 1024px B2", "fwd", "diffusers eager", 140.0, tflop=29.3),
        _bench("diffusers_lumina_next", "2B 1024px B2", "fwd", "torch.compile", 120.0, tflop=29.3),
    ]
    # The attention rows carry the autotuner's choices so far (cumulative): the report lists the union.
    rows[6]["extra_info"]["tuned_tiles"] = {"forward": {"(128, False)": "BLOCK_M: 128, BLOCK_N: 64"}}
    rows[7]["extra_info"]["tuned_tiles"] = {"forward": {"(72, True)": "BLOCK_M: 128, BLOCK_N: 128, TMA: True"}}
    unrelated = {"group": None, "name": "test_other", "stats": {"median": 1.0}, "extra_info": {}}
    return {"machine_info": {}, "datetime": "2026-11-26T03:00:00", "benchmarks": [*rows, unrelated]}


def test_markdown_and_png(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(synthetic()))
    md, png = tmp_path / "report.md", tmp_path / "roofline.png"
    assert report.main([str(src), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert "NVIDIA H200" in text and "copy 4,257.0 GB/s" in text and "matmul 796.00 TFLOP/s" in text
    lines = text.splitlines()
    summary = next(line for line in lines if line.startswith("| rms_norm | 32768x4096 | fwd | cuda"))
    # best ours (cuda, 3900 GB/s) against the best baseline (F.rms_norm, 3416 GB/s); reference is no baseline
    assert "F.rms_norm" in summary and f"**{3900 / 3416:.2f}x**" in summary
    attn = next(line for line in lines if line.startswith("| varlen_attention |") and "SDPA flash" in line)
    assert f"**{420 / 355:.2f}x**" in attn
    model = next(line for line in lines if line.startswith("| diffusers_lumina_next |") and "**" in line)
    assert "fk patched" in model and "torch.compile" in model and "**1.50x**" in model
    detail = next(line for line in lines if "| **triton** |" in line and "rms_norm" in line)
    assert "89% copy" in detail and "3,800.0" in detail
    ref_row = next(line for line in lines if "| reference |" in line)
    assert f"{300 / 3416:.2f}x" in ref_row
    assert "test_other" not in text
    tiles = text[text.index("## Tiles the autotuner chose") :]
    assert "| forward | `(128, False)` | `BLOCK_M: 128, BLOCK_N: 64` |" in tiles and "TMA: True" in tiles
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "wrote" in capsys.readouterr().out


def test_cli_json_and_stdout(tmp_path, capsys):
    data = {
        "device": "cpu",
        "copy_GBps": 10.0,
        "matmul_TFLOPs": 0.1,
        "rows": [
            {"op": "pack", "shape": "8 latents", "direction": "fwd", "impl": "cpu", "ms": 0.5, "GB/s": 4.0},
            {"op": "pack", "shape": "8 latents", "direction": "fwd", "impl": "python loop", "ms": 2.0, "GB/s": 1.0},
            {"op": "pack", "shape": "8 latents", "direction": "fwd", "impl": "triton", "error": "RuntimeError: x"},
        ],
    }
    src = tmp_path / "cli.json"
    src.write_text(json.dumps(data))
    assert report.main([str(src), "--md", "-", "--png", ""]) == 0
    out = capsys.readouterr().out
    assert "**4.00x**" in out and "40% copy" in out and "RuntimeError: x" in out


def test_later_file_wins_and_bad_input(tmp_path, capsys):
    first, second = synthetic(), synthetic()
    second["benchmarks"][0]["extra_info"]["median_ms"] = 1.0
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(data))
    results = report.load(paths)
    triton = [r for r in results.rows if r.op == "rms_norm" and r.impl == "triton"]
    assert len(triton) == 1 and triton[0].ms == 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": []}))
    assert report.main([str(bad), "--md", "-"]) == 2
    assert "neither pytest-benchmark JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(empty), "--md", "-"]) == 1
    with pytest.raises(ValueError, match="no row has GB/s or TFLOP/s"):
        report.plot(report.Results(rows=[report.Row("op", "s", "fwd", "x", 1.0)]), tmp_path / "x.png")


def _log_lines() -> list[dict]:
    """A results log as benchmarks/results_log.py and gpu_check.sh write it: two phases, a case cut off."""
    norm = synthetic()["benchmarks"]
    lines = [
        {"kind": "plan", "deadline_s": 420, "budget_sum_s": 415, "phases": []},
        {
            "kind": "session",
            "phase": "attention",
            "device": "NVIDIA H200",
            "date": "2026-12-02",
            "torch": "2.11.0",
            "triton": "3.6.0",
            "cuda": "13.0",
            "python": "3.12.3",
            "capability": [9, 0],
        },
    ]
    for i, bench in enumerate(norm[:6]):
        test = f"benchmarks/test_ops.py::test_op[{i}]"
        lines.append({"kind": "start", "phase": "bench", "test": test})
        lines.append(
            {"kind": "result", "phase": "bench", "test": test, "outcome": "passed", "bench": bench["extra_info"]}
        )
    lines.append({"kind": "start", "phase": "bench", "test": "benchmarks/test_ops.py::test_op[hung]"})
    lines.append({"kind": "phase", "name": "bench", "budget_s": 135, "limit_s": 135, "elapsed_s": 40, "rc": 2})
    lines.append({"kind": "result", "phase": "tests", "test": "tests/t.py::x", "outcome": "failed", "message": "boom"})
    lines.append({"kind": "phase", "name": "tests", "budget_s": 90, "limit_s": 90, "elapsed_s": 90, "rc": 124})
    timings = [{"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}, "ms": [1.5, 1.4, 1.6]},
               {"config": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}, "ms": [1.2, 1.1, 1.3]}]  # fmt: skip
    lines.append(
        {"kind": "autotune", "phase": "attention", "kernel": "_fwd_kernel", "key": "(128,)", "timings": timings}
    )
    lines.append({"kind": "sanitizer", "phase": "sanitize", "tool": "memcheck", "errors": 0, "rc": 0})
    return lines


def test_results_log_cut_off_mid_line(tmp_path):
    log = tmp_path / "results.jsonl"
    text = "".join(json.dumps(line) + "\n" for line in _log_lines())
    log.write_text(text + '{"kind": "result", "phase": "bench", "te')  # a write the end of the run broke off
    md = tmp_path / "report.md"
    assert report.main([str(log), "--md", str(md), "--png", ""]) == 0
    out = md.read_text()
    assert "NVIDIA H200 (capability [9, 0]), 2026-12-02" in out and "1 unreadable line(s)" in out
    assert "| bench | 135 | 40 | 2 | 1 lost, 6 passed |" in out
    assert "| tests | 90 | 90 | 124 (time limit) | 1 failed |" in out
    assert "`benchmarks/test_ops.py::test_op[hung]`" in out and "`tests/t.py::x`: boom" in out
    fwd = out.index("BLOCK_M=128, BLOCK_N=128, num_warps=8 | 1.2000")
    assert fwd < out.index("BLOCK_M=128, BLOCK_N=64, num_warps=8 | 1.5000")  # best config first
    assert "| memcheck | 0 | 0 |" in out
    assert f"**{3900 / 3416:.2f}x**" in out  # the figures, as from pytest-benchmark JSON


def test_record_fills_measured_rows_and_keeps_the_rest(tmp_path):
    from flagdit_kernels.bench.results import record

    before = "\n".join(
        [
            "# Results",
            "",
            record.render(
                [
                    record.RecordRow("rms_norm", "32768x4096", "fwd", "537 MB: 126 us", "near copy | speed"),
                    record.RecordRow(
                        "apply_rope", "B4", "fwd", "539 MB", "70% of copy", "triton 0.2 ms", "1.1x x", "old"
                    ),
                ]
            ),
            "",
            "tail text",
        ]
    )
    rows = record.parse(before)
    assert rows[0].prediction == "near copy | speed" and rows[1].measured == "triton 0.2 ms"
    results = report.load([_write(tmp_path, synthetic())])
    after = record.rewrite(before, record.update(rows, results))
    updated = {r.key: r for r in record.parse(after)}
    norm = updated[("rms_norm", "32768x4096", "fwd")]
    assert norm.measured.startswith("cuda ") and "92% copy" in norm.measured
    assert norm.baselines.startswith(f"{3900 / 3416:.2f}x F.rms_norm") and "lumina eager" in norm.baselines
    assert "reference" not in norm.baselines and norm.prediction == "near copy | speed"
    assert "NVIDIA H200" in norm.run and norm.floor == "537 MB: 126 us"
    assert updated[("apply_rope", "B4", "fwd")].run == "old"  # not measured this time: kept
    attention = updated[("varlen_attention", "B2 H32 L4096 D128", "fwd")]  # measured, not in the table: added
    assert attention.prediction == "(none written)" and "TFLOP" in attention.floor
    assert after.startswith("# Results") and after.rstrip().endswith("tail text")


def test_a_new_row_takes_the_prediction_its_case_declared(tmp_path):
    """A case the record lacks joins it with the prediction its family declared (carried in the run's rows)."""
    from flagdit_kernels.bench.results import record

    data = synthetic()
    for bench in data["benchmarks"]:
        if bench["extra_info"].get("op") == "varlen_attention":
            bench["extra_info"]["prediction"] = "predicted 1.2x SDPA flash"
    rows = record.update([], report.load([_write(tmp_path, data)]))
    by_key = {r.key: r for r in rows}
    assert by_key[("varlen_attention", "B2 H32 L4096 D128", "fwd")].prediction == "predicted 1.2x SDPA flash"
    assert by_key[("rms_norm", "32768x4096", "fwd")].prediction == "(none written)"


def _write(tmp_path, data) -> str:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return str(path)
