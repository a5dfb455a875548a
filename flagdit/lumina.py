"""Lumina-T2X (DiT_Llama) and Lumina-Next (NextDiT) weights as a :class:`FlagDiT` (:func:`load_lumina`).

A checkpoint is a file, or a directory of ``consolidated[_ema].RR-of-NN.pth`` model-parallel shards (all NN of
them; merged: column-parallel weights joined on dim 0, row-parallel on dim 1) or of ``*.safetensors`` files;
every file is read safely by :func:`flagdit.checkpoint.read_file` (never unpickling code), and every way it can be
unusable is one :class:`~flagdit.checkpoint.CheckpointError`. The config is read from the tensor shapes unless
given.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import TRAIN_FORMAT, CheckpointError, read_file
from .configs import FlagDiTConfig
from .model import FlagDiT

# fairscale layers of DiT_Llama: ColumnParallelLinear splits the output dim (weight dim 0 and bias),
# RowParallelLinear the input dim (weight dim 1; bias replicated).
_COLUMN = re.compile(
    r"(attention\.(wq|wk|wv|wk_y|wv_y)\.weight|feed_forward\.(w1|w3)\.weight|attention\.gate|"
    r"adaLN_modulation\.1\.(weight|bias)|x_embedder\.(weight|bias)|t_embedder\.mlp\.0\.(weight|bias)|"
    r"cap_embedder\.1\.(weight|bias)|final_layer\.linear\.(weight|bias))$"
)
_ROW = re.compile(r"(attention\.wo\.weight|feed_forward\.w2\.weight|t_embedder\.mlp\.2\.weight)$")
_PER_SHARD_NORM = re.compile(r"attention\.(q_norm|k_norm|ky_norm)\.")
_SHARD = re.compile(r"consolidated(_ema)?\.(\d+)-of-(\d+)\.pth$")
_PREFIXES = ("module.", "_orig_mod.", "model.")
# What infer_config reads: a state_dict without these is not a DiT_Llama / NextDiT one.
_DIT_KEYS = (
    "x_embedder.weight",
    "layers.0.attention.gate",
    "layers.0.attention.wk.weight",
    "layers.0.feed_forward.w1.weight",
    "final_layer.linear.weight",
    "cap_embedder.0.weight",
)


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    state = read_file(path)
    if isinstance(state, dict) and state.get("format") == TRAIN_FORMAT:
        raise CheckpointError(
            f"{path} is a flagdit-train checkpoint, not Lumina weights: load it with "
            "flagdit.checkpoint.model_from_checkpoint"
        )
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    others = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{path} is not a state_dict of tensors: {others[:5]} are not tensors")
    return state


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Joins fairscale model-parallel shards of a DiT_Llama state_dict into one."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for i, shard in enumerate(shards[1:], 1):
        if set(shard) != keys:
            raise CheckpointError(
                f"model-parallel shard {i} holds other keys than shard 0: {sorted(keys ^ set(shard))[:5]}"
            )
    merged = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        if _PER_SHARD_NORM.search(key):
            raise CheckpointError(
                f"{key}: with {len(shards)} model-parallel shards the QK LayerNorm normalizes each shard's heads "
                "separately, which a single-device model cannot reproduce"
            )
        if _COLUMN.search(key):
            merged[key] = torch.cat(parts, dim=0)
        elif _ROW.search(key):
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = first
    return merged


def _complete_shards(path: Path, shards: list[Path]) -> list[Path]:
    """The shards of one checkpoint in rank order, or a CheckpointError naming the missing or extra ones."""
    found = {}
    for p in shards:
        match = _SHARD.search(p.name)
        ranks = found.setdefault(int(match.group(3)), {})
        rank = int(match.group(2))
        if rank in ranks:  # consolidated.00-of-01.pth beside consolidated.0-of-1.pth: which one is meant?
            raise CheckpointError(
                f"{path} holds two files for model-parallel shard {rank}: {ranks[rank].name} and {p.name}; remove one"
            )
        ranks[rank] = p
    if len(found) > 1:
        raise CheckpointError(f"{path} mixes shard counts {sorted(found)}: {[p.name for p in shards]}")
    [(count, ranks)] = found.items()
    missing = [r for r in range(count) if r not in ranks]
    extra = [r for r in ranks if r >= count]
    if missing or extra:
        prefix = _SHARD.search(shards[0].name).group(1) or ""
        names = [f"consolidated{prefix}.{r:02d}-of-{count:02d}.pth" for r in missing]
        raise CheckpointError(
            f"{path} holds {len(ranks)} of the {count} model-parallel shards: missing {names}"
            + (f", unexpected ranks {extra}" if extra else "")
        )
    return [ranks[r] for r in range(count)]


def read_state_dict(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict stored at ``path`` (file or checkpoint directory), prefixes like ``module.`` removed."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if _SHARD.search(p.name))
        if shards:
            has_ema = any(_SHARD.search(p.name).group(1) for p in shards)
            want_ema = ema and has_ema
            shards = [p for p in shards if bool(_SHARD.search(p.name).group(1)) == want_ema]
            state = merge_shards([_load_state_file(p) for p in _complete_shards(path, shards)])
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{path} holds neither consolidated*.pth shards nor *.safetensors files")
            state, source = {}, {}
            for f in files:
                part = _load_state_file(f)
                both = [k for k in part if k in state]
                if both:  # a later file silently replacing an earlier one's tensors would be a different model
                    raise CheckpointError(
                        f"{path}: {source[both[0]].name} and {f.name} both hold {len(both)} of the same tensors "
                        f"({', '.join(both[:3])}{', ...' if len(both) > 3 else ''}); keep one of them"
                    )
                state.update(part)
                source.update(dict.fromkeys(part, f))
    else:
        state = _load_state_file(path)
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def infer_config(state: dict[str, torch.Tensor], patch_size: int = 2, **overrides) -> FlagDiTConfig:
    """A config whose FlagDiT has exactly the parameter shapes of ``state`` (a DiT_Llama or NextDiT dict)."""
    absent = [k for k in _DIT_KEYS if k not in state]
    if absent:
        raise CheckpointError(
            f"not a Lumina-T2X / Lumina-Next DiT state_dict: it lacks {absent} "
            f"(its keys begin {list(state)[:4]}); diffusers-format weights load through diffusers"
        )
    dim = state["x_embedder.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    n_heads = state["layers.0.attention.gate"].shape[0]
    head_dim = dim // n_heads
    n_kv_heads = state["layers.0.attention.wk.weight"].shape[0] // head_dim
    variant = "flag" if "layers.0.attention_norm.weight" in state else "next"
    in_channels = state["x_embedder.weight"].shape[1] // patch_size**2
    out_channels = state["final_layer.linear.weight"].shape[0] // patch_size**2
    kw = dict(
        patch_size=patch_size,
        in_channels=in_channels,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        ffn_hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
        learn_sigma=out_channels == 2 * in_channels,
        qk_norm="layers.0.attention.q_norm.weight" in state,
        cap_feat_dim=state["cap_embedder.0.weight"].shape[0],
        variant=variant,
        nextline="eol_token" in state,
        nextframe="eof_token" in state,
    )
    kw.update(overrides)
    return FlagDiTConfig(**kw)


def load_lumina(
    path: str | Path,
    config: FlagDiTConfig | None = None,
    *,
    backend: str | None = None,
    ema: bool = True,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> FlagDiT:
    """A :class:`FlagDiT` holding the weights of a Lumina-T2X (DiT_Llama) or Lumina-Next (NextDiT) checkpoint.

    Every tensor of the checkpoint must map onto a parameter and every Lumina parameter must be present; only
    our own additions (the [nextframe] ``eof_token`` when the config asks for it) may be missing, and keep their
    initialization. ``ema`` picks ``consolidated_ema.*`` shards when a directory has both.
    """
    state = read_state_dict(path, ema=ema)
    if config is None:
        config = infer_config(state, **config_overrides)
    model = FlagDiT(config, backend=backend)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a parameter of the wrong shape
        raise CheckpointError(f"checkpoint {path} does not match the model: {e}") from e
    ours = {"eof_token"}
    missing = [k for k in result.missing_keys if k not in ours]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if dtype is not None:
        model = model.to(dtype)
    return model
