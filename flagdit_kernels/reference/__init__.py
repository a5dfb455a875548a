"""The PyTorch definition of every op: the spec the kernels are tested against and the fallback anywhere.

These functions assume validated inputs; the public wrappers in ``flagdit_kernels`` check them first.
"""

from .attention import proportional_scale, varlen_attention
from .embed import embed_packed
from .norms import gated_residual_rms_norm, layer_norm_modulate, rms_norm, rms_norm_modulate
from .packing import Packed, TileLayout, pack, tile_layout, token_layout, unpack
from .rope import apply_rope, qk_norm_rope, rope_freqs

__all__ = [
    "Packed",
    "TileLayout",
    "apply_rope",
    "embed_packed",
    "gated_residual_rms_norm",
    "layer_norm_modulate",
    "pack",
    "proportional_scale",
    "qk_norm_rope",
    "rms_norm",
    "rms_norm_modulate",
    "rope_freqs",
    "tile_layout",
    "token_layout",
    "unpack",
    "varlen_attention",
]
