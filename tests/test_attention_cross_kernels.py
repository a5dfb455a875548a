"""Varlen cross-attention in the Triton kernels (keys packed by their own offsets, ``cu_seqlens_k``) against a
float64 reference written here: per sample, softmax(q k^T s) v with its own query and key counts (0 included),
GQA, the gated text branch, forward and backward through the launchers (flagdit_kernels/triton/
varlen_attention.py), outputs poisoned. Runs under TRITON_INTERPRET=1 (fp32/fp16) and on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.helpers import (
    DEVICE,
    ON_GPU,
    TOLERANCE,
    assert_rel_close,
    compare_with_reference,
    force_warp_specialized,
    needs_triton,
    offsets_of,
)

pytestmark = needs_triton


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of (Lq, H, D) queries over (Lk, Hkv, D) keys, GQA by repeating kv heads; no keys: 0, -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    lse = torch.logsumexp(s, -1)  # -inf over zero keys
    p = torch.exp(s - lse[..., None]) if k.shape[0] else s
    return torch.einsum("hqk,khd->qhd", p, v), lse


def reference(q, k, v, text_k, text_v, gate, *, cu, cu_k, text_cu, scale):
    """float64 cross-attention plus Lumina's gated text branch, sample by sample; returns (out, lse (H, T))."""
    outs, lses = [], []
    text_scale = 1.0 / math.sqrt(q.shape[-1])
    for b in range(len(cu) - 1):
        qb = q[cu[b] : cu[b + 1]]
        out, lse = _attend(qb, k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]], scale)
        if text_k is not None and text_cu[b + 1] > text_cu[b]:  # a sample without text adds exactly 0
            t = slice(text_cu[b], text_cu[b + 1])
            out = out + torch.tanh(gate).view(1, -1, 1) * _attend(qb, text_k[t], text_v[t], text_scale)[0]
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


class _Launchers(torch.autograd.Function):
    """The launchers' forward and backward as one autograd node (the ops layer does the same for the public API)."""

    @staticmethod
    def forward(ctx, q, k, v, text_k, text_v, tanh_gate, cu, cu_k, text_cu, scale, deterministic):
        from flagdit_kernels.triton.attention import launch as va
        from flagdit_kernels.triton.attention.problem import Problem

        max_q, max_k = int((cu[1:] - cu[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
        problem = Problem(q, k, v, cu, max_q, scale, text_k, text_v, text_cu, tanh_gate, None, cu_k, max_k)
        out, o_text, lse, lse_t, _, _, _ = va.forward(problem)
        ctx.save_for_backward(q, k, v, text_k, text_v, tanh_gate, cu, cu_k, text_cu, out, o_text, lse, lse_t)
        ctx.args = (max_q, max_k, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from flagdit_kernels.triton.attention import launch as va
        from flagdit_kernels.triton.attention.problem import Problem

        q, k, v, text_k, text_v, tanh_gate, cu, cu_k, text_cu, out, o_text, lse, lse_t = ctx.saved_tensors
        max_q, max_k, scale, deterministic = ctx.args
        problem = Problem(q, k, v, cu, max_q, scale, text_k, text_v, text_cu, tanh_gate, None, cu_k, max_k)
        dq, dk, dv, dtk, dtv, dtg = va.backward(problem, dout, None, out, o_text, lse, lse_t, deterministic)
        return dq, dk, dv, dtk, dtv, dtg, None, None, None, None, None


def _case(lens_q, lens_k, text_lens, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    T, Tk = sum(lens_q), sum(lens_k)
    inputs = {"q": rnd(T, heads, head_dim), "k": rnd(Tk, kv_heads, head_dim), "v": rnd(Tk, kv_heads, head_dim)}
    offsets = {"cu": offsets_of(lens_q), "cu_k": offsets_of(lens_k), "text_cu": None}
    if text_lens is not None:
        Tt = sum(text_lens)
        inputs.update(text_k=rnd(Tt, kv_heads, head_dim), text_v=rnd(Tt, kv_heads, head_dim), gate=rnd(heads, s=0.8))
        offsets["text_cu"] = offsets_of(text_lens)
    return inputs, offsets


def _mine(offsets, scale, deterministic):
    def run(q, k, v, text_k=None, text_v=None, gate=None):
        tg = None if gate is None else torch.tanh(gate.float())
        return _Launchers.apply(q, k, v, text_k, text_v, tg, offsets["cu"], offsets["cu_k"], offsets["text_cu"],
                                scale, deterministic)[0]  # fmt: skip

    return run


def _ref(offsets, scale):
    text_cu = None if offsets["text_cu"] is None else offsets["text_cu"].tolist()

    def run(q, k, v, text_k=None, text_v=None, gate=None):
        return reference(q, k, v, text_k, text_v, gate, cu=offsets["cu"].tolist(), cu_k=offsets["cu_k"].tolist(),
                         text_cu=text_cu, scale=scale)[0]  # fmt: skip

    return run


# Different query and key counts per sample: a sample with keys but no queries (its dk, dv are exactly 0), one
# with queries but no keys (self part 0, never NaN), tails of two 32-row tiles, more keys than queries overall.
LENS_Q = [13, 0, 7, 40, 5]
LENS_K = [9, 6, 0, 37, 70]
TEXT = [3, 2, 4, 0, 5]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_attention_gqa_text_matches_reference(dtype, deterministic):
    inputs, offsets = _case(LENS_Q, LENS_K, TEXT, 4, 2, 32, dtype)
    scale = 0.9 / math.sqrt(32)
    compare_with_reference(_mine(offsets, scale, deterministic), _ref(offsets, scale), inputs, dtype,
                           family="attention")  # fmt: skip


@pytest.mark.parametrize(("head_dim", "dtype"), [(72, torch.float32), (24, torch.float16)])
def test_cross_attention_self_only_two_chunk_head_dims(head_dim, dtype):
    # No text; head dims run as two column chunks (72 = 64 + 16, 24 = 16 + 16); MQA (one kv head); int64 key
    # offsets (repaired to int32 on the device with the query offsets).
    inputs, offsets = _case([33, 1, 0], [5, 64, 3], None, 3, 1, head_dim, dtype, seed=1)
    offsets["cu_k"] = offsets["cu_k"].long()
    scale = 1 / math.sqrt(head_dim)
    compare_with_reference(_mine(offsets, scale, False), _ref(offsets, scale), inputs, dtype, family="attention")


def test_cross_attention_lse_and_zero_key_samples():
    dtype = torch.float32
    inputs, offsets = _case(LENS_Q, LENS_K, TEXT, 2, 2, 32, dtype, seed=2)
    scale = 1 / math.sqrt(32)
    t = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
    tg = torch.tanh(t["gate"].float())
    out, lse = _Launchers.apply(t["q"], t["k"], t["v"], t["text_k"], t["text_v"], tg, offsets["cu"],
                                offsets["cu_k"], offsets["text_cu"], scale, False)  # fmt: skip
    r = {n: x.detach().double() for n, x in inputs.items()}
    expected, expected_lse = reference(r["q"], r["k"], r["v"], r["text_k"], r["text_v"], r["gate"],
                                       cu=offsets["cu"].tolist(), cu_k=offsets["cu_k"].tolist(),
                                       text_cu=offsets["text_cu"].tolist(), scale=scale)  # fmt: skip
    no_keys = slice(13, 20)  # sample 2: 7 queries, 0 keys, 4 text tokens
    assert torch.equal(lse[:, no_keys], torch.full_like(lse[:, no_keys], float("-inf")))
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_rel_close(lse[finite], expected_lse[finite], TOLERANCE["attention"][dtype], "lse")
    assert_rel_close(out, expected, TOLERANCE["attention"][dtype])
    # Self part exactly 0 there: the output is the gated text branch alone, and q's gradient comes from it only.
    out[no_keys].sum().backward()
    assert torch.isfinite(t["q"].grad).all()
    assert torch.equal(t["k"].grad, torch.zeros_like(t["k"].grad))  # no key is seen by these queries
    assert torch.equal(t["v"].grad, torch.zeros_like(t["v"].grad))


def test_cross_attention_no_key_at_all_and_rope_refused():
    from flagdit_kernels.triton.attention import launch as va
    from flagdit_kernels.triton.attention.problem import Problem

    dtype = torch.float16
    inputs, offsets = _case([9, 4], [0, 0], [2, 0], 2, 1, 32, dtype, seed=3)
    scale = 1 / math.sqrt(32)
    compare_with_reference(_mine(offsets, scale, False), _ref(offsets, scale), inputs, dtype, family="attention")
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    with pytest.raises(ValueError, match="freqs"):
        va.forward(Problem(q, k, v, offsets["cu"], 9, scale, freqs=torch.ones(13, 16, 2, device=DEVICE),
                           cu_seqlens_k=offsets["cu_k"]))  # fmt: skip
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        va.forward(Problem(q, k, v, offsets["cu"], 9, scale, cu_seqlens_k=offsets["cu_k"][:2]))


def test_cross_attention_through_the_warp_specialized_forward(monkeypatch):
    # The WS shapes (descriptor loads, counted bisection, idle programs without an early return) with keys by
    # their own offsets, 0 included: the forward and the backward's dk/dv and dq kernels, forced as the only tiles
    # (warp_specialize itself acts on sm_90 only).
    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized tiles are offered on sm_90 only")
    force_warp_specialized(monkeypatch)
    dtype = torch.float16
    inputs, offsets = _case(LENS_Q, LENS_K, TEXT, 4, 2, 32, dtype, seed=4)
    scale = 1 / math.sqrt(32)
    compare_with_reference(_mine(offsets, scale, False), _ref(offsets, scale), inputs, dtype, family="attention")
