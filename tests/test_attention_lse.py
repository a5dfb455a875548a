"""``varlen_attention(..., return_lse=True)``: the self-attention log-sum-exp, forward and gradients, on every
backend this machine runs (reference; Triton on CUDA or under TRITON_INTERPRET=1), and the use it exists for:
partial results over key blocks merged by log-sum-exp reproduce the full attention with plain autograd."""

from __future__ import annotations

import pytest
import torch
from support.helpers import (
    DEVICE,
    DOT_DTYPES,
    ON_GPU,
    TOLERANCE,
    TRITON_RUNS,
    assert_rel_close,
    force_warp_specialized,
    needs_triton,
    offsets_of,
    poisoned_allocations,
)

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

BACKENDS = ["reference"] + (["triton"] if TRITON_RUNS else [])


def _rnd(gen, *shape, dtype, s=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(dtype).to(DEVICE)


def _dense_lse(q, k, lens, scale):
    """logsumexp of the scaled scores per sequence, straight from the definition (GQA by repeating k)."""
    group = q.shape[1] // k.shape[1]
    rows, start = [], 0
    for n in lens:
        qs, ks = q[start : start + n], k[start : start + n].repeat_interleave(group, 1)
        rows.append((torch.einsum("qhd,khd->hqk", qs, ks) * scale).logsumexp(-1))
        start += n
    return torch.cat(rows, dim=1)


def test_reference_lse_is_the_logsumexp_of_the_self_scores():
    gen = torch.Generator().manual_seed(0)
    lens, text_lens, dt = [7, 0, 1, 12], [3, 2, 0, 5], torch.float64
    q, k, v = _rnd(gen, 20, 4, 16, dtype=dt), _rnd(gen, 20, 2, 16, dtype=dt), _rnd(gen, 20, 2, 16, dtype=dt)
    text = dict(
        text_k=_rnd(gen, 10, 2, 16, dtype=dt), text_v=_rnd(gen, 10, 2, 16, dtype=dt),
        text_cu_seqlens=offsets_of(text_lens), gate=_rnd(gen, 4, dtype=dt),
    )  # fmt: skip
    out, lse = fk.varlen_attention(q, k, v, offsets_of(lens), 12, 0.3, **text, return_lse=True, backend="reference")
    assert lse.shape == (4, 20) and lse.dtype == torch.float64
    assert torch.allclose(lse, _dense_lse(q, k, lens, 0.3), rtol=1e-12, atol=1e-12)  # text keys are not part of it
    assert torch.equal(out, fk.varlen_attention(q, k, v, offsets_of(lens), 12, 0.3, **text, backend="reference"))
    lse32 = fk.varlen_attention(q.float(), k.float(), v.float(), offsets_of(lens), 12, return_lse=True)[1]
    assert lse32.dtype == torch.float32


def _lse_case(dtype, seed=0, lens=(37, 1, 0, 66)):
    # GQA 4 -> 2, odd lengths incl. 1 and an empty sequence, a sample with two text key blocks and samples
    # without text, Dh 48 (two column chunks in the kernels), a non-default scale.
    gen = torch.Generator().manual_seed(seed)
    lens, text_lens, heads, kv_heads, dim = list(lens), [0, 3, 2, 40], 4, 2, 48
    T, Tt = sum(lens), sum(text_lens)
    inputs = {"q": _rnd(gen, T, heads, dim, dtype=dtype), "k": _rnd(gen, T, kv_heads, dim, dtype=dtype)}
    inputs.update(v=_rnd(gen, T, kv_heads, dim, dtype=dtype), text_k=_rnd(gen, Tt, kv_heads, dim, dtype=dtype))
    inputs.update(text_v=_rnd(gen, Tt, kv_heads, dim, dtype=dtype), gate=_rnd(gen, heads, dtype=dtype, s=0.8))
    fixed = dict(cu_seqlens=offsets_of(lens), max_seqlen=max(lens), softmax_scale=0.17)
    fixed.update(text_cu_seqlens=offsets_of(text_lens), text_max_seqlen=max(text_lens))
    upstream = (_rnd(gen, T, heads, dim, dtype=torch.float64), _rnd(gen, heads, T, dtype=torch.float64))
    return inputs, fixed, upstream


def _grads(backend, inputs, fixed, upstream, dtype):
    """(out, lse, grads by name) of sum(out * u) + sum(lse * w) through ``backend``."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    with poisoned_allocations():
        out, lse = fk.varlen_attention(**leaves, **fixed, return_lse=True, backend=backend)
        loss = (out.double() * upstream[0]).sum() + (lse.double() * upstream[1]).sum()
        loss.backward()
    return out, lse, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_lse_forward_and_gradients_match_float64(backend, dtype):
    inputs, fixed, upstream = _lse_case(dtype)
    out, lse, grads = _grads(backend, inputs, fixed, upstream, dtype)
    exp_out, exp_lse, exp_grads = _grads("reference", {n: t.double() for n, t in inputs.items()}, fixed, upstream,
                                         torch.float64)  # fmt: skip
    tol = TOLERANCE["attention"][dtype]
    assert lse.dtype == torch.float32 and lse.shape == (4, out.shape[0])
    assert_rel_close(out, exp_out, tol)
    assert_rel_close(lse, exp_lse, 1e-5, "lse")  # fp32 statistics of exactly rounded inputs
    for name, g in grads.items():
        assert_rel_close(g, exp_grads[name], tol, f"grad {name}")


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_lse_gradients_through_the_warp_specialized_tiles(monkeypatch, deterministic):
    # The LSE's gradient enters the backward through delta, which the warp-specialized dq kernel reads from its
    # row statistics tile (bwd.STATS_WIDTH tf32 terms): forced WS tiles, fp16, against float64.
    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized tiles are offered on sm_90 only")
    force_warp_specialized(monkeypatch)
    dtype = torch.float16
    inputs, fixed, upstream = _lse_case(dtype, seed=2)
    fixed["deterministic"] = deterministic
    out, lse, grads = _grads("triton", inputs, fixed, upstream, dtype)
    del fixed["deterministic"]
    exp_out, exp_lse, exp_grads = _grads("reference", {n: t.double() for n, t in inputs.items()}, fixed, upstream,
                                         torch.float64)  # fmt: skip
    tol = TOLERANCE["attention"][dtype]
    assert_rel_close(out, exp_out, tol)
    assert_rel_close(lse, exp_lse, 1e-5, "lse")
    for name, g in grads.items():
        assert_rel_close(g, exp_grads[name], tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_alone(backend):
    # Only the LSE reaches the loss: every q/k gradient comes from the lse term, v gets exactly zero.
    inputs, fixed, upstream = _lse_case(torch.float32, seed=1, lens=[21, 1, 0, 9])
    upstream = (torch.zeros_like(upstream[0]), upstream[1])
    _, _, grads = _grads(backend, inputs, fixed, upstream, torch.float32)
    _, _, exp = _grads("reference", {n: t.double() for n, t in inputs.items()}, fixed, upstream, torch.float64)
    for name in ("q", "k"):
        assert_rel_close(grads[name], exp[name], TOLERANCE["attention"][torch.float32], f"grad {name}")
    assert torch.count_nonzero(grads["v"]) == 0


def _merge(o1, lse1, o2, lse2):
    """Attention over the union of two key blocks from the two partial results (ring attention's merge)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).transpose(0, 1).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).transpose(0, 1).unsqueeze(-1)
    return w1 * o1.float() + w2 * o2.float(), lse


def _full_attention(q, k1, v1, k2, v2, lens, scale):
    """fp64 attention of each sequence's queries over both of its key blocks at once, and its lse."""
    group = q.shape[1] // k1.shape[1]
    outs, lses, start = [], [], 0
    for n in lens:
        rows = slice(start, start + n)
        ks = torch.cat([k1[rows], k2[rows]]).repeat_interleave(group, 1)
        vs = torch.cat([v1[rows], v2[rows]]).repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[rows], ks) * scale
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs))
        lses.append(s.logsumexp(-1))
        start += n
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_key_blocks_merged_by_lse_equal_full_attention(backend):
    # Each sequence's keys come in two blocks (two calls with the same queries), merged with plain autograd:
    # output, LSE and every gradient equal one attention over both blocks. GQA, odd lengths, a 1-token sequence.
    dtype = DOT_DTYPES[0]
    gen = torch.Generator().manual_seed(2)
    lens, heads, kv_heads, dim, scale = [29, 1, 40], 4, 2, 32, 0.21
    T = sum(lens)
    inputs = {"q": _rnd(gen, T, heads, dim, dtype=dtype)}
    for name in ("k1", "v1", "k2", "v2"):
        inputs[name] = _rnd(gen, T, kv_heads, dim, dtype=dtype)
    u_out, u_lse = _rnd(gen, T, heads, dim, dtype=torch.float64), _rnd(gen, heads, T, dtype=torch.float64)
    cu = offsets_of(lens)

    def merged(q, k1, v1, k2, v2):
        o1, lse1 = fk.varlen_attention(q, k1, v1, cu, 40, scale, return_lse=True, backend=backend)
        o2, lse2 = fk.varlen_attention(q, k2, v2, cu, 40, scale, return_lse=True, backend=backend)
        return _merge(o1, lse1, o2, lse2)

    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    with poisoned_allocations():
        out, lse = merged(**leaves)
        ((out.double() * u_out).sum() + (lse.double() * u_lse).sum()).backward()
    exp_leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    exp_out, exp_lse = _full_attention(*exp_leaves.values(), lens, scale)
    ((exp_out * u_out).sum() + (exp_lse * u_lse).sum()).backward()
    tol = TOLERANCE["attention"][dtype]
    assert_rel_close(out, exp_out, tol)
    assert_rel_close(lse, exp_lse, 1e-5, "lse")
    for name, leaf in leaves.items():
        assert_rel_close(leaf.grad, exp_leaves[name].grad, tol, f"grad {name}")


@needs_triton
def test_lse_with_rope_empty_text_and_torch_compile():
    # RoPE on, a batch whose text is empty everywhere; lse through torch.compile(fullgraph=True) equals eager.
    dtype = torch.float32
    gen = torch.Generator().manual_seed(3)
    lens = [9, 14]
    q, k, v = _rnd(gen, 23, 2, 32, dtype=dtype), _rnd(gen, 23, 1, 32, dtype=dtype), _rnd(gen, 23, 1, 32, dtype=dtype)
    fixed = dict(
        text_k=k[:0], text_v=v[:0], text_cu_seqlens=offsets_of([0, 0]), text_max_seqlen=0,
        gate=_rnd(gen, 2, dtype=dtype),
        freqs=fk.rope_freqs(32, torch.cat([torch.arange(n) for n in lens]).to(DEVICE)),
    )  # fmt: skip
    cu = offsets_of(lens)

    def step(q, k):
        out, lse = fk.varlen_attention(q, k, v, cu, 14, return_lse=True, backend="triton", **fixed)
        return out.sum() + (lse * lse).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    exp = [q.double().requires_grad_(), k.double().requires_grad_()]
    as64 = {n: t.double() if n in ("text_k", "text_v", "gate") else t for n, t in fixed.items()}
    out, lse = ref.varlen_attention(exp[0], exp[1], v.double(), cu, 14, return_lse=True, **as64)
    (out.sum() + (lse * lse).sum()).backward()
    for eager, compiled, r in zip(*grads, exp):
        torch.testing.assert_close(compiled, eager)
        assert_rel_close(eager, r.grad, TOLERANCE["attention"][dtype])


def test_return_lse_must_be_a_bool():
    x = torch.randn(3, 1, 16)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        fk.varlen_attention(x, x, x, torch.tensor([0, 3], dtype=torch.int32), 3, return_lse=1)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        fk.varlen_attention(x, x, x, torch.tensor([0, 3], dtype=torch.int32), 3, deterministic="yes")
