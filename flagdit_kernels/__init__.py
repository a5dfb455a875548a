"""flagdit-kernels: fused kernels for Flow-based Large Diffusion Transformers (Flag-DiT, Lumina-T2X).

Every op runs on the fastest backend available for its tensors' device; ``backend=`` per call and the
``FLAGDIT_KERNELS_BACKEND`` environment variable override. ``fk.backend_info()`` says what is available.
"""

from . import integrations, nn
from ._dispatch import BACKENDS, available_backends
from ._info import backend_info
from .ops.attention import proportional_scale, varlen_attention
from .ops.embed import embed_packed
from .ops.norms import gated_residual_rms_norm, rms_norm, rms_norm_modulate
from .ops.packing import Packed, pack, unpack
from .ops.rope import apply_rope, qk_norm_rope, rope_freqs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Packed",
    "apply_rope",
    "available_backends",
    "backend_info",
    "embed_packed",
    "gated_residual_rms_norm",
    "integrations",
    "nn",
    "pack",
    "proportional_scale",
    "qk_norm_rope",
    "rms_norm",
    "rms_norm_modulate",
    "rope_freqs",
    "unpack",
    "varlen_attention",
]
