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


def _timed(fn, tensors: list[torch.Tensor], direction: str):
    """The closure to time: ``fn(*tensors)``, or forward + backward through it."""
    if direction == "fwd":
        return lambda: fn(*tensors)
    return forward_backward(lambda: fn(*tensors), tensors)


def _case(op, shape, direction, ours, baselines: dict, shapes, device, dtype, bytes_moved) -> Case:
    tensors = [torch.randn(s, device=device, dtype=dtype).requires_grad_(direction != "fwd") for s in shapes]
    impls = backend_impls(op, device, lambda b: _timed(lambda *t: ours(*t, backend=b), tensors, direction))
    for label, fn in baselines.items():
        impls[label] = lambda fn=fn: _timed(fn, tensors, direction)
    return Case(op, shape, direction, impls, bytes=bytes_moved)


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    out: list[Case] = []

    tokens = 2048 if quick else 32768
    for d in (2304,) if quick else (2304, 3072, 4096):
        baselines = {
            "lumina eager": lumina_rms_norm,
            "torch.compile": torch.compile(lumina_rms_norm),
            "F.rms_norm": lambda x, w, d=d: F.rms_norm(x, (d,), w, 1e-5),
        }
        for direction, passes in (("fwd", 2), ("fwd+bwd", 5)):  # x, y; then x, dy, dx again
            out.append(
                _case(
                    "rms_norm",
                    f"{tokens}x{d}",
                    direction,
                    ops.norms.rms_norm,
                    baselines,
                    [(tokens, d), (d,)],
                    device,
                    dtype,
                    passes * tokens * d * elem,
                )
            )

    seqs, d = 8, 2304
    tokens = 2048 if quick else 33200
    cu = _packed_batch(tokens, seqs, device)
    sample = torch.repeat_interleave(torch.diff(cu).long())

    def modulate_eager(x, w, scale, shift):
        return lumina_rms_norm(x, w) * (1 + scale[sample]) + shift[sample]

    def gated_eager(res, h, w, gate):
        return res + torch.tanh(gate[sample]) * lumina_rms_norm(h, w)

    def modulate_ours(x, w, scale, shift, backend):
        return ops.norms.rms_norm_modulate(x, w, scale, shift, cu_seqlens=cu, backend=backend)

    def gated_ours(res, h, w, gate, backend):
        return ops.norms.gated_residual_rms_norm(res, h, w, gate, cu_seqlens=cu, backend=backend)

    specs = (
        ("rms_norm_modulate", modulate_ours, modulate_eager, [(tokens, d), (d,), (seqs, d), (seqs, d)], 1),
        ("gated_residual_rms_norm", gated_ours, gated_eager, [(tokens, d), (tokens, d), (d,), (seqs, d)], 2),
    )
    for op, ours, eager, shapes, big in specs:
        baselines = {"lumina eager": eager, "torch.compile": torch.compile(eager)}
        # fwd reads the token-sized inputs and writes one output; bwd reads them and dy again, writes their grads.
        for direction, passes in (("fwd", big + 1), ("fwd+bwd", 3 * big + 2)):
            out.append(
                _case(
                    op,
                    f"packed{seqs}x{tokens}x{d}",
                    direction,
                    ours,
                    baselines,
                    shapes,
                    device,
                    dtype,
                    passes * tokens * d * elem,
                )
            )
    return out
