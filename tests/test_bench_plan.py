"""The GPU check's measurement plan: group membership, order, and that every row of benchmarks/RESULTS.md's
per-op record and every case the families predict is timed in a planned group (not left to ``rest``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagdit_kernels.bench import plan
from flagdit_kernels.bench.cases import declared_predictions
from flagdit_kernels.bench.results import record

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


def test_first_matching_selector_decides_group_and_order():
    p = {
        "first": (plan.Select("a", impl="x|y"), plan.Select("b")),
        "second": (plan.Select("a"),),
    }
    pairs = [("b", "s", "fwd", "x", 0), ("a", "s", "fwd", "z", 1), ("a", "s", "fwd", "y", 2), ("c", "s", "fwd", "x", 3)]
    assert plan.order(p, ["first", "second"], pairs) == [
        ("first", pairs[2]),  # a/y: the first selector
        ("first", pairs[0]),  # b: the second selector
        ("second", pairs[1]),  # a/z matches only the second group
    ]
    assert plan.order(p, ["second"], pairs) == [("second", pairs[1])]
    with pytest.raises(ValueError, match="unknown plan groups"):
        plan.order(p, ["third"], pairs)


def test_wildcards_are_per_field():
    s = plan.Select("varlen_attention", "packed*-D72*", "fwd", "triton|cuda")
    assert s.matches("varlen_attention", "packed5x16624-H32/8-D72", "fwd", "cuda")
    assert not s.matches("varlen_attention", "packed5x16624-H32/8-D72", "fwd+bwd", "triton")
    assert not s.matches("varlen_attention", "packed5x16624-H32/32-D128", "fwd", "triton")


def test_every_recorded_case_is_planned_before_rest():
    rows = record.parse(RESULTS.read_text())
    assert len(rows) >= 20
    for row in rows:
        ours = ("triton", "cuda", "fk fused", "fk patched")  # backends, and the fused model-level labels
        groups = {plan.group_of(plan.GPU_PLAN, row.op, row.shape, row.direction, impl)[0] for impl in ours}
        assert groups - {"rest"}, row.key


def test_every_predicted_case_is_planned_before_rest():
    predicted = declared_predictions()
    assert predicted
    for op, shape, direction in predicted:
        groups = {plan.group_of(plan.GPU_PLAN, op, shape, direction, impl)[0] for impl in ("triton", "cuda")}
        assert groups - {"rest"}, (op, shape, direction)


def test_a_case_carries_its_familys_prediction(monkeypatch):
    from types import SimpleNamespace

    from flagdit_kernels.bench import cases

    family = SimpleNamespace(
        cases=lambda quick, device: [cases.Case("op", "s", d, {}) for d in ("fwd", "fwd+bwd")],
        PREDICTIONS={("op", "s", "fwd+bwd"): "predicted 2x"},
    )
    monkeypatch.setattr(cases, "_families", lambda packages=cases.FAMILY_PACKAGES: {"fake": family})
    assert [c.prediction for c in cases.family_cases("fake", True, "cpu")] == ["", "predicted 2x"]
    assert cases.declared_predictions() == family.PREDICTIONS
