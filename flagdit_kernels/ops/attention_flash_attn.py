"""The ``flash_attn`` backend of ``varlen_attention``: flash-attn's varlen kernel, when it is installed.

flash-attn (``pip install flash-attn``: CUDA, fp16/bf16, head dims up to 256) has neither Lumina's gated text
branch nor a RoPE prologue, so this backend composes them around two calls of its ``flash_attn_varlen_func``:
RoPE first (``apply_rope``, a rotated copy of q and k) when ``freqs`` is given; self-attention over the packed
sequences; cross-attention of the same queries over each sample's text keys (packed by ``text_cu_seqlens``,
scale 1/sqrt(Dh)); then ``out_self + tanh(gate[h]) * o_text``, where a sample without text tokens adds exactly 0.
Gradients run through flash-attn's own backward. It is never a default: ``backend="flash_attn"`` chooses it (it
is also the baseline the benchmarks compare the fused Triton kernel with, where flash-attn is installed).
``return_lse=True`` returns flash-attn's ``softmax_lse`` (``return_attn_probs=True``); flash-attn's backward
ignores a gradient on it, so :class:`_LseGradient` supplies that gradient; ``deterministic`` is passed through.
Cross-attention (``cu_seqlens_k``) passes the keys' offsets to flash-attn; queries of a sample without keys
(flash-attn leaves 0 there, with an LSE of +inf) become exactly 0 with an LSE of -inf, as on every backend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .. import _dispatch
from .rope import apply_rope

FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_varlen_func() -> Callable | None:
    """flash-attn's ``flash_attn_varlen_func``, or None when flash-attn does not import."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class _LseGradient(torch.autograd.Function):
    """Passes flash-attn's LSE through with the gradient its backward leaves out. For lse_i = log sum_j exp(s_ij),
    s_ij = scale * q_i . k_j: d lse_i / d q_i = scale * sum_j P_ij k_j, which is attention(q, k, values=k), and
    d lse_i / d k_j = scale * sum_i P_ij q_i, which is that attention's value gradient for an upstream g_i q_i
    (GQA heads summed by flash-attn's backward). One more flash-attn forward and backward, only when a gradient
    reaches the LSE."""

    @staticmethod
    def forward(ctx, attend, q, k, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale, deterministic,
                has_keys):  # fmt: skip
        ctx.save_for_backward(q, k, cu_seqlens, cu_seqlens_k, has_keys)
        ctx.sizes = (max_seqlen, max_seqlen_k, scale, deterministic)
        ctx.attend = attend
        return lse.clone()

    @staticmethod
    def backward(ctx, g):
        q, k, cu, cu_k, has_keys = ctx.saved_tensors
        max_seqlen, max_seqlen_k, scale, deterministic = ctx.sizes
        # Rows without keys have a constant LSE (-inf): no gradient flows from them, whatever g holds there.
        g_rows = torch.where(has_keys[:, None, None], g.transpose(0, 1).unsqueeze(-1), 0.0)  # (T, H, 1)
        with torch.enable_grad():
            values = k.detach().requires_grad_()
            p_k = ctx.attend(
                q.detach(), k.detach(), values, cu, cu_k, max_seqlen, max_seqlen_k, softmax_scale=scale,
                causal=False, deterministic=deterministic,
            )  # fmt: skip
            (dk,) = torch.autograd.grad(p_k, values, (g_rows * q.float()).to(q.dtype))
        dq = (scale * g_rows * _where_keys(has_keys, p_k).float()).to(q.dtype)
        return None, dq, scale * dk, None, None, None, None, None, None, None, None


def _rows_with_keys(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(T,)`` bool: whether each query row's sample has at least one key (no host sync)."""
    has_keys = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]) > 0
    return torch.repeat_interleave(has_keys, cu_seqlens[1:] - cu_seqlens[:-1], output_size=num_rows)


def _where_keys(has_keys: torch.Tensor, x: torch.Tensor, empty: float = 0.0) -> torch.Tensor:
    """``(T, H, D)`` x with the rows of samples without keys set to ``empty`` (their gradient to 0)."""
    return torch.where(has_keys[:, None, None], x, torch.full((), empty, dtype=x.dtype, device=x.device))


def _varlen_attention_flash_attn(
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, *, text_k=None, text_v=None, text_cu_seqlens=None,
    text_max_seqlen=None, gate=None, freqs=None, return_lse=False, deterministic=False, cu_seqlens_k=None,
    max_seqlen_k=None,
):  # fmt: skip
    return compose(
        flash_varlen_func(), q, k, v, cu_seqlens, max_seqlen, softmax_scale, text_k=text_k, text_v=text_v,
        text_cu_seqlens=text_cu_seqlens, text_max_seqlen=text_max_seqlen, gate=gate, freqs=freqs,
        return_lse=return_lse, deterministic=deterministic, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


def compose(
    attend, q, k, v, cu_seqlens, max_seqlen, softmax_scale, *, text_k=None, text_v=None, text_cu_seqlens=None,
    text_max_seqlen=None, gate=None, freqs=None, return_lse=False, deterministic=False, cu_seqlens_k=None,
    max_seqlen_k=None,
):  # fmt: skip
    """``varlen_attention``'s contract around ``attend``, a function with ``flash_attn_varlen_func``'s signature
    (flash-attn's own, or torch's ``varlen_attn`` adapted): RoPE first, self-attention, the gated text branch,
    0 and LSE -inf for samples without keys, the LSE's gradient."""
    scale = float(softmax_scale)
    cu_seqlens = cu_seqlens.contiguous()
    cross = cu_seqlens_k is not None
    cu_k, max_k = (cu_seqlens_k.contiguous(), max_seqlen_k) if cross else (cu_seqlens, max_seqlen)
    if freqs is not None:
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
    out = attend(
        q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, softmax_scale=scale, causal=False,
        deterministic=deterministic, return_attn_probs=return_lse,
    )  # fmt: skip
    lse = None
    if return_lse:
        out, lse, _ = out
    if cross:  # a sample without keys: exactly 0, LSE -inf
        has_keys = _rows_with_keys(cu_seqlens, cu_k, q.shape[0])
        out = _where_keys(has_keys, out)
        if return_lse:
            lse = torch.where(has_keys[None, :], lse, -math.inf)
    if return_lse:
        has_keys = has_keys if cross else torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        lse = _LseGradient.apply(attend, q, k, lse, cu_seqlens, cu_k, max_seqlen, max_k, scale, deterministic,
                                 has_keys)  # fmt: skip
    out = _add_text(attend, out, q, cu_seqlens, max_seqlen, text_k, text_v, text_cu_seqlens, text_max_seqlen, gate,
                    deterministic)  # fmt: skip
    return (out, lse) if return_lse else out


def _add_text(attend, out, q, cu_seqlens, max_seqlen, text_k, text_v, text_cu_seqlens, text_max_seqlen, gate,
              deterministic):  # fmt: skip
    """out + tanh(gate) * the text cross-attention of the same (rotated) queries; out alone without text."""
    if text_k is None:
        return out
    if text_k.shape[0] == 0:  # no sample has text: out + tanh(gate) * 0 keeps d gate an exact zero
        o_text = torch.zeros_like(out)
    else:
        if text_max_seqlen is None:  # one host sync; pass text_max_seqlen to avoid it
            text_max_seqlen = int((text_cu_seqlens[1:] - text_cu_seqlens[:-1]).max())
        o_text = attend(
            q, text_k, text_v, cu_seqlens, text_cu_seqlens.contiguous(), max_seqlen, text_max_seqlen,
            softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=False, deterministic=deterministic,
        )  # fmt: skip
        # Queries of a sample without text keys: whatever the kernel leaves there (0 or NaN) becomes exactly 0,
        # and torch.where sends those rows a zero gradient.
        o_text = _where_keys(_rows_with_keys(cu_seqlens, text_cu_seqlens, q.shape[0]), o_text)
    # Summed in fp32 and rounded once, like the fused kernel.
    return (out.float() + torch.tanh(gate.float())[None, :, None] * o_text.float()).to(out.dtype)


_dispatch.register(
    "varlen_attention",
    "flash_attn",
    _varlen_attention_flash_attn,
    devices=("cuda",),
    dtypes=FLASH_ATTN_DTYPES,
    missing=lambda: "" if flash_varlen_func() is not None else "flash-attn is not installed (pip install flash-attn)",
)
