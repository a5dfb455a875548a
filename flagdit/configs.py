"""Flag-DiT / Next-DiT configurations.

``flagdit.configs`` is this module, and it also behaves as a read-only mapping from name to config:
``flagdit.configs["tiny"]``, ``list(flagdit.configs)``, ``"next-dit-2b" in flagdit.configs``.
Each lookup returns a fresh copy, so callers may change fields (``dataclasses.replace`` or assignment).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from dataclasses import dataclass

VARIANTS = ("flag", "next")
# The head dims flagdit_kernels.varlen_attention takes on every backend (its head-dim check); a config outside
# them would fail at the first forward, after a run had started.
HEAD_DIM_MULTIPLE, MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 16, 256


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass
class FlagDiTConfig:
    """Hyper-parameters of a Flag-DiT (``variant="flag"``, Lumina-T2X ``DiT_Llama``) or Next-DiT
    (``variant="next"``, Lumina-Next ``NextDiT``).

    Token layout: ``nextline`` appends a learned [nextline] token to every patch row (Lumina-T2X's
    ``eol_token``); ``nextframe`` puts a learned [nextframe] token between the frames of a video.
    RoPE: Flag-DiT rotates by the 1D token index inside each sample (placeholders count, as in Lumina-T2X);
    Next-DiT by the 2D (row, col) patch position, pairs alternating axes, frames stacked below each other with
    one empty row between them. ``rope_linear_factor`` / ``rope_ntk_factor`` are the default resolution
    extrapolation factors (the forward call can override them); ``base_seqlen`` turns on proportional
    attention (softmax scale ``sqrt(log_base(L) / head_dim)``) by default.
    """

    patch_size: int = 2
    in_channels: int = 4
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    learn_sigma: bool = True
    qk_norm: bool = True
    cap_feat_dim: int = 4096
    variant: str = "flag"
    nextline: bool = True
    nextframe: bool = True
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0
    rope_ntk_factor: float = 1.0
    base_seqlen: int | None = None
    ffn_hidden_dim: int | None = None  # explicit FFN width; None derives it like Lumina (2/3 * 4 * dim, rounded)
    # Any-modality conditioning (flagdit.modality): a learned adaLN vector per modality, and a per-view camera
    # embedding added to the tokens of multi-view frames. Off (0 / False) in the Lumina configs.
    n_modalities: int = 0
    camera_cond: bool = False
    # Video Sparse Attention's coarse branch (flagdit_kernels.nn.GatedVarlenAttention(coarse=True)): every block
    # adds tanh(coarse_gate) x the attention among its tiles' means; the latents are packed tile-major.
    coarse_attention: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises a ``ValueError`` / ``TypeError`` naming the first field a model cannot be built or run with
        (called on construction and by :class:`flagdit.FlagDiT`, so a config changed in place is checked too)."""
        for name in ("patch_size", "in_channels", "dim", "n_layers", "n_heads", "multiple_of", "cap_feat_dim"):
            _check_int(name, getattr(self, name), 1)
        for name in ("n_kv_heads", "ffn_hidden_dim", "base_seqlen"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("n_modalities", self.n_modalities, 0)
        for name in ("learn_sigma", "qk_norm", "nextline", "nextframe", "camera_cond", "coarse_attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta", "rope_linear_factor", "rope_ntk_factor", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.variant == "next" and self.head_dim % 4:
            raise ValueError(f"2D RoPE (variant 'next') needs head_dim divisible by 4, got {self.head_dim}")
        if self.head_dim % HEAD_DIM_MULTIPLE or not MIN_HEAD_DIM <= self.head_dim <= MAX_HEAD_DIM:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.dim} / {self.n_heads} = {self.head_dim}: the attention takes "
                f"multiples of {HEAD_DIM_MULTIPLE} from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
            )
        if self.ffn_dim < 1:
            raise ValueError(f"the FFN width (ffn_dim_multiplier {self.ffn_dim_multiplier}) rounds to {self.ffn_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def adaln_dim(self) -> int:
        """Width of the conditioning vector (timestep + pooled caption), ``min(dim, 1024)`` like Lumina."""
        return min(self.dim, 1024)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def ffn_dim(self) -> int:
        """SwiGLU width: ``int(2 * 4 * dim / 3)``, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Parameter count of :class:`flagdit.FlagDiT` built from this config (without building it)."""
        d, a, y, h = self.dim, self.adaln_dim, self.cap_feat_dim, self.ffn_dim
        q, kv = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + 2 * y * kv + self.n_heads
        if self.qk_norm:
            attn += 2 * q + 4 * kv
        norms = (2 if self.variant == "flag" else 4) * d + y
        ada = a * (6 if self.variant == "flag" else 4) * d + (6 if self.variant == "flag" else 4) * d
        block = attn + 3 * d * h + norms + ada + (self.n_heads if self.coarse_attention else 0)
        p2 = self.patch_size**2
        embed = p2 * self.in_channels * d + d + (256 * a + a + a * a + a) + (2 * y + y * a + a)
        final_mod = (2 if self.variant == "flag" else 1) * d
        final = d * p2 * self.out_channels + p2 * self.out_channels + a * final_mod + final_mod
        tokens = d * (1 + int(self.nextline) + int(self.nextframe))
        from .modality import CAMERA_FEATURES

        modality = self.n_modalities * a
        camera = (CAMERA_FEATURES * d + d + d * d + d) if self.camera_cond else 0
        return embed + self.n_layers * block + final + tokens + modality + camera

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CONFIGS: dict[str, FlagDiTConfig] = {
    # CPU tests and demos: pixel space (3 channels), 4 layers of width 128.
    "tiny": FlagDiTConfig(
        in_channels=3, dim=128, n_layers=4, n_heads=4, multiple_of=32, cap_feat_dim=64, learn_sigma=False
    ),
    # Flag-DiT 600M (Lumina-T2X report, Table 1), SDXL-VAE latents.
    "flag-dit-600m": FlagDiTConfig(dim=1536, n_layers=16, n_heads=32, cap_feat_dim=2048),
    # Lumina-Next-T2I 2B with grouped-query attention, Gemma-2B caption features.
    "next-dit-2b": FlagDiTConfig(
        dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, cap_feat_dim=2048, variant="next", nextline=False
    ),
    # Lumina-T2I 5B (DiT_Llama_5B_patch2), LLaMA-2-7B caption features.
    "lumina-t2i-5b": FlagDiTConfig(dim=3072, n_layers=32, n_heads=32, cap_feat_dim=4096),
    # Flag-DiT 7B.
    "flag-dit-7b": FlagDiTConfig(dim=4096, n_layers=32, n_heads=32, cap_feat_dim=4096),
}


def get_config(name: str, **overrides) -> FlagDiTConfig:
    """A fresh copy of the named config with ``overrides`` applied."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(_CONFIGS)}")
    return dataclasses.replace(_CONFIGS[name], **overrides)


def names() -> list[str]:
    return list(_CONFIGS)


class _ConfigModule(types.ModuleType):
    """Lets ``flagdit.configs`` be indexed by name like a dict while staying an importable module."""

    def __getitem__(self, name: str) -> FlagDiTConfig:
        return get_config(name)

    def __iter__(self):
        return iter(_CONFIGS)

    def __len__(self) -> int:
        return len(_CONFIGS)

    def __contains__(self, name: object) -> bool:
        return name in _CONFIGS

    def keys(self):
        return _CONFIGS.keys()

    def items(self):
        return [(n, get_config(n)) for n in _CONFIGS]


sys.modules[__name__].__class__ = _ConfigModule
