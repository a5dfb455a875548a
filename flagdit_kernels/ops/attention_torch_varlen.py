"""The ``torch_varlen`` backend of ``varlen_attention``: torch's own ``torch.nn.attention.varlen.varlen_attn``
(torch >= 2.10: packed varlen attention with LSE, GQA and a backward; flash-attention 2 by default, cuDNN or
FA3/FA4 where activated), with Lumina's gated text branch, RoPE and the 0-keys contract composed around it as
the ``flash_attn`` backend composes them around flash-attn (:func:`attention_flash_attn.compose`).

It is never a default; ``backend="torch_varlen"`` chooses it, and the engine choice
(``attention_engines.py``) may pick it where it measures faster. Its backward is deterministic only under
``torch.use_deterministic_algorithms(True)`` (torch's flash backward reads that global switch), so a call
with ``deterministic=True`` outside it is refused rather than run nondeterministically. While torch's registry
has ``"FLAGDIT"`` active, ``varlen_attn`` would call our own kernels back: the backend says it is unavailable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .. import _dispatch
from .attention_flash_attn import compose

TORCH_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def torch_varlen_attn() -> Callable | None:
    """torch's ``varlen_attn``, or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None
    return functools.partial(_attend, varlen_attn, AuxRequest)


def _attend(varlen_attn, aux_request, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
            deterministic=False, return_attn_probs=False):  # fmt: skip
    """``varlen_attn`` with ``flash_attn_varlen_func``'s signature (what :func:`compose` calls)."""
    del causal, deterministic  # always False here; determinism is torch's global switch (checked by the backend)
    gqa = k.shape[1] != q.shape[1]
    if not return_attn_probs:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, enable_gqa=gqa)
    out, lse = varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, enable_gqa=gqa, return_aux=aux_request(lse=True)
    )
    return out, lse, None


def flagdit_active() -> bool:
    """Whether torch's flash-attention registry currently routes varlen_attn to our own kernels."""
    from torch.nn import attention

    current = getattr(attention, "current_flash_attention_impl", None)
    return current is not None and current() == "FLAGDIT"


def _why_missing() -> str:
    if torch_varlen_attn() is None:
        return "torch has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)"
    if flagdit_active():
        return 'torch\'s flash-attention registry has "FLAGDIT" active (varlen_attn would call us back)'
    return ""


def _varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, *, deterministic=False, **kwargs):
    if deterministic and not torch.are_deterministic_algorithms_enabled():
        raise ValueError(
            "backend 'torch_varlen' has a deterministic backward only under torch.use_deterministic_algorithms(True)"
        )
    return compose(torch_varlen_attn(), q, k, v, cu_seqlens, max_seqlen, softmax_scale, deterministic=deterministic,
                   **kwargs)  # fmt: skip


_dispatch.register(
    "varlen_attention",
    "torch_varlen",
    _varlen_attention_torch,
    devices=("cuda",),
    dtypes=TORCH_VARLEN_DTYPES,
    missing=_why_missing,
)
