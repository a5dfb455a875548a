"""Tile-sparse varlen attention over long videos (issue 27): dense vs STA window vs VSA top-k, ours against
FlexAttention with the equivalent block mask.

Shapes (bf16, H32 Dh128 like Flag-DiT 5B/7B, 16 latent channels, patch 2, tile-major packs with 4x8x8 tiles):

- ``video720p-F32``: one 720p-like latent, 32 frames of 90 x 160 (45 x 80 patches): 116,671 tokens;
- ``video544p-F32``: 32 frames of 68 x 120 (34 x 60 patches): 66,399 tokens;
- ``mixed``: a 32-frame 480p-like video, a 16-frame 720p-like one and three images of other aspect ratios in
  one pack (mixed tile grids, partial edge tiles).

Per shape three cases: ``-dense`` (our dense kernel; Flex with the document mask), ``-window4x4x6`` (STA:
4 x 4 x 6 tiles around each query tile, about 20% density on the 720p grid) and ``-top96`` (VSA's selection, 96
key tiles per query tile, about the same density); placeholders global, no text (Flex has no gated branch). A
case's FLOPs are the visited ones (the lists' ``density`` x the dense count, from ``fk.tile_sparse_blocks``
when the case is built), so its TFLOP/s is the per-visited-block rate the issue's 85% target compares with the
dense case's. ``-top96`` also times ``+coarse``: the same call plus VSA's gated coarse branch
(``fk.tile_coarse_attention`` on the same backend, half-gated), i.e. VSA's whole attention, with the same FLOPs
counted, so the rate it loses against the plain call is the branch's overhead. Our timed call includes building
the block lists (the coarse top-k pass too); Flex's block mask is built once beforehand from the same lists
(``create_block_mask`` over a mask_mod that looks the lists up), which favours Flex. On the CPU (quick) two small
packs run the masked reference only (with and without the coarse branch): the Triton kernels and Flex are
GPU-only (interpreted Triton measures the interpreter, Flex needs its compiled GPU kernels).
"""

from __future__ import annotations

import torch

from ... import ops
from ...ops.tile_sparsity import TileBlocks, TileSparsity, tile_sparse_blocks
from ..cases import Case
from .attention import FWD_BWD_FACTOR, _timed, _triton_on, attention_flops, flex_document_attention

TILE = (4, 8, 8)
CHANNELS, PATCH = 16, 2
FULL_SHAPES = {
    "video720p-F32": [(CHANNELS, 32, 90, 160)],
    "video544p-F32": [(CHANNELS, 32, 68, 120)],
    "mixed": [(CHANNELS, 32, 60, 104), (CHANNELS, 16, 90, 160), (CHANNELS, 128, 128), (CHANNELS, 96, 176),
              (CHANNELS, 176, 96)],
}  # fmt: skip
QUICK_SHAPES = {"video-F6": [(CHANNELS, 6, 20, 36)], "mixed": [(CHANNELS, 5, 18, 30), (CHANNELS, 22, 14)]}
PATTERNS = {"window4x4x6": TileSparsity(window=(4, 4, 6)), "top96": TileSparsity(top_k=96)}
QUICK_PATTERNS = {"window1x2x2": TileSparsity(window=(1, 2, 2)), "top3": TileSparsity(top_k=3)}


def flex_tile_sparse(packed, blocks: TileBlocks, heads: int, device: torch.device):
    """FlexAttention (compiled) over the packed tokens with the block mask of ``blocks`` (same sample, and a
    placeholder on either side or the key's tile listed for the query's tile); None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    tiles = packed.tiles
    n_tiles, total = tiles.ranges.shape[0], tiles.token_tile.shape[0]
    listed = torch.zeros(blocks.keys.shape[0], n_tiles, n_tiles + 1, dtype=torch.bool, device=device)
    listed.scatter_(2, torch.where(blocks.keys >= 0, blocks.keys.long(), n_tiles), True)
    listed = listed[..., :n_tiles].contiguous()
    lengths = packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.long())
    tile = tiles.token_tile.long()
    per_head = listed.shape[0] > 1

    def visited(b, h, q_idx, kv_idx):
        tq, tk = tile[q_idx], tile[kv_idx]
        pair = listed[h if per_head else 0, tq.clamp(min=0), tk.clamp(min=0)]
        return (sample[q_idx] == sample[kv_idx]) & ((tq < 0) | (tk < 0) | pair)

    block_mask = create_block_mask(visited, None, heads if per_head else None, total, total, device=device,
                                   _compile=True)  # fmt: skip
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # packed (T, H, Dh) -> (1, H, T, Dh) views, no copies
        out = compiled(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                       v.transpose(0, 1).unsqueeze(0), block_mask=block_mask)  # fmt: skip
        return out.squeeze(0).transpose(0, 1)

    return run


def _cases_of(name: str, shapes, patterns, quick: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    heads, head_dim = (2, 32) if quick else (32, 128)
    latents = [torch.zeros(s, device=device) for s in shapes]
    packed = ops.packing.pack(latents, PATCH, tile=TILE)
    cu, max_seqlen, total = packed.cu_seqlens, packed.max_seqlen, packed.kind.shape[0]
    seqlens = packed.seqlens
    q = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    dense_flops = attention_flops(seqlens, [0] * len(seqlens), heads, head_dim)
    gpu = device.type == "cuda"
    out: list[Case] = []
    for label, sparsity in {"dense": None, **patterns}.items():
        sparse = {} if sparsity is None else {"sparsity": sparsity, "tiles": packed.tiles}
        blocks = None if sparsity is None else tile_sparse_blocks(q, k, cu, packed.tiles, sparsity)
        density = 1.0 if blocks is None else float(blocks.density)  # the lists every timed call builds again
        flex = None
        if gpu and not quick:
            flex = (
                flex_document_attention(seqlens, device)
                if blocks is None
                else flex_tile_sparse(packed, blocks, heads, device)
            )
        for direction in ("fwd", "fwd+bwd"):
            leaves = [x.detach().clone().requires_grad_(direction != "fwd") for x in (q, k, v)]

            def ours(q, k, v, backend, sparse=sparse):
                return ops.attention.varlen_attention(q, k, v, cu, max_seqlen, backend=backend, **sparse)

            def with_coarse(q, k, v, backend, ours=ours):
                coarse = ops.coarse_attention.tile_coarse_attention(q, k, v, packed.tiles, backend=backend)
                return ours(q, k, v, backend) + 0.5 * coarse

            backends = (["triton"] if _triton_on(device) else []) + (["reference"] if quick else [])
            impls = {}
            for backend in backends:
                variants = {backend: ours}
                if sparsity is not None and sparsity.top_k is not None:
                    variants[f"{backend}+coarse"] = with_coarse
                for impl, fn in variants.items():
                    impls[impl] = lambda leaves=leaves, direction=direction, fn=fn, backend=backend: _timed(
                        lambda *a: fn(*a, backend=backend), leaves, direction
                    )
            if flex is not None:
                impls["flex blockmask"] = lambda leaves=leaves, direction=direction, flex=flex: _timed(
                    flex, leaves, direction
                )
            mult = 1.0 if direction == "fwd" else FWD_BWD_FACTOR
            shape = f"{name}-{total}tok-H{heads}-D{head_dim}-{label}"
            notes = {"density": density, "tile": TILE, "sparsity": str(sparsity) if sparsity else "dense"}
            out.append(Case("tile_sparse_attention", shape, direction, impls, flops=int(mult * density * dense_flops),
                            notes=notes))  # fmt: skip
    return out


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, patterns = (QUICK_SHAPES, QUICK_PATTERNS) if quick else (FULL_SHAPES, PATTERNS)
    return [c for name, s in shapes.items() for c in _cases_of(name, s, patterns, quick, device, dtype)]
