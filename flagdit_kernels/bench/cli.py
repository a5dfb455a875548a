"""``flagdit-bench``: every op on every available backend and the baselines, one table.

On a GPU it runs DiT-sized shapes and reports % of the measured copy bandwidth / bf16 matmul rate; on a
CPU-only machine it runs small shapes (about a minute) so the numbers are real but only CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .cases import Case, all_cases, family_names
from .timing import copy_bandwidth_gbs, matmul_tflops, throughput, time_ms


def measure(case: Case, device: torch.device, rep_ms: float) -> list[dict]:
    rows = []
    for label, build in case.impls.items():
        row = {"op": case.op, "shape": case.shape, "direction": case.direction, "impl": label}
        try:
            fn = build()
            row.update(throughput(case.bytes, case.flops, time_ms(fn, device, rep_ms=rep_ms)))
        except Exception as exc:  # one broken baseline (e.g. no cuDNN) must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        rows.append(row)
    return rows


def format_table(rows: list[dict], copy_gbs: float, mm_tflops: float) -> str:
    header = f"{'op':<24} {'shape':<34} {'dir':<8} {'impl':<16} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'% peak':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<24} {r['shape']:<34} {r['direction']:<8} {r['impl']:<16} {r['error']}")
            continue
        gbs, tf = r["GB/s"], r["TFLOP/s"]
        peak = 100 * gbs / copy_gbs if gbs else (100 * tf / mm_tflops if tf else None)
        lines.append(
            f"{r['op']:<24} {r['shape']:<34} {r['direction']:<8} {r['impl']:<16} {r['ms']:>9.3f} "
            f"{gbs if gbs else float('nan'):>8.1f} {tf if tf else float('nan'):>8.2f} "
            f"{peak if peak is not None else float('nan'):>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from .report import main as report_main

        return report_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="flagdit-bench",
        description=__doc__,
        epilog="flagdit-bench report JSON... writes a Markdown table and a PNG",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes (the default on CPU)")
    size.add_argument("--full", action="store_true", help="DiT-sized shapes (the default on GPU)")
    parser.add_argument("--families", default="", help="comma-separated subset of the families (default: all)")
    parser.add_argument("--ops", default="", help="comma-separated op names to keep (default: all)")
    parser.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement")
    parser.add_argument("--json", default=None, help="also write the rows and ceilings to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    rep_ms = args.rep_ms if args.rep_ms is not None else (100.0 if device.type == "cuda" else 40.0)
    families = tuple(f for f in args.families.split(",") if f) or family_names()
    unknown = set(families) - set(family_names())
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {family_names()}")
    keep_ops = {o for o in args.ops.split(",") if o}

    copy_gbs, mm_tflops = copy_bandwidth_gbs(str(device)), matmul_tflops(str(device))
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
    )
    print(
        f"measured ceilings: copy {copy_gbs:.1f} GB/s, matmul {mm_tflops:.2f} TFLOP/s"
        + (" (fp32 on CPU)" if device.type == "cpu" else " (bf16)")
    )
    print(f"shapes: {'quick' if quick else 'full'}\n")
    rows: list[dict] = []
    for case in all_cases(quick, device, families):
        if keep_ops and case.op not in keep_ops:
            continue
        case_rows = measure(case, device, rep_ms)
        rows.extend(case_rows)
        print(format_table(case_rows, copy_gbs, mm_tflops).split("\n", 2)[-1], flush=True)
    print("\n" + format_table(rows, copy_gbs, mm_tflops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "copy_GBps": copy_gbs, "matmul_TFLOPs": mm_tflops, "rows": rows}, f, indent=1
            )
    return 1 if any("error" in r and r["impl"] in ("triton", "cuda", "cpu") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
