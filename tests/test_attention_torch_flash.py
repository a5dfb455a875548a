"""``"FLAGDIT"`` in torch's flash-attention registry: the aten implementations called directly with CPU tensors
(the Triton interpreter under TRITON_INTERPRET=1, else the reference forward and the fp32 softmax gradient)
against float64 math; the registration for the CPU dispatch key, driving ``torch.nn.attention.varlen.varlen_attn``
and the SDPA flash op through autograd; hand-back of what is not covered; activate / restore through torch."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from support.cross_attention import cross_attention_math, launchers_take_key_offsets
from support.helpers import DEVICE, TRITON_RUNS, assert_rel_close, offsets_of

from flagdit_kernels import _dispatch
from flagdit_kernels.ops import attention_torch_flash as tf

attention = pytest.importorskip("torch.nn.attention")
if not hasattr(attention, "register_flash_attention_impl"):
    pytest.skip("torch has no flash-attention registry (torch < 2.10)", allow_module_level=True)

TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def _rnd(gen, *shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def _grads64(q, k, v, q_lens, k_lens, scale, dout):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = cross_attention_math(*leaves, q_lens, k_lens, scale)
    return out, lse, torch.autograd.grad(out, leaves, dout.double())


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """The backend the implementations run (forced as FLAGDIT_KERNELS_BACKEND would)."""
    if request.param == "triton" and not TRITON_RUNS:
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv(_dispatch.ENV_VAR, request.param)
    _dispatch.reload_environment()
    yield request.param
    monkeypatch.delenv(_dispatch.ENV_VAR)
    _dispatch.reload_environment()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cross", [False, True])
def test_varlen_forward_and_backward_from_saved_tensors(dtype, cross, backend):
    if cross and backend == "triton" and not launchers_take_key_offsets():
        pytest.skip("the Triton launchers do not take cu_seqlens_k yet")
    gen = torch.Generator().manual_seed(0)
    q_lens = [13, 1, 30]
    k_lens = [7, 20, 30] if cross else q_lens
    q, dout = _rnd(gen, 44, 4, 32, dtype=dtype), _rnd(gen, 44, 4, 32, dtype=dtype)
    k, v = _rnd(gen, sum(k_lens), 2, 32, dtype=dtype), _rnd(gen, sum(k_lens), 2, 32, dtype=dtype)
    cu_q = offsets_of(q_lens)
    cu_k = offsets_of(k_lens) if cross else cu_q
    assert _dispatch.resolve("varlen_attention", q).backend == backend
    out, lse, rng, unused, debug = tf.flash_attention_forward(
        q, k, v, cu_q, cu_k, 30, max(k_lens), 0.0, False, False, scale=0.2
    )
    exp_out, exp_lse, exp_grads = _grads64(q, k, v, q_lens, k_lens, 0.2, dout)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (4, 44)
    assert rng.shape == (2,) and unused.shape == () and debug.numel() == 0
    assert_rel_close(out, exp_out, TOL[dtype])
    assert_rel_close(lse, exp_lse, 1e-5, "lse")
    grads = tf.flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, 30, max(k_lens), 0.0, False, rng,
                                        unused, scale=0.2)  # fmt: skip
    for name, g, r in zip("qkv", grads, exp_grads):
        assert g.dtype == dtype
        assert_rel_close(g, r, TOL[dtype], f"grad {name}")


def test_dense_and_sdpa_layouts_with_gqa():
    # Dense (B, S, H, D) flash forward: lse (B, H, S); SDPA (B, H, S, D) with 2 kv heads for 4 query heads.
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_rnd(gen, 2, 11, h, 16, dtype=torch.float32) for h in (4, 2, 2))
    out, lse, *_ = tf.flash_attention_forward(q, k, v, None, None, 11, 11, 0.0, False, False)
    exp_out, exp_lse = cross_attention_math(
        *(t.reshape(22, -1, 16) for t in (q, k, v)), [11, 11], [11, 11], 1 / math.sqrt(16)
    )
    assert out.shape == q.shape and lse.shape == (2, 4, 11)
    assert_rel_close(out.reshape(22, 4, 16), exp_out, 1e-5)
    assert_rel_close(lse, exp_lse.view(4, 2, 11).transpose(0, 1), 1e-5, "lse")
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, S, D)
    result = tf.sdpa_flash_forward(qt, kt, vt, scale=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(qt.double(), kt.double(), vt.double(), scale=0.3,
                                                                enable_gqa=True)  # fmt: skip
    assert result[0].shape == qt.shape and result[1].shape == (2, 4, 11) and result[4:6] == (11, 11)
    assert_rel_close(result[0], expected, 1e-5)
    dout = _rnd(gen, 2, 4, 11, 16, dtype=torch.float32)
    grads = tf.sdpa_flash_backward(dout, qt, kt, vt, result[0], result[1], None, None, 11, 11, 0.0, False,
                                   result[6], result[7], scale=0.3)  # fmt: skip
    leaves = [t.double().requires_grad_() for t in (qt, kt, vt)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, scale=0.3, enable_gqa=True)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, leaves, dout.double())):
        assert g.shape == r.shape
        assert_rel_close(g, r, 1e-5, f"grad {name}")


@pytest.fixture
def registered_for_cpu():
    handle = tf.register("CPU")
    yield
    handle.remove()


def test_varlen_attn_and_sdpa_flash_op_run_ours_through_autograd(registered_for_cpu):
    from torch.nn.attention.varlen import varlen_attn

    gen = torch.Generator().manual_seed(2)
    lens = [9, 1, 17]
    q, k, v = (_rnd(gen, 27, h, 16, dtype=torch.float32).requires_grad_() for h in (4, 4, 4))
    cu = offsets_of(lens)
    out = varlen_attn(q, k, v, cu, cu, 17, 17, scale=0.25)
    dout = _rnd(gen, 27, 4, 16, dtype=torch.float32)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exp_out, _, exp_grads = _grads64(q, k, v, lens, lens, 0.25, dout)
    assert_rel_close(out, exp_out, 1e-5)
    for name, g, r in zip("qkv", grads, exp_grads):
        assert_rel_close(g, r, 1e-5, f"grad {name}")
    # The SDPA flash op (what F.scaled_dot_product_attention calls on CUDA), differentiated by aten's formula.
    qd, kd, vd = (_rnd(gen, 2, 2, 7, 16, dtype=torch.float32).requires_grad_() for _ in range(3))
    result = torch.ops.aten._scaled_dot_product_flash_attention(qd, kd, vd, scale=0.4)
    (result[0] * 2).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (qd, kd, vd)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, scale=0.4)
    (ref * 2).sum().backward()
    assert_rel_close(result[0], ref, 1e-5)
    for name, a, b in zip("qkv", (qd, kd, vd), leaves):
        assert_rel_close(a.grad, b.grad, 1e-5, f"sdpa grad {name}")


def test_unsupported_calls_are_handed_back_once_logged(caplog):
    # Registered over the Meta kernels (which exist on every torch): dropout is handed back to them.
    handle = tf.register("Meta")
    try:
        q = torch.empty(2, 5, 2, 16, device="meta")
        with caplog.at_level(logging.WARNING, logger=tf.log.name):
            for _ in range(2):
                out, lse, *_ = torch.ops.aten._flash_attention_forward(q, q, q, None, None, 5, 5, 0.1, False, False)
        assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (2, 2, 5)
        assert sum("dropout_p" in r.getMessage() for r in caplog.records) == 1
    finally:
        handle.remove()
    # Where nothing was replaced (no CPU flash kernel), an unsupported call says what and why.
    handle = tf.register("CPU")
    try:
        x = torch.randn(1, 4, 1, 16)
        with pytest.raises(RuntimeError, match="does not support window_size"):
            torch.ops.aten._flash_attention_forward(x, x, x, None, None, 4, 4, 0.0, False, False, window_size_left=2)
    finally:
        handle.remove()
    with pytest.raises(NotImplementedError):  # removed: the CPU key has no kernel again
        torch.ops.aten._flash_attention_forward(x, x, x, None, None, 4, 4, 0.0, False, False)


def test_registered_at_import_and_activated_only_by_the_user():
    assert tf.IMPL_NAME in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() is None
    attention.activate_flash_attention_impl("FLAGDIT")
    try:
        assert attention.current_flash_attention_impl() == "FLAGDIT"
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
