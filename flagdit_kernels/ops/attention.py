"""Public ``varlen_attention`` (packed self- or cross-attention + zero-init gated text cross-attention)."""

from __future__ import annotations

import math

import torch

from .. import _dispatch
from .. import reference as ref
from .._layout import VarlenLayout, check_layout
from .._validation import (
    check_cu_seqlens,
    check_int,
    check_max_seqlen,
    check_number,
    check_same_dtype,
    check_shape,
    check_tensor,
    values_checked,
)
from ..reference.packing import TileLayout
from ..reference.tile_sparsity import tile_sparse_mask
from . import attention_engines, tile_sparsity
from .rope import check_freqs
from .tile_sparsity import TileSparsity

__all__ = ["proportional_scale", "varlen_attention"]

SUPPORTED_HEAD_DIMS = "multiples of 8 from 16 to 256"
# The Triton kernels' online softmax computes p = exp2(fma(s, c, -m)), c = scale * log2(e) and m the rounded row
# maximum of s * c (flash-attn's trick: one FMA per score). The fma keeps the unrounded product, so even the
# maximum's own exponent is off by up to half an fp32 ulp of m: from |m| = 2^32 on that reaches 256, exp2
# overflows to inf or underflows to 0, and the row is NaN (the reference rounds s * scale first and stays
# finite). The bound keeps every score of unit-RMS q and k (QK-normed: |q.k| <= Dh <= 256) below 2^22 in log2
# units, where the error is at most 1/8 (a few percent on a probability, as the reference's own rounding of its
# logits); models use 1/sqrt(Dh) (the default) or Lumina's proportional scale, both below 1.
MAX_SOFTMAX_SCALE = 1e4


def _varlen_attention_reference(*args, tiles=None, blocks=None, **kwargs):
    """The reference; tile-sparse calls as its mask over the packed tokens (reference/tile_sparsity.py)."""
    if blocks is not None:
        kwargs["mask"] = tile_sparse_mask(tiles, args[3], blocks)
    return ref.varlen_attention(*args, **kwargs)


_dispatch.register("varlen_attention", "reference", _varlen_attention_reference, devices=("cpu", "cuda"))
# The backends that run tile-sparse calls (sparsity=): the others take no block lists (flash-attn's and torch's
# varlen kernels attend whole sequences), so a sparse call never goes to them (nor to the engine choice).
SPARSE_BACKENDS = ("reference", "triton")

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 8 or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def _check_offsets(
    name: str,
    cu_seqlens: object,
    max_name: str,
    max_seqlen: int | None,
    total: int,
    total_name: str,
    device: torch.device,
    max_required: bool,
) -> tuple[torch.Tensor, int | None]:
    """(offsets, max_seqlen) from raw tensors (validated here) or a VarlenLayout (validated when built).

    Value checks of raw offsets copy them to the host: on CPU tensors always, on the GPU with
    FLAGDIT_KERNELS_VALIDATE=1 (a sync per call), never while torch.compile traces.
    """
    if isinstance(cu_seqlens, VarlenLayout):
        check_layout(name, cu_seqlens, total, total_name, device)
        if max_seqlen is not None and max_seqlen != cu_seqlens.max_seqlen:
            raise ValueError(f"{max_name} ({max_seqlen}) differs from {name}.max_seqlen ({cu_seqlens.max_seqlen})")
        return cu_seqlens.cu_seqlens, cu_seqlens.max_seqlen
    sync = values_checked(device)
    check_cu_seqlens(name, cu_seqlens, total, device, total_name=total_name, sync=sync)
    if max_seqlen is not None or max_required:
        check_max_seqlen(max_name, max_seqlen, cu_seqlens, sync=sync)
    return cu_seqlens, max_seqlen


def _check_text(q, text_k, text_v, text_cu_seqlens, text_max_seqlen, gate, num_seqs: int, hkv: int):
    """(text offsets, text max_seqlen) of the gated text branch, or (None, None) without one."""
    given = [x is not None for x in (text_k, text_v, text_cu_seqlens, gate)]
    if not any(given):
        return None, None
    if not all(given):
        raise ValueError("text_k, text_v, text_cu_seqlens and gate must be given together")
    check_tensor("text_k", text_k, ndim=3, device=q.device)
    check_tensor("text_v", text_v, ndim=3, device=q.device)
    for name, t in (("text_k", text_k), ("text_v", text_v)):
        check_same_dtype(name, t, "q", q)
        if t.shape[1:] != (hkv, q.shape[-1]):
            raise ValueError(f"{name} must be (Tt, {hkv}, {q.shape[-1]}) like k, got {tuple(t.shape)}")
    if text_v.shape[0] != text_k.shape[0]:
        raise ValueError(f"text_v has {text_v.shape[0]} tokens but text_k has {text_k.shape[0]}")
    text_cu, text_max_seqlen = _check_offsets(
        "text_cu_seqlens", text_cu_seqlens, "text_max_seqlen", text_max_seqlen,
        text_k.shape[0], "text_k.shape[0]", q.device, max_required=False,
    )  # fmt: skip
    if text_cu.numel() != num_seqs + 1:
        raise ValueError(
            f"text_cu_seqlens must have {num_seqs + 1} entries (one text sequence per sample), got {text_cu.numel()}"
        )
    check_tensor("gate", gate, ndim=1, device=q.device)
    check_shape("gate", gate, (q.shape[1],))
    return text_cu, text_max_seqlen


def _check_keys(cu_seqlens_k, max_seqlen_k, k, num_offsets: int, freqs):
    """(key offsets, max key length) of a cross-attention call, or (None, None) for self-attention."""
    if cu_seqlens_k is None:
        if max_seqlen_k is not None:
            raise ValueError("max_seqlen_k is given without cu_seqlens_k (self-attention uses max_seqlen)")
        return None, None
    if freqs is not None:
        raise ValueError("freqs (RoPE) is only supported for self-attention, not with cu_seqlens_k")
    cu_k, max_seqlen_k = _check_offsets(
        "cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k, k.shape[0], "k.shape[0]", k.device,
        max_required=True,
    )  # fmt: skip
    if cu_k.numel() != num_offsets:
        raise ValueError(
            f"cu_seqlens_k must have {num_offsets} entries like cu_seqlens (one key sequence per sample), "
            f"got {cu_k.numel()}"
        )
    return cu_k, max_seqlen_k


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | VarlenLayout,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    text_max_seqlen: int | None = None,
    gate: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    cu_seqlens_k: torch.Tensor | VarlenLayout | None = None,
    max_seqlen_k: int | None = None,
    backend: str | None = None,
    prefer: str | None = None,
    sparsity: TileSparsity | None = None,
    tiles: TileLayout | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention within each packed sequence, plus Lumina's gated text cross-attention.

    q ``(T, H, Dh)``, k/v ``(T, Hkv, Dh)`` with ``H % Hkv == 0``; ``cu_seqlens`` int32 ``(B+1,)``;
    ``max_seqlen`` the longest sequence (a Python int, so kernels need no host sync). A
    :class:`~flagdit_kernels.VarlenLayout` may stand for ``cu_seqlens`` (then ``max_seqlen`` may be omitted)
    and for ``text_cu_seqlens``. ``softmax_scale`` defaults to ``1/sqrt(Dh)`` and must lie in
    ``[0, MAX_SOFTMAX_SCALE]`` (1e4; 0 is uniform attention). With ``freqs``
    ``(T, Dh/2, 2)`` RoPE (interleaved) is applied to q and k first. With ``text_k``/``text_v`` ``(Tt, Hkv, Dh)``
    packed by ``text_cu_seqlens`` and ``gate (H,)``: ``out += tanh(gate[h]) * softmax(q k_t^T / sqrt(Dh)) v_t``
    per sample; a sample without text tokens adds exactly 0. Returns ``(T, H, Dh)`` in q's dtype.

    ``return_lse=True`` returns ``(out, lse)``: ``lse`` float32 ``(H, T)``, the natural log of each query's
    self-attention softmax denominator (scale applied; the text branch is not part of it), differentiable like
    ``out``, so results over key blocks merge by log-sum-exp with plain autograd (ring attention).
    ``deterministic=True`` asks for a backward whose gradients are bitwise reproducible (the Triton backend's
    default accumulates dq with atomics; it also takes the ordered path under
    ``torch.use_deterministic_algorithms(True)``).

    Cross-attention: with ``cu_seqlens_k`` (int32 ``(B+1,)``, the same B, or a VarlenLayout) k/v are
    ``(Tk, Hkv, Dh)`` packed by their own offsets, ``Tk = cu_seqlens_k[-1]``, and the queries of sample b attend
    to keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (any length, 0 included); ``max_seqlen_k`` is the longest key
    sequence (required with raw offsets, like ``max_seqlen``). A sample without keys gives exactly 0 (before
    the text branch) and an LSE of ``-inf``. RoPE (``freqs``) is for self-attention only.

    Tile-sparse self-attention: with ``sparsity`` (a :class:`~flagdit_kernels.TileSparsity`) and ``tiles`` (the
    :class:`~flagdit_kernels.TileLayout` of a tile-major pack, ``fk.pack(..., tile=...).tiles``; both or neither)
    each query tile attends only the key tiles ``sparsity`` lists for it (``fk.tile_sparse_blocks``, built on the
    device from q and k after RoPE, no host sync); placeholder tokens stay global, the gated text branch dense.
    The definition is the masked reference (``fk.tile_sparse_attention``); backends ``reference`` and ``triton``
    run it (the Triton kernels visit only the listed key blocks), the others raise NotImplementedError.
    ``return_lse`` and ``deterministic`` keep their meaning; not with cross-attention. What the call visited
    (its ``density``) is :func:`~flagdit_kernels.last_tile_blocks`.
    """
    for name, flag in (("return_lse", return_lse), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_tensor("q", q, ndim=3)
    check_tensor("k", k, ndim=3, device=q.device)
    check_tensor("v", v, ndim=3, device=q.device)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    _check_head_dim(q.shape[-1])
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    cross = cu_seqlens_k is not None
    if (not cross and k.shape[0] != q.shape[0]) or k.shape[2] != q.shape[2]:
        rows = "Tk" if cross else q.shape[0]
        raise ValueError(f"k must be (T, Hkv, Dh) = ({rows}, Hkv, {q.shape[2]}), got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    cu, max_seqlen = _check_offsets(
        "cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, q.shape[0], "q.shape[0]", q.device, max_required=True
    )
    cu_k, max_seqlen_k = _check_keys(cu_seqlens_k, max_seqlen_k, k, cu.numel(), freqs)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        softmax_scale = check_number("softmax_scale", softmax_scale, maximum=MAX_SOFTMAX_SCALE)
    text_cu, text_max_seqlen = _check_text(
        q, text_k, text_v, text_cu_seqlens, text_max_seqlen, gate, cu.numel() - 1, k.shape[1]
    )
    if freqs is not None:
        check_freqs(freqs, "q", q)
    impl = _dispatch.resolve("varlen_attention", q, backend, prefer)
    sparse = _sparse_lists(sparsity, tiles, impl.backend, q, k, cu, cross, softmax_scale, freqs)
    args = (q, k, v, cu, max_seqlen, softmax_scale)
    kwargs = dict(
        text_k=text_k, text_v=text_v, text_cu_seqlens=text_cu, text_max_seqlen=text_max_seqlen, gate=gate,
        freqs=freqs, return_lse=return_lse, deterministic=deterministic, **_key_offsets(cu_k, max_seqlen_k),
        **sparse,
    )  # fmt: skip
    fn = impl.fn
    chosen_freely = backend is None and prefer is None and _dispatch.forced_backend() is None and not sparse
    if chosen_freely and impl.backend == "triton" and q.is_cuda:  # the fastest engine here (attention_engines.py)
        ordered = deterministic or (
            torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        )
        fn = attention_engines.engine_for(impl, args, kwargs, deterministic=ordered)
    return fn(*args, **kwargs)


def _sparse_lists(sparsity, tiles, backend: str, q, k, cu, cross: bool, softmax_scale: float, freqs) -> dict:
    """The backends' tile-sparse keywords (``tiles``, ``blocks``), or {} for a dense call; checks the arguments."""
    if sparsity is None and tiles is None:
        return {}
    if sparsity is None or tiles is None:
        given, missing = ("sparsity", "tiles") if tiles is None else ("tiles", "sparsity")
        raise ValueError(f"{given} is given without {missing}: tile-sparse attention needs both (or neither)")
    if cross:
        raise ValueError("sparsity is for self-attention over a tile-major pack, not with cu_seqlens_k")
    if backend not in SPARSE_BACKENDS:
        raise NotImplementedError(
            f"backend {backend!r} does not run tile-sparse attention (sparsity=): its varlen kernel attends whole "
            f"sequences and takes no block lists; use one of {SPARSE_BACKENDS}"
        )
    blocks = tile_sparsity.blocks_for_call(q, k, cu, tiles, sparsity, softmax_scale, freqs)
    return {"tiles": tiles, "blocks": blocks}


def proportional_scale(seqlen: int, base_seqlen: int, head_dim: int) -> float:
    """Lumina's softmax scale for resolution extrapolation: ``sqrt(log(seqlen, base_seqlen) / head_dim)``."""
    check_int("seqlen", seqlen, 1)
    check_int("base_seqlen", base_seqlen, 2)
    check_int("head_dim", head_dim, 1)
    return ref.proportional_scale(seqlen, base_seqlen, head_dim)


# ----------------------------------------------------------------------------------------------------------------
# Triton backend: torch.library custom ops (opaque to torch.compile, with fake impls) + autograd.
# The kernels live in flagdit_kernels/triton/attention/launch.py and are imported on first use only.
# ----------------------------------------------------------------------------------------------------------------

Tensor = torch.Tensor


def _key_offsets(cu_seqlens_k: Tensor | None, max_seqlen_k: int | None) -> dict:
    """The backends' cross-attention keywords, passed only for a cross-attention call."""
    return {} if cu_seqlens_k is None else {"cu_seqlens_k": cu_seqlens_k, "max_seqlen_k": max_seqlen_k}


@torch.library.custom_op("flagdit_kernels::varlen_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
    text_k: Tensor | None,
    text_v: Tensor | None,
    text_cu_seqlens: Tensor | None,
    tanh_gate: Tensor | None,
    freqs: Tensor | None,
    lse_returned: bool,
    deterministic: bool,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    sparse_lists: Tensor | None = None,
    sparse_sizes: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, o_text, lse_self, lse_text, q_rot, k_rot, offsets), LSEs in natural log; all but out are
    saved for the backward. q_rot / k_rot are q and k rotated by RoPE (empty without ``freqs``): the backward
    reads them. ``offsets``: int32, the offsets as the kernels ran them (repaired, triton/attention/offsets.py)
    one array a row (padded to 16 bytes): cu_seqlens, then text_cu_seqlens and cu_seqlens_k where given; the
    backward launches them as they are (one repair per training step).
    ``lse_returned`` and ``deterministic`` are for the backward: whether lse_self reached the caller (else the
    zero gradient autograd hands an unused output is not read) and which dq path to take. ``cu_seqlens_k`` /
    ``max_seqlen_k``: the keys' own offsets of a cross-attention call (None: self-attention). ``sparse_lists``
    / ``sparse_sizes``: a tile-sparse call's tables (triton/attention/sparse.py; None: dense)."""
    from ..triton.attention import launch as kernels
    from ..triton.attention.problem import Problem

    problem = Problem(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, text_k, text_v, text_cu_seqlens, tanh_gate, freqs,
        cu_seqlens_k, max_seqlen_k, sparse_lists, sparse_sizes,
    )  # fmt: skip
    out, o_text, lse, lse_t, q_rot, k_rot, offsets = kernels.forward(problem)
    if freqs is None:  # q_rot, k_rot are q, k themselves: an output may not alias an input
        q_rot, k_rot = q.new_empty(0), k.new_empty(0)
    return out, o_text, lse, lse_t, q_rot, k_rot, offsets


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, softmax_scale, text_k, text_v, text_cu_seqlens, tanh_gate, freqs,
              lse_returned, deterministic, cu_seqlens_k=None, max_seqlen_k=None, sparse_lists=None,
              sparse_sizes=None):  # fmt: skip
    T, H, D = q.shape
    has_text = text_k is not None
    out = q.new_empty((T, H, D))
    o_text = q.new_empty((T, H, D) if has_text else (0,))
    lse = q.new_empty((H, T), dtype=torch.float32)
    lse_t = q.new_empty((H, T) if has_text else (0,), dtype=torch.float32)
    rotated = freqs is not None
    q_rot = q.new_empty(q.shape if rotated else (0,))
    k_rot = k.new_empty(k.shape if rotated else (0,))
    from ..triton.attention.offsets import repaired_shape

    shape = repaired_shape(cu_seqlens.shape[0], has_text, cu_seqlens_k is not None)
    offsets = cu_seqlens.new_empty(shape, dtype=torch.int32)
    return out, o_text, lse, lse_t, q_rot, k_rot, offsets


@torch.library.custom_op("flagdit_kernels::varlen_attention_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    o_text: Tensor,
    lse: Tensor,
    lse_t: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    softmax_scale: float,
    text_k: Tensor | None,
    text_v: Tensor | None,
    text_cu_seqlens: Tensor | None,
    tanh_gate: Tensor | None,
    freqs: Tensor | None,
    deterministic: bool,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    sparse_lists: Tensor | None = None,
    sparse_sizes: list[int] | None = None,
    offsets_repaired: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, d_text_k, d_text_v, d_tanh_gate); the text ones are empty without text. ``dlse`` is
    the gradient of the self-attention LSE (None when the caller did not take it). With ``freqs``, q and k are
    the forward's rotated copies and dq, dk come back as the gradients of the unrotated inputs.
    ``offsets_repaired``: the offsets are rows of the forward's ``offsets`` output, launched as they are (only
    those may be marked so: the kernels' bounds rest on the repair); else they are repaired here."""
    from ..triton.attention import launch as kernels
    from ..triton.attention.problem import Problem

    problem = Problem(
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, text_k, text_v, text_cu_seqlens, tanh_gate, freqs,
        cu_seqlens_k, max_seqlen_k, sparse_lists, sparse_sizes, offsets_repaired,
    )  # fmt: skip
    dq, dk, dv, dtk, dtv, dtg = kernels.backward(problem, dout, dlse, out, o_text, lse, lse_t, deterministic)
    if text_k is None:
        dtk, dtv, dtg = q.new_empty(0), q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dtk, dtv, dtg


@_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, o_text, lse, lse_t, cu_seqlens, max_seqlen, softmax_scale, text_k, text_v,
              text_cu_seqlens, tanh_gate, freqs, deterministic, cu_seqlens_k=None, max_seqlen_k=None,
              sparse_lists=None, sparse_sizes=None, offsets_repaired=False):  # fmt: skip
    has_text = text_k is not None
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        text_k.new_empty(text_k.shape) if has_text else q.new_empty(0),
        text_v.new_empty(text_v.shape) if has_text else q.new_empty(0),
        q.new_empty((q.shape[1],) if has_text else (0,), dtype=torch.float32),
    )


def _fwd_setup(ctx, inputs, output):
    q, k, v, _, max_seqlen, scale, text_k, text_v, _, tanh_gate, freqs, lse_returned, deterministic = inputs[:13]
    cu_k, max_seqlen_k, sparse_lists, sparse_sizes = inputs[13:]
    out, o_text, lse, lse_t, q_rot, k_rot, offsets = output
    if freqs is not None:  # the backward reads the rotated copies, not the inputs
        q, k = q_rot, k_rot
    # The repaired offsets, not the inputs: the backward launches them as they are.
    ctx.save_for_backward(q, k, v, out, o_text, lse, lse_t, offsets, text_k, text_v, tanh_gate, freqs, sparse_lists)
    ctx.sizes = (max_seqlen, scale, max_seqlen_k, sparse_sizes)
    ctx.lse_returned, ctx.deterministic, ctx.cross = lse_returned, deterministic, cu_k is not None
    ctx.offsets_length = inputs[3].shape[0]


def _fwd_backward(ctx, dout, _d_o_text, d_lse, _d_lse_t, _d_q_rot, _d_k_rot, _d_offsets):
    q, k, v, out, o_text, lse, lse_t, offsets, text_k, text_v, tanh_gate, freqs, lists = ctx.saved_tensors
    max_seqlen, scale, max_seqlen_k, sparse_sizes = ctx.sizes
    from ..triton.attention.offsets import rows

    cu, text_cu, cu_k = rows(offsets, ctx.offsets_length, text_k is not None, ctx.cross)
    dq, dk, dv, dtk, dtv, dtg = _bwd_op(
        dout, d_lse if ctx.lse_returned else None, q, k, v, out, o_text, lse, lse_t, cu, max_seqlen, scale,
        text_k, text_v, text_cu, tanh_gate, freqs, ctx.deterministic, cu_k, max_seqlen_k, lists, sparse_sizes, True,
    )  # fmt: skip
    if text_k is None:
        dtk = dtv = dtg = None
    return dq, dk, dv, None, None, None, dtk, dtv, None, dtg, None, None, None, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _varlen_attention_triton(
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, *, text_k=None, text_v=None, text_cu_seqlens=None,
    text_max_seqlen=None, gate=None, freqs=None, return_lse=False, deterministic=False, cu_seqlens_k=None,
    max_seqlen_k=None, tiles=None, blocks=None,
):  # fmt: skip
    """The Triton backend: fused self + gated text kernels; see flagdit_kernels/triton/attention/launch.py.
    The backward accumulates dq with atomics unless ``deterministic`` (or torch.use_deterministic_algorithms
    without warn_only) asks for the ordered path."""
    sparse_lists = sparse_sizes = None
    if blocks is not None:  # the kernels' tables of the block lists (sparse.py), on the device
        from ..triton.attention import sparse as sparse_kernels

        sparse_lists, sparse_sizes = sparse_kernels.lists(tiles, cu_seqlens, blocks.keys, blocks.counts)
    scale = float(softmax_scale)
    tanh_gate = None
    if text_k is not None:  # text_max_seqlen is not needed: the kernels' grids come from the tensor shapes
        # tanh in torch (H values): its autograd turns the kernel's d tanh(gate) into d gate.
        tanh_gate = torch.tanh(gate.float())
    if freqs is not None and freqs.dtype != torch.float32:
        freqs = freqs.float()  # the reference rotates with fp32 tables too
    deterministic = deterministic or (
        torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    )
    out, _, lse, _, _, _, _ = _fwd_op(
        q, k, v, cu_seqlens, max_seqlen, scale, text_k, text_v, text_cu_seqlens, tanh_gate, freqs, return_lse,
        deterministic, cu_seqlens_k, max_seqlen_k, sparse_lists, sparse_sizes,
    )  # fmt: skip
    return (out, lse) if return_lse else out


_dispatch.register("varlen_attention", "triton", _varlen_attention_triton, dtypes=TRITON_DTYPES, **_dispatch.TRITON)

# Registered last (they use the names above): the optional flash_attn and torch_varlen backends, and "FLAGDIT"
# in torch's flash-attention registry.
from . import attention_flash_attn, attention_torch_flash, attention_torch_varlen  # noqa: E402, F401
