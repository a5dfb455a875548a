"""Pack / unpack / embed_packed cases.

- ``mixed8``: the issue's batch of 8 latents (16 channels; images of several aspect ratios and a 5-frame
  video, about 6 MB in bf16). Launch-bound: the target is >= 10x the Python loop (Lumina-T2X's patchify +
  [nextline] + cat, one item at a time), H200 baseline 0.33 ms.
- ``large``: >= 256 MB moved (64 images of 16x256x256 bf16 plus videos), bandwidth-bound: the target is
  >= 75% of the measured device-to-device copy bandwidth, judged against ``bytes`` (the floor below).
- ``pack_tiled`` / ``unpack_tiled`` (``video``): a video-heavy batch packed tile-major (``fk.pack(...,
  tile=TILE)``, the layout of tile-sparse attention) against the same backend's raster pack (``<backend>
  raster``): what the scattered token rows and the host-built tile table cost. Floors as raster, plus the
  tile table's per-token entry (4 B).

Byte floors (``Case.bytes``): pack reads every latent element once and writes the packed rows (placeholder
rows included, as zeros) plus the token layout (positions 12 B, kind 1 B per token, patch_rows 8 B per patch,
cu_seqlens); unpack reads the patch rows and writes the latents; a backward adds the opposite direction
(without the layout). The Python-loop baselines move more than that (the cat of per-item pieces).
"""

from __future__ import annotations

import torch

from ... import ops
from ..._conventions import frames_hw
from ...ops import embed as embed_ops
from ..cases import CHEAP, OURS, Case, Select, SmokeCase, backend_impls, forward_backward

P = 2
CHANNELS = 16
# Where the GPU check times these cases (flagdit_kernels.bench.plan): the launch-bound batch, then the large one.
PLAN = {
    "bandwidth": (
        *(Select(op, f"{size}*", impl=CHEAP) for size in ("mixed", "large") for op in ("pack", "unpack")),
        Select("embed_packed", impl=OURS),
    )
}
# Tile of the tile-major cases: 2 frames x 8 x 8 patches (128 tokens), 2 x 4 x 4 in quick mode.
TILE, QUICK_TILE = (2, 8, 8), (2, 4, 4)


def mixed_shapes(quick: bool) -> list[tuple[int, ...]]:
    if quick:
        return [(CHANNELS, 32, 32), (CHANNELS, 16, 48), (CHANNELS, 3, 16, 16), (CHANNELS, 8, 64)]
    return [
        (CHANNELS, 128, 128),
        (CHANNELS, 64, 192),
        (CHANNELS, 96, 96),
        (CHANNELS, 5, 64, 64),
        (CHANNELS, 256, 32),
        (CHANNELS, 80, 120),
        (CHANNELS, 112, 64),
        (CHANNELS, 64, 64),
    ]


def large_shapes(quick: bool) -> list[tuple[int, ...]]:
    if quick:
        return [(CHANNELS, 64, 64)] * 4 + [(CHANNELS, 3, 32, 32)]
    # 64 x 2 MiB images + 16 smaller ones + 8 videos of 9 frames: 149 MiB of bf16 latents, ~300 MiB moved.
    return [(CHANNELS, 256, 256)] * 64 + [(CHANNELS, 128, 192)] * 16 + [(CHANNELS, 9, 128, 128)] * 8


def video_shapes(quick: bool) -> list[tuple[int, ...]]:
    if quick:
        return [(CHANNELS, 5, 32, 48), (CHANNELS, 32, 32), (CHANNELS, 3, 16, 24)]
    # A 720p-like latent (17 frames of 96x160: 65K patches), a smaller video and two images.
    return [(CHANNELS, 17, 96, 160), (CHANNELS, 9, 64, 112), (CHANNELS, 128, 128), (CHANNELS, 64, 192)]


def python_loop_pack(latents, p):
    """The baseline: Lumina-T2X style patchify + [nextline] zeros + cat, one item at a time."""
    rows = []
    for x in latents:
        x = x if x.dim() == 4 else x.unsqueeze(1)
        c, f, h, w = x.shape
        tokens = x.view(c, f, h // p, p, w // p, p).permute(1, 2, 4, 0, 3, 5).flatten(3)
        tokens = torch.cat([tokens, tokens.new_zeros(f, h // p, 1, c * p * p)], dim=2).flatten(1, 2)
        nextframe = tokens.new_zeros(1, c * p * p)
        for i, frame in enumerate(tokens.unbind(0)):
            rows.append(frame)
            if i < f - 1:
                rows.append(nextframe)
    return torch.cat(rows)


def python_loop_unpack(tokens, shapes, p, channels):
    """The baseline: Lumina-T2X's unpatchify, one item at a time (split, drop placeholders, permute)."""
    outs, start = [], 0
    for s in shapes:
        f, h, w = frames_hw(s)
        hp, wp = h // p, w // p
        n = f * hp * (wp + 1) + f - 1
        item = torch.cat([tokens[start : start + n], tokens.new_empty(1, tokens.shape[1])]).view(
            f, hp * (wp + 1) + 1, -1
        )
        x = item[:, :-1].reshape(f, hp, wp + 1, p, p, channels)[:, :, :wp]
        x = x.permute(5, 0, 1, 3, 2, 4).reshape(channels, f, h, w)
        outs.append(x if len(s) == 4 else x.squeeze(1))
        start += n
    return outs


def _floors(shapes, elem: int) -> tuple[int, int, int]:
    """(latent bytes, packed-row bytes, layout bytes) of a batch."""
    latent = sum(torch.Size(s).numel() for s in shapes) * elem
    tokens = patches = 0
    for s in shapes:
        f, h, w = frames_hw(s)
        tokens += f * (h // P) * (w // P + 1) + f - 1
        patches += f * (h // P) * (w // P)
    return latent, tokens * CHANNELS * P * P * elem, tokens * 13 + patches * 8 + 4 * (len(shapes) + 1)


def _pack_unpack_cases(name: str, shapes, device, dtype) -> list[Case]:
    elem = torch.tensor([], dtype=dtype).element_size()
    latent_bytes, row_bytes, layout_bytes = _floors(shapes, elem)
    shape = f"{name}-{len(shapes)}items-{latent_bytes / 2**20:.1f}MiB"
    out: list[Case] = []
    for direction in ("fwd", "fwd+bwd"):
        grad = direction == "fwd+bwd"
        latents = [torch.randn(s, device=device, dtype=dtype).requires_grad_(grad) for s in shapes]
        packed = ops.packing.pack([x.detach() for x in latents], P)
        tokens = torch.randn(packed.patches.shape, device=device, dtype=dtype).requires_grad_(grad)

        def timed(fn, inputs, grad=grad):
            return forward_backward(fn, inputs) if grad else fn

        def ours_pack(b, latents=latents, timed=timed):
            return timed(lambda: ops.packing.pack(latents, P, backend=b).patches, latents)

        def ours_unpack(b, tokens=tokens, packed=packed, timed=timed):
            return timed(lambda: ops.packing.unpack(tokens, packed, CHANNELS, backend=b), [tokens])

        pack_impls = backend_impls("pack", device, ours_pack)
        pack_impls["python loop"] = lambda latents=latents, timed=timed: timed(
            lambda: python_loop_pack(latents, P), latents
        )
        unpack_impls = backend_impls("unpack", device, ours_unpack)
        unpack_impls["python loop"] = lambda tokens=tokens, timed=timed: timed(
            lambda: python_loop_unpack(tokens, shapes, P, CHANNELS), [tokens]
        )
        # Backward of pack = unpack of the gradient rows; backward of unpack = pack (zeros at placeholders).
        pack_bytes = latent_bytes + row_bytes + layout_bytes + (2 * latent_bytes if grad else 0)
        unpack_bytes = 2 * latent_bytes + (latent_bytes + row_bytes if grad else 0)
        out.append(Case("pack", shape, direction, pack_impls, bytes=pack_bytes))
        out.append(Case("unpack", shape, direction, unpack_impls, bytes=unpack_bytes))
    return out


def _tiled_impls(shapes, tile, grad: bool, device, dtype) -> tuple[dict, dict]:
    """(pack impls, unpack impls) of one direction: every backend tile-major, and the same raster."""
    latents = [torch.randn(s, device=device, dtype=dtype).requires_grad_(grad) for s in shapes]
    packs = {order: ops.packing.pack([x.detach() for x in latents], P, tile=order) for order in (tile, None)}
    tokens = torch.randn(packs[tile].patches.shape, device=device, dtype=dtype).requires_grad_(grad)
    timed = lambda fn, inputs: forward_backward(fn, inputs) if grad else fn
    pack_impls, unpack_impls = {}, {}
    for order, suffix in ((tile, ""), (None, " raster")):

        def pack(b, order=order):
            return timed(lambda: ops.packing.pack(latents, P, tile=order, backend=b).patches, latents)

        def unpack(b, packed=packs[order]):
            return timed(lambda: ops.packing.unpack(tokens, packed, CHANNELS, backend=b), [tokens])

        pack_impls |= {name + suffix: make for name, make in backend_impls("pack", device, pack).items()}
        unpack_impls |= {name + suffix: make for name, make in backend_impls("unpack", device, unpack).items()}
    return pack_impls, unpack_impls


def _tiled_cases(shapes, tile, device, dtype) -> list[Case]:
    elem = torch.tensor([], dtype=dtype).element_size()
    latent_bytes, row_bytes, layout_bytes = _floors(shapes, elem)
    layout_bytes += row_bytes // (CHANNELS * P * P * elem) * 4  # the tile table's token_tile
    shape = f"video-{len(shapes)}items-{latent_bytes / 2**20:.1f}MiB-tile{'x'.join(map(str, tile))}"
    out: list[Case] = []
    for direction in ("fwd", "fwd+bwd"):
        grad = direction == "fwd+bwd"
        pack_impls, unpack_impls = _tiled_impls(shapes, tile, grad, device, dtype)
        pack_bytes = latent_bytes + row_bytes + layout_bytes + (2 * latent_bytes if grad else 0)
        unpack_bytes = 2 * latent_bytes + (latent_bytes + row_bytes if grad else 0)
        out.append(Case("pack_tiled", shape, direction, pack_impls, bytes=pack_bytes))
        out.append(Case("unpack_tiled", shape, direction, unpack_impls, bytes=unpack_bytes))
    return out


def _embed_cases(shapes, device, dtype, dim: int) -> list[Case]:
    elem = torch.tensor([], dtype=dtype).element_size()
    packed = ops.packing.pack([torch.randn(s, device=device, dtype=dtype) for s in shapes], P)
    total, width = packed.patches.shape
    shape = f"T{total}-{width}to{dim}"
    out: list[Case] = []
    for direction in ("fwd", "fwd+bwd"):
        grad = direction == "fwd+bwd"
        args = [
            packed.patches.clone().requires_grad_(grad),
            (torch.randn(dim, width, device=device, dtype=dtype) * width**-0.5).requires_grad_(grad),
            torch.randn(dim, device=device, dtype=dtype).requires_grad_(grad),
            torch.randn(2, dim, device=device, dtype=dtype).requires_grad_(grad),
        ]

        def make(b, args=args, grad=grad):
            patches, weight, bias, table = args
            fn = lambda: embed_ops.embed_packed(patches, packed.kind, weight, bias, table, backend=b)
            return forward_backward(fn, args) if grad else fn

        impls = backend_impls("embed_packed", device, make)
        # fwd: read patches + weight, write (T, dim); bwd: read grad twice-ish, write grad patches / weight.
        fwd_bytes = (total * width + dim * width + total * dim) * elem
        flops = 2 * total * width * dim * (3 if grad else 1)
        out.append(Case("embed_packed", shape, direction, impls, bytes=fwd_bytes * (3 if grad else 1), flops=flops))
    return out


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = _pack_unpack_cases("mixed", mixed_shapes(quick), device, dtype)
    out += _pack_unpack_cases("large", large_shapes(quick), device, dtype)
    out += _tiled_cases(video_shapes(quick), QUICK_TILE if quick else TILE, device, dtype)
    out += _embed_cases(mixed_shapes(quick), device, dtype, dim=256 if quick else 2304)
    return out


def smoke_cases(device: torch.device) -> list[SmokeCase]:
    """Three latents of 4 channels (an image, a 3-frame video, a wide image) at patch size 2: pack, unpack and
    the patch embedding of their packed rows."""
    latents = [(4, 6, 8), (4, 3, 4, 6), (4, 2, 10)]
    packed = ops.packing.pack([torch.zeros(s, device=device) for s in latents], P, backend="reference")
    rows = tuple(packed.patches.shape)

    def embed(b, patches, weight, bias, table):
        return embed_ops.embed_packed(patches, packed.kind, weight, bias, table, backend=b)

    return [
        SmokeCase(
            "pack",
            "pack",
            dict(zip("avc", latents)),
            lambda b, a, v, c: ops.packing.pack([a, v, c], P, backend=b).patches,
        ),
        SmokeCase(
            "unpack", "unpack", {"tokens": rows}, lambda b, tokens: ops.packing.unpack(tokens, packed, 4, backend=b)
        ),
        SmokeCase(
            "embed_packed",
            "embed_packed",
            {"patches": rows, "weight": (40, 16), "bias": (40,), "table": (2, 40)},
            embed,
        ),
    ]
