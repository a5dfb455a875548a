"""Triton ``apply_rope`` and fused ``qk_norm_rope`` against the float64 reference, forward and backward.

On the CPU these run under ``TRITON_INTERPRET=1`` (small shapes); on a GPU, as compiled kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support.helpers import DEVICE, INTERPRETED, KERNEL_DTYPES, ON_GPU, compare_with_reference, fresh

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="Triton on the CPU needs TRITON_INTERPRET=1"),
]

if importlib.util.find_spec("triton") is not None:
    from flagdit_kernels.triton import rope as K


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records the arguments of every launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(args)
            return launch(*args, **kwargs)

        return run


def assert_read_in_place(arg: tuple, x: torch.Tensor) -> None:
    """The kernel got x itself (maybe with a leading unit dim), not a copy, as a (tensor, *strides) view."""
    arg = arg[0]
    assert arg.data_ptr() == x.data_ptr(), "the kernel was handed a copy"
    assert arg.stride()[-x.dim() :] == x.stride(), f"strides {arg.stride()} != {x.stride()}"


def freqs_for(head_dim: int, n: int, batch: int | None = None, offset: int = 0) -> torch.Tensor:
    """A 1D table for n tokens (or per-sample tables (batch, n, ...), each sample at other positions)."""
    if batch is None:
        return fk.rope_freqs(head_dim, torch.arange(n, device=DEVICE) * 7 + offset)
    return torch.stack([freqs_for(head_dim, n, offset=offset + 31 * b) for b in range(batch)])


# ---- apply_rope -----------------------------------------------------------------------------------------

# (x shape, freqs batched per sample)
ROPE_CASES = [
    ((1, 1, 32), False),  # T = 1
    ((7, 3, 48), False),
    ((5, 2, 72), False),
    ((3, 2, 120), False),
    ((2, 3, 2, 96), False),  # (B, L, H, Dh) with one (L, ...) table
    ((2, 3, 1, 64), True),  # (B, L, H, Dh) with per-sample (B, L, ...) tables
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate_half"])
@pytest.mark.parametrize(("shape", "batched"), ROPE_CASES, ids=[str(c[0]) for c in ROPE_CASES])
def test_apply_rope(dtype, interleaved, shape, batched):
    n = shape[-3]
    freqs = freqs_for(shape[-1], n, batch=shape[0] if batched else None)
    compare_with_reference(
        lambda x: fk.apply_rope(x, freqs, interleaved, backend="triton"),
        lambda x: ref.apply_rope(x, freqs, interleaved),
        {"x": fresh(shape, dtype)},
        dtype,
    )


def test_apply_rope_float64_table_and_many_blocks(monkeypatch):
    """Tiny tiles split heads over several programs per token; an fp64 table is accepted."""
    monkeypatch.setattr(K, "ROPE_TILE_PAIRS", 16)
    x = fresh((9, 5, 40), torch.float32)
    freqs = freqs_for(40, 9).double()
    compare_with_reference(
        lambda x: fk.apply_rope(x, freqs, backend="triton"),
        lambda x: ref.apply_rope(x, freqs),
        {"x": x},
        torch.float32,
    )


@pytest.mark.parametrize("layout", ["fused_qkv", "bhld_transposed", "strided_last_dim"])
def test_apply_rope_strided_views_read_in_place(monkeypatch, layout):
    t, h, dh = 6, 3, 48
    if layout == "fused_qkv":  # k out of one (T, 3*H*Dh) projection
        x = fresh((t, 3 * h * dh), torch.float16).view(t, 3 * h, dh)[:, h : 2 * h]
        freqs = freqs_for(dh, t)
    elif layout == "bhld_transposed":  # (B, H, L, Dh) storage seen as (B, L, H, Dh)
        x = fresh((2, h, t, dh), torch.float16).transpose(1, 2)
        freqs = freqs_for(dh, t)
    else:  # even the last dim strided
        x = fresh((t, h, 2 * dh), torch.float16)[..., ::2]
        freqs = freqs_for(dh, t)
    assert not x.is_contiguous()
    spy = LaunchSpy(K._rope_kernel)
    monkeypatch.setattr(K, "_rope_kernel", spy)
    out = fk.apply_rope(x, freqs, backend="triton")
    assert len(spy.calls) == 1
    assert_read_in_place(spy.calls[0][0], x)
    torch.testing.assert_close(out, ref.apply_rope(x, freqs), atol=2e-3, rtol=2e-3)


def test_apply_rope_empty():
    x = torch.randn(0, 2, 16, device=DEVICE, requires_grad=True)
    out = fk.apply_rope(x, torch.zeros(0, 8, 2, device=DEVICE), backend="triton")
    out.sum().backward()
    assert out.shape == (0, 2, 16) and x.grad.shape == x.shape


# ---- qk_norm_rope ------------------------------------------------------------------------------------------

# (q shape, k heads, interleaved, freqs batched per sample)
QK_CASES = [
    ((7, 4, 48), 2, True, False),  # GQA
    ((1, 2, 32), 1, True, False),  # T = 1
    ((5, 3, 72), 3, False, False),  # rotate-half
    ((2, 3, 2, 96), 1, True, True),  # (B, L, H, Dh), per-sample freqs
    ((4, 2, 120), 2, True, False),
]


def param_width(norm, heads, dh):
    return heads * dh if norm == "layer_norm" else dh


def qk_inputs(q_shape, hk, norm, dtype, param_dtype=None, weight=True, bias=True):
    h, dh = q_shape[-2], q_shape[-1]
    k_shape = (*q_shape[:-2], hk, dh)
    param_dtype = param_dtype or dtype
    inputs = {"q": fresh(q_shape, dtype), "k": fresh(k_shape, dtype)}
    for name, heads in (("q", h), ("k", hk)):
        width = param_width(norm, heads, dh)
        has = norm is not None
        inputs[f"{name}w"] = fresh((width,), param_dtype, offset=1.0) if has and weight else None
        inputs[f"{name}b"] = fresh((width,), param_dtype, scale=0.5) if has and bias else None
    return inputs


def qk_pair(norm, freqs, interleaved, eps=1e-5):
    def ours(q, k, qw, qb, kw, kb):
        return fk.qk_norm_rope(q, k, freqs, (qw, qb), (kw, kb), norm, eps, interleaved, backend="triton")

    def theirs(q, k, qw, qb, kw, kb):
        return ref.qk_norm_rope(q, k, freqs, (qw, qb), (kw, kb), norm, eps, interleaved)

    return ours, theirs


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", None])
@pytest.mark.parametrize(("q_shape", "hk", "interleaved", "batched"), QK_CASES, ids=[str(c[0]) for c in QK_CASES])
def test_qk_norm_rope(dtype, norm, q_shape, hk, interleaved, batched):
    freqs = freqs_for(q_shape[-1], q_shape[-3], batch=q_shape[0] if batched else None)
    ours, theirs = qk_pair(norm, freqs, interleaved)
    compare_with_reference(ours, theirs, qk_inputs(q_shape, hk, norm, dtype), dtype)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize(("weight", "bias"), [(True, False), (False, True), (False, False)])
def test_qk_norm_rope_partial_affine(norm, weight, bias):
    dtype = torch.float32
    freqs = freqs_for(40, 6)
    ours, theirs = qk_pair(norm, freqs, True, eps=1e-3)
    compare_with_reference(ours, theirs, qk_inputs((6, 3, 40), 1, norm, dtype, weight=weight, bias=bias), dtype)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_qk_norm_rope_fp32_params_bf16_activations(norm):
    """Mixed precision: fp32 norm parameters (their grads come back fp32), bf16 q/k and outputs."""
    freqs = freqs_for(32, 5)
    ours, theirs = qk_pair(norm, freqs, True)
    inputs = qk_inputs((5, 4, 32), 2, norm, torch.bfloat16, param_dtype=torch.float32)
    compare_with_reference(ours, theirs, inputs, torch.bfloat16)


@pytest.mark.parametrize("norm", ["rms_norm", None])
def test_qk_norm_rope_head_blocks(monkeypatch, norm):
    """Per-head norms split heads over programs; the weight-gradient partials then span head blocks too."""
    monkeypatch.setattr(K, "QK_TILE_PAIRS", 32)  # Dh 48 -> BLOCK_P 32 -> one head per program
    freqs = freqs_for(48, 7)
    ours, theirs = qk_pair(norm, freqs, False)
    compare_with_reference(ours, theirs, qk_inputs((7, 6, 48), 3, norm, torch.float32), torch.float32)


def test_qk_layer_norm_row_too_wide(monkeypatch):
    monkeypatch.setattr(K, "MAX_ROW_PAIRS", 64)
    q = fresh((2, 4, 64), torch.float32)
    with pytest.raises(ValueError, match="keeps a whole token row in one program"):
        fk.qk_norm_rope(q, q, freqs_for(64, 2), norm="layer_norm", backend="triton")


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_qk_norm_rope_views_of_fused_qkv(monkeypatch, norm):
    """q and k sliced from one QKV projection, (B, L, H, Dh) with GQA, read in place; a non-contiguous
    upstream gradient (as attention backward may produce) is read in place too."""
    b, l, h, hk, dh = 2, 3, 4, 2, 48
    qkv = fresh((b, l, (h + 2 * hk) * dh), torch.bfloat16).view(b, l, h + 2 * hk, dh)
    freqs = freqs_for(dh, l)
    params = qk_inputs((b, l, h, dh), hk, norm, torch.bfloat16)
    fwd, bwd = LaunchSpy(K._qk_norm_rope_fwd_kernel), LaunchSpy(K._qk_norm_rope_bwd_kernel)
    monkeypatch.setattr(K, "_qk_norm_rope_fwd_kernel", fwd)
    monkeypatch.setattr(K, "_qk_norm_rope_bwd_kernel", bwd)

    leaf = qkv.detach().clone().requires_grad_(True)
    ql, kl = leaf[:, :, :h], leaf[:, :, h : h + hk]
    w = {n: params[n] for n in ("qw", "qb", "kw", "kb")}
    qo, ko = fk.qk_norm_rope(ql, kl, freqs, (w["qw"], w["qb"]), (w["kw"], w["kb"]), norm, backend="triton")
    assert_read_in_place(fwd.calls[0][0], ql)
    assert_read_in_place(fwd.calls[0][1], kl)

    up = fresh((b, l, h + hk, 2 * dh), torch.bfloat16)  # gradients as strided views of a larger buffer
    dq_out, dk_out = up[:, :, :h, :dh], up[:, :, h:, dh:]
    torch.autograd.backward([qo, ko], [dq_out, dk_out])
    assert_read_in_place(bwd.calls[0][2], dq_out)
    assert_read_in_place(bwd.calls[0][3], dk_out)

    leaf64 = qkv.detach().double().requires_grad_(True)
    rq, rk = ref.qk_norm_rope(
        leaf64[:, :, :h], leaf64[:, :, h : h + hk], freqs, (w["qw"], w["qb"]), (w["kw"], w["kb"]), norm
    )
    torch.autograd.backward([rq, rk], [dq_out.double(), dk_out.double()])
    for mine, exact in ((qo, rq), (ko, rk), (leaf.grad, leaf64.grad)):
        err = (mine.double() - exact).norm() / exact.norm()
        assert err < 1e-2, err


def test_qk_norm_rope_modules_and_nn():
    """Norm modules (their eps wins) and fk.nn.QKNormRoPE agree between the triton and reference backends."""
    h, hk, dh, t = 4, 2, 32, 5
    torch.manual_seed(3)
    mod = fk.nn.QKNormRoPE(h, hk, dh, norm="layer_norm", eps=1e-3).to(DEVICE)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    q, k = fresh((t, h, dh), torch.float32), fresh((t, hk, dh), torch.float32)
    freqs = freqs_for(dh, t)
    mod.backend = "triton"
    got = mod(q, k, freqs)
    mod.backend = "reference"
    want = mod(q, k, freqs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_qk_norm_rope_empty():
    q = torch.randn(0, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(0, 1, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    qo, ko = fk.qk_norm_rope(q, k, torch.zeros(0, 8, 2, device=DEVICE), (w, None), None, backend="triton")
    (qo.sum() + ko.sum()).backward()
    assert qo.shape == q.shape and ko.shape == k.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


# ---- torch.library registration -------------------------------------------------------------------------


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the three custom ops."""
    t, h, hk, dh = 3, 2, 1, 32
    q = fresh((t, h, dh), torch.float32).requires_grad_(True)
    k = fresh((t, hk, dh), torch.float32).requires_grad_(True)
    freqs = freqs_for(dh, t)
    qw = fresh((h * dh,), torch.float32).requires_grad_(True)
    kb = fresh((hk * dh,), torch.float32).requires_grad_(True)
    ops = torch.ops.flagdit_kernels
    torch.library.opcheck(ops.apply_rope_triton.default, (q, freqs, True, False))
    torch.library.opcheck(ops.qk_norm_rope_triton.default, (q, k, freqs, qw, None, None, kb, "layer_norm", 1e-5, True))
    # The backward op is not itself differentiable (no double backward): checked on plain tensors.
    q, k, qw, kb = (x.detach() for x in (q, k, qw, kb))
    torch.library.opcheck(
        ops.qk_norm_rope_backward_triton.default, (q, k, q, k, freqs, qw, None, None, kb, "layer_norm", 1e-5, True)
    )


def test_torch_compile_fullgraph():
    """Both ops trace into one graph (no graph breaks), forward and backward, and match eager."""
    t, h, hk, dh = 5, 2, 1, 32
    freqs = freqs_for(dh, t)

    def block(q, k, qw, qb, kw, kb):
        qo, ko = fk.qk_norm_rope(q, k, freqs, (qw, qb), (kw, kb), "layer_norm", backend="triton")
        again = fk.apply_rope(qo, freqs, interleaved=False, backend="triton")
        return (again.float() * 1.5).sum() + ko.float().pow(2).sum()

    leaves = [
        fresh((t, h, dh), torch.float32),
        fresh((t, hk, dh), torch.float32),
        *(fresh((n,), torch.float32) for n in (h * dh, h * dh, hk * dh, hk * dh)),
    ]
    eager = [x.clone().requires_grad_(True) for x in leaves]
    compiled_in = [x.clone().requires_grad_(True) for x in leaves]
    block(*eager).backward()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    compiled(*compiled_in).backward()
    for a, b in zip(compiled_in, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
