"""The recipe in CONTRIBUTING.md ("Adding an op") kept true: every op in the backend registry has what the
recipe says an op has, so a new op that skips a step fails here, naming the step.

Every registered op needs its reference export (the spec the backends are tested against), its line in the
repository's DESIGN.md contract and its row in README.md's API table. An op with a kernel (any backend besides
``reference``) also needs a smoke case (``tests/test_smoke.py``, the GPU check's first phase), an entry of its
own in the GPU check's measurement plan (``flagdit_kernels/bench/plan.py``'s ``GPU_PLAN``; the catch-all
``rest`` selector does not count) and a row in ``benchmarks/RESULTS.md``'s per-op record (its floor and
prediction). A reference-only op (``rope_freqs`` builds a table in PyTorch) has no kernel to smoke-test or to
time.
"""

from __future__ import annotations

import pathlib
from fnmatch import fnmatchcase

import pytest
from test_smoke import OPS as SMOKE_OPS

import flagdit_kernels as fk
from flagdit_kernels import _dispatch, reference
from flagdit_kernels.bench.plan import GPU_PLAN
from flagdit_kernels.bench.results import record

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = (ROOT / "DESIGN.md").read_text()
API_ROWS = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `fk.")]
RECORDED = {row.op for row in record.parse((ROOT / "benchmarks" / "RESULTS.md").read_text())}


def _planned(op: str) -> bool:
    return any(
        any(fnmatchcase(op, pattern) for pattern in select.op.split("|"))
        for group, selectors in GPU_PLAN.items()
        if group != "rest"
        for select in selectors
    )


def missing_steps(op: str, backends: list[str]) -> list[str]:
    """The recipe's steps ``op`` (with these registered ``backends``) lacks."""
    missing = []
    if op not in reference.__all__ or not callable(getattr(reference, op, None)):
        missing.append("an export in flagdit_kernels/reference/__init__.py")
    if f"`fk.{op}(" not in DESIGN:
        missing.append(f"a contract line `fk.{op}(...)` in DESIGN.md")
    if not any(f"`fk.{op}(" in row for row in API_ROWS):
        missing.append(f"a row `fk.{op}(...)` in README.md's API table")
    if set(backends) - {"reference"}:
        if op not in SMOKE_OPS.values():
            missing.append("a case in tests/test_smoke.py's CASES")
        if not _planned(op):
            missing.append("a selector in flagdit_kernels/bench/plan.py's GPU_PLAN")
        if op not in RECORDED:
            missing.append("a row in benchmarks/RESULTS.md's per-op record")
    return missing


@pytest.mark.parametrize("op", _dispatch.ops())
def test_every_registered_op_follows_the_recipe(op):
    assert op in fk.__all__, f"{op} is registered but not exported by flagdit_kernels"
    missing = missing_steps(op, _dispatch.registered_backends(op))
    assert not missing, f"{op} lacks {missing} (CONTRIBUTING.md, 'Adding an op')"


def test_the_check_names_every_missing_step():
    assert missing_steps("swiglu", ["reference", "triton"]) == [
        "an export in flagdit_kernels/reference/__init__.py",
        "a contract line `fk.swiglu(...)` in DESIGN.md",
        "a row `fk.swiglu(...)` in README.md's API table",
        "a case in tests/test_smoke.py's CASES",
        "a selector in flagdit_kernels/bench/plan.py's GPU_PLAN",
        "a row in benchmarks/RESULTS.md's per-op record",
    ]
    assert missing_steps("swiglu", ["reference"])[3:] == []  # a reference-only op needs no smoke case or plan
