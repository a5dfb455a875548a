"""fk.VarlenLayout: validated once when built, accepted by every op that takes cu_seqlens, same results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.helpers import DEVICE, fresh, offsets_of

import flagdit_kernels as fk
from flagdit_kernels.ops import attention as attention_ops
from flagdit_kernels.ops import norms as norm_ops

LENGTHS = [5, 0, 9, 1]


def test_layout_holds_the_sample_of_every_token():
    cu = offsets_of(LENGTHS)
    layout = fk.VarlenLayout.from_cu_seqlens(cu, sum(LENGTHS))
    assert layout.max_seqlen == 9 and layout.num_seqs == 4 and layout.num_tokens == 15
    want = torch.repeat_interleave(torch.arange(4, device=DEVICE), torch.tensor(LENGTHS, device=DEVICE))
    assert torch.equal(layout.sample_index, want)
    assert layout.positions is None
    # A value type whose fields must agree: replacing fields together that still agree is fine.
    cu7 = offsets_of([5, 0, 2])
    half = dataclasses.replace(layout, cu_seqlens=cu7, sample_index=layout.sample_index[:7], max_seqlen=5)
    assert half.num_tokens == 7 and half.num_seqs == 3 and half.cu_seqlens is cu7


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cu_seqlens": offsets_of(LENGTHS).long()}, TypeError, "cu_seqlens must have dtype"),
        ({"cu_seqlens": torch.tensor([0, 6, 5, 15], dtype=torch.int32)}, ValueError, "non-decreasing"),  # CPU
        ({"num_tokens": 14}, ValueError, r"cu_seqlens\[-1\] must equal num_tokens"),
        ({"max_seqlen": 8}, ValueError, r"max_seqlen \(8\) is smaller than the longest sequence \(9\)"),
        ({"max_seqlen": -1}, ValueError, "max_seqlen must be a non-negative int"),
        ({"positions": torch.zeros(14, 3, dtype=torch.int32)}, ValueError, "positions must have one row per token"),
        ({"num_tokens": 15.0}, TypeError, "num_tokens must be an int, got float"),
        ({"num_tokens": -1}, ValueError, "num_tokens must be a non-negative int"),
    ],
)
def test_bad_layouts_name_the_argument(kwargs, error, match):
    args = {"cu_seqlens": offsets_of(LENGTHS).cpu(), "num_tokens": 15, **kwargs}  # value checks run on CPU tensors
    with pytest.raises(error, match=match):
        fk.VarlenLayout.from_cu_seqlens(**args)


STALE = torch.tensor([0] * 5 + [1] * 9 + [3], dtype=torch.int64)  # the sample index of lengths [5, 9, 0, 1]
HAND_BUILT = {
    "non-monotonic offsets": ({"cu_seqlens": torch.tensor([0, 5, 12, 3, 15], dtype=torch.int32)}, "non-decreasing"),
    "offsets ending elsewhere": ({"cu_seqlens": torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32)}, "must equal"),
    "stale sample_index": ({"sample_index": STALE}, "sample_index must hold the sample cu_seqlens gives each token"),
    "out-of-range sample_index": ({"sample_index": STALE + 4}, "sample_index must hold the sample"),
    "sample_index of another length": ({"sample_index": STALE[:12]}, r"cu_seqlens\[-1\] must equal the token count"),
    "int32 sample_index": ({"sample_index": STALE.int()}, "sample_index must have dtype in \\(int64\\)"),
    "short max_seqlen": ({"max_seqlen": 3}, r"max_seqlen \(3\) is smaller than the longest sequence \(9\)"),
    "bool max_seqlen": ({"max_seqlen": True}, "max_seqlen must be a non-negative int"),
    "huge max_seqlen": ({"max_seqlen": 2**63}, "max_seqlen must be at most"),
}


@pytest.mark.parametrize("case", HAND_BUILT)
def test_hand_built_layouts_are_checked_like_built_ones(case):
    """dataclasses.replace and the constructor run the same checks as from_cu_seqlens (values on CPU tensors),
    so no backend ever sees a layout whose fields disagree; the same error for every way of building one."""
    fields, match = HAND_BUILT[case]
    layout = fk.VarlenLayout.from_cu_seqlens(offsets_of(LENGTHS).cpu(), 15)
    with pytest.raises((ValueError, TypeError), match=match):
        dataclasses.replace(layout, **fields)
    with pytest.raises((ValueError, TypeError), match=match):
        fk.VarlenLayout(**{**dataclasses.asdict(layout), **fields})


@pytest.mark.parametrize("backend", fk.available_backends("rms_norm_modulate", DEVICE))
def test_unchecked_layouts_give_every_backend_the_offsets_result(backend, monkeypatch):
    """Where values go unchecked (GPU tensors without FLAGDIT_KERNELS_VALIDATE), a layout with a stale or
    out-of-range sample_index still gives every backend the result of its offsets: kernels derive each token's
    sample from cu_seqlens and never read sample_index."""
    from flagdit_kernels import _layout

    x, w, scale = _norm_inputs(seed=3)
    cu = offsets_of(LENGTHS)
    want = fk.rms_norm_modulate(x, w, scale, cu_seqlens=cu, backend="reference")
    monkeypatch.setattr(_layout, "values_checked", lambda device: False)
    for bad in (STALE, STALE + 4, torch.zeros(15, dtype=torch.int64)):
        layout = fk.VarlenLayout(cu, 9, bad.to(DEVICE))
        out = fk.rms_norm_modulate(x, w, scale, cu_seqlens=layout, backend=backend)
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6), backend
        res = fk.gated_residual_rms_norm(x, out, w, scale, cu_seqlens=layout, backend=backend)
        assert torch.allclose(res, fk.gated_residual_rms_norm(x, out, w, scale, cu_seqlens=cu, backend="reference"),
                              rtol=1e-5, atol=1e-6)  # fmt: skip


def _norm_inputs(seed=0):
    d = 24
    x = fresh((15, d), torch.float32, seed=seed)
    return x, fresh((d,), torch.float32, seed=seed + 1), fresh((4, d), torch.float32, seed=seed + 2)


@pytest.mark.parametrize("backend", fk.available_backends("rms_norm_modulate", DEVICE))
def test_norms_take_the_layout_for_cu_seqlens(backend):
    x, w, scale = _norm_inputs()
    cu = offsets_of(LENGTHS)
    layout = fk.VarlenLayout.from_cu_seqlens(cu, 15)
    shift = fresh(scale.shape, torch.float32, seed=7)
    for use in (cu, layout):
        out = fk.rms_norm_modulate(x, w, scale, shift, cu_seqlens=use, backend=backend)
        res = fk.gated_residual_rms_norm(x, out, w, scale, cu_seqlens=use, backend=backend)
        if use is cu:
            want = (out, res)
    assert torch.equal(out, want[0]) and torch.equal(res, want[1])


@pytest.mark.parametrize("backend", fk.available_backends("varlen_attention", DEVICE))
def test_attention_takes_layouts_for_both_offsets(backend):
    q = fresh((15, 4, 16), torch.float32, seed=10)
    k, v = fresh((15, 2, 16), torch.float32, seed=11), fresh((15, 2, 16), torch.float32, seed=12)
    text_lengths = [2, 3, 0, 1]
    tk, tv = fresh((6, 2, 16), torch.float32, seed=13), fresh((6, 2, 16), torch.float32, seed=14)
    gate = fresh((4,), torch.float32, seed=15)
    cu, text_cu = offsets_of(LENGTHS), offsets_of(text_lengths)
    raw = fk.varlen_attention(q, k, v, cu, 9, text_k=tk, text_v=tv, text_cu_seqlens=text_cu, gate=gate, backend=backend)
    seqs, text = fk.VarlenLayout.from_cu_seqlens(cu, 15), fk.VarlenLayout.from_cu_seqlens(text_cu, 6)
    out = fk.varlen_attention(q, k, v, seqs, text_k=tk, text_v=tv, text_cu_seqlens=text, gate=gate, backend=backend)
    assert torch.equal(out, raw)


def test_a_layout_of_another_batch_is_refused():
    x, w, scale = _norm_inputs()
    layout = fk.VarlenLayout.from_cu_seqlens(offsets_of([5, 0, 9, 2]), 16)
    with pytest.raises(ValueError, match=r"cu_seqlens describes 16 tokens but x.shape\[0\] is 15"):
        fk.rms_norm_modulate(x, w, scale, cu_seqlens=layout)
    q = fresh((15, 2, 16), torch.float32, seed=3)
    with pytest.raises(ValueError, match=r"cu_seqlens describes 16 tokens but q.shape\[0\] is 15"):
        fk.varlen_attention(q, q, q, layout)
    good = fk.VarlenLayout.from_cu_seqlens(offsets_of(LENGTHS), 15)
    with pytest.raises(ValueError, match=r"max_seqlen \(12\) differs from cu_seqlens.max_seqlen \(9\)"):
        fk.varlen_attention(q, q, q, good, 12)


def test_the_model_validates_offsets_once_per_batch_not_per_op(monkeypatch):
    import flagdit

    calls = []
    for module in (norm_ops, attention_ops):
        real = module.check_cu_seqlens
        monkeypatch.setattr(module, "check_cu_seqlens", lambda *a, real=real, **k: calls.append(a[0]) or real(*a, **k))
    config = flagdit.FlagDiTConfig(in_channels=3, dim=64, n_layers=2, n_heads=4, multiple_of=16, cap_feat_dim=16)
    model = flagdit.FlagDiT(config, backend="reference")
    xs = [
        fresh((3, 4, 6), torch.float32, device="cpu", seed=20),
        fresh((3, 2, 2), torch.float32, device="cpu", seed=21),
    ]
    with torch.no_grad():
        model(xs, torch.rand(2), fresh((2, 3, 16), torch.float32, device="cpu", seed=22), torch.ones(2, 3))
    assert calls == []  # the ops received VarlenLayouts checked when the model built them
