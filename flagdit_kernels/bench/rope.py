"""QK-norm + RoPE cases: Flag-DiT 1024px (H32 Dh128) and Lumina-Next 2B (H32/Hkv8 Dh72)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .cases import Case, backend_impls, forward_backward


def lumina_qk_norm_rope(q, k, freqs_cis, qw, qb, kw, kb):
    """Lumina-T2X's eager chain: LayerNorm over H*Dh, then complex RoPE in fp32, cast back."""
    dh = q.shape[-1]
    q = F.layer_norm(q.flatten(1), (q.shape[1] * dh,), qw, qb).view(q.shape)
    k = F.layer_norm(k.flatten(1), (k.shape[1] * dh,), kw, kb).view(k.shape)

    def rotate(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.unsqueeze(1)).flatten(2).type_as(x)

    return rotate(q), rotate(k)


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    out: list[Case] = []
    shapes = [(1040, 8, 8, 64)] if quick else [(16640, 32, 32, 128), (16640, 32, 8, 72)]
    for t, h, hkv, dh in shapes:
        positions = torch.arange(t, device=device)
        freqs = ops.rope.rope_freqs(dh, positions)
        freqs_cis = torch.complex(freqs[..., 0], freqs[..., 1])
        tensors = [
            torch.randn(t, h, dh, device=device, dtype=dtype),
            torch.randn(t, hkv, dh, device=device, dtype=dtype),
            torch.randn(h * dh, device=device, dtype=dtype),
            torch.randn(h * dh, device=device, dtype=dtype),
            torch.randn(hkv * dh, device=device, dtype=dtype),
            torch.randn(hkv * dh, device=device, dtype=dtype),
        ]

        def ours(q, k, qw, qb, kw, kb, backend, freqs=freqs):
            return ops.rope.qk_norm_rope(q, k, freqs, (qw, qb), (kw, kb), backend=backend)

        def eager(q, k, qw, qb, kw, kb, freqs_cis=freqs_cis):
            return lumina_qk_norm_rope(q, k, freqs_cis, qw, qb, kw, kb)

        baselines = {"lumina eager": eager, "torch.compile": torch.compile(eager)}
        act = t * (h + hkv) * dh * elem
        for direction, passes in (("fwd", 2), ("fwd+bwd", 5)):
            leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in tensors]

            def timed(fn, leaves=leaves, direction=direction):
                if direction == "fwd":
                    return lambda: fn(*leaves)
                return forward_backward(lambda: fn(*leaves), leaves)

            impls = backend_impls(
                "qk_norm_rope", device, lambda b, timed=timed, ours=ours: timed(lambda *a: ours(*a, backend=b))
            )
            for label, fn in baselines.items():
                impls[label] = lambda fn=fn, timed=timed: timed(fn)
            # Floor: q and k read and written once (fwd); bwd adds dq/dk in, grads out, inputs re-read.
            bytes_moved = passes * act + t * dh * 4
            out.append(Case("qk_norm_rope", f"T{t}-H{h}/{hkv}-D{dh}", direction, impls, bytes=bytes_moved))
    return out
