"""What a kernel does with inputs nobody checked: run by tests/test_api_unchecked_inputs.py in a child process.

On the GPU (and inside any torch.compile trace) the values of ``cu_seqlens`` / ``kind`` are not read on the host,
so the Triton kernels get whatever the caller passed. Each case here calls a backend implementation directly
(``_dispatch.resolve(...).fn``, what a public op calls once its value checks are skipped) with random offsets,
valid or not, on inputs embedded between NaN guard rows (a read outside a tensor's rows poisons the result) and
under NaN-poisoned allocations (an output row no program wrote shows). The results must equal the documented
behaviour computed in plain PyTorch:

* norms: a token's sample is the number of ``cu_seqlens`` ends at or below its row, clamped to ``[0, B)``;
* attention: offsets are repaired (clamped into ``[0, T]``, a running maximum, 0 first and T last) and the
  attention of the repaired offsets is returned; ``max_seqlen`` does not matter;
* embed_packed: a kind outside {0, 1, 2} is a patch row.

A kernel that reads or writes far outside its tensors crashes the interpreter; in a child process that fails
the calling test instead of the run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import TOLERANCE, assert_rel_close, fresh, needs_triton, poisoned_allocations

from flagdit_kernels import _dispatch
from flagdit_kernels import reference as ref

pytestmark = needs_triton
FEW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T, D = 19, 24


def _triton(op: str, like: torch.Tensor):
    return _dispatch.resolve(op, like, backend="triton").fn


def _guarded(t: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """t's values with ``rows`` NaN rows before and after it in one buffer (differentiable in t)."""
    pad = torch.full((rows, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t, pad])[rows:-rows]


def _offsets(values: list[int], strided: bool, device) -> torch.Tensor:
    cu = torch.tensor(values, dtype=torch.int32, device=device)
    if strided:  # a column of a larger tensor: the same values at stride 2, with junk between them
        cu = torch.stack([cu, torch.full_like(cu, 1 << 30)], -1)[:, 0]
        assert not cu.is_contiguous()
    return cu


@st.composite
def offsets(draw, total: int, max_seqs: int = 4):
    """(values, strided): valid partitions of ``total`` tokens half the time, anything in [-4, total + 8] else."""
    n = draw(st.integers(1, max_seqs)) + 1
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, total), min_size=n - 2, max_size=n - 2)))
        values = [0, *cuts, total]
    else:
        values = draw(st.lists(st.integers(-4, total + 8), min_size=n, max_size=n))
    return values, draw(st.booleans())


def norm_sample_index(values: list[int], rows: int) -> torch.Tensor:
    """The documented sample of every row (flagdit_kernels/triton/norms.py, Samples), written out: a binary
    search of the row over the offsets' ends (bisect_right), clamped to [0, B). For valid offsets: the number
    of ends at or below the row."""
    ends, b = values[1:], len(values) - 1
    out = []
    for row in range(rows):
        lo, hi = 0, b
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if ends[mid] <= row else (lo, mid)
        out.append(min(lo, b - 1))
    return torch.tensor(out)


def repaired(values: list[int], total: int) -> list[int]:
    """The attention kernels' repair of unchecked offsets."""
    fixed = [min(max(v, 0), total) for v in values]
    fixed[0], fixed[-1] = 0, total
    for i in range(1, len(fixed)):
        fixed[i] = max(fixed[i], fixed[i - 1])
    return fixed


@FEW
@given(cu=offsets(T), op=st.sampled_from(["rms_norm_modulate", "gated_residual_rms_norm"]))
def test_norms_read_each_row_s_sample_from_any_offsets(cu, op):
    values, strided = cu
    b = len(values) - 1
    leaves = {"x": fresh((T, D), torch.float32), "w": fresh((D,), torch.float32), "p": fresh((b, D), torch.float32),
              "res": fresh((T, D), torch.float32)}  # fmt: skip
    dy = fresh((T, D), torch.float32)
    ours = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    g = {n: _guarded(t) for n, t in ours.items()}
    offs = _offsets(values, strided, g["x"].device)
    with poisoned_allocations():
        if op == "rms_norm_modulate":
            y = _triton(op, g["x"])(g["x"], g["w"], g["p"], g["p"], 1e-5, offs)
        else:
            y = _triton(op, g["x"])(g["res"], g["x"], g["w"], g["p"], 1e-5, True, offs)
        y.backward(dy)
    exp = {n: t.double().requires_grad_() for n, t in leaves.items()}
    per_row = exp["p"][norm_sample_index(values, T)]  # (T, D): the documented sample's parameters
    if op == "rms_norm_modulate":
        want = ref.rms_norm_modulate(exp["x"], exp["w"], per_row, per_row, 1e-5)
    else:
        want = ref.gated_residual_rms_norm(exp["res"], exp["x"], exp["w"], per_row, 1e-5, True)
    want.backward(dy.double())
    tol = TOLERANCE["norm"][torch.float32]
    assert_rel_close(y, want, tol)
    for name, t in ours.items():
        if exp[name].grad is not None:
            assert_rel_close(t.grad, exp[name].grad, tol, f"grad {name}")


TT, H, HKV, DH = 7, 2, 1, 32


@FEW
@given(cu=offsets(T), text=offsets(TT), max_seqlen=st.integers(0, T + 4), with_text=st.booleans())
def test_attention_returns_the_attention_of_the_repaired_offsets(cu, text, max_seqlen, with_text):
    (values, strided), (text_values, text_strided) = cu, text
    text_values = (text_values + [TT] * len(values))[: len(values)]  # one text sequence per sample
    leaves = {"q": fresh((T, H, DH), torch.float32), "k": fresh((T, HKV, DH), torch.float32),
              "v": fresh((T, HKV, DH), torch.float32)}  # fmt: skip
    if with_text:
        leaves |= {"text_k": fresh((TT, HKV, DH), torch.float32), "text_v": fresh((TT, HKV, DH), torch.float32),
                   "gate": fresh((H,), torch.float32, scale=0.8)}  # fmt: skip
    upstream = fresh((T, H, DH), torch.float64)
    ours = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    g = {n: t if n == "gate" else _guarded(t) for n, t in ours.items()}
    device = g["q"].device
    text_kw = {}
    if with_text:
        text_cu = _offsets(text_values, text_strided, device)
        text_kw = dict(text_k=g["text_k"], text_v=g["text_v"], gate=g["gate"], text_cu_seqlens=text_cu,
                       text_max_seqlen=max_seqlen)  # fmt: skip
    with poisoned_allocations():
        out = _triton("varlen_attention", g["q"])(
            g["q"], g["k"], g["v"], _offsets(values, strided, device), max_seqlen, 0.3, **text_kw
        )
        (out.double() * upstream).sum().backward()
    exp = {n: t.double().requires_grad_() for n, t in leaves.items()}
    exp_text = {}
    if with_text:
        exp_text = dict(text_k=exp["text_k"], text_v=exp["text_v"], gate=exp["gate"],
                        text_cu_seqlens=_offsets(repaired(text_values, TT), False, "cpu"))  # fmt: skip
    want = ref.varlen_attention(exp["q"], exp["k"], exp["v"], _offsets(repaired(values, T), False, "cpu"), T, 0.3,
                                **exp_text)  # fmt: skip
    (want * upstream).sum().backward()
    tol = TOLERANCE["attention"][torch.float32]
    assert_rel_close(out, want, tol)
    for name, t in ours.items():
        # The reference never touches text keys no query attends to (no grad at all): theirs must be zeros.
        expected = exp[name].grad if exp[name].grad is not None else torch.zeros_like(exp[name])
        assert_rel_close(t.grad, expected, tol, f"grad {name}")


@pytest.mark.parametrize("bad_kind", [-128, -100, -1, 3, 127])
def test_embed_reads_only_the_placeholder_table_whatever_kind_holds(bad_kind):
    kind = torch.tensor([0, 1, bad_kind, 2, 0, bad_kind, 1], dtype=torch.int8)
    leaves = {"patches": fresh((7, 12), torch.float32), "weight": fresh((8, 12), torch.float32),
              "bias": fresh((8,), torch.float32), "table": fresh((2, 8), torch.float32)}  # fmt: skip
    ours = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    upstream = fresh((7, 8), torch.float32)
    with poisoned_allocations():
        out = _triton("embed_packed", ours["patches"])(
            _guarded(ours["patches"]), kind, ours["weight"], ours["bias"], _guarded(ours["table"], rows=200)
        )
        out.backward(upstream)
    exp = {n: t.double().requires_grad_() for n, t in leaves.items()}
    patch_rows = ~((kind == 1) | (kind == 2))
    linear = exp["patches"] @ exp["weight"].T + exp["bias"]
    want = torch.where(patch_rows[:, None], linear, exp["table"][(kind.long() - 1).clamp(0, 1)])
    want.backward(upstream.double())
    assert_rel_close(out, want, 1e-6)
    for name, t in ours.items():
        assert_rel_close(t.grad, exp[name].grad, 1e-6, f"grad {name}")


def test_packing_launchers_refuse_shapes_that_do_not_tile_the_tokens():
    """The Triton unpack launcher, called with item shapes that disagree with the token rows (what a hand-built
    Packed would pass without fk.unpack's checks), raises instead of writing or returning unwritten memory."""
    from flagdit_kernels.ops import packing

    tokens = fresh((6, 12), torch.float32)
    for shapes in ([3, 1, 4, 8], [3, 1, 2, 2], [4, 0, 4, 4]):
        with pytest.raises((ValueError, RuntimeError)):
            packing._triton_unpack(tokens, shapes, 2, 3, True, True, True, [])
