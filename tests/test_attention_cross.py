"""``varlen_attention(..., cu_seqlens_k=..., max_seqlen_k=...)``: packed cross-attention, keys packed by their own
offsets (any length per sample, 0 included), on every backend this machine runs, against float64 math written
here; the 0-keys contract (output 0, LSE -inf); input validation naming the argument.

The Triton backend's cross path needs launchers that take ``cu_seqlens_k`` (flagdit_kernels/triton/
varlen_attention.py); its cases are skipped, saying so, while the launchers do not.
"""

from __future__ import annotations

import pytest
import torch
from support.cross_attention import cross_attention_math, launchers_take_key_offsets
from support.helpers import (
    DEVICE,
    DOT_DTYPES,
    INTERPRETED,
    ON_GPU,
    TOLERANCE,
    assert_rel_close,
    compare_with_reference,
    offsets_of,
)

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

TRITON_CROSS = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not (ON_GPU or INTERPRETED) or not launchers_take_key_offsets(),
        reason="needs triton on a GPU or TRITON_INTERPRET=1, and launchers that take cu_seqlens_k",
    ),
)
BACKENDS = ["reference", TRITON_CROSS]


def _rnd(gen, *shape, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def test_reference_matches_the_definition_with_empty_key_and_query_samples():
    # GQA 4 -> 2; samples with 0 keys, 0 queries, more keys than queries and fewer; a text branch on top.
    gen = torch.Generator().manual_seed(0)
    q_lens, k_lens, t_lens = [5, 3, 0, 9, 1], [7, 0, 4, 2, 11], [2, 3, 1, 0, 4]
    q, k, v = _rnd(gen, 18, 4, 16), _rnd(gen, 24, 2, 16), _rnd(gen, 24, 2, 16)
    tk, tv, gate = _rnd(gen, 10, 2, 16), _rnd(gen, 10, 2, 16), _rnd(gen, 4)
    out, lse = fk.varlen_attention(
        q, k, v, offsets_of(q_lens), 9, 0.3, cu_seqlens_k=offsets_of(k_lens), max_seqlen_k=11, return_lse=True,
        text_k=tk, text_v=tv, text_cu_seqlens=offsets_of(t_lens), gate=gate, backend="reference",
    )  # fmt: skip
    exp_out, exp_lse = cross_attention_math(q, k, v, q_lens, k_lens, 0.3, (tk, tv, t_lens, gate))
    assert out.dtype == lse.dtype == torch.float64 and lse.shape == (4, 18)
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-12, atol=1e-12)
    assert torch.isneginf(lse[:, 5:8]).all()  # the sample without keys
    # Without text, the empty-key sample's rows are exactly 0.
    bare = fk.varlen_attention(q, k, v, offsets_of(q_lens), 9, 0.3, cu_seqlens_k=offsets_of(k_lens), max_seqlen_k=11)
    assert torch.count_nonzero(bare[5:8]) == 0


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    q_lens, k_lens = [3, 2, 2], [4, 0, 1]
    q, k, v = (_rnd(gen, *s).requires_grad_() for s in ((7, 2, 16), (5, 1, 16), (5, 1, 16)))

    def fn(q, k, v):
        out, lse = ref.varlen_attention(
            q, k, v, offsets_of(q_lens), 3, 0.4, cu_seqlens_k=offsets_of(k_lens), max_seqlen_k=4, return_lse=True
        )
        return out, lse[:, :3], lse[:, 5:]  # the finite LSEs (the empty sample's are constant -inf)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_equal_offsets_are_self_attention():
    gen = torch.Generator().manual_seed(2)
    lens = [6, 1, 9]
    q, k, v = _rnd(gen, 16, 2, 16), _rnd(gen, 16, 2, 16), _rnd(gen, 16, 2, 16)
    cu = offsets_of(lens)
    layout = fk.VarlenLayout.from_cu_seqlens(cu, 16, 9)
    cross = fk.varlen_attention(q, k, v, cu, 9, cu_seqlens_k=layout, backend="reference")  # a layout for keys
    assert torch.equal(cross, fk.varlen_attention(q, k, v, cu, 9, backend="reference"))


def _cross_case(dtype, seed=0):
    # GQA 4 -> 2, Dh 48; query lengths 37, 1, 0, 20 against key lengths 5, 0, 3, 70 (more keys than queries,
    # a sample without keys, keys of a sample without queries); a text branch with a sample without text.
    gen = torch.Generator().manual_seed(seed)
    q_lens, k_lens, t_lens, heads, kv_heads, dim = [37, 1, 0, 20], [5, 0, 3, 70], [2, 4, 0, 0], 4, 2, 48
    inputs = {"q": _rnd(gen, sum(q_lens), heads, dim, dtype=dtype)}
    inputs.update(k=_rnd(gen, sum(k_lens), kv_heads, dim, dtype=dtype), v=_rnd(gen, sum(k_lens), kv_heads, dim,
                  dtype=dtype))  # fmt: skip
    inputs.update(text_k=_rnd(gen, 6, kv_heads, dim, dtype=dtype), text_v=_rnd(gen, 6, kv_heads, dim, dtype=dtype))
    inputs["gate"] = _rnd(gen, heads, dtype=dtype) * 0.8
    fixed = dict(cu_seqlens=offsets_of(q_lens), max_seqlen=37, softmax_scale=0.19, cu_seqlens_k=offsets_of(k_lens))
    fixed.update(max_seqlen_k=70, text_cu_seqlens=offsets_of(t_lens), text_max_seqlen=4)
    return inputs, fixed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_backends_match_the_reference(backend, dtype):
    inputs, fixed = _cross_case(dtype)

    def mine(**t):
        return fk.varlen_attention(**t, **fixed, return_lse=True, backend=backend)

    def reference(**t):
        out, lse = ref.varlen_attention(**t, **fixed, return_lse=True)
        return out, lse

    # The LSE of the sample without keys is -inf on both sides: compare the finite rows, and the -inf exactly.
    _, lse = mine(**inputs)
    assert torch.isneginf(lse[:, 37:38]).all() and torch.isfinite(lse[:, :37]).all()

    def finite_lse(fn):
        def call(**t):
            out, lse = fn(**t)  # the LSE in the output's dtype, as the harness compares outputs
            return out, torch.cat([lse[:, :37], lse[:, 38:]], dim=1).to(out.dtype)

        return call

    compare_with_reference(finite_lse(mine), finite_lse(reference), inputs, dtype, family="attention")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_keys_everywhere_and_deterministic(backend):
    gen = torch.Generator().manual_seed(3)
    q = _rnd(gen, 9, 2, 16, dtype=torch.float32).requires_grad_()
    k = _rnd(gen, 0, 1, 16, dtype=torch.float32).requires_grad_()
    v = _rnd(gen, 0, 1, 16, dtype=torch.float32).requires_grad_()
    out, lse = fk.varlen_attention(
        q, k, v, offsets_of([4, 5]), 5, cu_seqlens_k=offsets_of([0, 0]), max_seqlen_k=0, return_lse=True,
        deterministic=True, backend=backend,
    )  # fmt: skip
    assert torch.count_nonzero(out) == 0 and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.count_nonzero(q.grad) == 0 and k.grad.shape == (0, 1, 16)


def _good(**over):
    gen = torch.Generator().manual_seed(4)
    args = dict(q=_rnd(gen, 7, 4, 16, dtype=torch.float32), k=_rnd(gen, 5, 2, 16, dtype=torch.float32))
    args.update(v=_rnd(gen, 5, 2, 16, dtype=torch.float32), cu_seqlens=offsets_of([4, 3]), max_seqlen=4)
    args.update(cu_seqlens_k=offsets_of([2, 3]), max_seqlen_k=3)
    args.update(over)
    return args


def test_good_inputs_pass():
    assert fk.varlen_attention(**_good(), backend="reference").shape == (7, 4, 16)


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        ({"cu_seqlens_k": offsets_of([2, 2, 1])}, ValueError, "cu_seqlens_k must have 3 entries like cu_seqlens"),
        ({"cu_seqlens_k": offsets_of([2, 2])}, ValueError, r"cu_seqlens_k\[-1\] must equal k.shape\[0\] \(5\)"),
        ({"cu_seqlens_k": offsets_of([2, 3]).long()}, TypeError, "cu_seqlens_k must have dtype"),
        ({"cu_seqlens_k": torch.tensor([0, 4, 3, 5], dtype=torch.int32)[1:]}, ValueError, "must start at 0"),
        ({"max_seqlen_k": None}, ValueError, "max_seqlen_k must be a non-negative int"),
        ({"max_seqlen_k": 2}, ValueError, r"max_seqlen_k \(2\) is smaller than the longest sequence"),
        (
            {"cu_seqlens_k": None, "k": torch.randn(7, 2, 16), "v": torch.randn(7, 2, 16)},
            ValueError,
            "max_seqlen_k is given without cu_seqlens_k",
        ),
        ({"cu_seqlens_k": None, "max_seqlen_k": None}, ValueError, r"k must be \(T, Hkv, Dh\) = \(7"),
        ({"k": torch.randn(5, 2, 8), "v": torch.randn(5, 2, 8)}, ValueError, r"k must be \(T, Hkv, Dh\) = \(Tk"),
        ({"freqs": torch.randn(7, 8, 2)}, ValueError, "freqs .RoPE. is only supported for self-attention"),
    ],
)
def test_bad_inputs(over, error, match):
    with pytest.raises(error, match=match):
        fk.varlen_attention(**_good(**over), backend="reference")


def test_layout_for_keys_must_describe_k():
    layout = fk.VarlenLayout.from_cu_seqlens(offsets_of([1, 3]), 4, 3)
    with pytest.raises(ValueError, match=r"cu_seqlens_k describes 4 tokens but k.shape\[0\] is 5"):
        fk.varlen_attention(**_good(cu_seqlens_k=layout, max_seqlen_k=None), backend="reference")
    assert_rel_close(
        fk.varlen_attention(
            **_good(cu_seqlens_k=fk.VarlenLayout.from_cu_seqlens(offsets_of([2, 3]), 5, 3), max_seqlen_k=None),
            backend="reference",
        ),
        fk.varlen_attention(**_good(), backend="reference"),
        TOLERANCE["attention"][torch.float32],
    )
