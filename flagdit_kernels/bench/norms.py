"""RMSNorm family cases: Flag-DiT widths at 32768 tokens (GPU) or 2048 tokens (quick / CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .cases import Case, backend_impls, forward_backward


def lumina_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Lumina-T2X's eager RMSNorm, the baseline users run today."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def _packed_batch(tokens: int, seqs: int, device) -> torch.Tensor:
    bounds = torch.linspace(0, tokens, seqs + 1).round().to(torch.int32)
    return bounds.to(device)


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 2048 if quick else 32768
    widths = (2304,) if quick else (2304, 3072, 4096)
    out: list[Case] = []
    for d in widths:
        elem = torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        w = torch.randn(d, device=device, dtype=dtype)
        compiled = torch.compile(lumina_rms_norm)
        for direction in ("fwd", "fwd+bwd"):
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

            def make(fn, direction=direction, xg=xg, wg=wg):
                if direction == "fwd":
                    return lambda: fn(x, w)
                return forward_backward(lambda: fn(xg, wg), [xg, wg])

            impls = backend_impls(
                "rms_norm", device, lambda b, make=make: make(lambda a, c: ops.norms.rms_norm(a, c, backend=b))
            )
            impls["lumina eager"] = lambda make=make: make(lumina_rms_norm)
            impls["torch.compile"] = lambda make=make, compiled=compiled: make(compiled)
            impls["F.rms_norm"] = lambda make=make: make(lambda a, c: F.rms_norm(a, (d,), c, 1e-5))
            passes = 2 if direction == "fwd" else 5  # read x, write y; + read x, dy, write dx
            out.append(Case("rms_norm", f"{tokens}x{d}", direction, impls, bytes=passes * tokens * d * elem))

    seqs = 8
    tokens_packed = 2048 if quick else 33200
    d = 2304
    cu = _packed_batch(tokens_packed, seqs, device)
    per_token = torch.repeat_interleave(torch.diff(cu).long())

    def modulate_eager(x, w, scale, shift):
        return lumina_rms_norm(x, w) * (1 + scale[per_token.to(x.device)]) + shift[per_token.to(x.device)]

    def gated_eager(res, h, w, gate):
        return res + torch.tanh(gate[per_token.to(h.device)]) * lumina_rms_norm(h, w)

    specs = {
        "rms_norm_modulate": (
            lambda t, b: ops.norms.rms_norm_modulate(t[0], t[1], t[2], t[3], cu_seqlens=cu, backend=b),
            modulate_eager,
            [(tokens_packed, d), (d,), (seqs, d), (seqs, d)],
        ),
        "gated_residual_rms_norm": (
            lambda t, b: ops.norms.gated_residual_rms_norm(t[0], t[1], t[2], t[3], cu_seqlens=cu, backend=b),
            gated_eager,
            [(tokens_packed, d), (tokens_packed, d), (d,), (seqs, d)],
        ),
    }
    elem = torch.tensor([], dtype=dtype).element_size()
    for op, (ours, eager, shapes) in specs.items():
        tensors = [torch.randn(s, device=device, dtype=dtype).requires_grad_() for s in shapes]
        compiled = torch.compile(eager)
        big = sum(1 for s in shapes if s[0] == tokens_packed)
        for direction in ("fwd", "fwd+bwd"):

            def make(fn, direction=direction, tensors=tensors):
                if direction == "fwd":
                    return lambda: fn(*tensors)
                return forward_backward(lambda: fn(*tensors), tensors)

            impls = backend_impls(op, device, lambda b, make=make, ours=ours: make(lambda *t: ours(t, b)))
            impls["lumina eager"] = lambda make=make, eager=eager: make(eager)
            impls["torch.compile"] = lambda make=make, compiled=compiled: make(compiled)
            # fwd: read the big inputs, write one output; bwd: read them again plus dy, write their grads.
            passes = big + 1 if direction == "fwd" else 3 * big + 2
            out.append(
                Case(op, f"packed{seqs}x{tokens_packed}x{d}", direction, impls, bytes=passes * tokens_packed * d * elem)
            )
    return out
