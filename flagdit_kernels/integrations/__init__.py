"""Swap our kernels into other DiT codebases without touching their weights.

- :func:`patch_rms_norm` (any model): RMSNorm modules of Lumina-T2X, apex, diffusers, timm, torch, HF,
  found by duck type, run ``fk.rms_norm``.
- ``flagdit_kernels.integrations.diffusers.patch`` (diffusers' ``LuminaNextDiT2DModel`` and
  ``Lumina2Transformer2DModel``): whole blocks run on the fused norms, QK-norm + RoPE and varlen attention.
- :func:`unpatch` undoes either. Both patches return a :class:`PatchReport` naming what was swapped.

The diffusers module imports diffusers, so it is not imported here: ``from flagdit_kernels.integrations
import diffusers as fk_diffusers``.
"""

from ._patching import PatchReport, is_patched, unpatch
from .rmsnorm import patch_rms_norm

__all__ = ["PatchReport", "is_patched", "patch_rms_norm", "unpatch"]
