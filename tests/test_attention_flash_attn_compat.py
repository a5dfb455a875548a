"""``flagdit_kernels.flash_attn_compat`` checked the way flash-attn's own tests check flash-attn: random padding
masks, inputs unpadded with ``unpad_input``, outputs padded back with ``pad_input``, compared with a dense
attention reference computed two ways, in fp32 (upcast) and in the inputs' dtype (what plain PyTorch gives);
the error must stay within twice PyTorch's own (the criterion flash-attn's tests use). The reference is written
here; it follows the definition, not flash-attn's code."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from support.helpers import DEVICE

import flagdit_kernels.flash_attn_compat as fa
from flagdit_kernels.flash_attn_compat import bert_padding

DTYPES = [torch.float16, torch.float32]


def _padding_mask(max_len: int, batch: int, gen: torch.Generator, mode: str) -> torch.Tensor:
    """(B, S) bool, True on each row's first ``length`` tokens: full rows, random lengths or a third empty."""
    if mode == "full":
        lengths = torch.full((batch,), max_len)
    else:
        lengths = torch.randint(max(1, max_len - 20), max_len + 1, (batch,), generator=gen)
        if mode == "with_empty":
            lengths[::3] = 0
    return (torch.arange(max_len)[None, :] < lengths[:, None]).to(DEVICE)


def _attention_ref(q, k, v, query_mask, key_mask, scale, upcast=True):
    """Dense attention ``(B, S, H, D)`` from the definition: masked keys excluded (a row without any key gives
    0), padded query rows 0, GQA by repeating key heads; in fp32 (``upcast``) or the inputs' dtype."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys: 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq), -inf without keys
    return out.masked_fill(~query_mask[:, :, None, None], 0.0).to(dtype), lse


def _inputs(batch, q_len, k_len, heads, kv_heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()

    return rnd(batch, q_len, heads, dim), rnd(batch, k_len, kv_heads, dim), rnd(batch, k_len, kv_heads, dim), gen


def _check(out, out_ref, out_pt, what):
    err, pt_err = (out.float() - out_ref.float()).abs().max(), (out_pt.float() - out_ref.float()).abs().max()
    assert torch.isfinite(out).all(), what
    assert err <= 2 * pt_err + 1e-5, f"{what}: max error {err:.3g} > 2 x PyTorch's {pt_err:.3g}"


VARLEN_CASES = [  # (packing, mha_type, dim, q_len, k_len, mode): flash-attn's grid, thinned for the CPU
    ("none", "mha", 32, 37, 37, "random"),
    ("none", "gqa", 72, 19, 53, "with_empty"),
    ("none", "mqa", 32, 1, 29, "random"),
    ("none", "gqa", 32, 40, 1, "with_empty"),
    ("kv", "mha", 72, 37, 37, "with_empty"),
    ("kv", "gqa", 32, 19, 53, "random"),
    ("kv", "mqa", 72, 40, 1, "random"),
    ("qkv", "mha", 32, 37, 37, "random"),
    ("qkv", "mha", 72, 29, 29, "with_empty"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("packing", "mha_type", "dim", "q_len", "k_len", "mode"), VARLEN_CASES, ids=str)
def test_varlen_output_and_gradients(dtype, mha_type, packing, dim, q_len, k_len, mode):
    heads, kv_heads = 4, {"mha": 4, "gqa": 2, "mqa": 1}[mha_type]
    q, k, v, gen = _inputs(3, q_len, k_len, heads, kv_heads, dim, dtype, seed=q_len * 7 + k_len)
    query_mask = _padding_mask(q_len, 3, gen, mode)
    key_mask = query_mask if packing == "qkv" else _padding_mask(k_len, 3, gen, mode)
    q_rows, q_index, cu_q, max_q, _ = bert_padding.unpad_input(q, query_mask)
    k_rows, k_index, cu_k, max_k, _ = bert_padding.unpad_input(k, key_mask)
    v_rows = bert_padding.index_first_axis(v.reshape(-1, kv_heads, dim), k_index)
    if packing == "qkv":
        out_rows, lse, none = fa.flash_attn_varlen_qkvpacked_func(
            torch.stack([q_rows, k_rows, v_rows], dim=1), cu_q, max_q, return_attn_probs=True
        )
    elif packing == "kv":
        out_rows, lse, none = fa.flash_attn_varlen_kvpacked_func(
            q_rows, torch.stack([k_rows, v_rows], dim=1), cu_q, cu_k, max_q, max_k, 0.0, return_attn_probs=True
        )
    else:
        out_rows, lse, none = fa.flash_attn_varlen_func(
            q_rows, k_rows, v_rows, cu_q, cu_k, max_q, max_k, 0.0, None, False, return_attn_probs=True
        )
    assert none is None and lse.dtype == torch.float32 and lse.shape == (heads, q_rows.shape[0])
    out = bert_padding.pad_input(out_rows, q_index, 3, q_len)
    scale = 1 / math.sqrt(dim)  # flash-attn's default softmax_scale
    out_ref, lse_ref = _attention_ref(q, k, v, query_mask, key_mask, scale)
    out_pt, _ = _attention_ref(q, k, v, query_mask, key_mask, scale, upcast=False)
    _check(out, out_ref, out_pt, "output")
    # The LSE of each real query row: finite where its sample has keys, -inf where it has none.
    lse_rows = lse_ref.transpose(1, 2).reshape(-1, heads)[query_mask.flatten()].T
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_rows))
    finite = torch.isfinite(lse_rows)
    torch.testing.assert_close(lse[finite], lse_rows[finite].float(), rtol=1e-4, atol=1e-4)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), upstream)
    grads_pt = torch.autograd.grad(out_pt, (q, k, v), upstream)
    for name, g, r, p in zip("qkv", grads, grads_ref, grads_pt):
        _check(g, r, p, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("packing", "q_len", "k_len"), [("none", 33, 33), ("none", 17, 40), ("kv", 17, 40),
                                                         ("qkv", 33, 33)])  # fmt: skip
def test_dense_output_lse_and_gradients(dtype, packing, q_len, k_len):
    kv_heads = 4 if packing == "qkv" else 2
    q, k, v, gen = _inputs(2, q_len, k_len, 4, kv_heads, 48, dtype, seed=q_len + k_len)
    scale = 0.23
    if packing == "qkv":
        out, lse, _ = fa.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), 0.0, scale, return_attn_probs=True)
    elif packing == "kv":
        out, lse, _ = fa.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), softmax_scale=scale,
                                                  return_attn_probs=True)  # fmt: skip
    else:
        out, lse, _ = fa.flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    everything = torch.ones(2, q_len, dtype=torch.bool, device=DEVICE)
    keys = torch.ones(2, k_len, dtype=torch.bool, device=DEVICE)
    out_ref, lse_ref = _attention_ref(q, k, v, everything, keys, scale)
    out_pt, _ = _attention_ref(q, k, v, everything, keys, scale, upcast=False)
    assert out.shape == q.shape and lse.shape == (2, 4, q_len)
    _check(out, out_ref, out_pt, "output")
    torch.testing.assert_close(lse, lse_ref.float(), rtol=1e-4, atol=1e-4)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    for name, g, r, p in zip(
        "qkv",
        torch.autograd.grad(out, (q, k, v), upstream),
        torch.autograd.grad(out_ref, (q, k, v), upstream),
        torch.autograd.grad(out_pt, (q, k, v), upstream),
    ):
        _check(g, r, p, f"grad {name}")
    assert torch.equal(fa.flash_attn_func(q, k, v, softmax_scale=scale), out)  # without return_attn_probs


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("dropout_p", 0.1),
        ("causal", True),
        ("window_size", (128, 128)),
        ("softcap", 30.0),
        ("alibi_slopes", torch.ones(2)),
        ("block_table", torch.zeros(1, 1, dtype=torch.int32)),
    ],
)
def test_unsupported_arguments_raise_naming_them(argument, value):
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=argument):
        fa.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, **{argument: value})
    if argument != "block_table":
        with pytest.raises(NotImplementedError, match=argument):
            fa.flash_attn_func(q[None], q[None], q[None], **{argument: value})


def test_bert_padding_round_trip_and_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 2, 4, generator=gen, requires_grad=True)
    mask = _padding_mask(7, 3, gen, "with_empty")
    rows, indices, cu, max_len, used = bert_padding.unpad_input(x, mask)
    lengths = mask.sum(1)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert max_len == int(lengths.max()) and isinstance(max_len, int) and used.tolist() == lengths.tolist()
    assert torch.equal(rows, x[mask]) and torch.equal(indices, mask.flatten().nonzero().flatten())
    back = bert_padding.pad_input(rows, indices, 3, 7)
    assert torch.equal(back, x * mask[:, :, None, None])
    (back * 2).sum().backward()
    assert torch.equal(x.grad, 2.0 * mask[:, :, None, None].expand_as(x))
    # unused_mask: kept in the rows, not counted as used.
    unused = torch.zeros_like(mask)
    unused[0, -1] = True  # row 0 is empty (every third row is in this mode)
    rows2, _, cu2, _, used2 = bert_padding.unpad_input(x, mask, unused)
    assert rows2.shape[0] == rows.shape[0] + 1 and cu2[1] == 1 and used2.tolist() == used.tolist()


def test_one_line_swap_by_module_aliasing(monkeypatch):
    import flagdit_kernels.flash_attn_compat as compat

    monkeypatch.setitem(sys.modules, "flash_attn", compat)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", compat.bert_padding)
    from flash_attn import flash_attn_varlen_func
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input

    assert flash_attn_varlen_func is fa.flash_attn_varlen_func
    assert (index_first_axis, pad_input, unpad_input) == (
        bert_padding.index_first_axis,
        bert_padding.pad_input,
        bert_padding.unpad_input,
    )


def test_a_lumina_next_style_call_by_keyword_matches_its_sdpa_path():
    # Lumina-Next's attention (written here from its call pattern): padded (B, L, H, D) tokens with a key/query
    # padding mask, unpadded by index_first_axis with one offsets tensor for queries and keys, attended by
    # keyword, padded back; in fp16 it must match its own fp32 SDPA path within flash-attn's test criterion.
    gen = torch.Generator().manual_seed(5)
    q, k, v, _ = _inputs(2, 24, 24, 4, 2, 32, torch.float16, seed=5)
    x_mask = _padding_mask(24, 2, gen, "random")
    lengths = x_mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(x_mask.flatten()).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    rows = [bert_padding.index_first_axis(t.reshape(48, t.shape[2], 32), indices) for t in (q, k, v)]
    scale = math.sqrt(math.log(24, 16) / 32)  # its proportional attention scale
    out = fa.flash_attn_varlen_func(
        *rows, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=lengths.max().item(),
        max_seqlen_k=lengths.max().item(), dropout_p=0.0, causal=False, softmax_scale=scale,
    )  # fmt: skip
    out = bert_padding.pad_input(out, indices, 2, 24)
    out_ref, _ = _attention_ref(q, k, v, x_mask, x_mask, scale)
    out_pt, _ = _attention_ref(q, k, v, x_mask, x_mask, scale, upcast=False)
    _check(out, out_ref, out_pt, "output")
    assert torch.count_nonzero(out[~x_mask]) == 0  # padded rows: zeros, as pad_input gives
