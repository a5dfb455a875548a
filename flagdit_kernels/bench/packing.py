"""Pack / unpack cases: a mixed batch of 8 latents (images of several aspect ratios and a video)."""

from __future__ import annotations

import torch

from .. import ops
from .cases import Case, backend_impls


def mixed_batch(quick: bool, device, dtype) -> list[torch.Tensor]:
    shapes = (
        [(16, 32, 32), (16, 16, 48), (16, 3, 16, 16), (16, 8, 64)]
        if quick
        else [
            (16, 128, 128),
            (16, 64, 192),
            (16, 96, 96),
            (16, 5, 64, 64),
            (16, 256, 32),
            (16, 80, 120),
            (16, 112, 64),
            (16, 64, 64),
        ]
    )
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def python_loop_pack(latents, p):
    """The baseline: Lumina-T2X style patchify + [nextline] zeros + cat, one item at a time."""
    rows = []
    for x in latents:
        x = x if x.dim() == 4 else x.unsqueeze(1)
        c, f, h, w = x.shape
        tokens = x.view(c, f, h // p, p, w // p, p).permute(1, 2, 4, 0, 3, 5).flatten(3)
        tokens = torch.cat([tokens, tokens.new_zeros(f, h // p, 1, c * p * p)], dim=2).flatten(1, 2)
        rows.extend(tokens.unbind(0))
    return torch.cat(rows)


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latents = mixed_batch(quick, device, dtype)
    packed = ops.packing.pack(latents, 2)
    nbytes = 2 * sum(x.numel() for x in latents) * latents[0].element_size()
    shape = f"{len(latents)}items-{nbytes // 2 // 1024}KiB"
    tokens = torch.randn(packed.patches.shape[0], 4 * 16, device=device, dtype=dtype)
    pack_impls = backend_impls("pack", device, lambda b: lambda: ops.packing.pack(latents, 2, backend=b))
    pack_impls["python loop"] = lambda: lambda: python_loop_pack(latents, 2)
    unpack_impls = backend_impls("unpack", device, lambda b: lambda: ops.packing.unpack(tokens, packed, 16, backend=b))
    return [
        Case("pack", shape, "fwd", pack_impls, bytes=nbytes),
        Case("unpack", shape, "fwd", unpack_impls, bytes=nbytes),
    ]
