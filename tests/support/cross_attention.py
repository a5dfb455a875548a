"""Packed cross-attention (keys packed by their own offsets) for the attention tests: the float64 math from the
definition, and whether the Triton launchers take the key offsets yet."""

from __future__ import annotations

import inspect
import math

import torch
from support.helpers import TRITON_INSTALLED


def launchers_take_key_offsets() -> bool:
    """Whether flagdit_kernels/triton/attention/launch.py's forward takes ``cu_seqlens_k``."""
    if not TRITON_INSTALLED:
        return False
    from flagdit_kernels.triton.attention import launch as kernels

    return "cu_seqlens_k" in inspect.signature(kernels.forward).parameters


def cross_attention_math(q, k, v, q_lens, k_lens, scale, text=None):
    """float64 cross-attention per sample from the definition: softmax over the sample's keys (GQA by repeating
    key heads), 0 and LSE -inf without keys; plus tanh(gate) * the text attention when ``text`` is given."""
    group = q.shape[1] // k.shape[1]
    outs, lses, qs, ks = [], [], 0, 0
    for b, (n, m) in enumerate(zip(q_lens, k_lens)):
        qb = q[qs : qs + n].double()
        kb = k[ks : ks + m].double().repeat_interleave(group, 1)
        vb = v[ks : ks + m].double().repeat_interleave(group, 1)
        if m == 0:
            out, lse = torch.zeros_like(qb), torch.full((q.shape[1], n), -math.inf, dtype=torch.float64)
        else:
            s = torch.einsum("qhd,khd->hqk", qb, kb) * scale
            out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vb)
            lse = torch.log(torch.exp(s - s.amax(-1, keepdim=True)).sum(-1)) + s.amax(-1)
        if text is not None:
            tk, tv, t_lens, gate = text
            t0, t1 = sum(t_lens[:b]), sum(t_lens[: b + 1])
            if t1 > t0:
                tkb, tvb = (x[t0:t1].double().repeat_interleave(group, 1) for x in (tk, tv))
                st = torch.einsum("qhd,khd->hqk", qb, tkb) / math.sqrt(q.shape[-1])
                out = out + torch.tanh(gate.double())[:, None] * torch.einsum("hqk,khd->qhd", st.softmax(-1), tvb)
        outs.append(out)
        lses.append(lse)
        qs, ks = qs + n, ks + m
    return torch.cat(outs), torch.cat(lses, dim=1)
