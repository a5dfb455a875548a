"""The rows a benchmark report is made of, and the verdicts both the report (``report.py``) and the per-op
record (``record.py``) draw from them: which implementation is ours, each case's best, the number formats.

Ours are the ``triton`` / ``cuda`` / ``cpu`` backends and labels starting with ``fk`` (whole-model cases);
``reference`` is our PyTorch spec and counts as neither ours nor a baseline; the rest are baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import run_log

OUR_BACKENDS = ("triton", "cuda", "cpu")
SPEC = ("reference",)


def is_ours(impl: str) -> bool:
    return impl in OUR_BACKENDS or impl.lower().startswith("fk")


@dataclass
class Row:
    op: str
    shape: str
    direction: str
    impl: str
    ms: float | None
    gbps: float | None = None
    tflops: float | None = None
    device: str = ""
    error: str = ""
    prediction: str = ""  # the case's, as declared before any GPU run

    @property
    def case(self) -> tuple[str, str, str]:
        return (self.op, self.shape, self.direction)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    copy_gbps: float | None = None
    matmul_tflops: float | None = None
    devices: set[str] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)
    dates: set[str] = field(default_factory=set)
    tuned_tiles: dict[str, dict[str, str]] = field(default_factory=dict)  # attention kernel -> {key: config}
    run: run_log.RunLog | None = None  # from a results log


def by_case(rows: list[Row]) -> dict[tuple[str, str, str], list[Row]]:
    cases: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        cases.setdefault(row.case, []).append(row)
    for impls in cases.values():
        impls.sort(key=lambda r: (not is_ours(r.impl), r.impl in SPEC, r.ms if r.ms else math.inf))
    return cases


def best(rows: list[Row], ours: bool) -> Row | None:
    pool = [r for r in rows if r.ms and is_ours(r.impl) == ours and r.impl not in SPEC]
    return min(pool, key=lambda r: r.ms) if pool else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def peak_pct(row: Row, results: Results) -> str:
    if row.gbps and results.copy_gbps:
        return f"{100 * row.gbps / results.copy_gbps:.0f}% copy"
    if row.tflops and results.matmul_tflops:
        return f"{100 * row.tflops / results.matmul_tflops:.0f}% matmul"
    return ""
