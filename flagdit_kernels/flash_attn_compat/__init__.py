"""flash-attn 2's attention functions on ``fk.varlen_attention``, so a codebase swaps by one import line.

    import flagdit_kernels.flash_attn_compat as flash_attn          # instead of: import flash_attn
    from flagdit_kernels.flash_attn_compat import flash_attn_varlen_func

or, before the codebase imports flash-attn, for every ``from flash_attn import ...`` of the process::

    import sys, flagdit_kernels.flash_attn_compat as compat
    sys.modules["flash_attn"] = compat
    sys.modules["flash_attn.bert_padding"] = compat.bert_padding

Signatures, argument order, defaults, layouts and return values are flash-attn 2's (2.6 - 2.8): dense
``(B, S, H, D)`` tensors, packed ``(B, S, 3, H, D)`` qkv and ``(B, S, 2, Hkv, D)`` kv, varlen ``(T, H, D)`` rows
with int32 ``cu_seqlens``; ``softmax_scale`` defaults to ``1 / sqrt(D)``; GQA/MQA when k/v have fewer heads;
``return_attn_probs=True`` returns ``(out, softmax_lse, None)`` with the fp32 natural-log LSE, ``(B, H, S)``
dense and ``(H, T)`` varlen, as flash-attn does (its third value, the dropout pattern, exists only with
dropout, which is not implemented here). ``deterministic=True`` gives a bitwise-reproducible backward, as in
flash-attn. Differences: the head dims and dtypes are ``fk.varlen_attention``'s (multiples of 8 from 16 to
256; fp16, bf16 and also fp32), and what is not implemented raises ``NotImplementedError`` naming the
argument instead of computing something else: ``dropout_p > 0``, ``causal=True``, ``window_size`` other than
``(-1, -1)``, ``softcap != 0``, ``alibi_slopes``, ``block_table`` (paged KV).
"""

from __future__ import annotations

import torch

from .. import varlen_attention
from . import bert_padding

__all__ = [
    "bert_padding",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes, block_table=None) -> None:
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p={dropout_p!r}: attention dropout is not implemented (pass 0.0)")
    if causal:
        raise NotImplementedError("causal=True: flagdit-kernels' attention is non-causal (DiT attention)")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size={tuple(window_size)}: sliding windows are not implemented")
    if softcap != 0:
        raise NotImplementedError(f"softcap={softcap!r}: logit soft-capping is not implemented")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi biases are not implemented")
    if block_table is not None:
        raise NotImplementedError("block_table: paged KV caches are not implemented")


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, deterministic,
            return_attn_probs):  # fmt: skip
    """flash-attn's varlen contract on fk.varlen_attention: the same offsets object for queries and keys is
    self-attention; different ones are cross-attention (keys packed by ``cu_seqlens_k``)."""
    cross = {} if cu_seqlens_k is cu_seqlens_q else {"cu_seqlens_k": cu_seqlens_k, "max_seqlen_k": max_seqlen_k}
    result = varlen_attention(
        q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, return_lse=return_attn_probs,
        deterministic=deterministic, **cross,
    )  # fmt: skip
    return (*result, None) if return_attn_probs else result


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """q ``(Tq, H, D)``, k/v ``(Tk, Hkv, D)`` packed by ``cu_seqlens_q`` / ``cu_seqlens_k`` -> ``(Tq, H, D)``
    (with ``return_attn_probs``: ``(out, softmax_lse (H, Tq), None)``)."""
    _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes, block_table)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, deterministic,
                   return_attn_probs)  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q ``(Tq, H, D)``, kv ``(Tk, 2, Hkv, D)``."""
    _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes)
    k, v = kv.unbind(1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, deterministic,
                   return_attn_probs)  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv ``(T, 3, H, D)``."""
    _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes)
    q, k, v = qkv.unbind(1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, deterministic,
                   return_attn_probs)  # fmt: skip


def _dense(q, k, v, softmax_scale, deterministic, return_attn_probs):
    """``(B, Sq, H, D)`` q over ``(B, Sk, Hkv, D)`` k/v: each batch row one packed sequence (views, no copy)."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    offsets = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    cu_q = offsets * q_len
    cu_k = cu_q if k_len == q_len else offsets * k_len
    result = _varlen(
        q.reshape(batch * q_len, *q.shape[2:]), k.reshape(batch * k_len, *k.shape[2:]),
        v.reshape(batch * k_len, *v.shape[2:]), cu_q, cu_k, q_len, k_len, softmax_scale, deterministic,
        return_attn_probs,
    )  # fmt: skip
    if not return_attn_probs:
        return result.view(q.shape)
    out, lse, _ = result
    return out.view(q.shape), lse.view(q.shape[2], batch, q_len).transpose(0, 1), None  # lse (B, H, Sq)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)`` -> ``(B, Sq, H, D)`` (LSE ``(B, H, Sq)``)."""
    _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes)
    return _dense(q, k, v, softmax_scale, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q ``(B, Sq, H, D)``, kv ``(B, Sk, 2, Hkv, D)``."""
    _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes)
    k, v = kv.unbind(2)
    return _dense(q, k, v, softmax_scale, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv ``(B, S, 3, H, D)``."""
    _refuse_unsupported(dropout_p, causal, window_size, softcap, alibi_slopes)
    q, k, v = qkv.unbind(2)
    return _dense(q, k, v, softmax_scale, deterministic, return_attn_probs)
