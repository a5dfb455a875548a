"""Reads the results log of a GPU check (JSON lines, ``benchmarks/results_log.py`` and ``gpu_check.sh``) and
summarizes the run: versions, phases with their budgets, test outcomes, cases a kill or crash cut off,
compute-sanitizer counts, the autotuner's timings per config, and the benchmark figures.

The log may end anywhere: a run stopped mid-write leaves a partial last line, which is counted and skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """``(records, unreadable lines)``: every line that parses as a JSON object, in order."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


@dataclass
class RunLog:
    versions: dict = field(default_factory=dict)  # from the first session record on a device, else any
    phases: list[dict] = field(default_factory=list)  # gpu_check.sh's phase records, in order
    outcomes: dict[str, Counter] = field(default_factory=dict)  # phase -> outcome -> count
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (phase, test, message)
    lost: list[tuple[str, str]] = field(default_factory=list)  # (phase, test): started, never finished
    sanitizer: list[dict] = field(default_factory=list)
    autotune: dict[tuple[str, str], list[dict]] = field(default_factory=dict)  # (kernel, key) -> timings
    bench: list[dict] = field(default_factory=list)  # benchmark extra_info dicts, in order
    notes: list[str] = field(default_factory=list)  # the extension build, nvidia-smi
    bad_lines: int = 0


def summarize(records: list[dict], bad_lines: int = 0) -> RunLog:
    run = RunLog(bad_lines=bad_lines)
    open_starts: dict[tuple[str, str], int] = {}
    for r in records:
        kind, phase = r.get("kind"), str(r.get("phase", ""))
        on_device = run.versions.get("device") == "cpu" and r.get("device") != "cpu"
        if kind == "session" and (not run.versions or on_device):
            run.versions = {k: v for k, v in r.items() if k not in ("kind", "phase", "t")}
        elif kind == "phase":
            run.phases.append(r)
        elif kind == "start":
            open_starts[(phase, str(r.get("test")))] = 1
        elif kind == "result":
            test = str(r.get("test"))
            open_starts.pop((phase, test), None)
            outcome = str(r.get("outcome"))
            run.outcomes.setdefault(phase, Counter())[outcome] += 1
            if outcome == "failed":
                run.failures.append((phase, test, str(r.get("message", ""))))
            if isinstance(r.get("bench"), dict):
                run.bench.append(r["bench"])
        elif kind == "sanitizer":
            run.sanitizer.append(r)
        elif kind == "build":
            run.notes.append(f"CUDA extension build: exit {r.get('rc')} at t+{r.get('elapsed_s')} s (build.log)")
        elif kind == "nvidia-smi":
            run.notes.append(f"nvidia-smi: {r.get('line')}")
        elif kind == "autotune":
            run.autotune[(str(r.get("kernel")), str(r.get("key")))] = list(r.get("timings") or [])
    run.lost = list(open_starts)
    for phase, _ in run.lost:
        run.outcomes.setdefault(phase, Counter())["lost"] += 1
    return run


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _config_text(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def markdown(run: RunLog) -> list[str]:
    """The run section of the report: phases, outcomes, what was lost, sanitizer counts, autotune timings."""
    lines = ["## Run", ""]
    v = run.versions
    if v:
        lines.append(
            f"- {v.get('device', '?')} (capability {v.get('capability')}), {v.get('date', '?')}: Python "
            f"{v.get('python')}, torch {v.get('torch')}, Triton {v.get('triton')}, CUDA {v.get('cuda')}"
            + (", Triton interpreter" if v.get("interpreter") else "")
        )
    lines += [f"- {_cell(note)}" for note in run.notes]
    if run.bad_lines:
        lines.append(f"- {run.bad_lines} unreadable line(s) in the log (a write cut off by the end of the run)")
    if run.phases:
        lines += ["", "| phase | budget s | took s | exit | results |", "| --- | ---: | ---: | --- | --- |"]
        for name, attempts in _by_name(run.phases).items():
            counts = run.outcomes.get(name, Counter())
            results = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            notes = "; ".join(sorted({str(p["note"]) for p in attempts if p.get("note")}))
            exits = ", ".join(_exit_text(p.get("rc")) for p in attempts)
            took = sum(p.get("elapsed_s") or 0 for p in attempts)
            lines.append(
                f"| {name} | {attempts[0].get('budget_s', '')} | {took} | {exits} | {_cell(results or notes)}"
                + (f" ({_cell(notes)})" if results and notes else "")
                + " |"
            )
    if run.lost:
        lines += ["", "Cut off by a time limit, a kill or a crash (started, no result):", ""]
        lines += [f"- {phase}: `{test}`" for phase, test in run.lost]
    if run.failures:
        lines += ["", f"Failures ({len(run.failures)}):", ""]
        lines += [f"- {phase}: `{test}`: {_cell(msg)}" for phase, test, msg in run.failures[:40]]
        if len(run.failures) > 40:
            lines.append(f"- ... and {len(run.failures) - 40} more (see the results log)")
    if run.sanitizer:
        lines += ["", "| compute-sanitizer | errors | exit | note |", "| --- | ---: | ---: | --- |"]
        for s in run.sanitizer:
            note = _cell(s.get("note", ""))
            lines.append(f"| {s.get('tool')} | {s.get('errors', '?')} | {s.get('rc', '')} | {note} |")
    if run.autotune:
        lines += ["", "## Autotuner timings per config (median ms; best first)", ""]
        lines += ["| kernel | tuning key | config | ms |", "| --- | --- | --- | ---: |"]
        for (kernel, key), timings in run.autotune.items():
            ranked = sorted(timings, key=lambda t: _median(t.get("ms")))
            for t in ranked:
                ms = _median(t.get("ms"))
                shown = "failed" if ms == float("inf") else f"{ms:.4f}"
                lines.append(f"| {kernel} | `{_cell(key)}` | {_config_text(t.get('config', {}))} | {shown} |")
    return [*lines, ""]


def _by_name(phases: list[dict]) -> dict[str, list[dict]]:
    """Phase records by name (a phase resumed after a stopped case has one record per attempt)."""
    out: dict[str, list[dict]] = {}
    for p in phases:
        out.setdefault(str(p.get("name")), []).append(p)
    return out


def _exit_text(rc) -> str:
    if rc is None:
        return "not run"
    return f"{rc} (time limit)" if rc in (124, 137) else str(rc)


def _median(ms) -> float:
    value = ms[0] if isinstance(ms, list) and ms else ms
    return float(value) if isinstance(value, (int, float)) else float("inf")
