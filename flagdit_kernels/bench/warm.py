"""Fills the compile caches before a timed benchmark run, in parallel processes.

The first call of every benchmarked implementation compiles something: our Triton kernels (the autotuned
attention kernels one binary per config), Inductor graphs for the ``torch.compile`` and FlexAttention baselines.
Both land in on-disk caches (Triton's cache dir, Inductor's FX graph cache) that a later run hits. Done inside
the timed run, those compiles run one after another (minutes on a GPU machine); here every (case,
implementation) pair runs once, the pairs spread round-robin over ``--jobs`` processes, with
``FLAGDIT_KERNELS_AUTOTUNE=compile`` so that each autotuned kernel compiles all its configs without timing
any. Nothing is measured: the timed run that follows (``pytest benchmarks --benchmark-only`` or
``flagdit-bench``) still autotunes and times on an otherwise idle GPU.

    python -m flagdit_kernels.bench.warm --jobs 8 [--families attention,norms] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .cases import family_cases, family_names


def _run_shard(shard: int, jobs: int, families: tuple[str, ...], quick: bool) -> int:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    failures = index = 0
    # One family's cases at a time: every process holds only that family's inputs (all of them at once would
    # not fit jobs times on the card).
    for family in families:
        cases = family_cases(family, quick, device)
        for case in cases:
            for label, build in case.impls.items():
                index += 1
                if index % jobs != shard:
                    continue
                start = time.perf_counter()
                try:
                    build()()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    status = "ok"
                except Exception as exc:  # a baseline that cannot run here is reported by the timed run too
                    failures += 1
                    status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
                print(f"[warm {shard}/{jobs}] {case.name} {label}: {status} ({time.perf_counter() - start:.1f} s)")
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagdit_kernels.bench.warm", description=__doc__)
    parser.add_argument("--jobs", type=int, default=8, help="parallel processes")
    parser.add_argument("--families", default=",".join(family_names()), help="comma-separated subset of the families")
    parser.add_argument("--quick", action="store_true", help="the small shapes (what --bench-quick times)")
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)  # set for the child processes
    args = parser.parse_args(argv)
    families = tuple(f for f in args.families.split(",") if f)
    unknown = set(families) - set(family_names())
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {family_names()}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.shard is not None:
        _run_shard(args.shard, args.jobs, families, args.quick)
        return 0  # failures are reported, not fatal: the timed run records them per implementation

    env = dict(os.environ, FLAGDIT_KERNELS_AUTOTUNE="compile")
    base = [sys.executable, "-m", "flagdit_kernels.bench.warm", "--jobs", str(args.jobs), "--families", args.families]
    base += ["--quick"] if args.quick else []
    start = time.perf_counter()
    procs = [subprocess.Popen([*base, "--shard", str(i)], env=env) for i in range(args.jobs)]
    codes = [p.wait() for p in procs]
    print(f"[warm] {args.jobs} processes, {time.perf_counter() - start:.0f} s, exit codes {codes}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
