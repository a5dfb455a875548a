"""flagdit-bench: every op on every available backend and the baselines, one table.

On a GPU it runs DiT-sized shapes and reports % of the measured copy bandwidth / bf16 matmul rate; on a
CPU-only machine it runs small shapes (about a minute) so the numbers are real but only CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from types import ModuleType

import torch

from .cases import Case, all_cases, family_names
from .timing import copy_bandwidth_gbs, matmul_tflops, throughput, time_samples

# flagdit-bench (also ``python -m flagdit_kernels.bench``) is the one entry point of every measurement tool: alone
# it times the table of this module; ``flagdit-bench SUBCOMMAND`` runs one of these. A tool's module is imported
# only when it is named, so the table loads neither matplotlib nor the compile tools.
SUBCOMMANDS = {
    "report": "benchmark JSON or a GPU check's results log -> a Markdown report and a PNG roofline chart",
    "warm": "fills the compile caches before a timed run, in parallel processes (nothing is timed)",
    "compile-report": "what the attention kernels compile to for sm_90, without a GPU",
    "bandwidth-report": "what the norm, RoPE, packing and embedding kernels compile to for sm_90, without a GPU",
}
OURS = ("triton", "cuda", "cpu")
NOISY = 0.2  # ceilings measured at the start and the end that differ by more than this: the machine is busy
COLUMNS = (
    ("op", 24, "<"), ("shape", 34, "<"), ("dir", 8, "<"), ("impl", 16, "<"), ("ms", 9, ">"),
    ("min-max ms", 17, ">"), ("GB/s", 8, ">"), ("TFLOP/s", 8, ">"), ("% peak", 7, ">"),
)  # fmt: skip
PEAK_LEGEND = (
    "ms: median of the timed calls; min-max: their range. % peak: GB/s as a share of the measured copy bandwidth\n"
    "(memory-bound rows) or TFLOP/s as a share of the measured matmul rate (compute-bound rows); - : not meaningful."
)


def measure(case: Case, device: torch.device, rep_ms: float) -> list[dict]:
    rows = []
    for label, build in case.impls.items():
        row = {"op": case.op, "shape": case.shape, "direction": case.direction, "impl": label}
        if case.prediction:
            row["prediction"] = case.prediction
        try:
            fn = build()
            samples = time_samples(fn, device, rep_ms=rep_ms)
            row.update(throughput(case.bytes, case.flops, statistics.median(samples)))
            row.update(ms_min=min(samples), ms_max=max(samples))
        except Exception as exc:  # one broken baseline (e.g. no cuDNN) must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        rows.append(row)
    return rows


def peak_share(row: dict, copy_gbs: float, mm_tflops: float) -> float | None:
    """% of the measured copy bandwidth (rows with GB/s) or matmul rate (rows with TFLOP/s only)."""
    if row.get("GB/s"):
        return 100 * row["GB/s"] / copy_gbs
    if row.get("TFLOP/s"):
        return 100 * row["TFLOP/s"] / mm_tflops
    return None


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_header() -> str:
    header = " ".join(f"{name:{align}{width}}" for name, width, align in COLUMNS)
    return f"{header}\n{'-' * len(header)}"


def format_row(row: dict, copy_gbs: float, mm_tflops: float) -> str:
    key = [row["op"], row["shape"], row["direction"], row["impl"]]
    if "error" in row:
        return " ".join(f"{v:<{w}}" for v, (_, w, _) in zip(key, COLUMNS)) + f" {row['error']}"
    spread = f"{_cell(row['ms_min'], 3)}-{_cell(row['ms_max'], 3)}" if "ms_min" in row else "-"
    cells = [*key, _cell(row["ms"], 3), spread, _cell(row.get("GB/s"), 1), _cell(row.get("TFLOP/s"), 2)]
    cells.append(_cell(peak_share(row, copy_gbs, mm_tflops), 1))
    return " ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(cells, COLUMNS))


def noise_warnings(rows: list[dict], ceilings: dict[str, tuple[float, float]], copy_gbs, mm_tflops) -> list[str]:
    """Why the figures may not be trustworthy: ceilings that moved during the run, shares above 100%."""
    out = []
    for name, (first, last) in ceilings.items():
        if abs(last - first) > NOISY * max(first, last):
            out.append(
                f"warning: the {name} ceiling measured {first:.1f} at the start and {last:.1f} at the end "
                f"(> {NOISY:.0%} apart): the machine is too busy for these figures to be trusted"
            )
    over = [r for r in rows if (peak_share(r, copy_gbs, mm_tflops) or 0) > 100]
    if over:
        names = ", ".join(sorted({f"{r['op']} {r['impl']}" for r in over}))
        out.append(
            f"warning: {len(over)} row(s) above 100% of a measured ceiling ({names}): a noisy ceiling, or data "
            "that stays in cache (the floor counts DRAM bytes)"
        )
    return out


def cpu_note() -> str:
    """What a run on the CPU can and cannot show."""
    return (
        "CPU run: rows are our compiled C++ ops (cpu) and PyTorch reference against the eager / torch.compile "
        "baselines; the triton and cuda kernels need a GPU (interpreted Triton would time the interpreter)."
    )


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr (exit status 2); the usage is what --help is for."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds > 0, got {text!r}")
    return value


def device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot be benchmarked here, or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        return f"--device {name!r} is not a torch device ({str(exc).splitlines()[0]}); use cpu or cuda[:N]"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
    elif device.type != "cpu":
        return f"--device {name}: flagdit-bench times cpu and cuda devices, not {device.type}"
    return None


def json_path_problem(path: str) -> str | None:
    """Why the --json file cannot be written, checked before the run (whose results it would otherwise lose)."""
    target = Path(path)
    if target.is_dir():
        return f"--json {path} is a directory; give a file name"
    if not target.parent.is_dir():
        return f"--json {path}: the folder {target.parent} does not exist"
    if not os.access(target.parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"--json {path} is not writable"
    return None


def subcommand(name: str) -> ModuleType:
    """The module of a subcommand of :data:`SUBCOMMANDS`, whose ``main(argv)`` runs it."""
    if name == "report":
        from .results import report as tool
    elif name == "warm":
        from . import warm as tool
    elif name == "compile-report":
        from .compile import compile_report as tool
    elif name == "bandwidth-report":
        from .compile import bandwidth_report as tool
    else:
        raise ValueError(f"unknown subcommand {name!r}; choose from {list(SUBCOMMANDS)}")
    return tool


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0]).main(argv[1:])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    tools = "\n".join(f"  {name:<18}{text}" for name, text in SUBCOMMANDS.items())
    parser = _Parser(
        prog="flagdit-bench",
        usage="flagdit-bench [options]\n       flagdit-bench report JSON... [--md FILE] [--png FILE]\n"
        f"       flagdit-bench {{{','.join(name for name in SUBCOMMANDS if name != 'report')}}} [options]",
        description=__doc__,
        epilog=f"subcommands (flagdit-bench SUBCOMMAND --help):\n{tools}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default=default_device, help=f"torch device to run on (default: {default_device})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes (the default on CPU)")
    size.add_argument("--full", action="store_true", help="DiT-sized shapes (the default on GPU)")
    parser.add_argument("--families", default="", help=f"comma-separated subset of {', '.join(family_names())} "
                        "(default: all)")  # fmt: skip
    parser.add_argument("--ops", default="", help="comma-separated op names to keep (default: all)")
    parser.add_argument(
        "--rep-ms",
        type=_positive_ms,
        default=None,
        help="time budget per measurement in ms (default: 100 on GPU, 40 on CPU)",
    )
    parser.add_argument(
        "--json", default=None, help="also write the rows and ceilings to this JSON file (default: none)"
    )
    args = parser.parse_args(argv)
    problem = device_problem(args.device) or (json_path_problem(args.json) if args.json else None)
    if problem:
        parser.error(problem)

    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    rep_ms = args.rep_ms if args.rep_ms is not None else (100.0 if device.type == "cuda" else 40.0)
    families = tuple(f for f in args.families.split(",") if f) or family_names()
    unknown = set(families) - set(family_names())
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {family_names()}")
    keep_ops = {o for o in args.ops.split(",") if o}
    cases = all_cases(quick, device, families)
    unknown_ops = keep_ops - {case.op for case in cases}
    if unknown_ops:
        parser.error(
            f"--ops: no case of {sorted(unknown_ops)} in the families {', '.join(families)}; their ops: "
            f"{', '.join(sorted({case.op for case in cases}))}"
        )

    copy_gbs, mm_tflops = copy_bandwidth_gbs(str(device)), matmul_tflops(str(device))
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
    )
    print(
        f"measured ceilings: copy {copy_gbs:.1f} GB/s, matmul {mm_tflops:.2f} TFLOP/s"
        + (" (fp32 on CPU)" if device.type == "cpu" else " (bf16)")
    )
    print(f"shapes: {'quick' if quick else 'full'}")
    if device.type == "cpu":
        print(cpu_note())
    print(f"{PEAK_LEGEND}\n\n{format_header()}", flush=True)
    rows: list[dict] = []
    for case in cases:
        if keep_ops and case.op not in keep_ops:
            continue
        for row in measure(case, device, rep_ms):
            rows.append(row)
            print(format_row(row, copy_gbs, mm_tflops), flush=True)
    ceilings = {
        "copy GB/s": (copy_gbs, copy_bandwidth_gbs.__wrapped__(str(device))),
        "matmul TFLOP/s": (mm_tflops, matmul_tflops.__wrapped__(str(device))),
    }
    for line in noise_warnings(rows, ceilings, copy_gbs, mm_tflops):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "copy_GBps": copy_gbs, "matmul_TFLOPs": mm_tflops, "rows": rows}, f, indent=1
            )
    return 1 if any("error" in r and r["impl"] in OURS for r in rows) else 0
