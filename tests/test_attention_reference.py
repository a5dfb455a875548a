"""The varlen attention reference against an independent formulation, float64 gradcheck, and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.helpers import offsets_of, rel_l2

import flagdit_kernels as fk
from flagdit_kernels import reference as ref


def _lumina_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Lumina-T2X's apply_rotary_emb: adjacent pairs as complex numbers times exp(i * angle)."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    cis = torch.view_as_complex(freqs.to(x.dtype).contiguous()).unsqueeze(1)  # (T, 1, Dh/2)
    return torch.view_as_real(xc * cis).flatten(-2)


def _independent(q, k, v, lens, scale, text_k=None, text_v=None, text_lens=None, gate=None, freqs=None):
    """Per sequence: SDPA for self-attention, SDPA for the text keys, tanh(gate) per head, added."""
    if freqs is not None:
        q, k = _lumina_rope(q, freqs), _lumina_rope(k, freqs)
    outs, start, t_start = [], 0, 0
    for b, L in enumerate(lens):
        qb = q[start : start + L].transpose(0, 1)  # (H, L, Dh)
        kb, vb = k[start : start + L].transpose(0, 1), v[start : start + L].transpose(0, 1)
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)
        if text_k is not None and text_lens[b] > 0:
            tk = text_k[t_start : t_start + text_lens[b]].transpose(0, 1)
            tv = text_v[t_start : t_start + text_lens[b]].transpose(0, 1)
            ot = F.scaled_dot_product_attention(qb, tk, tv, enable_gqa=True)  # default scale 1/sqrt(Dh)
            o = o + torch.tanh(gate).view(-1, 1, 1) * ot
        outs.append(o.transpose(0, 1))
        start += L
        t_start += text_lens[b] if text_lens is not None else 0
    return torch.cat(outs)


def _inputs(lens, text_lens, heads, kv_heads, head_dim, dtype=torch.float64, requires_grad=False):
    T, Tt = sum(lens), sum(text_lens)
    shapes = {
        "q": (T, heads, head_dim),
        "k": (T, kv_heads, head_dim),
        "v": (T, kv_heads, head_dim),
        "text_k": (Tt, kv_heads, head_dim),
        "text_v": (Tt, kv_heads, head_dim),
        "gate": (heads,),
    }
    return {n: torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for n, s in shapes.items()}


@pytest.mark.parametrize("rope", [False, True])
def test_reference_matches_per_sequence_sdpa_with_gated_text(rope):
    lens, text_lens = [7, 1, 0, 13], [3, 0, 2, 5]
    x = _inputs(lens, text_lens, 4, 2, 24)
    freqs = fk.rope_freqs(24, torch.cat([torch.arange(n) for n in lens])) if rope else None
    scale = fk.proportional_scale(4096, 256, 24)
    out = ref.varlen_attention(
        x["q"], x["k"], x["v"], offsets_of(lens, "cpu"), 13, scale, text_k=x["text_k"], text_v=x["text_v"],
        text_cu_seqlens=offsets_of(text_lens, "cpu"), gate=x["gate"], freqs=freqs,
    )  # fmt: skip
    expected = _independent(x["q"], x["k"], x["v"], lens, scale, x["text_k"], x["text_v"], text_lens, x["gate"], freqs)
    assert out.dtype == torch.float64
    assert rel_l2(out, expected) < 1e-12


def test_reference_without_text_and_empty_text_is_plain_attention():
    lens = [5, 9]
    x = _inputs(lens, [0, 0], 2, 2, 16)
    cu = offsets_of(lens, "cpu")
    plain = ref.varlen_attention(x["q"], x["k"], x["v"], cu, 9)
    assert rel_l2(plain, _independent(x["q"], x["k"], x["v"], lens, 0.25)) < 1e-12
    no_text = ref.varlen_attention(
        x["q"], x["k"], x["v"], cu, 9, text_k=x["text_k"], text_v=x["text_v"],
        text_cu_seqlens=offsets_of([0, 0], "cpu"), gate=x["gate"],
    )  # fmt: skip
    assert torch.isfinite(no_text).all()
    assert torch.equal(no_text, plain)


def test_reference_gradcheck_float64():
    lens, text_lens = [3, 2], [2, 1]
    x = _inputs(lens, text_lens, 2, 1, 16, requires_grad=True)
    freqs = fk.rope_freqs(16, torch.arange(5))
    cu, tcu = offsets_of(lens, "cpu"), offsets_of(text_lens, "cpu")

    def fn(q, k, v, text_k, text_v, gate):
        return ref.varlen_attention(
            q, k, v, cu, 3, 0.4, text_k=text_k, text_v=text_v, text_cu_seqlens=tcu, gate=gate, freqs=freqs
        )

    assert torch.autograd.gradcheck(fn, tuple(x.values()), fast_mode=True)


def test_proportional_scale():
    assert math.isclose(fk.proportional_scale(4096, 1024, 128), math.sqrt(math.log(4096, 1024) / 128))
    with pytest.raises(ValueError, match="base_seqlen"):
        fk.proportional_scale(4096, 1, 128)


# ---------------------------------------------------------------------------------------------------------------
# Validation (fk.varlen_attention checks before any backend runs)
# ---------------------------------------------------------------------------------------------------------------


def _good(**over):
    lens, text_lens = [4, 3], [2, 1]
    args = dict(_inputs(lens, text_lens, 4, 2, 16, dtype=torch.float32))
    args.update(cu_seqlens=offsets_of(lens, "cpu"), max_seqlen=4, text_cu_seqlens=offsets_of(text_lens, "cpu"))
    args.update(over)
    return args


def _call(args):
    args = dict(args)
    q, k, v, cu, m = (args.pop(n) for n in ("q", "k", "v", "cu_seqlens", "max_seqlen"))
    return fk.varlen_attention(q, k, v, cu, m, backend="reference", **args)


def test_good_inputs_pass():
    assert _call(_good()).shape == (7, 4, 16)


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        ({"k": torch.randn(7, 3, 16), "v": torch.randn(7, 3, 16)}, ValueError, "multiple of k/v heads"),
        ({"k": torch.randn(7, 2, 8), "v": torch.randn(7, 2, 8)}, ValueError, "k must be"),
        ({"v": torch.randn(7, 1, 16)}, ValueError, "same shape"),
        ({"k": torch.randn(7, 2, 16, dtype=torch.float64)}, TypeError, "k has dtype"),
        ({"cu_seqlens": torch.tensor([0, 4, 7])}, TypeError, "cu_seqlens must have dtype"),
        ({"cu_seqlens": torch.tensor([1, 4, 7], dtype=torch.int32)}, ValueError, "must start at 0"),
        ({"cu_seqlens": torch.tensor([0, 5, 4, 7], dtype=torch.int32)}, ValueError, "non-decreasing"),
        ({"cu_seqlens": torch.tensor([0, 4, 6], dtype=torch.int32)}, ValueError, r"cu_seqlens\[-1\] must equal"),
        ({"max_seqlen": 3}, ValueError, "smaller than the longest sequence"),
        ({"max_seqlen": 4.0}, ValueError, "max_seqlen must be a non-negative int"),
        ({"gate": torch.randn(2)}, ValueError, "gate must have shape"),
        ({"gate": None}, ValueError, "must be given together"),
        ({"text_v": None}, ValueError, "must be given together"),
        ({"text_k": torch.randn(3, 4, 16)}, ValueError, "text_k must be"),
        ({"text_v": torch.randn(4, 2, 16)}, ValueError, "text_v has 4 tokens"),
        ({"text_cu_seqlens": torch.tensor([0, 3], dtype=torch.int32)}, ValueError, "text_cu_seqlens must have 3"),
        ({"text_cu_seqlens": torch.tensor([0, 2, 2], dtype=torch.int32)}, ValueError, r"text_cu_seqlens\[-1\]"),
        ({"text_max_seqlen": 1}, ValueError, "text_max_seqlen .1. is smaller"),
        ({"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a number"),
        ({"softmax_scale": -0.1}, ValueError, r"softmax_scale must be a finite number in \[0, 10000\]"),
        ({"softmax_scale": float("nan")}, ValueError, r"softmax_scale must be a finite number in \[0, 10000\]"),
        ({"freqs": torch.randn(7, 4, 2)}, ValueError, "freqs must have shape"),
    ],
)
def test_bad_inputs(over, error, match):
    with pytest.raises(error, match=match):
        _call(_good(**over))


@pytest.mark.parametrize("head_dim", [264, 20, 8])
def test_bad_head_dim(head_dim):
    lens = [4, 3]
    q, k = torch.randn(7, 2, head_dim), torch.randn(7, 2, head_dim)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        fk.varlen_attention(q, k, k.clone(), offsets_of(lens, "cpu"), 4)
