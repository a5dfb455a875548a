"""Swap our kernels into other DiT codebases without touching their weights.

- :func:`patch_rms_norm` (any model): RMSNorm modules of Lumina-T2X, apex, diffusers, timm, torch, HF,
  found by duck type, run ``fk.rms_norm``.
- ``flagdit_kernels.integrations.diffusers.patch`` (diffusers' ``LuminaNextDiT2DModel`` and
  ``Lumina2Transformer2DModel``): whole blocks run on the fused norms, QK-norm + RoPE and varlen attention.
- ``flagdit_kernels.integrations.diffusers.attention_backend()`` (any diffusers model on its attention
  dispatcher: Flux, Wan, ...): ``fk.varlen_attention`` as a dispatcher backend (``diffusers_attention``).
- :func:`unpatch` undoes either. Both patches return a :class:`PatchReport` naming what was swapped.

The diffusers modules are imported on use: ``from flagdit_kernels.integrations import diffusers as fkd``.
"""

from ._patching import PatchReport, is_patched, unpatch
from .rmsnorm import patch_rms_norm

__all__ = ["PatchReport", "is_patched", "patch_rms_norm", "unpatch"]
