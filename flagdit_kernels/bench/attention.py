"""Varlen attention cases: a packed mixed-resolution batch with gated text, and dense equal-length batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .cases import Case, backend_impls, forward_backward


def attention_flops(seqlens: list[int], text_lens: list[int], heads: int, head_dim: int) -> int:
    """Useful matmul FLOPs of the forward: 4 * L * Lk * Dh per head (QK^T and PV)."""
    return sum(4 * heads * head_dim * L * (L + lt) for L, lt in zip(seqlens, text_lens))


def padded_sdpa(q, k, v, seqlens, max_len):
    """The padded baseline: pad every sequence to the longest and run SDPA with a key mask."""
    b = len(seqlens)
    h, dh = q.shape[1:]
    qp = q.new_zeros(b, max_len, h, dh)
    kp, vp = k.new_zeros(b, max_len, *k.shape[1:]), v.new_zeros(b, max_len, *v.shape[1:])
    mask = torch.zeros(b, 1, 1, max_len, dtype=torch.bool, device=q.device)
    start = 0
    for i, L in enumerate(seqlens):
        qp[i, :L], kp[i, :L], vp[i, :L] = q[start : start + L], k[start : start + L], v[start : start + L]
        mask[i, ..., :L] = True
        start += L
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return torch.cat([out.transpose(1, 2)[i, :L] for i, L in enumerate(seqlens)])


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, head_dim = (4, 64) if quick else (32, 128)
    seqlens = [130, 66, 258, 33] if quick else [4160, 2112, 8256, 1056, 1040]
    text_len = 16 if quick else 128
    total = sum(seqlens)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    text_cu = torch.arange(len(seqlens) + 1, dtype=torch.int32, device=device) * text_len
    q = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    tk = torch.randn(len(seqlens) * text_len, heads, head_dim, device=device, dtype=dtype)
    tv = torch.randn_like(tk)
    gate = torch.randn(heads, device=device, dtype=dtype)
    out: list[Case] = []
    flops_self = attention_flops(seqlens, [0] * len(seqlens), heads, head_dim)
    flops_text = attention_flops(seqlens, [text_len] * len(seqlens), heads, head_dim)
    for with_text in (False, True):
        for direction, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # bwd is 2.5x the fwd matmuls
            leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in (q, k, v, tk, tv, gate)]

            def ours(q, k, v, tk, tv, gate, backend, with_text=with_text):
                text = dict(text_k=tk, text_v=tv, text_cu_seqlens=text_cu, gate=gate) if with_text else {}
                return ops.attention.varlen_attention(q, k, v, cu, max(seqlens), backend=backend, **text)

            def timed(fn, leaves=leaves, direction=direction, with_text=with_text):
                if direction == "fwd":
                    return lambda: fn(*leaves)
                return forward_backward(lambda: fn(*leaves), leaves if with_text else leaves[:3])

            impls = backend_impls(
                "varlen_attention", device, lambda b, timed=timed, ours=ours: timed(lambda *a: ours(*a, backend=b))
            )
            if not with_text:
                impls["padded SDPA"] = lambda timed=timed: timed(
                    lambda q, k, v, *_: padded_sdpa(q, k, v, seqlens, max(seqlens))
                )
            flops = int(mult * (flops_text if with_text else flops_self))
            shape = f"packed{len(seqlens)}x{total}-H{heads}-D{head_dim}" + (f"-text{text_len}" if with_text else "")
            out.append(Case("varlen_attention", shape, direction, impls, flops=flops))
    return out
