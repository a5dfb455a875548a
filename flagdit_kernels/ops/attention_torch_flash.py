"""``fk.varlen_attention`` as an implementation in torch's flash-attention registry, under the name ``"FLAGDIT"``.

torch (>= 2.10) lets a provider replace the kernels behind ``aten::_flash_attention_forward/_backward``
(``torch.nn.attention.varlen.varlen_attn``) and ``aten::_scaled_dot_product_flash_attention(_backward)``
(every SDPA call that picks the flash backend): ``register_flash_attention_impl(name, register_fn=...)`` at
import, ``activate_flash_attention_impl(name)`` by the user, ``restore_flash_attention_impl()`` to undo. FA3 and
FA4 register this way (torch/nn/attention/_fa3.py, _fa4.py). Importing flagdit_kernels registers
:func:`register` (registration only: activation stays the user's choice, as torch asks of providers):

    import flagdit_kernels, torch
    torch.nn.attention.activate_flash_attention_impl("FLAGDIT")   # SDPA flash calls and varlen_attn -> ours
    torch.nn.attention.restore_flash_attention_impl()

Activation registers the implementations below for the ``CUDA`` dispatch key (what the registry replaces; on a
CPU-only torch nothing calls them; tests register them for ``CPU`` with :func:`register`). What they do not
cover is handed back to the kernel they replaced (fetched with ``torch.library.get_kernel`` at activation),
logged once per reason: dropout, causal, sliding windows, ``seqused_k``, ALiBi, paged KV (``block_table``),
split-KV, the debug mask, head dims and dtypes outside ``fk.varlen_attention``'s. The LSE is flash-attn's:
fp32 natural log, ``(H, T)`` varlen and ``(B, H, S)`` dense. The backward works from the saved
``(q, k, v, out, lse)``: the Triton backward kernels where the Triton backend runs the forward, else the
softmax gradient written out in fp32.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from .. import _dispatch
from .attention import MAX_SOFTMAX_SCALE, TRITON_DTYPES, _bwd_op, varlen_attention

IMPL_NAME = "FLAGDIT"
log = logging.getLogger(__name__)

_OPS = (
    "_flash_attention_forward",
    "_flash_attention_forward_no_dropout_inplace",
    "_flash_attention_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
)


class _Unsupported(Exception):
    """Raised by an implementation before any work when a call is outside what it covers."""


def _check(query, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=None, **extra) -> None:
    """Raises :class:`_Unsupported` naming the first argument outside what ``fk.varlen_attention`` covers."""
    named = {"dropout_p": dropout_p != 0, "is_causal": is_causal, "return_debug_mask": return_debug_mask}
    named["window_size"] = any(extra.get(w) not in (None, -1) for w in ("window_size_left", "window_size_right"))
    named.update({n: extra.get(n) is not None for n in ("seqused_k", "alibi_slopes", "block_table")})
    named["num_splits"] = extra.get("num_splits") not in (None, 0, 1)
    for name, used in named.items():
        if used:
            raise _Unsupported(name)
    head_dim = query.shape[-1]
    if head_dim % 8 or not 16 <= head_dim <= 256:
        raise _Unsupported(f"head dim {head_dim}")
    if query.dtype not in TRITON_DTYPES:
        raise _Unsupported(f"dtype {query.dtype}")
    if scale is not None and not 0 <= scale <= MAX_SOFTMAX_SCALE:
        raise _Unsupported(f"scale {scale}")


def _scale(query: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def _cross(cu_q: torch.Tensor, cu_k: torch.Tensor, max_k: int) -> dict:
    """The same offsets object for queries and keys is self-attention; different ones are cross-attention."""
    return {} if cu_k is cu_q else {"cu_seqlens_k": cu_k, "max_seqlen_k": int(max_k)}


def _dense_offsets(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


def _packed(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k):
    """Varlen ``(T, H, D)`` views and offsets of a varlen or dense ``(B, S, H, D)`` call."""
    if cum_seq_q is not None:
        return query, key, value, cum_seq_q, cum_seq_k, int(max_q), int(max_k)
    batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
    cu_q = _dense_offsets(batch, q_len, query.device)
    cu_k = cu_q if k_len == q_len else _dense_offsets(batch, k_len, query.device)
    flat = [t.reshape(-1, *t.shape[2:]) for t in (query, key, value)]
    return *flat, cu_q, cu_k, q_len, k_len


def _forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """(out (T, H, D), lse (H, T) fp32) of packed q, k, v."""
    out, lse = varlen_attention(q, k, v, cu_q, max_q, scale, return_lse=True, **_cross(cu_q, cu_k, max_k))
    return out, lse.float()


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """(dq, dk, dv) from the saved forward: the Triton kernels where that backend runs, else the softmax
    gradient in fp32 (``P = exp(s - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    if _dispatch.resolve("varlen_attention", q).backend == "triton":
        cross = _cross(cu_q, cu_k, max_k)
        empty = q.new_empty(0)
        empty_f = lse.new_empty(0)
        dq, dk, dv, _, _, _ = _bwd_op(
            dout, None, q, k, v, out, empty, lse, empty_f, cu_q, max_q, scale, None, None, None, None, None,
            deterministic, cross.get("cu_seqlens_k"), cross.get("max_seqlen_k"),
        )  # fmt: skip
        return dq, dk, dv
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    key_offsets = cu_k.tolist()
    for b, (q0, q1) in enumerate(pairwise(cu_q.tolist())):
        k0, k1 = key_offsets[b], key_offsets[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qb, do, ob = q[q0:q1].float(), dout[q0:q1].float(), out[q0:q1].float()
        kb = k[k0:k1].float().repeat_interleave(group, 1)
        vb = v[k0:k1].float().repeat_interleave(group, 1)
        p = torch.exp(torch.einsum("qhd,khd->hqk", qb, kb) * scale - lse[:, q0:q1, None])
        dp = torch.einsum("qhd,khd->hqk", do, vb)
        ds = p * (dp - (do * ob).sum(-1).transpose(0, 1)[..., None])
        dq[q0:q1] = scale * torch.einsum("hqk,khd->qhd", ds, kb)
        dk[k0:k1] = (scale * torch.einsum("hqk,qhd->khd", ds, qb)).unflatten(1, (-1, group)).sum(2)
        dv[k0:k1] = torch.einsum("hqk,qhd->khd", p, do).unflatten(1, (-1, group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _aux(query: torch.Tensor):
    """flash-attn's (rng_state, unused, debug_mask) without dropout: placeholders the backward ignores."""
    return (
        torch.zeros((2,), dtype=torch.uint64, device=query.device),
        torch.zeros((), dtype=torch.uint64, device=query.device),
        torch.empty(0, dtype=query.dtype, device=query.device),
    )


def flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                            return_debug_mask, *, scale=None, **extra):  # fmt: skip
    """``aten::_flash_attention_forward``: varlen ``(T, H, D)`` with offsets, or dense ``(B, S, H, D)``."""
    _check(query, dropout_p, is_causal, return_debug_mask, scale, **extra)
    q, k, v, cu_q, cu_k, mq, mk = _packed(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k)
    out, lse = _forward(q, k, v, cu_q, cu_k, mq, mk, _scale(query, scale))
    if cum_seq_q is None:  # dense: (B, S, H, D) and lse (B, H, S)
        out = out.view(query.shape)
        lse = lse.view(query.shape[2], query.shape[0], query.shape[1]).transpose(0, 1).contiguous()
    return out, lse, *_aux(query)


def flash_attention_forward_no_dropout_inplace(
    out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
    scale=None, **extra,
):  # fmt: skip
    """``aten::_flash_attention_forward_no_dropout_inplace``: writes ``out``, returns the LSE."""
    result, lse, *_ = flash_attention_forward(
        query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
        scale=scale, **extra,
    )  # fmt: skip
    out.copy_(result)
    return lse


def flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                             dropout_p, is_causal, rng_state, unused, *, scale=None, **extra):  # fmt: skip
    """``aten::_flash_attention_backward`` -> ``(dq, dk, dv)``."""
    _check(query, dropout_p, is_causal, False, scale, **extra)
    dense = query.dim() == 4
    q, k, v, cu_q, cu_k, mq, mk = _packed(query, key, value, None if dense else cum_seq_q,
                                          None if dense else cum_seq_k, max_q, max_k)  # fmt: skip
    rows = q.shape[0]
    lse = logsumexp.transpose(0, 1).reshape(query.shape[2], rows) if dense else logsumexp
    dq, dk, dv = _backward(
        grad_out.reshape(q.shape), q, k, v, out.reshape(q.shape), lse.float().contiguous(), cu_q, cu_k, mq, mk,
        _scale(query, scale),
    )  # fmt: skip
    return dq.view(query.shape), dk.view(key.shape), dv.view(value.shape)


def sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """``aten::_scaled_dot_product_flash_attention``: ``(B, H, S, D)`` in, output in query's layout."""
    _check(query, dropout_p, is_causal, return_debug_mask, scale)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out, lse, rng_state, unused, debug = flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, is_causal, return_debug_mask, scale=scale
    )
    out_bhsd = torch.empty_like(query)
    out_bhsd.transpose(1, 2).copy_(out)
    return out_bhsd, lse, None, None, query.shape[2], key.shape[2], rng_state, unused, debug


def sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, philox_seed, philox_offset, *, scale=None):  # fmt: skip
    """``aten::_scaled_dot_product_flash_attention_backward`` -> ``(dq, dk, dv)`` in ``(B, H, S, D)``."""
    _check(query, dropout_p, is_causal, False, scale)
    bshd = [t.transpose(1, 2) for t in (grad_out, query, key, value, out)]
    dq, dk, dv = flash_attention_backward(
        bshd[0], *bshd[1:], logsumexp, None, None, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset,
        scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


IMPLEMENTATIONS = dict(
    zip(
        _OPS,
        (
            flash_attention_forward,
            flash_attention_forward_no_dropout_inplace,
            flash_attention_backward,
            sdpa_flash_forward,
            sdpa_flash_backward,
        ),
    )
)


@functools.cache
def _log_once(op_name: str, why: str) -> None:
    log.warning("FLAGDIT flash attention hands %s calls with %s back to the kernel it replaced", op_name, why)


def _with_fallback(impl, original, op_name, keyset, *args, **kwargs):
    try:
        return impl(*args, **kwargs)
    except _Unsupported as exc:
        if original is None:
            raise RuntimeError(f"FLAGDIT flash attention does not support {exc} and {op_name} had no kernel "
                               "to hand it back to") from None  # fmt: skip
        _log_once(op_name, str(exc))
        return original.call_boxed(keyset, *args, **kwargs)


@dataclass
class Handle:
    """What :func:`register` returns; torch's registry calls :meth:`remove` on restore."""

    library: torch.library.Library | None

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _original(op_name: str, dispatch_key: str):
    try:
        return torch.library.get_kernel(f"aten::{op_name}", dispatch_key)
    except RuntimeError:  # no kernel for that key (a CPU-only torch has no CUDA flash kernels)
        return None


def register(dispatch_key: str = "CUDA") -> Handle:
    """Registers the implementations for ``dispatch_key`` (what ``activate_flash_attention_impl("FLAGDIT")``
    calls, for CUDA); each hands what it does not cover back to the kernel it replaces."""
    library = torch.library.Library("aten", "IMPL", dispatch_key)
    for op_name, impl in IMPLEMENTATIONS.items():
        fallback = functools.partial(_with_fallback, impl, _original(op_name, dispatch_key), op_name)
        library.impl(op_name, fallback, dispatch_key, with_keyset=True)
    return Handle(library)


def _register_with_torch() -> None:
    from torch.nn import attention

    if hasattr(attention, "register_flash_attention_impl"):  # torch >= 2.10
        attention.register_flash_attention_impl(IMPL_NAME, register_fn=register)


_register_with_torch()
