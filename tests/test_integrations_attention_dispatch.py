"""fk.varlen_attention as a backend of diffusers' attention dispatcher, on tiny random Flux, Wan, Cosmos and
Chroma transformers.

Outputs and gradients against diffusers' native backend (fp32 rel-L2 < 1e-4); padding masks become packed key
layouts (cross-attention: no query row is removed), what the kernel does not cover runs the native backend and
is counted as such. Masked calls go through ``cu_seqlens_k``: their Triton cases need launchers that take it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support.cross_attention import launchers_take_key_offsets
from support.helpers import DEVICE, assert_rel_close, fresh
from support.integration_fixtures import backends
from torch import nn

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
fkd = pytest.importorskip("flagdit_kernels.integrations.diffusers")
from diffusers.models import attention_dispatch  # noqa: E402

from flagdit_kernels.integrations import diffusers_attention  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_counts():
    diffusers_attention.reset_calls()
    yield
    diffusers_attention.reset_calls()


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Default init zeroes the output projections and gates: make every parameter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.copy_(noise / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1.0 + 0.3 * noise)
    return model.to(DEVICE).eval()


def flux_model():
    return _randomize(
        diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=8,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=12,
            axes_dims_rope=(4, 6, 6),
        ),
        seed=0,
    )


def flux_inputs(batch=2, image=6, text=5, mask=False):
    ids = torch.zeros(image, 3)
    ids[:, 1], ids[:, 2] = torch.arange(image) // 3, torch.arange(image) % 3
    inputs = dict(
        hidden_states=fresh((batch, image, 8), torch.float32, seed=1),
        encoder_hidden_states=fresh((batch, text, 24), torch.float32, seed=2),
        pooled_projections=fresh((batch, 12), torch.float32, seed=3),
        timestep=torch.tensor([0.3, 0.8][:batch], device=DEVICE),
        img_ids=ids.to(DEVICE),
        txt_ids=torch.zeros(text, 3, device=DEVICE),
        return_dict=False,
    )
    if mask:  # padded prompts: the joint sequence is [text, image], so the padding sits in the middle
        keep = torch.ones(batch, text + image, dtype=torch.bool, device=DEVICE)
        keep[0, 3:text] = False
        keep[1, 1] = False
        inputs["joint_attention_kwargs"] = {"attention_mask": keep}
    return inputs


def wan_model():
    return _randomize(
        diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            text_dim=24,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        seed=0,
    )


def wan_inputs(batch=2):
    return dict(
        hidden_states=fresh((batch, 4, 2, 4, 6), torch.float32, seed=1),
        timestep=torch.tensor([300, 800][:batch], device=DEVICE),
        encoder_hidden_states=fresh((batch, 7, 24), torch.float32, seed=2),
        return_dict=False,
    )


def cosmos_model():
    # Text keys as many as video queries (8 = 1 frame x 2 x 4 patches): a cross-attention with Lq == Lk.
    return _randomize(
        diffusers.CosmosTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            mlp_ratio=2.0,
            text_embed_dim=24,
            adaln_lora_dim=4,
            max_size=(4, 8, 8),
            patch_size=(1, 2, 2),
            concat_padding_mask=False,  # its padding-mask resize needs torchvision
        ),
        seed=0,
    )


def cosmos_inputs(batch=2):
    keep = torch.ones(batch, 8, dtype=torch.bool, device=DEVICE)
    keep[0, 5:] = False  # the video rows at these positions must still attend the kept text
    keep[1, 0] = False
    return dict(
        hidden_states=fresh((batch, 4, 1, 4, 8), torch.float32, seed=1),
        timestep=torch.tensor([0.3, 0.7][:batch], device=DEVICE),
        encoder_hidden_states=fresh((batch, 8, 24), torch.float32, seed=2),
        attention_mask=keep,
        return_dict=False,
    )


def chroma_model():
    return _randomize(
        diffusers.ChromaTransformer2DModel(
            patch_size=1,
            in_channels=8,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            axes_dims_rope=(4, 6, 6),
            approximator_num_channels=8,
            approximator_hidden_dim=16,
            approximator_layers=1,
        ),
        seed=0,
    )


def chroma_inputs(batch=2, image=6, text=5):
    # Flux's padded prompt as Chroma takes it: a boolean mask over the joint [text, image] sequence, which
    # Chroma's blocks turn into (B, 1, L, L); no pooled projections.
    inputs = flux_inputs(batch, image, text, mask=True)
    del inputs["pooled_projections"]
    inputs["attention_mask"] = inputs.pop("joint_attention_kwargs")["attention_mask"]
    return inputs


def ltx_model():
    return _randomize(
        diffusers.LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=1,
            caption_channels=24,
        ),
        seed=0,
    )


def ltx_inputs(batch=2):
    # A padded prompt: LTX turns it into a -10000 additive bias repeated per head, (B, H, 1, Lt).
    keep = torch.ones(batch, 6, device=DEVICE)
    keep[0, 4:] = 0
    return dict(
        hidden_states=fresh((batch, 2 * 2 * 3, 8), torch.float32, seed=1),
        encoder_hidden_states=fresh((batch, 6, 24), torch.float32, seed=2),
        timestep=torch.tensor([300, 700][:batch], device=DEVICE),
        encoder_attention_mask=keep,
        num_frames=2,
        height=2,
        width=3,
        return_dict=False,
    )


MODELS = {
    # name: (model, inputs, dispatcher calls per forward that run varlen / native, whether masks reach it)
    "flux": (flux_model, flux_inputs, {"varlen": 2}, False),
    "flux-padded-prompt": (flux_model, lambda: flux_inputs(mask=True), {"varlen": 2}, True),
    "wan": (wan_model, wan_inputs, {"varlen": 4}, True),  # its text attention: cross-attention, Lq != Lk
    "cosmos-text-as-long-as-video": (cosmos_model, cosmos_inputs, {"varlen": 2}, True),
    "chroma-boolean-mask": (chroma_model, chroma_inputs, {"varlen": 2}, True),
    "ltx-padded-prompt": (ltx_model, ltx_inputs, {"varlen": 2}, True),
}


def _forward_backward(model: nn.Module, inputs: dict, upstream: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    (out * upstream).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", backends(("varlen_attention",)))
@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_match_native(name, backend):
    make_model, make_inputs, expected_calls, cross = MODELS[name]
    if cross and backend == "triton" and not launchers_take_key_offsets():
        pytest.skip("masked and cross-attention calls need Triton launchers that take cu_seqlens_k")
    model, inputs = make_model(), make_inputs()
    upstream = fresh(model(**inputs)[0].shape, torch.float32, seed=9)
    want_out, want_grads = _forward_backward(model, inputs, upstream)
    diffusers_attention.reset_calls()
    with fkd.attention_backend(backend=backend):
        got_out, got_grads = _forward_backward(model, inputs, upstream)
    assert diffusers_attention.calls() == expected_calls
    assert (
        attention_dispatch._AttentionBackendRegistry._active_backend == attention_dispatch.AttentionBackendName.NATIVE
    )
    assert_rel_close(got_out, want_out, 1e-4, f"{name} output")
    assert got_grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        assert_rel_close(got_grads[n], g, 1e-4, f"{name} grad {n}")


def test_set_and_reset_on_a_model_with_a_pinned_backend():
    model, inputs = flux_model(), flux_inputs()
    model.set_attention_backend("native")  # pins every processor; ours unpins them
    with torch.no_grad():
        expected = model(**inputs)[0]
        fkd.set_attention_backend(model)
        try:
            actual = model(**inputs)[0]
        finally:
            fkd.reset_attention_backend(model)
        assert diffusers_attention.calls() == {"varlen": 2}
        model(**inputs)
    assert diffusers_attention.calls() == {"varlen": 2}, "after the reset the native backend runs again"
    assert_rel_close(actual, expected, 1e-4, "set_attention_backend")
    assert diffusers_attention.NAME in attention_dispatch._AttentionBackendRegistry.list_backends()


def test_context_parallel_models_are_refused():
    model = flux_model()
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor = copy.copy(module.processor)
            module.processor._parallel_config = object()
    with pytest.raises(ValueError, match="does not support diffusers' context parallelism"):
        fkd.set_attention_backend(model)


@pytest.mark.parametrize(
    ("mask", "why"),
    [
        (lambda b, lq: torch.zeros(b, 1, lq, lq), "mask (an additive bias"),
        (lambda b, lq: torch.ones(lq, lq, dtype=torch.bool).tril().expand(b, 1, lq, lq).clone(), "varies per query"),
        (lambda b, lq: torch.rand(b, 2, 1, lq) > 0.3, "varies per head"),
        (lambda b, lq: torch.ones(3, lq, dtype=torch.bool), "does not broadcast over the batch"),
    ],
    ids=["additive", "per-query", "per-head", "batch"],
)
def test_masks_it_cannot_convert_run_native(mask, why):
    q, k, v = (fresh((2, 9, 2, 16), torch.float32, seed=s) for s in (1, 2, 3))
    attn_mask = mask(2, 9).to(DEVICE)
    with fkd.attention_backend():
        if attn_mask.shape[0] == 3:  # diffusers' native backend rejects it too (SDPA broadcasting)
            with pytest.raises(RuntimeError):
                attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=attn_mask)
        else:
            out = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=attn_mask)
            native = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend="native")
            assert torch.equal(out, native)
    assert [r for r in diffusers_attention.calls() if why in r], diffusers_attention.calls()


def _keep(batch: int, length: int) -> torch.Tensor:
    keep = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    keep[0, 2] = keep[0, 7] = False
    keep[1, 5:] = False
    return keep


def _against_native(q, k, v, attn_mask, native_mask, native_dtype=torch.float32, **kwargs):
    """Ours (reference backend) and native (on ``native_dtype`` copies) on every row, outputs and q/k/v
    gradients (rel-L2 1e-5)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    native_leaves = [t.detach().to(native_dtype).requires_grad_() for t in (q, k, v)]
    if native_mask is not None and native_mask.is_floating_point():
        native_mask = native_mask.to(native_dtype)
    upstream = fresh(q.shape, torch.float32, seed=7)
    with fkd.attention_backend(backend="reference"):
        out = attention_dispatch.dispatch_attention_fn(*leaves, attn_mask=attn_mask, **kwargs)
    native = attention_dispatch.dispatch_attention_fn(*native_leaves, attn_mask=native_mask, backend="native",
                                                      **kwargs)  # fmt: skip
    (out * upstream).sum().backward()
    (native * upstream.to(native_dtype)).sum().backward()
    assert_rel_close(out, native, 1e-5, "every row")
    for name, a, b in zip("qkv", leaves, native_leaves):
        assert_rel_close(a.grad, b.grad, 1e-5, f"grad {name}")
    return out


@pytest.mark.parametrize("mask_shape", [(9,), (1, 9), (2, 9), (2, 1, 9), (2, 1, 1, 9), (2, 1, 9, 9)], ids=str)
@pytest.mark.parametrize("k_len", [9, 5], ids=["Lq==Lk", "Lq!=Lk"])
def test_key_masks_never_remove_query_rows(mask_shape, k_len):
    """Every broadcastable key-mask shape (one expanded over queries, stride 0), with as many keys as queries
    (Cosmos: diffusers cannot say it is a cross-attention) and fewer; every row, masked tokens' rows included,
    equals native; 4 query heads on 2 kv heads."""
    q = fresh((2, 9, 4, 16), torch.float32, seed=1)
    k, v = (fresh((2, k_len, 2, 16), torch.float32, seed=s) for s in (2, 3))
    keep = _keep(2, 9)[:, :k_len]
    keep = keep[:1] if mask_shape[0] in (1, 9) else keep
    shape = (*mask_shape[:-1], k_len)
    attn_mask = keep.reshape(shape[0], 1, 1, k_len).expand(shape) if len(shape) == 4 else keep.reshape(shape)
    sdpa_mask = keep.view(keep.shape[0], 1, 1, k_len)  # the native backend does not take 1-D masks
    _against_native(q, k, v, attn_mask, sdpa_mask, enable_gqa=True)
    assert diffusers_attention.calls() == {"varlen": 1}


def test_sample_without_keys_and_cross_attention_without_mask():
    # A sample whose every key is masked: rows of exactly 0, as torch's math SDPA gives; then Lq != Lk unmasked.
    q, k, v = (
        fresh((2, 6, 2, 16), torch.float32, seed=1),
        *(fresh((2, 4, 2, 16), torch.float32, seed=s) for s in (2, 3)),
    )
    keep = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    out = _against_native(q, k, v, keep, keep.view(2, 1, 1, 4))
    assert torch.count_nonzero(out[1]) == 0
    _against_native(q, k, v, None, None)
    assert diffusers_attention.calls() == {"varlen": 2}


def test_separable_per_query_masks_run_ours_and_compiled_tracing_runs_native(monkeypatch):
    # Chroma's (B, 1, L, L) mask, keep[:, None, None, :] * keep[:, None, :, None]: every row the key mask or all
    # False. Ours on every row (the fully masked rows 0, as native), gradients included.
    q, k, v = (fresh((2, 9, 2, 16), torch.float32, seed=s) for s in (1, 2, 3))
    keep = _keep(2, 9)
    outer = keep[:, None, None, :] * keep[:, None, :, None]
    assert outer.dtype == torch.bool and outer.stride(-2) != 0
    _against_native(q, k, v, outer, outer)
    # A key mask materialized over queries (every row the same) is separable too.
    _against_native(q, k, v, keep[:, None, None, :].expand(2, 1, 9, 9).clone(), outer.any(-2, keepdim=True))
    assert diffusers_attention.calls() == {"varlen": 2}
    # While torch.compile traces, the separability test (a host read) is not possible: native, and said so.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert diffusers_attention._key_mask(outer, 2, 9, 9)[2].startswith("per-query mask while torch.compile traces")


def test_float_padding_biases_and_per_head_copies_are_key_masks(monkeypatch):
    # 0 / -10000 biases (LTX-Video's), repeated per head as diffusers' prepare_attention_mask does; a sample
    # whose every key carries the bias: the constant cancels, every key counts (as native). And -inf biases.
    q = fresh((2, 6, 2, 16), torch.float32, seed=1)
    k, v = (fresh((2, 5, 2, 16), torch.float32, seed=s) for s in (2, 3))
    keep = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    keep[0, 3:] = False
    keep[1] = False
    bias = ((~keep).float() * -10000.0)[:, None, None, :].repeat(1, 2, 1, 1)  # (B, H, 1, Lk), real copies
    # Native in float64: in fp32 it rounds score - 10000 to a 1e-3 grid (the all-biased sample), ours does not.
    _against_native(q, k, v, bias, bias, native_dtype=torch.float64)
    inf_bias = torch.zeros(2, 1, 1, 5, device=DEVICE).masked_fill(~keep[:, None, None, :], float("-inf"))
    inf_bias[1] = 0.0  # (a fully -inf row is NaN in SDPA's fused kernels; only the math path gives 0)
    _against_native(q, k, v, inf_bias, inf_bias)
    assert diffusers_attention.calls() == {"varlen": 2}
    # Biases that are not a key selection, or any value read while torch.compile traces: native.
    small = bias / 100
    assert "not a 0 / <= -10000 key mask" in diffusers_attention._key_mask(small, 2, 6, 5)[2]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "while torch.compile traces" in diffusers_attention._key_mask(bias, 2, 6, 5)[2]
