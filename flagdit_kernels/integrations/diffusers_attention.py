"""``fk.varlen_attention`` as a backend of diffusers' attention dispatcher (Flux, Wan, SD3, QwenImage, ...).

Most diffusers transformers compute attention with ``diffusers.models.attention_dispatch.dispatch_attention_fn``,
which calls the function registered for the processor's ``_attention_backend`` or, when that is None (the
default), for the registry's active backend. This module registers one more function there, under the name
:data:`NAME` (``"flagdit_varlen"``), with the registry's own decorator (``_AttentionBackendRegistry.register``:
its constraints run under ``DIFFUSERS_ATTN_CHECKS``, and the arguments it is handed are filtered by its
signature as for every backend), and makes it the active backend:

    from flagdit_kernels.integrations import diffusers as fkd

    with fkd.attention_backend():          # like diffusers' attention_backend(...) context
        image = pipe(prompt).images[0]
    fkd.set_attention_backend(pipe.transformer)   # like model.set_attention_backend(...), until
    fkd.reset_attention_backend(pipe.transformer)

Why not ``model.set_attention_backend("flagdit_varlen")``: diffusers' own switches accept only members of its
``AttentionBackendName`` enum, and a Python enum cannot gain members without patching diffusers. So the name
lives in the registry only, and these functions set the registry's active backend. Limits that follow:

- the active backend is global, as with diffusers' context manager; ``set_attention_backend(model)`` clears the
  backends pinned on that model's processors (which would override it), and a later
  ``other.set_attention_backend("flash")`` makes flash active for every model that has no pinned backend;
- context parallelism (a processor with a ``_parallel_config``) is refused: diffusers' ring / Ulysses attention
  is built from per-backend forward/backward ops this backend does not provide.

What runs where, per call (``calls()`` counts both):

- self-attention (``Lq == Lk``) with no mask, or a boolean key-padding mask that broadcasts over queries and
  heads (``(Lk,)``, ``(B|1, Lk)``, ``(B|1, 1, Lk)``, ``(B|1, 1, 1, Lk)``): ``fk.varlen_attention`` over packed rows,
  laid out on the device without a host sync (each sample's real tokens first, its masked tokens a second
  sequence, ``max_seqlen`` from the shape); GQA (``enable_gqa`` with fewer key/value heads) directly. Rows of
  masked tokens come back as 0 (native SDPA attends them to the real keys; the models discard those rows);
- everything else runs diffusers' native backend, unchanged: cross-attention (``Lq != Lk``, e.g. Wan's text
  attention), dropout, causal, ``return_lse``, float (additive) masks or masks that vary per query, head dims
  outside ``fk.varlen_attention``'s range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import varlen_attention
from ._padded_layout import PaddedLayout

NAME = "flagdit_varlen"

_calls: dict[str, int] = {}
_preference: dict[str, str | None] = {"backend": None}  # the flagdit-kernels backend our calls prefer


def calls() -> dict[str, int]:
    """How many dispatcher calls ran ``fk.varlen_attention`` (key ``"varlen"``) and diffusers' native backend
    (``"native: <reason>"``) since the last :func:`reset_calls`."""
    return dict(_calls)


def reset_calls() -> None:
    _calls.clear()


def _count(what: str) -> None:
    _calls[what] = _calls.get(what, 0) + 1


def _registry():
    from diffusers.models import attention_dispatch

    return attention_dispatch._AttentionBackendRegistry, attention_dispatch


def register_attention_backend() -> str:
    """Adds :data:`NAME` to diffusers' attention backend registry (idempotent); returns the name."""
    registry, dispatch = _registry()
    if NAME not in registry._backends:
        registry.register(NAME, constraints=[dispatch._check_device, dispatch._check_shape])(_varlen_backend)
    return NAME


@contextlib.contextmanager
def attention_backend(backend: str | None = None) -> Iterator[None]:
    """Within the block, diffusers' dispatcher runs ``fk.varlen_attention`` (processors with a pinned backend
    keep theirs). ``backend``: the flagdit-kernels backend to prefer ("triton", "reference", ...; None: default)."""
    registry, _ = _registry()
    register_attention_backend()
    saved = registry._active_backend, _preference["backend"]
    registry.set_active_backend(NAME)
    _preference["backend"] = backend
    try:
        yield
    finally:
        registry.set_active_backend(saved[0])
        _preference["backend"] = saved[1]


def _attention_processors(model: nn.Module) -> list:
    return [p for m in model.modules() if hasattr(p := getattr(m, "processor", None), "_attention_backend")]


def set_attention_backend(model: nn.Module, backend: str | None = None) -> None:
    """Makes ``fk.varlen_attention`` diffusers' active attention backend and unpins ``model``'s processors, so
    ``model`` (and any model without a pinned backend) uses it until :func:`reset_attention_backend`."""
    processors = _attention_processors(model)
    if any(getattr(p, "_parallel_config", None) is not None for p in processors):
        raise ValueError(f"{NAME} does not support diffusers' context parallelism; use a native or flash backend")
    registry, _ = _registry()
    register_attention_backend()
    for processor in processors:
        processor._attention_backend = None
    registry.set_active_backend(NAME)
    _preference["backend"] = backend


def reset_attention_backend(model: nn.Module) -> None:
    """Undoes :func:`set_attention_backend`: diffusers' native backend is active again."""
    registry, dispatch = _registry()
    for processor in _attention_processors(model):
        processor._attention_backend = None
    if registry._active_backend == NAME:
        registry.set_active_backend(dispatch.AttentionBackendName.NATIVE)
    _preference["backend"] = None


def _key_padding(attn_mask: torch.Tensor | None, batch: int, length: int) -> tuple[torch.Tensor | None, str]:
    """(``(B, Lk)`` bool keep-mask or None, "") when the mask is a key-padding mask, else (None, why not)."""
    if attn_mask is None:
        return None, ""
    if attn_mask.dtype != torch.bool:
        return None, f"{attn_mask.dtype} mask (an additive mask's values would need a host read)"
    if attn_mask.dim() > 4 or attn_mask.shape[-1] != length or any(n != 1 for n in attn_mask.shape[1:-1]):
        return None, f"mask of shape {tuple(attn_mask.shape)} varies per query or head"
    rows = attn_mask.reshape(-1, length) if attn_mask.dim() > 1 else attn_mask.view(1, length)
    if rows.shape[0] not in (1, batch):
        return None, f"mask of shape {tuple(attn_mask.shape)} does not broadcast over the batch"
    return rows.expand(batch, length), ""


def _native_reason(query, key, value, dropout_p, is_causal, enable_gqa, return_lse, parallel_config) -> str:
    if parallel_config is not None:
        return "context parallelism"
    if query.shape[1] != key.shape[1]:
        return "cross-attention (Lq != Lk)"
    if dropout_p > 0 or is_causal or return_lse:
        return "dropout, causal or return_lse"
    head_dim = query.shape[-1]
    if value.shape[-1] != head_dim or head_dim % 8 or not 16 <= head_dim <= 256:
        return f"head dims {head_dim} / {value.shape[-1]} (varlen_attention takes equal multiples of 8, 16..256)"
    if key.shape[2] != query.shape[2] and not (enable_gqa and query.shape[2] % key.shape[2] == 0):
        return "key/value heads differ from query heads without enable_gqa"
    return ""


def _varlen_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """The registered backend: ``(B, L, H, Dh)`` query/key/value as diffusers' dispatcher hands them."""
    batch, length = query.shape[:2]
    why = _native_reason(query, key, value, dropout_p, is_causal, enable_gqa, return_lse, _parallel_config)
    keep = None
    if not why:
        keep, why = _key_padding(attn_mask, batch, length)
    if why:
        _count(f"native: {why}")
        registry, dispatch = _registry()
        native = dispatch.AttentionBackendName.NATIVE
        kwargs = dict(
            query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config,
        )  # fmt: skip
        supported = registry._supported_arg_names[native]
        return registry._backends[native](**{k: v for k, v in kwargs.items() if k in supported})
    _count("varlen")
    layout = PaddedLayout.build(keep, batch, length, query.device, split=keep is not None)
    out = varlen_attention(
        layout.pack(query), layout.pack(key), layout.pack(value), layout.seqs, None, scale,
        prefer=_preference["backend"],
    )  # fmt: skip
    return out.view(query.shape) if keep is None else layout.unpack(out, torch.zeros_like(query))
