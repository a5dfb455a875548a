"""Norm family cases: Flag-DiT widths at 32768 tokens (GPU) or 2048 tokens (quick / CPU).

Baselines: Lumina-T2X's eager code, ``torch.compile`` of it, ``F.rms_norm`` and, when ``liger_kernel`` imports
(GPU only), Liger-Kernel's RMSNorm in its "llama" casting mode (Lumina's rounding). ``layer_norm_modulate``'s
baselines are Flag-DiT's final layer as it runs eager (``nn.LayerNorm(elementwise_affine=False)`` then the
modulation) and its ``torch.compile``. ``bytes`` is the DRAM floor:
every token-sized tensor read or written once (weights and per-sample tensors are negligible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import ops
from ..cases import CHEAP, Case, Select, SmokeCase, backend_impls, forward_backward, offsets

# Where the GPU check times these cases (flagdit_kernels.bench.plan): RMSNorm at its two headline shapes, then
# the packed per-sample norms; ours and the baselines that cost no compile before torch.compile's.
PLAN = {
    "bandwidth": (
        *(
            Select("rms_norm", shape, impl=impl)
            for shape in ("32768x4096", "32768x2304")
            for impl in (CHEAP, "torch.compile")
        ),
        *(
            Select(op, "packed*x2304", impl=f"{CHEAP}|torch.compile")
            for op in ("rms_norm_modulate", "gated_residual_rms_norm", "layer_norm_modulate")
        ),
    )
}

# What we expect, written before any GPU run (the floor is each case's bytes at the run's copy bandwidth; the
# rows of the norms measured before this declaration are in benchmarks/RESULTS.md's per-op record already).
PREDICTIONS = {
    ("layer_norm_modulate", "packed8x33200x2304", "fwd+bwd"): (
        "target >= 2x torch.compile of Flag-DiT's eager final layer (LayerNorm then modulation; its compile not "
        "measured, assumed about the RMS modulate's 0.68 ms: <= ~0.34 ms); predicted 0.26-0.33 ms, 2.1-2.6x: the "
        "rms_norm_modulate kernels plus one row reduction (the mean) each way"
    ),
}


def lumina_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Lumina-T2X's eager RMSNorm, the baseline users run today."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def liger_rms_norm(device: torch.device):
    """Liger-Kernel's fused RMSNorm as ``fn(x, weight)``, or None when it is not installed / not on a GPU."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:  # not installed, or an incompatible version
        return None
    # (X, W, eps, offset, casting_mode, in_place): "llama" rounds x * rstd to x's dtype before the weight
    # multiply like Lumina; in_place=False keeps the fixed upstream gradient intact between timed steps.
    return lambda x, w, eps=1e-5: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)


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

    widths = (2304,) if quick else (2304, 3072, 4096)
    liger = liger_rms_norm(device)
    tokens = 2048 if quick else 32768
    for d in widths:
        baselines = {
            "lumina eager": lumina_rms_norm,
            "torch.compile": torch.compile(lumina_rms_norm),
            "F.rms_norm": lambda x, w, d=d: F.rms_norm(x, (d,), w, 1e-5),
        }
        if liger is not None:
            baselines["liger"] = liger
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

    # Packed batches of 8 sequences (the Lumina-Next sandwich norms): 33200 tokens at D = 2304 (the shape
    # of the H200 baselines in DESIGN.md), 32768 tokens at the wider Flag-DiT widths.
    seqs = 8
    for d in widths:
        tokens = 2048 if quick else (33200 if d == 2304 else 32768)
        out.extend(_packed_cases(tokens, seqs, d, device, dtype, elem))
    return out


def _packed_cases(tokens: int, seqs: int, d: int, device, dtype, elem: int) -> list[Case]:
    out: list[Case] = []
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

    def layer_modulate_eager(x, scale, shift):
        return F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[sample]) + shift[sample]

    def layer_modulate_ours(x, scale, shift, backend):
        return ops.norms.layer_norm_modulate(x, scale, shift, cu_seqlens=cu, backend=backend)

    # (op, ours, eager, input shapes, fwd passes, fwd+bwd passes) over token-sized tensors:
    # modulate (RMS or LayerNorm): fwd reads x, writes y (2); bwd reads x, dy, writes dx (3).
    # gated: fwd reads residual, h, writes y (3); bwd reads h, dy, writes dh (3); d residual is dy itself.
    specs = (
        ("rms_norm_modulate", modulate_ours, modulate_eager, [(tokens, d), (d,), (seqs, d), (seqs, d)], 2, 5),
        ("gated_residual_rms_norm", gated_ours, gated_eager, [(tokens, d), (tokens, d), (d,), (seqs, d)], 3, 6),
        ("layer_norm_modulate", layer_modulate_ours, layer_modulate_eager, [(tokens, d), (seqs, d), (seqs, d)], 2, 5),
    )
    for op, ours, eager, shapes, fwd_passes, fwd_bwd_passes in specs:
        baselines = {"lumina eager": eager, "torch.compile": torch.compile(eager)}
        for direction, passes in (("fwd", fwd_passes), ("fwd+bwd", fwd_bwd_passes)):
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


def smoke_cases(device: torch.device) -> list[SmokeCase]:
    """Each norm once, the per-sample ones packed (samples of 30, 1 and 39 tokens) and RMS modulate padded too."""
    cu = offsets([30, 1, 39], device)

    def modulate_packed(b, x, weight, scale, shift):
        return ops.norms.rms_norm_modulate(x, weight, scale, shift, cu_seqlens=cu, backend=b)

    def gated_packed(b, residual, h, weight, gate):
        return ops.norms.gated_residual_rms_norm(residual, h, weight, gate, cu_seqlens=cu, backend=b)

    def layer_modulate_packed(b, x, scale, shift, weight, bias):
        return ops.norms.layer_norm_modulate(x, scale, shift, weight, bias, cu_seqlens=cu, backend=b)

    packed = {"x": (70, 96), "scale": (3, 96), "shift": (3, 96)}
    return [
        SmokeCase(
            "rms_norm",
            "rms_norm",
            {"x": (65, 72), "weight": (72,)},
            lambda b, x, weight: ops.norms.rms_norm(x, weight, backend=b),
        ),
        SmokeCase("rms_norm_modulate-packed", "rms_norm_modulate", {**packed, "weight": (96,)}, modulate_packed),
        SmokeCase(
            "rms_norm_modulate-padded",
            "rms_norm_modulate",
            {"x": (2, 33, 64), "weight": (64,), "scale": (2, 64)},
            lambda b, x, weight, scale: ops.norms.rms_norm_modulate(x, weight, scale, backend=b),
        ),
        SmokeCase(
            "gated_residual_rms_norm-packed",
            "gated_residual_rms_norm",
            {"residual": (70, 96), "h": (70, 96), "weight": (96,), "gate": (3, 96)},
            gated_packed,
        ),
        SmokeCase(
            "layer_norm_modulate-packed",
            "layer_norm_modulate",
            {**packed, "weight": (96,), "bias": (96,)},
            layer_modulate_packed,
        ),
    ]
