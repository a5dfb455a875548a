"""flagdit-kernels: fused kernels for Flow-based Large Diffusion Transformers (Flag-DiT, Lumina-T2X).

Every op runs on the fastest backend available for its inputs; ``backend=`` per call, ``prefer=`` (a module's
or model's backend) and the ``FLAGDIT_KERNELS_BACKEND`` environment variable override, in that order.
``fk.backend_info()`` says what is available. This module is the package's public API: the model
(``flagdit``), the integrations and the benchmarks use nothing else.

``fk.integrations`` (patching other codebases' modules) is imported on first use.
"""

from . import nn
from ._dispatch import BACKENDS, available_backends
from ._info import backend_info
from ._layout import VarlenLayout
from .ops.attention import proportional_scale, varlen_attention
from .ops.embed import embed_packed
from .ops.norms import gated_residual_rms_norm, rms_norm, rms_norm_modulate
from .ops.packing import NEXTFRAME, NEXTLINE, PATCH, Packed, TileLayout, pack, unpack
from .ops.rope import apply_rope, qk_norm_rope, rope_freqs
from .ops.tile_sparsity import (
    TileBlocks,
    TileSparsity,
    last_tile_blocks,
    tile_sparse_attention,
    tile_sparse_blocks,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "NEXTFRAME",
    "NEXTLINE",
    "PATCH",
    "Packed",
    "TileBlocks",
    "TileLayout",
    "TileSparsity",
    "VarlenLayout",
    "apply_rope",
    "available_backends",
    "backend_info",
    "embed_packed",
    "gated_residual_rms_norm",
    "integrations",
    "last_tile_blocks",
    "nn",
    "pack",
    "proportional_scale",
    "qk_norm_rope",
    "rms_norm",
    "rms_norm_modulate",
    "rope_freqs",
    "tile_sparse_attention",
    "tile_sparse_blocks",
    "unpack",
    "varlen_attention",
]


def __getattr__(name: str):
    # The integrations sit above the ops (they patch other codebases onto them): imported when first asked for.
    if name == "integrations":
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
