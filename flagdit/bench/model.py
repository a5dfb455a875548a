"""Whole-model cases: a Flag-DiT training step (forward + backward of the flow-matching loss) on a packed
mixed-resolution batch, and one sampling step (a CFG pair) at 1024x1024 and 2048x512.

GPU shapes: SDXL-VAE latents (4 channels, 1/8 of the pixels), patch 2, images of 256..1024 px in one packed
batch; configs ``flag-dit-600m`` and ``next-dit-2b`` in bf16. Implementations: every backend that some model
op has on the device (``reference`` = eager Lumina math), and ``torch.compile`` of the reference model.
``flops`` counts the matmuls and attention (forward x3 for a training step); ``notes["tokens"]`` gives
tokens/s, and ``python -m flagdit.bench.model`` also prints the peak memory of each implementation.
"""

from __future__ import annotations

import argparse

import torch

import flagdit_kernels as fk
from flagdit_kernels.bench.cases import Case
from flagdit_kernels.bench.timing import matmul_tflops, time_ms

from .. import configs
from ..flow import training_loss
from ..model import FlagDiT

MODEL_OPS = ("qk_norm_rope", "varlen_attention", "rms_norm", "rms_norm_modulate", "gated_residual_rms_norm")

# (latent H, latent W) of the packed training batch: 1024^2, 768x1024, 512^2 x2, 256^2 x4 pixels.
GPU_TRAIN_LATENTS = [(128, 128), (96, 128), (64, 64), (64, 64), (32, 32), (32, 32), (32, 32), (32, 32)]
QUICK_TRAIN_LATENTS = [(8, 12), (8, 8), (6, 4)]
SAMPLE_LATENTS = {"1024x1024": (128, 128), "2048x512": (256, 64)}
CAPTION_TOKENS = 128


def model_backends(device: torch.device) -> list[str]:
    """``reference`` plus each fused backend that at least one block op has on ``device`` (never interpreted)."""
    out = ["reference"]
    for b in ("triton", "cuda"):
        if b == "triton" and device.type == "cpu":
            continue
        if any(b in fk.available_backends(op, device) for op in MODEL_OPS):
            out.append(b)
    return out


def step_flops(config, latents: list[tuple[int, int]], text_tokens: int, backward: bool) -> int:
    """Matmul + attention FLOPs of one forward (x3 with backward) over a packed batch."""
    c, p = config, config.patch_size
    lens = [(h // p) * (w // p + int(c.nextline)) for h, w in latents]
    t = sum(lens)
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    per_token_layer = 2 * (c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim)
    attn_layer = sum(4 * n * n * q + 4 * n * text_tokens * q for n in lens)
    text_layer = len(latents) * text_tokens * 2 * 2 * c.cap_feat_dim * kv
    io = 2 * t * (p * p * c.in_channels * c.dim + c.dim * p * p * c.out_channels)
    fwd = c.n_layers * (t * per_token_layer + attn_layer + text_layer) + io
    return 3 * fwd if backward else fwd


def _inputs(config, latents, batch_text, device, dtype, generator):
    xs = [torch.randn(config.in_channels, h, w, device=device, dtype=dtype, generator=generator) for h, w in latents]
    cap = torch.randn(len(latents), batch_text, config.cap_feat_dim, device=device, dtype=dtype, generator=generator)
    mask = torch.ones(len(latents), batch_text, dtype=torch.int32, device=device)
    mask[:, batch_text * 3 // 4 :] = 0  # a quarter of the caption slots are padding
    return xs, cap, mask


def _build(config_name, backend, compile_model, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: a 2B model's CPU init alone takes tens of seconds
        model = FlagDiT(configs[config_name], backend=backend).to(dtype)
    return torch.compile(model) if compile_model else model


def _train_step(config_name, backend, compile_model, latents, device, dtype):
    def make():
        model = _build(config_name, backend, compile_model, device, dtype)
        g = torch.Generator(device=device).manual_seed(0)
        xs, cap, mask = _inputs(model.config if not compile_model else model._orig_mod.config, latents,
                                CAPTION_TOKENS, device, dtype, g)  # fmt: skip
        t = torch.rand(len(xs), device=device, generator=g)
        x0 = [torch.randn_like(x) for x in xs]

        def step():
            for p in model.parameters():
                p.grad = None
            training_loss(model, xs, cap, mask, t=t, x0=x0).backward()

        return step

    return make


def _sample_step(config_name, backend, compile_model, latent, device, dtype):
    def make():
        model = _build(config_name, backend, compile_model, device, dtype).eval()
        inner = model._orig_mod if compile_model else model
        g = torch.Generator(device=device).manual_seed(0)
        xs, cap, mask = _inputs(inner.config, [latent, latent], CAPTION_TOKENS, device, dtype, g)
        with torch.no_grad():
            text = inner.encode_text(cap, mask, cache_kv=True)
        t = torch.full((2,), 0.5, device=device)

        def step():
            with torch.no_grad():
                return model(xs, t, text=text)

        return step

    return make


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ("tiny",) if quick else ("flag-dit-600m", "next-dit-2b")
    out: list[Case] = []
    for name in names:
        config = configs[name]
        latents = QUICK_TRAIN_LATENTS if quick else GPU_TRAIN_LATENTS
        impls = {b: _train_step(name, b, False, latents, device, dtype) for b in model_backends(device)}
        if not quick:
            impls["torch.compile"] = _train_step(name, "reference", True, latents, device, dtype)
        tokens = sum((h // 2) * (w // 2 + int(config.nextline)) for h, w in latents)
        shape = f"{name} {len(latents)} items {tokens} tok"
        flops = step_flops(config, latents, CAPTION_TOKENS * 3 // 4, backward=True)
        out.append(Case("model_train_step", shape, "fwd+bwd", impls, flops=flops, notes={"tokens": tokens}))
        for label, latent in SAMPLE_LATENTS.items() if not quick else [("16x24", (16, 24))]:
            impls = {b: _sample_step(name, b, False, latent, device, dtype) for b in model_backends(device)}
            if not quick:
                impls["torch.compile"] = _sample_step(name, "reference", True, latent, device, dtype)
            flops = step_flops(config, [latent, latent], CAPTION_TOKENS * 3 // 4, backward=False)
            tokens = 2 * (latent[0] // 2) * (latent[1] // 2 + int(config.nextline))
            out.append(Case("model_sample_step", f"{name} {label} cfg-pair", "fwd", impls, flops=flops,
                            notes={"tokens": tokens}))  # fmt: skip
    return out


def main(argv=None) -> None:
    """Times every case and implementation; prints ms, tokens/s, TFLOP/s, MFU and peak memory."""
    p = argparse.ArgumentParser(prog="python -m flagdit.bench.model")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_rate = matmul_tflops(str(device))
    print(f"device {device}, measured matmul rate {peak_rate:.1f} TFLOP/s")
    for case in cases(args.quick, device):
        for label, make in case.impls.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            fn = make()
            ms = time_ms(fn, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            tflops = case.flops / ms / 1e9
            print(f"{case.name:60s} {label:14s} {ms:9.2f} ms {case.notes['tokens'] / ms * 1e3:10.0f} tok/s "
                  f"{tflops:7.1f} TFLOP/s MFU {tflops / peak_rate:5.1%} peak {peak:6.2f} GiB")  # fmt: skip
            del fn


if __name__ == "__main__":
    main()
