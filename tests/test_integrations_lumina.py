"""Integrations: diffusers' Lumina transformers patched onto our ops, and patch_rms_norm over a zoo of RMSNorms.

Patched and unpatched models are compared on small random configs (fp32 rel-L2 < 1e-4, DESIGN.md's model
tolerance) with padded caption masks; patching twice changes nothing, unpatch restores bit-exact outputs,
state_dicts keep their keys and tensors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support.helpers import DEVICE, assert_rel_close, fresh, rel_l2
from support.integration_fixtures import assert_same_state, backends, state_snapshot
from torch import nn

import flagdit_kernels as fk
from flagdit_kernels.integrations import is_patched, unpatch

OPS = ("rms_norm", "rms_norm_modulate", "gated_residual_rms_norm", "qk_norm_rope", "varlen_attention")


# --------------------------------------------------------------------------------------------------------------
# diffusers models

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
fkd = pytest.importorskip("flagdit_kernels.integrations.diffusers")


def _randomize(model: nn.Module, seed: int) -> None:
    """Default init leaves norms at 1, gates and caption attention at 0: make every parameter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("gate") or "norm" in name or name.endswith("pad_token"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def _tie_queries(model: nn.Module) -> None:
    """Converted checkpoints hold Lumina's single wq / q_norm in both attn1 and attn2."""
    with torch.no_grad():
        for block in model.layers:
            block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())


# One tiny size for both generations (4 query heads on 2 kv heads); each adds its own caption and RoPE settings.
TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_attention_heads=4, num_kv_heads=2, multiple_of=16
)


def _latents_and_captions(dtype, batch, height, width, text, seed) -> dict:
    """The inputs both generations take alike: latents, timesteps and caption features."""
    return dict(
        hidden_states=fresh((batch, 4, height, width), dtype, seed=seed),
        timestep=torch.rand(batch, generator=torch.Generator().manual_seed(seed)).to(DEVICE),
        encoder_hidden_states=fresh((batch, text, 24), dtype, seed=seed + 1),
    )


def next_model(dtype=torch.float32, seed=0, layers=2):
    model = diffusers.LuminaNextDiT2DModel(**TINY, num_layers=layers, cross_attention_dim=24)
    _randomize(model, seed)
    _tie_queries(model)
    return model.eval().to(DEVICE, dtype)


def next_inputs(dtype=torch.float32, batch=3, height=10, width=6, text=7, seed=1, base_sequence_length=None):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    mask = torch.ones(batch, text, dtype=torch.int64, device=DEVICE)
    mask[1, 4:] = 0  # padded captions; sample 2 keeps a single token
    mask[2, 1:] = 0
    return _latents_and_captions(dtype, batch, height, width, text, seed) | dict(
        encoder_mask=mask,
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 32, 32).to(DEVICE),
        cross_attention_kwargs={} if base_sequence_length is None else {"base_sequence_length": base_sequence_length},
        return_dict=False,
    )


def lumina2_model(dtype=torch.float32, seed=0, layers=2):
    model = diffusers.Lumina2Transformer2DModel(
        **TINY,
        num_layers=layers,
        num_refiner_layers=1,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32),
        cap_feat_dim=24,
    )
    _randomize(model, seed)
    return model.eval().to(DEVICE, dtype)


def lumina2_inputs(dtype=torch.float32, batch=3, height=8, width=6, text=7, seed=1):
    mask = torch.ones(batch, text, dtype=torch.bool, device=DEVICE)
    mask[1, 5:] = False  # different caption lengths: the joint layers get a padded mask too
    mask[2, 2:] = False
    return _latents_and_captions(dtype, batch, height, width, text, seed) | dict(
        encoder_attention_mask=mask, return_dict=False
    )


MODELS = {
    "lumina-next": (next_model, next_inputs, 2),
    "lumina2": (lumina2_model, lumina2_inputs, 4),  # 1 noise + 1 context refiner + 2 joint layers
}
CAPTION_MASK = {"lumina-next": "encoder_mask", "lumina2": "encoder_attention_mask"}


@pytest.mark.parametrize("backend", backends(OPS))
@pytest.mark.parametrize("name", MODELS)
def test_patched_matches_diffusers_fp32(name, backend):
    make_model, make_inputs, n_blocks = MODELS[name]
    model, inputs = make_model(), make_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
        report = fkd.patch(model, backend=backend)
        actual = model(**inputs)[0]
    blocks = [k for k, v in report.swapped.items() if "Block" in v]
    assert len(blocks) == n_blocks, str(report)
    assert not report.skipped, str(report)
    assert torch.isfinite(expected).all()
    assert_rel_close(actual, expected, 1e-4, f"{name} patched vs diffusers")


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("name", MODELS)
def test_mask_edited_in_place_between_calls_is_seen(name, grad_mode):
    """Pipelines run under inference_mode, where tensors have no version counter: nothing may be cached across
    calls. The edit also punches a hole in the middle of a caption (not a padded suffix)."""
    make_model, make_inputs, _ = MODELS[name]
    model, inputs = make_model(), make_inputs()
    patched = copy.deepcopy(model)
    fkd.patch(patched, backend="reference")
    with grad_mode():
        mask = inputs[CAPTION_MASK[name]].bool().clone()  # an inference tensor under inference_mode
        inputs[CAPTION_MASK[name]] = mask
        before = patched(**inputs)[0]
        mask[0, 3:] = False
        mask[2, :3] = True
        if name == "lumina-next":
            mask[0, 1] = False  # a hole; Lumina-2 reads its captions as prefixes of the mask's length
        expected = model(**inputs)[0]
        actual = patched(**inputs)[0]
    assert rel_l2(expected, before) > 1e-3, "the edit must change diffusers' output"
    assert_rel_close(actual, expected, 1e-4, f"{name} after an in-place mask edit")


def test_lumina_next_proportional_attention_scale():
    model, inputs = next_model(), next_inputs(base_sequence_length=9)
    with torch.no_grad():
        expected = model(**inputs)[0]
        fkd.patch(model, backend="reference")
        actual = model(**inputs)[0]
        plain = model(**next_inputs())[0]
    assert_rel_close(actual, expected, 1e-4, "base_sequence_length")
    assert rel_l2(plain, actual) > 1e-3, "the proportional scale must change the output"


def test_lumina_next_caption_branch_is_used_and_masked():
    model = next_model()
    fkd.patch(model, backend="reference")
    inputs = next_inputs()
    with torch.no_grad():
        out = model(**inputs)[0]
        changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
        changed["encoder_hidden_states"][1, 4:] += 5.0  # masked caption tokens: no effect
        assert rel_l2(model(**changed)[0], out) < 1e-6
        changed["encoder_hidden_states"][1, :4] += 1.0  # real caption tokens of sample 1: only that sample moves
        moved = model(**changed)[0]
        model.layers[0].gate.zero_()  # the caption branch is live: a zero gate changes the output
        no_text = model(**inputs)[0]
    assert rel_l2(moved[1], out[1]) > 1e-3
    assert rel_l2(moved[0], out[0]) < 1e-6 and rel_l2(moved[2], out[2]) < 1e-6
    assert rel_l2(no_text, out) > 1e-3


def test_lumina_next_untied_query_keeps_diffusers_cross_attention():
    model = next_model()
    with torch.no_grad():
        model.layers[0].attn2.to_q.weight.mul_(1.5)  # attn2 no longer shares attn1's query
        inputs = next_inputs()
        expected = model(**inputs)[0]
        fkd.patch(model, backend="reference")
        actual = model(**inputs)[0]
    assert_rel_close(actual, expected, 1e-4, "untied query")
    assert model.layers[0]._flagdit_kernels_patch.extra["tied"] is False
    assert model.layers[1]._flagdit_kernels_patch.extra["tied"] is True
    with torch.no_grad():  # tying it again later is noticed (version counter), no re-patch needed
        model.layers[0].attn2.to_q.weight.copy_(model.layers[0].attn1.to_q.weight)
        retied = model(**inputs)[0]
    assert model.layers[0]._flagdit_kernels_patch.extra["tied"] is True
    assert torch.isfinite(retied).all()


@pytest.mark.parametrize("name", MODELS)
def test_patch_twice_and_unpatch(name):
    make_model, make_inputs, _ = MODELS[name]
    model, inputs = make_model(), make_inputs()
    snapshot = state_snapshot(model)
    params_before = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(**inputs)[0]
        first = fkd.patch(model, backend="reference")
        once = model(**inputs)[0]
        second = fkd.patch(model, backend="reference")
        twice = model(**inputs)[0]
    assert not second.swapped and set(second.already) == set(first.swapped), str(second)
    assert torch.equal(once, twice)
    assert_same_state(model, snapshot)
    assert all(p is params_before[n] for n, p in model.named_parameters()), "parameters must be the same objects"
    copied = copy.deepcopy(model)  # a patched model survives deepcopy (its forwards bind to the copy)
    with torch.no_grad():
        assert torch.equal(copied(**inputs)[0], once)

    restored = unpatch(model)
    assert set(restored.restored) == set(first.swapped)
    assert not any(is_patched(m) or "forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], expected), "unpatch must restore diffusers' exact outputs"
    assert_same_state(model, snapshot)
    assert not unpatch(model).restored


def _share_queries(model: nn.Module) -> None:
    """Ties attn2's query to attn1's as Lumina does (one wq / q_norm); state_dict keys stay the same."""
    for block in model.layers:
        block.attn2.to_q, block.attn2.norm_q = block.attn1.to_q, block.attn1.norm_q


@pytest.mark.parametrize(
    ("name", "share"), [("lumina-next", False), ("lumina-next", True), ("lumina2", False)], ids=str
)
def test_gradients_match(name, share):
    make_model, make_inputs, _ = MODELS[name]
    model, inputs = make_model(), make_inputs()
    if share:
        _share_queries(model)
    patched = copy.deepcopy(model)
    fkd.patch(patched, backend="reference")
    upstream = fresh(model(**inputs)[0].shape, torch.float32, seed=7)
    grads = []
    for m in (model, patched):
        (m(**inputs)[0] * upstream).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        if n.endswith("attn2.norm_k.bias"):  # softmax ignores a bias shared by all (un-rotated) text keys
            assert grads[1][n].abs().max() < 1e-3 and grads[0][n].abs().max() < 1e-3, n
            continue
        assert_rel_close(grads[1][n], grads[0][n], 1e-4, f"grad {n}")
    if name == "lumina-next":
        # separate (equal) query copies train apart, so the caption attention stays diffusers'; shared ones fuse
        path = patched.layers[0]._flagdit_kernels_patch.extra["last_path"]
        assert path == ("fused" if share else "separate")
        assert any(n.endswith(".gate") for n in grads[0])


def test_inference_fuses_equal_query_copies():
    model, inputs = next_model(), next_inputs()
    fkd.patch(model, backend="reference")
    with torch.no_grad():
        model(**inputs)
    assert all(b._flagdit_kernels_patch.extra["last_path"] == "fused" for b in model.layers)
    model(**inputs)  # grad mode, trainable copies: diffusers' own caption attention
    assert all(b._flagdit_kernels_patch.extra["last_path"] == "separate" for b in model.layers)


@pytest.mark.parametrize("name", MODELS)
def test_patched_matches_diffusers_bf16(name):
    make_model, make_inputs, _ = MODELS[name]
    model, inputs = make_model(torch.bfloat16), make_inputs(torch.bfloat16)
    reference = make_model(torch.float64)
    with torch.no_grad():
        exact = reference(**make_inputs(torch.float64))[0]
        theirs = model(**inputs)[0]
        fkd.patch(model, backend="reference")
        ours = model(**inputs)[0]
    assert ours.dtype == torch.bfloat16
    # Both against the fp64 model: ours must be no worse than diffusers' own bf16 run (plus slack).
    assert rel_l2(ours, exact) < max(2 * rel_l2(theirs, exact), 2e-2)


def test_block_falls_back_to_diffusers_without_rotary_embedding():
    model = next_model()
    block = model.layers[0]
    b, l, lt = 2, 6, 5
    args = (
        fresh((b, l, 64), torch.float32, seed=11),
        torch.ones(b, l, dtype=torch.int32, device=DEVICE),
        None,  # no RoPE: not the model's call pattern, so the patched block runs diffusers' forward
        fresh((b, lt, 24), torch.float32, seed=12),
        torch.ones(b, lt, dtype=torch.bool, device=DEVICE),
        fresh((b, 64), torch.float32, seed=13),
    )
    with torch.no_grad():
        expected = block(*args, cross_attention_kwargs={})
        fkd.patch(model, backend="reference")
        actual = block(*args)
    assert torch.equal(actual, expected)
    assert block._flagdit_kernels_patch.fallback_calls == 1


def test_real_valued_rotary_table_runs_diffusers_forward():
    """diffusers multiplies the complex query pairs by a real table (a scaling, no rotation): its forward
    defines that, so the patched blocks hand such calls back and count them."""
    model, inputs = next_model(), next_inputs()
    inputs["image_rotary_emb"] = inputs["image_rotary_emb"].real.contiguous()
    with torch.no_grad():
        expected = model(**inputs)[0]
        report = fkd.patch(model, backend="reference")
        actual = model(**inputs)[0]
    assert "real-valued" in report.swapped["layers.0"]
    assert torch.equal(actual, expected)
    state = model.layers[0]._flagdit_kernels_patch
    assert state.fallback_calls == 1 and "real-valued rotary table (1, 15, 8)" in next(iter(state.fallbacks))


def test_norm_swapped_after_patching_falls_back():
    """A norm whose weight the fused ops read directly, replaced after patching (an adapter on it), is seen on
    the next call: that block runs diffusers' forward with the new module."""

    class ScaledNorm(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 1.5 * self.inner(x)

    model, inputs = next_model(), next_inputs()
    fkd.patch(model, backend="reference")
    model.layers[1].norm2 = ScaledNorm(model.layers[1].norm2)
    reference = copy.deepcopy(model)
    unpatch(reference)
    with torch.no_grad():
        assert_rel_close(model(**inputs)[0], reference(**inputs)[0], 1e-4, "swapped norm")
    assert model.layers[0]._flagdit_kernels_patch.fallback_calls == 0
    assert list(model.layers[1]._flagdit_kernels_patch.fallbacks) == ["norm2 is not a bias-free diffusers RMSNorm"]


def _compiled(model: nn.Module, inputs: dict, fullgraph: bool = False) -> tuple[int, torch.Tensor]:
    """(graphs torch.compile makes of one call, the compiled output); one graph means no graph break."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=counting_backend, fullgraph=fullgraph)(**inputs)[0]
    return len(graphs), out


@pytest.mark.skipif(
    "triton" not in fk.available_backends("varlen_attention", DEVICE),
    reason="needs the triton backends (custom ops; TRITON_INTERPRET=1 or a GPU): the reference attention loops on "
    "the host",
)
@pytest.mark.parametrize("name", MODELS)
def test_compiled_patched_model_breaks_only_where_diffusers_does(name):
    """No host sync in the patched blocks: Lumina-Next compiles with fullgraph=True, Lumina-2 into as many
    graphs as diffusers' own forward (its caption lengths are a .tolist()). Small shapes: the interpreter runs
    the kernels while the graphs are counted."""
    make_model, make_inputs, _ = MODELS[name]
    model, inputs = make_model(layers=1), make_inputs(height=4, width=4)
    with torch.no_grad():
        theirs, expected = _compiled(model, inputs)
        fkd.patch(model, backend="triton")
        ours, actual = _compiled(model, inputs, fullgraph=name == "lumina-next")
    assert ours == theirs == (1 if name == "lumina-next" else 4)
    assert_rel_close(actual, expected, 1e-4, f"{name} compiled, patched vs diffusers")


def test_unpatch_one_kind():
    model = lumina2_model()
    report = fkd.patch(model, backend="reference")
    norms = [n for n, what in report.swapped.items() if what.endswith("fk.rms_norm")]
    assert norms == ["time_caption_embed.caption_embedder.0"]
    assert list(unpatch(model, kinds=("rms_norm",)).restored) == norms
    assert sum(is_patched(m) for m in model.modules()) == 5  # 4 blocks + the model's call (one layout per mask)
    assert len(unpatch(model).restored) == 5


def test_patch_rejects_other_models():
    with pytest.raises(ValueError, match="found no LuminaNextDiTBlock or Lumina2TransformerBlock"):
        fkd.patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        fkd.patch("not a model")


def test_unsupported_block_is_skipped_with_reason():
    model = next_model()
    model.layers[1].norm2 = nn.LayerNorm(64)
    report = fkd.patch(model, backend="reference")
    assert [n for n, what in report.swapped.items() if "Block" in what] == ["layers.0"]
    assert "layers.1.norm1_context" in report.swapped  # the skipped block's RMSNorms still run fk.rms_norm
    assert "norm2 is not a bias-free diffusers RMSNorm" in report.skipped["layers.1"]


def test_bench_case_quick():
    from flagdit.bench import diffusers_lumina
    from flagdit_kernels.bench.cases import Case

    (case,) = diffusers_lumina.cases(True, DEVICE)
    assert isinstance(case, Case) and case.op == "diffusers_lumina_next" and case.flops > 0
    assert set(case.impls) >= {"fk patched", "diffusers eager"}
    outputs = {label: build()() for label, build in case.impls.items() if label != "torch.compile"}
    assert_rel_close(outputs["fk patched"], outputs["diffusers eager"], 1e-4, "bench case outputs")
    # The 2B case's FLOP floor: ~29 TFLOP per 1024px CFG pair (matmuls ~22, attention ~7.4).
    assert 25e12 < diffusers_lumina.forward_flops(diffusers_lumina.NEXT_2B) < 35e12


# --------------------------------------------------------------------------------------------------------------
# peft LoRA on the attention projections: a patched model must train exactly as the unpatched one.

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _with_lora(model: nn.Module, seed: int) -> nn.Module:
    """peft LoRA adapters on every attention projection, seeded, with non-zero B so every adapter matters."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model


@pytest.mark.parametrize("order", ["adapters-then-patch", "patch-then-adapters"])
def test_lora_adapters_train_as_unpatched(order):
    model, inputs = lumina2_model(), lumina2_inputs()
    patched = copy.deepcopy(model)
    if order == "patch-then-adapters":
        fkd.patch(patched, backend="reference")
    _with_lora(model, seed=3)
    _with_lora(patched, seed=3)
    if order == "adapters-then-patch":
        report = fkd.patch(patched, backend="reference")
        assert not report.skipped and sum("Block" in what for what in report.swapped.values()) == 4, str(report)
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters), "add_adapter trains the adapters only"
    upstream = fresh(model(**inputs)[0].shape, torch.float32, seed=7)
    outputs, grads = [], []
    for m in (model, patched):
        out = m(**inputs)[0]
        (out * upstream).sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert_rel_close(outputs[1], outputs[0], 1e-4, "LoRA outputs")
    assert grads[0].keys() == grads[1].keys() == set(adapters)
    for n in adapters:
        assert grads[0][n].abs().max() > 0, n
        assert_rel_close(grads[1][n], grads[0][n], 1e-4, f"grad {n}")
    assert all(b._flagdit_kernels_patch.fallback_calls == 0 for b in (*patched.layers, *patched.noise_refiner))
