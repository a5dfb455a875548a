"""Counts what compute-sanitizer found in its log and appends one ``sanitizer`` record to the results log.

    python3 benchmarks/sanitizer_summary.py LOG --tool memcheck --rc RC --jsonl results.jsonl --phase sanitize

The count is the tool's own summary line (memcheck ``ERROR SUMMARY: N errors``, racecheck ``RACECHECK SUMMARY:
N hazards displayed (E errors, W warnings)``); the kernels are the names in the reports' ``at KERNEL+0x..``
frames. A log without a summary line (the tool did not run, or was killed) gives ``errors: null``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from results_log import append

_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACECHECK = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
# "=========     at KERNEL+0x1b30 in FILE:LINE" (memcheck) or "... Write access at KERNEL+0x2a0 in ..." (racecheck);
# CUDA C++ kernels print demangled ("void ns::kernel<T, 8>(const T *, ...)").
_FRAME = re.compile(r"(?:^=+\s+|access )at (?:0x[0-9a-f]+ in )?(.+?)(?:\+0x[0-9a-f]+| in /|$)", re.M)
_REPORT = re.compile(r"^=+ (Invalid|Uninitialized|Race|Error|Warning|Program hit|Leaked|Barrier|Potential)", re.M)


def _kernel_name(frame: str) -> str:
    name = frame.strip().removeprefix("void ")
    return name.split("(", 1)[0].strip()


def summarize(text: str, tool: str) -> dict:
    """``errors`` (None without a summary line), ``warnings`` (racecheck), ``reports`` (report headers seen),
    ``kernels`` (report frames per kernel name) and the summary line itself."""
    out: dict = {"tool": tool, "errors": None, "warnings": None, "summary": ""}
    race = _RACECHECK.search(text)
    summary = _SUMMARY.search(text)
    if race:
        out.update(errors=int(race.group(2)), warnings=int(race.group(3)), summary=race.group(0))
    elif summary:
        out.update(errors=int(summary.group(1)), summary=summary.group(0))
    out["reports"] = len(_REPORT.findall(text))
    kernels = Counter(_kernel_name(m.group(1)) for m in _FRAME.finditer(text))
    out["kernels"] = dict(kernels.most_common(20))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    parser.add_argument("--tool", required=True)
    parser.add_argument("--rc", type=int, default=None, help="the sanitized command's exit status")
    parser.add_argument("--jsonl", required=True)
    parser.add_argument("--phase", default="sanitize")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    path = Path(args.log)
    record = summarize(path.read_text(errors="replace") if path.exists() else "", args.tool)
    record.update(kind="sanitizer", phase=args.phase, rc=args.rc)
    if args.note or record["errors"] is None:
        record["note"] = args.note or "no summary line: the tool did not run to its end"
    append(args.jsonl, record)
    print(f"[sanitize] {args.tool}: {record['errors']} errors ({record['summary'] or record.get('note')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
