"""pytest-benchmark suites over the benchmark families (``flagdit_kernels.bench.families``, ``flagdit.bench``).

``pytest benchmarks/ --benchmark-only`` times every op x implementation (full DiT shapes on GPU, small
shapes on CPU); ``--bench-quick`` / ``--bench-full`` force the size. With ``--benchmark-disable`` every case
runs once, which is how CI keeps the suites from rotting.

``--bench-plan attention=100,bandwidth=60`` runs only the pairs of those groups of the measurement plan
(``flagdit_kernels.bench.plan``), in plan order, and skips a group's remaining pairs once its budget is spent
(budgets add up: a group that finishes early leaves its time to the next). ``--bench-resume LOG`` leaves out
the pairs that already started in that results log (``benchmarks/results_log.py``): a rerun after a crash or a
hung case goes on with the next pair. A case that loses the CUDA context (an illegal memory access, say) stops
the run after it (exit status 2, interrupted), for the same resume.
"""

import re
import time

import pytest
import torch

# Errors after which the CUDA context is unusable: every later case in this process would fail the same way.
_CONTEXT_LOST = re.compile(
    r"illegal memory access|illegal instruction|unspecified launch failure|device-side assert|misaligned address"
    r"|CUDA_ERROR_(ILLEGAL|LAUNCH_FAILED|MISALIGNED)"
)


def pytest_addoption(parser):
    group = parser.getgroup("flagdit")
    group.addoption("--bench-quick", action="store_true", help="small shapes even on GPU")
    group.addoption("--bench-full", action="store_true", help="DiT-sized shapes even on CPU")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--bench-families", default=None, help="comma-separated op families (default: all)")
    group.addoption("--bench-plan", default=None, help="plan groups to run, GROUP[=BUDGET_S],... in order")
    group.addoption("--bench-plan-set", default="gpu", help="which plan: gpu (default) or dry-run")
    group.addoption("--bench-plan-start", type=float, default=None, help="Unix time the budgets count from")
    group.addoption("--bench-resume", default=None, help="results log: skip the pairs that started there")


def bench_families(config) -> tuple[str, ...]:
    from flagdit_kernels.bench.cases import family_names

    known = family_names()
    chosen = tuple(f for f in (config.getoption("--bench-families") or ",".join(known)).split(",") if f)
    unknown = set(chosen) - set(known)
    if unknown:
        raise pytest.UsageError(f"--bench-families: unknown {sorted(unknown)}; choose from {known}")
    return chosen


def bench_settings(config) -> tuple[torch.device, bool]:
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = config.getoption("--bench-quick") or (device.type == "cpu" and not config.getoption("--bench-full"))
    return device, quick


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    return bench_settings(request.config)[0]


def _plan_groups(text: str) -> list[tuple[str, float | None]]:
    groups = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, budget = part.partition("=")
        try:
            groups.append((name, float(budget) if budget else None))
        except ValueError:
            raise pytest.UsageError(f"--bench-plan: {part!r} is not GROUP or GROUP=SECONDS") from None
    return groups


def _started(config) -> set[str]:
    """Test ids with a start record in the resume log, in this phase."""
    path = config.getoption("--bench-resume")
    if not path:
        return set()
    from flagdit_kernels.bench.results.run_log import read_jsonl

    phase = config.getoption("--results-phase", None)
    records, _ = read_jsonl(path)
    return {r["test"] for r in records if r.get("kind") == "start" and (phase is None or r.get("phase") == phase)}


_GROUP = pytest.StashKey[tuple[str, float | None, float | None]]()  # (group, budget, deadline)


def pytest_collection_modifyitems(config, items):
    text = config.getoption("--bench-plan")
    if not text:
        return
    from flagdit_kernels.bench.plan import PLANS, order

    plan = PLANS.get(config.getoption("--bench-plan-set"))
    if plan is None:
        raise pytest.UsageError(f"--bench-plan-set: choose from {sorted(PLANS)}")
    groups = _plan_groups(text)
    pairs = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "case" in params:
            case = params["case"]
            pairs.append((case.op, case.shape, case.direction, params["impl"], item))
    try:
        planned = order(plan, [g for g, _ in groups], pairs)
    except ValueError as exc:
        raise pytest.UsageError(f"--bench-plan: {exc}") from None
    start = config.getoption("--bench-plan-start") or time.time()
    deadlines, total = {}, 0.0
    for name, budget in groups:
        total = total + budget if budget is not None and total is not None else None
        deadlines[name] = (budget, None if total is None else start + total)
    started = _started(config)
    keep = []
    for group, pair in planned:
        item = pair[-1]
        if item.nodeid not in started:
            item.stash[_GROUP] = (group, *deadlines[group])
            keep.append(item)
    kept = set(keep)
    config.hook.pytest_deselected(items=[i for i in items if i not in kept])
    items[:] = keep


def pytest_runtest_setup(item):
    group, budget, deadline = item.stash.get(_GROUP, (None, None, None))
    if deadline is not None and time.time() > deadline:
        pytest.skip(f"plan group {group}: its budget ({budget:.0f} s, counted with the groups before it) is spent")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed and call.excinfo is not None and _CONTEXT_LOST.search(str(call.excinfo.value)):
        item.session.shouldstop = f"{item.nodeid}: the CUDA context is lost ({call.excinfo.typename})"
