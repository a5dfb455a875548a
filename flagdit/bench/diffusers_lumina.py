"""Whole-model case: diffusers' Lumina-Next transformer forward, patched onto our kernels vs as shipped.

Full (GPU): the Lumina-Next-SFT 2B config (hidden 2304, 24 layers, 32 heads / 8 KV heads, head_dim 72,
Gemma-2B captions of width 2048) at 1024x1024 (128x128 latents -> 4096 tokens), batch 2 (a CFG pair: a
120-token prompt and a 12-token negative prompt padded to 256), random weights, bf16, inference (no grad).
Quick: a tiny config in fp32 (CPU-friendly), without the torch.compile baseline (compiling a model on a
shared CPU takes minutes and measures nothing we own).

Implementations: ``fk patched`` (``flagdit_kernels.integrations.diffusers.patch`` with default backends),
``diffusers eager`` (unpatched) and ``torch.compile`` (of the unpatched model). The FLOP count is the useful
work of one forward (projections, FFN, adaLN, self + caption attention); diffusers' duplicate caption-query
projection is not counted. Without diffusers installed there are no cases.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from flagdit_kernels.bench.cases import Case
from flagdit_kernels.integrations import diffusers as fkd


@dataclass(frozen=True)
class Config:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    cap_dim: int
    latent: int  # latent height = width (image side / 8)
    batch: int
    caption_len: int
    caption_tokens: tuple[int, ...]  # real tokens per sample (the rest is padding)
    multiple_of: int = 256
    in_channels: int = 4
    patch: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn(self) -> int:
        inner = int(4 * 2 * self.hidden / 3)
        return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

    @property
    def tokens(self) -> int:
        return (self.latent // self.patch) ** 2


NEXT_2B = Config("2B 1024px", 2304, 24, 32, 8, 2048, 128, 2, 256, (120, 12))
TINY = Config("tiny 128px", 128, 2, 4, 2, 64, 16, 2, 16, (11, 3), multiple_of=32)


def forward_flops(cfg: Config) -> int:
    """Useful FLOPs of one forward (matmuls and attention; elementwise work is not counted)."""
    d, kv, n = cfg.hidden, cfg.kv_heads * cfg.head_dim, cfg.batch * cfg.tokens
    text = sum(cfg.caption_tokens)
    adaln = min(d, 1024)
    per_layer = 2 * n * (d * d + 2 * d * kv + d * d + 3 * d * cfg.ffn)  # q, k, v, out, SwiGLU
    per_layer += 2 * text * 2 * cfg.cap_dim * kv  # caption keys and values
    per_layer += 2 * cfg.batch * adaln * 4 * d  # adaLN modulation
    per_layer += 4 * cfg.batch * cfg.tokens * cfg.tokens * cfg.heads * cfg.head_dim  # self-attention
    per_layer += 4 * cfg.tokens * text * cfg.heads * cfg.head_dim  # caption cross-attention
    patch_in = cfg.patch * cfg.patch * cfg.in_channels
    embed = 2 * n * patch_in * d + 2 * n * d * patch_in * 2  # patch embed, final layer (learned sigma)
    return cfg.layers * per_layer + embed


class _Workload:
    """The model and inputs, built on first use (so collecting the cases stays cheap) and shared by impls."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.model = None
        self.inputs: dict = {}

    def build(self):
        if self.model is not None:
            return self.model, self.inputs
        from diffusers import LuminaNextDiT2DModel
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

        cfg = self.cfg
        gen = torch.Generator(device="cpu").manual_seed(0)
        with torch.device(self.device):
            model = LuminaNextDiT2DModel(
                sample_size=cfg.latent,
                patch_size=cfg.patch,
                in_channels=cfg.in_channels,
                hidden_size=cfg.hidden,
                num_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                num_kv_heads=cfg.kv_heads,
                multiple_of=cfg.multiple_of,
                norm_eps=1e-5,
                learn_sigma=True,
                qk_norm=True,
                cross_attention_dim=cfg.cap_dim,
            )
        model = model.to(self.dtype).eval().requires_grad_(False)
        with torch.no_grad():
            model.pad_token.normal_()
            for block in model.layers:
                # As in converted checkpoints: one wq / q_norm for both attentions; live caption gates.
                block.attn2.to_q.weight.copy_(block.attn1.to_q.weight)
                block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
                block.gate.copy_(torch.randn(block.gate.shape, generator=gen) * 0.5)
        mask = torch.zeros(cfg.batch, cfg.caption_len, dtype=torch.int64)
        for i, n in enumerate(cfg.caption_tokens):
            mask[i, :n] = 1
        side = cfg.latent // cfg.patch
        self.inputs = dict(
            hidden_states=torch.randn(cfg.batch, cfg.in_channels, cfg.latent, cfg.latent, generator=gen),
            timestep=torch.rand(cfg.batch, generator=gen),
            encoder_hidden_states=torch.randn(cfg.batch, cfg.caption_len, cfg.cap_dim, generator=gen),
            encoder_mask=mask,
            # diffusers' pipeline builds a 384x384 table on the host every step; we keep ours on the device.
            image_rotary_emb=get_2d_rotary_pos_embed_lumina(cfg.head_dim, max(side, 1), max(side, 1)),
        )
        for key, value in self.inputs.items():
            cast = value.is_floating_point() and key != "timestep"
            self.inputs[key] = value.to(device=self.device, dtype=self.dtype if cast else value.dtype)
        self.inputs.update(cross_attention_kwargs={}, return_dict=False)
        self.model = model
        return model, self.inputs


def _runner(model, inputs):
    def run():
        with torch.no_grad():
            return model(**inputs)[0]

    return run


def cases(quick: bool, device: torch.device) -> list[Case]:
    if importlib.util.find_spec("diffusers") is None:
        return []
    cfg = TINY if quick else NEXT_2B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = _Workload(cfg, device, dtype)

    def patched():
        model, inputs = work.build()
        fkd.patch(model)
        return _runner(model, inputs)

    def eager():
        model, inputs = work.build()
        fkd.unpatch(model)
        return _runner(model, inputs)

    def compiled():
        model, inputs = work.build()
        fkd.unpatch(model)
        return _runner(torch.compile(model), inputs)

    impls = {"fk patched": patched, "diffusers eager": eager}
    if not quick or device.type == "cuda":
        impls["torch.compile"] = compiled
    shape = f"{cfg.name} B{cfg.batch} L{cfg.tokens} text{cfg.caption_len}"
    notes = {"config": cfg, "head_dim": cfg.head_dim, "gflop": math.floor(forward_flops(cfg) / 1e9)}
    return [Case("diffusers_lumina_next", shape, "fwd", impls, flops=forward_flops(cfg), notes=notes)]
