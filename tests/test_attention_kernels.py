"""The Triton varlen attention (self + gated text + in-kernel RoPE) against the float64 reference.

Runs on CPU under TRITON_INTERPRET=1 (fp16/fp32: the interpreter's bf16 tl.dot is wrong) and on CUDA (adds bf16).
Shapes stay tiny (<= ~150 tokens, <= 4 heads) because the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.helpers import (
    DEVICE,
    DOT_DTYPES,
    INTERPRETED,
    ON_GPU,
    TOLERANCE,
    assert_rel_close,
    compare_with_reference,
    force_warp_specialized,
    needs_triton,
    offsets_of,
    poisoned_allocations,
)

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

pytestmark = needs_triton


def _case(lens, text_lens, heads, kv_heads, head_dim, dtype, *, rope=False, scale=None, seed=0):
    """Inputs (differentiable tensors by name) and the two closures for compare_with_reference."""
    gen = torch.Generator().manual_seed(seed)
    T, Tt = sum(lens), sum(text_lens or [0])

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    inputs = {"q": rnd(T, heads, head_dim), "k": rnd(T, kv_heads, head_dim), "v": rnd(T, kv_heads, head_dim)}
    fixed = {"cu_seqlens": offsets_of(lens), "max_seqlen": max(lens), "softmax_scale": scale}
    if text_lens is not None:
        inputs.update(text_k=rnd(Tt, kv_heads, head_dim), text_v=rnd(Tt, kv_heads, head_dim), gate=rnd(heads, s=0.8))
        fixed.update(text_cu_seqlens=offsets_of(text_lens), text_max_seqlen=max(text_lens))
    if rope:
        # Positions restart per sequence like packed Lumina tokens; 2D alternating axes exercise every pair.
        pos = torch.cat([torch.stack([torch.arange(n) // 5, torch.arange(n) % 5], -1) for n in lens]).to(DEVICE)
        fixed["freqs"] = fk.rope_freqs(head_dim, pos)

    def mine(**t):
        return fk.varlen_attention(**t, **fixed, backend="triton")

    def reference(**t):
        return ref.varlen_attention(**t, **fixed)

    return inputs, mine, reference


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_packed_gqa_text_rope_matches_reference(dtype):
    # Mixed lengths incl. 1 and an empty sequence; one sample without text, one with two text key blocks; GQA
    # 4 -> 2; Dh 48 (padded to 64); Lumina's proportional scale instead of 1/sqrt(Dh). The default dq path (fp32
    # atomics from the dk/dv programs); the deterministic one is checked with the fused-QKV views below.
    inputs, mine, reference = _case(
        [37, 1, 0, 70], [5, 0, 3, 45], 4, 2, 48, dtype, rope=True, scale=fk.proportional_scale(4096, 1024, 48)
    )
    compare_with_reference(mine, reference, inputs, dtype, family="attention")


@pytest.mark.parametrize(
    ("head_dim", "dtype"),
    # Powers of two run as one column chunk; the others as two (24 = 16+16, 72 = 64+16, 96 = 64+32, 136 = 128+16).
    [(24, torch.float16), (32, torch.float16), (72, torch.float32), (96, torch.float16), (128, torch.float16)]
    + [(136, torch.float16)]
    + ([(64, torch.bfloat16), (256, torch.bfloat16)] if ON_GPU else []),
)
def test_head_dims(head_dim, dtype):
    inputs, mine, reference = _case([19, 33], [6, 4], 2, 1, head_dim, dtype, rope=head_dim != 32)
    compare_with_reference(mine, reference, inputs, dtype, family="attention")


def test_self_only_mqa_fp32():
    # No text, no RoPE, all heads sharing one kv head; 64 tokens = two full 32-row tiles, 65 = two plus a tail.
    inputs, mine, reference = _case([64, 65, 7], None, 3, 1, 32, torch.float32)
    compare_with_reference(mine, reference, inputs, torch.float32, family="attention")


def test_zero_scale_and_strided_head_dims():
    # softmax_scale 0 (Lumina's proportional scale for a 1-token image) is uniform attention, tail tiles included;
    # tensors whose head dim is not contiguous (k, text_v) are read right, forward and backward.
    inputs, mine, reference = _case([37, 5], [3, 6], 2, 1, 32, torch.float32, scale=0.0)
    for name in ("k", "text_v"):
        inputs[name] = inputs[name].permute(2, 1, 0).contiguous().permute(2, 1, 0)
        assert inputs[name].stride(-1) != 1
    compare_with_reference(mine, reference, inputs, torch.float32, family="attention")


def test_vector_width_hint_and_misaligned_views():
    # Contiguous Dh-72 tensors (head stride 72, not divisible by 16) are 16-byte aligned: the kernels may say so.
    # A view starting one element in is not: the launcher drops the hint and the kernels stay exact.
    from flagdit_kernels.triton.attention import launch as va

    assert va._vector_width(torch.empty(5, 3, 72, dtype=torch.float16)) == 8
    assert va._vector_width(torch.empty(5, 3, 72, dtype=torch.float32)) == 4
    assert va._vector_width(torch.empty(5 * 3 * 72 + 1, dtype=torch.float16)[1:].view(5, 3, 72)) == 1
    assert va._vector_width(torch.empty(5, 3, 76, dtype=torch.float16)[..., :72]) == 1  # head stride 76
    inputs, mine, reference = _case([19, 6], [3, 2], 2, 1, 72, torch.float16)

    def misaligned(t):  # the same values one element into a fresh buffer (differentiable)
        view = torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)
        assert view.data_ptr() % 16
        return view

    def mine_misaligned(**t):
        return mine(**{n: misaligned(x) if n in ("q", "v", "text_k") else x for n, x in t.items()})

    compare_with_reference(mine_misaligned, reference, inputs, torch.float16, family="attention")


@pytest.mark.parametrize("dtype", [torch.float16])
def test_descriptor_loads(monkeypatch, dtype):
    # The tensor-descriptor (TMA) paths, forced: key/value loads of the forward, q/dO loads and the dq reduce-add
    # of the dk/dv kernel; zero-filled tails (37 = 32 + 5 keys, 1 key), the 72 = 64 + 16 head-dim split, GQA,
    # RoPE, gated text, text keys of a sample without queries.
    from flagdit_kernels.triton.attention import autotune as tuning
    from flagdit_kernels.triton.attention import launch as va

    if ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90+")
    if not ON_GPU:
        monkeypatch.setattr(va, "_descriptor_ready", lambda *tensors: True)
    bm = bn = 32 if INTERPRETED else 64
    for kernel in (va.FORWARD, va.DQ, va.DKDV):
        monkeypatch.setattr(kernel, "tiles", [tuning.Tile(bm, bn, 4, 2, tma=True)])
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "0")
    inputs, mine, reference = _case([37, 1, 0, 70], [5, 0, 4, 9], 4, 2, 72, dtype, rope=True)
    compare_with_reference(mine, reference, inputs, dtype, family="attention")


@pytest.mark.parametrize(
    ("lens", "text_lens", "kv_heads", "head_dim", "dtype"),
    [
        # Tails (37 = 32 + 5), a 1-token and an empty sequence, a sample without text; Dh 72 = 64 + 16; GQA.
        ([37, 1, 0, 70], [5, 0, 4, 40], 2, 72, torch.float16),
        # 11 samples: the counted bisection takes 4 steps; idle programs (one per sequence) must store nothing.
        ([9, 3, 33, 1, 7, 2, 64, 5, 1, 12, 30], None, 4, 64, torch.float32),
    ],
)
def test_warp_specialized_tiles(monkeypatch, lens, text_lens, kv_heads, head_dim, dtype):
    # The warp-specialized shapes forced as the only tiles: the forward (one masked loop per key kind; q, k, v,
    # text through descriptors; counted bisection, no early return) and the backward's dk/dv (one masked loop
    # over the GQA group's (head, query tile) pairs, q / dO / k / v through descriptors, text keys picked by
    # selects) and the dq kernel (the forward's shape; the rows' LSE and delta as a descriptor-loaded tile of
    # tf32 terms, broadcast over the keys by a product), in the default and the deterministic backward alike;
    # warp_specialize itself only acts on sm_90.
    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized tiles are offered on sm_90 only")
    force_warp_specialized(monkeypatch)
    inputs, mine, reference = _case(lens, text_lens, 4, kv_heads, head_dim, dtype, rope=True)
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    deterministic = lambda **t: mine(**t, deterministic=True)
    compare_with_reference(deterministic, reference, inputs, dtype, family="attention")


def test_many_short_sequences():
    # 24 samples: the program -> (sample, tile) bisection takes five steps; most programs hold a whole sample.
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 10, (24,), generator=gen).tolist()
    text_lens = torch.randint(0, 4, (24,), generator=gen).tolist()
    inputs, mine, reference = _case(lens, text_lens, 2, 2, 32, torch.float16)
    compare_with_reference(mine, reference, inputs, torch.float16, family="attention")


def test_all_length_one():
    inputs, mine, reference = _case([1] * 5, [2, 0, 1, 3, 1], 2, 1, 32, torch.float32)
    compare_with_reference(mine, reference, inputs, torch.float32, family="attention")


def test_empty_text_and_zero_gate_give_exactly_self_attention():
    dtype = torch.float32
    inputs, _, _ = _case([20, 13], [0, 9], 2, 2, 32, dtype)
    cu = offsets_of([20, 13])
    self_only = fk.varlen_attention(inputs["q"], inputs["k"], inputs["v"], cu, 20, backend="triton")
    text = dict(text_k=inputs["text_k"], text_v=inputs["text_v"], text_cu_seqlens=offsets_of([0, 9]))
    with_text = fk.varlen_attention(
        inputs["q"], inputs["k"], inputs["v"], cu, 20, gate=inputs["gate"], backend="triton", **text
    )
    assert torch.isfinite(with_text).all()
    assert torch.equal(with_text[:20], self_only[:20])  # the sample with no text tokens
    assert not torch.allclose(with_text[20:], self_only[20:])
    zero_gate = fk.varlen_attention(
        inputs["q"], inputs["k"], inputs["v"], cu, 20, gate=torch.zeros_like(inputs["gate"]), backend="triton", **text
    )
    assert torch.equal(zero_gate, self_only)  # Lumina's zero-initialized gate
    # No sample has text: zero-token text tensors, output and q grad as without text, d gate exactly 0.
    gate = inputs["gate"].clone().requires_grad_()
    q = inputs["q"].clone().requires_grad_()
    empty = dict(text_k=inputs["text_k"][:0], text_v=inputs["text_v"][:0], text_cu_seqlens=offsets_of([0, 0]))
    none = fk.varlen_attention(q, inputs["k"], inputs["v"], cu, 20, gate=gate, backend="triton", **empty)
    assert torch.equal(none, self_only)
    none.backward(torch.ones_like(none))
    assert torch.equal(gate.grad, torch.zeros_like(gate))
    q_plain = inputs["q"].clone().requires_grad_()
    fk.varlen_attention(q_plain, inputs["k"], inputs["v"], cu, 20, backend="triton").sum().backward()
    assert torch.equal(q.grad, q_plain.grad)


def test_rope_in_kernel_matches_apply_rope_first():
    dtype = torch.float32
    inputs, _, _ = _case([23, 40], [4, 7], 2, 1, 64, dtype, rope=True)
    pos = torch.arange(63, device=DEVICE)
    freqs = fk.rope_freqs(64, pos)
    cu, tcu = offsets_of([23, 40]), offsets_of([4, 7])
    text = dict(text_cu_seqlens=tcu, text_max_seqlen=7)

    def run(fused: bool):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
        q, k = leaves["q"], leaves["k"]
        if not fused:
            q, k = fk.apply_rope(q, freqs, backend="reference"), fk.apply_rope(k, freqs, backend="reference")
        out = fk.varlen_attention(
            q, k, leaves["v"], cu, 40, text_k=leaves["text_k"], text_v=leaves["text_v"], gate=leaves["gate"],
            freqs=freqs if fused else None, backend="triton", **text,
        )  # fmt: skip
        out.backward(torch.cos(torch.arange(out.numel(), device=DEVICE, dtype=dtype)).view_as(out))
        return out, {n: t.grad for n, t in leaves.items()}

    out_fused, grads_fused = run(True)
    out_first, grads_first = run(False)
    assert_rel_close(out_fused, out_first, 1e-5)
    for name, g in grads_first.items():
        assert_rel_close(grads_fused[name], g, 1e-5, f"grad {name}")


@pytest.mark.parametrize("warp_specialized", [False, True])
def test_strided_views_of_fused_qkv_and_deterministic_backward(monkeypatch, warp_specialized):
    # q, k, v sliced from one (T, 3, H, Dh) projection output: non-unit token and head strides, no copies; also
    # through the warp-specialized tiles (3-D descriptors over the views' head and token strides).
    if warp_specialized:
        if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the warp-specialized tiles are offered on sm_90 only")
        force_warp_specialized(monkeypatch)
    dtype, T, H, D = torch.float16, 45, 2, 32
    lens = [30, 15]
    cu, tcu = offsets_of(lens), offsets_of([3, 5])
    qkv = (torch.randn(T, 3, H, D, dtype=torch.float64)).to(dtype).to(DEVICE).requires_grad_()
    text_kv = torch.randn(8, 2, H, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    gate = torch.randn(H, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    freqs = fk.rope_freqs(D, torch.arange(T, device=DEVICE))

    def run(fn, qkv, text_kv, gate):
        q, k, v = qkv.unbind(1)
        assert not q.is_contiguous()
        return fn(q, k, v, cu, 30, text_k=text_kv[:, 0], text_v=text_kv[:, 1], text_cu_seqlens=tcu, gate=gate,
                  freqs=freqs)  # fmt: skip

    upstream = torch.randn(T, H, D, dtype=torch.float64, device=DEVICE)
    grads = []
    for _ in range(2):
        for t in (qkv, text_kv, gate):
            t.grad = None
        out = run(lambda *a, **kw: fk.varlen_attention(*a, **kw, deterministic=True, backend="triton"), qkv, text_kv,
                  gate)  # fmt: skip
        out.backward(upstream.to(dtype))
        grads.append([t.grad.clone() for t in (qkv, text_kv, gate)])
    leaves = [t.detach().double().requires_grad_() for t in (qkv, text_kv, gate)]
    expected = run(ref.varlen_attention, *leaves)
    expected.backward(upstream)
    tol = TOLERANCE["attention"][dtype]
    assert_rel_close(out, expected, tol)
    for name, g, r in zip(("qkv", "text_kv", "gate"), grads[0], leaves):
        assert_rel_close(g, r.grad, tol, f"grad {name}")
    for a, b in zip(*grads):
        assert torch.equal(a, b), "backward is not deterministic"


def test_torch_compile_fullgraph():
    dtype = torch.float32
    inputs, mine, _ = _case([17, 9], [3, 0], 2, 1, 32, dtype, rope=True)

    def step(q, k, v, text_k, text_v, gate):
        return mine(q=q, k=k, v=v, text_k=text_k, text_v=text_v, gate=gate) * 2.0

    # aot_eager traces the custom ops through their fake impls and the registered autograd without needing a
    # C++ compiler; fullgraph=True fails on any graph break.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = compiled(**leaves)
    out.sum().backward()
    eager = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    expected = step(**eager)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, eager[name].grad)


def test_custom_op_schema():
    from flagdit_kernels.ops import attention as attn

    q = torch.randn(9, 2, 32, device=DEVICE)
    k, v = q[:, :1], q[:, 1:]  # strided views
    cu, tcu = offsets_of([4, 5]), offsets_of([2, 0])
    tk, tv, tg = (
        torch.randn(2, 1, 32, device=DEVICE),
        torch.randn(2, 1, 32, device=DEVICE),
        torch.rand(2, device=DEVICE) - 0.5,
    )
    freqs = fk.rope_freqs(32, torch.arange(9, device=DEVICE))
    fwd_args = (q, k, v, cu, 5, 0.2, tk, tv, tcu, tg, freqs, True, False)
    torch.library.opcheck(attn._fwd_op, fwd_args)
    torch.library.opcheck(attn._fwd_op, (q, k, v, cu, 5, 0.2, None, None, None, None, None, False, True))
    out, o_text, lse, lse_t, q_rot, k_rot, offsets = attn._fwd_op(*fwd_args)
    assert offsets.dtype == torch.int32 and offsets[:, :3].tolist() == [cu.tolist(), tcu.tolist()]  # unchanged
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q_rot, k_rot, v, out, o_text, lse, lse_t, cu, 5, 0.2,
                tk, tv, tcu, tg, freqs, False)  # fmt: skip
    torch.library.opcheck(attn._bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))
    # As autograd calls it: the forward's repaired offsets, launched as they are.
    repaired = (*bwd_args[:9], offsets[0, :3], 5, 0.2, tk, tv, offsets[1, :3], tg, freqs, False, None, None, None, None,
                True)  # fmt: skip
    torch.library.opcheck(attn._bwd_op, repaired, test_utils=("test_schema", "test_faketensor"))
    assert "triton" in fk.available_backends("varlen_attention", DEVICE)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with > 15 GB free: T * H * Dh > 2**31 elements")
def test_int64_offsets_large_packed_batch():
    dtype, H, D, L = torch.bfloat16, 32, 128, 2048
    n = 2**31 // (H * D * L) + 2
    T = n * L
    q = torch.randn(T, H, D, device=DEVICE, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cu = torch.arange(n + 1, device=DEVICE, dtype=torch.int32) * L
    out = fk.varlen_attention(q, k, v, cu, L, backend="triton")
    last = slice(T - L, T)
    expected = ref.varlen_attention(q[last], k[last], v[last], cu[:2], L)
    assert_rel_close(out[last], expected, TOLERANCE["attention"][dtype])
    assert math.isfinite(out.float().norm().item())


@pytest.mark.skipif(not ON_GPU, reason="a grid past CUDA's 65535 limit on its second axis needs a GPU launch")
def test_more_samples_times_heads_than_a_grid_axis_holds():
    # 40000 one-token samples x 2 heads: batch * heads > 65535, the limit of a CUDA grid's second and third axes.
    lens = [1] * 40000
    inputs, mine, _ = _case(lens, [1] * 40000, 2, 1, 32, torch.float16)
    out = mine(**inputs)
    # Each query attends to its own key alone: out = v + tanh(gate) * text_v (GQA: one kv head for both).
    expected = inputs["v"].float() + torch.tanh(inputs["gate"].float())[None, :, None] * inputs["text_v"].float()
    assert_rel_close(out, expected, TOLERANCE["attention"][torch.float16])


@pytest.mark.skipif(not ON_GPU, reason="GPU-sized tiles (autotuned 64/128-row blocks) need a GPU")
@pytest.mark.parametrize("head_dim", [128, 72])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_medium_packed_batch(head_dim, dtype):
    # Several full 128-row tiles per sequence plus tails, a length-1 sequence, a sample without text, GQA 8 -> 2.
    inputs, mine, reference = _case(
        [1000, 2113, 77, 1], [128, 0, 50, 3], 8, 2, head_dim, dtype, rope=True, scale=0.9 / math.sqrt(head_dim)
    )
    compare_with_reference(mine, reference, inputs, dtype, family="attention")


@pytest.mark.skipif(not ON_GPU, reason="autotuning times configs on the GPU")
def test_autotuned_launch(monkeypatch):
    # The suite runs untuned (FLAGDIT_KERNELS_AUTOTUNE=0, tests/conftest.py); users get the autotuner.
    from flagdit_kernels.triton.attention import autotune as tuning
    from flagdit_kernels.triton.attention import launch as va

    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "1")
    inputs, mine, reference = _case([300, 129], [40, 7], 4, 2, 64, torch.bfloat16)
    compare_with_reference(mine, reference, inputs, torch.bfloat16, family="attention")
    assert va.FORWARD.chosen and va.DKDV.chosen


def _assert_close_where_finite(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """The same NaN / inf pattern as the reference, and rel-L2 close on the finite rest."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN pattern differs from the reference"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: inf pattern differs from the reference"
    finite = torch.isfinite(expected)
    assert_rel_close(actual[finite], expected[finite], tol, what)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_gate_never_reach_a_sample_without_text(dtype, deterministic):
    # Gate NaN on head 0, +inf on head 1 (tanh = 1), finite on head 2; sample 1 has no text tokens: the contract
    # adds exactly 0 there (the reference skips it), so its rows and the gradients of its tokens stay finite,
    # while NaN reaches exactly the rows and gradients it reaches in the reference. GQA 4 -> 2.
    inputs, mine, reference = _case([21, 9, 35], [4, 0, 11], 4, 2, 32, dtype)
    inputs["gate"] = torch.tensor([float("nan"), float("inf"), 0.7, -1.3], dtype=dtype, device=DEVICE)
    mine_leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    with poisoned_allocations():
        out = mine(**mine_leaves, deterministic=deterministic)
    expected = reference(**ref_leaves)
    tol = TOLERANCE["attention"][dtype]
    _assert_close_where_finite(out, expected, tol, "output")
    assert torch.isfinite(out[21:30]).all()  # the sample without text, every head
    upstream = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    with poisoned_allocations():
        out.backward(upstream.to(dtype))
    expected.backward(upstream)
    for name, leaf in mine_leaves.items():
        if name != "k":
            _assert_close_where_finite(leaf.grad, ref_leaves[name].grad, tol, f"grad {name}")
    # Self keys seen by a NaN-gated head of a sample WITH text: the backward recovers o_self as out - tg * o_text
    # (NaN there) where the reference's autograd keeps it, so those key gradients are NaN (the output is NaN
    # anyway). Everything else of dk: the sample without text, and kv head 1 (heads 2, 3) throughout.
    k_grad, k_ref = mine_leaves["k"].grad, ref_leaves["k"].grad
    _assert_close_where_finite(k_grad[21:30], k_ref[21:30], tol, "grad k, the sample without text")
    _assert_close_where_finite(k_grad[:, 1], k_ref[:, 1], tol, "grad k, kv head 1")
    for name in ("q", "k", "v"):
        assert torch.isfinite(mine_leaves[name].grad[21:30]).all(), name
