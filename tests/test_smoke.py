"""One tiny forward + backward of every public op on every compiled or Triton backend that runs here, against
the float64 reference: the GPU check's first phase (a broken kernel shows in seconds, before minutes go into
timing it) and compute-sanitizer's workload (``benchmarks/gpu_check.sh --sanitize``).

On a GPU each case runs in bf16 and fp32; on the CPU (Triton under ``TRITON_INTERPRET=1``, the C++ ops) in
fp32. The attention cases cover what the kernels branch on: a power-of-two head dim (the descriptor / TMA
tiles where the autotuner offers them; ``FLAGDIT_KERNELS_AUTOTUNE=compile`` runs every tile), Dh 72 as 64 + 16
with GQA, in-kernel RoPE and a sample without text, and Dh 128 with text.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import DEVICE, ON_GPU, compare_with_reference, fresh, offsets_of

import flagdit_kernels as fk

DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
SKIP = ("reference", "flash_attn")  # the spec itself; a third-party kernel with its own tests


def _rms_norm(dtype):
    return "rms_norm", {"x": (65, 72), "weight": (72,)}, lambda b, x, weight: fk.rms_norm(x, weight, backend=b)


def _modulate_packed(dtype):
    cu = offsets_of([30, 1, 39])

    def run(b, x, weight, scale, shift):
        return fk.rms_norm_modulate(x, weight, scale, shift, cu_seqlens=cu, backend=b)

    return "rms_norm_modulate", {"x": (70, 96), "weight": (96,), "scale": (3, 96), "shift": (3, 96)}, run


def _modulate_padded(dtype):
    def run(b, x, weight, scale):
        return fk.rms_norm_modulate(x, weight, scale, backend=b)

    return "rms_norm_modulate", {"x": (2, 33, 64), "weight": (64,), "scale": (2, 64)}, run


def _gated_packed(dtype):
    cu = offsets_of([30, 1, 39])

    def run(b, residual, h, weight, gate):
        return fk.gated_residual_rms_norm(residual, h, weight, gate, cu_seqlens=cu, backend=b)

    return "gated_residual_rms_norm", {"residual": (70, 96), "h": (70, 96), "weight": (96,), "gate": (3, 96)}, run


def _layer_modulate_packed(dtype):
    cu = offsets_of([30, 1, 39])

    def run(b, x, scale, shift, weight, bias):
        return fk.layer_norm_modulate(x, scale, shift, weight, bias, cu_seqlens=cu, backend=b)

    shapes = {"x": (70, 96), "scale": (3, 96), "shift": (3, 96), "weight": (96,), "bias": (96,)}
    return "layer_norm_modulate", shapes, run


def _rope(interleaved: bool, head_dim: int):
    def case(dtype):
        freqs = fk.rope_freqs(head_dim, torch.arange(40, device=DEVICE))
        run = lambda b, x: fk.apply_rope(x, freqs, interleaved=interleaved, backend=b)
        return "apply_rope", {"x": (40, 3, head_dim)}, run

    return case


def _qk_norm_rope(norm: str):
    def case(dtype):
        freqs = fk.rope_freqs(64, torch.arange(40, device=DEVICE))
        width = {"q": 4 * 64, "k": 2 * 64} if norm == "layer_norm" else {"q": 64, "k": 64}

        def run(b, q, k, qw, qb, kw, kb):
            return fk.qk_norm_rope(q, k, freqs, (qw, qb), (kw, kb), norm=norm, backend=b)

        shapes = {"q": (40, 4, 64), "k": (40, 2, 64), "qw": (width["q"],), "qb": (width["q"],)}
        return "qk_norm_rope", {**shapes, "kw": (width["k"],), "kb": (width["k"],)}, run

    return case


def _attention(lens, text_lens, heads, kv_heads, head_dim, rope=False):
    def case(dtype):
        shapes = {"q": (sum(lens), heads, head_dim), "k": (sum(lens), kv_heads, head_dim)}
        shapes["v"] = shapes["k"]
        fixed = {"cu_seqlens": offsets_of(lens), "max_seqlen": max(lens)}
        if text_lens is not None:
            shapes.update(text_k=(sum(text_lens), kv_heads, head_dim), text_v=(sum(text_lens), kv_heads, head_dim))
            shapes["gate"] = (heads,)
            fixed.update(text_cu_seqlens=offsets_of(text_lens), text_max_seqlen=max(text_lens))
        if rope:
            fixed["freqs"] = fk.rope_freqs(head_dim, torch.cat([torch.arange(n, device=DEVICE) for n in lens]))
        return "varlen_attention", shapes, lambda b, **t: fk.varlen_attention(**t, **fixed, backend=b)

    return case


LATENTS = [(4, 6, 8), (4, 3, 4, 6), (4, 2, 10)]


def _pack(dtype):
    def run(b, a, v, c):
        return fk.pack([a, v, c], 2, backend=b).patches

    return "pack", dict(zip("avc", LATENTS)), run


def _unpack(dtype):
    packed = fk.pack([torch.zeros(s, device=DEVICE) for s in LATENTS], 2, backend="reference")
    return "unpack", {"tokens": tuple(packed.patches.shape)}, lambda b, tokens: fk.unpack(tokens, packed, 4, backend=b)


def _embed(dtype):
    packed = fk.pack([torch.zeros(s, device=DEVICE) for s in LATENTS], 2, backend="reference")

    def run(b, patches, weight, bias, table):
        return fk.embed_packed(patches, packed.kind, weight, bias, table, backend=b)

    shapes = {"patches": tuple(packed.patches.shape), "weight": (40, 16), "bias": (40,), "table": (2, 40)}
    return "embed_packed", shapes, run


CASES = {
    "rms_norm": _rms_norm,
    "rms_norm_modulate-packed": _modulate_packed,
    "rms_norm_modulate-padded": _modulate_padded,
    "gated_residual_rms_norm-packed": _gated_packed,
    "layer_norm_modulate-packed": _layer_modulate_packed,
    "apply_rope-interleaved-D64": _rope(True, 64),
    "apply_rope-halves-D72": _rope(False, 72),
    "qk_norm_rope-layer_norm-gqa": _qk_norm_rope("layer_norm"),
    "qk_norm_rope-rms_norm-gqa": _qk_norm_rope("rms_norm"),
    "varlen_attention-D64-self": _attention([17, 1, 30], None, 2, 2, 64),
    "varlen_attention-D72-gqa-text-empty-rope": _attention([17, 1, 30], [5, 0, 9], 4, 2, 72, rope=True),
    "varlen_attention-D128-text": _attention([33, 20], [7, 3], 2, 1, 128),
    "pack": _pack,
    "unpack": _unpack,
    "embed_packed": _embed,
}
OPS = {name: case(torch.float32)[0] for name, case in CASES.items()}


def _params():
    for name, op in OPS.items():
        for backend in fk.available_backends(op, DEVICE):
            if backend not in SKIP:
                for dtype in DTYPES:
                    yield pytest.param(name, backend, dtype, id=f"{name}-{backend}-{str(dtype).split('.')[-1]}")


@pytest.mark.parametrize(("name", "backend", "dtype"), list(_params()))
def test_op_matches_reference(name, backend, dtype):
    op, shapes, run = CASES[name](dtype)
    inputs = {key: fresh(shape, dtype, scale=0.5 if key in ("gate", "scale") else 1.0) for key, shape in shapes.items()}
    family = "attention" if op == "varlen_attention" else "norm"
    mine, spec = (lambda **t: run(backend, **t)), (lambda **t: run("reference", **t))
    compare_with_reference(mine, spec, inputs, dtype, family=family)
