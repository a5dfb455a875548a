"""``patch_ada_layer_norm``: runs diffusers' adaLN-LayerNorm output norms on ``fk.layer_norm_modulate``.

Swapped: ``AdaLayerNormContinuous`` (the ``norm_out`` of Flux, SD3, HunyuanVideo, Wan: ``LayerNorm(x) *
(1 + scale) + shift`` with ``scale, shift = linear(silu(c)).chunk(2)``) and ``LuminaLayerNormContinuous``
(Lumina-Next's and Lumina-2's: ``LayerNorm(x) * (1 + linear_1(silu(c)))``, then ``linear_2`` when it has one),
when their ``norm`` is a ``torch.nn.LayerNorm`` over the last dim. The module's own Linear layers still run
(so adapters on them stay in the computation); the LayerNorm and the modulation become one fused pass. A call
the fused op does not cover (extra arguments, x not ``(B, L, D)``, norm parameters in another dtype than x)
runs the module's original forward, counted with its reason. Parameters, classes and the state_dict are
untouched; :func:`flagdit_kernels.integrations.unpatch` undoes it.

Numerics: fp32 matches diffusers within rel-L2 1e-5; in bf16 the modulation is rounded once at the end where
diffusers rounds after each elementwise step.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import layer_norm_modulate
from ._patching import PatchReport, install, is_patched, state_of

KIND = "ada_layer_norm"
# class name -> (the projection's attribute, whether it yields (scale, shift) or scale only)
MODULES = {"AdaLayerNormContinuous": ("linear", True), "LuminaLayerNormContinuous": ("linear_1", False)}


def _unsupported(module: nn.Module) -> str:
    """Why ``module`` (of a class in MODULES) cannot be swapped, or ""."""
    linear_attr, _ = MODULES[type(module).__name__]
    norm = getattr(module, "norm", None)
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return f"norm is {type(norm).__name__}, not a torch.nn.LayerNorm over the last dim"
    if not isinstance(getattr(module, linear_attr, None), nn.Linear) or not isinstance(
        getattr(module, "silu", None), nn.SiLU
    ):
        return f"no {linear_attr} Linear after a SiLU"
    return ""


def _forward(self: nn.Module, x: torch.Tensor, conditioning_embedding: torch.Tensor, *args, **kwargs):
    state = state_of(self)
    if args or kwargs:
        return state.call_original(self, "extra forward arguments", x, conditioning_embedding, *args, **kwargs)
    norm = self.norm
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if x.dim() != 3 or not x.is_floating_point() or any(p.dtype != x.dtype for p in params):
        why = f"x {tuple(x.shape)} {x.dtype} with norm parameters in {[p.dtype for p in params]}"
        return state.call_original(self, why, x, conditioning_embedding)
    linear_attr, with_shift = MODULES[type(self).__name__]
    # As diffusers does: the conditioning back in x's dtype (it may come upcast to fp32) before the projection.
    emb = getattr(self, linear_attr)(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = emb.chunk(2, dim=1) if with_shift else (emb, None)
    out = layer_norm_modulate(x, scale, shift, norm.weight, norm.bias, norm.eps, prefer=state.backend)
    linear_2 = getattr(self, "linear_2", None)
    return linear_2(out) if linear_2 is not None else out


def patch_ada_layer_norm(model: nn.Module, backend: str | None = None) -> PatchReport:
    """Makes every diffusers ``AdaLayerNormContinuous`` / ``LuminaLayerNormContinuous`` under ``model`` with a
    LayerNorm run ``fk.layer_norm_modulate``. ``backend``: its backend preference (``prefer=``). Patching twice
    is harmless. Returns a :class:`PatchReport`: swapped modules, modules already patched, and modules of those
    classes left alone (with the reason)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    for name, module in model.named_modules():
        label = type(module).__name__
        if label not in MODULES:
            continue
        if is_patched(module):
            report.already[name] = f"{label} ({state_of(module).kind})"
            continue
        why = _unsupported(module)
        if why:
            report.skipped[name] = f"{label}: {why}"
            continue
        install(module, KIND, _forward, backend)
        report.swapped[name] = f"{label} -> fk.layer_norm_modulate"
    return report
