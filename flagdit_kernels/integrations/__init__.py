"""Swap our kernels into other DiT codebases without touching their weights.

- :func:`patch_rms_norm` (any model): RMSNorm modules of Lumina-T2X, apex, diffusers, timm, torch, HF,
  found by duck type, run ``fk.rms_norm``.
- :func:`patch_ada_layer_norm` (any model): diffusers' adaLN-LayerNorm output norms (``AdaLayerNormContinuous``
  of Flux / SD3 / Wan, ``LuminaLayerNormContinuous``) run ``fk.layer_norm_modulate``.
- ``flagdit_kernels.integrations.diffusers.patch`` (diffusers' ``LuminaNextDiT2DModel`` and
  ``Lumina2Transformer2DModel``): whole blocks run on the fused norms, QK-norm + RoPE and varlen attention.
- ``flagdit_kernels.integrations.diffusers.attention_backend()`` (any diffusers model on its attention
  dispatcher: Flux, Wan, ...): ``fk.varlen_attention`` as a dispatcher backend (``diffusers_attention``).
- :func:`unpatch` undoes either. Both patches return a :class:`PatchReport` naming what was swapped.

The diffusers modules are imported on use: ``from flagdit_kernels.integrations import diffusers as fkd``.
"""

from ._patching import PatchReport, is_patched, unpatch
from .adaln import patch_ada_layer_norm
from .rmsnorm import patch_rms_norm

__all__ = ["PatchReport", "is_patched", "patch_ada_layer_norm", "patch_rms_norm", "unpatch"]
