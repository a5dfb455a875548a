"""RoPE cases: ``apply_rope`` on q and k (B4 L4096 H32 Dh128, the shape of the DESIGN baselines) and fused
QK-norm + RoPE for Flag-DiT 1024px (16640 tokens, H32 Dh128) and Lumina-Next 2B (H32/Hkv8 Dh72).

Byte floors count what any implementation must move: every activation read once and written once per pass,
the fp32 (cos, sin) table read once per pass, norm parameters read (and their gradients written) once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import ops
from ..cases import CHEAP, Case, Select, SmokeCase, backend_impls, forward_backward

# Where the GPU check times these cases (flagdit_kernels.bench.plan).
PLAN = {"bandwidth": tuple(Select(op, impl=f"{CHEAP}|torch.compile") for op in ("apply_rope", "qk_norm_rope"))}


def lumina_rope(x, freqs_cis):
    """Lumina-T2X's apply_rotary_emb: adjacent pairs as complex numbers in fp32, cast back."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2).type_as(x)


def lumina_qk_norm_rope(q, k, freqs_cis, qw, qb, kw, kb):
    """Lumina-T2X's eager chain: LayerNorm over H*Dh, then complex RoPE in fp32, cast back."""
    dh = q.shape[-1]
    q = F.layer_norm(q.flatten(1), (q.shape[1] * dh,), qw, qb).view(q.shape)
    k = F.layer_norm(k.flatten(1), (k.shape[1] * dh,), kw, kb).view(k.shape)
    return lumina_rope(q, freqs_cis), lumina_rope(k, freqs_cis)


def _liger_rope():
    """Liger-Kernel's fused q+k RoPE (rotate-half convention) when installed, else None."""
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    return liger_rotary_pos_emb


def _timed(fn, leaves, direction):
    if direction == "fwd":
        return lambda: fn(*leaves)
    return forward_backward(lambda: fn(*leaves), leaves)


def _apply_rope_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    elem = torch.tensor([], dtype=dtype).element_size()
    b, l, h, dh = (1, 64, 4, 64) if quick else (4, 4096, 32, 128)
    freqs = ops.rope.rope_freqs(dh, torch.arange(l, device=device))  # one (L, Dh/2, 2) table for the batch
    freqs_cis = torch.complex(freqs[..., 0], freqs[..., 1])
    # Liger's tables: (1, L, Dh) in the activations' dtype, the half table repeated over both halves.
    cos_full = torch.cat([freqs[..., 0]] * 2, dim=-1)[None].to(dtype)
    sin_full = torch.cat([freqs[..., 1]] * 2, dim=-1)[None].to(dtype)
    liger = _liger_rope() if device.type == "cuda" else None
    tensors = [torch.randn(b, l, h, dh, device=device, dtype=dtype) for _ in range(2)]  # q, k

    def ours(q, k, backend):
        return ops.rope.apply_rope(q, freqs, backend=backend), ops.rope.apply_rope(k, freqs, backend=backend)

    def eager(q, k):
        return lumina_rope(q, freqs_cis), lumina_rope(k, freqs_cis)

    baselines = {"lumina eager": eager, "torch.compile": torch.compile(eager)}
    if liger is not None:
        # Liger takes (B, H, L, Dh) views; ours are (B, L, H, Dh) storage, the layout a QKV projection makes.
        # It rotates halves rather than adjacent pairs: the same bytes and flops.
        def liger_fn(q, k):
            return liger(q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full)

        baselines["liger (rotate-half)"] = liger_fn

    act = 2 * b * l * h * dh * elem  # q + k
    table = l * dh * 4
    out = []
    for direction, passes in (("fwd", 1), ("fwd+bwd", 2)):  # each pass reads and writes q and k once
        leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in tensors]
        impls = backend_impls(
            "apply_rope", device, lambda name, leaves=leaves, d=direction: _timed(
                lambda q, k: ours(q, k, name), leaves, d
            )
        )  # fmt: skip
        for label, fn in baselines.items():
            impls[label] = lambda fn=fn, leaves=leaves, d=direction: _timed(fn, leaves, d)
        out.append(
            Case(
                "apply_rope",
                f"B{b}-L{l}-H{h}-D{dh}-q+k",
                direction,
                impls,
                bytes=passes * (2 * act + table),
                notes={"interleaved": True, "freqs": "(L, Dh/2, 2) shared by the batch"},
            )
        )
    return out


def _qk_norm_rope_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
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
        params = 2 * (h + hkv) * dh * elem
        table = t * dh * 4
        # fwd: read q, k, write outputs (2 activation passes), table and params once.
        # bwd: read q, k, dq_out, dk_out, write dq, dk (3 passes), table and params again, param grads out.
        for direction, passes, kernel_passes in (("fwd", 2, 1), ("fwd+bwd", 5, 2)):
            leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in tensors]
            impls = backend_impls(
                "qk_norm_rope", device, lambda b, leaves=leaves, d=direction, ours=ours: _timed(
                    lambda *a: ours(*a, backend=b), leaves, d
                )
            )  # fmt: skip
            for label, fn in baselines.items():
                impls[label] = lambda fn=fn, leaves=leaves, d=direction: _timed(fn, leaves, d)
            param_grads = params if direction != "fwd" else 0
            bytes_moved = passes * act + kernel_passes * (table + params) + param_grads
            out.append(Case("qk_norm_rope", f"T{t}-H{h}/{hkv}-D{dh}", direction, impls, bytes=bytes_moved))
    return out


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return _apply_rope_cases(quick, device, dtype) + _qk_norm_rope_cases(quick, device, dtype)


def smoke_cases(device: torch.device) -> list[SmokeCase]:
    """RoPE on 40 tokens, adjacent pairs at Dh 64 and halves at Dh 72; QK-norm + RoPE with GQA (4 query heads,
    2 key heads), LayerNorm across heads and RMSNorm per head."""

    def rope(interleaved: bool, head_dim: int) -> SmokeCase:
        freqs = ops.rope.rope_freqs(head_dim, torch.arange(40, device=device))
        run = lambda b, x: ops.rope.apply_rope(x, freqs, interleaved=interleaved, backend=b)
        name = f"apply_rope-{'interleaved' if interleaved else 'halves'}-D{head_dim}"
        return SmokeCase(name, "apply_rope", {"x": (40, 3, head_dim)}, run)

    def qk_norm_rope(norm: str) -> SmokeCase:
        freqs = ops.rope.rope_freqs(64, torch.arange(40, device=device))
        width = {"q": 4 * 64, "k": 2 * 64} if norm == "layer_norm" else {"q": 64, "k": 64}

        def run(b, q, k, qw, qb, kw, kb):
            return ops.rope.qk_norm_rope(q, k, freqs, (qw, qb), (kw, kb), norm=norm, backend=b)

        shapes = {"q": (40, 4, 64), "k": (40, 2, 64), "qw": (width["q"],), "qb": (width["q"],)}
        return SmokeCase(
            f"qk_norm_rope-{norm}-gqa", "qk_norm_rope", {**shapes, "kw": (width["k"],), "kb": (width["k"],)}, run
        )

    return [rope(True, 64), rope(False, 72), qk_norm_rope("layer_norm"), qk_norm_rope("rms_norm")]
