"""Varlen attention cases (issue 6):

(a) a packed mixed-resolution batch (lengths like 4160, 2112, 8256, 1056, 1040; H32 Dh128, and Lumina-Next 2B's
    H32/8 Dh72), self-only against FlexAttention with a document mask (compiled), a padded SDPA with a key mask
    and, on CUDA, SDPA's flash backend on the padded batch (which takes no mask: pad keys are attended, so it is a
    speed baseline only), and with 128 gated text tokens per sample;
(b) dense equal-length batches at Dh 128 / 96 / 72 against SDPA's flash and cuDNN backends;
(c) Lumina's whole gated attention after the projections (QK LayerNorm + RoPE + self + gated text, text keys
    LayerNorm'd) at B4 L4160 H32 Dh128 with 256 text tokens, against the eager Lumina chain and its torch.compile.

In every family, torch's ``torch.nn.attention.varlen.varlen_attn`` is a baseline where torch has it (packed:
the ``torch_varlen`` backend, our text branch composed around it; dense: ``varlen_attn`` on the flattened
batch; Lumina: the fused chain on the ``torch_varlen`` backend), flash-attn where installed (its backend), and
``fk auto`` is ``fk.varlen_attention`` with no backend named: the engine the measured choice keeps
(``attention_engines.py``; the benchmark report lists what each regime chose).

FLOPs are the useful matmul work: 4 * Lq * Lk * Dh per head forward (QK^T and PV), and 3.5x that for
forward + backward (the backward's five matmuls: dV, dP, dQ, dK plus the recomputed QK^T = 2.5x the forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import _dispatch, ops
from ..cases import Case, SmokeCase, backend_impls, forward_backward, offsets

FWD_BWD_FACTOR = 3.5


def attention_flops(seqlens: list[int], text_lens: list[int], heads: int, head_dim: int) -> int:
    """Useful matmul FLOPs of the forward: 4 * L * Lk * Dh per head (QK^T and PV), self keys plus text keys."""
    return sum(4 * heads * head_dim * L * (L + lt) for L, lt in zip(seqlens, text_lens))


def _triton_on(device: torch.device) -> bool:
    return device.type == "cuda" and "triton" in _dispatch.available_backends("varlen_attention", device)


def padded_sdpa(q, k, v, seqlens, max_len, masked=True):
    """The padded baseline: pad every sequence to the longest and run SDPA with a key mask (``masked=False``:
    without one, as SDPA's flash backend requires; pad keys then take part, so only its speed is comparable)."""
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
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask if masked else None,
        enable_gqa=True,
    )  # fmt: skip
    return torch.cat([out.transpose(1, 2)[i, :L] for i, L in enumerate(seqlens)])


def flex_document_attention(seqlens: list[int], device: torch.device):
    """FlexAttention (compiled) over the packed tokens with a block-sparse document mask; None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    doc = torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.tensor(seqlens, device=device))
    total = doc.numel()

    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask = create_block_mask(same_document, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # packed (T, H, Dh) -> (1, H, T, Dh) views, no copies
        out = compiled(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            block_mask=block_mask,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.squeeze(0).transpose(0, 1)

    return run


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def run(q, k, v):  # (B, L, H, Dh) -> SDPA on (B, H, L, Dh) views
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return run


def _padded_flash(seqlens: list[int]):
    """padded_sdpa without a mask under SDPA's flash backend (the issue-12 target's baseline for Dh 72 GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return padded_sdpa(q, k, v, seqlens, max(seqlens), masked=False)

    return run


def _flash_attn_dense():
    """flash-attn's flash_attn_func on (B, L, H, Dh), where flash-attn is installed; else None."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _torch_varlen_attn(cu: torch.Tensor, length: int):
    """torch's varlen_attn over a dense (B, L, H, Dh) batch flattened to packed rows; None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None

    def run(q, k, v):
        rows = [t.flatten(0, 1) for t in (q, k, v)]
        return varlen_attn(*rows, cu, cu, length, length, enable_gqa=k.shape[2] != q.shape[2]).view(q.shape)

    return run


def _sdpa_default(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _timed(fn, leaves: list[torch.Tensor], direction: str, grad_leaves: list[torch.Tensor] | None = None):
    if direction == "fwd":
        return lambda: fn(*leaves)
    return forward_backward(lambda: fn(*leaves), grad_leaves if grad_leaves is not None else leaves)


def _packed_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    # Flag-DiT 5B/7B-like heads (H32 Dh128), and Lumina-Next 2B (H32, 8 kv heads, Dh 72: GQA + a padded head dim).
    head_configs = [(4, 2, 64)] if quick else [(32, 32, 128), (32, 8, 72)]
    seqlens = [130, 66, 258, 33] if quick else [4160, 2112, 8256, 1056, 1040]
    text_len = 16 if quick else 128
    total = sum(seqlens)
    cu = offsets(seqlens, device)
    text_cu = torch.arange(len(seqlens) + 1, dtype=torch.int32, device=device) * text_len
    flex = flex_document_attention(seqlens, device) if device.type == "cuda" else None
    out: list[Case] = []
    for heads, kv_heads, head_dim in head_configs:
        q = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        tk = torch.randn(len(seqlens) * text_len, kv_heads, head_dim, device=device, dtype=dtype)
        tv = torch.randn_like(tk)
        gate = torch.randn(heads, device=device, dtype=dtype)
        for with_text in (False, True):
            lens_t = [text_len if with_text else 0] * len(seqlens)
            for direction in ("fwd", "fwd+bwd"):
                leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in (q, k, v, tk, tv, gate)]
                grads = leaves if with_text else leaves[:3]

                def ours(q, k, v, tk, tv, gate, backend, with_text=with_text):
                    text = dict(text_k=tk, text_v=tv, text_cu_seqlens=text_cu, text_max_seqlen=text_len, gate=gate)
                    return ops.attention.varlen_attention(
                        q, k, v, cu, max(seqlens), backend=backend, **(text if with_text else {})
                    )

                impls = backend_impls(
                    "varlen_attention",
                    device,
                    lambda b, ours=ours, leaves=leaves, direction=direction, grads=grads: _timed(
                        lambda *a: ours(*a, backend=b), leaves, direction, grads
                    ),
                )
                if not quick:
                    impls.pop("reference", None)  # a host loop over (H, L, L) fp32 score matrices: minutes, GBs
                if _triton_on(device):
                    impls["fk auto"] = lambda ours=ours, leaves=leaves, direction=direction, grads=grads: _timed(
                        lambda *a: ours(*a, backend=None), leaves, direction, grads
                    )
                if not with_text:
                    impls["padded SDPA"] = lambda leaves=leaves, direction=direction: _timed(
                        lambda a, b, c: padded_sdpa(a, b, c, seqlens, max(seqlens)), leaves[:3], direction
                    )
                    if flex is not None:
                        impls["flex docmask"] = lambda leaves=leaves, direction=direction: _timed(
                            flex, leaves[:3], direction
                        )
                    if device.type == "cuda":
                        impls["padded SDPA flash"] = lambda leaves=leaves, direction=direction: _timed(
                            _padded_flash(seqlens), leaves[:3], direction
                        )
                mult = 1.0 if direction == "fwd" else FWD_BWD_FACTOR
                flops = int(mult * attention_flops(seqlens, lens_t, heads, head_dim))
                shape = f"packed{len(seqlens)}x{total}-H{heads}/{kv_heads}-D{head_dim}"
                shape += f"-text{text_len}" if with_text else ""
                out.append(Case("varlen_attention", shape, direction, impls, flops=flops))
    return out


def _dense_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    # The H200 baseline shapes of DESIGN.md (B2 H32 L4096 D128, B4 H24 L4096 D96, B2 H32 L4160 D72).
    shapes = [(2, 2, 64, 64)] if quick else [(2, 32, 4096, 128), (4, 24, 4096, 96), (2, 32, 4160, 72)]
    out: list[Case] = []
    for b, h, L, dh in shapes:
        q = torch.randn(b, L, h, dh, device=device, dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        cu = torch.arange(b + 1, dtype=torch.int32, device=device) * L
        for direction in ("fwd", "fwd+bwd"):
            leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in (q, k, v)]

            def ours(q, k, v, backend, cu=cu, L=L):
                return ops.attention.varlen_attention(
                    q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, L, backend=backend
                ).view(q.shape)

            impls = {}
            if _triton_on(device):
                impls["triton"] = lambda leaves=leaves, direction=direction, ours=ours: _timed(
                    lambda *a: ours(*a, backend="triton"), leaves, direction
                )
            if device.type == "cuda":
                for name in ("flash", "cudnn"):
                    impls[f"SDPA {name}"] = lambda name=name, leaves=leaves, direction=direction: _timed(
                        _sdpa_backend(name), leaves, direction
                    )
                dense_flash = _flash_attn_dense()
                if dense_flash is not None:
                    impls["flash_attn"] = lambda leaves=leaves, direction=direction, fn=dense_flash: _timed(
                        fn, leaves, direction
                    )
                varlen = _torch_varlen_attn(cu, L)
                if varlen is not None:
                    impls["varlen_attn"] = lambda leaves=leaves, direction=direction, varlen=varlen: _timed(
                        varlen, leaves, direction
                    )
                if _triton_on(device):
                    impls["fk auto"] = lambda leaves=leaves, direction=direction, ours=ours: _timed(
                        lambda *a: ours(*a, backend=None), leaves, direction
                    )
            else:
                impls["SDPA"] = lambda leaves=leaves, direction=direction: _timed(_sdpa_default, leaves, direction)
            mult = 1.0 if direction == "fwd" else FWD_BWD_FACTOR
            flops = int(mult * attention_flops([L] * b, [0] * b, h, dh))
            out.append(Case("attention_dense", f"B{b}-H{h}-L{L}-D{dh}", direction, impls, flops=flops))
    return out


def lumina_gated_attention(xq, xk, xv, yk, yv, gate, qw, qb, kw, kb, kyw, kyb, freqs_cis, scale):
    """Lumina-T2X's Attention after the projections, eager: LayerNorm over H*Dh on q, k and the text keys,
    complex RoPE on q, k, SDPA over the image tokens, SDPA over the text tokens scaled by tanh(gate), summed.
    Shapes (B, L, H, Dh) / (B, Lt, H, Dh); every sample has the same length (so SDPA needs no mask)."""
    b, L, h, dh = xq.shape
    dtype = xq.dtype
    xq = F.layer_norm(xq.flatten(2), (h * dh,), qw, qb).view(b, L, h, dh)
    xk = F.layer_norm(xk.flatten(2), (h * dh,), kw, kb).view(b, L, h, dh)
    yk = F.layer_norm(yk.flatten(2), (h * dh,), kyw, kyb).view(yk.shape)

    def rotate(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.view(1, L, 1, dh // 2)).flatten(3).to(dtype)

    xq, xk = rotate(xq), rotate(xk)
    out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), scale=scale)
    out_y = F.scaled_dot_product_attention(xq.transpose(1, 2), yk.transpose(1, 2), yv.transpose(1, 2))
    out = out + out_y * gate.tanh().view(1, -1, 1, 1)
    return out.transpose(1, 2)


def _lumina_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    b, L, h, dh, lt = (2, 80, 2, 32, 8) if quick else (4, 4160, 32, 128, 256)
    positions = torch.arange(L, device=device)
    freqs = ops.rope.rope_freqs(dh, positions)
    freqs_cis = torch.complex(freqs[..., 0], freqs[..., 1])
    packed_freqs = freqs.repeat(b, 1, 1)  # (B*L, Dh/2, 2): positions restart per sample
    scale = 1.0 / math.sqrt(dh)
    cu = torch.arange(b + 1, dtype=torch.int32, device=device) * L
    text_cu = torch.arange(b + 1, dtype=torch.int32, device=device) * lt
    act = [torch.randn(b, L, h, dh, device=device, dtype=dtype) for _ in range(3)]
    text = [torch.randn(b, lt, h, dh, device=device, dtype=dtype) for _ in range(2)]
    params = [torch.randn(h, device=device, dtype=dtype)]  # gate
    params += [torch.randn(h * dh, device=device, dtype=dtype) * 0.1 + (i % 2 == 0) for i in range(6)]
    tensors = act + text + params

    def eager(xq, xk, xv, yk, yv, gate, qw, qb, kw, kb, kyw, kyb):
        return lumina_gated_attention(xq, xk, xv, yk, yv, gate, qw, qb, kw, kb, kyw, kyb, freqs_cis, scale)

    def fused(backend: str):
        # QK LayerNorm + RoPE in one pass (fk.qk_norm_rope), text-key LayerNorm (256 tokens), then the fused
        # self + gated-text attention on the packed layout: our kernel ("triton"), or torch's varlen_attn in its
        # place ("torch_varlen", our text branch around it).
        def chain(xq, xk, xv, yk, yv, gate, qw, qb, kw, kb, kyw, kyb):
            q, k = ops.rope.qk_norm_rope(xq.flatten(0, 1), xk.flatten(0, 1), packed_freqs, (qw, qb), (kw, kb))
            yk = F.layer_norm(yk.flatten(2), (h * dh,), kyw, kyb).view(-1, h, dh)
            return ops.attention.varlen_attention(
                q, k, xv.flatten(0, 1), cu, L, scale, text_k=yk, text_v=yv.flatten(0, 1), text_cu_seqlens=text_cu,
                text_max_seqlen=lt, gate=gate, backend=backend,
            ).view(b, L, h, dh)  # fmt: skip

        return chain

    def fused_rope_by_freqs(xq, xk, xv, yk, yv, gate, qw, qb, kw, kb, kyw, kyb):
        # LayerNorm only; RoPE through the attention's freqs= (q and k rotated once into a copy, then attended).
        q = F.layer_norm(xq.flatten(2), (h * dh,), qw, qb).view(-1, h, dh)
        k = F.layer_norm(xk.flatten(2), (h * dh,), kw, kb).view(-1, h, dh)
        yk = F.layer_norm(yk.flatten(2), (h * dh,), kyw, kyb).view(-1, h, dh)
        return ops.attention.varlen_attention(
            q, k, xv.flatten(0, 1), cu, L, scale, text_k=yk, text_v=yv.flatten(0, 1), text_cu_seqlens=text_cu,
            text_max_seqlen=lt, gate=gate, freqs=packed_freqs, backend="triton",
        ).view(b, L, h, dh)  # fmt: skip

    impls_fns = {"lumina eager": eager, "torch.compile": torch.compile(eager)}
    if _triton_on(device):
        impls_fns["fk fused"] = fused("triton")
        impls_fns["fk fused freqs="] = fused_rope_by_freqs
    if "torch_varlen" in _dispatch.available_backends("varlen_attention", device):
        impls_fns["fk fused torch_varlen"] = fused("torch_varlen")
    out: list[Case] = []
    for direction in ("fwd", "fwd+bwd"):
        leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in tensors]
        impls = {
            label: (lambda fn=fn, leaves=leaves, direction=direction: _timed(fn, leaves, direction))
            for label, fn in impls_fns.items()
        }
        mult = 1.0 if direction == "fwd" else FWD_BWD_FACTOR
        flops = int(mult * attention_flops([L] * b, [lt] * b, h, dh))
        out.append(Case("lumina_gated_attention", f"B{b}-L{L}-H{h}-D{dh}-text{lt}", direction, impls, flops=flops))
    return out


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return (
        _packed_cases(quick, device, dtype) + _dense_cases(quick, device, dtype) + _lumina_cases(quick, device, dtype)
    )


def smoke_cases(device: torch.device) -> list[SmokeCase]:
    """What the kernels branch on: a power-of-two head dim (the descriptor / TMA tiles where the autotuner
    offers them), Dh 72 as 64 + 16 with GQA, in-kernel RoPE and a sample without text, and Dh 128 with text."""

    def case(name, lens, text_lens, heads, kv_heads, head_dim, rope=False) -> SmokeCase:
        shapes = {"q": (sum(lens), heads, head_dim), "k": (sum(lens), kv_heads, head_dim)}
        shapes["v"] = shapes["k"]
        fixed = {"cu_seqlens": offsets(lens, device), "max_seqlen": max(lens)}
        if text_lens is not None:
            text = (sum(text_lens), kv_heads, head_dim)
            shapes.update(text_k=text, text_v=text, gate=(heads,))
            fixed.update(text_cu_seqlens=offsets(text_lens, device), text_max_seqlen=max(text_lens))
        if rope:
            positions = torch.cat([torch.arange(n, device=device) for n in lens])
            fixed["freqs"] = ops.rope.rope_freqs(head_dim, positions)
        run = lambda b, **t: ops.attention.varlen_attention(**t, **fixed, backend=b)
        return SmokeCase(name, "varlen_attention", shapes, run)

    return [
        case("varlen_attention-D64-self", [17, 1, 30], None, 2, 2, 64),
        case("varlen_attention-D72-gqa-text-empty-rope", [17, 1, 30], [5, 0, 9], 4, 2, 72, rope=True),
        case("varlen_attention-D128-text", [33, 20], [7, 3], 2, 1, 128),
    ]
