"""fk.varlen_attention as a backend of diffusers' attention dispatcher, on tiny random Flux and Wan transformers.

Outputs and gradients against diffusers' native backend (fp32 rel-L2 < 1e-4); padding masks become packed
layouts, what the kernel does not cover runs the native backend and is counted as such.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import DEVICE, assert_rel_close, fresh
from integration_fixtures import backends
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


MODELS = {
    # name: (model, inputs, dispatcher calls per forward that run varlen / native)
    "flux": (flux_model, flux_inputs, {"varlen": 2}),
    "flux-padded-prompt": (flux_model, lambda: flux_inputs(mask=True), {"varlen": 2}),
    "wan": (wan_model, wan_inputs, {"varlen": 2, "native: cross-attention (Lq != Lk)": 2}),
}


def _forward_backward(model: nn.Module, inputs: dict, upstream: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    (out * upstream).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", backends(("varlen_attention",)))
@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_match_native(name, backend):
    make_model, make_inputs, expected_calls = MODELS[name]
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
        (lambda b, lq: torch.zeros(b, 1, lq, lq), "mask (an additive mask"),
        (lambda b, lq: torch.ones(b, 1, lq, lq, dtype=torch.bool), "varies per query or head"),
        (lambda b, lq: torch.ones(3, lq, dtype=torch.bool), "does not broadcast over the batch"),
    ],
    ids=["additive", "per-query", "batch"],
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


@pytest.mark.parametrize("mask_shape", [(9,), (1, 9), (2, 9), (2, 1, 9), (2, 1, 1, 9)], ids=str)
def test_key_padding_masks_and_gqa(mask_shape):
    """Every broadcastable key-padding shape; rows of masked tokens come back as 0; 4 query heads on 2 kv heads."""
    q = fresh((2, 9, 4, 16), torch.float32, seed=1)
    k, v = (fresh((2, 9, 2, 16), torch.float32, seed=s) for s in (2, 3))
    keep = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    keep[0, 2] = keep[0, 7] = False
    keep[1, 5:] = False
    keep = keep[:1] if mask_shape[0] in (1, 9) else keep
    attn_mask = keep.reshape(mask_shape)
    with fkd.attention_backend(backend="reference"):
        out = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    sdpa_mask = keep.view(keep.shape[0], 1, 1, 9)  # the native backend does not take 1-D masks
    native = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=sdpa_mask, enable_gqa=True, backend="native")
    real = keep.expand(2, 9)
    assert diffusers_attention.calls() == {"varlen": 1}
    assert_rel_close(out[real], native[real], 1e-5, "real rows")
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
