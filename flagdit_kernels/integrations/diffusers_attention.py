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

- no mask: ``fk.varlen_attention`` over the ``(B, L)`` rows as ``B`` sequences (a view, no copy); when the keys
  are not the queries' tokens (``Lq != Lk``, e.g. Wan's text attention) as cross-attention, each sample's
  queries over its own keys (``cu_seqlens_k``);
- a boolean mask over keys (``(Lk,)``, ``(B|1, Lk)``, ``(B|1, 1, Lk)``, ``(B|1, 1, 1|Lq, Lk)`` expanded over
  queries): always cross-attention, whatever ``Lq`` and ``Lk`` are (the dispatcher cannot tell a
  self-attention from a cross-attention with as many keys as queries, e.g. Cosmos' text tokens over a video of
  as many tokens), so no query row is ever removed: each sample's keys are reordered on the device (kept keys
  first, a stable sort) and its queries attend to its kept keys; the masked keys form a second key sequence
  that no query attends. No host sync; ``max_seqlen`` / ``max_seqlen_k`` come from the shapes;
- masks whose shape alone does not prove them key masks run our kernel after one host read of one boolean
  per call (a sync), computed on the device: a boolean ``(B|1, 1, Lq, Lk)`` whose query rows differ in memory
  (Chroma's blocks build ``keep[:, None, None, :] * keep[:, None, :, None]``) when it is separable, every query
  row either the same key mask (the keys any row sees) or entirely False; a mask repeated per head
  (``(B, H, ...)``, diffusers' ``prepare_attention_mask``) whose heads are equal; a float mask whose values are
  0 and one constant <= -1e4 (LTX-Video's ``-10000`` padding bias; a sample biased everywhere keeps every key,
  since the constant cancels, and -inf keeps none). While ``torch.compile`` traces no host read is possible, so
  these run native there (``calls()`` says so), as do masks that fail the test;
- GQA (``enable_gqa`` with fewer key/value heads) directly;
- everything else runs diffusers' native backend, unchanged: dropout, causal, ``return_lse``, other float
  masks (additive biases, e.g. ChromaPipeline's float 0/1 mask, which diffusers adds to the logits), masks
  that vary per head, head dims outside ``fk.varlen_attention``'s range.

Which rows differ from native: none, except query rows that see no key at all (a sample whose boolean or -inf
key mask is all False, or a fully masked row of a per-query mask): ours are exactly 0 with zero gradients, as
torch's math SDPA gives since torch 2.5 (its "safe softmax"); fused SDPA kernels may return NaN there. Every
other row, masked tokens' rows included, attends to the kept keys exactly as native does (with a -1e4 bias,
native's weight of a biased key beside a kept one is exp(-1e4 + ...) = 0 in fp32 too).
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


# An additive float mask selects keys when each value is 0 (kept) or one constant at most this (masked): a
# masked key's weight exp(bias + score - max) is then exactly 0 in fp32 beside any kept key (for scores within
# a few thousand of each other), as a key selection gives. diffusers' padding biases are -10000 (LTX-Video).
MASKING_BIAS = -1e4


def _as_boolean(attn_mask: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """A float mask of 0 / one masking constant as the boolean key selection it equals (one host read), else
    (None, why). Rows with no 0 at all: a finite constant cancels in the softmax (every key kept); -inf keeps
    none (the row is 0, as torch's math SDPA gives)."""
    if torch.compiler.is_compiling():
        return None, f"{attn_mask.dtype} mask while torch.compile traces (reading its values is a host read)"
    low = attn_mask.amin()
    if not bool(((attn_mask == 0) | (attn_mask == low)).all() & (low <= MASKING_BIAS)):  # the one host read
        return None, f"{attn_mask.dtype} mask (an additive bias on the logits, not a 0 / <= {MASKING_BIAS:g} key mask)"
    keep = attn_mask == 0
    if torch.isfinite(low):
        keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep, ""


def _key_mask(attn_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int):
    """``(keep, live, why)``: ``keep`` the ``(B, Lk)`` bool key mask (None: no mask), ``live`` the ``(B, Lq)``
    bool rows that see any key for a per-query mask (else None), or ``why`` not (then the call runs native)."""
    if attn_mask is None:
        return None, None, ""
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() > 4 or shape[-1] != k_len:
        return None, None, f"mask of shape {shape} is not (..., Lk = {k_len})"
    if attn_mask.dim() >= 3 and shape[-2] not in (1, q_len):
        return None, None, f"mask of shape {shape} does not broadcast over the queries"
    if attn_mask.dim() > 1 and shape[0] not in (1, batch):
        return None, None, f"mask of shape {shape} does not broadcast over the batch"
    if attn_mask.dtype != torch.bool:
        attn_mask, why = _as_boolean(attn_mask)
        if why:
            return None, None, why
    if attn_mask.dim() == 4 and shape[1] != 1:  # diffusers' prepare_attention_mask repeats a mask per head
        if torch.compiler.is_compiling():
            return None, None, f"mask of shape {shape} while torch.compile traces (comparing heads is a host read)"
        if not torch.equal(attn_mask, attn_mask[:, :1].expand(shape)):  # a host read
            return None, None, f"mask of shape {shape} varies per head"
        attn_mask = attn_mask[:, :1]
    rows = attn_mask.reshape(shape[0] if attn_mask.dim() > 1 else 1, -1, k_len)  # (B|1, Lq|1, Lk)
    if rows.shape[1] == 1 or attn_mask.stride(-2) == 0:  # one key mask for every query row, by its shape
        return rows[:, 0].expand(batch, k_len), None, ""
    if torch.compiler.is_compiling():
        return None, None, "per-query mask while torch.compile traces (deciding separability is a host read)"
    keep, live = rows.any(dim=1), rows.any(dim=2)  # the keys any row sees; the rows that see any key
    if not torch.equal(rows, live[:, :, None] & keep[:, None, :]):  # the one host read
        return None, None, f"mask of shape {shape} varies per query (not one key mask and fully masked rows)"
    return keep.expand(batch, k_len), live.expand(batch, q_len), ""


def _native_reason(query, key, value, dropout_p, is_causal, enable_gqa, return_lse, parallel_config) -> str:
    if parallel_config is not None:
        return "context parallelism"
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
    batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
    why = _native_reason(query, key, value, dropout_p, is_causal, enable_gqa, return_lse, _parallel_config)
    keep = live = None
    if not why:
        keep, live, why = _key_mask(attn_mask, batch, q_len, k_len)
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
    rows = batch * q_len
    q = query.reshape(rows, *query.shape[2:])
    if keep is None and q_len == k_len:  # self-attention layout: B sequences of L tokens, k/v as views
        seqs = PaddedLayout.build(None, batch, q_len, query.device, split=False).seqs
        k, v = key.reshape(rows, *key.shape[2:]), value.reshape(rows, *value.shape[2:])
        return varlen_attention(q, k, v, seqs, None, scale, prefer=_preference["backend"]).view(query.shape)
    # Cross-attention. With a mask each sample is two sequences: its queries over its kept keys, then no
    # queries over its masked keys (so every sample's keys stay contiguous, and nothing needs a host sync).
    queries = PaddedLayout.build(None, batch, q_len, query.device, split=keep is not None)
    keys = PaddedLayout.build(keep, batch, k_len, query.device, split=keep is not None)
    out = varlen_attention(
        q, keys.pack(key), keys.pack(value), queries.seqs, None, scale, cu_seqlens_k=keys.seqs,
        prefer=_preference["backend"],
    ).view(query.shape)  # fmt: skip
    if live is not None:  # rows of a per-query mask that see no key: exactly 0, as the math SDPA gives
        out = torch.where(live[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
