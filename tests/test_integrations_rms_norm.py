"""patch_rms_norm over RMSNorm modules of other codebases, written here as those codebases define them.

Swapped modules must give the same outputs and gradients (fp32 rel-L2 < 1e-5, bf16 < 1e-2), keep their
weights and state_dict, skip look-alikes with other math, and be restored exactly by unpatch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.helpers import DEVICE, assert_rel_close, fresh
from support.integration_fixtures import assert_same_state, backends, state_snapshot
from torch import nn

from flagdit_kernels.integrations import patch_rms_norm, unpatch

OPS = ("rms_norm",)


# --------------------------------------------------------------------------------------------------------------
# patch_rms_norm over RMSNorms of other codebases (written here as those codebases define them).


class LuminaT2XRMSNorm(nn.Module):
    """Lumina-T2X's RMSNorm: fp32 normalize, round to x's dtype, then multiply by weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FusedRMSNorm(nn.Module):
    """apex.normalization.FusedRMSNorm's attributes (normalized_shape, eps, elementwise_affine, weight)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(normalized_shape)) if elementwise_affine else None

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class RmsNorm(nn.Module):
    """timm.layers.RmsNorm: computes in the input dtype, weight registered as None without affine."""

    def __init__(self, channels, eps=1e-6, affine=True):
        super().__init__()
        self.normalized_shape = (channels,)
        self.eps = eps
        self.elementwise_affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight if self.weight is not None else x


class LlamaRMSNorm(nn.Module):
    """Hugging Face transformers' LlamaRMSNorm (``variance_epsilon``)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class GemmaRMSNorm(LlamaRMSNorm):
    """Has RMSNorm's attributes but scales by (1 + weight): must be left alone."""

    def forward(self, hidden_states):
        return super().forward(hidden_states) / self.weight * (1.0 + self.weight)


class Zoo(nn.Module):
    def __init__(self, d: int = 24):
        super().__init__()
        self.proj = nn.Linear(d, d)
        norms = {
            "lumina": LuminaT2XRMSNorm(d),
            "apex": FusedRMSNorm(d),
            "apex_no_affine": FusedRMSNorm(d, elementwise_affine=False),
            "timm": RmsNorm(d),
            "timm_no_affine": RmsNorm(d, affine=False),
            "llama": LlamaRMSNorm(d),
            "torch": nn.RMSNorm(d, eps=1e-5),
            "torch_default_eps": nn.RMSNorm(d),
            "gemma": GemmaRMSNorm(d),
            "layer_norm": nn.LayerNorm(d),
            "layer_norm_no_bias": nn.LayerNorm(d, bias=False),
            "torch_2d": nn.RMSNorm((3, d)),
        }
        try:
            from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

            norms["diffusers"] = DiffusersRMSNorm(d, eps=1e-5)
            norms["diffusers_no_affine"] = DiffusersRMSNorm(d, eps=1e-6, elementwise_affine=False)
        except ImportError:
            pass
        self.norms = nn.ModuleDict(norms)

    def forward(self, x):
        h = self.proj(x)
        outs = [norm(h) for name, norm in self.norms.items() if name != "torch_2d"]
        outs.append(self.norms["torch_2d"](torch.stack([h, -h, 2 * h], dim=-2)).sum(-2))
        return torch.stack(outs)


SWAPPED = ["lumina", "apex", "apex_no_affine", "timm", "timm_no_affine", "llama", "torch", "torch_default_eps"]


def _zoo(dtype=torch.float32) -> Zoo:
    zoo = Zoo()
    with torch.no_grad():
        for norm in zoo.norms.values():
            if getattr(norm, "weight", None) is not None:
                norm.weight.copy_(1.0 + 0.3 * fresh(norm.weight.shape, torch.float32, seed=3))
    return zoo.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", backends(OPS))
def test_patch_rms_norm_zoo(backend):
    zoo = _zoo()
    x = fresh((5, 9, 24), torch.float32, seed=4, offset=0.3)
    snapshot = state_snapshot(zoo)
    with torch.no_grad():
        expected = zoo(x)
        report = patch_rms_norm(zoo, backend=backend)
        actual = zoo(x)
    extra = ["diffusers", "diffusers_no_affine"] if "diffusers" in zoo.norms else []
    expected_names = [f"norms.{n}" for n in SWAPPED + extra]
    assert sorted(report.swapped) == sorted(expected_names), str(report)
    assert "norms.gemma" in report.skipped and "not RMSNorm" in report.skipped["norms.gemma"]
    assert "norms.torch_2d" in report.skipped and "1-D" in report.skipped["norms.torch_2d"]
    assert not any(k.startswith("norms.layer_norm") for k in (*report.swapped, *report.skipped))
    assert_rel_close(actual, expected, 1e-5, "zoo outputs")
    assert_same_state(zoo, snapshot)

    again = patch_rms_norm(zoo, backend=backend)
    assert not again.swapped and sorted(again.already) == sorted(expected_names)
    restored = unpatch(zoo)
    assert sorted(restored.restored) == sorted(expected_names)
    with torch.no_grad():
        assert torch.equal(zoo(x), expected)


def test_patch_rms_norm_runs_our_op(monkeypatch):
    zoo = _zoo()
    patch_rms_norm(zoo, backend="reference")
    calls = []
    import flagdit_kernels.integrations.rmsnorm as mod

    real = mod.rms_norm
    monkeypatch.setattr(mod, "rms_norm", lambda *a, **k: calls.append(k.get("prefer")) or real(*a, **k))
    with torch.no_grad():
        zoo(fresh((2, 24), torch.float32, seed=5))
    assert len(calls) == len(SWAPPED) + (2 if "diffusers" in zoo.norms else 0)
    assert set(calls) == {"reference"}


def test_patch_rms_norm_gradients_and_bf16():
    zoo = _zoo(torch.bfloat16)
    x = fresh((4, 24), torch.bfloat16, seed=6, offset=0.3).requires_grad_(True)
    expected = zoo(x)
    g_expected = torch.autograd.grad(expected.float().square().sum(), [x, zoo.norms["lumina"].weight])
    patch_rms_norm(zoo, backend="reference")
    actual = zoo(x)
    g_actual = torch.autograd.grad(actual.float().square().sum(), [x, zoo.norms["lumina"].weight])
    assert actual.dtype == torch.bfloat16
    assert_rel_close(actual, expected, 1e-2, "bf16 zoo")
    for a, e in zip(g_actual, g_expected):
        assert_rel_close(a, e, 2e-2, "bf16 grads")


def test_patch_rms_norm_mixed_dtype_keeps_original_promotion():
    norm = LuminaT2XRMSNorm(16).to(DEVICE)  # fp32 weight
    patch_rms_norm(norm)
    x = fresh((3, 16), torch.bfloat16, seed=8)
    out = norm(x)
    assert out.dtype == torch.float32  # Lumina's own rule: bf16 normed * fp32 weight
    assert norm._flagdit_kernels_patch.fallback_calls == 1


def test_patch_rms_norm_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch"):
        patch_rms_norm([LuminaT2XRMSNorm(8)])
