"""The flash_attn backend's composition (RoPE first, self + gated text, empty text) around flash-attn's varlen
function. flash-attn is CUDA-only, so a stand-in with its signature (per-sequence attention in PyTorch, GQA,
differentiable) takes its place; the backend function is called directly, as dispatch would on a GPU."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from support.helpers import TOLERANCE, compare_with_reference, offsets_of

import flagdit_kernels as fk
from flagdit_kernels import _dispatch
from flagdit_kernels import reference as ref
from flagdit_kernels.ops import attention_flash_attn as fa


def _stand_in(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, deterministic=False,
    return_attn_probs=False,
):  # fmt: skip
    """flash_attn_varlen_func's contract in PyTorch; NaN for queries of a sample without keys (the backend must
    not let that through). With return_attn_probs: (out, softmax_lse (H, T) fp32, None), the LSE detached as
    flash-attn's backward ignores its gradient."""
    assert dropout_p == 0.0 and not causal and q.dtype in (torch.float16, torch.bfloat16)
    assert isinstance(deterministic, bool) and cu_q.is_contiguous() and cu_k.is_contiguous()
    assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        qs, ks, vs = q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        if ks.shape[0] == 0:
            outs.append(torch.full_like(qs, float("nan")))
            lses.append(torch.full((q.shape[1], qs.shape[0]), float("nan")))
            continue
        ks, vs = ks.repeat_interleave(group, 1).float(), vs.repeat_interleave(group, 1).float()
        s = torch.einsum("qhd,khd->hqk", qs.float(), ks) * softmax_scale
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs).to(q.dtype))
        lses.append(s.logsumexp(-1))
    if return_attn_probs:
        return torch.cat(outs), torch.cat(lses, dim=1).detach(), None
    return torch.cat(outs)


@pytest.fixture
def flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = _stand_in
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    fa.flash_varlen_func.cache_clear()
    yield module
    fa.flash_varlen_func.cache_clear()


def test_listed_for_cuda_when_flash_attn_imports(flash_attn):
    assert "flash_attn" in fk.available_backends("varlen_attention", "cuda")
    assert "flash_attn" not in fk.available_backends("varlen_attention", "cpu")


def test_not_listed_without_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    fa.flash_varlen_func.cache_clear()
    try:
        assert "flash_attn" not in fk.available_backends("varlen_attention", "cuda")
        with pytest.raises(ValueError, match="flash-attn is not installed"):
            fk.varlen_attention(*[torch.zeros(1, 1, 16)] * 3, offsets_of([1], "cpu"), 1, backend="flash_attn")
    finally:
        fa.flash_varlen_func.cache_clear()


@pytest.mark.parametrize("rope", [False, True])
def test_gated_text_composition_matches_reference(flash_attn, rope):
    # GQA 4 -> 2, a sample without text (the stand-in gives NaN there), Lumina's proportional scale.
    lens, text_lens, heads, kv_heads, dim = [37, 1, 20], [5, 0, 9], 4, 2, 32
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(torch.float16)

    T, Tt = sum(lens), sum(text_lens)
    inputs = {"q": rnd(T, heads, dim), "k": rnd(T, kv_heads, dim), "v": rnd(T, kv_heads, dim)}
    inputs.update(text_k=rnd(Tt, kv_heads, dim), text_v=rnd(Tt, kv_heads, dim), gate=rnd(heads, s=0.8))
    fixed = dict(
        cu_seqlens=offsets_of(lens, "cpu"), max_seqlen=max(lens), softmax_scale=fk.proportional_scale(4096, 1024, dim),
        text_cu_seqlens=offsets_of(text_lens, "cpu"), text_max_seqlen=max(text_lens),
    )  # fmt: skip
    if rope:
        fixed["freqs"] = fk.rope_freqs(dim, torch.arange(T) % 11)

    def mine(**t):
        return fa._varlen_attention_flash_attn(**t, **fixed)

    def reference(**t):
        return ref.varlen_attention(**t, **fixed)

    compare_with_reference(mine, reference, inputs, torch.float16, family="attention")


def test_no_text_tokens_and_no_text(flash_attn):
    q, k, v = (torch.randn(12, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    cu = offsets_of([5, 7], "cpu")
    gate = torch.randn(2, requires_grad=True)
    empty = dict(text_k=k[:0], text_v=v[:0], text_cu_seqlens=offsets_of([0, 0], "cpu"), gate=gate)
    plain = fa._varlen_attention_flash_attn(q, k, v, cu, 7, 1 / math.sqrt(16))
    with_empty = fa._varlen_attention_flash_attn(q, k, v, cu, 7, 1 / math.sqrt(16), **empty)
    assert torch.equal(with_empty, plain)
    with_empty.float().sum().backward()
    assert torch.equal(gate.grad, torch.zeros_like(gate))
    expected = ref.varlen_attention(q.double(), k.double(), v.double(), cu, 7, 1 / math.sqrt(16))
    assert (plain.double() - expected).norm() / expected.norm() < TOLERANCE["attention"][torch.bfloat16]


def test_declares_half_precision_only(flash_attn):
    # The registry refuses other dtypes before the backend runs (flash-attn has no fp32 kernel).
    impl = _dispatch._OPS["varlen_attention"].impls["flash_attn"]
    assert set(impl.dtypes) == {torch.float16, torch.bfloat16}


def _assert_matches_reference(x, run, lse_rows=slice(None)):
    """``run(fn, leaves)`` (a forward and a backward) with the backend on fp16 leaves and the reference on
    float64 leaves made from ``x``: the output, the LSE at ``lse_rows`` and every leaf's gradient (finite) within
    the fp16 attention tolerance. Returns ``(lse, expected lse)`` for the test's own checks."""
    mine = {n: t.to(torch.float16).requires_grad_() for n, t in x.items()}
    exp = {n: t.clone().requires_grad_() for n, t in x.items()}
    out, lse = run(fa._varlen_attention_flash_attn, mine)
    exp_out, exp_lse = run(ref.varlen_attention, exp)
    tol = TOLERANCE["attention"][torch.float16]
    assert (out.double() - exp_out).norm() / exp_out.norm() < tol
    assert (lse[:, lse_rows].double() - exp_lse[:, lse_rows]).norm() / exp_lse[:, lse_rows].norm() < tol
    for name in x:
        g, r = mine[name].grad.double(), exp[name].grad
        assert torch.isfinite(g).all() and (g - r).norm() / r.norm() < tol, name
    return lse, exp_lse


def test_lse_and_its_gradient(flash_attn):
    # flash-attn's LSE has no gradient of its own; the backend's correction gives the reference's, GQA included.
    gen = torch.Generator().manual_seed(5)
    lens, heads, kv_heads, dim = [13, 1, 30], 4, 2, 32
    T = sum(lens)
    x = {n: torch.randn(T, h, dim, generator=gen, dtype=torch.float64) for n, h in (("q", heads), ("k", kv_heads))}
    x["v"] = torch.randn(T, kv_heads, dim, generator=gen, dtype=torch.float64)
    w_out = torch.randn(T, heads, dim, generator=gen, dtype=torch.float64)
    w_lse = torch.randn(heads, T, generator=gen, dtype=torch.float64)
    cu, freqs = offsets_of(lens, "cpu"), fk.rope_freqs(dim, torch.arange(T) % 7)

    def run(fn, leaves):
        out, lse = fn(*leaves.values(), cu, 30, 0.2, freqs=freqs, return_lse=True, deterministic=True)
        ((out.double() * w_out).sum() + (lse.double() * w_lse).sum()).backward()
        return out, lse

    lse, _ = _assert_matches_reference(x, run)
    assert lse.dtype == torch.float32 and lse.shape == (heads, T)


def test_cross_attention_with_a_sample_without_keys(flash_attn):
    # Keys packed by their own offsets (more and fewer than the queries, none for one sample: NaN from the
    # stand-in, 0 and LSE -inf from the backend), GQA 4 -> 2, a text branch; output, LSE and every gradient.
    gen = torch.Generator().manual_seed(7)
    q_lens, k_lens, heads, kv_heads, dim = [13, 4, 9], [20, 0, 3], 4, 2, 32
    shapes = {"q": (26, heads), "k": (23, kv_heads), "v": (23, kv_heads), "text_k": (5, kv_heads)}
    shapes["text_v"] = (5, kv_heads)
    x = {n: torch.randn(*s, dim, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    x["gate"] = torch.randn(heads, generator=gen, dtype=torch.float64)
    fixed = dict(
        cu_seqlens=offsets_of(q_lens, "cpu"), max_seqlen=13, softmax_scale=0.2, cu_seqlens_k=offsets_of(k_lens, "cpu")
    )
    fixed.update(max_seqlen_k=20, text_cu_seqlens=offsets_of([2, 3, 0], "cpu"), text_max_seqlen=3, return_lse=True)
    w_out = torch.randn(26, heads, dim, generator=gen, dtype=torch.float64)
    w_lse = torch.randn(heads, 26, generator=gen, dtype=torch.float64)
    finite = torch.ones(26, dtype=torch.bool)
    finite[13:17] = False

    def run(fn, leaves):
        out, lse = fn(**leaves, **fixed)
        ((out.double() * w_out).sum() + (lse[:, finite].double() * w_lse[:, finite]).sum()).backward()
        return out, lse

    lse, exp_lse = _assert_matches_reference(x, run, lse_rows=finite)
    assert torch.isneginf(lse[:, ~finite]).all() and torch.isneginf(exp_lse[:, ~finite]).all()
