"""Fills the compile caches before a timed benchmark run, in parallel processes.

The first call of every benchmarked implementation compiles something: our Triton kernels (the autotuned
attention kernels one binary per config), Inductor graphs for the ``torch.compile`` and FlexAttention baselines.
Both land in on-disk caches (Triton's cache dir, Inductor's FX graph cache) that a later run hits. Done inside
the timed run, those compiles run one after another (minutes on a GPU machine); here every (case,
implementation) pair runs once, the pairs spread round-robin over ``--jobs`` processes, with
``FLAGDIT_KERNELS_AUTOTUNE=compile`` so that each autotuned kernel compiles all its configs without timing
any. Nothing is measured: the timed run that follows (``pytest benchmarks --benchmark-only`` or
``flagdit-bench``) still autotunes and times on an otherwise idle GPU.

``--plan GROUPS`` warms only the pairs of those groups of the measurement plan (``flagdit_kernels.bench.plan``),
first-needed first, so that a warm phase cut short by its time limit has compiled what the timed run needs
first.

    flagdit-bench warm --jobs 8 [--families attention,norms] [--plan attention,bandwidth] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .cases import family_cases, family_names
from .plan import PLANS, order


def _family_pairs(family: str, quick: bool, device, plan: dict | None, groups: tuple[str, ...]):
    """``(case, label, build)`` of one family, in plan order when a plan is given."""
    cases = family_cases(family, quick, device)
    pairs = [(c.op, c.shape, c.direction, label, (c, build)) for c in cases for label, build in c.impls.items()]
    if plan is not None:
        pairs = [pair for _, pair in order(plan, groups, pairs)]
    return [(case, label, build) for *_, label, (case, build) in pairs]


def _run_shard(
    shard: int, jobs: int, families: tuple[str, ...], quick: bool, plan: str | None = None, groups=()
) -> int:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    failures = index = 0
    # One family's cases at a time: every process holds only that family's inputs (all of them at once would
    # not fit jobs times on the card).
    for family in families:
        for case, label, build in _family_pairs(family, quick, device, PLANS[plan] if plan else None, groups):
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
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagdit-bench warm", description=__doc__)
    parser.add_argument("--jobs", type=int, default=8, help="parallel processes (1: in this process)")
    parser.add_argument("--families", default=",".join(family_names()), help="comma-separated subset of the families")
    parser.add_argument("--plan", default=None, help="comma-separated plan groups: only their pairs, in plan order")
    parser.add_argument("--plan-set", default="gpu", choices=sorted(PLANS), help="which plan --plan names")
    parser.add_argument("--quick", action="store_true", help="the small shapes (what --bench-quick times)")
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)  # set for the child processes
    args = parser.parse_args(argv)
    families = tuple(f for f in args.families.split(",") if f)
    unknown = set(families) - set(family_names())
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {family_names()}")
    groups = tuple(g for g in (args.plan or "").split(",") if g)
    if set(groups) - set(PLANS[args.plan_set]):
        parser.error(f"unknown plan groups {sorted(set(groups) - set(PLANS[args.plan_set]))}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    plan = args.plan_set if groups else None
    if args.shard is not None or args.jobs == 1:
        os.environ["FLAGDIT_KERNELS_AUTOTUNE"] = "compile"  # before the attention kernels' module is imported
        _run_shard(args.shard or 0, args.jobs, families, args.quick, plan, groups)
        return 0  # failures are reported, not fatal: the timed run records them per implementation

    env = dict(os.environ, FLAGDIT_KERNELS_AUTOTUNE="compile")
    base = [sys.executable, "-m", "flagdit_kernels.bench", "warm", "--jobs", str(args.jobs)]
    base += ["--families", args.families]
    base += ["--quick"] if args.quick else []
    base += ["--plan", args.plan, "--plan-set", args.plan_set] if groups else []
    start = time.perf_counter()
    procs = [subprocess.Popen([*base, "--shard", str(i)], env=env) for i in range(args.jobs)]
    codes = [p.wait() for p in procs]
    print(f"[warm] {args.jobs} processes, {time.perf_counter() - start:.0f} s, exit codes {codes}")
    return max(codes)
