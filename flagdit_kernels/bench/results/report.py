"""``flagdit-bench report``: benchmark JSON -> a Markdown table and a PNG roofline chart.

Reads pytest-benchmark JSON files (``pytest benchmarks/ --benchmark-json=FILE``; the figures come from each
benchmark's ``extra_info``, written by ``benchmarks/test_ops.py``), the JSON of ``flagdit-bench --json``, or a
GPU check's results log (``*.jsonl``, one record per line: ``benchmarks/results_log.py``; a run cut off
anywhere still reads). Writes

- a Markdown file: a summary with one row per case (our best implementation, the best baseline, the
  speed-up ours / best baseline) and a detail table with every implementation side by side (ms, GB/s,
  TFLOP/s, share of the measured ceiling, ratio to the case's best baseline);
- a PNG chart: achieved GB/s (memory-bound cases) and TFLOP/s (compute-bound cases) of every
  implementation against the measured copy-bandwidth and matmul ceilings;
- for a results log, the run first (phases and budgets, outcomes, cases cut off, compute-sanitizer counts,
  the autotuner's timings per config), and with ``--record RESULTS.md`` the per-op record table
  (``flagdit_kernels.bench.results.record``), also written back as a whole file with ``--record-out``.

Which implementations count as ours, as the spec and as baselines: ``flagdit_kernels.bench.results.rows``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

from . import record, run_log
from .rows import SPEC, Results, Row, best, by_case, fmt, fmt_ms, is_ours, peak_pct


def _num(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


# The keys of a row's ms, GB/s and TFLOP/s: a benchmark's ``extra_info`` (``benchmarks/test_ops.py``) and a row
# of ``flagdit-bench --json``. Both name the ceilings and the device alike (``copy_GBps``, ``matmul_TFLOPs``,
# ``device``), per benchmark and per file respectively.
BENCH_FIGURES = ("median_ms", "GBps", "TFLOPs")
CLI_FIGURES = ("ms", "GB/s", "TFLOP/s")


def _add_row(r: dict, figures: tuple[str, str, str], device: str, results: Results, fallback_ms=None) -> None:
    ms, gbps, tflops = figures
    results.rows.append(
        Row(
            r["op"],
            str(r.get("shape", "")),
            r.get("direction", ""),
            r["impl"],
            _num(r.get(ms)) or fallback_ms,
            _num(r.get(gbps)),
            _num(r.get(tflops)),
            device,
            r.get("error", ""),
            r.get("prediction") or "",
        )
    )


def _add_ceilings(source: dict, results: Results) -> None:
    """The measured ceilings and the device of one benchmark or one flagdit-bench file (the first seen stay)."""
    results.copy_gbps = results.copy_gbps or _num(source.get("copy_GBps"))
    results.matmul_tflops = results.matmul_tflops or _num(source.get("matmul_TFLOPs"))
    if source.get("device"):
        results.devices.add(str(source["device"]))


def _add_bench(info: dict, results: Results, fallback_ms: float | None = None) -> None:
    """One benchmark's ``extra_info`` (as ``benchmarks/test_ops.py`` writes it) as a row."""
    if "op" not in info or "impl" not in info:
        return  # not one of ours (or run with --benchmark-disable)
    _add_row(info, BENCH_FIGURES, str(info.get("device", "")), results, fallback_ms)
    _add_ceilings(info, results)
    for kernel, tiles in (info.get("tuned_tiles") or {}).items():
        results.tuned_tiles.setdefault(kernel, {}).update(tiles)


def _from_pytest_benchmark(data: dict, results: Results) -> None:
    for bench in data.get("benchmarks", []):
        median = _num((bench.get("stats") or {}).get("median"))
        _add_bench(bench.get("extra_info") or {}, results, median * 1e3 if median else None)
    if data.get("datetime"):
        results.dates.add(str(data["datetime"])[:10])


def _from_results_log(path: str | Path, results: Results) -> None:
    run = run_log.summarize(*run_log.read_jsonl(path))
    for info in run.bench:
        _add_bench(info, results)
    if run.versions.get("date"):
        results.dates.add(str(run.versions["date"]))
    results.run = run


def _from_cli(data: dict, results: Results) -> None:
    for r in data.get("rows", []):
        _add_row(r, CLI_FIGURES, str(data.get("device", "")), results)
    _add_ceilings(data, results)


def load(paths: Iterable[str | Path]) -> Results:
    """Rows of every file; a later file's row replaces an earlier one for the same case and impl."""
    results = Results()
    for path in paths:
        if str(path).endswith(".jsonl"):
            _from_results_log(path, results)
            results.sources.append(str(path))
            continue
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
        if not isinstance(data, dict) or not ("benchmarks" in data or "rows" in data):
            raise ValueError(f"{path}: neither pytest-benchmark JSON ('benchmarks') nor flagdit-bench JSON ('rows')")
        try:
            (_from_pytest_benchmark if "benchmarks" in data else _from_cli)(data, results)
        except (TypeError, AttributeError, KeyError) as exc:  # the right keys holding the wrong shapes of data
            what = "pytest-benchmark" if "benchmarks" in data else "flagdit-bench"
            raise ValueError(f"{path}: malformed {what} JSON ({type(exc).__name__}: {exc})") from None
        results.sources.append(str(path))
    latest: dict[tuple, Row] = {}
    for row in results.rows:
        latest[(*row.case, row.impl)] = row
    results.rows = list(latest.values())
    return results


def markdown(results: Results, record_text: str | None = None) -> str:
    """The report; ``record_text`` (a RESULTS.md) adds the per-op record with this run's figures filled in."""
    cases = by_case(results.rows)
    lines = ["# flagdit-kernels benchmark report", ""]
    device = ", ".join(sorted(results.devices)) or "unknown device"
    lines.append(f"- device: {device}" + (f"; run date {', '.join(sorted(results.dates))}" if results.dates else ""))
    if results.copy_gbps or results.matmul_tflops:
        lines.append(
            f"- measured ceilings: copy {fmt(results.copy_gbps)} GB/s, matmul {fmt(results.matmul_tflops, 2)} "
            "TFLOP/s (same run)"
        )
    lines.append(f"- sources: {', '.join(f'`{s}`' for s in results.sources)}")
    lines.append(
        "- speed-up = best baseline ms / our ms (> 1: ours is faster); ours = triton / cuda / cpu backends "
        "and `fk ...` labels; `reference` is our PyTorch spec, listed but not a baseline."
    )
    if results.run is not None:
        lines += ["", *run_log.markdown(results.run)]
    if record_text is not None:
        lines += ["", "## Per-op record (benchmarks/RESULTS.md format)", ""]
        lines.append(record.render(record.update(record.parse(record_text), results)))
    lines += ["", "## Summary", "", "| op | shape | dir | ours | ms | best baseline | ms | speed-up |"]
    lines.append("| --- | --- | --- | --- | ---: | --- | ---: | ---: |")
    for (op, shape, direction), rows in cases.items():
        ours, base = best(rows, True), best(rows, False)
        speedup = f"**{base.ms / ours.ms:.2f}x**" if ours and base else ""
        lines.append(
            f"| {op} | {shape} | {direction} | {ours.impl if ours else '-'} | {fmt_ms(ours.ms) if ours else ''} | "
            f"{base.impl if base else '-'} | {fmt_ms(base.ms) if base else ''} | {speedup} |"
        )
    lines += ["", "## Every implementation", "", "| op | shape | dir | impl | ms | GB/s | TFLOP/s | of ceiling |"]
    lines[-1] += " vs best baseline |"
    lines.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (op, shape, direction), rows in cases.items():
        base = best(rows, False)
        for row in rows:
            name = f"**{row.impl}**" if is_ours(row.impl) else row.impl
            if row.error or not row.ms:
                lines.append(f"| {op} | {shape} | {direction} | {name} | {row.error or 'no timing'} | | | | |")
                continue
            ratio = f"{base.ms / row.ms:.2f}x" if base else ""
            lines.append(
                f"| {op} | {shape} | {direction} | {name} | {fmt_ms(row.ms)} | {fmt(row.gbps)} | "
                f"{fmt(row.tflops, 2)} | {peak_pct(row, results)} | {ratio} |"
            )
    if results.tuned_tiles:
        lines += ["", "## Tiles the autotuner chose (attention)", "", "| kernel | tuning key | config |"]
        lines.append("| --- | --- | --- |")
        for kernel, tiles in results.tuned_tiles.items():
            lines += [f"| {kernel} | `{key}` | `{config}` |" for key, config in sorted(tiles.items())]
    return "\n".join(lines) + "\n"


# Colours: ours in strong blues/greens, the spec in grey, baselines in warm tones.
_OURS_COLOURS = ("#1f4e9c", "#2a9d8f", "#6a4c93")
_BASE_COLOURS = ("#e76f51", "#f4a261", "#e9c46a", "#b5838d", "#8d6e63", "#d62828")
_SPEC_COLOUR = "#9e9e9e"


def _impl_colours(impls: list[str]) -> dict[str, str]:
    colours, n_ours, n_base = {}, 0, 0
    for impl in impls:
        if impl in SPEC:
            colours[impl] = _SPEC_COLOUR
        elif is_ours(impl):
            colours[impl] = _OURS_COLOURS[n_ours % len(_OURS_COLOURS)]
            n_ours += 1
        else:
            colours[impl] = _BASE_COLOURS[n_base % len(_BASE_COLOURS)]
            n_base += 1
    return colours


def plot(results: Results, path: str | Path) -> None:
    """Horizontal grouped bars: achieved GB/s (left) and TFLOP/s (right) per case, ceilings as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = by_case(results.rows)
    panels = [
        ("memory-bound: achieved GB/s", "gbps", results.copy_gbps, "copy"),
        ("compute-bound: achieved TFLOP/s", "tflops", results.matmul_tflops, "matmul"),
    ]
    panels = [p for p in panels if any(getattr(r, p[1]) for r in results.rows)]
    if not panels:
        raise ValueError("no row has GB/s or TFLOP/s figures to plot")
    impl_order = sorted(
        {r.impl for r in results.rows}, key=lambda i: (not is_ours(i), i in SPEC, i)
    )  # ours first, then baselines
    colours = _impl_colours(impl_order)
    heights = []
    for _, attr, _, _ in panels:
        n_bars = sum(len([r for r in rows if getattr(r, attr)]) for rows in cases.values())
        heights.append(max(2.5, 0.32 * n_bars + 0.5 * len(cases)))
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, sum(heights) + 1.5), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (title, attr, ceiling, ceiling_name) in zip(axes[:, 0], panels):
        labels, ticks, y = [], [], 0.0
        for (op, shape, direction), rows in cases.items():
            bars = [r for r in rows if getattr(r, attr)]
            if not bars:
                continue
            start = y
            for row in bars:
                value = getattr(row, attr)
                ax.barh(y, value, height=0.8, color=colours[row.impl], edgecolor="black" if is_ours(row.impl) else None)
                text = f" {row.impl}: {value:,.0f}" if value >= 10 else f" {row.impl}: {value:,.2f}"
                ax.text(value, y, text, va="center", fontsize=7.5)
                y += 1
            ticks.append((start + y - 1) / 2)
            labels.append(f"{op}\n{shape} {direction}")
            ax.axhline(y - 0.5 + 0.25, color="#dddddd", linewidth=0.8)
            y += 0.5
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.invert_yaxis()
        top = max(getattr(r, attr) or 0 for r in results.rows)
        if ceiling:
            ax.axvline(ceiling, color="black", linestyle="--", linewidth=1.2)
            ax.text(ceiling, -0.9, f"measured {ceiling_name} ceiling {ceiling:,.0f}", ha="right", fontsize=8)
            top = max(top, ceiling)
        ax.set_xlim(0, top * 1.3)
        ax.set_xlabel("GB/s (minimum DRAM bytes / time)" if attr == "gbps" else "TFLOP/s (useful FLOPs / time)")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in impl_order]
    fig.legend(handles, impl_order, loc="lower center", ncol=min(6, len(impl_order)), fontsize=8, frameon=False)
    device = ", ".join(sorted(results.devices)) or "unknown device"
    fig.suptitle(f"flagdit-kernels vs baselines on {device} (ours outlined)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagdit-bench report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files or flagdit-bench --json files")
    parser.add_argument("--md", default="benchmark_report.md", help="Markdown output ('-' for stdout)")
    parser.add_argument("--png", default="benchmark_roofline.png", help="PNG output ('' to skip the plot)")
    parser.add_argument("--record", default=None, help="a RESULTS.md whose per-op record the report fills in")
    parser.add_argument("--record-out", default=None, help="write that RESULTS.md, updated, to this path")
    args = parser.parse_args(argv)
    try:
        results = load(args.json)
        record_text = Path(args.record).read_text() if args.record else None
    except (OSError, ValueError, KeyError) as exc:
        print(f"flagdit-bench report: {exc}", file=sys.stderr)
        return 2
    if args.record_out and record_text is not None:
        rows = record.update(record.parse(record_text), results)
        Path(args.record_out).write_text(record.rewrite(record_text, rows))
        print(f"wrote {args.record_out}")
    if not results.rows and results.run is None:
        print("flagdit-bench report: no benchmark rows with flagdit extra_info found", file=sys.stderr)
        return 1
    text = markdown(results, record_text)
    if args.md == "-":
        sys.stdout.write(text)
    else:
        Path(args.md).write_text(text)
        print(f"wrote {args.md}")
    if args.png and results.rows:
        plot(results, args.png)
        print(f"wrote {args.png}")
    return 0 if results.rows else 1
