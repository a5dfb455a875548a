"""Runs diffusers' Lumina transformers on flagdit-kernels: ``patch(model)`` / ``unpatch(model)``.

Supported: ``LuminaNextDiT2DModel`` (Lumina-Next, ``LuminaNextDiTBlock``) and ``Lumina2Transformer2DModel``
(Lumina-Image-2.0, ``Lumina2TransformerBlock``). Each block's forward is replaced by one that

- sees the block's padded tokens ``(B, L, D)`` + mask as packed rows + ``cu_seqlens``, laid out on the device
  without a host sync (``_padded_layout``: a view without a mask; with one, real tokens first and two sequences
  per sample), once per mask per model call,
- runs adaLN + RMSNorm as ``fk.rms_norm_modulate``, the sandwich norms + tanh-gated residuals as
  ``fk.gated_residual_rms_norm``, QK-norm + RoPE as ``fk.qk_norm_rope`` and attention as
  ``fk.varlen_attention``: for Lumina-Next the self-attention and the gated caption cross-attention are one
  call with the text branch (``text_k``/``text_v``/``gate``), for Lumina-2 a plain varlen call,
- calls the block's own Linear / FeedForward modules, so peft LoRA adapters on them (and other module swaps
  that keep ``in_features`` / ``out_features``) stay in the computation; the modules whose weights the fused
  ops read directly (the RMSNorms, QK-norms) are checked on every call, and a block where one of them was
  swapped (an adapter on a norm) runs diffusers' forward,
- writes the result back into the padded layout; masked-out positions pass through unchanged (diffusers
  never reads them: Lumina-2 slices them away, Lumina-Next has none).

A call the fused forward does not cover runs the block's original forward, counted with its reason in the
block's ``_flagdit_kernels_patch.fallbacks``: no rotary table, a real-valued one (diffusers multiplies the
query pairs by it without rotating), a norm weight in another dtype than the activations, or a block changed
after patching. Parameters, buffers, module classes and the state_dict are untouched. The remaining RMSNorm
modules (e.g. Lumina-2's caption embedder norm) are swapped by :func:`flagdit_kernels.integrations.patch_rms_norm`.

Numerics: fp32 outputs match diffusers within rel-L2 1e-4; in bf16 our norms round once at the end where
diffusers rounds after each elementwise step. A sample whose caption is fully masked gets exactly 0 from the
caption attention, as diffusers' masked SDPA gives on torch >= 2.5's math and CPU flash backends (checked on
the CPU in fp32 / fp16 / bf16 / fp64; older torch returned NaN there).

``torch.compile``: with backends that are custom ops (``triton``, ``cuda``) a patched Lumina-Next model traces
with ``fullgraph=True``; a patched Lumina-2 model breaks only where diffusers' own forward does (its
``.tolist()`` of the caption lengths). The ``reference`` attention loops over samples on the host.

Lumina-Next fusion needs ``attn2.to_q``/``attn2.norm_q`` equal to ``attn1.to_q``/``attn1.norm_q``, as in every
converted checkpoint (both come from Lumina's single ``wq``/``q_norm``), and, when gradients are recorded for
them, to be the same Parameters (``block.attn2.to_q = block.attn1.to_q`` ties them as Lumina does; the
state_dict keeps both names). Otherwise the caption cross-attention keeps diffusers' own ``attn2`` (the rest
is still ours), so training gradients stay diffusers'. Eager calls redo the equality check only when one of
those tensors changes (version counters, no device sync); a compiled graph decides when it is traced, so
after editing those weights in place call ``torch._dynamo.reset()``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import gated_residual_rms_norm, qk_norm_rope, rms_norm, rms_norm_modulate, varlen_attention
from ._padded_layout import LayoutCache, PaddedLayout
from ._patching import PatchReport, install, is_patched, state_of
from ._patching import unpatch as _unpatch_all
from .diffusers_attention import attention_backend, reset_attention_backend, set_attention_backend
from .rmsnorm import patch_rms_norm

NEXT_KIND = "diffusers.LuminaNextDiTBlock"
LUMINA2_KIND = "diffusers.Lumina2TransformerBlock"
KINDS = (NEXT_KIND, LUMINA2_KIND)
SCOPE_KIND = "diffusers.model_call"  # the patched model's forward: its blocks share the layouts of one call

__all__ = ["attention_backend", "patch", "reset_attention_backend", "set_attention_backend", "unpatch"]


# --------------------------------------------------------------------------------------------------------------
# Rotary tables.


def _rotary_unsupported(rotary: torch.Tensor | None, batch: int, length: int) -> str:
    """ "" when ``rotary`` is diffusers' complex ``freqs_cis`` ``(1 | B, L, Dh/2)``, else why the block falls back.

    diffusers multiplies the complex query pairs by whatever it is given: a real-valued table of that shape
    scales them without rotating. Such calls (and ``None``) run diffusers' own forward, which defines them.
    """
    if rotary is None:
        return "no rotary embedding"
    if not rotary.is_complex():
        return f"real-valued rotary table {tuple(rotary.shape)} (diffusers' forward defines it)"
    if rotary.dim() != 3 or rotary.shape[0] not in (1, batch) or rotary.shape[1] != length:
        return f"rotary table of shape {tuple(rotary.shape)}, not (1 | {batch}, {length}, head_dim / 2)"
    return ""


def _packed_freqs(rotary: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """diffusers' complex ``freqs_cis`` ``(1 | B, L, Dh/2)`` -> our float32 (cos, sin) table ``(B*L, Dh/2, 2)``."""
    table = torch.view_as_real(rotary.resolve_conj()).to(torch.float32)
    table = table.expand(layout.batch, layout.length, *table.shape[2:])
    return layout.pack(table).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Shared pieces.


def _heads(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
    heads = attn.heads
    head_dim = q.shape[-1] // heads
    return heads, k.shape[-1] // head_dim, head_dim


def _norm_dtypes_differ(x: torch.Tensor, *norms: nn.Module | None) -> str:
    """Why the block falls back when a norm weight's dtype differs from the activations' (diffusers' promotion
    rules then define the result), else ""."""
    for norm in norms:
        weight = getattr(norm, "weight", None) if norm is not None else None
        if weight is not None and weight.dtype != x.dtype:
            return f"a norm weight is {weight.dtype} but the activations are {x.dtype}"
    return ""


def _linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear layer or of an adapter wrapping one (peft's LoRA layers keep
    both attributes and are called like the layer, so adapters stay in the computation), else None."""
    features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return features if all(isinstance(f, int) for f in features) else None


def _adaln(norm1: nn.Module, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """LuminaRMSNormZero's projection: (scale_msa, gate_msa, scale_mlp, gate_mlp), each ``(B, D)``."""
    return norm1.linear(norm1.silu(temb)).chunk(4, dim=1)


def _qkv(attn: nn.Module, h: torch.Tensor, freqs: torch.Tensor, norm: str | None, prefer: str | None):
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    heads, kv_heads, head_dim = _heads(attn, q, k)
    t = h.shape[0]
    q, k = qk_norm_rope(
        q.view(t, heads, head_dim),
        k.view(t, kv_heads, head_dim),
        freqs,
        attn.norm_q if norm else None,
        attn.norm_k if norm else None,
        norm=norm,
        prefer=prefer,
    )
    return q, k, v.view(t, kv_heads, head_dim)


def _is_layer_norm(module: nn.Module | None, width: int) -> bool:
    return isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (width,)


def _is_diffusers_rms_norm(module: nn.Module | None, width: int | None) -> bool:
    """diffusers' ``RMSNorm`` without bias (with or without weight) over ``width`` features."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "RMSNorm"
        and isinstance(getattr(module, "eps", None), float)
        and getattr(module, "bias", None) is None
        and (weight is None or width is None or tuple(weight.shape) == (width,))
    )


# --------------------------------------------------------------------------------------------------------------
# Lumina-Next: LuminaNextDiTBlock.


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _query_modules(block: nn.Module) -> tuple[nn.Module | None, ...]:
    return block.attn1.to_q, block.attn2.to_q, block.attn1.norm_q, block.attn2.norm_q


def _query_params(block: nn.Module) -> list[nn.Parameter]:
    """Every parameter of both query projections and norms (LoRA adapters on them included)."""
    return [p for module in _query_modules(block) if module is not None for p in module.parameters()]


def _same_module_params(a: nn.Module | None, b: nn.Module | None) -> tuple[bool, bool]:
    """(equal values, same Parameter objects) for two modules' parameters and eps."""
    if a is None or b is None:
        return a is b, a is b
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or getattr(a, "eps", None) != getattr(b, "eps", None):
        return False, False
    same = all(pa[n] is pb[n] for n in pa)
    return same or all(pa[n].shape == pb[n].shape and torch.equal(pa[n], pb[n]) for n in pa), same


def _query_tie(block: nn.Module) -> tuple[bool, bool]:
    """(equal values, same Parameters) of attn1's and attn2's query projections and norms."""
    with torch.no_grad():
        eq_q, same_q = _same_module_params(block.attn1.to_q, block.attn2.to_q)
        eq_n, same_n = _same_module_params(block.attn1.norm_q, block.attn2.norm_q)
    return eq_q and eq_n, same_q and same_n


# While torch.compile traces, the comparison runs once on the real weights and its answer becomes a constant of
# the graph (reading values inside the graph would break it).
_query_tie_when_traced = torch.compiler.assume_constant_result(_query_tie)


def _fused_query(block: nn.Module) -> bool:
    """Whether attn2's query may be taken from attn1 (one varlen_attention call with the text branch).

    True when attn2.to_q / norm_q equal attn1's (converted checkpoints: both are Lumina's wq + q_norm) and
    either they are the very same Parameters or no gradient is being recorded for them (with separate
    copies, diffusers trains the two queries apart; a fused call could not split their gradients). Eager
    calls compare again only when one of the tensors was modified (version counter) or replaced; a compiled
    graph compares when it is traced.
    """
    if torch.compiler.is_compiling():
        tied, shared = _query_tie_when_traced(block)
    else:
        state = state_of(block)
        stamp = tuple((id(p), _version(p)) for p in _query_params(block))
        if state.extra.get("tied_stamp") != stamp or any(version is None for _, version in stamp):
            state.extra["tied"], state.extra["shared"] = _query_tie(block)
            state.extra["tied_stamp"] = stamp
        tied, shared = state.extra["tied"], state.extra["shared"]
    if not tied:
        return False
    if shared or not torch.is_grad_enabled():
        return True
    return not any(p.requires_grad for p in _query_params(block))


def _next_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    image_rotary_emb: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_mask: torch.Tensor,
    temb: torch.Tensor,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    state = state_of(self)
    prefer, cache = state.backend, state.extra["cache"]
    batch, length, _ = hidden_states.shape
    why = (
        _rotary_unsupported(image_rotary_emb, batch, length)
        or _next_block_unsupported(self)
        or _norm_dtypes_differ(
            hidden_states, self.norm1.norm, self.norm2, self.ffn_norm1, self.ffn_norm2, self.norm1_context
        )
    )
    if why:
        return state.call_original(
            self,
            why,
            hidden_states,
            attention_mask,
            image_rotary_emb,
            encoder_hidden_states,
            encoder_mask,
            temb,
            cross_attention_kwargs if cross_attention_kwargs is not None else {},
        )
    device = hidden_states.device
    split = attention_mask is not None or encoder_mask is not None  # image and caption: the same sequences
    img = cache.layout(attention_mask, batch, length, device, split)
    txt = cache.layout(encoder_mask, batch, encoder_hidden_states.shape[1], device, split)
    freqs = cache.rotary(image_rotary_emb, img, _packed_freqs)
    seqs = img.seqs

    x = img.pack(hidden_states)
    scale_msa, gate_msa, scale_mlp, gate_mlp = (img.per_sequence(t) for t in _adaln(self.norm1, temb))
    h = rms_norm_modulate(x, self.norm1.norm.weight, scale_msa, eps=self.norm1.norm.eps, cu_seqlens=seqs, prefer=prefer)

    attn1, attn2 = self.attn1, self.attn2
    norm = "layer_norm" if attn1.norm_q is not None else None
    q, k, v = _qkv(attn1, h, freqs, norm, prefer)
    base = (cross_attention_kwargs or {}).get("base_sequence_length")
    scale = attn1.scale * (math.sqrt(math.log(length, base)) if base is not None else 1.0)

    y = rms_norm(txt.pack(encoder_hidden_states), self.norm1_context.weight, self.norm1_context.eps, prefer=prefer)
    text_k, text_v = attn2.to_k(y), attn2.to_v(y)
    if attn2.norm_k is not None:
        text_k = attn2.norm_k(text_k)
    kv_heads, head_dim = k.shape[1], k.shape[2]
    text_k, text_v = text_k.view(-1, kv_heads, head_dim), text_v.view(-1, kv_heads, head_dim)

    fused = _fused_query(self)
    state.extra["last_path"] = "fused" if fused else "separate"
    if fused:
        out = varlen_attention(
            q, k, v, seqs, None, scale, text_k=text_k, text_v=text_v, text_cu_seqlens=txt.seqs, gate=self.gate,
            prefer=prefer,
        )  # fmt: skip
    else:
        # attn2 has its own query (weights or gradients): our self-attention plus diffusers' caption attention.
        out = varlen_attention(q, k, v, seqs, None, scale, prefer=prefer)
        cross = attn2(
            hidden_states=img.unpack(h, torch.zeros_like(hidden_states)),
            encoder_hidden_states=txt.unpack(y, torch.zeros_like(encoder_hidden_states)),
            attention_mask=encoder_mask,
            query_rotary_emb=image_rotary_emb,
            key_rotary_emb=None,
        )
        out = out + img.pack(cross) * self.gate.tanh().view(1, -1, 1)
    out = attn2.to_out[0](out.flatten(1))

    x = gated_residual_rms_norm(x, out, self.norm2.weight, gate_msa, self.norm2.eps, cu_seqlens=seqs, prefer=prefer)
    h = rms_norm_modulate(x, self.ffn_norm1.weight, scale_mlp, eps=self.ffn_norm1.eps, cu_seqlens=seqs, prefer=prefer)
    h = self.feed_forward(h)
    x = gated_residual_rms_norm(
        x, h, self.ffn_norm2.weight, gate_mlp, self.ffn_norm2.eps, cu_seqlens=seqs, prefer=prefer
    )
    return img.unpack(x, hidden_states)


def _next_block_unsupported(block: nn.Module) -> str:
    attn1, attn2 = block.attn1, block.attn2
    if type(block.norm1).__name__ != "LuminaRMSNormZero":
        return f"norm1 is {type(block.norm1).__name__}, not LuminaRMSNormZero"
    features = [_linear_features(m) for m in (attn1.to_q, attn1.to_k, attn2.to_k)]
    if None in features:
        return "attn1.to_q / attn1.to_k / attn2.to_k are not Linear layers (or adapters on them)"
    (dim, width), (_, kv_width), (_, text_kv_width) = features
    for name, norm, w in (
        ("norm1.norm", block.norm1.norm, dim),
        ("norm2", block.norm2, dim),
        ("ffn_norm1", block.ffn_norm1, dim),
        ("ffn_norm2", block.ffn_norm2, dim),
        ("norm1_context", block.norm1_context, None),
    ):
        if not _is_diffusers_rms_norm(norm, w):
            return f"{name} is not a bias-free diffusers RMSNorm"
    if (attn1.norm_q is None) != (attn1.norm_k is None) or (
        attn1.norm_q is not None
        and not (_is_layer_norm(attn1.norm_q, width) and _is_layer_norm(attn1.norm_k, kv_width))
    ):
        return "attn1 QK-norm is not LayerNorm across heads"
    if attn2.heads != attn1.heads or text_kv_width != kv_width:
        return "attn2 head layout differs from attn1"
    head_dim = width // attn1.heads
    if head_dim % 8 or not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} is outside fk.varlen_attention's range (multiples of 8 from 16 to 256)"
    return ""


# --------------------------------------------------------------------------------------------------------------
# Lumina-Image-2.0: Lumina2TransformerBlock (noise refiner, context refiner and joint layers).


def _lumina2_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_rotary_emb: torch.Tensor | None,
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    state = state_of(self)
    prefer, cache = state.backend, state.extra["cache"]
    batch, length, _ = hidden_states.shape
    first_norm = self.norm1.norm if self.modulation else self.norm1
    why = (
        _rotary_unsupported(image_rotary_emb, batch, length)
        or _lumina2_block_unsupported(self)
        or _norm_dtypes_differ(hidden_states, first_norm, self.norm2, self.ffn_norm1, self.ffn_norm2)
    )
    if why:
        return state.call_original(self, why, hidden_states, attention_mask, image_rotary_emb, temb)
    lay = cache.layout(attention_mask, batch, length, hidden_states.device, attention_mask is not None)
    freqs = cache.rotary(image_rotary_emb, lay, _packed_freqs)
    seqs = lay.seqs

    x = lay.pack(hidden_states)
    if self.modulation:
        scale_msa, gate_msa, scale_mlp, gate_mlp = (lay.per_sequence(t) for t in _adaln(self.norm1, temb))
        h = rms_norm_modulate(x, first_norm.weight, scale_msa, eps=first_norm.eps, cu_seqlens=seqs, prefer=prefer)
    else:
        h = rms_norm(x, first_norm.weight, first_norm.eps, prefer=prefer)
        gate_msa = gate_mlp = x.new_ones(seqs.num_seqs, x.shape[1])

    attn = self.attn
    q, k, v = _qkv(attn, h, freqs, "rms_norm" if attn.norm_q is not None else None, prefer)
    out = varlen_attention(q, k, v, seqs, None, attn.scale, prefer=prefer)
    out = attn.to_out[1](attn.to_out[0](out.flatten(1)))

    tanh_gate = bool(self.modulation)
    x = gated_residual_rms_norm(x, out, self.norm2.weight, gate_msa, self.norm2.eps, tanh_gate, seqs, prefer=prefer)
    if self.modulation:
        h = rms_norm_modulate(
            x, self.ffn_norm1.weight, scale_mlp, eps=self.ffn_norm1.eps, cu_seqlens=seqs, prefer=prefer
        )
    else:
        h = rms_norm(x, self.ffn_norm1.weight, self.ffn_norm1.eps, prefer=prefer)
    h = self.feed_forward(h)
    x = gated_residual_rms_norm(
        x, h, self.ffn_norm2.weight, gate_mlp, self.ffn_norm2.eps, tanh_gate, seqs, prefer=prefer
    )
    return lay.unpack(x, hidden_states)


def _lumina2_block_unsupported(block: nn.Module) -> str:
    attn = block.attn
    features = [_linear_features(m) for m in (attn.to_q, attn.to_k)]
    if None in features:
        return "attn.to_q / to_k are not Linear layers (or adapters on them)"
    dim, width = features[0]
    head_dim = width // attn.heads
    first = block.norm1.norm if block.modulation else block.norm1
    if block.modulation and type(block.norm1).__name__ != "LuminaRMSNormZero":
        return f"norm1 is {type(block.norm1).__name__}, not LuminaRMSNormZero"
    for name, norm in (("norm1", first), ("norm2", block.norm2), ("ffn_norm1", block.ffn_norm1)):
        if not _is_diffusers_rms_norm(norm, dim):
            return f"{name} is not a bias-free diffusers RMSNorm"
    if not _is_diffusers_rms_norm(block.ffn_norm2, dim):
        return "ffn_norm2 is not a bias-free diffusers RMSNorm"
    if (attn.norm_q is None) != (attn.norm_k is None) or (
        attn.norm_q is not None
        and not (_is_diffusers_rms_norm(attn.norm_q, head_dim) and _is_diffusers_rms_norm(attn.norm_k, head_dim))
    ):
        return "QK-norm is not a per-head diffusers RMSNorm"
    if head_dim % 8 or not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} is outside fk.varlen_attention's range (multiples of 8 from 16 to 256)"
    return ""


# --------------------------------------------------------------------------------------------------------------
# Public entry points.

_BLOCKS = {
    "LuminaNextDiTBlock": (NEXT_KIND, _next_block_forward, _next_block_unsupported),
    "Lumina2TransformerBlock": (LUMINA2_KIND, _lumina2_block_forward, _lumina2_block_unsupported),
}
_MODELS = ("LuminaNextDiT2DModel", "Lumina2Transformer2DModel")


def patch(model: nn.Module, backend: str | None = None, rms_norms: bool = True) -> PatchReport:
    """Swaps the norm / QK-norm + RoPE / attention work of a diffusers Lumina transformer onto our ops.

    ``model``: a ``LuminaNextDiT2DModel`` or ``Lumina2Transformer2DModel`` (or any module holding their
    blocks). ``backend``: the flagdit-kernels backend preference, passed to every op as ``prefer=`` (None:
    the default for the tensors; "reference" / "triton" in tests). ``rms_norms``: also swap the RMSNorm
    modules outside the blocks (:func:`patch_rms_norm`). Idempotent; undo with :func:`unpatch`. Returns what
    was swapped and skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    root = state_of(model)
    scoped = root is not None and root.kind == SCOPE_KIND
    cache = root.extra["cache"] if scoped else LayoutCache()  # shared by the blocks of this model
    found = False
    for name, module in model.named_modules():
        spec = _BLOCKS.get(type(module).__name__)
        if spec is None:
            continue
        found = True
        kind, forward, unsupported = spec
        if is_patched(module):
            report.already[name] = state_of(module).kind
            continue
        why = unsupported(module)
        if why:
            report.skipped[name] = f"{type(module).__name__}: {why}"
            continue
        install(module, kind, forward, backend, cache=cache)
        report.swapped[name] = _describe(module, kind)
    if not found:
        raise ValueError(
            f"found no LuminaNextDiTBlock or Lumina2TransformerBlock in {type(model).__name__}; "
            f"patch() supports diffusers' {' and '.join(_MODELS)}"
        )
    if rms_norms:
        # Inside patched blocks the norms are already fused; patch the rest (caption embedder, refiners' ...).
        report.merge(patch_rms_norm(_OutsideBlocks(model), backend=backend))
    if scoped:
        report.already[""] = SCOPE_KIND
    elif report.swapped and root is None and type(model).forward is not nn.Module.forward:
        install(model, SCOPE_KIND, _model_call_forward, backend, cache=cache)
        report.swapped[""] = f"{type(model).__name__}.forward: its blocks share one packed layout per mask per call"
    return report


def _model_call_forward(self: nn.Module, *args, **kwargs):
    """The patched model's forward: the layout cache is open for this call (see ``_padded_layout``)."""
    state = state_of(self)
    with state.extra["cache"].scope():
        return state.run_original(self, *args, **kwargs)


# Calls the patched blocks hand back to diffusers' own forward (the report says so; PatchState.fallbacks counts).
_FALLBACKS = "; calls without a complex rotary table (None, or real-valued) run diffusers' forward"


def _describe(block: nn.Module, kind: str) -> str:
    if kind == NEXT_KIND:
        return (
            "LuminaNextDiTBlock -> rms_norm_modulate, qk_norm_rope (LayerNorm across heads, 2D RoPE), "
            "varlen_attention with gated caption cross-attention, gated_residual_rms_norm x2" + _FALLBACKS
        )
    return (
        f"Lumina2TransformerBlock{'' if block.modulation else ' (no modulation)'} -> "
        f"{'rms_norm_modulate' if block.modulation else 'rms_norm'}, qk_norm_rope (per-head RMSNorm, 3D RoPE), "
        "varlen_attention, gated_residual_rms_norm x2" + _FALLBACKS
    )


class _OutsideBlocks(nn.Module):
    """A view of ``model`` whose ``named_modules`` skips the patched blocks' subtrees (their norms are fused)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        skip: list[str] = []
        for name, module in self._model.named_modules(remove_duplicate=remove_duplicate):
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            state = state_of(module)
            if state is not None and state.kind in KINDS:
                skip.append(name)
                continue
            yield name, module


def unpatch(model: nn.Module) -> PatchReport:
    """Restores every module under ``model`` that :func:`patch` (or ``patch_rms_norm``) changed."""
    return _unpatch_all(model)
