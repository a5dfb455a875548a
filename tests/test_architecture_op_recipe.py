"""The recipe in CONTRIBUTING.md ("Adding an op") kept true: every op in the backend registry has what the
recipe says an op has, so a new op that skips a step fails here, naming the step.

Every registered op needs its public export and its reference export (each in its family's module's
``__all__``: ``flagdit_kernels/ops/<family>.py`` and ``flagdit_kernels/reference/<family>.py``), its line in the
repository's DESIGN.md contract and its row in README.md's API table. An op with a kernel (any backend besides
``reference``) also needs a smoke case (its family's ``smoke_cases`` in ``flagdit_kernels/bench/families/``,
which ``tests/test_smoke.py`` runs: the GPU check's first phase), a selector of its own in the GPU check's
measurement plan (its family's ``PLAN`` or ``flagdit_kernels/bench/plan.py``'s ``GPU_PLAN``; the catch-all
``rest`` selector does not count) and a prediction written before any GPU run (its family's ``PREDICTIONS``,
or, for the ops recorded before those, a row in ``benchmarks/RESULTS.md``'s per-op record). A reference-only
op (``rope_freqs`` builds a table in PyTorch) has no kernel to smoke-test or to time.
"""

from __future__ import annotations

import dataclasses
import pathlib
from fnmatch import fnmatchcase

import pytest
import torch

import flagdit_kernels as fk
from flagdit_kernels import _dispatch, reference
from flagdit_kernels.bench.cases import all_smoke_cases, declared_predictions
from flagdit_kernels.bench.plan import GPU_PLAN
from flagdit_kernels.bench.results import record

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Sources:
    """What the recipe's steps leave behind, read once: the names each one holds."""

    exported: frozenset[str]  # flagdit_kernels.__all__
    reference_exports: frozenset[str]  # flagdit_kernels.reference.__all__ (callables)
    design: str  # DESIGN.md
    api_rows: tuple[str, ...]  # README.md's API table
    smoke_ops: frozenset[str]  # the ops of the families' smoke cases
    planned: tuple[str, ...]  # op patterns of GPU_PLAN's selectors, but the rest's
    predicted: frozenset[str]  # ops of the families' PREDICTIONS and of RESULTS.md's per-op record

    @classmethod
    def of_this_repository(cls) -> Sources:
        readme = (ROOT / "README.md").read_text().splitlines()
        return cls(
            exported=frozenset(fk.__all__),
            reference_exports=frozenset(n for n in reference.__all__ if callable(getattr(reference, n, None))),
            design=(ROOT / "DESIGN.md").read_text(),
            api_rows=tuple(line for line in readme if line.startswith("| `fk.")),
            smoke_ops=frozenset(case.op for case in all_smoke_cases(torch.device("cpu"))),
            planned=tuple(s.op for group, selectors in GPU_PLAN.items() if group != "rest" for s in selectors),
            predicted=frozenset(
                [op for op, _, _ in declared_predictions()]
                + [row.op for row in record.parse((ROOT / "benchmarks" / "RESULTS.md").read_text())]
            ),
        )


SOURCES = Sources.of_this_repository()


def missing_steps(op: str, backends: list[str], sources: Sources = SOURCES) -> list[str]:
    """The recipe's steps ``op`` (with these registered ``backends``) lacks."""
    missing = []
    if op not in sources.exported:
        missing.append("an entry in __all__ of flagdit_kernels/ops/<family>.py")
    if op not in sources.reference_exports:
        missing.append("an entry in __all__ of flagdit_kernels/reference/<family>.py")
    if f"`fk.{op}(" not in sources.design:
        missing.append(f"a contract line `fk.{op}(...)` in DESIGN.md")
    if not any(f"`fk.{op}(" in row for row in sources.api_rows):
        missing.append(f"a row `fk.{op}(...)` in README.md's API table")
    if set(backends) - {"reference"}:
        if op not in sources.smoke_ops:
            missing.append("a SmokeCase in its family's smoke_cases (flagdit_kernels/bench/families/)")
        if not any(fnmatchcase(op, p) for pattern in sources.planned for p in pattern.split("|")):
            missing.append("a Select in its family's PLAN (flagdit_kernels/bench/families/) or in bench/plan.py")
        if op not in sources.predicted:
            missing.append("a prediction in its family's PREDICTIONS (flagdit_kernels/bench/families/)")
    return missing


@pytest.mark.parametrize("op", _dispatch.ops())
def test_every_registered_op_follows_the_recipe(op):
    missing = missing_steps(op, _dispatch.registered_backends(op))
    assert not missing, f"{op} lacks {missing} (CONTRIBUTING.md, 'Adding an op')"


def test_a_registered_op_without_its_pieces_is_caught(monkeypatch):
    """A fake op registered like a real one (a Triton backend beside the reference) and nothing else: the check
    over the registry finds it, and only it, and names every step."""
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    for backend in ("reference", "triton"):
        _dispatch.register("swiglu", backend, lambda x: x, devices=("cpu", "cuda"))
    lacking = {op: missing_steps(op, _dispatch.registered_backends(op)) for op in _dispatch.ops()}
    assert [op for op, steps in lacking.items() if steps] == ["swiglu"]
    assert len(lacking["swiglu"]) == len(_WITHOUT)  # every step
    assert missing_steps("swiglu", ["reference"])[4:] == []  # a reference-only op needs no smoke case, plan or row


_WITHOUT = {  # each step's piece taken away from the real sources, one at a time
    "ops/<family>.py": lambda s, op: dataclasses.replace(s, exported=s.exported - {op}),
    "reference/<family>.py": lambda s, op: dataclasses.replace(s, reference_exports=s.reference_exports - {op}),
    "DESIGN.md": lambda s, op: dataclasses.replace(s, design=s.design.replace(f"`fk.{op}(", "`fk.gone(")),
    "README.md": lambda s, op: dataclasses.replace(s, api_rows=tuple(r for r in s.api_rows if f"`fk.{op}(" not in r)),
    "smoke_cases": lambda s, op: dataclasses.replace(s, smoke_ops=s.smoke_ops - {op}),
    "PLAN": lambda s, op: dataclasses.replace(s, planned=tuple(p for p in s.planned if op not in p.split("|"))),
    "PREDICTIONS": lambda s, op: dataclasses.replace(s, predicted=s.predicted - {op}),
}


@pytest.mark.parametrize("step", list(_WITHOUT))
def test_each_missing_piece_is_named(step):
    op = "layer_norm_modulate"  # the op the recipe was counted on
    backends = _dispatch.registered_backends(op)
    assert missing_steps(op, backends) == []
    missing = missing_steps(op, backends, _WITHOUT[step](SOURCES, op))
    assert len(missing) == 1 and step in missing[0], missing
