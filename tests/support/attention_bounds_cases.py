"""The Triton attention with offsets nobody checked (the GPU default, and any torch.compile trace, skip value checks
of cu_seqlens): it must stay inside q/k/v/out and never return memory that no program wrote.

The kernels repair offsets on the device (flagdit_kernels/triton/attention/offsets.py: clamp to [0, T], running
maximum, 0 first and T last), so bad offsets give the attention of the repaired ones. Each case calls the Triton
backend directly (as dispatch does once value checks are skipped) on inputs embedded in NaN guard rows (a read
outside a tensor's rows poisons the result) under NaN-poisoned allocations (an unwritten output row shows), and
compares output, LSE and every gradient with the float64 reference run on the repaired offsets.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.helpers import (
    DEVICE,
    TOLERANCE,
    assert_rel_close,
    fresh,
    needs_triton,
    poisoned_allocations,
)

from flagdit_kernels import reference as ref
from flagdit_kernels.ops import attention as attn

pytestmark = needs_triton

T, TT, H, HKV, D = 23, 6, 2, 1, 32
DTYPE = torch.float32


def _cu(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _strided(values: list[int]) -> torch.Tensor:
    """The same offsets as a non-contiguous view (every other element of a larger tensor)."""
    cu = _cu(values)
    view = torch.stack([cu, -7 * torch.ones_like(cu)], -1)[:, 0]
    assert not view.is_contiguous()
    return view


def _repaired(cu: torch.Tensor, total: int) -> torch.Tensor:
    """The documented repair, in Python: clamp into [0, total], 0 first and total last, running maximum."""
    vals = [min(max(int(x), 0), total) for x in cu.tolist()]
    vals[0], vals[-1] = 0, total
    for i in range(1, len(vals)):
        vals[i] = max(vals[i], vals[i - 1])
    return _cu(vals)


def _guarded(t: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """t's values with ``rows`` NaN rows before and after it in the same buffer (differentiable in t)."""
    pad = torch.full((rows, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t, pad])[rows:-rows]


CASES = {
    # name: (cu_seqlens, text_cu_seqlens, max_seqlen)
    "non-contiguous views": (_strided([0, 9, T]), _strided([0, 2, TT]), 14),
    "last offset past T": (_cu([0, 9, 40]), _cu([0, 2, TT]), 40),
    "decreasing offsets": (_cu([0, 15, 4, T]), _cu([0, 3, 1, TT]), 15),
    "negative and late start": (_cu([-3, 9, T - 2]), _cu([2, 2, TT]), 14),
    "max_seqlen below a real length": (_cu([0, 9, T]), _cu([0, 2, TT]), 1),
    "text offsets past text_k": (_cu([0, 9, T]), _cu([0, 9, 2]), 14),
}


def _inputs(seed: int) -> dict:
    gen = dict(seed=seed)
    return {
        "q": fresh((T, H, D), DTYPE, **gen), "k": fresh((T, HKV, D), DTYPE, seed=seed + 1),
        "v": fresh((T, HKV, D), DTYPE, seed=seed + 2), "text_k": fresh((TT, HKV, D), DTYPE, seed=seed + 3),
        "text_v": fresh((TT, HKV, D), DTYPE, seed=seed + 4), "gate": fresh((H,), DTYPE, scale=0.8, seed=seed + 5),
    }  # fmt: skip


def _run(fn, leaves: dict, cu, tcu, max_seqlen, upstream, guard: bool, **kw):
    """(out, lse, grads) of sum(out * u) + sum(lse * w)."""
    args = {n: _guarded(t) if guard and n != "gate" else t for n, t in leaves.items()}
    scale = 1 / math.sqrt(args["q"].shape[-1])
    out, lse = fn(args["q"], args["k"], args["v"], cu, max_seqlen, scale, text_k=args["text_k"], text_v=args["text_v"],
                  text_cu_seqlens=tcu, gate=args["gate"], return_lse=True, **kw)  # fmt: skip
    ((out.double() * upstream[0]).sum() + (lse.double() * upstream[1]).sum()).backward()
    return out, lse, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize(("case", "deterministic"), [(c, False) for c in CASES] + [("decreasing offsets", True)])
def test_unchecked_offsets_stay_in_bounds_and_write_every_row(case, deterministic):
    cu, tcu, max_seqlen = CASES[case]
    inputs = _inputs(seed=len(case))
    upstream = (fresh((T, H, D), torch.float64, seed=1), fresh((H, T), torch.float64, seed=2))
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    with poisoned_allocations():
        out, lse, grads = _run(attn._varlen_attention_triton, leaves, cu, tcu, max_seqlen, upstream, guard=True,
                               deterministic=deterministic)  # fmt: skip
    exp_leaves = {n: t.double().requires_grad_() for n, t in inputs.items()}
    fixed_cu, fixed_tcu = _repaired(cu, T), _repaired(tcu, TT)
    exp_out, exp_lse, exp_grads = _run(ref.varlen_attention, exp_leaves, fixed_cu, fixed_tcu, T, upstream, guard=False)
    tol = TOLERANCE["attention"][DTYPE]
    assert_rel_close(out, exp_out, tol)
    assert_rel_close(lse, exp_lse, 1e-5, "lse")
    for name, g in grads.items():
        assert_rel_close(g, exp_grads[name], tol, f"grad {name}")


def test_no_sequence_at_all_gives_zeros():
    # A one-entry cu_seqlens (no sequence) with tokens present: nothing covers them; outputs are exact zeros.
    leaves = {n: t.clone().requires_grad_() for n, t in _inputs(seed=3).items()}
    upstream = (fresh((T, H, D), torch.float64, seed=1), fresh((H, T), torch.float64, seed=2))
    with poisoned_allocations():
        out, lse, grads = _run(attn._varlen_attention_triton, leaves, _cu([T]), _cu([TT]), T, upstream, guard=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.zeros_like(lse))
    for name, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_the_backward_takes_the_forwards_repaired_offsets(monkeypatch, cross):
    # One repair per training step: the forward's custom op returns the offsets it repaired and autograd saves
    # those for the backward, which launches them as they are. A backward that repaired again (or got the
    # unrepaired input) calls safe_offsets a second time; one that launched unrepaired offsets leaves the bounds
    # and the reference (the guard rows and poisoned allocations show it). Cross-attention: three rows (query,
    # text and key offsets), keys of their own length.
    from flagdit_kernels.triton.attention import launch

    repairs = []

    def counted(*args, **kwargs):
        repairs.append(args[0])
        return real(*args, **kwargs)

    real = launch.safe_offsets
    monkeypatch.setattr(launch, "safe_offsets", counted)
    cu, tcu, max_seqlen = CASES["decreasing offsets"]
    inputs = _inputs(seed=11)
    kw, fixed = {}, {}
    if cross:  # keys of their own packing: 17 rows, offsets past the end and out of order
        inputs["k"], inputs["v"] = fresh((17, HKV, D), DTYPE, seed=21), fresh((17, HKV, D), DTYPE, seed=22)
        kw = {"cu_seqlens_k": _cu([0, 20, 3, 17]), "max_seqlen_k": 20}
        fixed = {"cu_seqlens_k": _repaired(kw["cu_seqlens_k"], 17), "max_seqlen_k": 17}
    upstream = (fresh((T, H, D), torch.float64, seed=1), fresh((H, T), torch.float64, seed=2))
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    with poisoned_allocations():
        out, lse, grads = _run(attn._varlen_attention_triton, leaves, cu, tcu, max_seqlen, upstream, guard=True, **kw)
    assert len(repairs) == 1, f"the offsets were repaired {len(repairs)} times in one forward + backward"
    exp_leaves = {n: t.double().requires_grad_() for n, t in inputs.items()}
    exp_out, exp_lse, exp_grads = _run(ref.varlen_attention, exp_leaves, _repaired(cu, T), _repaired(tcu, TT), T,
                                       upstream, guard=False, **fixed)  # fmt: skip
    tol = TOLERANCE["attention"][DTYPE]
    assert_rel_close(out, exp_out, tol)
    keys = torch.isfinite(exp_lse)  # -inf: a sample without keys (cross), alike in both
    assert torch.equal(torch.isfinite(lse), keys)
    assert_rel_close(lse[keys], exp_lse[keys], 1e-5, "lse")
    for name, g in grads.items():
        assert_rel_close(g, exp_grads[name], tol, f"grad {name}")
