"""``patch_rms_norm``: runs the RMSNorm modules of other codebases on ``fk.rms_norm``, found by duck type.

A module qualifies when it is a leaf with a 1-D ``weight`` (or ``weight=None`` and a known width), an epsilon
attribute (``eps``, ``variance_epsilon`` or ``epsilon``), no bias, and its own forward computes RMSNorm: a
probe on a small random input (non-zero mean, so LayerNorm fails it) must agree with ``fk.rms_norm`` to
within the DESIGN.md tolerance for the weight's dtype. That covers Lumina-T2X's ``RMSNorm``, apex
``FusedRMSNorm``, diffusers' ``RMSNorm``, timm's ``RmsNorm``, ``torch.nn.RMSNorm`` and HF ``LlamaRMSNorm``,
and rejects look-alikes with other math (Gemma's ``x * (1 + weight)``, LayerNorm without bias).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import rms_norm
from ._patching import PatchReport, install, is_patched, state_of

KIND = "rms_norm"
EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
WIDTH_ATTRS = ("normalized_shape", "dim", "hidden_size")
# rel-L2 the probe allows, by the weight's dtype (DESIGN.md tolerances, with room for other roundings).
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _eps_attr(module: nn.Module) -> str | None:
    for name in EPS_ATTRS:
        if hasattr(module, name):
            value = getattr(module, name)
            if value is None and isinstance(module, nn.RMSNorm):
                return name  # torch.nn.RMSNorm(eps=None) uses finfo(x.dtype).eps
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return name
    return None


def _width(module: nn.Module, weight: torch.Tensor | None) -> int | None:
    if weight is not None:
        return weight.shape[0]
    for name in WIDTH_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list, torch.Size)) and len(value) == 1:
            return int(value[0])
    return None


def _resolve_eps(module: nn.Module, eps_attr: str, dtype: torch.dtype) -> float:
    eps = getattr(module, eps_attr)
    return torch.finfo(dtype).eps if eps is None else float(eps)


def _looks_like_rms_norm(module: nn.Module) -> tuple[bool, str]:
    """(True, "") when ``module`` has RMSNorm's attributes; else (False, why not)."""
    if next(iter(module.children()), None) is not None:
        return False, "has child modules"
    if not hasattr(module, "weight"):
        return False, "no weight attribute"
    weight = module.weight
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1):
        return False, "weight is not a 1-D tensor (normalizes over more than the last dim?)"
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        return False, "has a bias"
    if _eps_attr(module) is None:
        return False, f"no numeric epsilon attribute ({', '.join(EPS_ATTRS)})"
    if _width(module, weight) is None:
        return False, "weight is None and the width is unknown"
    return True, ""


def _probe(module: nn.Module, eps_attr: str) -> str:
    """Runs the module's own forward and ours on one random input; returns "" when they agree, else why not."""
    weight = module.weight
    width = _width(module, weight)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        return "weights are on the meta device"
    if dtype not in PROBE_TOLERANCE:
        return f"weight dtype {dtype} is not supported"
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randn(3, width, generator=gen, dtype=torch.float64) * 1.5 + 0.5).to(device=device, dtype=dtype)
    saved = module.__dict__.get("forward")
    try:
        with torch.no_grad():
            theirs = saved(x) if saved is not None else type(module).forward(module, x)
            ours = rms_norm(x, weight, _resolve_eps(module, eps_attr, dtype), backend="reference")
    except Exception as exc:  # a forward that needs other arguments is not a drop-in RMSNorm
        return f"probe failed: {type(exc).__name__}: {exc}"
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape:
        return "its forward does not return a tensor of the input's shape"
    diff = (theirs.double() - ours.double()).norm() / ours.double().norm().clamp_min(1e-30)
    if not diff <= PROBE_TOLERANCE[dtype]:
        return f"its forward is not RMSNorm (rel-L2 {float(diff):.2e} from fk.rms_norm on a probe)"
    return ""


def _rms_norm_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    state = state_of(self)
    weight = self.weight
    if args or kwargs:
        return state.call_original(self, "extra forward arguments", x, *args, **kwargs)
    if (weight is not None and weight.dtype != x.dtype) or not x.is_floating_point():
        # Mixed dtypes keep the codebase's own promotion rules (e.g. fp32 weights under autocast).
        return state.call_original(self, f"input {x.dtype} with weight {getattr(weight, 'dtype', None)}", x)
    eps = _resolve_eps(self, state.extra["eps_attr"], x.dtype)
    return rms_norm(x, weight, eps, prefer=state.backend)


def patch_rms_norm(model: nn.Module, backend: str | None = None) -> PatchReport:
    """Makes every RMSNorm-like module under ``model`` (``model`` itself included) run ``fk.rms_norm``.

    Modules keep their class, parameters (the same ``weight`` object) and state_dict; only their forward
    changes. Calls whose input dtype differs from the weight's run the module's original forward, so
    codebase-specific dtype promotion is kept. ``backend``: the ``fk.rms_norm`` backend preference (``prefer=``).
    Patching twice is harmless; :func:`flagdit_kernels.integrations.unpatch` undoes it. Returns a
    :class:`PatchReport`: swapped modules, modules already patched, and RMSNorm-named modules left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    for name, module in model.named_modules():
        label = type(module).__name__
        if is_patched(module):
            report.already[name] = f"{label} ({state_of(module).kind})"
            continue
        ok, why = _looks_like_rms_norm(module)
        if ok:
            eps_attr = _eps_attr(module)
            why = _probe(module, eps_attr)
            if not why:
                install(module, KIND, _rms_norm_forward, backend, eps_attr=eps_attr)
                report.swapped[name] = f"{label} -> fk.rms_norm"
                continue
        if "rmsnorm" in label.lower().replace("_", ""):
            report.skipped[name] = f"{label}: {why}"
    return report
