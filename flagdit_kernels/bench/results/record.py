"""The per-op record in ``benchmarks/RESULTS.md``: for each case, its floor and the prediction written before
any GPU run, and once measured, our best figure with the card, date and versions, and its ratio to every
baseline timed in the same run.

The table sits between ``<!-- record:begin -->`` and ``<!-- record:end -->``; rows are keyed by (op, shape,
dir) exactly as the benchmark cases name them. ``flagdit-bench report LOG --record benchmarks/RESULTS.md
--record-out NEW.md`` fills the measured columns of the rows the run measured, keeps every other row as it
was (an earlier figure stays until a run measures that case again), and appends measured cases the table
lacks, with the prediction their family declared (``PREDICTIONS`` in ``bench/families/``) where it did.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .rows import Results, best, by_case, fmt_ms, is_ours, peak_pct

BEGIN, END = "<!-- record:begin -->", "<!-- record:end -->"
HEADER = ("op", "shape", "dir", "floor", "prediction", "measured", "vs baselines (same run)", "run")
NOT_MEASURED = "still to be measured"


@dataclass
class RecordRow:
    op: str
    shape: str
    direction: str
    floor: str = ""
    prediction: str = ""
    measured: str = NOT_MEASURED
    baselines: str = ""
    run: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.op, self.shape, self.direction)


def _split(line: str) -> list[str]:
    """Cells of one table row; an escaped pipe (``\\|``) stays inside its cell, unescaped."""
    cells, cell = [], ""
    for ch in line.strip().removeprefix("|").removesuffix("|"):
        if ch == "|" and cell.endswith("\\"):
            cell = cell[:-1] + ch
        elif ch == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return [*cells, cell.strip()]


def parse(text: str) -> list[RecordRow]:
    """The rows of the record block (none when the text has no block)."""
    if BEGIN not in text or END not in text:
        return []
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    rows = []
    for line in block.strip().splitlines():
        cells = _split(line)
        if len(cells) < 3 or cells[0] in ("op", "") or set(cells[0]) <= {"-", ":"}:
            continue
        cells += [""] * (len(HEADER) - len(cells))
        rows.append(RecordRow(*cells[: len(HEADER)]))
    for row in rows:
        row.op, row.shape = row.op.strip("`"), row.shape.strip("`")
    return rows


def _run_text(results: Results) -> str:
    v = results.run.versions if results.run else {}
    device = v.get("device") or ", ".join(sorted(results.devices)) or "?"
    date = v.get("date") or ", ".join(sorted(results.dates)) or "?"
    return f"{device}, {date}, torch {v.get('torch', '?')} / Triton {v.get('triton', '?')} / CUDA {v.get('cuda', '?')}"


def _floor(row, results: Results) -> str:
    """The case's floor at this run's ceilings: its bytes over the copy bandwidth, or FLOPs over the matmul rate."""
    if row.gbps and results.copy_gbps:
        gbytes = row.gbps * row.ms / 1e3
        return f"{gbytes:.3g} GB: {1e6 * gbytes / results.copy_gbps:.3g} us at this copy"
    if row.tflops and results.matmul_tflops:
        tflop = row.tflops * row.ms / 1e3
        return f"{tflop:.3g} TFLOP: {1e3 * tflop / results.matmul_tflops:.3g} ms at this matmul"
    return ""


def update(rows: list[RecordRow], results: Results) -> list[RecordRow]:
    """``rows`` with the cases this run measured filled in (our best implementation against each baseline)."""
    by_key = {row.key: row for row in rows}
    out = list(rows)
    run = _run_text(results)
    for key, impls in by_case(results.rows).items():
        ours = best(impls, True)
        if ours is None:
            continue
        row = by_key.get(key)
        if row is None:
            row = RecordRow(*key, prediction=ours.prediction or "(none written)")
            by_key[key] = row
            out.append(row)
        row.floor = row.floor or _floor(ours, results)
        peak = peak_pct(ours, results)
        row.measured = f"{ours.impl} {fmt_ms(ours.ms)} ms" + (f" ({peak})" if peak else "")
        baselines = [r for r in impls if r.ms and not is_ours(r.impl) and r.impl != "reference"]
        baselines.sort(key=lambda r: r.ms)
        row.baselines = ", ".join(f"{r.ms / ours.ms:.2f}x {r.impl}" for r in baselines) or "no baseline ran"
        row.run = run
    return out


def render(rows: list[RecordRow]) -> str:
    lines = [BEGIN, "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for row in rows:
        cells = [str(getattr(row, f.name)).replace("|", "\\|") for f in fields(RecordRow)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, END])


def rewrite(text: str, rows: list[RecordRow]) -> str:
    """``text`` with its record block replaced by ``rows`` (appended at the end when it has none)."""
    if BEGIN in text and END in text:
        return text[: text.index(BEGIN)] + render(rows) + text[text.index(END) + len(END) :]
    return text.rstrip("\n") + "\n\n" + render(rows) + "\n"
