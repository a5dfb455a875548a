"""``patch_ada_layer_norm``: diffusers' adaLN-LayerNorm output norms (Flux / SD3's ``AdaLayerNormContinuous``,
Lumina's ``LuminaLayerNormContinuous``) on ``fk.layer_norm_modulate``: same outputs and gradients as diffusers'
own forward, the state_dict untouched, fallbacks counted, unpatch restoring the original forward."""

from __future__ import annotations

import pytest
import torch
from support.helpers import DEVICE, assert_rel_close, fresh
from support.integration_fixtures import assert_same_state, backends, state_snapshot

from flagdit_kernels.integrations import patch_ada_layer_norm, unpatch

normalization = pytest.importorskip("diffusers.models.normalization")


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return module.to(DEVICE)


def _norms() -> dict[str, torch.nn.Module]:
    return {
        # Flux / SD3 norm_out: no affine, eps 1e-6, scale and shift
        "ada_continuous": normalization.AdaLayerNormContinuous(40, 24, elementwise_affine=False, eps=1e-6),
        # with the LayerNorm's own weight and bias
        "ada_continuous_affine": normalization.AdaLayerNormContinuous(40, 24, elementwise_affine=True, eps=1e-5),
        # Lumina-Next / Lumina-2 norm_out: scale only, then linear_2
        "lumina_continuous": normalization.LuminaLayerNormContinuous(
            40, 24, elementwise_affine=False, eps=1e-6, out_dim=12
        ),
    }


@pytest.mark.parametrize("backend", backends(("layer_norm_modulate",)))
@pytest.mark.parametrize("kind", list(_norms()))
def test_patched_norm_matches_diffusers(kind, backend):
    module = _randomized(_norms()[kind], seed=3)
    before = state_snapshot(module)
    x = fresh((2, 7, 40), torch.float32, scale=2.0, offset=0.5).requires_grad_()
    cond = fresh((2, 24), torch.float32).requires_grad_()
    want = module(x, cond)
    want_grads = torch.autograd.grad(want.square().sum(), [x, cond, *module.parameters()])

    report = patch_ada_layer_norm(module, backend=backend)
    assert report.swapped == {"": f"{type(module).__name__} -> fk.layer_norm_modulate"}
    got = module(x, cond)
    got_grads = torch.autograd.grad(got.square().sum(), [x, cond, *module.parameters()])
    assert_rel_close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads):
        assert_rel_close(g, w, 1e-5, "gradient")
    assert_same_state(module, before)
    assert patch_ada_layer_norm(module).already  # a second patch leaves it as it is

    unpatch(module)
    assert torch.equal(module(x, cond), want)


def test_calls_the_fused_op_does_not_cover_fall_back():
    """A 2-D x (diffusers broadcasts it against (B, 1, D) modulation) runs diffusers' own forward, counted."""
    module = _randomized(_norms()["ada_continuous"], seed=4)
    patch_ada_layer_norm(module, backend="reference")
    x, cond = fresh((7, 40), torch.float32), fresh((7, 24), torch.float32)
    assert torch.equal(module(x, cond), type(module).forward(module, x, cond))
    state = module._flagdit_kernels_patch
    assert state.fallback_calls == 1 and next(iter(state.fallbacks)).startswith("x (7, 40)")


def test_rms_norm_variant_and_other_modules_are_left_alone():
    rms = normalization.AdaLayerNormContinuous(40, 24, elementwise_affine=False, eps=1e-6, norm_type="rms_norm")
    model = torch.nn.Sequential(rms, torch.nn.LayerNorm(40))
    report = patch_ada_layer_norm(model)
    assert report.swapped == {}
    assert "not a torch.nn.LayerNorm" in report.skipped["0"]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        patch_ada_layer_norm("model")
